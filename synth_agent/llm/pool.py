"""Several OpenAI-compatible endpoints behind one :class:`~synth_agent.llm.base.ChatBackend`.

A self-hosted judge usually means a few GPU servers (vLLM/SGLang replicas),
any of which may be slow, restarting or broken. :class:`EndpointPool` makes
them look like one endpoint to the engine, judge and reranker:

* **least-outstanding-requests** balancing weighted by capacity: a request goes
  to the member with the fewest requests in flight per unit of weight (default
  weight = the member's ``max_concurrency``), so a slow replica automatically
  gets less work;
* **failover**: a request that fails on one member (after that member's own,
  deliberately few, retries) is re-sent to another; each logical request is
  answered exactly once or fails with a clear error, never silently dropped;
* a **circuit breaker** per member: ``closed`` -> ``open`` after
  ``failure_threshold`` consecutive failures (or a failed health check) ->
  ``half_open`` after ``cooldown`` (one real request is let through as a probe)
  -> ``closed`` when the probe succeeds;
* periodic async **health checks** (``GET /v1/models`` with a bounded timeout)
  that eject dead servers without spending user requests on them;
* a **shared cache** for temperature-0 calls keyed without the member's URL, so
  failing over to another replica cannot change an answer already given.

Each member keeps its own adaptive concurrency limiter and rate limit (those of its
:class:`~synth_agent.llm.client.LLMClient`): a member's weight is, unless set explicitly,
its *current* adaptive limit, so a replica that turns out to serve fewer requests at once
gets proportionally fewer. All state is on the instance.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from synth_agent.llm.base import ChatMessage, Completion, LLMStats
from synth_agent.llm.cache import ResponseCache, cache_key, resolve_cache
from synth_agent.llm.client import (
    EndpointConfig,
    LLMClient,
    _looks_like_json,
    cached_single_flight,
    parse_structured,
    parses_as,
)
from synth_agent.llm.errors import InvalidRequestError, LLMError, UnavailableError, UnparseableResponseError

T = TypeVar("T", bound=BaseModel)
BreakerState = Literal["closed", "open", "half_open"]

ENV_ENDPOINTS = "SYNTH_AGENT_JUDGE_ENDPOINTS"

logger = logging.getLogger(__name__)

__all__ = [
    "ENV_ENDPOINTS",
    "BreakerState",
    "EndpointPool",
    "EndpointStatus",
    "PoolConfig",
    "PoolCounters",
    "PoolEndpoint",
]


# ------------------------------------------------------------------ configuration


class PoolEndpoint(BaseModel):
    """One member of a pool. Unset fields take the pool-wide defaults of :class:`PoolConfig`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    base_url: str = Field(min_length=1, description="OpenAI-compatible base URL, ending in /v1")
    model: str | None = None
    api_key: str | None = None
    max_concurrency: int = Field(default=16, ge=1, description="ceiling of the member's adaptive limit")
    adaptive_concurrency: bool = True
    weight: float | None = Field(
        default=None, gt=0, description="relative capacity; default = the member's current concurrency limit"
    )
    rate_limit: float = Field(default=0.0, ge=0)
    timeout: float = Field(default=60.0, gt=0)
    max_retries: int | None = Field(default=None, ge=0, description="default: PoolConfig.member_max_retries")
    context_length: int | None = Field(default=None, ge=1, description="the model's window; default: as the server states")
    structured_output: Literal["json_object", "json_schema", "json_object_schema"] = "json_object"


class PoolConfig(BaseModel):
    """A pool as written in a JSON/TOML file or ``SYNTH_AGENT_JUDGE_ENDPOINTS``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    endpoints: list[PoolEndpoint] = Field(min_length=1)
    model: str = "sim"
    api_key: str = "sim"
    member_max_retries: int = Field(
        default=1, ge=0, description="retries inside a member before failing over (keep low: failover is faster)"
    )
    health_interval: float = Field(default=5.0, ge=0, description="seconds between health checks; 0 = none")
    health_timeout: float = Field(default=2.0, gt=0)
    failure_threshold: int = Field(default=3, ge=1, description="consecutive failures that open the breaker")
    cooldown: float = Field(default=5.0, ge=0, description="seconds an open breaker waits before a probe")
    max_attempts: int | None = Field(default=None, ge=1, description="members tried per request; default 2 x size")
    unavailable_timeout: float = Field(
        default=30.0, ge=0, description="how long a request waits for any member to become usable"
    )

    @field_validator("endpoints", mode="before")
    @classmethod
    def _urls_as_endpoints(cls, v: Any) -> Any:
        if isinstance(v, list):
            return [{"base_url": x} if isinstance(x, str) else x for x in v]
        return v

    @classmethod
    def from_file(cls, path: str | Path, **defaults: Any) -> PoolConfig:
        """Read a ``.json`` or ``.toml`` pool file (a bare JSON list of URLs/endpoints also works)."""
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise FileNotFoundError(f"pool config {p} does not exist") from None
        suffix = p.suffix.lower()
        if suffix in (".yaml", ".yml"):
            raise ValueError(f"{p}: YAML pool files are not supported (PyYAML is not installed); use JSON or TOML")
        try:
            data: Any = tomllib.loads(text) if suffix == ".toml" else json.loads(text)
        except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
            kind = "TOML" if suffix == ".toml" else "JSON"
            raise ValueError(f"{p} is not valid {kind}: {e}") from e
        return cls._build(data, defaults, source=str(p))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **defaults: Any) -> PoolConfig:
        """From ``SYNTH_AGENT_JUDGE_ENDPOINTS``: comma-separated base URLs or a JSON list.

        The model and key default to ``SYNTH_AGENT_MODEL`` / ``OPENAI_API_KEY`` when set.
        """
        env = os.environ if env is None else env
        raw = (env.get(ENV_ENDPOINTS) or "").strip()
        if not raw:
            raise ValueError(
                f"{ENV_ENDPOINTS} is not set; set it to comma-separated base URLs "
                "(e.g. http://gpu1:8000/v1,http://gpu2:8000/v1) or a JSON list of endpoints"
            )
        if raw.startswith("["):
            try:
                data: Any = json.loads(raw)
            except json.JSONDecodeError as e:
                raise ValueError(f"{ENV_ENDPOINTS} looks like JSON but does not parse: {e}") from e
        else:
            data = [u.strip() for u in raw.split(",") if u.strip()]
        env_defaults = {k: env[v] for k, v in (("model", "SYNTH_AGENT_MODEL"), ("api_key", "OPENAI_API_KEY")) if env.get(v)}
        return cls._build(data, {**env_defaults, **defaults}, source=ENV_ENDPOINTS)

    @classmethod
    def _build(cls, data: Any, defaults: Mapping[str, Any], *, source: str) -> PoolConfig:
        if isinstance(data, list):
            data = {"endpoints": data}
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected an object with 'endpoints' or a list of endpoints")
        try:
            return cls.model_validate({**defaults, **data})
        except ValidationError as e:
            raise ValueError(f"{source}: invalid pool config: {e}") from e

    def endpoint_configs(self) -> list[EndpointConfig]:
        return [
            EndpointConfig(
                base_url=ep.base_url,
                api_key=ep.api_key or self.api_key,
                model=ep.model or self.model,
                max_concurrency=ep.max_concurrency,
                adaptive_concurrency=ep.adaptive_concurrency,
                rate_limit=ep.rate_limit,
                timeout=ep.timeout,
                max_retries=self.member_max_retries if ep.max_retries is None else ep.max_retries,
                context_length=ep.context_length,
                structured_output=ep.structured_output,
            )
            for ep in self.endpoints
        ]


# ------------------------------------------------------------------ state and snapshots


@dataclass(frozen=True)
class EndpointStatus:
    """A snapshot of one member (for dashboards, /metrics and tests)."""

    base_url: str
    model: str
    state: BreakerState
    weight: float
    in_flight: int
    served: int
    failures: int
    consecutive_failures: int
    ejections: int
    readmissions: int
    healthy: bool | None
    last_error: str
    concurrency: int = 0
    """Requests the member's limiter allows in flight now (its adaptive limit)."""


@dataclass(frozen=True)
class PoolCounters:
    """Logical requests: ``issued == answered + failed + cancelled + in progress``; cache hits never reach a member."""

    issued: int
    answered: int
    failed: int
    cancelled: int
    failovers: int
    cache_hits: int


@dataclass
class _Member:
    client: LLMClient
    fixed_weight: float | None
    index: int
    state: BreakerState = "closed"
    in_flight: int = 0
    served: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    opened_at: float = 0.0
    probing: bool = False
    ejections: int = 0
    readmissions: int = 0
    healthy: bool | None = None
    last_error: str = ""

    @property
    def base_url(self) -> str:
        return self.client.config.base_url

    @property
    def weight(self) -> float:
        """Relative capacity: as configured, else the member's current (adaptive) concurrency limit."""
        return self.fixed_weight if self.fixed_weight is not None else float(self.client.concurrency)


class _LoopBound:
    """Per-event-loop parts: futures, events, tasks and HTTP connections cannot cross loops."""

    def __init__(self, health_timeout: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.inflight: dict[str, asyncio.Future[Completion]] = {}
        self.changed = asyncio.Event()
        self.http = httpx.AsyncClient(timeout=health_timeout)
        self.health_task: asyncio.Task[None] | None = None

    def notify(self) -> None:
        """Wake every request waiting for a usable member (broadcast by replacing the event)."""
        self.changed.set()
        self.changed = asyncio.Event()




# ------------------------------------------------------------------ the pool


class EndpointPool:
    """A :class:`ChatBackend` over several :class:`LLMClient` members; see the module docstring.

    Build it from clients (give members ``cache=False`` and few retries: the pool
    caches and fails over itself), or with :meth:`from_config`, :meth:`from_file`
    or :meth:`from_env`. Background health checks start with the first request
    (or :meth:`start`) and stop with :meth:`aclose`.

        >>> import asyncio
        >>> from synth_agent.sim.server import SimEndpoint
        >>> async def ask(urls: list[str]) -> list[str]:
        ...     pool = EndpointPool([LLMClient(EndpointConfig(base_url=u, model="sim", max_retries=0), cache=False)
        ...                          for u in urls])
        ...     try:
        ...         await asyncio.gather(*(pool.complete([{"role": "user", "content": f"question {i}"}])
        ...                                for i in range(8)))
        ...         return [s.state for s in pool.status()]
        ...     finally:
        ...         await pool.aclose()
        >>> with SimEndpoint() as a, SimEndpoint() as b:
        ...     asyncio.run(ask([a.base_url, b.base_url]))
        ['closed', 'closed']
    """

    def __init__(
        self,
        members: Sequence[LLMClient],
        *,
        weights: Sequence[float | None] | None = None,
        cache: ResponseCache | bool = True,
        model: str | None = None,
        health_interval: float = 5.0,
        health_timeout: float = 2.0,
        failure_threshold: int = 3,
        cooldown: float = 5.0,
        max_attempts: int | None = None,
        unavailable_timeout: float = 30.0,
        structured_retries: int = 2,
    ) -> None:
        if not members:
            raise ValueError("EndpointPool needs at least one endpoint")
        urls = [m.config.base_url.rstrip("/") for m in members]
        if len(set(urls)) != len(urls):
            raise ValueError(f"EndpointPool endpoints must be distinct, got {urls}")
        if weights is not None and (
            len(weights) != len(members) or any(w is not None and w <= 0 for w in weights)
        ):
            raise ValueError("weights must give one positive number (or None: adaptive) per endpoint")
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        self._members = [
            _Member(c, float(w) if (w := weights[i] if weights is not None else None) is not None else None, i)
            for i, c in enumerate(members)
        ]
        names = sorted({m.model for m in members})
        self.model = model or "|".join(names)
        self.cache: ResponseCache | None = resolve_cache(cache)
        self.health_interval = health_interval
        self.health_timeout = health_timeout
        self.failure_threshold = failure_threshold
        self.cooldown = cooldown
        self.max_attempts = max_attempts or max(2, 2 * len(members))
        self.unavailable_timeout = unavailable_timeout
        self.structured_retries = structured_retries
        self._own = LLMStats()  # pool-level cache hits; member stats hold everything else
        self._issued = self._answered = self._failed = self._cancelled = self._failovers = 0
        self._bound: _LoopBound | None = None

    # -------------------------------------------------------------- construction

    @classmethod
    def from_config(cls, config: PoolConfig, *, cache: ResponseCache | bool = True) -> EndpointPool:
        clients = [LLMClient(c, cache=False) for c in config.endpoint_configs()]
        weights = [ep.weight for ep in config.endpoints]
        return cls(
            clients,
            weights=weights,
            cache=cache,
            model=config.model if all(ep.model is None for ep in config.endpoints) else None,
            health_interval=config.health_interval,
            health_timeout=config.health_timeout,
            failure_threshold=config.failure_threshold,
            cooldown=config.cooldown,
            max_attempts=config.max_attempts,
            unavailable_timeout=config.unavailable_timeout,
        )

    @classmethod
    def from_file(cls, path: str | Path, *, cache: ResponseCache | bool = True, **defaults: Any) -> EndpointPool:
        return cls.from_config(PoolConfig.from_file(path, **defaults), cache=cache)

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, *, cache: ResponseCache | bool = True, **defaults: Any
    ) -> EndpointPool:
        return cls.from_config(PoolConfig.from_env(env, **defaults), cache=cache)

    # -------------------------------------------------------------- introspection

    @property
    def members(self) -> list[LLMClient]:
        return [m.client for m in self._members]

    @property
    def stats(self) -> LLMStats:
        """Combined per-call-site counters of every member plus the pool's own cache hits (a fresh copy)."""
        out = LLMStats()
        for source in [*(m.client.stats for m in self._members), self._own]:
            for site, s in source.by_site.items():
                out.site(site).add(s)
        return out

    @property
    def context_length(self) -> int | None:
        """The smallest context window any member knows of (a prompt must fit wherever it goes)."""
        known = [n for m in self._members if (n := m.client.context_length)]
        return min(known) if known else None

    def note(self, call_site: str, counter: Literal["unparseable", "trimmed"], n: int = 1) -> None:
        """Count at a call site in the pool's own counters (``stats`` is a fresh copy): see ``llm.budget.note``."""
        site = self._own.site(call_site)
        setattr(site, counter, getattr(site, counter) + n)

    def status(self) -> list[EndpointStatus]:
        return [
            EndpointStatus(
                base_url=m.base_url,
                model=m.client.model,
                state=m.state,
                weight=m.weight,
                in_flight=m.in_flight,
                served=m.served,
                failures=m.failures,
                consecutive_failures=m.consecutive_failures,
                ejections=m.ejections,
                readmissions=m.readmissions,
                healthy=m.healthy,
                last_error=m.last_error,
                concurrency=m.client.concurrency,
            )
            for m in self._members
        ]

    @property
    def counters(self) -> PoolCounters:
        hits = sum(s.cache_hits for s in self._own.by_site.values())
        return PoolCounters(self._issued, self._answered, self._failed, self._cancelled, self._failovers, hits)

    def as_dict(self) -> dict[str, Any]:
        return {
            "counters": asdict(self.counters),
            "endpoints": [asdict(s) for s in self.status()],
            "stats": self.stats.as_dict(),
        }

    def __repr__(self) -> str:
        return f"EndpointPool({', '.join(f'{m.base_url}[{m.state}]' for m in self._members)})"

    # -------------------------------------------------------------- lifecycle

    def _resources(self) -> _LoopBound:
        loop = asyncio.get_running_loop()
        if self._bound is None or self._bound.loop is not loop:
            self._bound = _LoopBound(self.health_timeout)
        return self._bound

    async def start(self) -> EndpointPool:
        """Check every member once now, then keep checking every ``health_interval`` seconds."""
        res = self._resources()
        if self.health_interval > 0 and (res.health_task is None or res.health_task.done()):
            await self.check_health()
            res.health_task = asyncio.create_task(self._health_loop(checked=True), name="endpoint-pool-health")
        return self

    def _ensure_health_task(self, res: _LoopBound) -> None:
        if self.health_interval > 0 and res.health_task is None:
            res.health_task = asyncio.create_task(self._health_loop(checked=False), name="endpoint-pool-health")

    async def aclose(self) -> None:
        bound, self._bound = self._bound, None
        if bound is not None and bound.loop is asyncio.get_running_loop():
            if bound.health_task is not None:
                bound.health_task.cancel()
                await asyncio.gather(bound.health_task, return_exceptions=True)
            await bound.http.aclose()
        await asyncio.gather(*(m.client.aclose() for m in self._members))

    async def __aenter__(self) -> EndpointPool:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -------------------------------------------------------------- health

    async def check_health(self) -> dict[str, bool]:
        """One round of health checks (``GET {base_url}/models``); returns base_url -> healthy."""
        res = self._resources()
        results = await asyncio.gather(*(self._check_one(res, m) for m in self._members))
        res.notify()
        return {m.base_url: ok for m, ok in zip(self._members, results, strict=True)}

    async def _check_one(self, res: _LoopBound, m: _Member) -> bool:
        url = m.base_url.rstrip("/") + "/models"
        try:
            r = await res.http.get(
                url, headers={"Authorization": f"Bearer {m.client.config.api_key}"}, timeout=self.health_timeout
            )
            ok, why = r.status_code == 200, f"health check: HTTP {r.status_code} from {url}"
        except httpx.HTTPError as e:
            ok, why = False, f"health check: {type(e).__name__} on {url}"
        now = time.monotonic()
        m.healthy = ok
        if not ok:
            m.last_error = why
            if m.state != "open":
                self._open(m, now)
            else:
                m.opened_at = now  # still down: keep it out for another cooldown
        elif m.state == "open" and now - m.opened_at >= self.cooldown:
            m.state = "half_open"  # the next request is the probe that closes it
        return ok

    async def _health_loop(self, *, checked: bool) -> None:
        if checked:
            await asyncio.sleep(self.health_interval)
        while True:
            try:
                await self.check_health()
            except Exception:  # noqa: BLE001 - a checker bug must not kill the pool
                logger.exception("endpoint pool health check failed")
            await asyncio.sleep(self.health_interval)

    # -------------------------------------------------------------- breaker

    def _open(self, m: _Member, now: float) -> None:
        m.state = "open"
        m.opened_at = now
        m.ejections += 1
        logger.warning("endpoint %s ejected from pool: %s", m.base_url, m.last_error)

    def _pick(self, tried: Sequence[_Member], now: float) -> tuple[_Member, bool] | None:
        usable: list[tuple[_Member, bool]] = []
        for m in self._members:
            if m.state == "open" and now - m.opened_at >= self.cooldown:
                m.state = "half_open"
            if m.state == "closed":
                usable.append((m, False))
            elif m.state == "half_open" and not m.probing:
                usable.append((m, True))
        if not usable:
            return None
        # untried first, then least outstanding per unit of capacity, then least served (spreads idle load)
        m, probe = min(
            usable,
            key=lambda u: (u[0] in tried, u[0].in_flight / u[0].weight, u[0].served / u[0].weight, u[0].index),
        )
        if probe:
            m.probing = True
        m.in_flight += 1
        return m, probe

    def _next_usable_in(self, now: float) -> float | None:
        waits = [self.cooldown - (now - m.opened_at) for m in self._members if m.state == "open"]
        return max(0.0, min(waits)) if waits else None

    async def _acquire(self, res: _LoopBound, tried: Sequence[_Member]) -> tuple[_Member, bool]:
        deadline = time.monotonic() + self.unavailable_timeout
        while True:
            now = time.monotonic()
            got = self._pick(tried, now)
            if got is not None:
                return got
            left = deadline - now
            if left <= 0:
                states = "; ".join(f"{m.base_url}: {m.state} ({m.last_error[:160] or 'no error'})" for m in self._members)
                raise UnavailableError(
                    f"no usable endpoint in the pool for {self.unavailable_timeout:g}s ({states}). "
                    "Check that the judge servers are up (GET <base_url>/models), or raise unavailable_timeout.",
                    endpoint="pool",
                )
            wake = min(left, 0.25, self._next_usable_in(now) or left)
            try:
                await asyncio.wait_for(res.changed.wait(), timeout=max(wake, 0.001))
            except TimeoutError:
                pass

    def _release(self, res: _LoopBound, m: _Member, probe: bool, ok: bool | None, error: str = "") -> None:
        """Book one attempt's outcome: ``ok`` None means neither success nor endpoint failure."""
        now = time.monotonic()
        m.in_flight -= 1
        if probe:
            m.probing = False
        if ok is True:
            m.served += 1
            m.consecutive_failures = 0
            if m.state == "half_open":
                m.state = "closed"
                m.readmissions += 1
                logger.info("endpoint %s re-admitted to pool", m.base_url)
        elif ok is False:
            m.failures += 1
            m.consecutive_failures += 1
            m.last_error = error
            if m.state == "half_open" or (m.state == "closed" and m.consecutive_failures >= self.failure_threshold):
                self._open(m, now)
        elif probe and m.state == "half_open":
            pass  # the probe told us nothing; the next request probes again
        res.notify()

    # -------------------------------------------------------------- ChatBackend

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
        """Answer on the best usable member, failing over on errors; temperature 0 is cached pool-wide.

        ``schema`` goes to the member, which sends it in its own ``structured_output`` dialect."""
        kwargs: dict[str, Any] = {
            "temperature": temperature,
            "max_tokens": max_tokens,
            "json_mode": json_mode,
            "logprobs": logprobs,
            "seed": seed,
            "extra": extra,
            "schema": schema,
        }
        validate = _looks_like_json if json_mode else None
        return await self._complete(messages, kwargs, call_site, validate, bypass_cache=False)

    async def structured(
        self,
        messages: Sequence[ChatMessage],
        schema: type[T],
        *,
        call_site: str = "default",
        temperature: float = 0.0,
        max_tokens: int | None = None,
    ) -> T:
        """Answer as a ``schema`` instance; garbage is re-asked (bypassing the cache), then LLMError."""

        valid = parses_as(schema)
        kwargs: dict[str, Any] = {
            "temperature": temperature,
            "max_tokens": max_tokens,
            "json_mode": True,
            "logprobs": None,
            "seed": None,
            "extra": None,
            "schema": schema.model_json_schema(),
        }
        last: ValueError | None = None
        for attempt in range(self.structured_retries + 1):
            comp = await self._complete(messages, kwargs, call_site, valid, bypass_cache=attempt > 0)
            try:
                return parse_structured(comp.text, schema)
            except ValueError as e:
                last = e
                self._own.site(call_site).unparseable += 1
        raise UnparseableResponseError(
            f"the pool's endpoints gave no answer readable as {schema.__name__} at call site {call_site!r} "
            f"after {self.structured_retries + 1} tries; last: {last}. Try a stronger judge model.",
            endpoint="pool",
            call_site=call_site,
            cause=last,
        )

    async def _complete(
        self,
        messages: Sequence[ChatMessage],
        kwargs: dict[str, Any],
        call_site: str,
        validate: Callable[[str], bool] | None,
        *,
        bypass_cache: bool,
    ) -> Completion:
        res = self._resources()
        self._ensure_health_task(res)
        if kwargs["temperature"] != 0 or self.cache is None:
            return await self._dispatch(res, messages, kwargs, call_site)
        key = cache_key(model=self.model, base_url="pool", messages=messages, **kwargs)
        site = self._own.site(call_site)
        return await cached_single_flight(
            self.cache, res.inflight, key, lambda: self._dispatch(res, messages, kwargs, call_site),
            on_hit=lambda: setattr(site, "cache_hits", site.cache_hits + 1),
            validate=validate, bypass_cache=bypass_cache,
        )

    async def _dispatch(
        self, res: _LoopBound, messages: Sequence[ChatMessage], kwargs: dict[str, Any], call_site: str
    ) -> Completion:
        """One logical request: at most ``max_attempts`` members, each failure re-sent elsewhere."""
        self._issued += 1
        tried: list[_Member] = []
        last: LLMError | None = None
        try:
            for attempt in range(self.max_attempts):
                m, probe = await self._acquire(res, tried)
                if attempt:
                    self._failovers += 1
                try:
                    comp = await m.client.complete(messages, call_site=call_site, **kwargs)
                except LLMError as e:
                    if isinstance(e, InvalidRequestError):  # every member would refuse it: no failover
                        self._release(res, m, probe, None)
                        raise
                    self._release(res, m, probe, False, str(e)[:300])
                    tried.append(m)
                    last = e
                    continue
                except BaseException:
                    self._release(res, m, probe, None)
                    raise
                self._release(res, m, probe, True)
                self._answered += 1
                return comp
        except asyncio.CancelledError:
            self._cancelled += 1
            raise
        except BaseException:
            self._failed += 1
            raise
        self._failed += 1
        assert last is not None  # the loop only ends without an answer after a failure
        raise last.with_context(  # keeps the last failure's type (timeout, rate limited ...)
            f"request at call site {call_site!r} failed on {len({id(m) for m in tried})} endpoint(s) "
            f"in {self.max_attempts} attempts; last error: {last}",
            endpoint="pool",
            call_site=call_site,
            attempts=self.max_attempts,
        ) from last
