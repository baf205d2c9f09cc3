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
* a body read whole (:meth:`WireClient.request`) or as it arrives (:meth:`WireClient.stream`, for
  server-sent events: the proxy relays a streamed chat completion chunk by chunk);
* keep-alive connections, one request at a time each, reused most-recently-used first; not limited
  in number unless ``limit`` is given (the LLM client's limiter decides how many requests are in flight);
* one total timeout per request covering connect, send and read (a stream: until its headers, then
  the same timeout for each wait for more of the body); a request that times out, is
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
from collections.abc import AsyncIterator, Callable, Mapping
from urllib.parse import urlsplit

import httptools

__all__ = ["DNS_TTL", "WireClient", "WireError", "WireStream", "plain_http"]

DNS_TTL = 300.0
"""Seconds the endpoint's resolved addresses are reused for new connections (aiohttp's default too); a failed
connection to every address resolves again."""


STREAM_BUFFER = 256 * 1024
"""Bytes of a streamed body held for a slow reader before the connection stops reading (TCP pushes back)."""


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
    """One keep-alive connection; ``exchange`` sends a request and resolves with its answer.

    Buffered, the answer is (status, headers, body) once the body is complete. Streamed, it is
    (status, headers, b"") once the headers are in; the body then comes through :meth:`next_chunk`.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.keep_alive = False
        self.answered_bytes = False
        self.complete = False  # the answer's last byte is in
        self._waiter: asyncio.Future[tuple[int, dict[str, str], bytes]] | None = None
        self._parser: httptools.HttpResponseParser | None = None
        self._status = 0
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._headers_done = False
        self._framed = False
        # streamed answers
        self._streaming = False
        self._buffered = 0
        self._paused = False
        self._error: Exception | None = None
        self._more: asyncio.Future[None] | None = None
        self._inflate: zlib._Decompress | None = None

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
        if self.complete or (self._waiter is not None and self._waiter.done() and not self._streaming):
            self._parser = None  # answered: bytes before the next request are out of step

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is None or self.complete:
            return
        if self._headers_done and not self._framed:
            self.on_message_complete()  # an answer framed by the connection's close
        elif not self._waiter.done() or self._streaming:
            reason = f": {exc}" if exc is not None else ""
            where = "before answering" if not self._headers_done else "in the middle of the answer"
            self._fail(WireError(f"the server closed the connection {where}{reason}"))

    # ---------------------------------------------------------------- httptools callbacks

    def on_message_begin(self) -> None:
        if self.complete:  # a second answer to one request: out of step
            self.keep_alive = False
            self.close()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        assert self._parser is not None
        self._headers_done = True
        self._status = self._parser.get_status_code()
        self._framed = "content-length" in self._headers or "chunked" in self._headers.get("transfer-encoding", "")
        if self._streaming:
            if self._encoding() in ("gzip", "deflate", "x-gzip"):
                self._inflate = zlib.decompressobj(47)
            if self._waiter is not None and not self._waiter.done():
                self._waiter.set_result((self._status, self._headers, b""))

    def on_body(self, body: bytes) -> None:
        if not self._streaming:
            self._body.append(body)
            return
        if self._inflate is not None:
            try:
                body = self._inflate.decompress(body)
            except zlib.error as e:
                self._fail(WireError(f"undecodable {self._encoding()} body: {e}"))
                self.close()
                return
        if body:
            self._body.append(body)
            self._buffered += len(body)
            if self._buffered > STREAM_BUFFER and not self._paused and self.transport is not None:
                self._paused = True
                self.transport.pause_reading()
            self._wake()

    def on_message_complete(self) -> None:
        waiter, parser = self._waiter, self._parser
        if waiter is None or self.complete or parser is None or (waiter.done() and not self._streaming):
            return
        self.keep_alive = not self.closed and parser.should_keep_alive()
        if self._streaming:
            if self._inflate is not None:
                try:
                    tail = self._inflate.flush()
                except zlib.error as e:
                    self.keep_alive = False
                    self._fail(WireError(f"undecodable {self._encoding()} body: {e}"))
                    return
                if tail:
                    self._body.append(tail)
                    self._buffered += len(tail)
            self.complete = True
            self._wake()
            return
        body = b"".join(self._body) if len(self._body) != 1 else self._body[0]
        encoding = self._encoding()
        if encoding in ("gzip", "deflate", "x-gzip"):
            try:
                body = zlib.decompress(body, 47)  # 32 + 15: a gzip or zlib header, either one
            except zlib.error as e:
                self.keep_alive = False
                self._fail(WireError(f"undecodable {encoding} body: {e}"))
                return
        self.complete = True
        waiter.set_result((self._status, self._headers, body))

    def _encoding(self) -> str:
        return self._headers.get("content-encoding", "").strip().lower()

    # ---------------------------------------------------------------- use

    def exchange(self, data: bytes, stream: bool = False) -> asyncio.Future[tuple[int, dict[str, str], bytes]]:
        assert self.transport is not None
        self._parser = httptools.HttpResponseParser(self)
        self._status, self._headers, self._body = 0, {}, []
        self._headers_done = self._framed = self.keep_alive = self.answered_bytes = self.complete = False
        self._streaming, self._buffered, self._error, self._inflate = stream, 0, None, None
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return self._waiter

    async def next_chunk(self) -> bytes | None:
        """Streamed: the body's bytes that came since the last call (waits for some), None at its end."""
        while not self._body:
            if self._error is not None:
                raise self._error
            if self.complete:
                return None
            self._more = asyncio.get_running_loop().create_future()
            try:
                await self._more
            finally:
                self._more = None
        chunk = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        self._body = []
        self._buffered = 0
        if self._paused and not self.closed and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return chunk

    def _wake(self) -> None:
        if self._more is not None and not self._more.done():
            self._more.set_result(None)

    def _fail(self, exc: Exception) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)
        elif self._streaming and not self.complete and self._error is None:
            self._error = exc
            self._wake()
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


class WireStream:
    """A streamed answer: ``status``, ``headers`` (lower-case names), then the body through :meth:`chunks`.

    Each wait for more of the body is bounded by the client's timeout (TimeoutError); a connection
    that breaks off raises :class:`WireError`. :meth:`close` (idempotent) hands a finished
    keep-alive connection back to the pool and closes any other.
    """

    def __init__(self, client: WireClient, conn: _Connection, status: int, headers: dict[str, str]) -> None:
        self.status = status
        self.headers = headers
        self._client = client
        self._conn: _Connection | None = conn

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive; the connection is closed or pooled when it ends or fails."""
        try:
            while (conn := self._conn) is not None:
                async with asyncio.timeout(self._client.timeout):
                    chunk = await conn.next_chunk()
                if chunk is None:
                    break
                yield chunk
        finally:
            self.close()

    async def read(self) -> bytes:
        """The rest of the body, whole."""
        return b"".join([chunk async for chunk in self.chunks()])

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._client._done(conn)


class WireClient:
    """Requests to one ``http://host:port`` over a pool of keep-alive connections (bound to one event loop)."""

    def __init__(
        self, base_url: str, headers: Mapping[str, str], *, timeout: float,
        body_headers: Mapping[str, str] | None = None, limit: int | None = None,
    ) -> None:  # fmt: skip
        """``headers`` go with every request, ``body_headers`` only with those that carry a body (a
        ``Content-Type``); ``limit``: at most that many requests in flight (connections open), the rest wait
        for one within their timeout."""
        if not plain_http(base_url):
            raise ValueError(f"WireClient serves plain http:// URLs without query or credentials, not {base_url!r}")
        parts = urlsplit(base_url)
        self.host = parts.hostname or ""
        self.port = parts.port or 80
        self.timeout = timeout
        host = f"[{self.host}]" if ":" in self.host else self.host
        authority = host if self.port == 80 else f"{host}:{self.port}"
        fixed = {"Host": authority, "User-Agent": "synth-agent", "Accept": "application/json", **headers}
        for k, v in {**fixed, **(body_headers or {})}.items():
            if any(c in f"{k}{v}" for c in "\r\n\0"):
                raise ValueError(f"header {k!r} holds a line break or NUL")
        self._fixed = "".join(f"{k}: {v}\r\n" for k, v in fixed.items()).encode("latin-1")
        self._fixed_body = self._fixed + "".join(f"{k}: {v}\r\n" for k, v in (body_headers or {}).items()).encode(
            "latin-1")
        self._slots = asyncio.Semaphore(limit) if limit else None
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()
        self._resolving: asyncio.Future[list[tuple[int, str, int]]] | None = None
        self._resolved_until = 0.0
        self.closed = False

    def head(self, method: str, path: str, length: int | None) -> bytes:
        """The request line and headers of one request (``length``: the body's, None for no body)."""
        line = f"{method} {path} HTTP/1.1\r\n".encode("latin-1")
        if length is None:
            return line + self._fixed + b"\r\n"
        return line + self._fixed_body + b"Content-Length: %d\r\n\r\n" % length

    def _data(self, method: str, path: str, body: bytes | None) -> bytes:
        if self.closed:
            raise WireError("the client is closed")
        return self.head(method, path, None if body is None and method == "GET" else len(body or b"")) + (body or b"")

    async def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
        """(status, headers with lower-case names, body). TimeoutError past the client's ``timeout`` from the
        start of this call (wrap it in ``asyncio.timeout`` for a shorter one); :class:`WireError` or OSError
        when the connection fails."""
        data = self._data(method, path, body)
        async with asyncio.timeout(self.timeout):
            conn, answer = await self._exchange(data, False)
        self._done(conn)
        return answer

    async def stream(self, method: str, path: str, body: bytes | None = None) -> WireStream:
        """The answer once its headers are in (the timeout as for :meth:`request`); its body is read through
        :meth:`WireStream.chunks`. The caller must ``close()`` it (reading it to its end or failing does)."""
        data = self._data(method, path, body)
        async with asyncio.timeout(self.timeout):
            conn, (status, headers, _) = await self._exchange(data, True)
        return WireStream(self, conn, status, headers)

    async def _exchange(self, data: bytes, stream: bool) -> tuple[_Connection, tuple[int, dict[str, str], bytes]]:
        """Send ``data`` on a pooled or new connection (holding a slot of ``limit`` until :meth:`_done`)."""
        if self._slots is not None:
            await self._slots.acquire()
        try:
            while True:
                conn, reused = await self._connection()
                try:
                    return conn, await conn.exchange(data, stream)
                except WireError:
                    self._drop(conn)
                    if reused and not conn.answered_bytes:
                        continue  # an idle connection the server had closed: once more on another one
                    raise
                except BaseException:  # timeout, cancellation: the answer may still come, out of step
                    self._drop(conn)
                    raise
        except BaseException:
            if self._slots is not None:
                self._slots.release()
            raise

    def _done(self, conn: _Connection) -> None:
        """A request is over: its connection goes back to the pool if it can serve another, else closes."""
        if self._slots is not None:
            self._slots.release()
        if conn.complete and conn.keep_alive and not conn.closed and not self.closed:
            self._idle.append(conn)
        else:
            self._drop(conn)

    def _drop(self, conn: _Connection) -> None:
        conn.close()
        self._open.discard(conn)

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
