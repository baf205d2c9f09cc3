"""The simulator's OpenAI-compatible HTTP endpoint.

It plays the LLM for every prompt the project sends, so the real client stack
(ChatOpenAI, retries, throttling, caching) is exercised end to end offline. It
can also misbehave on purpose -- latency, 500s, 429s with ``Retry-After``,
answers that never arrive in time, truncated JSON -- from a seeded RNG, and it
counts what it served so tests can check concurrency bounds and cache hits.

All state lives on the app (``app.state.sim``); several endpoints can run in one
process.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import math
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import httpx
import orjson
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from synth_agent.serving import ThreadedServer, freeze_heap_after_startup
from synth_agent.sim.prefix_cache import CHARS_PER_TOKEN, DEFAULT_CAPACITY_TOKENS, PrefixCache
from synth_agent.sim.slots import SlotQueue

logger = logging.getLogger(__name__)

FaultKind = Literal["500", "429", "timeout", "malformed"]
ALL_FAULTS: tuple[FaultKind, ...] = ("500", "429", "timeout", "malformed")

__all__ = [
    "ALL_FAULTS",
    "Brain",
    "BrainReply",
    "SimEndpoint",
    "SimState",
    "create_sim_app",
    "serve_sim",
]


class BrainReply(Protocol):
    text: str
    top_logprobs: list[list[tuple[str, float]]] | None


class Brain(Protocol):
    """What plays the model: a deterministic function of the prompt (sync or async ``respond``)."""

    def respond(
        self,
        messages: list[dict[str, str]],
        *,
        temperature: float,
        max_tokens: int | None,
        seed: int | None,
        json_mode: bool,
        top_logprobs: int | None,
    ) -> Any: ...


# ------------------------------------------------------------------ request schema


class _TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str = "text"
    text: str = ""


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool", "model"]
    content: str | list[_TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text", "json_object", "json_schema"]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The Chat Completions body; unknown fields are accepted and ignored, like real servers do."""

    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    messages: list[ChatMessageIn] = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=1, ge=1, le=1, description="only n=1 is supported")


class AdminConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    latency_ms: float | None = Field(default=None, ge=0)
    per_token_latency_ms: float | None = Field(default=None, ge=0)
    fault_rate: float | None = Field(default=None, ge=0, le=1)
    fault_kinds: list[FaultKind] | None = None
    slow_ms: float | None = Field(default=None, ge=0)
    retry_after: float | None = Field(default=None, ge=0)
    fail_next: list[FaultKind] | None = None
    seed: int | None = None
    logprobs_supported: bool | None = None


# ------------------------------------------------------------------ state


@dataclass
class SimState:
    """Config knobs and counters of one simulated endpoint (mutable at runtime via /admin/config)."""

    brain: Any
    model_name: str = "sim"
    latency_ms: float = 0.0
    per_token_latency_ms: float = 0.0
    fault_rate: float = 0.0
    fault_kinds: tuple[FaultKind, ...] = ALL_FAULTS
    slow_ms: float = 2000.0
    retry_after: float = 0.05
    fail_next: list[FaultKind] = field(default_factory=list)
    """Faults forced on the next requests, in order, before random faults apply (deterministic tests)."""
    seed: int = 0
    logprobs_supported: bool = True
    """False: ignore ``logprobs`` requests like endpoints without log-probability support (body has none)."""
    rng: random.Random = field(default_factory=random.Random)
    lock: threading.Lock = field(default_factory=threading.Lock)
    requests_total: int = 0
    by_path: Counter[str] = field(default_factory=Counter)
    completions: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    in_flight: int = 0
    max_in_flight: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    slot_queue: SlotQueue | None = None
    """``slots`` mode: completions served N at a time, the rest queued in the server (like llama.cpp)."""
    prefix_cache: PrefixCache = field(default_factory=lambda: PrefixCache(0))
    """The automatic prefix cache model (:mod:`synth_agent.sim.prefix_cache`); capacity 0 = none."""
    cached_prompt_tokens: int = 0

    def __post_init__(self) -> None:
        self.rng.seed(self.seed)

    def configure(self, **changes: Any) -> dict[str, Any]:
        with self.lock:
            for k, v in changes.items():
                if v is None:
                    continue
                if k == "fault_kinds":
                    v = tuple(v)
                    if not v:
                        raise ValueError("fault_kinds must name at least one fault")
                elif k == "fail_next":
                    v = list(v)
                elif k == "seed":
                    self.rng.seed(v)
                if not hasattr(self, k) or k in {"brain", "rng", "lock"}:
                    raise ValueError(f"unknown simulator setting {k!r}")
                setattr(self, k, v)
            return self.config()

    def config(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "latency_ms": self.latency_ms,
            "per_token_latency_ms": self.per_token_latency_ms,
            "fault_rate": self.fault_rate,
            "fault_kinds": list(self.fault_kinds),
            "slow_ms": self.slow_ms,
            "retry_after": self.retry_after,
            "fail_next": list(self.fail_next),
            "seed": self.seed,
            "logprobs_supported": self.logprobs_supported,
        }

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {
                "requests_total": self.requests_total,
                "by_path": dict(self.by_path),
                "completions": self.completions,
                "faults": dict(self.faults),
                "faults_total": sum(self.faults.values()),
                "in_flight": self.in_flight,
                "max_in_flight": self.max_in_flight,
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "cached_prompt_tokens": self.cached_prompt_tokens,
                "prefix_cache": self.prefix_cache.snapshot(),
                **({"slots": self.slot_queue.snapshot()} if self.slot_queue is not None else {}),
            }

    def reset(self) -> None:
        with self.lock:
            self.requests_total = self.completions = 0
            self.by_path.clear()
            self.faults.clear()
            self.max_in_flight = self.in_flight
            self.prompt_tokens = self.completion_tokens = self.cached_prompt_tokens = 0
        if self.slot_queue is not None:
            self.slot_queue.reset()

    def draw_fault(self) -> FaultKind | None:
        with self.lock:
            if self.fail_next:
                return self.fail_next.pop(0)
            if self.fault_rate > 0 and self.rng.random() < self.fault_rate:
                return self.rng.choice(self.fault_kinds)
            return None

    def count_request(self, path: str) -> None:
        """One HTTP request to ``path`` (``/stats``' ``requests_total`` and ``by_path``)."""
        with self.lock:
            self.requests_total += 1
            self.by_path[path] += 1

    def enter(self) -> None:
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def leave(self) -> None:
        with self.lock:
            self.in_flight -= 1


# ------------------------------------------------------------------ helpers


def _tokens(text: str) -> int:
    return _tokens_of(len(text))


def _tokens_of(chars: int) -> int:
    """The simulator's token count of a text of ``chars`` characters (``CHARS_PER_TOKEN`` a token, at least 1
    unless empty): the same token the prefix cache model counts its blocks in."""
    return max(1, math.ceil(chars / CHARS_PER_TOKEN)) if chars else 0


def _error(
    status: int,
    message: str,
    *,
    type_: str,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON schema with its ``$defs`` inlined (for ``openapi_extra``, where ``#/$defs`` would not resolve)."""
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return walk(defs[ref.removeprefix("#/$defs/")])
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(schema)  # type: ignore[no-any-return]


def _json(content: Any) -> Response:
    return Response(orjson.dumps(content), media_type="application/json")


def _logprob_entry(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


def _logprobs_content(text: str, top: list[list[tuple[str, float]]] | None, k: int) -> list[dict[str, Any]]:
    """OpenAI ``logprobs.content``: the generated token (first alternative) plus its top-k alternatives."""
    if top is None:  # brain gave none: report the text in 4-char tokens, certain
        top = [[(text[i : i + 4], 0.0)] for i in range(0, len(text), 4)]
    out = []
    for alts in top:
        if not alts:
            continue
        tok, lp = alts[0]
        entry = _logprob_entry(tok, float(lp))
        entry["top_logprobs"] = [_logprob_entry(t, float(p)) for t, p in alts[:k]]
        out.append(entry)
    return out


def _malformed(text: str) -> str:
    """A truncated JSON answer with no balanced object left, so no tolerant parser can rescue it."""
    cut = text[: max(1, len(text) // 2)].replace("}", "")
    return cut if cut.strip() else '{"'


GONE_POLL_S = 0.05
"""How often a sleeping request checks whether its client hung up (a hang-up is noticed within this)."""


def _gone(receive: Callable[[], Awaitable[Any]]) -> bool:
    """Whether ``receive()`` has an ``http.disconnect`` ready now, without waiting for one.

    The coroutine is stepped once by hand: with the body read, the server either answers at once
    (``http.disconnect``: the client is gone) or suspends it on a future (nothing yet), and then it is
    closed, which takes it off that future (uvicorn's ``receive`` waits on an ``asyncio.Event``, whose
    ``wait`` removes its waiter on the way out). No task, no cancellation: see :func:`_sleep_unless_gone`.
    """
    step = receive()
    if not isinstance(step, Coroutine):  # some other awaitable: not stepped, not known to be gone
        return False
    try:
        step.send(None)
    except StopIteration as done:
        message = done.value
        return isinstance(message, dict) and message.get("type") == "http.disconnect"
    step.close()
    return False


async def _sleep_unless_gone(request: Request, seconds: float) -> bool:
    """Sleep; stop early (returning False) if the client hung up, so abandoned requests stop counting.

    Every :data:`GONE_POLL_S` and at the end, :func:`_gone` looks at the request's next ASGI message
    without waiting: the body has been read, so one that is there is ``http.disconnect`` (the client
    went). Two watches cost more: polling ``Request.is_disconnected`` every 50 ms was ~6% of the
    simulator's CPU in fit_cost's 20-user run (each poll opens and cancels an anyio cancel scope, which
    formats the task's repr); a task per request waiting on ``receive()`` next to a timer, then cancelled,
    cost 40-75 µs per request more than a bare ``asyncio.sleep`` in-process over fit_cost's 1,324
    requests (session 30: 5-9% of the simulator's CPU per request).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while (left := deadline - loop.time()) > 0:
        await asyncio.sleep(min(left, GONE_POLL_S))
        if _gone(request.receive):
            return False
    return True


# ------------------------------------------------------------------ app


class _CountRequests:
    """Pure ASGI middleware (not BaseHTTPMiddleware, which hides client disconnects from handlers)."""

    def __init__(self, app: Any, state: SimState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.state.count_request(scope["path"])
        await self.app(scope, receive, send)


_ROLES = frozenset(("system", "developer", "user", "assistant", "tool", "model"))
_FORMATS = frozenset(("text", "json_object", "json_schema"))


def _brain_messages(body: ChatRequest) -> list[dict[str, str]]:
    """The messages as the brain and the prefix cache model read them: role and text."""
    return [{"role": m.role, "content": m.text()} for m in body.messages]


def _opt_int(value: Any, lo: int, hi: int | None = None) -> bool:
    return value is None or (type(value) is int and value >= lo and (hi is None or value <= hi))


def _lean_call(raw: bytes) -> tuple[ChatRequest, list[dict[str, str]]] | None:
    """The request read with ``orjson`` and plain checks, when it is a plain one; None sends it to pydantic.

    Accepts only what :class:`ChatRequest` accepts with the same meaning: string (or null) contents,
    numbers of the exact JSON type, no streaming. Anything else -- parts lists, ``"0.5"`` for a number,
    invalid values, bad JSON -- returns None and goes through ``ChatRequest``, so every validation answer
    (400s and their messages) stays pydantic's. What it accepts is built with ``model_construct`` (no
    validation: it was just checked) holding the fields the route reads; unknown fields are dropped.
    The messages come second, as ``serve_chat`` hands them to the brain (:func:`_brain_messages`); the
    ``ChatRequest``'s own ``messages`` are left empty: a ``ChatMessageIn.model_construct`` per message was
    ~5% of the simulator's CPU in fit_cost's 20-user run (a judge prompt has ~20 messages).
    """
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if type(body) is not dict:
        return None
    get = body.get
    model, messages, temperature = get("model"), get("messages"), get("temperature")
    if type(model) is not str or not model or type(messages) is not list or not messages:
        return None
    if not (temperature is None or (type(temperature) in (int, float) and 0 <= temperature <= 2)):
        return None
    max_tokens, max_completion = get("max_tokens"), get("max_completion_tokens")
    top, seed, n, logprobs = get("top_logprobs"), get("seed"), get("n", 1), get("logprobs")
    if not (_opt_int(max_tokens, 1) and _opt_int(max_completion, 1) and _opt_int(top, 0, 20)
            and _opt_int(n, 1, 1) and (seed is None or type(seed) is int)
            and (logprobs is None or type(logprobs) is bool)):  # fmt: skip
        return None
    if get("stream") not in (None, False) or get("stream_options") is not None:
        return None  # streams are rare: the pydantic path serves them
    fmt = get("response_format")
    if fmt is not None and (type(fmt) is not dict or type(fmt.get("type")) is not str or fmt["type"] not in _FORMATS):
        return None
    out: list[dict[str, str]] = []
    for m in messages:
        if type(m) is not dict:
            return None
        role, content = m.get("role"), m.get("content")
        if type(role) is not str or role not in _ROLES or not (content is None or type(content) is str):
            return None
        # orjson's own dict when it holds just these two (ours: nothing else refers to it)
        out.append(m if content is not None and len(m) == 2 else {"role": role, "content": content or ""})
    return ChatRequest.model_construct(
        model=model,
        messages=[],
        temperature=float(temperature) if temperature is not None else None,
        max_tokens=max_tokens,
        max_completion_tokens=max_completion,
        response_format=None if fmt is None else ResponseFormat.model_construct(type=fmt["type"]),
        logprobs=logprobs,
        top_logprobs=top,
        seed=seed,
        stream=False,
        stream_options=None,
        n=n,
    ), out


class _SimApp(FastAPI):
    """The simulator's FastAPI app with a lean path for ``POST /v1/chat/completions``.

    The simulator is the server side of every benchmark, and its CPU per request counts: through
    FastAPI a completion pays for the middleware stack, routing and pydantic validation (in a py-spy
    profile of ``bench/fit_cost.py``'s 20-user run, ~55% of the simulator's busy CPU was outside the brain;
    with this path and the brain's memos its CPU per request went from 1.3-1.55 to 0.74-0.90 ms). A plain request (see
    :func:`_lean_call`) is read with ``orjson`` and answered by the same ``serve_chat`` as the
    route (``app.state.serve_chat``), counted like the counting middleware does; any other request -- including every invalid
    one -- goes through FastAPI unchanged (its body replayed), so the OpenAPI schema and every
    validation answer are the route's.
    """

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/v1/chat/completions" or scope["method"] != "POST":
            await super().__call__(scope, receive, send)
            return
        state: SimState = self.state.sim
        request = Request(scope, receive)
        try:
            raw = await request.body()
        except ClientDisconnect:  # gone while sending the body: counted, nothing to answer
            state.count_request(scope["path"])
            return
        call = _lean_call(raw)
        if call is None:
            replayed = False

            async def replay() -> Any:
                nonlocal replayed
                if replayed:
                    return await receive()
                replayed = True
                return {"type": "http.request", "body": raw, "more_body": False}

            await super().__call__(scope, replay, send)
            return
        state.count_request(scope["path"])  # as _CountRequests counts what goes through FastAPI
        response = await self.state.serve_chat(request, *call)
        await response(scope, receive, send)


def create_sim_app(
    *,
    brain: Any = None,
    latency_ms: float = 0.0,
    per_token_latency_ms: float = 0.0,
    fault_rate: float = 0.0,
    fault_kinds: Sequence[FaultKind] = ALL_FAULTS,
    seed: int = 0,
    slow_ms: float = 2000.0,
    retry_after: float = 0.05,
    model_name: str = "sim",
    logprobs_supported: bool = True,
    slots: int | None = None,
    advertise_slots: bool = True,
    context_length: int = 4096,
    prefix_cache_tokens: int = DEFAULT_CAPACITY_TOKENS,
) -> FastAPI:
    """Build the simulated endpoint. ``brain`` defaults to ``SimBrain(seed=seed)``.

    ``slots=N`` serves at most N (non-streamed) completions at once and queues the rest
    inside the server, like a llama.cpp server with N slots; with ``advertise_slots`` it
    states that capacity at ``GET /props`` (``total_slots``, ``n_ctx`` = ``context_length``)
    and ``GET /slots`` as llama.cpp does.

    ``prefix_cache_tokens``: capacity of the automatic prefix cache model
    (:mod:`synth_agent.sim.prefix_cache`): usage then reports ``prompt_tokens_details.cached_tokens``
    like vLLM and SGLang, ``/stats`` sums them (``cached_prompt_tokens``), and ``POST /reset_prefix_cache``
    empties it (vLLM's route). 0 turns it off. Answers and latency do not depend on it.
    """
    if brain is None:
        from synth_agent.sim.brain import SimBrain  # lazy: the server is usable with any brain

        brain = SimBrain(seed=seed)
    if not 0 <= fault_rate <= 1:
        raise ValueError(f"fault_rate must be within [0, 1], got {fault_rate}")
    unknown = set(fault_kinds) - set(ALL_FAULTS)
    if unknown or not fault_kinds:
        raise ValueError(f"fault_kinds must be a non-empty subset of {ALL_FAULTS}, got {tuple(fault_kinds)}")
    state = SimState(
        brain=brain,
        model_name=model_name,
        latency_ms=latency_ms,
        per_token_latency_ms=per_token_latency_ms,
        fault_rate=fault_rate,
        fault_kinds=tuple(fault_kinds),
        slow_ms=slow_ms,
        retry_after=retry_after,
        seed=seed,
        logprobs_supported=logprobs_supported,
        slot_queue=SlotQueue(slots, advertise=advertise_slots, context_length=context_length) if slots else None,
        prefix_cache=PrefixCache(prefix_cache_tokens),
    )
    app = _SimApp(title="synth-agent simulated LLM", version="1")
    app.state.sim = state

    app.add_middleware(_CountRequests, state=state)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        msg = "; ".join(
            f"{'.'.join(str(x) for x in e.get('loc', ()) if x != 'body') or 'body'}: {e.get('msg')}"
            for e in errs
        )
        return _error(
            400,
            f"Invalid request: {msg}",
            type_="invalid_request_error",
            param=loc or None,
            code="invalid_request",
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), type_="invalid_request_error")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {"id": state.model_name, "object": "model", "created": 0, "owned_by": "synth-agent-sim"}
            ],
        }

    @app.get("/props")
    async def props() -> Any:
        """llama.cpp-style server properties (only in ``slots`` mode with ``advertise_slots``)."""
        sq = state.slot_queue
        if sq is None or not sq.advertise:
            return _error(404, "Not Found", type_="not_found_error")
        return sq.props(state.model_name)

    @app.get("/slots")
    async def slot_list() -> Any:
        sq = state.slot_queue
        if sq is None or not sq.advertise:
            return _error(404, "Not Found", type_="not_found_error")
        busy = sq.snapshot()["busy"]
        return [{"id": i, "is_processing": i < busy} for i in range(sq.slots)]

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        return state.snapshot()

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache() -> Response:
        state.prefix_cache.clear()
        return Response(status_code=200)

    @app.post("/stats/reset")
    async def reset_stats() -> dict[str, Any]:
        state.reset()
        return state.snapshot()

    @app.get("/admin/config")
    async def get_config() -> dict[str, Any]:
        return state.config()

    @app.post("/admin/config")
    async def set_config(body: AdminConfig) -> Any:
        try:
            return state.configure(**body.model_dump(exclude_none=True))
        except ValueError as e:
            return _error(400, str(e), type_="invalid_request_error")

    @app.post(
        "/v1/chat/completions",
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
            "schema": _inline_refs(ChatRequest.model_json_schema())}}}},
    )
    async def chat_completions(request: Request) -> Any:
        # The body is validated here rather than by a ``body: ChatRequest`` parameter: pydantic reads
        # the raw bytes (no stdlib json.loads, no dependency solving) and the answer is serialized with
        # orjson -- the simulator is the server side of every benchmark, so its CPU per request counts.
        try:
            body = ChatRequest.model_validate_json(await request.body())
        except ValidationError as e:
            raise RequestValidationError(e.errors(include_url=False)) from None
        return await serve_chat(request, body)

    async def serve_chat(request: Request, body: ChatRequest, messages: list[dict[str, str]] | None = None) -> Any:
        """Answer one validated request (the route's, or the lean path's with its ``messages``: see :class:`_SimApp`)."""
        state.enter()
        streaming = False
        slot = False
        try:
            fault = state.draw_fault()
            if fault is not None:
                with state.lock:
                    state.faults[fault] += 1
            json_mode = body.response_format is not None and body.response_format.type != "text"
            if fault == "500" or (fault == "malformed" and not json_mode):
                return _error(
                    500,
                    "The simulated server had an error while processing your request.",
                    type_="server_error",
                    code="simulated_fault",
                )
            if fault == "429":
                return _error(
                    429,
                    "Rate limit reached (simulated). Retry after the indicated delay.",
                    type_="rate_limit_error",
                    code="rate_limit_exceeded",
                    headers={"Retry-After": f"{state.retry_after:g}"},
                )
            if fault == "timeout" and not await _sleep_unless_gone(request, state.slow_ms / 1000):
                return _error(499, "client closed request", type_="client_closed")

            if state.slot_queue is not None and not body.stream:
                slot = await state.slot_queue.take(request)
                if not slot:
                    return _error(499, "client closed request", type_="client_closed")
            if messages is None:
                messages = _brain_messages(body)
            k = (body.top_logprobs or 1) if body.logprobs else None
            try:
                reply = state.brain.respond(
                    messages,
                    temperature=body.temperature if body.temperature is not None else 1.0,
                    max_tokens=body.max_completion_tokens or body.max_tokens,
                    seed=body.seed,
                    json_mode=json_mode,
                    top_logprobs=k,
                )
                if inspect.isawaitable(reply):
                    reply = await reply
            except Exception as e:  # a brain bug should look like a server error, not kill the connection
                logger.exception("simulated brain failed")
                return _error(500, f"simulated brain failed: {e!r}", type_="server_error", code="brain_error")
            text: str = reply.text
            top = getattr(reply, "top_logprobs", None)
            if fault == "malformed":
                text, top = _malformed(text), None
            prompt_tokens = _tokens_of(sum(len(m["content"]) for m in messages))  # = _tokens of the joined text
            completion_tokens = _tokens(text)
            prefix = state.prefix_cache
            blocks = prefix.blocks(messages, body.model) if prefix.enabled else []
            cached = prefix.lookup(blocks, prompt_tokens)  # only requests finished before this one count
            with state.lock:
                state.prompt_tokens += prompt_tokens
                state.completion_tokens += completion_tokens
                state.cached_prompt_tokens += cached
            logprobs = (
                {"content": _logprobs_content(text, top, k), "refusal": None}
                if k and state.logprobs_supported
                else None
            )
            created = int(time.time())
            cid = f"chatcmpl-sim-{os.urandom(12).hex()}"  # random like uuid4().hex[:24] (5 µs here), 0.7 µs
            usage: dict[str, Any] = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            }
            if prefix.enabled:
                usage["prompt_tokens_details"] = {"cached_tokens": cached}
            if body.stream:
                streaming = True
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                return StreamingResponse(
                    _stream(state, request, cid, created, body.model, text, logprobs, usage, include_usage,
                            finished=lambda: prefix.add(blocks)),
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache"},
                )
            delay = state.latency_ms + state.per_token_latency_ms * completion_tokens
            if delay > 0 and not await _sleep_unless_gone(request, delay / 1000):
                return _error(499, "client closed request", type_="client_closed")
            with state.lock:
                state.completions += 1
            prefix.add(blocks)
            return _json({
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": body.model,
                "system_fingerprint": "sim",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text, "refusal": None},
                        "logprobs": logprobs,
                        "finish_reason": "stop",
                    }
                ],
                "usage": usage,
            })
        finally:
            if slot and state.slot_queue is not None:
                state.slot_queue.give()
            if not streaming:
                state.leave()

    app.state.serve_chat = serve_chat
    return app


async def _stream(
    state: SimState,
    request: Request,
    cid: str,
    created: int,
    model: str,
    text: str,
    logprobs: dict[str, Any] | None,
    usage: dict[str, Any],
    include_usage: bool,
    finished: Callable[[], None] | None = None,
) -> AsyncIterator[str]:
    """SSE chunks in the OpenAI format; in-flight accounting ends when the stream does."""

    def chunk(delta: dict[str, Any], finish: str | None = None, lp: Any = None) -> str:
        payload = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": "sim",
            "choices": [{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}],
        }
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    try:
        if state.latency_ms > 0:
            await asyncio.sleep(state.latency_ms / 1000)
        yield chunk({"role": "assistant", "content": ""})
        if (
            logprobs is not None
            and logprobs["content"]
            and "".join(e["token"] for e in logprobs["content"]) == text
        ):
            pieces: list[tuple[str, dict[str, Any] | None]] = [
                (e["token"], {"content": [e], "refusal": None}) for e in logprobs["content"]]
        else:
            pieces = [(text[i : i + 16], None) for i in range(0, len(text), 16)]
            if logprobs is not None and pieces:  # tokens do not line up with text: attach them all once
                pieces[0] = (pieces[0][0], logprobs)
        per_piece = state.per_token_latency_ms * usage["completion_tokens"] / max(1, len(pieces)) / 1000
        for piece, lp in pieces:
            if per_piece > 0:
                await asyncio.sleep(per_piece)
            if await request.is_disconnected():
                return
            yield chunk({"content": piece}, lp=lp)
        yield chunk({}, finish="stop")
        if include_usage:
            payload = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [],
                "usage": usage,
            }
            yield f"data: {json.dumps(payload)}\n\n"
        yield "data: [DONE]\n\n"
        with state.lock:
            state.completions += 1
        if finished is not None:
            finished()
    finally:
        state.leave()


# ------------------------------------------------------------------ running it


ACCESS_LOG_ENV = "SYNTH_AGENT_SIM_ACCESS_LOG"
"""``0`` turns the simulator's per-request access log off (:class:`SimProcess` does: its output goes nowhere,
and formatting a log line per request is ~5% of the simulator's CPU under benchmark load)."""


def serve_sim(
    host: str = "127.0.0.1",
    port: int = 8765,
    *,
    log_level: str = "info",
    access_log: bool | None = None,
    loop: str = "asyncio",
    **kwargs: Any,
) -> None:
    """Run the simulated endpoint in the foreground (``synth-agent sim-endpoint``); kwargs go to create_sim_app.

    ``access_log``: one line per request (default on, unless ``SYNTH_AGENT_SIM_ACCESS_LOG=0``).
    ``loop``: uvicorn's event loop. asyncio's serves 64 saturating connections fairly (p99 55-61 ms at
    ~1,850 chat answers/s on this machine); uvloop's let some wait (p99 0.4-0.7 s at the same rate).
    """
    if access_log is None:
        access_log = os.environ.get(ACCESS_LOG_ENV, "1").strip().lower() not in ("0", "false", "no", "off")
    app = freeze_heap_after_startup(create_sim_app(**kwargs))
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=access_log, loop=loop)


class SimEndpoint(ThreadedServer):
    """Run a simulated endpoint on 127.0.0.1 and a free port in a background thread.

    ``with SimEndpoint(fault_rate=0.3) as ep:`` (or ``async with``) yields an
    endpoint whose ``base_url`` ends in ``/v1``. ``stats()``, ``reset_stats()``
    and ``configure()`` act on the app directly (same process), so they work
    from sync and async code alike without blocking on HTTP.
    """

    def __init__(
        self, *, host: str = "127.0.0.1", port: int = 0, startup_timeout: float = 15.0, **kwargs: Any
    ):
        app = create_sim_app(**kwargs)
        super().__init__(app, host=host, port=port, startup_timeout=startup_timeout, lifespan="off",
                         shutdown_timeout=1.0, name="sim-endpoint")
        self.state: SimState = app.state.sim

    def stats(self) -> dict[str, Any]:
        return self.state.snapshot()

    def reset_stats(self) -> None:
        self.state.reset()

    def configure(self, **changes: Any) -> dict[str, Any]:
        """Change latency/fault settings live (same keys as ``POST /admin/config``)."""
        return self.state.configure(**AdminConfig(**changes).model_dump(exclude_none=True))


class SimProcess:
    """The simulator in its own process (``synth-agent sim-endpoint``), like a real remote endpoint.

    Benchmarks use it so the simulated server does not share the client's GIL.
    Same surface as :class:`SimEndpoint` (``base_url``, ``stats()``, ``configure()``), over HTTP.
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, startup_timeout: float = 30.0,
                 latency_ms: float = 0.0, per_token_latency_ms: float = 0.0, fault_rate: float = 0.0,
                 seed: int = 0, prefix_cache_tokens: int | None = None) -> None:
        self.host = host
        self.port = port or _free_port(host)
        self._timeout = startup_timeout
        self._args = [
            "--host", host, "--port", str(self.port), "--latency-ms", str(latency_ms),
            "--per-token-latency-ms", str(per_token_latency_ms), "--fault-rate", str(fault_rate),
            "--seed", str(seed),
            *(["--prefix-cache-tokens", str(prefix_cache_tokens)] if prefix_cache_tokens is not None else []),
        ]
        self._proc: subprocess.Popen[bytes] | None = None
        self._http: httpx.Client | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def _control(self) -> httpx.Client:
        """One HTTP client for this handle's own calls (health, stats, admin): a new ``httpx`` client per
        call builds an SSL context each time, CPU a benchmark reading ``/stats`` around its rounds would pay."""
        if self._http is None:
            self._http = httpx.Client(base_url=f"http://{self.host}:{self.port}", timeout=5)
        return self._http

    def start(self) -> SimProcess:
        """Start the child and wait until it is healthy.

        The child ends with this process however it ends: ``stop()`` (also on SIGTERM or
        Ctrl-C through ``with``), or the kernel's parent-death signal and a ``getppid()``
        watch if this process is killed outright (see :mod:`synth_agent.lifecycle`).
        """
        from synth_agent.lifecycle import child_env

        self._proc = subprocess.Popen(
            [sys.executable, "-m", "synth_agent.cli", "sim-endpoint", *self._args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**child_env(), ACCESS_LOG_ENV: "0"},
        )
        try:
            deadline = time.monotonic() + self._timeout
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    raise RuntimeError(f"simulator process exited with code {self._proc.returncode}")
                try:
                    if self._control().get("/healthz", timeout=0.5).status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
            raise RuntimeError(f"simulator process did not become healthy within {self._timeout:.0f} s")
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs."""
        return self._proc.pid if self._proc is not None else None

    def stop(self) -> None:
        http, self._http = self._http, None
        if http is not None:
            http.close()
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def stats(self) -> dict[str, Any]:
        return self._control().get("/stats").json()  # type: ignore[no-any-return]

    def reset_prefix_cache(self) -> None:
        """Empty the simulator's prefix cache (vLLM's ``POST /reset_prefix_cache``)."""
        self._control().post("/reset_prefix_cache").raise_for_status()

    def configure(self, **changes: Any) -> None:
        self._control().post("/admin/config", json=changes).raise_for_status()

    def __enter__(self) -> SimProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def llm_endpoint() -> Iterator[str]:
    """Base URL of the configured OpenAI-compatible endpoint (``OPENAI_BASE_URL``), or of a
    simulator started for the duration when none is configured — what examples run against."""
    if url := os.environ.get("OPENAI_BASE_URL"):
        yield url
        return
    with SimEndpoint() as ep:
        yield ep.base_url
