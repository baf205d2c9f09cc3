"""The simulated OpenAI-compatible endpoint, exercised through the official openai SDK."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import openai
import pytest

from synth_agent.sim.server import SimEndpoint, create_sim_app


@dataclass
class Reply:
    text: str
    top_logprobs: list[list[tuple[str, float]]] | None = None


class EchoBrain:
    """Deterministic stand-in for SimBrain: the answer is a hash of the last message."""

    def respond(self, messages, *, temperature, max_tokens, seed, json_mode, top_logprobs):
        h = hashlib.sha256(messages[-1]["content"].encode()).hexdigest()[:8]
        if top_logprobs:
            return Reply("A", [[("A", -0.1), ("B", -2.4)][:top_logprobs]])
        if json_mode:
            return Reply(json.dumps({"answer": h, "size": len(messages[-1]["content"])}))
        return Reply(f"echo {h} and some more words to stream")


def expected(prompt: str) -> str:
    return f"echo {hashlib.sha256(prompt.encode()).hexdigest()[:8]} and some more words to stream"


@pytest.fixture(scope="module")
def sim() -> Iterator[SimEndpoint]:
    with SimEndpoint(brain=EchoBrain(), seed=7) as ep:
        yield ep


def settle(ep: SimEndpoint) -> None:
    """Wait until requests abandoned by earlier tests have noticed the hang-up and left."""
    deadline = time.monotonic() + 5
    while ep.stats()["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.02)


@pytest.fixture
def ep(sim: SimEndpoint) -> SimEndpoint:
    settle(sim)
    sim.configure(
        latency_ms=0,
        per_token_latency_ms=0,
        fault_rate=0,
        fault_kinds=["500", "429", "timeout", "malformed"],
        slow_ms=2000,
        retry_after=0.05,
        fail_next=[],
    )
    sim.reset_stats()
    return sim


def sdk(ep: SimEndpoint, **kw) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=ep.base_url, api_key="sim", max_retries=0, **kw)


USER = [{"role": "user", "content": "hello there"}]


async def test_chat_completion_non_streaming(ep: SimEndpoint) -> None:
    async with sdk(ep) as client:
        r = await client.chat.completions.create(model="judge-x", messages=USER, temperature=0, max_tokens=50)
    assert r.object == "chat.completion"
    assert r.model == "judge-x"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected("hello there")
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None and r.usage.completion_tokens == len(expected("hello there")) // 4 + 1
    assert r.usage.prompt_tokens >= 1
    s = ep.stats()
    assert s["completions"] == 1 and s["by_path"]["/v1/chat/completions"] == 1
    assert s["completion_tokens"] == r.usage.completion_tokens


async def test_chat_completion_streaming(ep: SimEndpoint) -> None:
    async with sdk(ep) as client:
        stream = await client.chat.completions.create(
            model="m", messages=USER, stream=True, stream_options={"include_usage": True}
        )
        parts, finish, usage = [], None, None
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                parts.append(choice.delta.content or "")
                finish = choice.finish_reason or finish
    assert "".join(parts) == expected("hello there")
    assert len([p for p in parts if p]) > 1
    assert finish == "stop"
    assert usage is not None and usage.completion_tokens > 0
    s = ep.stats()
    assert s["completions"] == 1 and s["in_flight"] == 0


async def test_json_mode_and_logprobs(ep: SimEndpoint) -> None:
    async with sdk(ep) as client:
        r = await client.chat.completions.create(
            model="m", messages=USER, response_format={"type": "json_object"}
        )
        assert json.loads(r.choices[0].message.content or "")["size"] == len("hello there")
        r = await client.chat.completions.create(model="m", messages=USER, logprobs=True, top_logprobs=2)
        content = r.choices[0].logprobs.content  # type: ignore[union-attr]
        assert content is not None and content[0].token == "A"
        assert [(t.token, t.logprob) for t in content[0].top_logprobs] == [("A", -0.1), ("B", -2.4)]
        stream = await client.chat.completions.create(
            model="m", messages=USER, logprobs=True, top_logprobs=2, stream=True
        )
        tokens = [
            c.choices[0].logprobs.content[0].token
            async for c in stream  # type: ignore[union-attr]
            if c.choices and c.choices[0].logprobs and c.choices[0].logprobs.content
        ]
        assert tokens == ["A"]


async def test_models_and_health(ep: SimEndpoint) -> None:
    async with sdk(ep) as client:
        models = await client.models.list()
    assert [m.id for m in models.data] == ["sim"]
    async with httpx.AsyncClient(base_url=ep.url) as http:
        assert (await http.get("/healthz")).json() == {"status": "ok"}


@pytest.mark.parametrize(
    "body",
    [
        {"model": "m"},  # no messages
        {"model": "m", "messages": []},
        {"model": "m", "messages": [{"role": "wizard", "content": "x"}]},
        {"model": "m", "messages": USER, "temperature": 5},
        {"model": "m", "messages": USER, "n": 2},
        {"messages": USER},
    ],
)
async def test_bad_bodies_get_openai_errors(ep: SimEndpoint, body: dict) -> None:
    async with httpx.AsyncClient(base_url=ep.base_url) as http:
        r = await http.post("/chat/completions", json=body)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"].startswith("Invalid request")
    assert ep.stats()["completions"] == 0


async def test_bad_request_via_sdk_and_non_json_body(ep: SimEndpoint) -> None:
    async with sdk(ep) as client:
        with pytest.raises(openai.BadRequestError, match="n"):
            await client.chat.completions.create(model="m", messages=USER, n=3)
    async with httpx.AsyncClient(base_url=ep.base_url) as http:
        r = await http.post(
            "/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
        )
    assert r.status_code == 400 and "error" in r.json()


async def test_faults_injected_at_configured_rate(ep: SimEndpoint) -> None:
    ep.configure(fault_rate=0.4, fault_kinds=["500", "429"])
    codes: list[int] = []
    async with httpx.AsyncClient(base_url=ep.base_url) as http:
        for i in range(200):
            r = await http.post(
                "/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": str(i)}]}
            )
            codes.append(r.status_code)
            if r.status_code == 429:
                assert r.headers["retry-after"] == "0.05"
                assert r.json()["error"]["type"] == "rate_limit_error"
            elif r.status_code == 500:
                assert r.json()["error"]["type"] == "server_error"
    s = ep.stats()
    assert s["faults"].get("500", 0) == codes.count(500)
    assert s["faults"].get("429", 0) == codes.count(429)
    assert s["faults_total"] == 200 - codes.count(200)
    assert 0.25 < s["faults_total"] / 200 < 0.55
    assert s["completions"] == codes.count(200)
    assert s["requests_total"] == 200


def test_faults_are_seeded() -> None:
    def draws(seed: int) -> list[str | None]:
        state = create_sim_app(brain=EchoBrain(), fault_rate=0.5, seed=seed).state.sim
        return [state.draw_fault() for _ in range(50)]

    assert draws(3) == draws(3)
    assert draws(3) != draws(4)
    assert {"500", "429", "timeout", "malformed"} <= set(draws(3))


async def test_malformed_and_timeout_faults(ep: SimEndpoint) -> None:
    ep.configure(fail_next=["malformed", "malformed", "timeout"], slow_ms=1500)
    async with sdk(ep, timeout=0.3) as client:
        r = await client.chat.completions.create(
            model="m", messages=USER, response_format={"type": "json_object"}
        )
        with pytest.raises(json.JSONDecodeError):
            json.loads(r.choices[0].message.content or "")
        with pytest.raises(openai.InternalServerError):  # malformed without JSON mode is a 500
            await client.chat.completions.create(model="m", messages=USER)
        with pytest.raises(openai.APITimeoutError):
            await client.chat.completions.create(model="m", messages=USER)
    assert ep.stats()["faults"] == {"malformed": 2, "timeout": 1}


async def test_stats_reset_admin_config_and_in_flight(ep: SimEndpoint) -> None:
    async with httpx.AsyncClient(base_url=ep.url) as http:
        r = await http.post("/admin/config", json={"latency_ms": 100})
        assert r.status_code == 200 and r.json()["latency_ms"] == 100
        assert (await http.post("/admin/config", json={"fault_rate": 3})).status_code == 400
        assert (await http.post("/admin/config", json={"bogus": 1})).status_code == 400
        async with sdk(ep) as client:
            await asyncio.gather(
                *(client.chat.completions.create(model="m", messages=USER) for _ in range(5))
            )
        s = (await http.get("/stats")).json()
        assert s["completions"] == 5 and s["max_in_flight"] == 5 and s["in_flight"] == 0
        s = (await http.post("/stats/reset")).json()
        assert s["completions"] == 0 and s["requests_total"] == 0 and s["max_in_flight"] == 0


@pytest.mark.parametrize(("env", "expected"), [(None, True), ("1", True), ("0", False), ("off", False)])
def test_serve_sim_access_log_follows_the_environment(monkeypatch: pytest.MonkeyPatch, env: str | None, expected: bool) -> None:
    """``SimProcess`` starts the simulator with ``SYNTH_AGENT_SIM_ACCESS_LOG=0`` (its output goes nowhere)."""
    import synth_agent.sim.server as server

    seen: dict[str, object] = {}
    monkeypatch.setattr(server.uvicorn, "run", lambda app, **kw: seen.update(kw, app=app))
    if env is None:
        monkeypatch.delenv(server.ACCESS_LOG_ENV, raising=False)
    else:
        monkeypatch.setenv(server.ACCESS_LOG_ENV, env)
    server.serve_sim(port=1)
    assert seen["access_log"] is expected and seen["port"] == 1
    server.serve_sim(port=1, access_log=not expected)  # an explicit argument wins
    assert seen["access_log"] is (not expected)


@pytest.mark.parametrize("content", ["plain", [{"type": "text", "text": "parts"}]], ids=["lean path", "route"])
async def test_a_client_that_hangs_up_during_the_latency_is_noticed_and_not_counted(
    ep: SimEndpoint, content: object
) -> None:
    """A request whose client gives up while the simulator waits out its latency leaves at once (499, not
    a completion) rather than holding its place in ``in_flight`` for the whole latency; a client that
    waits gets its answers, one connection after another request."""
    ep.configure(latency_ms=60_000)
    body = {"model": "sim", "messages": [{"role": "user", "content": content}]}
    async with httpx.AsyncClient(base_url=ep.base_url, timeout=0.3) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.post("/chat/completions", json=body)
    settle(ep)  # waits up to 5 s, far less than the 60 s latency
    s = ep.stats()
    assert s["in_flight"] == 0 and s["completions"] == 0
    ep.configure(latency_ms=20)
    async with httpx.AsyncClient(base_url=ep.base_url, timeout=5) as http:
        for _ in range(3):  # kept alive: the watch on one request's connection does not disturb the next
            assert (await http.post("/chat/completions", json=body)).status_code == 200
    s = ep.stats()
    assert s["completions"] == 3 and s["in_flight"] == 0


async def test_the_hang_up_check_reads_a_ready_disconnect_and_never_waits() -> None:
    """``_gone`` steps ``receive()`` once: a disconnect already there is seen; otherwise it returns at once,
    closing the suspended ``receive()`` (so it leaves no waiter behind) and starting no task."""
    from synth_agent.sim.server import _gone

    gone = asyncio.Event()
    left: list[str] = []

    async def receive() -> dict[str, str]:  # as uvicorn's: wait for an event, then the client is gone
        try:
            await gone.wait()
            return {"type": "http.disconnect"}
        finally:
            left.append("left")

    tasks = len(asyncio.all_tasks())
    assert _gone(receive) is False
    assert left == ["left"] and len(asyncio.all_tasks()) == tasks  # closed at once, nothing scheduled
    gone.set()
    assert _gone(receive) is True
    future: asyncio.Future[dict[str, str]] = asyncio.get_running_loop().create_future()
    assert _gone(lambda: future) is False  # an awaitable that is no coroutine: not stepped
