"""A test client of the proxy app with FastAPI's and Starlette's own layers broken.

The hot routes (``POST /v1/votes``, ``POST /v1/chat/completions``) are answered past those layers
(``ProxyApp.serve_directly``); through this client only they still work, anything else fails with a 500.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx


@asynccontextmanager
async def direct_only_client(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    """Start ``app``'s lifespan, then break its middleware stack and yield a client of it."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:

            async def broken(scope: Any, receive: Any, send: Any) -> None:
                raise RuntimeError("FastAPI's stack was used")

            app.middleware_stack = broken
            yield client
