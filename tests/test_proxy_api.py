"""The OpenAI-compatible proxy, served for real by uvicorn, with the simulator as upstream.

Real clients (the ``openai`` SDK and LangChain's ``ChatOpenAI``, only ``base_url``/``api_key``
changed) talk to it; a recording brain in the simulator shows what the upstream was sent.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import openai
import pytest
from langchain_openai import ChatOpenAI
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.store.memory import InMemoryStore

from graphs.synthesis import synthesis_thread_id
from synth_agent.config import Settings
from synth_agent.engine.synthesize import FitConfig
from synth_agent.llm.cache import MemoryCache
from synth_agent.llm.client import EndpointConfig, LLMClient
from synth_agent.models import PersonaProfile
from synth_agent.proxy import ProxyServer, ProxySettings, ProxyState, create_app
from synth_agent.scheduler import SynthesisPolicy
from synth_agent.sim.brain import SimBrain
from synth_agent.sim.population import Population, vote_to_json
from synth_agent.sim.server import SimEndpoint

KEY = "sk-acme-1"
BULLETS = "The user strongly prefers bullet lists."
QUESTION = "How do I start learning Python?"


class RecordingBrain:
    """The simulator's brain, remembering every message list it was asked to answer."""

    def __init__(self) -> None:
        self.brain = SimBrain(seed=0)
        self.seen: list[list[dict[str, str]]] = []
        self.lock = threading.Lock()

    def respond(self, messages: list[dict[str, str]], **kw: Any) -> Any:
        with self.lock:
            self.seen.append([dict(m) for m in messages])
        return self.brain.respond(messages, **kw)

    def chats_for(self, question: str) -> list[list[dict[str, str]]]:
        with self.lock:
            return [m for m in self.seen if m and m[-1].get("content") == question]


@dataclass
class World:
    sim: SimEndpoint
    brain: RecordingBrain
    srv: ProxyServer
    state: ProxyState

    def h(self, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {KEY}", **extra}

    def give_persona(self, user: str, text: str = BULLETS) -> PersonaProfile:
        assert self.state.memories is not None
        saved = self.srv.call(self.state.memories("acme").save_persona(PersonaProfile(user_id=user, persona=text)))
        assert self.state.personalizer is not None
        self.state.personalizer.invalidate("acme", user)
        return saved


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    brain = RecordingBrain()
    with SimEndpoint(brain=brain) as sim:
        settings = Settings(base_url=sim.base_url, home=tmp_path_factory.mktemp("proxy-home"))
        llm = LLMClient(EndpointConfig(base_url=sim.base_url))
        app = create_app(
            settings,
            ProxySettings(api_keys=f"acme:{KEY}", model_map={"gpt-4o-mini": "sim-chat"}, default_model="gpt-4o-mini"),
            store=InMemoryStore(),
            llm=llm,
            checkpointer=InMemorySaver(),
            fit_config=FitConfig(n_trials=2, n_demo_candidates=2),
            policy=SynthesisPolicy(debounce=0.0),
        )
        with ProxyServer(app, close=[llm]) as srv:
            yield World(sim, brain, srv, app.state.proxy)


def client(w: World, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=w.srv.base_url, api_key=KEY, max_retries=0, timeout=30, **kw)


def has_bullets(text: str) -> bool:
    return any(line.lstrip().startswith(("- ", "* ", "• ")) for line in text.splitlines())


# ------------------------------------------------------------------ OpenAI clients


def test_openai_sdk_injects_persona_non_streaming_and_streaming(world: World) -> None:
    user = "ana.maría/ops@example.com"
    world.give_persona(user)
    c = client(world)
    q = QUESTION + " (sdk)"
    raw = c.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", user=user,
        messages=[{"role": "system", "content": "Answer in English."}, {"role": "user", "content": q}],
    )
    reply = raw.parse()
    assert raw.headers["x-synth-persona-version"] == "1"
    assert reply.model == "sim-chat"  # the model map applied upstream
    assert has_bullets(reply.choices[0].message.content or "")
    sent = world.brain.chats_for(q)[-1]
    assert sent[0]["role"] == "system" and "<persona>" in sent[0]["content"] and BULLETS in sent[0]["content"]
    assert sent[1] == {"role": "system", "content": "Answer in English."}  # the client's own system message kept

    q2 = QUESTION + " (sdk stream)"
    chunks = list(c.chat.completions.create(
        model="gpt-4o-mini", user=user, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": q2}],
    ))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert len([ch for ch in chunks if ch.choices]) > 2 and chunks[-1].usage is not None
    assert has_bullets(text)
    assert BULLETS in world.brain.chats_for(q2)[-1][0]["content"]

    # a user without a persona (or no user at all) is forwarded untouched
    q3 = QUESTION + " (anon)"
    raw = c.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=[{"role": "user", "content": q3}])
    assert raw.headers["x-synth-persona-version"] == "0"
    assert world.brain.chats_for(q3)[-1] == [{"role": "user", "content": q3}]


def test_langchain_chatopenai_works_unchanged_streaming_included(world: World) -> None:
    user = "zoë@example.org"
    world.give_persona(user)
    llm = ChatOpenAI(
        model="gpt-4o-mini", base_url=world.srv.base_url, api_key=KEY,  # type: ignore[arg-type]
        default_headers={"X-Synth-User": quote(user, safe="")}, max_retries=0,
    )
    q = QUESTION + " (langchain)"
    answer = llm.invoke(q)
    assert has_bullets(str(answer.content))
    assert BULLETS in world.brain.chats_for(q)[-1][0]["content"]
    q2 = QUESTION + " (langchain stream)"
    parts = [str(c.content) for c in llm.stream(q2)]
    assert len(parts) > 2 and has_bullets("".join(parts))
    assert BULLETS in world.brain.chats_for(q2)[-1][0]["content"]


def test_models_passthrough(world: World) -> None:
    models = client(world).models.list()
    assert [m.id for m in models.data] == ["sim"]


# ------------------------------------------------------------------ votes → background synthesis → persona


def test_votes_trigger_background_synthesis_and_persona_endpoints(world: World) -> None:
    pop = Population(1, seed=3)
    user = "émile.z/ops@exämple.org"
    votes = [{**vote_to_json(v), "user_id": user} for v in pop.votes(pop.user_ids[0], 6)]
    r = httpx.post(f"{world.srv.base_url}/votes", json={"votes": votes}, headers=world.h())
    assert r.status_code == 200, r.text
    assert r.json()["added"] == 6 and r.json()["users"] == [user]
    again = httpx.post(f"{world.srv.base_url}/votes", json=votes[0], headers=world.h())
    assert again.json() == {"object": "vote.batch", "added": 0, "duplicates": 1, "users": [user]}

    assert world.state.scheduler is not None
    world.srv.call(world.state.scheduler.wait_idle())
    seg = quote(user, safe="")
    persona = httpx.get(f"{world.srv.base_url}/users/{seg}/persona", headers=world.h())
    assert persona.status_code == 200, persona.text
    profile = persona.json()
    assert profile["user_id"] == user and profile["version"] == 1 and len(profile["vote_ids"]) == 6
    history = httpx.get(f"{world.srv.base_url}/users/{seg}/persona/history", headers=world.h()).json()
    assert [h["version"] for h in history["data"]] == [1]

    system = httpx.get(f"{world.srv.base_url}/users/{seg}/prompt", headers=world.h())
    assert system.headers["content-type"].startswith("text/plain") and profile["persona"] in system.text
    msgs = httpx.get(f"{world.srv.base_url}/users/{seg}/prompt?format=messages", headers=world.h()).json()
    assert msgs[0]["role"] == "system" and profile["persona"] in msgs[0]["content"]
    full = httpx.get(f"{world.srv.base_url}/users/{seg}/prompt", params={"format": "json"}, headers=world.h()).json()
    assert full["version"] == 1 and full["user_id"] == user
    bad = httpx.get(f"{world.srv.base_url}/users/{seg}/prompt?format=yaml", headers=world.h())
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "format"

    # the scheduler's listener refreshed the persona cache: the next chat uses the new persona
    q = QUESTION + " (after synthesis)"
    raw = client(world).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", user=user, messages=[{"role": "user", "content": q}]
    )
    # injected where the per-user guard serves it (6 coin-like votes rarely prove a gain: then nothing is)
    if profile["meta"]["served"] in ("persona_demos", "persona"):
        assert raw.headers["x-synth-persona-version"] == "1"
        assert profile["persona"] in world.brain.chats_for(q)[-1][0]["content"]
    else:
        assert raw.headers["x-synth-persona-version"] == "0"
        assert all(profile["persona"] not in m["content"] for m in world.brain.chats_for(q)[-1])

    # forgetting the user also drops the synthesis checkpoints (they hold the votes' text)
    thread = {"configurable": {"thread_id": synthesis_thread_id("acme", user, "v1"), "checkpoint_ns": ""}}
    cp = world.state.checkpointer
    assert world.srv.call(cp.aget_tuple(thread)) is not None
    assert httpx.delete(f"{world.srv.base_url}/users/{seg}", headers=world.h()).json()["deleted"]["votes"] == 6
    assert world.srv.call(cp.aget_tuple(thread)) is None


def test_ab_pair_then_vote_once(world: World) -> None:
    user = "ab-user@example.com"
    url = world.srv.base_url
    r = httpx.post(f"{url}/ab", json={"user": user, "messages": [{"role": "user", "content": QUESTION}]},
                   headers=world.h())
    assert r.status_code == 200, r.text
    pair = r.json()
    assert pair["token"] and pair["a"] != pair["b"] and pair["personalized"] is None
    other = httpx.post(f"{url}/ab/{pair['token']}/vote", json={"user": "someone-else", "choice": "a"},
                       headers=world.h())
    assert other.status_code == 404  # a token works only for its own user
    ok = httpx.post(f"{url}/ab/{pair['token']}/vote", json={"user": user, "choice": "B"}, headers=world.h())
    assert ok.status_code == 200 and ok.json()["ok"] and ok.json()["choice"] == "b"
    again = httpx.post(f"{url}/ab/{pair['token']}/vote", json={"user": user, "choice": "a"}, headers=world.h())
    assert again.status_code == 409 and again.json()["error"]["code"] == "vote_token_used"  # a replay
    assert world.srv.call(world.state.memories("acme").count_votes(user)) == 1  # type: ignore[misc]

    world.give_persona(user)  # with a persona: one candidate with it, one without, in random order
    pair = httpx.post(f"{url}/ab", json={"messages": [{"role": "user", "content": QUESTION}]},
                      headers=world.h(**{"X-Synth-User": user})).json()
    assert pair["personalized"] in ("a", "b") and pair["persona_version"] == 1
    receipt = httpx.post(f"{url}/ab/{pair['token']}/vote", json={"choice": pair["personalized"]},
                         headers=world.h(**{"X-Synth-User": user})).json()
    assert receipt["chose_personalized"] is True


def test_rerank_and_judge(world: World) -> None:
    user = "ranker@example.com"
    world.give_persona(user)
    url = world.srv.base_url
    msgs = [{"role": "user", "content": QUESTION}]
    given = ["Just read a book.", "- Install Python\n- Do a tutorial\n- Build a small project", "Try stuff."]
    r = httpx.post(f"{url}/rerank", json={"user": user, "messages": msgs, "candidates": given,
                                          "strategy": "round_robin"}, headers=world.h(), timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["personalized_judge"] and len(out["scores"]) == 3 and sorted(out["order"]) == [0, 1, 2]
    assert out["best"] == given[out["winner"]]
    gen = httpx.post(f"{url}/rerank", json={"user": user, "messages": msgs, "n": 3}, headers=world.h(), timeout=60)
    assert gen.status_code == 200, gen.text
    assert len(gen.json()["candidates"]) == 3 and len(set(gen.json()["candidates"])) == 3

    j = httpx.post(f"{url}/judge", json={"user": user, "messages": msgs, "a": given[0], "b": given[1]},
                   headers=world.h(), timeout=60)
    assert j.status_code == 200, j.text
    verdict = j.json()
    assert verdict["preferred"] in ("A", "B", "tie") and 0 <= verdict["confidence"] <= 1 and verdict["personalized"]
    assert len(verdict["orders"]) == 2


@pytest.mark.parametrize("user", ["a.b/c@d.example", "zoë ünïcode 用户", "100%/../x", "x/persona", "..."])
def test_opaque_user_ids_in_paths(world: World, user: str) -> None:
    world.give_persona(user, "The user prefers short answers.")
    seg = quote(user, safe="")
    r = httpx.get(f"{world.srv.base_url}/users/{seg}/persona", headers=world.h())
    assert r.status_code == 200 and r.json()["user_id"] == user
    assert httpx.get(f"{world.srv.base_url}/users/{seg}/prompt", headers=world.h()).status_code == 200
    d = httpx.delete(f"{world.srv.base_url}/users/{seg}", headers=world.h())
    assert d.status_code == 200 and d.json()["deleted"]["personas"] == 1
    assert httpx.get(f"{world.srv.base_url}/users/{seg}/persona", headers=world.h()).status_code == 404


def test_forget_user_removes_everything_and_stops_injection(world: World) -> None:
    user = "forget.me@example.com"
    world.give_persona(user)
    pop = Population(1, seed=5)
    votes = [{**vote_to_json(v), "user_id": user} for v in pop.votes(pop.user_ids[0], 2)]
    assert httpx.post(f"{world.srv.base_url}/votes", json=votes, headers=world.h()).json()["added"] == 2
    q = QUESTION + " (before forget)"
    client(world).chat.completions.create(model="gpt-4o-mini", user=user, messages=[{"role": "user", "content": q}])
    d = httpx.delete(f"{world.srv.base_url}/users/{quote(user, safe='')}", headers=world.h())
    assert d.status_code == 200
    assert d.json()["deleted"]["votes"] == 2 and d.json()["deleted"]["personas"] == 1
    raw = client(world).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", user=user, messages=[{"role": "user", "content": q + "!"}]
    )
    assert raw.headers["x-synth-persona-version"] == "0"  # the cached persona went with it
    assert world.srv.call(world.state.memories("acme").count_votes(user)) == 0  # type: ignore[misc]


def test_forget_empties_the_llm_answer_cache(world: World) -> None:
    """Cached prompts quote users' votes and cannot be picked out by user: a forget drops them all."""
    cache = world.state.llm.cache  # type: ignore[union-attr]
    assert isinstance(cache, MemoryCache)
    world.srv.call(cache.set("prompt-quoting-forget.cache@example.com", {"text": "their vote text"}))
    assert len(cache) >= 1
    d = httpx.delete(f"{world.srv.base_url}/users/{quote('forget.cache@example.com', safe='')}", headers=world.h())
    assert d.status_code == 200
    assert len(cache) == 0 and cache.nbytes == 0


def test_health_metrics_and_docs(world: World) -> None:
    base = world.srv.url
    health = httpx.get(f"{base}/healthz").json()
    assert health["status"] == "ok" and health["auth"] is True and health["synthesis"] == "inline"
    text = httpx.get(f"{base}/metrics").text
    for name in (
        'synth_proxy_requests_total{method="POST",route="/v1/chat/completions",status="200"}',
        "synth_proxy_request_seconds_bucket",
        "synth_proxy_persona_injections_total",
        "synth_proxy_synthesis_runs_started_total",
        "synth_proxy_synthesis_in_flight",
        "synth_proxy_llm_requests_total",
        "synth_proxy_llm_prompt_tokens_total",
    ):
        assert name in text, name
    assert "@" not in text  # no user ids in metrics
    assert httpx.get(f"{base}/docs").status_code == 200
    paths = httpx.get(f"{base}/openapi.json").json()["paths"]
    for p in ("/v1/chat/completions", "/v1/votes", "/v1/ab", "/v1/rerank", "/v1/judge", "/v1/users/{user}/persona"):
        assert p in paths, p
