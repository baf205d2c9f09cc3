"""A forget that races a running fit, through the real proxy (uvicorn, inline synthesis).

The fit runs while ``DELETE /v1/users/{u}`` answers; it would save a persona after the delete,
so the route erases what a fit writes once the fit ends. That follow-up must not take votes the
user cast, and had acknowledged, after the DELETE answered (a soak once lost exactly such a vote).
"""

from __future__ import annotations

import time
from pathlib import Path
from urllib.parse import quote

import httpx
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.store.memory import InMemoryStore

from synth_agent.config import Settings
from synth_agent.engine.synthesize import FitConfig
from synth_agent.llm.client import EndpointConfig, LLMClient
from synth_agent.proxy import ProxyServer, ProxySettings, create_app
from synth_agent.scheduler import SynthesisPolicy, SynthesisScheduler
from synth_agent.sim.population import Population, vote_to_json
from synth_agent.sim.server import SimEndpoint

KEY = "sk-acme-1"


def _wait(cond: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_forget_during_fit_keeps_votes_cast_after_it(tmp_path: Path) -> None:
    user = "racer@example.com"
    pop = Population(1, seed=3)
    votes = [{**vote_to_json(v), "user_id": user} for v in pop.votes(pop.user_ids[0], 9)]
    with SimEndpoint(latency_ms=60) as sim:  # slow enough that the fit is still running at the DELETE
        llm = LLMClient(EndpointConfig(base_url=sim.base_url))
        app = create_app(
            Settings(base_url=sim.base_url, home=str(tmp_path)),
            ProxySettings(api_keys=f"acme:{KEY}", default_model="sim-chat"),
            store=InMemoryStore(),
            llm=llm,
            checkpointer=InMemorySaver(),
            fit_config=FitConfig(n_trials=2, n_demo_candidates=2),
            policy=SynthesisPolicy(first_fit=5, debounce=0.0),
        )
        with ProxyServer(app, close=[llm]) as srv:
            h = {"Authorization": f"Bearer {KEY}"}
            state = app.state.proxy
            sched = state.scheduler
            assert isinstance(sched, SynthesisScheduler)
            assert httpx.post(f"{srv.base_url}/votes", json=votes[:8], headers=h).json()["added"] == 8
            _wait(lambda: sched.is_busy("acme", user), 10, "the fit to start")

            gone = httpx.delete(f"{srv.base_url}/users/{quote(user, safe='')}", headers=h)
            assert gone.status_code == 200 and gone.json()["deleted"]["votes"] == 8
            assert sched.is_busy("acme", user), "the fit ended before the DELETE: the race was not exercised"
            late = httpx.post(f"{srv.base_url}/votes", json=[votes[8]], headers=h)
            assert late.status_code == 200 and late.json()["added"] == 1

            _wait(lambda: not sched.is_busy("acme", user) and not state.background, 120, "the fit and the follow-up")
            memory = state.memories("acme")
            kept = srv.call(memory.list_votes(user))
            assert [v.id for v in kept] == [votes[8]["id"]]  # the acknowledged late vote survived
            assert srv.call(memory.persona_history(user)) == []  # the raced fit's persona did not
            persona = httpx.get(f"{srv.base_url}/users/{quote(user, safe='')}/persona", headers=h)
            assert persona.status_code == 404
            assert sched.runs_for("acme", user) == 0 and sched.tracked_users == 0  # the scheduler forgot too
