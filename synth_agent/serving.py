"""Serve an ASGI app with uvicorn on a loopback port in a background thread.

Tests, benchmarks, examples and notebooks need a *real* HTTP server (real clients,
real sockets) without a separate process; :class:`ThreadedServer` is that, once,
for the simulator endpoint and the proxy alike.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import os
import socket
import sys
import threading
import time
from collections.abc import Coroutine
from typing import Any, Literal, Self, TypeVar

import httpx
import uvicorn

from store.malloc import malloc_trim_function
from synth_agent.runner import freeze_heap

T = TypeVar("T")


SERVE_GC_GEN1 = 50
"""Generation-0 collections per generation-1 collection in a serving process (Python's default: 10)."""


def freeze_heap_after_startup(app: Any) -> Any:
    """Wrap an ASGI app so that, once its lifespan startup completes, the heap built so far is frozen.

    A server process imports Chroma, LangGraph, pydantic models and the embedding model
    before it serves: ~240k long-lived objects that every full (generation 2) collection
    would walk again, stalling the event loop for 100-350 ms on this machine, which shows
    up as the p99 of every request in flight. :func:`gc.freeze` moves them to the permanent
    generation (after one collection, so startup garbage is not kept), and later
    collections only see what the server allocates while serving. Meant for the process
    owner (``synth-agent serve``), not for apps embedded in a larger process.

    It also collects generation 1 less often (:data:`SERVE_GC_GEN1` generation-0 passes
    per generation-1 pass instead of Python's 10). Under a write burst ~200 requests are in
    flight, each holding its objects for a few hundred ms: every generation-1 pass walked
    them all again (~5 ms of CPU each, 12 in a 1,000-vote burst) and promoted them to
    generation 2, whose pass then took ~20 ms with every request waiting. With 50, most of
    those objects are freed by their reference counts before a pass sees them: the
    collector's CPU during the burst fell from ~110 to ~40 ms (docs/store.md). Generation 0
    (which bounds how long cyclic garbage waits) and generation 2 keep their thresholds.
    """

    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await app(scope, receive, send)
            return

        async def send_and_freeze(message: Any) -> None:
            if message["type"] == "lifespan.startup.complete":
                freeze_heap()
                gen0, gen1, gen2 = gc.get_threshold()
                gc.set_threshold(gen0, max(gen1, SERVE_GC_GEN1), gen2)
            await send(message)

        await app(scope, receive, send_and_freeze)

    return wrapped


ACCEPT_LISTENERS = 64
"""Descriptors of the one listening socket a serving process polls (see :func:`accept_listeners`)."""


def accept_listeners(sock: socket.socket, n: int = ACCEPT_LISTENERS) -> list[socket.socket]:
    """``sock`` and ``n - 1`` duplicates of its descriptor, to pass together as uvicorn's ``sockets``.

    libuv (under uvloop, which uvicorn picks when installed) accepts **one** connection per turn
    of the event loop on each listening handle (libuv/libuv#3696). When 200 clients connect at
    once the kernel completes every handshake and the clients send their first request, but
    the server takes them one per loop turn, and under a write burst a turn lasts 10-25 ms:
    `ss` showed 65-85 established connections waiting in the accept queue, and their first
    requests waited up to 1.5 s (the p99 of ``bench/vote_write.py``'s bad rounds). Each
    duplicate is a handle of its own on the **same** socket (one accept queue, one port, no
    ``SO_REUSEPORT``: a second server on the port still fails to bind), so the loop accepts up
    to ``n`` connections per turn. An idle server sees no difference (nothing is readable); a
    new connection wakes every handle, and all but one get ``EAGAIN`` from ``accept`` inside libuv
    (no Python callback). 64, not 16: with 16 the 200 connections of ``bench/vote_write.py`` took 13
    turns, and the last ones' first requests reached the handler ~120-320 ms after they were sent,
    the write p99 of the burst (``--trace``, docs/store.md, 2026-12-01 session 27).
    The caller closes every returned socket.
    """
    return [sock, *(sock.dup() for _ in range(max(0, n - 1)))]


MALLOC_ARENAS = 2
"""glibc malloc arenas for a serving process and its Chroma child (unless ``MALLOC_ARENA_MAX`` is set)."""


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas in this process (``mallopt(M_ARENA_MAX)``); True if it was set.

    glibc gives each thread that meets a locked arena a new one, up to 8 per core, and memory
    freed in one arena is not reused by the others: a server with many short-lived worker
    threads (``asyncio.to_thread``, ONNX Runtime, SQLite) keeps growing its heap. Measured with
    ``bench/soak.py`` (10 minutes, 15 requests/s, the issue's mix): the server's RSS slope after
    warm-up fell from 4.8 to 2.5 MB/min with 2 arenas (docs/store.md, "Memory over time").
    Leaves the process alone when ``MALLOC_ARENA_MAX`` is set (glibc read it at start) and
    off glibc (musl, macOS), where there is no such call. Meant for the process owner.
    """
    if os.environ.get("MALLOC_ARENA_MAX") or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_arena_max = -8  # <malloc.h>
    return bool(mallopt(m_arena_max, arenas) == 1)


class MallocTrimmer(threading.Thread):
    """Every ``interval`` seconds, glibc's ``malloc_trim(0)``: hands memory malloc holds free back to the OS.

    Freed Python and native memory often stays in malloc's heaps (fragmented, or in arenas no
    thread uses now) and counts as RSS; at the end of a 10-minute soak ``malloc_trim`` gave back
    ~40 MB of a ~400 MB server. ``synth-agent serve`` runs one when ``SYNTH_AGENT_MALLOC_TRIM_S``
    is above 0 (off by default: in the soak, trimming every 60 s ended the server 44 MB lower
    with the same RSS slope, so it lowers the level, not the growth). The call runs without the
    GIL (ctypes releases it); ``durations`` keeps the last 100 (seconds). Daemon thread.
    """

    def __init__(self, interval: float) -> None:
        super().__init__(name="malloc-trim", daemon=True)
        self.interval = interval
        self.durations: list[float] = []
        self._stop_event = threading.Event()
        trim = malloc_trim_function()
        if trim is None:
            raise OSError("glibc's malloc_trim is not available in this process")
        self._trim = trim

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            t = time.perf_counter()
            self._trim(0)
            self.durations = [*self.durations[-99:], time.perf_counter() - t]

    def stop(self) -> None:
        self._stop_event.set()


def start_malloc_trimmer(interval: float) -> MallocTrimmer | None:
    """A running :class:`MallocTrimmer`, or None (``interval`` <= 0, or not glibc)."""
    if interval <= 0 or not sys.platform.startswith("linux"):
        return None
    try:
        trimmer = MallocTrimmer(interval)
    except OSError:  # not glibc
        return None
    trimmer.start()
    return trimmer


SERVE_SWITCH_INTERVAL = 0.001
"""GIL switch interval of a server process (seconds; Python's default is 0.005)."""


def favour_the_event_loop(interval: float = SERVE_SWITCH_INTERVAL) -> None:
    """Shorten the GIL switch interval so the event loop waits less for the GIL.

    The event loop releases the GIL at every poll for I/O; to continue it must get it back
    from whichever thread took it (the intake journal's appender and drain, the store's
    writer and embedding threads run Python between their native calls), and a thread that
    holds the GIL is asked to drop it only after the switch interval. At Python's default of
    5 ms each turn of a busy loop could wait up to that long, which shows in the latency of
    every request and of ``/healthz``; at 1 ms the wait is shorter, for a few more GIL hand-offs
    in the background threads. Process-wide, so meant for the process owner (``synth-agent
    serve``); measured with ``bench/vote_write.py`` (docs/store.md).
    """
    sys.setswitchinterval(interval)


class _LoopServer(uvicorn.Server):
    """Remembers its event loop so other threads can schedule work on it."""

    loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets=sockets)


class ThreadedServer:
    """``with ThreadedServer(app) as srv:`` serves ``app`` at ``srv.url`` until the block ends.

    The socket is bound before the thread starts (so ``port=0`` picks a free port
    race-free) with ``IPPROTO_TCP`` given explicitly: asyncio only sets TCP_NODELAY
    then, and without it every request stalls ~40 ms on Nagle + delayed ACK.
    """

    health_path = "/healthz"

    def __init__(
        self,
        app: Any,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        startup_timeout: float = 30.0,
        lifespan: Literal["auto", "on", "off"] = "on",
        shutdown_timeout: float = 5.0,
        name: str = "asgi",
    ) -> None:
        self.app = app
        self.host = host
        self._port = port
        self._startup_timeout = startup_timeout
        self._lifespan = lifespan
        self._shutdown_timeout = shutdown_timeout
        self._name = name
        self._server: _LoopServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        loop = self._server.loop if self._server is not None else None
        if loop is None:
            raise RuntimeError("the server is not running")
        return loop

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 120.0) -> T:
        """Run ``coro`` on the server's event loop (where the app's own objects live)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> Self:
        if self._thread is not None:
            raise RuntimeError(f"{type(self).__name__} is already running")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self._port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app, log_level="warning", lifespan=self._lifespan, loop="asyncio",
            timeout_graceful_shutdown=max(1, int(self._shutdown_timeout)),
        )
        server = _LoopServer(config)
        self._server = server
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name=f"{self._name}-{self.port}", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + self._startup_timeout
        while True:
            try:
                if server.started and httpx.get(self.url + self.health_path, timeout=2.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{type(self).__name__} did not come up on {self.url}")
            time.sleep(0.02)

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.should_exit = True
        if thread is not None:
            thread.join(timeout=self._shutdown_timeout * 4)
            if thread.is_alive() and server is not None:
                server.force_exit = True
                thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        return await asyncio.to_thread(self.start)

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.stop)
