"""A small HTTP/1.1 client for one plain-``http://`` endpoint: the lean transport's wire.

Why not ``aiohttp`` here: a fit sends thousands of ~17 kB judge requests, and on a 2-core machine
the fits' process CPU per request bounds how many users fit at once. aiohttp's request and response
machinery (``ClientSession._request``, ``ClientRequest``, ``ClientResponse``, timers, traces, cookie
and redirect handling) measured ~0.26 ms of CPU per request more than a bare protocol sending the
same bytes, about a quarter of the fits' CPU per request (docs/llm.md, "20 users at once"). A chat
completion needs none of it: one POST with a JSON body, one JSON answer.

What it does, and nothing more:

* ``POST``/``GET`` with a bytes body and ``Content-Length``; fixed headers given once;
* answers framed by ``Content-Length``, ``Transfer-Encoding: chunked`` or the connection's close,
  parsed by ``httptools`` (llhttp, the C parser uvicorn uses); gzip/deflate bodies are decompressed
  (it never asks for them);
* keep-alive connections, one request at a time each, reused most-recently-used first and never
  limited in number (the client's limiter decides how many requests are in flight);
* one total timeout per request covering connect, send and read; a request that times out, is
  cancelled or fails closes its connection (an answer may still be on its way: the connection is
  out of step);
* a request sent on a reused connection that the server closed before answering a byte (its idle
  keep-alive timeout ran out as we wrote) is sent again once on a new connection.

Not here: TLS, proxies, redirects, cookies, ``Expect: 100-continue``. ``https://`` endpoints and
``EndpointConfig.transport="aiohttp"`` use aiohttp (:class:`~synth_agent.llm.transport.LeanTransport`).
"""

from __future__ import annotations

import asyncio
import socket
import time
import zlib
from collections.abc import Callable, Mapping
from urllib.parse import urlsplit

import httptools

__all__ = ["DNS_TTL", "WireClient", "WireError", "plain_http"]

DNS_TTL = 300.0
"""Seconds the endpoint's resolved addresses are reused for new connections (aiohttp's default too); a failed
connection to every address resolves again."""


class WireError(ConnectionError):
    """The connection failed or the answer was not HTTP (refused, reset, closed early, malformed)."""


def plain_http(url: str) -> bool:
    """Whether ``url`` is one :class:`WireClient` can serve (``http://host[:port]/path``, nothing else)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return False
    return (
        parts.scheme == "http" and bool(parts.hostname) and not parts.username and not parts.password
        and not parts.query and not parts.fragment and (port is None or 0 < port < 65536)
    )  # fmt: skip


class _Connection(asyncio.Protocol):
    """One keep-alive connection; ``exchange`` sends a request and resolves with its answer."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.keep_alive = False
        self.answered_bytes = False
        self._waiter: asyncio.Future[tuple[int, dict[str, str], bytes]] | None = None
        self._parser: httptools.HttpResponseParser | None = None
        self._status = 0
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._headers_done = False
        self._framed = False

    # ---------------------------------------------------------------- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None:  # bytes nobody asked for: the connection is out of step
            self.close()
            return
        self.answered_bytes = True
        try:
            parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(WireError(f"malformed HTTP answer: {e}"))
            self.close()
            return
        if self._waiter is not None and self._waiter.done():
            self._parser = None  # answered: bytes before the next request are out of step

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is not None and not self._waiter.done():
            if self._headers_done and not self._framed:
                self.on_message_complete()  # an answer framed by the connection's close
            else:
                reason = f": {exc}" if exc is not None else ""
                self._fail(WireError(f"the server closed the connection before answering{reason}"))

    # ---------------------------------------------------------------- httptools callbacks

    def on_message_begin(self) -> None:
        if self._waiter is not None and self._waiter.done():  # a second answer to one request: out of step
            self.keep_alive = False
            self.close()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        assert self._parser is not None
        self._headers_done = True
        self._status = self._parser.get_status_code()
        self._framed = "content-length" in self._headers or "chunked" in self._headers.get("transfer-encoding", "")

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        waiter, parser = self._waiter, self._parser
        if waiter is None or waiter.done() or parser is None:
            return
        self.keep_alive = not self.closed and parser.should_keep_alive()
        body = b"".join(self._body) if len(self._body) != 1 else self._body[0]
        encoding = self._headers.get("content-encoding", "").strip().lower()
        if encoding in ("gzip", "deflate", "x-gzip"):
            try:
                body = zlib.decompress(body, 47)  # 32 + 15: a gzip or zlib header, either one
            except zlib.error as e:
                self.keep_alive = False
                self._fail(WireError(f"undecodable {encoding} body: {e}"))
                return
        waiter.set_result((self._status, self._headers, body))

    # ---------------------------------------------------------------- use

    def exchange(self, data: bytes) -> asyncio.Future[tuple[int, dict[str, str], bytes]]:
        assert self.transport is not None
        self._parser = httptools.HttpResponseParser(self)
        self._status, self._headers, self._body = 0, {}, []
        self._headers_done = self._framed = self.keep_alive = self.answered_bytes = False
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return self._waiter

    def _fail(self, exc: Exception) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)
        self._parser = None

    def close(self) -> None:
        self.closed = True
        self._parser = None
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Drop the socket without the event loop's help (it is closed): best effort."""
        self.closed = True
        if self.transport is not None:
            try:
                self.transport.abort()
            except RuntimeError:  # the loop is closed: the socket goes with the transport object
                pass


class WireClient:
    """Requests to one ``http://host:port`` over a pool of keep-alive connections (bound to one event loop)."""

    def __init__(self, base_url: str, headers: Mapping[str, str], *, timeout: float) -> None:
        if not plain_http(base_url):
            raise ValueError(f"WireClient serves plain http:// URLs without query or credentials, not {base_url!r}")
        parts = urlsplit(base_url)
        self.host = parts.hostname or ""
        self.port = parts.port or 80
        self.timeout = timeout
        host = f"[{self.host}]" if ":" in self.host else self.host
        authority = host if self.port == 80 else f"{host}:{self.port}"
        fixed = {"Host": authority, "User-Agent": "synth-agent", "Accept": "application/json", **headers}
        for k, v in fixed.items():
            if any(c in f"{k}{v}" for c in "\r\n\0"):
                raise ValueError(f"header {k!r} holds a line break or NUL")
        self._fixed = "".join(f"{k}: {v}\r\n" for k, v in fixed.items()).encode("latin-1")
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()
        self._resolving: asyncio.Future[list[tuple[int, str, int]]] | None = None
        self._resolved_until = 0.0
        self.closed = False

    def head(self, method: str, path: str, length: int | None) -> bytes:
        """The request line and headers of one request (``length``: the body's, None for no body)."""
        line = f"{method} {path} HTTP/1.1\r\n".encode("latin-1") + self._fixed
        return line + (b"Content-Length: %d\r\n\r\n" % length if length is not None else b"\r\n")

    async def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
        """(status, headers with lower-case names, body). TimeoutError past the client's ``timeout`` from the
        start of this call (wrap it in ``asyncio.timeout`` for a shorter one); :class:`WireError` or OSError
        when the connection fails."""
        if self.closed:
            raise WireError("the client is closed")
        data = self.head(method, path, None if body is None and method == "GET" else len(body or b"")) + (body or b"")
        async with asyncio.timeout(self.timeout):
            while True:
                conn, reused = await self._connection()
                try:
                    status, headers, answer = await conn.exchange(data)
                except WireError:
                    conn.close()
                    self._open.discard(conn)
                    if reused and not conn.answered_bytes:
                        continue  # an idle connection the server had closed: once more on another one
                    raise
                except BaseException:  # timeout, cancellation: the answer may still come, out of step
                    conn.close()
                    self._open.discard(conn)
                    raise
                if conn.keep_alive and not conn.closed and not self.closed:
                    self._idle.append(conn)
                else:
                    conn.close()
                    self._open.discard(conn)
                return status, headers, answer

    async def _connection(self) -> tuple[_Connection, bool]:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                return conn, True
            self._open.discard(conn)
        conn = await self._connect()
        if self.closed:  # closed while we connected
            conn.close()
            raise WireError("the client is closed")
        self._open.add(conn)
        return conn, False

    async def _addresses(self) -> list[tuple[int, str, int]]:
        """(family, address, port) of the endpoint, resolved once per :data:`DNS_TTL` and shared by concurrent
        new connections (a ramp-up to 64 connections asks the resolver once, not 64 times)."""
        loop = asyncio.get_running_loop()
        if self._resolving is None or time.monotonic() > self._resolved_until:
            self._resolving = asyncio.ensure_future(self._resolve(loop))
            self._resolving.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved, waited or not
            self._resolved_until = time.monotonic() + DNS_TTL
        resolving = self._resolving
        try:
            return await asyncio.shield(resolving)
        except OSError:
            if self._resolving is resolving:
                self._resolving = None
            raise

    async def _resolve(self, loop: asyncio.AbstractEventLoop) -> list[tuple[int, str, int]]:
        infos = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        out: list[tuple[int, str, int]] = []
        for family, _, _, _, addr in infos:
            entry = (int(family), str(addr[0]), int(addr[1]))
            if entry not in out:
                out.append(entry)
        return out

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        error: OSError = WireError(f"{self.host} resolved to no address")
        for family, address, port in await self._addresses():
            try:
                _, conn = await loop.create_connection(_Connection, address, port, family=family)
                return conn
            except OSError as e:
                error = e
        self._resolving = None  # none took it: resolve again next time
        raise error

    def close(self) -> None:
        """Close every connection (requests still waiting on one fail with :class:`WireError`)."""
        self._end(_Connection.close)

    def abandon(self) -> None:
        """Drop every connection of a client whose event loop is gone (nothing can be awaited there)."""
        self._end(_Connection.abort)

    def _end(self, end: Callable[[_Connection], None]) -> None:
        """No more requests; ``end`` each open connection."""
        self.closed = True
        self._idle.clear()
        for conn in list(self._open):
            end(conn)
        self._open.clear()
