"""ASGI middleware that stands between the network and the handlers.

:class:`RequestGuard` (outermost) gives every request an id (``X-Request-ID``; a
client's own id is kept when it is a short token) and is the last line of defence:
an exception no handler turned into an error response becomes a 500 in the OpenAI
format carrying the request id, logged with its traceback under the same id, and the
connection stays usable. (Starlette's own last-resort handler re-raises after its
500, which makes uvicorn drop the keep-alive connection: the client's *next* request
failed too.)

:class:`BodyGuard` refuses, before any handler parses anything:

* bodies over the size limit (413), chunked uploads included;
* JSON bodies nested deeper than the limit (checked without parsing), holding
  ``NaN``/``Infinity``/overflowing numbers, lone surrogates, invalid UTF-8 or
  repeated keys (400) — see :mod:`synth_agent.safejson`;
* paths whose percent-encoding is not UTF-8 (``%FF``), which would otherwise be
  decoded to U+FFFD and address another user (400).

It also routes ``/v1/users/{user}/...`` on the *raw* path: a user id is one
percent-encoded segment, so an id holding ``/`` (``a%2Fpersona``) can never be confused
with a sub-resource (``DELETE /v1/users/a/persona`` is a 405, not "forget user
a/persona"). :func:`decode_segment` turns the segment back into the id.
"""

from __future__ import annotations

import logging
import os
import random
import re
from collections.abc import MutableMapping
from typing import Any
from urllib.parse import unquote_to_bytes

from synth_agent.proxy.errors import ProxyError, error_response
from synth_agent.safejson import loads_strict

__all__ = ["PARSED_BODY", "BodyGuard", "RequestGuard", "decode_segment", "new_request_id", "request_id"]

log = logging.getLogger("synth_agent.proxy")

_BODY_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
PARSED_BODY = "strict_json_body"
"""Key of the request state holding the JSON body as :class:`BodyGuard` parsed it (``loads_strict``)."""
_RAW_PREFIXES = (b"/v1/users/",)


def decode_segment(segment: str) -> str:
    """A raw path segment (as routed by :class:`BodyGuard`) → the text it encodes; ``ValueError`` if not UTF-8."""
    return unquote_to_bytes(segment.encode("latin-1")).decode("utf-8")
_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class _RequestIds:
    """``req_<16 hex>`` ids: unique, not secret (they correlate log lines), so no system call per request.

    ``secrets.token_hex`` reads ``os.urandom``, which releases the GIL for its ``getrandom`` call: on a
    busy server the event loop then waits for a drain thread to hand the GIL back (up to the switch
    interval) on every request. A PRNG seeded from ``os.urandom`` (again in a forked child) is enough
    for ids that only need to differ.
    """

    def __init__(self) -> None:
        self._rng = random.Random(os.urandom(16))
        os.register_at_fork(after_in_child=lambda: self._rng.seed(os.urandom(16)))

    def next(self) -> str:
        return f"req_{self._rng.getrandbits(64):016x}"


new_request_id = _RequestIds().next
"""A fresh request id (``req_`` and 16 hex digits)."""


def _header(scope: dict[str, Any], name: bytes) -> bytes | None:
    for k, v in scope.get("headers") or ():
        if k.lower() == name:
            return bytes(v)
    return None


def request_id(scope: Any) -> str:
    """The request's id: the client's own ``X-Request-ID`` when it is a short token, else a new one."""
    given = _header(scope, b"x-request-id")
    text = given.decode("latin-1") if given else ""
    return text if _CLIENT_ID.match(text) else new_request_id()


class RequestGuard:
    """Request ids, and a 500 (never a dropped connection or a stack trace) for anything unhandled."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id(scope)
        scope.setdefault("state", {})["request_id"] = rid
        started = False

        async def send_with_id(message: MutableMapping[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:  # the boundary: log it, answer it, keep serving
            log.error("unhandled error on %s %s (request %s)", scope.get("method"), scope.get("path"), rid,
                      exc_info=exc)
            if started:
                raise  # a response is half-sent: only closing the connection tells the client it broke
            resp = error_response(
                500, f"internal error; quote request id {rid} when reporting it (the proxy's log has the details)",
                code="internal_error", request_id=rid,
            )
            await resp(scope, receive, send_with_id)


class BodyGuard:
    """Size limit, safe-JSON check and path-encoding check, before any handler (see the module docstring)."""

    def __init__(self, app: Any, limit: int, max_depth: int = 64) -> None:
        self.app = app
        self.limit = limit
        self.max_depth = max_depth
        self.drain_cap = max(8 * limit, 8 << 20)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = (scope.get("state") or {}).get("request_id")
        raw_path = scope.get("raw_path")
        if raw_path:
            raw_path = raw_path.split(b"?", 1)[0]
            try:
                unquote_to_bytes(raw_path).decode("utf-8")
            except UnicodeDecodeError:
                await ProxyError(400, "the path is not percent-encoded UTF-8 (e.g. %FF); encode ids with "
                                 "quote(id, safe='')", code="invalid_path").response(rid)(scope, receive, send)
                return
            if raw_path.startswith(_RAW_PREFIXES):
                scope = {**scope, "path": raw_path.decode("latin-1")}
        if scope.get("method") not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
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
            await ProxyError(413, f"request body is {size}; the limit is {self.limit} bytes",
                             code="body_too_large").response(rid)(scope, receive, send)
            return
        if body and self._is_json(scope):
            try:
                parsed = loads_strict(bytes(body), max_depth=self.max_depth)
            except ValueError as exc:
                await ProxyError(400, f"the body is not acceptable JSON: {exc}",
                                 code="invalid_json").response(rid)(scope, receive, send)
                return
            # kept for a route that reads it instead of parsing the body again (POST /v1/votes)
            scope.setdefault("state", {})[PARSED_BODY] = parsed
        replayed = False

        async def replay() -> Any:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    def _is_json(scope: Any) -> bool:
        """What FastAPI would parse as JSON: no content type, ``application/json`` or ``application/*+json``."""
        ctype = _header(scope, b"content-type")
        if ctype is None:
            return True
        main = ctype.split(b";", 1)[0].strip().lower()
        return main == b"application/json" or (main.startswith(b"application/") and main.endswith(b"+json"))
