"""The dependencies every router shares: app state, the one auth dependency, the pinned user.

:func:`authenticate` is the single auth dependency: API key → tenant (``Authorization:
Bearer`` or ``X-API-Key``), failed-auth throttling per client address, the per-key rate
limit, and an explicit ``X-Synth-Tenant`` that must match the key's tenant (the local CLI's token
of :mod:`synth_agent.local_service` names its tenant with it instead). The
``X-Synth-User`` header *pins* the user (a gateway that authenticated the end user
sets it): on every route the user is then that header, and a body or path naming
another user is refused with 403.
"""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import unquote

from fastapi import Depends, Header, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import Field, TypeAdapter, ValidationError

from synth_agent.local_service import loopback_client, token_matches
from synth_agent.models import validate_user_id
from synth_agent.proxy.errors import ProxyError
from synth_agent.proxy.guard import decode_segment
from synth_agent.proxy.state import Caller, ProxyState

__all__ = [
    "AuthCaller",
    "JsonCaller",
    "PathUser",
    "PinnedUser",
    "State",
    "authenticate",
    "resolve_user",
    "solve_json_write",
]

USER_HEADER = "X-Synth-User"
TENANT_HEADER = "X-Synth-Tenant"

_bearer = HTTPBearer(auto_error=False, description="An API key of your tenant: `Authorization: Bearer <key>` "
                     "(`X-API-Key: <key>` is read too, for clients that cannot set Authorization)")


async def get_state(request: Request) -> ProxyState:
    # async on purpose: FastAPI runs a plain ``def`` dependency in its thread pool (40 threads),
    # a thread hop per request that queued behind the pool at 64 concurrent connections
    return request.app.state.proxy  # type: ignore[no-any-return]


State = Annotated[ProxyState, Depends(get_state)]


def _client(request: Request) -> str:
    return request.client.host if request.client is not None else "unknown"


def _too_many(st: ProxyState, why: str, code: str, wait: int) -> ProxyError:
    st.metrics.rate_limited.inc()
    return ProxyError(429, f"{why}; retry after {wait}s", code=code, headers={"Retry-After": str(wait)})


TENANT_HEADER_MAX = 256
USER_HEADER_MAX = 2048


async def authenticate(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    tenant: Annotated[str | None, Header(
        alias=TENANT_HEADER, max_length=TENANT_HEADER_MAX,
        description="Optional: the tenant the key must belong to (403 otherwise)")] = None,
) -> Caller:
    """API key → tenant; throttles failures per address and requests per key (see the module docstring)."""
    st: ProxyState = request.app.state.proxy  # not a sub-dependency: one less to solve on every request
    if st.local_token is not None and (local := _local_owner(request, bearer, tenant, st.local_token)) is not None:
        return local
    if st.keys is None:
        caller = Caller("default", None)
    else:
        client = _client(request)
        wait = st.throttle.retry_after(client)
        if wait is not None:
            raise _too_many(st, "too many failed authentications from this address", "auth_throttled", wait)
        # one security scheme in the schema (alternatives confuse generic clients and fuzzers alike)
        presented = (bearer.credentials if bearer is not None else request.headers.get("x-api-key", "")).strip()
        if not presented:
            st.throttle.failed(client)
            raise ProxyError(401, "missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key",
                             headers={"WWW-Authenticate": "Bearer"})
        key = st.keys.lookup(presented)
        if key is None:
            st.throttle.failed(client)
            raise ProxyError(401, "invalid API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        retry = st.limiter.check(key)
        if retry is not None:
            raise _too_many(st, "rate limit exceeded for this API key", "rate_limit_exceeded", retry)
        caller = Caller(key.tenant, key)
    if tenant is not None and tenant != caller.tenant:
        raise ProxyError(403, "this API key does not belong to the requested tenant", code="wrong_tenant")
    return caller


def _local_owner(request: Request, bearer: HTTPAuthorizationCredentials | None, tenant: str | None,
                 token: str) -> Caller | None:
    """The local CLI of the server's owner: the run's token from a loopback address acts for any tenant
    (``X-Synth-Tenant``, default ``default``), without a key's rate limit (:mod:`synth_agent.local_service`)."""
    if bearer is None or not loopback_client(_client(request)) or not token_matches(bearer.credentials, token):
        return None
    if tenant is None:
        return Caller("default", None)
    try:
        return Caller(validate_user_id(tenant), None)
    except ValueError as exc:
        raise ProxyError(400, f"invalid tenant: {exc}".replace("user_id", "tenant"), param=TENANT_HEADER,
                         code="invalid_tenant") from None


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


def _user(raw: str, *, param: str) -> str:
    try:
        return validate_user_id(raw)
    except ValueError as exc:
        raise ProxyError(400, f"invalid user id: {exc}".replace("user_id", "user id"), param=param,
                         code="invalid_user") from None


async def pinned_user(
    header: Annotated[str | None, Header(
        alias=USER_HEADER, max_length=USER_HEADER_MAX,
        description="Pins the user for this request (a gateway sets it): the percent-encoded UTF-8 user id, "
        "`quote(user_id, safe='')`. A body or path naming another user is then refused with 403.")] = None,
) -> str | None:
    """The user pinned by ``X-Synth-User`` (percent-decoded), or None."""
    if header is None:
        return None
    if not header.isascii():  # raw UTF-8 bytes would arrive as latin-1 mojibake: another user's id
        raise ProxyError(400, f"{USER_HEADER} must be percent-encoded (ASCII): send quote(user_id, safe='')",
                         param=USER_HEADER, code="invalid_user")
    try:
        decoded = unquote(header, errors="strict")
    except UnicodeDecodeError:
        raise ProxyError(400, f"{USER_HEADER} must be percent-encoded UTF-8", param=USER_HEADER,
                         code="invalid_user") from None
    return _user(decoded, param=USER_HEADER)


PinnedUser = Annotated[str | None, Depends(pinned_user)]


def _mismatch(where: str) -> ProxyError:
    return ProxyError(403, f"{USER_HEADER} pins this request to another user than the {where} names",
                      param=where, code="user_mismatch")


def resolve_user(pinned: str | None, named: str | None, *, required: bool, where: str = "user") -> str | None:
    """The request's user: the pinned one (a differing ``named`` user is 403), else ``named``."""
    if pinned is not None:
        if named is not None and named != pinned:
            raise _mismatch(where)
        return pinned
    if named is None and required:
        raise ProxyError(400, f"say which user: a '{where}' field or an {USER_HEADER} header", param=where,
                         code="missing_user")
    return named


async def path_user(
    user: Annotated[str, Path(description="The user id, sent percent-encoded as one path segment: "
                              "`quote(user_id, safe='')` (so a '/' in an id travels as %2F)",
                              examples=["ana@example.com"])],
    pinned: PinnedUser,
) -> str:
    """The user named in the path (one raw segment, decoded here), validated (400), checked against the pin (403)."""
    try:
        decoded = decode_segment(user)
    except ValueError:
        raise ProxyError(400, "the user id in the path is not percent-encoded UTF-8", param="user",
                         code="invalid_user") from None
    uid = _user(decoded, param="user")
    resolve_user(pinned, uid, required=True, where="path")
    return uid


PathUser = Annotated[str, Depends(path_user)]


# ------------------------------------------------------------------ the same dependencies, solved directly

_HEADER_CHECKS = {TENANT_HEADER: TypeAdapter(Annotated[str, Field(max_length=TENANT_HEADER_MAX)]),
                  USER_HEADER: TypeAdapter(Annotated[str, Field(max_length=USER_HEADER_MAX)])}


def _header_value(request: Request, name: str, errors: list[Any]) -> tuple[bool, str | None]:
    """A declared header as FastAPI reads it (first value, its ``max_length``): ``(ok, value)``; a
    refused value adds FastAPI's validation error to ``errors``."""
    raw = request.headers.get(name)
    if raw is None:
        return True, None
    try:
        return True, _HEADER_CHECKS[name].validate_python(raw)
    except ValidationError as exc:
        errors += [{**e, "loc": ("header", name, *e["loc"])} for e in exc.errors(include_url=False)]
        return False, None


async def solve_json_write(request: Request) -> tuple[ProxyState, Caller | None, str | None, list[Any]]:
    """``State``, ``JsonCaller`` and ``PinnedUser`` of one request, without FastAPI's dependency solver.

    The same functions run in the same order with the same inputs (:func:`authenticate` then
    :func:`json_caller`, then :func:`pinned_user`): an auth, media-type or pin error is raised as
    it would be; a header over its declared length is returned in the last item (FastAPI's
    validation error, to be raised with the body's) and skips the dependency that declares it,
    as FastAPI's solver does. For the one hot write route (:class:`synth_agent.proxy.routes.votes.VotesRoute`):
    FastAPI's generic solver cost about a third of the event loop's time per vote.
    """
    errors: list[Any] = []
    st: ProxyState = request.app.state.proxy
    caller = None
    ok, tenant = _header_value(request, TENANT_HEADER, errors)
    if ok:
        caller = await json_caller(request, await authenticate(request, await _bearer(request), tenant))
    ok, header = _header_value(request, USER_HEADER, errors)
    pinned = await pinned_user(header) if ok else None
    return st, caller, pinned, errors
