"""Every error the proxy returns is in the OpenAI format, so SDKs raise their usual exceptions.

``{"error": {"message", "type", "param", "code"}, "request_id"}``; the message says what
to fix. Unexpected exceptions never reach the client as a stack trace: the
:class:`~synth_agent.proxy.guard.RequestGuard` answers 500 with the request id (also in
the ``X-Request-ID`` header and in the log line with the traceback) and keeps the
connection usable.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("synth_agent.proxy")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "upstream_error",
    503: "server_error",
    504: "upstream_error",
}

_DESCRIPTIONS = {
    400: "Invalid request (the body, a parameter or a header); nothing was changed",
    401: "Missing or invalid API key",
    403: "The key's tenant, or the user pinned by X-Synth-User, does not match",
    404: "Not found",
    409: "Conflict (e.g. an A/B token already redeemed)",
    413: "The body is larger than the limit",
    415: "The body is not declared as application/json",
    429: "Rate limited (per API key), or too many failed authentications from this address; see Retry-After",
    500: "Internal error; the body carries the request id to quote",
    502: "The upstream or judge model failed after retries",
    503: "The proxy is starting up or shutting down",
    504: "The upstream or judge model timed out",
}


def error_type(status: int) -> str:
    return _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` entries for these error statuses (all in the :class:`ErrorResponse` format)."""
    from synth_agent.proxy.schemas import ErrorResponse

    return {code: {"model": ErrorResponse, "description": _DESCRIPTIONS.get(code, "Error")} for code in codes}


class ProxyError(Exception):
    """An error response: raise it anywhere in a handler or dependency."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or error_type(status)
        self.code = code
        self.param = param
        self.headers = headers

    def response(self, request_id: str | None = None) -> JSONResponse:
        return error_response(self.status, self.message, type=self.type, code=self.code, param=self.param,
                              headers=self.headers, request_id=request_id)


def error_body(
    message: str, *, type: str, code: str | None = None, param: str | None = None, request_id: str | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {"error": {"message": message, "type": type, "param": param, "code": code}}
    if request_id is not None:
        body["request_id"] = request_id
    return body


def error_response(
    status: int,
    message: str,
    *,
    type: str | None = None,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
    request_id: str | None = None,
) -> JSONResponse:
    return JSONResponse(
        error_body(message, type=type or error_type(status), code=code, param=param, request_id=request_id),
        status_code=status, headers=headers,
    )


def request_id_of(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


# ------------------------------------------------------------------ validation errors, readably

_SKIP = {"body", "query", "path", "header"}
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_MODEL_NAME = re.compile(r"^[A-Z][A-Za-z0-9]*$")  # union branches named after models (VoteMessage...)


def _path(loc: tuple[Any, ...]) -> str:
    """``("body", "one-vote", "context", "list[VoteMessage]", 0, "content")`` → ``context[0].content``."""
    if len(loc) >= 2 and loc[0] in ("header", "query", "path"):
        return str(loc[1])
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _SKIP or not _IDENT.match(str(part)) or _MODEL_NAME.match(str(part)):
            continue  # a union branch, not a field
        else:
            out += f".{part}" if out else str(part)
    return out


def _message(err: dict[str, Any]) -> str:
    msg = str(err.get("msg", "")).removeprefix("Value error, ")
    if err.get("type") == "extra_forbidden":
        return "unknown field (check the spelling; see /docs)"
    if err.get("type") == "missing":
        return "required"
    return msg


def describe_errors(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """Pydantic errors as ``path: reason; ...`` and the first path (the ``param``).

    Errors of union branches that do not fit the input's type at all ("Input should be a
    valid string" next to a real range error) are dropped when a more specific one exists.
    """
    grouped: dict[str, list[dict[str, Any]]] = {}
    for e in errors:
        grouped.setdefault(_path(tuple(e.get("loc", ()))), []).append(e)
    parts: list[str] = []
    for path, errs in grouped.items():
        specific = [e for e in errs if not str(e.get("type", "")).endswith("_type")
                    and e.get("type") not in ("union_tag_invalid", "model_attributes_type")]
        msgs = list(dict.fromkeys(_message(e) for e in (specific or errs)))
        parts.append(f"{path or 'body'}: {' or '.join(msgs[:3])}")
    first = next(iter(grouped), None)
    return "; ".join(parts[:10]) + (f"; and {len(parts) - 10} more" if len(parts) > 10 else ""), first or None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ProxyError)
    async def proxy_error(request: Request, exc: ProxyError) -> JSONResponse:
        return exc.response(request_id_of(request))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        text, param = describe_errors(list(exc.errors()))
        return error_response(400, f"invalid request, nothing was changed: {text}", code="invalid_request",
                              param=param, request_id=request_id_of(request))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = str(exc.detail)
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no route {request.method} {request.url.path}; see /docs for the API"
        return error_response(exc.status_code, detail, headers=getattr(exc, "headers", None),
                              request_id=request_id_of(request))
