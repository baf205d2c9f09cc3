"""LLM client layer: the :class:`ChatBackend` interface and its OpenAI-compatible implementation.

* :mod:`~synth_agent.llm.base` — the protocol and value types; :mod:`~synth_agent.llm.errors` — typed errors;
* :mod:`~synth_agent.llm.client` — :class:`LLMClient`: one endpoint with adaptive concurrency
  (:mod:`~synth_agent.llm.limiter`), retries, cache, structured output and counters, over a
  :mod:`~synth_agent.llm.transport` (lean aiohttp wire client, or ChatOpenAI);
* :mod:`~synth_agent.llm.pool` — :class:`EndpointPool`: several endpoints as one.

The client, pool and caches are imported lazily so that modules needing only the
interface do not pay for importing aiohttp/langchain.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from synth_agent.llm.base import (
    CallSiteStats,
    ChatBackend,
    ChatMessage,
    Completion,
    LLMStats,
    TokenLogprob,
)
from synth_agent.llm.errors import (
    ContextOverflowError,
    InvalidRequestError,
    LLMError,
    LLMTimeoutError,
    RateLimitedError,
    RejectedError,
    UnavailableError,
    UnparseableResponseError,
)

if TYPE_CHECKING:
    from synth_agent.llm.cache import MemoryCache, ResponseCache, SqliteCache
    from synth_agent.llm.client import EndpointConfig, LLMClient, RetryEvent, parse_structured
    from synth_agent.llm.limiter import AdaptiveLimiter
    from synth_agent.llm.pool import EndpointPool, PoolConfig

_LAZY = {
    "EndpointConfig": "synth_agent.llm.client",
    "LLMClient": "synth_agent.llm.client",
    "AdaptiveLimiter": "synth_agent.llm.limiter",
    "RetryEvent": "synth_agent.llm.client",
    "parse_structured": "synth_agent.llm.client",
    "MemoryCache": "synth_agent.llm.cache",
    "ResponseCache": "synth_agent.llm.cache",
    "SqliteCache": "synth_agent.llm.cache",
    "EndpointPool": "synth_agent.llm.pool",
    "PoolConfig": "synth_agent.llm.pool",
}

__all__ = [
    "AdaptiveLimiter",
    "ContextOverflowError",
    "InvalidRequestError",
    "LLMTimeoutError",
    "RateLimitedError",
    "RejectedError",
    "UnavailableError",
    "UnparseableResponseError",
    "EndpointPool",
    "PoolConfig",
    "CallSiteStats",
    "ChatBackend",
    "ChatMessage",
    "Completion",
    "LLMStats",
    "TokenLogprob",
    "EndpointConfig",
    "LLMClient",
    "LLMError",
    "RetryEvent",
    "parse_structured",
    "MemoryCache",
    "ResponseCache",
    "SqliteCache",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'synth_agent.llm' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
