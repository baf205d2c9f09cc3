"""One OpenAI-compatible endpoint as a :class:`~synth_agent.llm.base.ChatBackend`.

Everything that makes a flaky, rate-limited LLM endpoint usable lives here so
call sites stay one line: per-endpoint concurrency and rate limits, bounded
retries with jittered exponential backoff that honours ``Retry-After``, a
content-addressed cache plus single-flight for temperature-0 calls, tolerant
structured-output parsing, and per-call-site accounting. All state is on the
instance: any number of clients (endpoints, models, tenants) coexist in one
process.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import openai
from asyncio_throttle import Throttler
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from synth_agent.config import Settings
from synth_agent.llm.base import CallSiteStats, ChatMessage, Completion, LLMStats, TokenLogprob
from synth_agent.llm.cache import MemoryCache, ResponseCache, cache_key

T = TypeVar("T", bound=BaseModel)

__all__ = [
    "EndpointConfig",
    "LLMClient",
    "LLMError",
    "RetryEvent",
    "parse_structured",
]


class LLMError(RuntimeError):
    """An LLM call failed for good (retries exhausted, request rejected, or answer unreadable)."""

    def __init__(
        self, message: str, *, endpoint: str = "", call_site: str = "", cause: BaseException | None = None
    ) -> None:
        super().__init__(message)
        self.endpoint = endpoint
        self.call_site = call_site
        self.cause = cause


class EndpointConfig(BaseModel):
    """How to reach one endpoint and how hard to push it."""

    model_config = ConfigDict(frozen=True)

    base_url: str
    api_key: str = "sim"
    model: str = "sim-judge"
    max_concurrency: int = Field(default=16, ge=1, description="requests in flight at once")
    rate_limit: float = Field(default=0.0, ge=0, description="requests per second; 0 = unlimited")
    timeout: float = Field(default=60.0, gt=0, description="seconds per HTTP attempt")
    max_retries: int = Field(default=6, ge=0, description="extra attempts after the first")
    backoff_initial: float = Field(default=0.05, ge=0)
    backoff_max: float = Field(default=8.0, ge=0)
    structured_retries: int = Field(
        default=2, ge=0, description="re-asks when a structured answer is garbage"
    )

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> EndpointConfig:
        values: dict[str, Any] = {
            "base_url": settings.base_url,
            "api_key": settings.api_key,
            "model": settings.model,
            "max_concurrency": settings.max_concurrency,
            "rate_limit": settings.rate_limit,
            "timeout": settings.request_timeout,
            "max_retries": settings.max_retries,
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


def _status(exc: BaseException) -> int | None:
    return exc.status_code if isinstance(exc, openai.APIStatusError) else None


def _is_retryable(exc: BaseException) -> bool:
    """429, 408 and 5xx, timeouts, dropped connections and unreadable response bodies are transient."""
    if isinstance(exc, openai.APIConnectionError | openai.APIResponseValidationError):
        return True  # APITimeoutError is an APIConnectionError
    status = _status(exc)
    return status is not None and (status in (408, 409, 429) or status >= 500)


def retry_after_seconds(exc: BaseException) -> float | None:
    """The server's requested delay (``retry-after-ms`` or ``Retry-After`` seconds / HTTP date), if any."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    try:
        if (ms := headers.get("retry-after-ms")) is not None:
            return max(0.0, float(ms) / 1000.0)
        raw = headers.get("retry-after")
        if raw is None:
            return None
        try:
            return max(0.0, float(raw))
        except ValueError:
            when = email.utils.parsedate_to_datetime(raw)
            return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError, OverflowError):
        return None


def _describe(exc: BaseException) -> str:
    status = _status(exc)
    prefix = f"HTTP {status}: " if status else ""
    text = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return f"{type(exc).__name__}({prefix}{str(text)[:300]})"


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
    return bool(_json_objects(text))


# ------------------------------------------------------------------ client

_ROLE_TO_MESSAGE: dict[str, type[BaseMessage]] = {
    "system": SystemMessage,
    "developer": SystemMessage,
    "user": HumanMessage,
    "human": HumanMessage,
    "assistant": AIMessage,
    "model": AIMessage,
    "ai": AIMessage,
}


def to_langchain_messages(messages: Sequence[Mapping[str, Any]]) -> list[BaseMessage]:
    out: list[BaseMessage] = []
    for i, m in enumerate(messages):
        role = str(m.get("role", "")).lower()
        cls = _ROLE_TO_MESSAGE.get(role)
        if cls is None:
            raise ValueError(
                f"message {i} has unsupported role {m.get('role')!r}; use system, user or assistant"
            )
        out.append(cls(content=str(m.get("content", ""))))
    return out


class _LoopBound:
    """Per-event-loop resources: asyncio primitives and HTTP connections cannot cross loops."""

    def __init__(self, cfg: EndpointConfig) -> None:
        self.loop = asyncio.get_running_loop()
        self.semaphore = asyncio.Semaphore(cfg.max_concurrency)
        self.throttler: Throttler | None = None
        if cfg.rate_limit > 0:
            burst = max(1, int(cfg.rate_limit))
            self.throttler = Throttler(rate_limit=burst, period=burst / cfg.rate_limit)
        self.inflight: dict[str, asyncio.Future[Completion]] = {}
        self.http = openai.DefaultAsyncHttpxClient(timeout=cfg.timeout)
        self.chat = ChatOpenAI(
            model=cfg.model,
            base_url=cfg.base_url,
            api_key=cfg.api_key,
            timeout=cfg.timeout,
            max_retries=0,  # tenacity owns retries so they are bounded, counted and honour Retry-After
            http_async_client=self.http,
        )


class LLMClient:
    """A :class:`ChatBackend` over one endpoint, built on langchain-openai ``ChatOpenAI``.

    ``cache``: ``True`` (default) for a private in-memory LRU, ``False`` for none,
    or any :class:`ResponseCache` (e.g. a shared :class:`SqliteCache`). Only
    temperature-0 calls are cached.
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
        self.cache: ResponseCache | None = (
            MemoryCache() if cache is True else None if cache is False else cache  # type: ignore[assignment]
        )
        self.retry_log: deque[RetryEvent] = deque(maxlen=retry_log_size)
        self._rng = random.Random(rng_seed)
        self._bound: _LoopBound | None = None
        self._call_ids = 0

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs: Any) -> LLMClient:
        return cls(EndpointConfig.from_settings(settings), **kwargs)

    @property
    def endpoint(self) -> str:
        return f"{self.config.base_url} (model {self.config.model})"

    def __repr__(self) -> str:
        return f"LLMClient({self.endpoint})"

    def _resources(self) -> _LoopBound:
        loop = asyncio.get_running_loop()
        if self._bound is None or self._bound.loop is not loop:
            self._bound = _LoopBound(self.config)
        return self._bound

    async def aclose(self) -> None:
        bound, self._bound = self._bound, None
        if bound is not None and bound.loop is asyncio.get_running_loop():
            await bound.http.aclose()

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
    ) -> Completion:
        """Answer ``messages``; temperature-0 answers come from the cache or a shared in-flight request.

        ``logprobs=k`` asks for the top-k alternatives per generated token.
        ``extra`` holds additional JSON body fields (e.g. vLLM's ``guided_choice``).
        """
        validate = _looks_like_json if json_mode else None
        return await self._complete(
            messages,
            call_site=call_site,
            temperature=temperature,
            max_tokens=max_tokens,
            json_mode=json_mode,
            logprobs=logprobs,
            seed=seed,
            extra=extra,
            validate=validate,
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
        """Answer as a ``schema`` instance; a garbage answer is re-asked (bypassing the cache), then LLMError."""

        valid = parses_as(schema)
        site = self.stats.site(call_site)
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
                extra=None,
                validate=valid,
                bypass_cache=attempt > 0,
            )
            try:
                return parse_structured(completion.text, schema)
            except ValueError as e:
                last = e
        site.errors += 1
        raise LLMError(
            f"{self.endpoint} gave no answer readable as {schema.__name__} at call site {call_site!r} "
            f"after {self.config.structured_retries + 1} tries; last: {last}. The model may not follow "
            "JSON instructions: try a stronger model or raise EndpointConfig.structured_retries.",
            endpoint=self.config.base_url,
            call_site=call_site,
            cause=last,
        )

    # -------------------------------------------------------------- internals

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
        lc_messages = to_langchain_messages(messages)  # fail fast on bad input, before any counting
        res = self._resources()
        site = self.stats.site(call_site)
        kwargs: dict[str, Any] = {"temperature": temperature}
        if max_tokens is not None:
            kwargs["max_tokens"] = max_tokens
        if json_mode:
            kwargs["response_format"] = {"type": "json_object"}
        if logprobs is not None:
            kwargs["logprobs"] = True
            kwargs["top_logprobs"] = logprobs
        if seed is not None:
            kwargs["seed"] = seed
        if extra:
            kwargs["extra_body"] = dict(extra)

        async def fetch() -> Completion:
            return await self._request(lc_messages, kwargs, call_site, want_logprobs=logprobs is not None)

        if temperature != 0 or self.cache is None:
            return await fetch()

        key = cache_key(
            model=self.config.model,
            base_url=self.config.base_url,
            messages=messages,
            temperature=temperature,
            max_tokens=max_tokens,
            json_mode=json_mode,
            logprobs=logprobs,
            seed=seed,
            extra=extra,
        )
        return await cached_single_flight(
            self.cache, res.inflight, key, fetch,
            on_hit=lambda: setattr(site, "cache_hits", site.cache_hits + 1),
            validate=validate, bypass_cache=bypass_cache,
        )

    async def _request(
        self, lc_messages: list[BaseMessage], kwargs: dict[str, Any], call_site: str, *, want_logprobs: bool
    ) -> Completion:
        """One logical call: bounded, jittered retries around single HTTP attempts."""
        cfg = self.config
        site = self.stats.site(call_site)
        self._call_ids += 1
        call_id = self._call_ids

        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            server = retry_after_seconds(exc) if exc is not None else None
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
                    retry_after=retry_after_seconds(exc) if exc is not None else None,
                    cause=_describe(exc) if exc is not None else "",
                )
            )

        retrying = AsyncRetrying(
            stop=stop_after_attempt(cfg.max_retries + 1),
            wait=wait,
            retry=retry_if_exception(_is_retryable),
            before_sleep=before_sleep,
            reraise=True,
        )
        attempts = 0
        try:
            async for attempt in retrying:
                with attempt:
                    attempts += 1
                    message = await self._attempt(lc_messages, kwargs, site)
            return _to_completion(message, cfg.model, attempts, want_logprobs)  # type: ignore[possibly-undefined]
        except openai.APIError as e:
            site.errors += 1
            if _is_retryable(e):
                raise LLMError(
                    f"{self.endpoint} failed at call site {call_site!r} after {attempts} attempts; "
                    f"last error: {_describe(e)}. Check that the endpoint is up and not overloaded, "
                    "or raise EndpointConfig.max_retries / timeout.",
                    endpoint=cfg.base_url,
                    call_site=call_site,
                    cause=e,
                ) from e
            raise LLMError(
                f"{self.endpoint} refused the request at call site {call_site!r}: {_describe(e)}; "
                f"{_rejection_hint(_status(e))}.",
                endpoint=cfg.base_url,
                call_site=call_site,
                cause=e,
            ) from e
        except (ValueError, TypeError, KeyError) as e:  # langchain-openai's complaints about odd bodies
            site.errors += 1
            raise LLMError(
                f"{self.endpoint} returned a response that is not a chat completion at call site "
                f"{call_site!r}: {e!r}. Check that base_url points at an OpenAI-compatible /v1 API.",
                endpoint=cfg.base_url,
                call_site=call_site,
                cause=e,
            ) from e

    async def _attempt(
        self, lc_messages: list[BaseMessage], kwargs: dict[str, Any], site: CallSiteStats
    ) -> AIMessage:
        res = self._resources()
        async with res.semaphore:
            if res.throttler is not None:
                await res.throttler.acquire()
            site.requests += 1
            message = await res.chat.ainvoke(lc_messages, **kwargs)
        if not isinstance(message, AIMessage):  # pragma: no cover - ChatOpenAI always returns AIMessage
            raise TypeError(f"unexpected message type {type(message).__name__}")
        usage = message.usage_metadata
        if usage:
            site.prompt_tokens += int(usage.get("input_tokens", 0))
            site.completion_tokens += int(usage.get("output_tokens", 0))
        return message



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


def _to_completion(message: AIMessage, default_model: str, attempts: int, want_logprobs: bool) -> Completion:
    text = message.content if isinstance(message.content, str) else message.text
    usage = message.usage_metadata or {}
    meta = message.response_metadata or {}
    top: list[list[TokenLogprob]] | None = None
    if want_logprobs:
        content = (meta.get("logprobs") or {}).get("content") or []
        top = []
        for tok in content:
            alts = tok.get("top_logprobs") or [
                {"token": tok.get("token", ""), "logprob": tok.get("logprob", 0.0)}
            ]
            top.append([TokenLogprob(str(a["token"]), float(a["logprob"])) for a in alts])
    return Completion(
        text=text,
        model=str(meta.get("model_name") or default_model),
        prompt_tokens=int(usage.get("input_tokens", 0)),
        completion_tokens=int(usage.get("output_tokens", 0)),
        top_logprobs=top,
        attempts=attempts,
    )


def _to_cache(c: Completion) -> dict[str, Any]:
    return {
        "text": c.text,
        "model": c.model,
        "prompt_tokens": c.prompt_tokens,
        "completion_tokens": c.completion_tokens,
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
        cached=True,
        top_logprobs=None
        if top is None
        else [[TokenLogprob(str(t), float(lp)) for t, lp in pos] for pos in top],
        attempts=0,
    )
