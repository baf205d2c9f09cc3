"""LLMClient against the simulated endpoint: retries, limits, caching, structured output, logprobs.

Every client-layer test runs on both transports (the lean aiohttp wire client and ChatOpenAI),
so the lean backend is held to exactly the behaviour of the LangChain one.
"""

from __future__ import annotations

import asyncio
import doctest
import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

import synth_agent.llm.errors
from synth_agent.config import Settings
from synth_agent.llm import ChatBackend, Completion
from synth_agent.llm.cache import MemoryCache, SqliteCache, cache_key
from synth_agent.llm.client import EndpointConfig, LLMClient, LLMError, parse_structured
from synth_agent.llm.errors import (
    ContextOverflowError,
    InvalidRequestError,
    LLMTimeoutError,
    RateLimitedError,
    RejectedError,
    UnavailableError,
    UnparseableResponseError,
    error_for_status,
)
from synth_agent.sim.server import SimEndpoint


@dataclass
class Reply:
    text: str
    top_logprobs: list[list[tuple[str, float]]] | None = None


def digest(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()[:10]


class HashBrain:
    """Answers are a deterministic function of the prompt, so every result can be checked."""

    def respond(self, messages, *, temperature, max_tokens, seed, json_mode, top_logprobs):
        prompt = messages[-1]["content"]
        if "garbage" in prompt:
            return Reply("I refuse to answer in JSON.")
        if top_logprobs:
            return Reply("B", [[("B", -0.2), ("A", -1.7)][:top_logprobs]])
        if json_mode:
            return Reply(json.dumps({"Digest": digest(prompt), "Length": len(prompt)}))
        return Reply(f"answer:{digest(prompt)}")


class Answer(BaseModel):
    digest: str
    length: int


def msgs(prompt: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "be terse"}, {"role": "user", "content": prompt}]


@pytest.fixture(scope="module")
def sim() -> Iterator[SimEndpoint]:
    with SimEndpoint(brain=HashBrain(), seed=11) as ep:
        yield ep


@pytest.fixture
def ep(sim: SimEndpoint) -> SimEndpoint:
    deadline = time.monotonic() + 5  # let requests abandoned by earlier tests notice the hang-up
    while sim.stats()["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.02)
    sim.configure(
        latency_ms=0,
        per_token_latency_ms=0,
        fault_rate=0,
        slow_ms=2000,
        retry_after=0.05,
        fault_kinds=["500", "429", "timeout", "malformed"],
        fail_next=[],
    )
    sim.reset_stats()
    return sim


@pytest.fixture(params=["lean", "aiohttp", "langchain"])
def transport(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def client(transport: str):
    def make(ep: SimEndpoint, **kw) -> LLMClient:
        cache = kw.pop("cache", True)
        cfg = {
            "base_url": ep.base_url,
            "model": "sim-judge",
            "timeout": 0.5,
            "max_retries": 3,
            "backoff_initial": 0.01,
            "backoff_max": 0.1,
            "transport": transport,
            **kw,
        }
        return LLMClient(EndpointConfig(**cfg), cache=cache, rng_seed=0)

    return make


def chat_requests(ep: SimEndpoint) -> int:
    return ep.stats()["by_path"].get("/v1/chat/completions", 0)


async def test_fault_storm_all_calls_complete_correctly(ep: SimEndpoint, client) -> None:
    # Injected "timeout" faults hang for slow_ms; the client timeout sits well below that but well
    # above a loaded machine's response time, so only injected hangs time out (a spurious timeout
    # of a request still queued client-side would never reach the server and skew the counts).
    ep.configure(fault_rate=0.3, slow_ms=4000)
    c = client(ep, max_retries=8, structured_retries=4, timeout=1.5)
    assert isinstance(c, ChatBackend)

    async def one(i: int) -> None:
        prompt = f"question number {i}"
        if i % 2:
            ans = await c.structured(msgs(prompt), Answer, call_site="structured")
            assert ans == Answer(digest=digest(prompt), length=len(prompt))
        else:
            comp = await c.complete(msgs(prompt), call_site="complete")
            assert comp.text == f"answer:{digest(prompt)}"
            assert 1 <= comp.attempts <= 9

    await asyncio.gather(*(one(i) for i in range(100)))
    await c.aclose()
    served = ep.stats()
    total = c.stats.total()
    assert served["faults_total"] > 0 and set(served["faults"]) <= {"500", "429", "timeout", "malformed"}
    assert total.retries > 0 and total.errors == 0
    assert total.requests == served["by_path"]["/v1/chat/completions"]
    assert all(ev.attempt <= 8 for ev in c.retry_log)  # attempt numbers never pass max_retries + 1
    per_call: dict[int, int] = {}
    for ev in c.retry_log:
        per_call[ev.call_id] = max(per_call.get(ev.call_id, 0), ev.attempt)
    assert max(per_call.values()) + 1 <= 9
    # transport retries are in the log; structured re-asks (after malformed JSON) are counted on top
    assert total.retries >= len(c.retry_log) and total.prompt_tokens > 0 and total.completion_tokens > 0


async def test_max_concurrency_bounds_in_flight(ep: SimEndpoint, client) -> None:
    ep.configure(latency_ms=40)
    c = client(ep, max_concurrency=4)
    results = await asyncio.gather(*(c.complete(msgs(f"p{i}")) for i in range(24)))
    await c.aclose()
    assert [r.text for r in results] == [f"answer:{digest(f'p{i}')}" for i in range(24)]
    assert 1 < ep.stats()["max_in_flight"] <= 4


async def test_rate_limit_is_applied() -> None:
    cfg = EndpointConfig(base_url="http://x/v1", rate_limit=2.5)
    c = LLMClient(cfg)
    res = c._resources()
    assert res.throttler is not None and res.throttler.rate_limit / res.throttler.period == pytest.approx(2.5)


async def test_temperature_zero_is_cached_and_single_flight(ep: SimEndpoint, client) -> None:
    c = client(ep)
    first = await c.complete(msgs("cache me"), call_site="judge")
    before = chat_requests(ep)
    again = await c.complete(msgs("cache me"), call_site="judge")
    assert chat_requests(ep) == before
    assert again.cached and not first.cached and again.text == first.text and again.attempts == 0
    assert c.stats.site("judge").cache_hits == 1

    ep.configure(latency_ms=150)
    same = await asyncio.gather(*(c.complete(msgs("together"), call_site="sf") for _ in range(10)))
    assert {r.text for r in same} == {f"answer:{digest('together')}"}
    assert chat_requests(ep) == before + 1
    assert c.stats.site("sf").cache_hits == 9 and c.stats.site("sf").requests == 1

    # different parameters are different keys
    await c.complete(msgs("cache me"), call_site="judge", max_tokens=7)
    assert chat_requests(ep) == before + 2
    await c.aclose()


async def test_nonzero_temperature_not_cached(ep: SimEndpoint, client) -> None:
    c = client(ep)
    for _ in range(3):
        r = await c.complete(msgs("warm"), temperature=0.7, call_site="gen")
        assert not r.cached
    assert chat_requests(ep) == 3 and c.stats.site("gen").cache_hits == 0
    no_cache = client(ep, cache=False)
    await no_cache.complete(msgs("cold"))
    await no_cache.complete(msgs("cold"))
    assert chat_requests(ep) == 5
    await c.aclose()
    await no_cache.aclose()


async def test_sqlite_cache_survives_reopening(ep: SimEndpoint, tmp_path: Path, client) -> None:
    path = tmp_path / "cache" / "llm.sqlite"
    cache = SqliteCache(path)
    c = client(ep, cache=cache)
    first = await c.complete(msgs("persist"), logprobs=2)
    await c.aclose()
    cache.close()
    assert chat_requests(ep) == 1

    reopened = SqliteCache(path)
    assert len(reopened) == 1
    c2 = client(ep, cache=reopened)
    second = await c2.complete(msgs("persist"), logprobs=2)
    assert second.cached and second.text == first.text and second.top_logprobs == first.top_logprobs
    assert chat_requests(ep) == 1 and c2.stats.total().cache_hits == 1
    await c2.aclose()
    reopened.close()


async def test_retry_after_is_honoured_and_capped(ep: SimEndpoint, client) -> None:
    c = client(ep, backoff_initial=0.001, backoff_max=8.0)
    ep.configure(retry_after=0.3, fail_next=["429"])
    r = await c.complete(msgs("patience"), call_site="ra")
    assert r.text == f"answer:{digest('patience')}" and r.attempts == 2
    (ev,) = c.retry_log
    assert ev.retry_after == pytest.approx(0.3) and ev.wait == pytest.approx(0.3)
    assert "429" in ev.cause and c.stats.site("ra").retries == 1 and c.stats.site("ra").requests == 2

    capped = client(ep, backoff_max=0.05)
    ep.configure(retry_after=30, fail_next=["429"])
    await capped.complete(msgs("impatient"))
    assert capped.retry_log[-1].wait == pytest.approx(0.05)
    await c.aclose()
    await capped.aclose()


async def test_retries_are_bounded_then_llm_error(ep: SimEndpoint, client) -> None:
    ep.configure(fault_rate=1.0, fault_kinds=["500"])
    c = client(ep, max_retries=2)
    with pytest.raises(LLMError, match="after 3 attempts") as info:
        await c.complete(msgs("doomed"), call_site="x")
    assert ep.base_url in str(info.value) and "HTTP 500" in str(info.value)
    err = info.value
    assert isinstance(err, UnavailableError) and not isinstance(err, LLMTimeoutError)
    assert (err.status, err.attempts, err.call_site) == (500, 3, "x")
    s = c.stats.site("x")
    assert (s.requests, s.retries, s.errors, s.cache_hits) == (3, 2, 1, 0)
    assert ep.stats()["faults"] == {"500": 3}
    # a failure is never cached: once the endpoint heals, the same call goes through
    ep.configure(fault_rate=0)
    assert (await c.complete(msgs("doomed"), call_site="x")).text == f"answer:{digest('doomed')}"
    await c.aclose()


async def test_timeouts_are_retried(ep: SimEndpoint, client) -> None:
    ep.configure(fail_next=["timeout"], slow_ms=2000)
    c = client(ep, timeout=0.3)
    r = await c.complete(msgs("slowly"))
    assert r.attempts == 2 and "Timeout" in c.retry_log[0].cause
    await c.aclose()


async def test_exhausted_retries_keep_their_type(ep: SimEndpoint, client) -> None:
    c = client(ep, max_retries=1, backoff_max=0.05)
    ep.configure(retry_after=0.02, fail_next=["429", "429"])
    with pytest.raises(RateLimitedError) as info:
        await c.complete(msgs("slow down"), call_site="rl")
    assert info.value.retry_after == pytest.approx(0.02) and info.value.status == 429
    ep.configure(fail_next=["timeout", "timeout"], slow_ms=2000)
    with pytest.raises(LLMTimeoutError) as timed_out:
        await c.complete(msgs("hang"), call_site="to", max_tokens=3)
    assert isinstance(timed_out.value, UnavailableError) and "Timeout" in repr(timed_out.value.cause)
    assert c.stats.site("to").requests == 2
    await c.aclose()


async def test_non_retryable_400_is_not_retried(ep: SimEndpoint, client) -> None:
    c = client(ep)
    with pytest.raises(LLMError, match="not retried") as info:
        await c.complete(msgs("bad"), extra={"n": 2}, call_site="bad")
    assert "400" in str(info.value)
    assert isinstance(info.value, InvalidRequestError) and info.value.status == 400
    s = c.stats.site("bad")
    assert (s.requests, s.retries, s.errors) == (1, 0, 1)
    assert chat_requests(ep) == 1
    with pytest.raises(ValueError, match="unsupported role"):
        await c.complete([{"role": "wizard", "content": "x"}])
    await c.aclose()


async def test_logprobs_returned(ep: SimEndpoint, client) -> None:
    c = client(ep)
    r = await c.complete(msgs("A or B?"), logprobs=2, max_tokens=1)
    assert r.text == "B"
    assert r.top_logprobs is not None and len(r.top_logprobs) == 1
    assert [(t.token, t.logprob) for t in r.top_logprobs[0]] == [("B", -0.2), ("A", -1.7)]
    plain = await c.complete(msgs("A or B?"))
    assert plain.top_logprobs is None
    await c.aclose()


async def test_structured_reasks_on_malformed_and_caches_only_good_answers(ep: SimEndpoint, client) -> None:
    c = client(ep)
    ep.configure(fail_next=["malformed"])
    ans = await c.structured(msgs("fix me"), Answer, call_site="s")
    assert ans == Answer(digest=digest("fix me"), length=len("fix me"))
    assert c.stats.site("s").retries == 1 and chat_requests(ep) == 2
    again = await c.structured(msgs("fix me"), Answer, call_site="s")
    assert again == ans and chat_requests(ep) == 2 and c.stats.site("s").cache_hits == 1

    with pytest.raises(UnparseableResponseError, match="Answer"):
        await c.structured(msgs("garbage please"), Answer, call_site="g")
    g = c.stats.site("g")
    assert g.requests == 3 and g.retries == 2 and g.errors == 1 and g.cache_hits == 0
    await c.aclose()


def test_tolerant_parser() -> None:
    want = Answer(digest="d", length=3)
    assert parse_structured('{"digest": "d", "length": 3}', Answer) == want
    assert parse_structured('Sure!\n```json\n{"DIGEST": "d", "Length": 3}\n```\nDone.', Answer) == want
    assert parse_structured('I think {"note": 1} then {"digest": "d", "length": 3} ok', Answer) == want
    with pytest.raises(ValueError, match="Answer"):
        parse_structured('{"digest": "d", "length"', Answer)


def test_cache_key_and_memory_cache() -> None:
    base = {
        "model": "m",
        "base_url": "u/",
        "messages": [{"role": "user", "content": "x"}],
        "temperature": 0,
        "max_tokens": None,
        "json_mode": False,
        "logprobs": None,
        "seed": None,
        "extra": None,
    }
    assert cache_key(**base) == cache_key(**{**base, "base_url": "u"})
    assert cache_key(**base) != cache_key(**{**base, "seed": 1})
    assert cache_key(**base) != cache_key(**{**base, "extra": {"stop": ["\n"]}})
    mem = MemoryCache(max_entries=2)

    async def fill() -> None:
        for k in "abc":
            await mem.set(k, {"text": k})
        assert await mem.get("a") is None and (await mem.get("c")) == {"text": "c"}

    asyncio.run(fill())
    assert len(mem) == 2


async def test_clients_are_independent(ep: SimEndpoint, client) -> None:
    a, b = client(ep, model="judge-a"), client(ep, model="judge-b")
    ra, rb = await asyncio.gather(a.complete(msgs("same")), b.complete(msgs("same")))
    assert isinstance(ra, Completion) and ra.model == "judge-a" and rb.model == "judge-b"
    assert a.stats.total().requests == 1 and b.stats.total().requests == 1 and chat_requests(ep) == 2
    await a.aclose()
    await b.aclose()


def test_endpoint_config_from_settings() -> None:
    s = Settings(
        base_url="http://h:1/v1",
        api_key="k",
        model="m",
        max_concurrency=3,
        rate_limit=2,
        request_timeout=9,
        max_retries=1,
    )
    cfg = EndpointConfig.from_settings(s, backoff_max=1.0)
    assert (
        cfg.base_url,
        cfg.api_key,
        cfg.model,
        cfg.max_concurrency,
        cfg.rate_limit,
        cfg.timeout,
        cfg.max_retries,
        cfg.backoff_max,
    ) == ("http://h:1/v1", "k", "m", 3, 2.0, 9.0, 1, 1.0)
    assert LLMClient.from_settings(s).model == "m"


def test_client_usable_from_successive_event_loops(sim: SimEndpoint, client) -> None:
    """Sync wrappers call asyncio.run repeatedly; loop-bound resources are rebuilt per loop."""
    c = client(sim)

    async def ask(prompt: str) -> str:
        try:
            return (await c.complete(msgs(prompt))).text
        finally:
            await c.aclose()

    assert asyncio.run(ask("loop one")) == f"answer:{digest('loop one')}"
    assert asyncio.run(ask("loop two")) == f"answer:{digest('loop two')}"


# ---------------------------------------------------------------- typed errors, wire format, server facts



def test_errors_module_examples_run() -> None:
    result = doctest.testmod(synth_agent.llm.errors)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize(
    ("status", "message", "code", "kind", "limit"),
    [
        (400, "This model's maximum context length is 4096 tokens. However, you requested 4842 tokens "
              "(4442 in the messages, 400 in the completion).", None, ContextOverflowError, 4096),  # vLLM / OpenAI
        (400, "whatever", "context_length_exceeded", ContextOverflowError, None),  # OpenAI error code
        (400, "the request exceeds the available context size, try increasing it", "exceed_context_size_error",
         ContextOverflowError, None),  # llama.cpp server
        (400, "Requested tokens (5000) exceed context window of 4096", None, ContextOverflowError, 4096),  # llama-cpp-python
        (400, "The input (5000 tokens) is longer than the model's context length (4096 tokens).", None,
         ContextOverflowError, 4096),  # SGLang
        (400, "top_logprobs must be at most 20", None, InvalidRequestError, None),
        (422, "unprocessable", None, InvalidRequestError, None),
        (401, "bad key", None, RejectedError, None),
        (404, "model not found", None, RejectedError, None),
        (429, "slow down", None, RateLimitedError, None),
        (408, "request timeout", None, LLMTimeoutError, None),
        (503, "overloaded", None, UnavailableError, None),
    ],
)
def test_error_classification(status, message, code, kind, limit) -> None:
    err = error_for_status(status, message, code=code, headers={"retry-after": "2"})
    assert type(err) is kind and err.status == status
    assert err.retryable == (status in (408, 429, 503))
    if kind is ContextOverflowError:
        assert err.context_length == limit and isinstance(err, InvalidRequestError)
    assert err.retry_after == 2.0


class Capture:
    """A tiny OpenAI-compatible server that records request bodies and answers as told."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.headers: list[dict[str, str]] = []
        self.reply: tuple[int, dict] = (200, {})
        app = FastAPI()

        @app.get("/healthz")
        async def health() -> dict:
            return {"ok": True}

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> JSONResponse:
            self.bodies.append(await request.json())
            self.headers.append(dict(request.headers))
            status, body = self.reply
            return JSONResponse(body, status_code=status)

        self.app = app


def completion_body(text: str) -> dict:
    return {"id": "x", "object": "chat.completion", "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}  # fmt: skip


@pytest.fixture(scope="module")
def capture() -> Iterator[tuple[Capture, str]]:
    from synth_agent.serving import ThreadedServer

    cap = Capture()
    with ThreadedServer(cap.app, lifespan="off", name="capture") as srv:
        yield cap, f"{srv.url}/v1"


@pytest.mark.parametrize(("details", "cached"), [({"cached_tokens": 3}, 3), (None, 0), ("absent", 0)])
async def test_cached_prompt_tokens_the_server_reports_are_counted_per_call_site(
    capture, transport: str, details: object, cached: int
) -> None:
    """usage.prompt_tokens_details.cached_tokens (OpenAI, vLLM, SGLang) lands next to prompt_tokens; absent or null: 0."""
    cap, url = capture
    body = completion_body("hi")
    if details != "absent":
        body["usage"]["prompt_tokens_details"] = details
    cap.reply = (200, body)
    cfg = EndpointConfig(base_url=url, model="m", transport=transport, probe_server=False)
    async with LLMClient(cfg, cache=False) as c:
        first = await c.complete(msgs("q"), call_site="judge")
        await c.complete(msgs("another q"), call_site="judge")
        await c.complete(msgs("q"), call_site="persona")
    assert first.cached_prompt_tokens == cached
    assert c.stats.site("judge").prompt_tokens == 10 and c.stats.site("judge").cached_prompt_tokens == 2 * cached
    assert c.stats.as_dict()["total"]["cached_prompt_tokens"] == 3 * cached


async def test_every_request_carries_the_api_key_and_json_content_type(capture, transport: str) -> None:
    """The lean transport sets these once, as its session's defaults: each request still sends them."""
    cap, url = capture
    cap.reply = (200, completion_body("hi"))
    cfg = EndpointConfig(base_url=url, model="m", api_key="sk-test-7", transport=transport, probe_server=False)
    async with LLMClient(cfg, cache=False) as c:
        cap.headers.clear()
        await c.complete(msgs("q"))
        await c.complete(msgs("another q"))
    assert len(cap.headers) == 2
    for h in cap.headers:
        assert h["authorization"] == "Bearer sk-test-7" and h["content-type"].startswith("application/json")


async def test_wire_format_json_schema_and_typed_failures(capture, transport: str) -> None:
    cap, url = capture
    cfg = EndpointConfig(base_url=url, model="m", transport=transport, structured_output="json_schema",
                         max_retries=2, backoff_initial=0.001, backoff_max=0.01, probe_server=False)  # fmt: skip
    async with LLMClient(cfg, cache=False) as c:
        cap.bodies.clear()
        cap.reply = (200, completion_body('{"digest": "d", "length": 3}'))
        assert await c.structured(msgs("q"), Answer) == Answer(digest="d", length=3)
        body = cap.bodies[-1]
        assert body["response_format"]["type"] == "json_schema"
        assert body["response_format"]["json_schema"]["schema"]["required"] == ["digest", "length"]
        assert body["messages"] == msgs("q") and body["model"] == "m" and body["temperature"] == 0

        cap.reply = (400, {"error": {"message": "This model's maximum context length is 4096 tokens. However, "
                                                "you requested 4842 tokens.", "type": "BadRequestError"}})  # fmt: skip
        before = len(cap.bodies)
        with pytest.raises(ContextOverflowError) as overflow:
            await c.complete(msgs("long"), call_site="persona")
        assert overflow.value.context_length == 4096 and overflow.value.call_site == "persona"
        assert len(cap.bodies) == before + 1  # not retried

        cap.reply = (200, {"unexpected": True})  # an answer, but not a chat completion
        with pytest.raises(UnparseableResponseError, match="OpenAI-compatible"):
            await c.complete(msgs("odd"))
        assert len(cap.bodies) == before + 2  # not retried either

        cap.reply = (200, completion_body("ok"))
        await c.complete([{"role": "model", "content": "hi"}, {"role": "human", "content": "x"}])
        assert [m["role"] for m in cap.bodies[-1]["messages"]] == ["assistant", "user"]


async def test_server_stated_capacity_and_context_length() -> None:
    with SimEndpoint(slots=2, context_length=8192) as ep:
        async with LLMClient(EndpointConfig(base_url=ep.base_url, max_concurrency=16)) as c:
            assert c.context_length is None and c.concurrency == 16  # nothing asked yet
            await c.complete(msgs("probe me"))
            assert c.server_info is not None and c.server_info.capacity == 2 and c.server_info.source == "/props"
            assert c.context_length == 8192
            await asyncio.gather(*(c.complete(msgs(f"p{i}")) for i in range(10)))
            assert c.concurrency <= 2 and ep.stats()["max_in_flight"] <= 2
    configured = LLMClient(EndpointConfig(base_url="http://x/v1", context_length=2048))
    assert configured.context_length == 2048


def test_json_answer_check_fast_path_agrees_with_the_scan() -> None:
    """_looks_like_json reads a whole-object answer with orjson first; it must say what the scan says."""
    import random

    from synth_agent.llm.client import _json_objects, _looks_like_json

    cases = ['{"a":1}', ' {"preferred": "A"} ', '{"a": NaN}', "{", "", 'x {"a":1} y', "[1]", '{"a":1} {"b":2}',
             '{"a": 1e999}', '{"a": 123456789012345678901234567890}', "{} "]  # fmt: skip
    rnd = random.Random(0)
    cases += ["".join(rnd.choice('{}[]":,a1 \\nNtrue') for _ in range(rnd.randint(0, 12))) for _ in range(20_000)]
    for text in cases:
        assert _looks_like_json(text) == bool(_json_objects(text)), text
