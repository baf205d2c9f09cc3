"""The OpenAI-compatible personalization proxy (``synth-agent serve``) and its synthesis worker.

    >>> from synth_agent.proxy import create_app, ProxySettings  # doctest: +SKIP
    >>> app = create_app(Settings(), ProxySettings(api_keys="acme:sk-123"))  # doctest: +SKIP
"""

from synth_agent.proxy.app import Caller, ProxyState, create_app
from synth_agent.proxy.auth import ApiKey, KeyRing, RateLimiter, TokenBucket, hash_key
from synth_agent.proxy.errors import ProxyError
from synth_agent.proxy.metrics import ProxyMetrics
from synth_agent.proxy.server import ProxyServer
from synth_agent.proxy.settings import ProxySettings, parse_model_map
from synth_agent.proxy.worker import StorePoller, SynthesisWorker

__all__ = [
    "ApiKey",
    "Caller",
    "KeyRing",
    "ProxyError",
    "ProxyMetrics",
    "ProxyServer",
    "ProxySettings",
    "ProxyState",
    "RateLimiter",
    "StorePoller",
    "SynthesisWorker",
    "TokenBucket",
    "create_app",
    "hash_key",
    "parse_model_map",
]
