"""Run a proxy app with uvicorn on a loopback port in a background thread (tests, benchmarks, notebooks)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fastapi import FastAPI

from synth_agent.serving import ThreadedServer

__all__ = ["ProxyServer"]


class ProxyServer(ThreadedServer):
    """``with ProxyServer(app) as srv:`` serves ``app`` (lifespan on) at ``srv.base_url`` (``.../v1``).

    :meth:`call` runs a coroutine on the server's event loop, where the app's store,
    scheduler and clients live (e.g. ``srv.call(state.scheduler.wait_idle())``).

    ``close``: objects handed to ``create_app`` (an ``LLMClient``, say) that the caller owns
    but that live on the server's loop once it serves; their ``aclose()`` runs there before
    the server stops (an aiohttp session closed elsewhere, or never, warns "Unclosed client session").
    """

    def __init__(self, app: FastAPI, *, host: str = "127.0.0.1", port: int = 0, startup_timeout: float = 60.0,
                 close: Iterable[Any] = ()):
        super().__init__(app, host=host, port=port, startup_timeout=startup_timeout, lifespan="on",
                         shutdown_timeout=5.0, name="synth-proxy")
        self._close = list(close)

    def stop(self) -> None:
        if self._server is not None and self._server.loop is not None:
            for obj in self._close:
                self.call(obj.aclose(), timeout=10.0)
        super().stop()
