"""The OpenAI-compatible personalization proxy: point any OpenAI client at it and it speaks to each user.

``POST /v1/chat/completions`` reads the user from the body's ``user`` field (or the
``X-Synth-User`` header, which pins it), prepends that user's persona as a system
message (a cached store read, never an extra LLM call) and forwards the request to
the upstream, streaming included. Around it: votes, A/B pairs, reranking, judging,
persona read/export/forget, health and Prometheus metrics. API keys map to tenants
and every read and write is namespaced by the caller's tenant.

The routes live in :mod:`synth_agent.proxy.routes` (one router per resource), share
the auth dependency of :mod:`synth_agent.proxy.deps` and the request/response models
of :mod:`synth_agent.proxy.schemas`; :mod:`synth_agent.proxy.guard` stands in front of
them (request ids, the 500 boundary, body limits). Everything lives on the app built
by :func:`create_app` (``app.state.proxy``), so several proxies can run in one process.
The route reference is ``docs/api.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from langchain_core.runnables import RunnableLambda
from langgraph.store.base import BaseStore
from langgraph.types import Checkpointer
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.requests import Request

from graphs.chat import Personalizer, TenantMemories
from graphs.synthesis import SynthesisRunner, build_synthesis_graph, open_checkpointer
from synth_agent.config import Settings
from synth_agent.engine.synthesize import FitConfig
from synth_agent.llm.base import ChatBackend
from synth_agent.proxy.auth import AuthThrottle, KeyRing, RateLimiter
from synth_agent.proxy.errors import error_body, error_type, install_error_handlers
from synth_agent.proxy.guard import BodyGuard, RequestGuard, request_id
from synth_agent.proxy.metrics import MetricsMiddleware, ProxyMetrics
from synth_agent.proxy.routes import judging, openai, ops, users, votes
from synth_agent.proxy.routes.ops import health
from synth_agent.proxy.schemas import Limits, api_models
from synth_agent.proxy.settings import ProxySettings
from synth_agent.proxy.state import Caller, ProxyState
from synth_agent.proxy.upstream import Upstream, UpstreamConfig
from synth_agent.proxy.worker import StorePoller
from synth_agent.scheduler import SynthesisPolicy, SynthesisScheduler

__all__ = ["Caller", "ProxyApp", "ProxyState", "create_app"]

log = logging.getLogger("synth_agent.proxy")


def _no_agent(_: Any) -> Any:
    raise RuntimeError("the proxy generates through its upstream, not through a wrapped agent")


def _exact_openapi(app: FastAPI) -> Any:
    """The OpenAPI schema without FastAPI's generic 422 entries: validation errors are 400s here."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            for path in schema.get("paths", {}).values():
                for op in path.values():
                    if isinstance(op, dict):
                        op.get("responses", {}).pop("422", None)
            comps = schema.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                comps.pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    return openapi


class ProxyApp(FastAPI):
    """The proxy's FastAPI app, with ``GET /healthz`` answered at the outermost layer.

    A liveness probe must stay fast when the event loop is saturated by writes. Through the
    full stack (FastAPI's telemetry, Starlette's error and body-limit layers, the request
    guard, metrics, the body guard, routing and dependency solving) one probe costs about as
    much event-loop time as a vote; here it is the store's in-memory health and one small JSON
    answer. It still carries ``X-Request-ID`` and is counted in ``/metrics`` under ``/healthz``.
    The route stays declared (OpenAPI; ``HEAD`` and other methods take the normal path).
    """

    _direct_routes: dict[str, APIRoute] | None = None  # path -> route answered past FastAPI's layers (POST)
    _direct_stacks: dict[str, Any] | None = None

    def serve_directly(self, route: APIRoute) -> None:
        """Answer ``POST`` on ``route``'s path through the user middleware and the exception handlers only.

        For the proxy's hottest requests (``POST /v1/votes``, one per vote, and ``POST /v1/chat/completions``,
        since 2026-12-02): between the user
        middleware and the route's handler FastAPI and Starlette add their error, telemetry,
        body-limit, exception and exit-stack layers, route matching over every included router,
        and ``request_response``'s own exception wrapper and exit stacks — about a third of the
        event loop's time per vote under a write burst (py-spy, 2026-12-01). This path keeps
        what the vote route relies on: every ``user_middleware`` in order (``RequestGuard``:
        request id and the 500 boundary; ``MetricsMiddleware``: the route label; ``BodyGuard``:
        body limits, strict JSON), Starlette's ``ExceptionMiddleware`` with the app's handlers
        (``ProxyError``, validation and HTTP errors answer as on every route), and the scope keys
        the router sets (``app``, ``router``, ``route``, ``endpoint``, ``path_params``). The
        route's handler must not need FastAPI's solver (no dependencies with ``yield``, no files):
        :func:`~synth_agent.proxy.routes.common.direct_json_route` routes solve their own. The full stack is
        still taken when FastAPI's native OpenTelemetry is enabled, with an app-wide
        ``max_body_size`` or a ``root_path`` (so those keep their behaviour), and for other methods.
        """
        if getattr(route, "max_body_size", None) is not None or getattr(route, "dependencies", None):
            return  # a route-level body limit or dependency is FastAPI's to apply: the full stack
        self._direct_routes = {**(self._direct_routes or {}), route.path: route}
        self._direct_stacks = {}

    def _build_direct_stack(self, route: APIRoute) -> Any:
        handler = route.get_route_handler()
        router = self.router

        async def endpoint(scope: Any, receive: Any, send: Any) -> None:
            scope["app"] = self
            scope.setdefault("router", router)
            scope["endpoint"] = route.endpoint
            scope["path_params"] = {}
            scope["route"] = route
            response = await handler(Request(scope, receive, send))
            await response(scope, receive, send)

        handlers = {k: v for k, v in self.exception_handlers.items() if k not in (500, Exception)}
        app: Any = ExceptionMiddleware(endpoint, handlers=handlers, debug=self.debug)
        for cls, args, kwargs in reversed(self.user_middleware):
            app = cls(app, *args, **kwargs)
        return app

    def _direct(self, scope: Any) -> APIRoute | None:
        routes = self._direct_routes
        if routes is None or scope["method"] != "POST" or (route := routes.get(scope["path"])) is None:
            return None
        if scope.get("root_path") or self.root_path or self.max_body_size is not None or _native_telemetry_on(self):
            return None
        return route

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            if scope["path"] == "/healthz" and scope["method"] == "GET":
                await _answer_health(self.state.proxy, scope, send)
                return
            if (route := self._direct(scope)) is not None:
                stacks = self._direct_stacks
                assert stacks is not None
                if (stack := stacks.get(route.path)) is None:
                    stack = stacks[route.path] = self._build_direct_stack(route)
                if getattr(route, "turn_budget", False):
                    await self.state.proxy.turns.share()  # a vote write: within this loop turn's budget
                await stack(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def _native_telemetry_on(app: FastAPI) -> bool:
    """FastAPI's own test for its native OpenTelemetry (an unknown FastAPI: assume it is on, take the full path)."""
    native = getattr(app, "_native_telemetry", None)
    return native is None or bool(native.enabled())


async def _answer_health(st: ProxyState, scope: Any, send: Any) -> None:
    start = time.perf_counter()
    rid = request_id(scope)
    try:
        status, body = await health(st)
    except Exception as exc:  # the same boundary RequestGuard is for the other routes
        log.error("unhandled error on GET /healthz (request %s)", rid, exc_info=exc)
        status, body = 500, error_body(f"internal error; quote request id {rid} when reporting it", type=error_type(500),
                                       code="internal_error", request_id=rid)
    payload = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
        (b"x-request-id", rid.encode())]})
    await send({"type": "http.response.body", "body": payload})
    st.metrics.requests.labels("/healthz", "GET", str(status)).inc()
    st.metrics.latency.labels("/healthz", "GET").observe(time.perf_counter() - start)


def create_app(
    settings: Settings | None = None,
    proxy: ProxySettings | None = None,
    *,
    store: BaseStore | None = None,
    llm: ChatBackend | None = None,
    keys: KeyRing | None = None,
    checkpointer: Checkpointer | None = None,
    fit_config: FitConfig | None = None,
    policy: SynthesisPolicy | None = None,
    upstream_trace_configs: Sequence[aiohttp.TraceConfig] = (),
) -> FastAPI:
    """Build the proxy app. Nothing is opened until the ASGI lifespan starts.

    ``settings``: store home, Chroma, and the judge/synthesis LLM endpoint (default: env).
    ``proxy``: upstream, auth, limits (default: env). ``store``/``llm``/``checkpointer``
    override what ``settings`` would open (tests, embedding the proxy in a larger app).
    ``keys``: the key ring (default: ``SYNTH_AGENT_API_KEYS`` + ``--keys-file``); refused if
    empty unless ``proxy.no_auth``. ``upstream_trace_configs``: aiohttp request tracing on the
    upstream session (what the upstream was sent, timings); given any, the upstream goes through
    aiohttp whatever ``proxy.upstream_transport`` says (the traces hook aiohttp's machinery).
    """
    settings = settings or Settings()
    proxy = proxy or ProxySettings()
    if keys is None and not proxy.no_auth:
        keys = KeyRing.load(env_spec=proxy.api_keys, path=proxy.keys_file)
        if not len(keys):
            raise ValueError(
                "no API keys configured: set SYNTH_AGENT_API_KEYS=tenant:key, pass --keys-file, "
                "or use --no-auth for local development"
            )
    if proxy.no_auth:
        keys = None
    if proxy.queue and store is None and not settings.chroma_host:
        raise ValueError("the scale-out mode (queue) needs the shared Chroma server: set CHROMA_HOST; "
                         "see docs/deploy.md")
    metrics = ProxyMetrics()
    models = api_models(Limits(
        max_content_chars=settings.max_content_chars, max_messages=proxy.max_messages,
        max_candidates=proxy.max_candidates, max_batch_votes=proxy.max_batch_votes,
    ))
    state = ProxyState(
        settings, proxy, keys, RateLimiter(proxy.key_rate_limit, proxy.key_burst),
        AuthThrottle(proxy.auth_failure_rate, proxy.auth_failure_burst), metrics, models,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            opened: BaseStore
            if store is not None:
                opened = store
            else:
                from synth_agent.services import open_store

                # the embedding model loads now, not on the first vote write (flat write latency)
                opened = await asyncio.to_thread(open_store, settings, server=True, warm=True, queue=proxy.queue)
                stack.push_async_callback(asyncio.to_thread, opened.close)  # type: ignore[attr-defined]  # last out: stops its Chroma
            state.store = opened
            memories = TenantMemories(opened)
            if llm is not None:
                state.llm = llm
            else:
                from synth_agent.services import open_llm

                state.llm = open_llm(settings)
                stack.push_async_callback(state.llm.aclose)
            state.upstream = Upstream(
                UpstreamConfig(
                    base_url=proxy.upstream_base_url or settings.base_url,
                    api_key=proxy.upstream_api_key or settings.api_key,
                    timeout=proxy.upstream_timeout,
                    retries=proxy.upstream_retries,
                    backoff=proxy.upstream_backoff,
                    backoff_max=proxy.upstream_backoff_max,
                    transport=proxy.upstream_transport,
                ),
                on_retry=lambda _: metrics.upstream_retries.inc(),
                on_error=lambda kind: metrics.upstream_errors.labels(kind).inc(),
                trace_configs=upstream_trace_configs,
            )
            stack.push_async_callback(state.upstream.aclose)
            if proxy.queue:
                # Scale-out mode: fits run in `synth-agent worker --queue` processes; votes enqueue them.
                from synth_agent.scale.queue import QueueScheduler
                from synth_agent.scale.settings import ScaleSettings

                qs = QueueScheduler(proxy.queue, memories, policy or ScaleSettings().policy())
                await qs.open()
                stack.push_async_callback(qs.aclose, drain=True, drain_timeout=proxy.drain_timeout)
                state.scheduler = qs
            elif proxy.synthesis == "inline":
                cp = checkpointer
                if cp is None:
                    cp = await stack.enter_async_context(open_checkpointer(settings.home))
                state.checkpointer = cp
                graph = build_synthesis_graph(llm=state.llm, memory_for=memories, fit_config=fit_config,
                                              checkpointer=cp)
                state.scheduler = SynthesisScheduler(SynthesisRunner(graph, memories), memories, policy)
                stack.push_async_callback(state.scheduler.aclose, drain=True, drain_timeout=proxy.drain_timeout)
            state.personalizer = Personalizer(
                RunnableLambda(_no_agent), llm=state.llm, store=state.store, memory_for=memories,
                scheduler=state.scheduler, persona_ttl=proxy.persona_ttl,  # type: ignore[arg-type]
            )
            state.memories = memories
            if isinstance(state.scheduler, SynthesisScheduler):
                # Votes stored while no scheduler ran (crash, restart, other writers) get their check.
                state.poller = StorePoller(opened, memories, state.scheduler)
                stack.push_async_callback(state.poller.aclose)
                state.poller.start(proxy.poll_interval)
            metrics.watch(lambda: state.scheduler.stats if state.scheduler else None,
                          lambda: state.llm.stats if state.llm else None,
                          lambda: state.personalizer.lift if state.personalizer else None)
            try:
                yield
            finally:
                state.memories = state.personalizer = None

    app = ProxyApp(
        title="synth-agent proxy",
        version="1",
        description="OpenAI-compatible chat proxy that personalizes answers per user, plus vote, "
        "A/B, rerank, judge and persona endpoints. Errors use the OpenAI format; see docs/api.md.",
        lifespan=lifespan,
    )
    app.state.proxy = state
    install_error_handlers(app)
    # innermost first: the guard ends up outermost, around metrics and the body checks
    app.add_middleware(BodyGuard, limit=proxy.max_body_bytes, max_depth=proxy.max_json_depth)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(RequestGuard)
    for module in (openai, votes, judging, users, ops):
        module_router = module.router(models)
        app.include_router(module_router)
        for route in module_router.routes:
            if isinstance(route, APIRoute) and getattr(route, "serve_directly", False):
                app.serve_directly(route)
    app.openapi = _exact_openapi(app)  # type: ignore[method-assign]
    return app
