"""Run a proxy app with uvicorn on a loopback port in a background thread (tests, benchmarks, notebooks)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import httpx
import uvicorn
from fastapi import FastAPI

T = TypeVar("T")

__all__ = ["ProxyServer"]


class ProxyServer:
    """``with ProxyServer(app) as srv:`` serves ``app`` (lifespan on) at ``srv.base_url`` (``.../v1``).

    :meth:`call` runs a coroutine on the server's event loop, where the app's store,
    scheduler and clients live (e.g. ``srv.call(state.scheduler.wait_idle())``).
    """

    def __init__(self, app: FastAPI, *, host: str = "127.0.0.1", port: int = 0, startup_timeout: float = 60.0):
        self.app = app
        self.host = host
        self._port = port
        self._startup_timeout = startup_timeout
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        loop = getattr(self._server, "_loop", None)
        if loop is None:
            raise RuntimeError("the server is not running")
        return loop  # type: ignore[no-any-return]

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 120.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> ProxyServer:
        if self._thread is not None:
            raise RuntimeError("ProxyServer is already running")
        # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only then (else ~40 ms Nagle stalls)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self._port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", lifespan="on", loop="asyncio",
                                timeout_graceful_shutdown=5)
        server = _LoopServer(config)
        self._server = server
        self._thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]},
                                        name=f"synth-proxy-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self._startup_timeout
        while True:
            try:
                if server.started and httpx.get(f"{self.url}/healthz", timeout=2.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the proxy did not come up on {self.url}")
            time.sleep(0.02)

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.should_exit = True
        if thread is not None:
            thread.join(timeout=20)
            if thread.is_alive() and server is not None:
                server.force_exit = True
                thread.join(timeout=5)

    def __enter__(self) -> ProxyServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _LoopServer(uvicorn.Server):
    """Remembers its event loop so other threads can schedule work on it."""

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets=sockets)
