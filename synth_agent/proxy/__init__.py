"""The OpenAI-compatible personalization proxy (``synth-agent serve``) and its synthesis worker.

    >>> from synth_agent.proxy import create_app, ProxySettings  # doctest: +SKIP
    >>> app = create_app(Settings(), ProxySettings(api_keys="acme:sk-123"))  # doctest: +SKIP
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from synth_agent.proxy.app import create_app
    from synth_agent.proxy.auth import ApiKey, AuthThrottle, KeyRing, RateLimiter, TokenBucket, hash_key
    from synth_agent.proxy.errors import ProxyError
    from synth_agent.proxy.metrics import ProxyMetrics
    from synth_agent.proxy.schemas import Limits, api_models
    from synth_agent.proxy.server import ProxyServer
    from synth_agent.proxy.settings import ProxySettings, parse_model_map
    from synth_agent.proxy.state import Caller, ProxyState
    from synth_agent.proxy.worker import StorePoller, SynthesisWorker

# Loaded on first use, so `synth-agent --help` (which registers `serve`) does not import the app.
_LAZY = {
    "Caller": "state", "ProxyState": "state", "create_app": "app",
    "ApiKey": "auth", "AuthThrottle": "auth", "KeyRing": "auth", "RateLimiter": "auth", "TokenBucket": "auth",
    "hash_key": "auth", "ProxyError": "errors", "ProxyMetrics": "metrics", "ProxyServer": "server",
    "Limits": "schemas", "api_models": "schemas",
    "ProxySettings": "settings", "parse_model_map": "settings",
    "StorePoller": "worker", "SynthesisWorker": "worker",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"synth_agent.proxy.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'synth_agent.proxy' has no attribute {name!r}")

__all__ = [
    "ApiKey",
    "AuthThrottle",
    "Caller",
    "KeyRing",
    "Limits",
    "ProxyError",
    "ProxyMetrics",
    "ProxyServer",
    "ProxySettings",
    "ProxyState",
    "RateLimiter",
    "StorePoller",
    "SynthesisWorker",
    "TokenBucket",
    "api_models",
    "create_app",
    "hash_key",
    "parse_model_map",
]
