"""The proxy on ChromaStore: a separate synthesis worker sharing the store, and a restart that loses no
vote and fits the pending users on startup (checkpointer under the store home)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import openai
import pytest

from graphs.synthesis import open_checkpointer
from store.chroma import ChromaStore
from store.embeddings import chroma_embedding_function
from synth_agent.config import Settings
from synth_agent.engine.synthesize import FitConfig
from synth_agent.llm.client import EndpointConfig, LLMClient
from synth_agent.proxy import ProxyServer, ProxySettings, SynthesisWorker, create_app
from synth_agent.scheduler import SynthesisPolicy
from synth_agent.sim.population import Population, vote_to_json
from synth_agent.sim.server import SimEndpoint

KEY = "sk-chroma"
H = {"Authorization": f"Bearer {KEY}"}
FIT = FitConfig(n_trials=2, n_demo_candidates=2)
POLICY = SynthesisPolicy(debounce=0.0)


@pytest.fixture(scope="module")
def ef() -> Any:
    return chroma_embedding_function()  # MiniLM: load once per module


@pytest.fixture(scope="module")
def sim() -> Iterator[SimEndpoint]:
    with SimEndpoint(seed=0) as ep:
        yield ep


def serve(sim: SimEndpoint, store: ChromaStore, home: Path, synthesis: str) -> ProxyServer:
    llm = LLMClient(EndpointConfig(base_url=sim.base_url))
    app = create_app(
        Settings(base_url=sim.base_url, home=home),
        ProxySettings(api_keys=f"acme:{KEY}", synthesis=synthesis, persona_ttl=0),  # type: ignore[arg-type]
        store=store, llm=llm, fit_config=FIT, policy=POLICY,
    )
    return ProxyServer(app, close=[llm])


def post_votes(srv: ProxyServer, user: str, n: int, seed: int) -> None:
    pop = Population(1, seed=seed)
    votes = [{**vote_to_json(v), "user_id": user} for v in pop.votes(pop.user_ids[0], n)]
    r = httpx.post(f"{srv.base_url}/votes", json=votes, headers=H, timeout=60)
    assert r.status_code == 200 and r.json()["added"] == n, r.text


def persona_status(srv: ProxyServer, user: str) -> int:
    return httpx.get(f"{srv.base_url}/users/{quote(user, safe='')}/persona", headers=H, timeout=30).status_code


def test_separate_worker_fits_users_from_the_shared_store(sim: SimEndpoint, ef: Any, tmp_path: Path) -> None:
    store = ChromaStore(path=str(tmp_path / "chroma"), embedding_function=ef)
    user = "émile.z/ops@exämple.org"
    with serve(sim, store, tmp_path, "off") as srv:
        post_votes(srv, user, 6, seed=4)
        assert persona_status(srv, user) == 404  # the serving process fits nothing itself

        async def run_worker() -> int:
            llm = LLMClient(EndpointConfig(base_url=sim.base_url))
            async with open_checkpointer(tmp_path) as cp:
                worker = SynthesisWorker(store, llm, cp, fit_config=FIT, policy=POLICY, poll_interval=0.05)
                stop = asyncio.Event()
                task = asyncio.create_task(worker.run(stop))
                await worker.poller.swept.wait()
                await worker.scheduler.wait_idle()
                stop.set()
                await task
            await llm.aclose()
            return worker.scheduler.stats.runs_succeeded

        assert asyncio.run(run_worker()) == 1
        assert persona_status(srv, user) == 200
        profile = httpx.get(f"{srv.base_url}/users/{quote(user, safe='')}/persona", headers=H, timeout=30).json()
        assert profile["version"] == 1 and "selection" in profile["meta"]  # fitted and cross-validated by the worker
        raw = openai.OpenAI(base_url=srv.base_url, api_key=KEY, max_retries=0).chat.completions.with_raw_response.create(
            model="sim", user=user, messages=[{"role": "user", "content": "How do I start learning Python?"}]
        )
        # the worker's persona, read from the shared store, injected where its per-user guard serves it
        injected = profile["meta"]["served"] in ("persona_demos", "persona")
        assert raw.headers["x-synth-persona-version"] == ("1" if injected else "0")


def test_restart_loses_no_vote_and_fits_pending_users_on_startup(sim: SimEndpoint, ef: Any, tmp_path: Path) -> None:
    path = str(tmp_path / "chroma")
    users = ["ana@example.com", "bo 博"]
    first = serve(sim, ChromaStore(path=path, embedding_function=ef), tmp_path, "off")
    with first:
        for i, u in enumerate(users):
            post_votes(first, u, 6, seed=20 + i)
    # a new process: new store instance over the same directory, synthesis in-process
    second = serve(sim, ChromaStore(path=path, embedding_function=ef), tmp_path, "inline")
    with second:
        state = second.app.state.proxy
        second.call(state.poller.swept.wait())
        second.call(state.scheduler.wait_idle())
        for u in users:
            assert second.call(state.memories("acme").count_votes(u)) == 6
            assert persona_status(second, u) == 200
        assert state.scheduler.stats.runs_succeeded == 2
    assert (tmp_path / "checkpoints.sqlite").exists()  # resumable fits are checkpointed under the home
