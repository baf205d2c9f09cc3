"""LLM client layer: the :class:`ChatBackend` interface and its OpenAI-compatible implementation.

The client and caches are imported lazily so that modules needing only the
interface (``synth_agent.llm.base``) do not pay for importing langchain/openai.
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

if TYPE_CHECKING:
    from synth_agent.llm.cache import MemoryCache, ResponseCache, SqliteCache
    from synth_agent.llm.client import EndpointConfig, LLMClient, LLMError, RetryEvent, parse_structured
    from synth_agent.llm.pool import EndpointPool, PoolConfig

_LAZY = {
    "EndpointConfig": "synth_agent.llm.client",
    "LLMClient": "synth_agent.llm.client",
    "LLMError": "synth_agent.llm.client",
    "RetryEvent": "synth_agent.llm.client",
    "parse_structured": "synth_agent.llm.client",
    "MemoryCache": "synth_agent.llm.cache",
    "ResponseCache": "synth_agent.llm.cache",
    "SqliteCache": "synth_agent.llm.cache",
    "EndpointPool": "synth_agent.llm.pool",
    "PoolConfig": "synth_agent.llm.pool",
}

__all__ = [
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
