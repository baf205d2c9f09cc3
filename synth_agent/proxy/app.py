"""The OpenAI-compatible personalization proxy: point any OpenAI client at it and it speaks to each user.

``POST /v1/chat/completions`` reads the user from the body's ``user`` field (or the
``X-Synth-User`` header), prepends that user's persona as a system message (a cached
store read, never an extra LLM call) and forwards the request to the upstream,
streaming included. Around it: votes, A/B pairs, reranking, judging, persona
read/export/forget, health and Prometheus metrics. API keys map to tenants and every
read and write is namespaced by the caller's tenant.

Everything lives on the app built by :func:`create_app` (``app.state.proxy``), so
several proxies can run in one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal
from urllib.parse import unquote

import httpx
from fastapi import Body, Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from langchain_core.runnables import RunnableLambda
from langgraph.store.base import BaseStore
from langgraph.types import Checkpointer
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field

from graphs._common import erase_threads
from graphs.chat import Personalizer, TenantMemories, VoteError
from graphs.synthesis import SynthesisRunner, build_synthesis_graph, open_checkpointer, synthesis_thread_id
from synth_agent import prompts
from synth_agent.config import Settings
from synth_agent.engine.judge import Judge
from synth_agent.engine.rerank import rank
from synth_agent.engine.synthesize import FitConfig
from synth_agent.export import export_profile
from synth_agent.ingest import parse_vote
from synth_agent.llm.base import ChatBackend
from synth_agent.llm.client import LLMError
from synth_agent.models import Message, PersonaProfile, validate_user_id
from synth_agent.prompts import ParseError
from synth_agent.proxy.auth import ApiKey, KeyRing, RateLimiter
from synth_agent.proxy.errors import ProxyError, install_error_handlers
from synth_agent.proxy.metrics import MetricsMiddleware, ProxyMetrics
from synth_agent.proxy.settings import ProxySettings
from synth_agent.proxy.upstream import Upstream, UpstreamConfig
from synth_agent.proxy.worker import StorePoller
from synth_agent.scheduler import SynthesisPolicy, SynthesisScheduler

__all__ = ["Caller", "ProxyState", "create_app"]

log = logging.getLogger("synth_agent.proxy")

USER_HEADER = "x-synth-user"
TENANT_HEADER = "x-synth-tenant"
PERSONA_HEADER = "X-Synth-Persona-Version"
_CHAT_ROLES = {"system", "developer", "user", "assistant", "tool", "function"}
_BODY_METHODS = {"POST", "PUT", "PATCH"}


# ------------------------------------------------------------------ state


@dataclass
class Caller:
    """Who is calling: the tenant their key belongs to (``default`` in --no-auth mode)."""

    tenant: str
    key: ApiKey | None


@dataclass
class ProxyState:
    """Everything a request handler needs; built by the lifespan, kept on ``app.state.proxy``."""

    settings: Settings
    proxy: ProxySettings
    keys: KeyRing | None
    limiter: RateLimiter
    metrics: ProxyMetrics
    store: BaseStore | None = None
    memories: TenantMemories | None = None
    llm: ChatBackend | None = None
    upstream: Upstream | None = None
    personalizer: Personalizer | None = None
    scheduler: SynthesisScheduler | None = None
    poller: StorePoller | None = None
    checkpointer: Any = None
    background: set[asyncio.Task[Any]] = field(default_factory=set)

    def ready(self) -> tuple[TenantMemories, Personalizer, Upstream, ChatBackend]:
        if self.memories is None or self.personalizer is None or self.upstream is None or self.llm is None:
            raise ProxyError(503, "the proxy is starting up or shutting down; retry shortly", code="not_ready")
        return self.memories, self.personalizer, self.upstream, self.llm

    def notify_vote(self, tenant: str, user: str) -> None:
        if self.scheduler is not None:
            self.scheduler.notify_vote(tenant, user)


def _state(request: Request) -> ProxyState:
    return request.app.state.proxy  # type: ignore[no-any-return]


# ------------------------------------------------------------------ request models (also the /docs schema)


class _Flexible(BaseModel):
    """Unknown fields are forwarded to the upstream for generation (temperature, max_tokens ...)."""

    model_config = ConfigDict(extra="allow")


class ABRequest(_Flexible):
    user: str | None = Field(default=None, description="user id (or the X-Synth-User header)")
    model: str | None = Field(default=None, description="client model name (mapped like chat completions)")
    messages: list[dict[str, Any]] = Field(description="the conversation, OpenAI chat format")


class ABVoteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user: str | None = Field(default=None, description="user id (or the X-Synth-User header)")
    choice: Literal["a", "b", "A", "B"] = Field(description="the candidate the user picked")


class RerankRequest(_Flexible):
    user: str | None = None
    model: str | None = None
    messages: list[dict[str, Any]]
    candidates: list[str] | None = Field(default=None, description="answers to rank; generated when omitted")
    n: int | None = Field(default=None, ge=2, description="how many to generate when candidates are omitted")
    strategy: Literal["knockout", "round_robin"] = "knockout"


class JudgeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user: str | None = None
    messages: list[dict[str, Any]] = Field(description="the conversation both responses answer")
    a: str = Field(min_length=1)
    b: str = Field(min_length=1)


_CHAT_SCHEMA: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["model", "messages"],
                    "properties": {
                        "model": {"type": "string"},
                        "messages": {"type": "array", "items": {"type": "object"}},
                        "user": {"type": "string", "description": "personalize for this user"},
                        "stream": {"type": "boolean"},
                    },
                    "additionalProperties": True,
                }
            }
        },
    }
}


# ------------------------------------------------------------------ dependencies


async def authenticate(request: Request) -> Caller:
    """API key → tenant; per-key rate limit; an explicit ``X-Synth-Tenant`` must match the key's tenant."""
    st = _state(request)
    asked = request.headers.get(TENANT_HEADER)
    if st.keys is None:
        caller = Caller("default", None)
    else:
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        presented = token.strip() if scheme.lower() == "bearer" else request.headers.get("x-api-key", "")
        if not presented:
            raise ProxyError(
                401, "missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        key = st.keys.lookup(presented)
        if key is None:
            raise ProxyError(401, "invalid API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        retry = st.limiter.check(key)
        if retry is not None:
            st.metrics.rate_limited.inc()
            raise ProxyError(
                429, f"rate limit exceeded for this API key; retry after {retry}s",
                code="rate_limit_exceeded", headers={"Retry-After": str(retry)},
            )
        caller = Caller(key.tenant, key)
    if asked is not None and asked != caller.tenant:
        raise ProxyError(403, "this API key does not belong to the requested tenant", code="wrong_tenant")
    return caller


async def json_caller(request: Request, caller: Annotated[Caller, Depends(authenticate)]) -> Caller:
    """Authenticated, and the body is declared as JSON (checked after auth: strangers learn nothing)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise ProxyError(
            415, f"Content-Type must be application/json, got {ctype or 'none'!r}", code="unsupported_media_type"
        )
    return caller


AuthCaller = Annotated[Caller, Depends(authenticate)]
JsonCaller = Annotated[Caller, Depends(json_caller)]


# ------------------------------------------------------------------ helpers


def _user(raw: Any, *, param: str = "user") -> str:
    try:
        return validate_user_id(raw)
    except ValueError as exc:
        raise ProxyError(400, f"invalid user id: {exc}".replace("user_id", "user id"), param=param,
                         code="invalid_user") from None


def _header_user(request: Request) -> str | None:
    raw = request.headers.get(USER_HEADER)
    if raw is None:
        return None
    try:
        return unquote(raw, errors="strict")
    except UnicodeDecodeError:
        raise ProxyError(400, "X-Synth-User must be percent-encoded UTF-8", param=USER_HEADER,
                         code="invalid_user") from None


def _user_of(request: Request, body_user: Any, *, required: bool) -> str | None:
    """The header wins over the body field: a gateway can pin the user without touching bodies.

    Header values are ASCII, so the header is percent-decoded (UTF-8): send ``quote(user_id, safe="")``.
    """
    header = _header_user(request)
    if header is not None:
        return _user(header, param=USER_HEADER)
    if body_user is None:
        if required:
            raise ProxyError(400, "say which user: a 'user' field or an X-Synth-User header", param="user",
                             code="missing_user")
        return None
    if not isinstance(body_user, str):
        raise ProxyError(400, "user must be a string", param="user", code="invalid_user")
    return _user(body_user)


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type", "text") == "text")
    return ""


def _check_messages(messages: Any, limit: int) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise ProxyError(400, "messages must be a non-empty list of {role, content} objects", param="messages")
    if len(messages) > limit:
        raise ProxyError(400, f"too many messages: {len(messages)}; the limit is {limit}", param="messages",
                         code="too_many_messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ProxyError(400, f"messages[{i}] must be an object", param=f"messages[{i}]")
        if m.get("role") not in _CHAT_ROLES:
            raise ProxyError(400, f"messages[{i}].role must be one of {sorted(_CHAT_ROLES)}, got {m.get('role')!r}",
                             param=f"messages[{i}].role")
        c = m.get("content")
        if c is not None and not isinstance(c, str | list):
            raise ProxyError(400, f"messages[{i}].content must be a string or a list of parts",
                             param=f"messages[{i}].content")
    return messages


def _context(messages: list[dict[str, Any]], max_chars: int) -> list[Message]:
    """The conversation as the judge and vote store see it (text turns; tool turns dropped)."""
    out: list[Message] = []
    for i, m in enumerate(messages):
        role = {"developer": "system"}.get(m["role"], m["role"])
        if role not in ("system", "user", "assistant"):
            continue
        text = _text(m.get("content"))
        if not text.strip():
            continue
        if len(text) > max_chars:
            raise ProxyError(400, f"messages[{i}] has {len(text)} characters; the limit is {max_chars}",
                             param=f"messages[{i}].content")
        out.append(Message(role=role, content=text))
    if not any(m.role == "user" for m in out):
        raise ProxyError(400, "the conversation has no user message", param="messages")
    return out


def _with_persona(messages: list[dict[str, Any]], profile: PersonaProfile | None) -> list[dict[str, Any]]:
    if profile is None:
        return messages
    return [{"role": "system", "content": prompts.generation_system_prompt(profile.persona)}, *messages]


async def _persona(st: ProxyState, tenant: str, user: str | None) -> PersonaProfile | None:
    """Cached persona; a store hiccup degrades to an unpersonalized answer instead of an error."""
    if user is None:
        return None
    _, personalizer, _, _ = st.ready()
    try:
        return await personalizer.persona(tenant, user)
    except Exception:
        log.exception("could not read the persona of a user of tenant %r; answering without it", tenant)
        return None


def _upstream_error(resp: httpx.Response) -> Response:
    """Pass an upstream 4xx through, except auth failures, which are the proxy's problem, not the client's."""
    if resp.status_code in (401, 403):
        raise ProxyError(502, "the upstream refused the proxy's credentials; check SYNTH_AGENT_UPSTREAM_API_KEY",
                         code="upstream_auth")
    return Response(resp.content, status_code=resp.status_code,
                    media_type=resp.headers.get("content-type", "application/json"))


def _generation_body(st: ProxyState, req: _Flexible, messages: list[dict[str, Any]]) -> dict[str, Any]:
    model = getattr(req, "model", None) or st.proxy.default_model
    if not model:
        raise ProxyError(400, "model is required (or configure SYNTH_AGENT_DEFAULT_MODEL)", param="model")
    extra = {k: v for k, v in (req.model_extra or {}).items() if k not in ("stream", "n", "user")}
    return {**extra, "model": st.proxy.upstream_model(model), "messages": messages}


async def _read_object(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError as exc:
        raise ProxyError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ProxyError(400, "the body must be a JSON object")
    return body


# ------------------------------------------------------------------ body size


class BodyLimitMiddleware:
    """Refuse bodies over ``limit`` bytes with 413 before any handler sees them.

    The body is read here (bounded) and replayed, so chunked uploads are limited too. An
    oversize body is drained up to a hard cap so the client gets the 413 instead of a reset.
    """

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit
        self.drain_cap = max(8 * limit, 8 << 20)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_big = declared is not None and declared.isdigit() and int(declared) > self.limit
        body = bytearray()
        seen = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            seen += len(chunk)
            more = bool(message.get("more_body", False))
            if seen > self.limit:
                too_big = True
            if too_big:
                if seen > self.drain_cap:
                    break
                continue
            body += chunk
        if too_big:
            size = f"{int(declared)} bytes" if declared is not None and declared.isdigit() else "more than that"
            resp = ProxyError(413, f"request body is {size}; the limit is {self.limit} bytes",
                              code="body_too_large").response()
            await resp(scope, receive, send)
            return
        replayed = False

        async def replay() -> Any:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


# ------------------------------------------------------------------ factory


def _no_agent(_: Any) -> Any:
    raise RuntimeError("the proxy generates through its upstream, not through a wrapped agent")


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
    upstream_transport: httpx.AsyncBaseTransport | None = None,
) -> FastAPI:
    """Build the proxy app. Nothing is opened until the ASGI lifespan starts.

    ``settings``: store home, Chroma, and the judge/synthesis LLM endpoint (default: env).
    ``proxy``: upstream, auth, limits (default: env). ``store``/``llm``/``checkpointer``
    override what ``settings`` would open (tests, embedding the proxy in a larger app).
    ``keys``: the key ring (default: ``SYNTH_AGENT_API_KEYS`` + ``--keys-file``); refused if
    empty unless ``proxy.no_auth``.
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
    metrics = ProxyMetrics()
    state = ProxyState(settings, proxy, keys, RateLimiter(proxy.key_rate_limit, proxy.key_burst), metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            if store is not None:
                state.store = store
            else:
                from synth_agent.services import open_store

                state.store = await asyncio.to_thread(open_store, settings, server=True)
                stack.push_async_callback(asyncio.to_thread, state.store.close)  # last out: stops its Chroma
            memories = TenantMemories(state.store)
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
                ),
                on_retry=lambda _: metrics.upstream_retries.inc(),
                on_error=lambda kind: metrics.upstream_errors.labels(kind).inc(),
                transport=upstream_transport,
            )
            stack.push_async_callback(state.upstream.aclose)
            if proxy.synthesis == "inline":
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
                scheduler=state.scheduler, persona_ttl=proxy.persona_ttl,
            )
            state.memories = memories
            if state.scheduler is not None:
                # Votes stored while no scheduler ran (crash, restart, other writers) get their check.
                state.poller = StorePoller(state.store, memories, state.scheduler)
                stack.push_async_callback(state.poller.aclose)
                state.poller.start(proxy.poll_interval)
            metrics.watch(lambda: state.scheduler.stats if state.scheduler else None,
                          lambda: state.llm.stats if state.llm else None)
            try:
                yield
            finally:
                state.memories = state.personalizer = None

    app = FastAPI(
        title="synth-agent proxy",
        version="1",
        description="OpenAI-compatible chat proxy that personalizes answers per user, plus vote, "
        "A/B, rerank, judge and persona endpoints.",
        lifespan=lifespan,
    )
    app.state.proxy = state
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, limit=proxy.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    _routes(app, state)
    return app


# ------------------------------------------------------------------ routes


def _routes(app: FastAPI, st: ProxyState) -> None:  # noqa: C901 - one flat list of endpoints reads best
    p = st.proxy

    # -------------------------------------------------------------- OpenAI-compatible

    @app.post("/v1/chat/completions", tags=["openai"], openapi_extra=_CHAT_SCHEMA)
    async def chat_completions(request: Request, caller: JsonCaller) -> Response:
        """Chat Completions with the user's persona prepended as a system message; streaming passes through."""
        body = await _read_object(request)
        if not isinstance(body.get("model"), str) or not body["model"]:
            raise ProxyError(400, "model is required", param="model")
        _check_messages(body.get("messages"), p.max_messages)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ProxyError(400, "stream must be true or false", param="stream")
        user = _user_of(request, body.get("user"), required=False)
        _, _, upstream, _ = st.ready()
        profile = await _persona(st, caller.tenant, user)
        out = {**body, "model": p.upstream_model(body["model"]), "messages": _with_persona(body["messages"], profile)}
        headers = {PERSONA_HEADER: str(profile.version if profile else 0)}
        if profile is not None:
            st.metrics.persona_injections.inc()
        if stream:
            resp = await upstream.open_stream("/chat/completions", out)
            if resp.status_code >= 400:
                await resp.aread()
                await resp.aclose()
                return _upstream_error(resp)
            return StreamingResponse(
                upstream.relay(resp),
                status_code=resp.status_code,
                media_type=resp.headers.get("content-type", "text/event-stream"),
                headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        resp = await upstream.request_json("POST", "/chat/completions", out)
        if resp.status_code >= 400:
            return _upstream_error(resp)
        return Response(resp.content, status_code=resp.status_code,
                        media_type=resp.headers.get("content-type", "application/json"), headers=headers)

    @app.get("/v1/models", tags=["openai"])
    async def models(caller: AuthCaller) -> Response:
        """The upstream's model list, passed through."""
        _, _, upstream, _ = st.ready()
        resp = await upstream.request_json("GET", "/models")
        if resp.status_code >= 400:
            return _upstream_error(resp)
        return Response(resp.content, status_code=resp.status_code,
                        media_type=resp.headers.get("content-type", "application/json"))

    # -------------------------------------------------------------- votes and A/B

    @app.post("/v1/votes", tags=["votes"], status_code=200)
    async def post_votes(
        request: Request,
        caller: JsonCaller,
        payload: Annotated[
            dict[str, Any] | list[Any],
            Body(description="one vote, a list of votes, or {\"votes\": [...]}; user_id may come from "
                 "X-Synth-User"),
        ],
    ) -> dict[str, Any]:
        """Store votes (all or nothing: one invalid vote stores none); schedules background synthesis."""
        memories, _, _, _ = st.ready()
        items: Any = payload.get("votes") if isinstance(payload, dict) and "votes" in payload else payload
        items = items if isinstance(items, list) else [items]
        if not items:
            raise ProxyError(400, "no votes given", param="votes")
        if len(items) > p.max_batch_votes:
            raise ProxyError(400, f"{len(items)} votes in one request; the limit is {p.max_batch_votes}",
                             param="votes", code="too_many_votes")
        header_user = _header_user(request)
        votes, errors = [], []
        for i, item in enumerate(items):
            if isinstance(item, dict) and header_user is not None and "user_id" not in item:
                item = {**item, "user_id": header_user}
            try:
                votes.append(parse_vote(item, max_content_chars=st.settings.max_content_chars))
            except ValueError as exc:
                errors.append(f"vote {i}: {exc}")
        if errors:
            shown = "; ".join(errors[:5]) + (f"; and {len(errors) - 5} more" if len(errors) > 5 else "")
            raise ProxyError(400, f"{len(errors)} of {len(items)} votes are invalid; nothing was stored: {shown}",
                             param="votes", code="invalid_vote")
        try:
            result = await memories(caller.tenant).add_votes(votes)
        except ValueError as exc:  # refused by the store before anything was written (e.g. text not UTF-8)
            raise ProxyError(400, f"invalid votes; nothing was stored: {exc}", param="votes",
                             code="invalid_vote") from None
        st.metrics.votes.inc(result.added)
        users = sorted({v.user_id for v in votes})
        for u in users:
            st.notify_vote(caller.tenant, u)
        return {"object": "vote.batch", "added": result.added, "duplicates": result.duplicates, "users": users}

    @app.post("/v1/ab", tags=["votes"])
    async def ab(request: Request, caller: JsonCaller, req: ABRequest) -> dict[str, Any]:
        """Two candidate answers and a vote token: with vs without the persona once one exists."""
        _, personalizer, upstream, _ = st.ready()
        user = _user_of(request, req.user, required=True)
        assert user is not None
        messages = _check_messages(req.messages, p.max_messages)
        context = _context(messages, st.settings.max_content_chars)
        profile = await _persona(st, caller.tenant, user)
        base = _generation_body(st, req, messages)
        seed = int(base.get("seed") or 0)
        if profile is not None:
            bodies = [{**base, "messages": _with_persona(messages, profile)}, base]
            flags = [True, False]
        else:  # no persona yet: two variants of the plain model, so early votes still carry signal
            bodies = [{**base, "seed": seed}, {**base, "seed": seed + 1}]
            flags = [False, False]
        texts = await asyncio.gather(*(upstream.chat_text(b) for b in bodies))
        cands = [{"index": i, "text": t, "personalized": f} for i, (t, f) in enumerate(zip(texts, flags, strict=True))]
        opened = await personalizer.open_vote(
            caller.tenant, user, context, cands, profile.version if profile else None, None
        )
        return {"object": "ab.pair", **opened}

    @app.post("/v1/ab/{token}/vote", tags=["votes"])
    async def ab_vote(request: Request, token: str, caller: JsonCaller, req: ABVoteRequest) -> dict[str, Any]:
        """Redeem an A/B token once, for its own user only; records the vote and schedules synthesis."""
        _, personalizer, _, _ = st.ready()
        user = _user_of(request, req.user, required=True)
        try:
            receipt = await personalizer.submit_vote(token, req.choice.lower(), tenant_id=caller.tenant, user_id=user)
        except VoteError as exc:
            status = 409 if "already recorded" in str(exc) else 404
            raise ProxyError(status, str(exc), param="token", code="vote_token") from None
        st.metrics.votes.inc()
        return {"object": "ab.vote", **receipt.as_dict()}

    # -------------------------------------------------------------- judging

    @app.post("/v1/rerank", tags=["judging"])
    async def rerank(request: Request, caller: JsonCaller, req: RerankRequest) -> dict[str, Any]:
        """Best of n for this user: candidates given, or generated with the persona; ranked by their judge."""
        _, _, upstream, llm = st.ready()
        user = _user_of(request, req.user, required=True)
        messages = _check_messages(req.messages, p.max_messages)
        context = _context(messages, st.settings.max_content_chars)
        profile = await _persona(st, caller.tenant, user)
        if req.candidates is not None:
            if not 2 <= len(req.candidates) <= p.max_candidates:
                raise ProxyError(400, f"give between 2 and {p.max_candidates} candidates", param="candidates")
            if any(not c.strip() for c in req.candidates):
                raise ProxyError(400, "every candidate must be non-empty text", param="candidates")
            candidates = list(req.candidates)
        else:
            n = req.n or 4
            if n > p.max_candidates:
                raise ProxyError(400, f"n is at most {p.max_candidates}", param="n")
            base = _generation_body(st, req, _with_persona(messages, profile))
            seed = int(base.get("seed") or 0)
            candidates = list(await asyncio.gather(*(upstream.chat_text({**base, "seed": seed + i}) for i in range(n))))
        judge = Judge.from_profile(llm, profile, call_site="proxy_rerank")
        result = await _judging(rank(judge, context, candidates, strategy=req.strategy))
        return {
            "object": "rerank",
            "winner": result.winner,
            "best": candidates[result.winner],
            "scores": result.scores,
            "order": result.order,
            "strategy": result.strategy,
            "personalized_judge": profile is not None,
            "persona_version": profile.version if profile else 0,
            "candidates": candidates,
        }

    @app.post("/v1/judge", tags=["judging"])
    async def judge(request: Request, caller: JsonCaller, req: JudgeRequest) -> dict[str, Any]:
        """Which of a and b this user would prefer (both presentation orders; disagreement is a tie)."""
        _, _, _, llm = st.ready()
        user = _user_of(request, req.user, required=True)
        messages = _check_messages(req.messages, p.max_messages)
        context = _context(messages, st.settings.max_content_chars)
        if req.a.strip() == req.b.strip():
            raise ProxyError(400, "a and b are identical; nothing to judge", param="b")
        profile = await _persona(st, caller.tenant, user)
        verdict = await _judging(Judge.from_profile(llm, profile, call_site="proxy_judge").compare(context, req.a, req.b))
        return {
            "object": "judgment",
            **verdict.model_dump(mode="json"),
            "personalized": profile is not None,
            "persona_version": profile.version if profile else 0,
        }

    # -------------------------------------------------------------- users

    async def _profile(tenant: str, user: str) -> PersonaProfile:
        memories, _, _, _ = st.ready()
        profile = await memories(tenant).current_persona(user)
        if profile is None:
            n = await memories(tenant).count_votes(user)
            raise ProxyError(404, f"no persona for this user yet ({n} vote(s) stored; the first is learned at "
                             f"{(st.scheduler.policy.first_fit if st.scheduler else 5)})", code="no_persona")
        return profile

    @app.get("/v1/users/{user:path}/persona/history", tags=["users"])
    async def persona_history(user: str, caller: AuthCaller) -> dict[str, Any]:
        """Every persona version, oldest first (empty for unknown users)."""
        memories, _, _, _ = st.ready()
        history = await memories(caller.tenant).persona_history(_user(user))
        return {"object": "list", "data": [h.model_dump(mode="json") for h in history]}

    @app.get("/v1/users/{user:path}/persona", tags=["users"])
    async def persona(user: str, caller: AuthCaller) -> dict[str, Any]:
        """The current persona (404 until one was learned). User ids are URL-encoded path segments."""
        return (await _profile(caller.tenant, _user(user))).model_dump(mode="json")

    @app.get("/v1/users/{user:path}/prompt", tags=["users"])
    async def prompt(
        user: str, caller: AuthCaller, format: Annotated[Literal["system", "messages", "json"], Query()] = "system"
    ) -> Response:
        """Export the persona: ``system`` prompt text, judge ``messages`` (JSON), or the whole profile (``json``)."""
        profile = await _profile(caller.tenant, _user(user))
        text = export_profile(profile, format)
        media = "text/plain; charset=utf-8" if format == "system" else "application/json"
        return Response(text, media_type=media, headers={PERSONA_HEADER: str(profile.version)})

    @app.delete("/v1/users/{user:path}", tags=["users"])
    async def forget(user: str, caller: AuthCaller) -> dict[str, Any]:
        """Forget everything stored for this user in the caller's tenant (votes, personas, pending pairs)."""
        memories, personalizer, _, _ = st.ready()
        uid, tenant = _user(user), caller.tenant
        versions = len(await memories(tenant).persona_history(uid))
        counts = await memories(tenant).forget_user(uid)
        personalizer.invalidate(tenant, uid)
        await _forget_checkpoints(st, tenant, uid, versions)
        sched = st.scheduler
        if sched is not None and sched.is_busy(tenant, uid):
            # A fit already running would save a persona after this delete: forget again once it ends.
            async def again() -> None:
                await sched.wait_user_idle(tenant, uid)
                await memories(tenant).forget_user(uid)
                personalizer.invalidate(tenant, uid)
                await _forget_checkpoints(st, tenant, uid, versions + 1)

            task = asyncio.get_running_loop().create_task(again())
            st.background.add(task)
            task.add_done_callback(st.background.discard)
        return {"object": "user.deleted", "deleted": counts}

    # -------------------------------------------------------------- operations

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> JSONResponse:
        """Liveness plus a cheap store probe (503 when the store does not answer)."""
        if st.store is None or st.memories is None:
            return JSONResponse({"status": "starting"}, status_code=503)
        health = getattr(st.store, "health", None)
        if callable(health):  # ChromaStore: in-memory state only, never waits on Chroma or a commit
            h = health()
            if not h["ok"]:
                return JSONResponse({"status": "degraded", "store": h.get("error", "unhealthy")}, status_code=503)
        else:
            try:
                await st.store.alist_namespaces(limit=1)
            except Exception as exc:
                return JSONResponse({"status": "degraded", "store": f"{type(exc).__name__}"}, status_code=503)
        return JSONResponse({
            "status": "ok",
            "auth": st.keys is not None,
            "synthesis": p.synthesis,
            "synthesis_in_flight": st.scheduler.stats.in_flight if st.scheduler else 0,
        })

    @app.get("/metrics", tags=["ops"])
    async def metrics() -> Response:
        """Prometheus exposition (no tenant or user labels)."""
        return Response(st.metrics.render(), media_type=CONTENT_TYPE_LATEST)


async def _forget_checkpoints(st: ProxyState, tenant: str, user: str, versions: int) -> None:
    """Synthesis checkpoints hold the user's votes too: erase the threads of every version fitted or pending."""
    cp = st.checkpointer
    if cp is None or not hasattr(cp, "adelete_thread"):
        return
    try:
        await erase_threads(cp, [synthesis_thread_id(tenant, user, f"v{v}") for v in range(1, versions + 2)])
    except Exception:
        log.exception("could not erase the synthesis checkpoints of a forgotten user")


async def _judging(coro: Any) -> Any:
    """Judge/rank errors from the LLM become 502/504 in OpenAI format, never a hang or a 500."""
    try:
        return await coro
    except LLMError as exc:
        timeout = "Timeout" in repr(exc.cause)
        raise ProxyError(504 if timeout else 502, f"the judge model failed: {exc}",
                         code="judge_timeout" if timeout else "judge_unavailable") from None
    except ParseError as exc:
        raise ProxyError(502, f"the judge model gave no readable verdict: {exc}", code="judge_unreadable") from None
