"""One OpenAI-compatible endpoint as a :class:`~synth_agent.llm.base.ChatBackend`.

Everything that makes a flaky, rate-limited, slow or fast LLM endpoint usable lives
here, once, so call sites stay one line:

* **adaptive concurrency** per endpoint (:class:`~synth_agent.llm.limiter.AdaptiveLimiter`):
  as many requests in flight as the server serves at once, learned from latency and
  overload answers, capped by what the server states (:mod:`~synth_agent.llm.server_info`)
  and by ``max_concurrency``; waiting for a slot happens before the HTTP attempt, so a
  request's timeout never runs while it queues on our side;
* a request **rate** limit (``asyncio-throttle``);
* bounded, jittered exponential **retries** (``tenacity``) of transient failures, honouring
  ``Retry-After``;
* **typed errors** (:mod:`synth_agent.llm.errors`) instead of message text;
* a content-addressed **cache** plus single-flight for temperature-0 calls;
* **structured output**: JSON mode (or a JSON schema, ``structured_output="json_schema"``)
  with a tolerant parser and re-asks for models that ignore it;
* per-call-site **counters** of requests, retries, cache hits, errors and tokens.

The HTTP attempt itself is a :mod:`~synth_agent.llm.transport`: the lean ``aiohttp``
wire client by default, or LangChain's ``ChatOpenAI``. All state is on the instance:
any number of clients (endpoints, models, tenants) coexist in one process.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, TypeVar

import orjson
from asyncio_throttle import Throttler
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from synth_agent.config import Settings
from synth_agent.llm.base import CallSiteStats, ChatMessage, Completion, LLMStats, TokenLogprob
from synth_agent.llm.cache import ResponseCache, cache_key, resolve_cache
from synth_agent.llm.errors import (
    ContextOverflowError,
    InvalidRequestError,
    LLMError,
    LLMTimeoutError,
    RateLimitedError,
    RejectedError,
    UnavailableError,
    UnparseableResponseError,
)
from synth_agent.llm.limiter import AdaptiveLimiter, LimiterStatus, Signal
from synth_agent.llm.prefix_gate import FIT_CALL_SITES, PrefixGate
from synth_agent.llm.server_info import ServerInfo, probe_server
from synth_agent.llm.transport import ChatTransport, make_transport, normalize_messages

T = TypeVar("T", bound=BaseModel)

__all__ = [
    "ContextOverflowError",
    "EndpointConfig",
    "InvalidRequestError",
    "LLMClient",
    "LLMError",
    "LLMTimeoutError",
    "RateLimitedError",
    "RejectedError",
    "RetryEvent",
    "UnavailableError",
    "UnparseableResponseError",
    "parse_structured",
]


class EndpointConfig(BaseModel):
    """How to reach one endpoint and how hard to push it.

    Validated when built and frozen, like :class:`~synth_agent.config.Settings`: values of the
    wrong type are refused (``max_concurrency="4"`` is an error, ``timeout=5`` is a float);
    environment variables reach it through ``Settings``, which parses their strings.
    """

    model_config = ConfigDict(frozen=True, strict=True)

    base_url: str
    api_key: str = "sim"
    model: str = "sim"
    max_concurrency: int = Field(
        default=16, ge=1, description="most requests in flight at once (the adaptive limit's ceiling)"
    )
    adaptive_concurrency: bool = Field(
        default=True, description="adapt the limit to the server (False: always max_concurrency)"
    )
    latency_tolerance: float = Field(
        default=1.5, gt=1, description="latency / baseline above which the server counts as queueing"
    )
    probe_server: bool = Field(
        default=True, description="read the server's stated capacity and context length once (llama.cpp, SGLang, vLLM)"
    )
    rate_limit: float = Field(default=0.0, ge=0, description="requests per second; 0 = unlimited")
    timeout: float = Field(default=60.0, gt=0, description="seconds per HTTP attempt (never counts queueing on our side)")
    max_retries: int = Field(default=6, ge=0, description="extra attempts after the first")
    backoff_initial: float = Field(default=0.05, ge=0)
    backoff_max: float = Field(default=8.0, ge=0)
    structured_retries: int = Field(
        default=2, ge=0, description="re-asks when a structured answer is garbage"
    )
    structured_output: Literal["json_object", "json_schema", "json_object_schema"] = Field(
        default="json_object",
        description="how structured answers (structured(), judgments) ask for JSON: response_format json_object "
        "(any JSON); json_schema with the answer's schema (OpenAI's form: constrained decoding on vLLM, SGLang, "
        "llama.cpp's llama-server, OpenAI); json_object_schema ({'type': 'json_object', 'schema': ...}: "
        "llama-cpp-python's server, which answers OpenAI's form with HTTP 500, and llama-server)",
    )
    context_length: int | None = Field(
        default=None, ge=1, description="the model's context window in tokens; None: as the server states, if it does"
    )
    prefix_warmup_tokens: int = Field(
        default=0, ge=0,
        description="hold requests whose prompt prefix (every message but the last) of at least this many tokens "
        "is being sent for the first time by another request until that one returns, so a prefix-caching server "
        "(vLLM, SGLang, llama.cpp) computes the prefix once; 0 = off (synth_agent/llm/prefix_gate.py)",
    )
    prefix_warmup_sites: tuple[str, ...] = Field(
        default=FIT_CALL_SITES,
        description="the call sites prefix_warmup_tokens applies to; by default a fit's (background work), so "
        "live judgments and chat never wait for another request",
    )
    transport: Literal["lean", "aiohttp", "langchain"] = Field(
        default="lean",
        description="lean: our HTTP/1.1 wire client for http:// endpoints (synth_agent/llm/wire.py), aiohttp for "
        "https://; aiohttp: aiohttp for every endpoint; langchain: ChatOpenAI (slower, LangChain callbacks)",
    )

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> EndpointConfig:
        values: dict[str, Any] = {
            "base_url": settings.base_url,
            "api_key": settings.api_key,
            "model": settings.model,
            "max_concurrency": settings.max_concurrency,
            "adaptive_concurrency": settings.adaptive_concurrency,
            "rate_limit": settings.rate_limit,
            "timeout": settings.request_timeout,
            "max_retries": settings.max_retries,
            "context_length": settings.context_length,
            "structured_output": settings.structured_output,
            "prefix_warmup_tokens": settings.prefix_warmup_tokens,
        }
        values.update(overrides)
        return cls(**values)


@dataclass(frozen=True)
class RetryEvent:
    """One retry decision, kept so tests and dashboards can see what the client chose to wait."""

    call_id: int
    call_site: str
    attempt: int
    """The attempt that failed (1 = first)."""
    wait: float
    """Seconds the client slept before the next attempt."""
    retry_after: float | None
    """The server's Retry-After, when it sent one."""
    cause: str


# ------------------------------------------------------------------ errors


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, LLMError) and exc.retryable


def _overload(exc: LLMError) -> bool:
    """Does this failure say the server has more work than it can take (the limiter shrinks)?"""
    if isinstance(exc, LLMTimeoutError | RateLimitedError):
        return True
    return isinstance(exc, UnavailableError) and exc.status in (None, 502, 503, 504)


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}({text[:300]})"


def _rejection_hint(status: int | None) -> str:
    return {
        400: "the endpoint rejected the request body; check messages/parameters (not retried)",
        401: "the API key was refused; set OPENAI_API_KEY / EndpointConfig.api_key (not retried)",
        403: "the API key may not use this model or endpoint (not retried)",
        404: "model or URL not found; check EndpointConfig.model and base_url (should end in /v1) (not retried)",
        413: "the prompt is too large for this endpoint; shorten it (not retried)",
        422: "the endpoint could not process the request parameters (not retried)",
    }.get(status or 0, "the endpoint rejected the request (not retried)")


# ------------------------------------------------------------------ parsing

_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.S)


def _json_objects(text: str) -> list[dict[str, Any]]:
    """Every balanced top-level ``{...}`` in ``text`` that parses as a JSON object, in order."""
    found: list[dict[str, Any]] = []
    decoder = json.JSONDecoder()
    i = text.find("{")
    while i != -1:
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            i = text.find("{", i + 1)
            continue
        if isinstance(obj, dict):
            found.append(obj)
        i = text.find("{", end)
    return found


def _match_keys(obj: dict[str, Any], schema: type[BaseModel]) -> dict[str, Any]:
    """Rename keys to the schema's field names ignoring case, spaces, dashes and underscores."""

    def norm(k: str) -> str:
        return re.sub(r"[\s_\-]", "", k).lower()

    names: dict[str, str] = {}
    for name, info in schema.model_fields.items():
        names.setdefault(norm(name), name)
        if isinstance(info.alias, str):
            names.setdefault(norm(info.alias), info.alias)
    out: dict[str, Any] = {}
    for k, v in obj.items():
        target = names.get(norm(str(k)), k)
        out.setdefault(target, v)
    return out


def parse_structured(text: str, schema: type[T]) -> T:
    """Strict ``model_validate_json`` first, then a tolerant pass for models that ignore response_format.

    The tolerant pass strips code fences, takes the first JSON object in the
    text that validates, and matches keys case-insensitively. Raises
    ``ValueError`` when nothing fits.
    """
    try:
        return schema.model_validate_json(text)
    except ValidationError:
        pass
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    last: Exception | None = None
    for chunk in candidates:
        for obj in _json_objects(chunk):
            try:
                return schema.model_validate(_match_keys(obj, schema))
            except ValidationError as e:
                last = e
    detail = f": {last.errors()[0]['msg']}" if isinstance(last, ValidationError) else ""
    raise ValueError(f"no JSON object matching {schema.__name__} in the answer{detail}: {text[:200]!r}")


def parses_as(schema: type[BaseModel]) -> Callable[[str], bool]:
    """A cache validator: only answers readable as ``schema`` are worth caching."""

    def valid(text: str) -> bool:
        try:
            parse_structured(text, schema)
        except ValueError:
            return False
        return True

    return valid


def _looks_like_json(text: str) -> bool:
    """Whether ``text`` holds a JSON object (the cache keeps only such answers of JSON-mode calls)."""
    stripped = text.strip()
    if stripped[:1] == "{" and stripped[-1:] == "}":
        # The common case, an answer that is exactly one object: the scan below would find it too
        # (orjson refuses a few things json accepts, e.g. NaN: those still go through the scan).
        try:
            if isinstance(orjson.loads(stripped), dict):
                return True
        except orjson.JSONDecodeError:
            pass
    return bool(_json_objects(text))


# ------------------------------------------------------------------ client


class _LoopBound:
    """Per-event-loop resources: futures, the limiter's queue and HTTP connections cannot cross loops."""

    def __init__(self, cfg: EndpointConfig, previous: _LoopBound | None) -> None:
        self.loop = asyncio.get_running_loop()
        self.limiter = AdaptiveLimiter(
            cfg.max_concurrency,
            timeout=cfg.timeout,
            adaptive=cfg.adaptive_concurrency,
            tolerance=cfg.latency_tolerance,
        )
        self.server: ServerInfo | None = None
        self.probe: asyncio.Future[ServerInfo] | None = None
        if previous is not None:  # what the endpoint taught us survives a new event loop
            self.limiter.carry_over(previous.limiter)
            self.server = previous.server
        self.throttler: Throttler | None = None
        if cfg.rate_limit > 0:
            burst = max(1, int(cfg.rate_limit))
            self.throttler = Throttler(rate_limit=burst, period=burst / cfg.rate_limit)
        self.inflight: dict[str, asyncio.Future[Completion]] = {}
        self.transport: ChatTransport = make_transport(cfg)
        self.prefix_gate = PrefixGate(cfg.prefix_warmup_tokens) if cfg.prefix_warmup_tokens else None


class LLMClient:
    """A :class:`ChatBackend` over one endpoint.

    ``cache``: ``True`` (default) for a private in-memory LRU, ``False`` for none,
    or any :class:`ResponseCache` (e.g. a shared :class:`SqliteCache`). Only
    temperature-0 calls are cached.

        >>> import asyncio
        >>> from synth_agent.sim.server import SimEndpoint
        >>> async def ask(url: str) -> tuple[bool, int, int]:
        ...     async with LLMClient(EndpointConfig(base_url=url, model="sim")) as llm:
        ...         msgs = [{"role": "user", "content": "Give me one tip for learning Spanish."}]
        ...         first = await llm.complete(msgs, call_site="doc")
        ...         again = await llm.complete(msgs, call_site="doc")  # temperature 0: from the cache
        ...         total = llm.stats.total()
        ...         return bool(first.text) and again.text == first.text, total.requests, total.cache_hits
        >>> with SimEndpoint() as sim:
        ...     asyncio.run(ask(sim.base_url))
        (True, 1, 1)
    """

    def __init__(
        self,
        config: EndpointConfig,
        *,
        cache: ResponseCache | bool = True,
        retry_log_size: int = 1000,
        rng_seed: int | None = None,
    ) -> None:
        self.config = config
        self.model = config.model
        self.stats = LLMStats()
        self.cache: ResponseCache | None = resolve_cache(cache)
        self.retry_log: deque[RetryEvent] = deque(maxlen=retry_log_size)
        self._rng = random.Random(rng_seed)
        self._bound: _LoopBound | None = None
        self._learned: _LoopBound | None = None  # the last loop's resources: what the endpoint taught us
        self._call_ids = 0
        self._url = config.base_url.rstrip("/")

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs: Any) -> LLMClient:
        return cls(EndpointConfig.from_settings(settings), **kwargs)

    @property
    def endpoint(self) -> str:
        return f"{self.config.base_url} (model {self.config.model})"

    def __repr__(self) -> str:
        return f"LLMClient({self.endpoint})"

    # -------------------------------------------------------------- what the endpoint told us

    @property
    def limiter(self) -> AdaptiveLimiter | None:
        """This event loop's concurrency limiter (None before the first request)."""
        return self._bound.limiter if self._bound is not None else None

    @property
    def concurrency(self) -> int:
        """Requests currently allowed in flight (``max_concurrency`` until the first answer)."""
        lim = self.limiter
        return lim.limit if lim is not None and lim.settled else self.config.max_concurrency

    def limiter_status(self) -> LimiterStatus | None:
        lim = self.limiter
        return lim.status() if lim is not None else None

    @property
    def server_info(self) -> ServerInfo | None:
        """What the server stated about itself (capacity, context length), once probed."""
        return self._bound.server if self._bound is not None else None

    @property
    def context_length(self) -> int | None:
        """The model's context window in tokens: configured, else as the server stated, else None.

        Prompt budgets (trimming demos until a judge prompt fits) read this.
        """
        if self.config.context_length:
            return self.config.context_length
        info = self.server_info
        return info.context_length if info is not None else None

    # -------------------------------------------------------------- lifecycle

    def _resources(self) -> _LoopBound:
        loop = asyncio.get_running_loop()
        bound = self._bound
        if bound is None or bound.loop is not loop:
            if bound is not None and bound.loop.is_closed():
                bound.transport.abandon()
            bound = self._bound = _LoopBound(self.config, bound or self._learned)
        return bound

    async def _probe(self, res: _LoopBound) -> None:
        """Ask the server once (per event loop) what it states about itself; shared by concurrent callers."""
        if res.server is not None or not self.config.probe_server:
            return
        if res.probe is None:
            res.probe = asyncio.ensure_future(probe_server(res.transport.get_json, self._url, self.config.model))
        info = await asyncio.shield(res.probe)
        if res.server is None:
            res.server = info
            res.limiter.set_capacity(info.capacity)

    async def aclose(self) -> None:
        bound, self._bound = self._bound, None
        if bound is None:
            return
        self._learned = bound  # a later event loop starts from what this one learned
        if bound.loop is asyncio.get_running_loop():
            if bound.probe is not None and not bound.probe.done():
                bound.probe.cancel()
            await bound.transport.aclose()
        elif bound.loop.is_closed():
            bound.transport.abandon()

    async def __aenter__(self) -> LLMClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -------------------------------------------------------------- public API

    async def complete(
        self,
        messages: Sequence[ChatMessage],
        *,
        call_site: str = "default",
        temperature: float = 0.0,
        max_tokens: int | None = None,
        json_mode: bool = False,
        logprobs: int | None = None,
        seed: int | None = None,
        extra: dict[str, Any] | None = None,
        schema: dict[str, Any] | None = None,
    ) -> Completion:
        """Answer ``messages``; temperature-0 answers come from the cache or a shared in-flight request.

        ``logprobs=k`` asks for the top-k alternatives per generated token.
        ``extra`` holds additional JSON body fields (e.g. vLLM's ``guided_choice``, or a
        ``response_format`` that overrides ``json_mode``). ``schema`` (a JSON schema, with
        ``json_mode``): sent as ``structured_output`` says, so the server decodes only answers
        that follow it.
        """
        if json_mode and schema is not None:
            extra = {**response_format(self.config.structured_output, schema), **(extra or {})}
        return await self._complete(
            messages,
            call_site=call_site,
            temperature=temperature,
            max_tokens=max_tokens,
            json_mode=json_mode,
            logprobs=logprobs,
            seed=seed,
            extra=extra,
            validate=_looks_like_json if json_mode else None,
            bypass_cache=False,
        )

    async def structured(
        self,
        messages: Sequence[ChatMessage],
        schema: type[T],
        *,
        call_site: str = "default",
        temperature: float = 0.0,
        max_tokens: int | None = None,
    ) -> T:
        """Answer as a ``schema`` instance; a garbage answer is re-asked (bypassing the cache), then
        :class:`UnparseableResponseError`."""

        valid = parses_as(schema)
        site = self.stats.site(call_site)
        extra = response_format(self.config.structured_output, schema.model_json_schema(), schema.__name__)
        last: ValueError | None = None
        for attempt in range(self.config.structured_retries + 1):
            if attempt:
                site.retries += 1
            completion = await self._complete(
                messages,
                call_site=call_site,
                temperature=temperature,
                max_tokens=max_tokens,
                json_mode=True,
                logprobs=None,
                seed=None,
                extra=extra,
                validate=valid,
                bypass_cache=attempt > 0,
            )
            try:
                return parse_structured(completion.text, schema)
            except ValueError as e:
                last = e
                site.unparseable += 1
        site.errors += 1
        raise UnparseableResponseError(
            f"{self.endpoint} gave no answer readable as {schema.__name__} at call site {call_site!r} "
            f"after {self.config.structured_retries + 1} tries; last: {last}. The model may not follow "
            "JSON instructions: try a stronger model, structured_output='json_schema', or raise "
            "EndpointConfig.structured_retries.",
            endpoint=self.config.base_url,
            call_site=call_site,
            cause=last,
            attempts=self.config.structured_retries + 1,
        )

    # -------------------------------------------------------------- internals

    def _body(
        self,
        messages: Sequence[ChatMessage],
        temperature: float,
        max_tokens: int | None,
        json_mode: bool,
        logprobs: int | None,
        seed: int | None,
        extra: dict[str, Any] | None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.config.model,
            "messages": normalize_messages(messages),
            "temperature": temperature,
        }
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        if json_mode:
            body["response_format"] = {"type": "json_object"}
        if logprobs is not None:
            body["logprobs"] = True
            body["top_logprobs"] = logprobs
        if seed is not None:
            body["seed"] = seed
        if extra:
            body.update(extra)
        return body

    async def _complete(
        self,
        messages: Sequence[ChatMessage],
        *,
        call_site: str,
        temperature: float,
        max_tokens: int | None,
        json_mode: bool,
        logprobs: int | None,
        seed: int | None,
        extra: dict[str, Any] | None,
        validate: Callable[[str], bool] | None,
        bypass_cache: bool,
    ) -> Completion:
        # fail fast on bad input, before any counting
        body = self._body(messages, temperature, max_tokens, json_mode, logprobs, seed, extra)
        res = self._resources()
        want_logprobs = logprobs is not None
        kind = (call_site, max_tokens, want_logprobs)

        def fetch() -> Awaitable[Completion]:
            # "select:logprob" is the log-probability form of the "select" judgments
            if res.prefix_gate is not None and call_site.split(":", 1)[0] in self.config.prefix_warmup_sites:
                return res.prefix_gate.run(body["messages"], lambda: self._request(body, call_site, kind, want_logprobs))
            return self._request(body, call_site, kind, want_logprobs)

        if temperature != 0 or self.cache is None:
            return await fetch()
        key = cache_key(
            model=self.config.model,
            base_url=self.config.base_url,
            messages=body["messages"],
            temperature=temperature,
            max_tokens=max_tokens,
            json_mode=json_mode,
            logprobs=logprobs,
            seed=seed,
            extra=extra,
        )
        site = self.stats.site(call_site)
        return await cached_single_flight(
            self.cache, res.inflight, key, fetch,
            on_hit=lambda: setattr(site, "cache_hits", site.cache_hits + 1),
            validate=validate, bypass_cache=bypass_cache,
        )  # fmt: skip

    async def _request(
        self, body: dict[str, Any], call_site: str, kind: tuple[Any, ...], want_logprobs: bool
    ) -> Completion:
        """One logical call: bounded, jittered retries around single HTTP attempts.

        The first attempt runs bare; only a retryable failure enters ``tenacity``, which is handed
        that failure as its own first attempt (so its waits, stop rule and retry log are the same as
        if it had run the first attempt). Building an ``AsyncRetrying`` and its callbacks for every
        call was ~5-8% of the client's samples in a py-spy profile of ``bench/fit_cost.py``, where almost
        no call fails.
        """
        cfg = self.config
        site = self.stats.site(call_site)
        self._call_ids += 1
        call_id = self._call_ids
        attempts = 1
        try:
            replay: LLMError | None = None
            try:
                completion = await self._attempt(body, site, kind, want_logprobs)
            except LLMError as first:
                if not first.retryable or cfg.max_retries == 0:
                    raise
                replay = first
            if replay is not None:
                async for attempt in self._retrying(site, call_site, call_id):
                    with attempt:
                        if replay is not None:  # tenacity's attempt 1: the failure we already had
                            failed, replay = replay, None
                            raise failed
                        attempts += 1
                        completion = await self._attempt(body, site, kind, want_logprobs)
            return replace(completion, attempts=attempts)
        except LLMError as e:
            site.errors += 1
            if e.retryable:
                message = (
                    f"{self.endpoint} failed at call site {call_site!r} after {attempts} attempts; "
                    f"last error: {_describe(e)}. Check that the endpoint is up and not overloaded, "
                    "or raise EndpointConfig.max_retries / timeout."
                )
            elif isinstance(e, UnparseableResponseError):
                message = (
                    f"{self.endpoint} returned a response that is not a chat completion at call site "
                    f"{call_site!r}: {e}. Check that base_url points at an OpenAI-compatible /v1 API."
                )
            else:
                message = (
                    f"{self.endpoint} refused the request at call site {call_site!r}: {_describe(e)}; "
                    f"{_rejection_hint(e.status)}."
                )
            raise e.with_context(message, endpoint=cfg.base_url, call_site=call_site, attempts=attempts) from e

    def _retrying(self, site: CallSiteStats, call_site: str, call_id: int) -> AsyncRetrying:
        """The retry policy of one call: jittered exponential backoff or the server's Retry-After."""
        cfg = self.config

        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            server = exc.retry_after if isinstance(exc, LLMError) else None
            if server is not None:
                return min(server, cfg.backoff_max)
            base = min(cfg.backoff_max, cfg.backoff_initial * 2 ** (state.attempt_number - 1))
            return base * (0.5 + 0.5 * self._rng.random())  # jitter decorrelates concurrent retriers

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            site.retries += 1
            self.retry_log.append(
                RetryEvent(
                    call_id=call_id,
                    call_site=call_site,
                    attempt=state.attempt_number,
                    wait=state.next_action.sleep if state.next_action else 0.0,
                    retry_after=exc.retry_after if isinstance(exc, LLMError) else None,
                    cause=_describe(exc) if exc is not None else "",
                )
            )

        return AsyncRetrying(
            stop=stop_after_attempt(cfg.max_retries + 1),
            wait=wait,
            retry=retry_if_exception(_retryable),
            before_sleep=before_sleep,
            reraise=True,
        )

    async def _attempt(
        self, body: dict[str, Any], site: CallSiteStats, kind: tuple[Any, ...], want_logprobs: bool
    ) -> Completion:
        """One HTTP attempt. The slot is taken first; the timeout only starts inside the transport."""
        res = self._resources()
        if res.server is None and self.config.probe_server:
            await self._probe(res)
        limiter = res.limiter
        ticket = await limiter.acquire()
        signal: Signal = "neutral"
        started = 0.0
        try:
            if res.throttler is not None:
                await res.throttler.acquire()
            site.requests += 1
            started = time.perf_counter()
            completion = await res.transport.chat(body, want_logprobs=want_logprobs)
            signal = "ok"
        except LLMError as e:
            if _overload(e):
                signal = "overload"
            raise
        finally:
            latency = time.perf_counter() - started if signal == "ok" else None
            limiter.release(ticket, signal, latency=latency, key=kind)
        site.prompt_tokens += completion.prompt_tokens
        site.completion_tokens += completion.completion_tokens
        site.cached_prompt_tokens += completion.cached_prompt_tokens
        return completion


def response_format(
    dialect: Literal["json_object", "json_schema", "json_object_schema"], schema: dict[str, Any], name: str = "answer"
) -> dict[str, Any]:
    """The body field asking for an answer that follows the JSON schema ``schema``, in the server's dialect.

    ``json_object``: any JSON (the schema is not sent; the call site's parser reads the answer).
    ``json_schema``: OpenAI's form (vLLM, SGLang, llama.cpp's llama-server, OpenAI).
    ``json_object_schema``: ``{"type": "json_object", "schema": ...}`` (llama-cpp-python's server turns
    it into a grammar; llama-server reads it too).

        >>> response_format("json_object_schema", {"type": "object"})
        {'response_format': {'type': 'json_object', 'schema': {'type': 'object'}}}
    """
    if dialect == "json_schema":
        return {"response_format": {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": False}}}
    if dialect == "json_object_schema":
        return {"response_format": {"type": "json_object", "schema": schema}}
    return {"response_format": {"type": "json_object"}}


async def cached_single_flight(
    cache: ResponseCache,
    inflight: dict[str, asyncio.Future[Completion]],
    key: str,
    fetch: Callable[[], Awaitable[Completion]],
    *,
    on_hit: Callable[[], None],
    validate: Callable[[str], bool] | None = None,
    bypass_cache: bool = False,
) -> Completion:
    """Serve ``key`` from the cache, or join an identical call in flight, or fetch and cache it.

    Shared by :class:`LLMClient` and the endpoint pool, so both count a joined call as a
    cache hit, never cache failures or answers ``validate`` rejects, and survive the leader
    being cancelled (a waiter then asks itself).
    """
    if not bypass_cache:
        hit = await cache.get(key)
        if hit is not None:
            on_hit()
            return _from_cache(hit)
        while (pending := inflight.get(key)) is not None:
            try:
                shared = await asyncio.shield(pending)
            except asyncio.CancelledError:
                if pending.cancelled() and not _current_task_cancelling():
                    continue  # the leader was cancelled, not us: try again ourselves
                raise
            on_hit()
            return replace(shared, cached=True, attempts=0)

    future: asyncio.Future[Completion] | None = None
    if key not in inflight:
        future = asyncio.get_running_loop().create_future()
        inflight[key] = future
    try:
        completion = await fetch()
    except asyncio.CancelledError:
        if future is not None:
            future.cancel()
        raise
    except BaseException as e:
        if future is not None:
            future.set_exception(e)
            future.exception()  # mark retrieved: nobody may be waiting
        raise
    else:
        if validate is None or validate(completion.text):
            await cache.set(key, _to_cache(completion))
        if future is not None:
            future.set_result(completion)
        return completion
    finally:
        if future is not None and inflight.get(key) is future:
            del inflight[key]

def _current_task_cancelling() -> bool:
    task = asyncio.current_task()
    return bool(task is not None and task.cancelling())


def _to_cache(c: Completion) -> dict[str, Any]:
    return {
        "text": c.text,
        "model": c.model,
        "prompt_tokens": c.prompt_tokens,
        "completion_tokens": c.completion_tokens,
        "cached_prompt_tokens": c.cached_prompt_tokens,
        "top_logprobs": None
        if c.top_logprobs is None
        else [[[t.token, t.logprob] for t in pos] for pos in c.top_logprobs],
    }


def _from_cache(v: Mapping[str, Any]) -> Completion:
    top = v.get("top_logprobs")
    return Completion(
        text=str(v["text"]),
        model=str(v.get("model", "")),
        prompt_tokens=int(v.get("prompt_tokens", 0)),
        completion_tokens=int(v.get("completion_tokens", 0)),
        cached_prompt_tokens=int(v.get("cached_prompt_tokens", 0)),
        cached=True,
        top_logprobs=None
        if top is None
        else [[TokenLogprob(str(t), float(lp)) for t, lp in pos] for pos in top],
        attempts=0,
    )
