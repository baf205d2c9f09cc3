"""What a self-hosted server says about itself: how many requests it serves at once, its context length.

Read once per client (and event loop) before the first request, from whatever the
server exposes; every probe is optional and a server that answers none of them
(OpenAI, Ollama, the simulator in its default mode) simply states nothing:

| server | capacity (requests served at once) | context length |
|---|---|---|
| llama.cpp ``llama-server`` | ``GET /props`` → ``total_slots`` (``/slots`` list as fallback) | ``/props`` → ``default_generation_settings.n_ctx`` |
| SGLang | ``GET /get_server_info`` → ``max_running_requests`` | ``… → context_length`` when present |
| vLLM | — (the adaptive limiter learns it from latency) | ``GET /v1/models`` → ``max_model_len`` |

The capacity caps :class:`~synth_agent.llm.limiter.AdaptiveLimiter`; the context
length is exposed as ``LLMClient.context_length`` for prompt budgets.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["ServerInfo", "probe_server", "server_root"]

GetJson = Callable[[str], Awaitable[Any]]
"""``get_json(url)``: the parsed JSON body of a 200 answer, or None (any failure)."""


@dataclass(frozen=True)
class ServerInfo:
    capacity: int | None = None
    context_length: int | None = None
    source: str = ""
    """Which endpoint(s) said so, e.g. ``"/props"``."""


def server_root(base_url: str) -> str:
    """``http://host:8080/v1`` → ``http://host:8080`` (llama.cpp and SGLang serve their extras at the root)."""
    url = base_url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def _positive_int(v: Any) -> int | None:
    try:
        n = int(v)
    except (TypeError, ValueError):
        return None
    return n if n > 0 else None


async def probe_server(get_json: GetJson, base_url: str, model: str) -> ServerInfo:
    """Ask the server (concurrently) what it states; never raises."""
    root = server_root(base_url)
    props, sglang, models = await asyncio.gather(
        get_json(root + "/props"), get_json(root + "/get_server_info"), get_json(base_url.rstrip("/") + "/models"),
        return_exceptions=True,
    )  # fmt: skip
    capacity = context = None
    sources = []
    if isinstance(props, dict):
        capacity = _positive_int(props.get("total_slots"))
        gen = props.get("default_generation_settings")
        context = _positive_int(gen.get("n_ctx")) if isinstance(gen, dict) else None
        if capacity or context:
            sources.append("/props")
    if capacity is None and isinstance(props, dict) and "total_slots" not in props:
        slots = await get_json(root + "/slots")
        if isinstance(slots, list) and slots:
            capacity = len(slots)
            sources.append("/slots")
    if isinstance(sglang, dict):
        cap = _positive_int(sglang.get("max_running_requests"))
        ctx = _positive_int(sglang.get("context_length"))
        if cap or ctx:
            capacity = capacity or cap
            context = context or ctx
            sources.append("/get_server_info")
    if context is None and isinstance(models, dict) and isinstance(models.get("data"), list):
        for m in models["data"]:
            if isinstance(m, dict) and (m.get("id") == model or len(models["data"]) == 1):
                if ctx := _positive_int(m.get("max_model_len")):
                    context = ctx
                    sources.append("/v1/models")
                    break
    return ServerInfo(capacity=capacity, context_length=context, source=", ".join(sources))
