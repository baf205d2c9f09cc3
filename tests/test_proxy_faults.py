"""Upstream faults: retried, then a clean 502/504 in OpenAI format; never a hang, never a lost vote."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from langgraph.store.memory import InMemoryStore

from graphs.chat import pending_namespace
from synth_agent.config import Settings
from synth_agent.llm.client import EndpointConfig, LLMClient
from synth_agent.proxy import ProxyServer, ProxySettings, ProxyState, create_app
from synth_agent.sim.population import Population, vote_to_json
from synth_agent.sim.server import SimEndpoint

KEY = "sk-faults"
MSGS = [{"role": "user", "content": "How do I start learning Python?"}]
H = {"Authorization": f"Bearer {KEY}"}


@dataclass
class World:
    sim: SimEndpoint
    srv: ProxyServer
    state: ProxyState


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    # slow_ms > upstream_timeout: a simulated "timeout" fault really times the proxy out
    with SimEndpoint(fault_rate=0.3, seed=1, slow_ms=400, retry_after=0.01) as sim:
        llm = LLMClient(EndpointConfig(base_url=sim.base_url, max_retries=2, timeout=0.25, backoff_max=0.05))
        app = create_app(
            Settings(base_url=sim.base_url, home=tmp_path_factory.mktemp("home")),
            ProxySettings(api_keys=f"acme:{KEY}", synthesis="off", upstream_timeout=0.25, upstream_retries=4,
                          upstream_backoff=0.01, upstream_backoff_max=0.05, key_rate_limit=0),
            store=InMemoryStore(),
            llm=llm,
        )
        with ProxyServer(app, close=[llm]) as srv:
            yield World(sim, srv, app.state.proxy)


def is_openai_error(r: httpx.Response) -> bool:
    err = r.json().get("error")
    return isinstance(err, dict) and set(err) == {"message", "type", "param", "code"}


async def _chat(client: httpx.AsyncClient, stream: bool) -> tuple[int, str]:
    body = {"model": "sim", "messages": MSGS, "user": "u@example.com", "stream": stream}
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        text = (await r.aread()).decode()
        return r.status_code, text


async def _vote(client: httpx.AsyncClient, v: dict[str, Any]) -> int:
    return (await client.post("/v1/votes", json=v)).status_code


def test_faults_are_retried_and_votes_survive(world: World) -> None:
    world.sim.configure(fault_rate=0.3)
    pop = Population(1, seed=2)
    votes = [{**vote_to_json(v), "user_id": "voter@example.com"} for v in pop.votes(pop.user_ids[0], 20)]

    async def go() -> tuple[list[tuple[int, str]], list[int]]:
        async with httpx.AsyncClient(base_url=world.srv.url, headers=H, timeout=30) as c:
            chats = asyncio.gather(*(_chat(c, stream=i % 3 == 0) for i in range(36)))
            stored = asyncio.gather(*(_vote(c, v) for v in votes))
            return await chats, await stored

    chats, stored = asyncio.run(go())
    assert stored == [200] * 20
    assert world.srv.call(world.state.memories("acme").count_votes("voter@example.com")) == 20  # type: ignore[misc]
    ok = [t for s, t in chats if s == 200]
    failed = [(s, t) for s, t in chats if s != 200]
    assert len(ok) >= 30  # 30% faults, 5 attempts each: nearly every request gets through
    for s, t in failed:
        assert s in (502, 504) and '"error"' in t, (s, t)
    for t in ok:
        assert '"content"' in t
    faults = world.sim.stats()["faults_total"]
    metrics = httpx.get(f"{world.srv.url}/metrics").text
    retries = next(float(line.split()[-1]) for line in metrics.splitlines()
                   if line.startswith("synth_proxy_upstream_retries_total"))
    assert faults > 0 and retries > 0
    assert "synth_proxy_upstream_errors_total" in metrics


@pytest.mark.parametrize(("kind", "status", "code"), [("500", 502, "upstream_unavailable"),
                                                      ("429", 502, "upstream_unavailable"),
                                                      ("timeout", 504, "upstream_timeout")])
def test_persistent_faults_end_in_clean_openai_errors(world: World, kind: str, status: int, code: str) -> None:
    world.sim.configure(fault_rate=1.0, fault_kinds=[kind])
    try:
        for stream in (False, True):
            r = httpx.post(f"{world.srv.base_url}/chat/completions", headers=H, timeout=30,
                           json={"model": "sim", "messages": MSGS, "stream": stream})
            assert r.status_code == status and is_openai_error(r) and r.json()["error"]["code"] == code, r.text
            assert r.json()["error"]["type"] == "upstream_error"
        # the official SDK sees its ordinary exception types
        sdk = openai.OpenAI(base_url=world.srv.base_url, api_key=KEY, max_retries=0, timeout=30)
        with pytest.raises(openai.APIStatusError) as exc:
            sdk.chat.completions.create(model="sim", messages=MSGS)  # type: ignore[arg-type]
        assert exc.value.status_code == status and exc.value.code == code
        # an A/B pair that could not be generated leaves no pending pair behind
        r = httpx.post(f"{world.srv.base_url}/ab", headers=H, timeout=30, json={"user": "ab@x.org", "messages": MSGS,
                                                                                 "model": "sim"})
        assert r.status_code == status and is_openai_error(r)
        pending = world.srv.call(world.state.store.asearch(pending_namespace("acme", "ab@x.org")))  # type: ignore[union-attr]
        assert pending == []
        # the judge's LLM fails too: a clean 502/504, not a 500 or a hang
        r = httpx.post(f"{world.srv.base_url}/judge", headers=H, timeout=60,
                       json={"user": "j@x.org", "messages": MSGS, "a": "- one\n- two", "b": "one, two"})
        assert r.status_code in (502, 504) and is_openai_error(r), r.text
        # votes do not depend on the upstream at all
        v = {**vote_to_json(Population(1, seed=9).votes(Population(1, seed=9).user_ids[0], 1)[0]),
             "user_id": f"v-{kind}@x.org"}
        assert httpx.post(f"{world.srv.base_url}/votes", headers=H, json=v).json()["added"] == 1
    finally:
        world.sim.configure(fault_rate=0.0, fault_kinds=["500", "429", "timeout", "malformed"])


def test_upstream_down_is_a_502(tmp_path: Path) -> None:
    llm = LLMClient(EndpointConfig(base_url="http://127.0.0.1:9/v1", max_retries=0))
    app = create_app(
        Settings(base_url="http://127.0.0.1:9/v1", home=tmp_path),
        ProxySettings(api_keys=f"acme:{KEY}", synthesis="off", upstream_retries=1, upstream_backoff=0.0),
        store=InMemoryStore(), llm=llm,
    )
    with ProxyServer(app, close=[llm]) as srv:
        r = httpx.post(f"{srv.base_url}/chat/completions", headers=H, json={"model": "m", "messages": MSGS})
        assert r.status_code == 502 and "connection" in r.json()["error"]["message"]
        assert httpx.get(f"{srv.base_url}/models", headers=H).status_code == 502
