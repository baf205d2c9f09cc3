"""Proxy settings: upstream, auth, limits and background synthesis, from env vars or CLI flags.

| variable | meaning | default |
|---|---|---|
| ``SYNTH_AGENT_UPSTREAM_BASE_URL`` | where chat completions are forwarded | ``OPENAI_BASE_URL`` |
| ``SYNTH_AGENT_UPSTREAM_API_KEY`` | key sent upstream (clients' keys are never forwarded) | ``OPENAI_API_KEY`` |
| ``SYNTH_AGENT_UPSTREAM_TRANSPORT`` | ``lean``: the project's HTTP/1.1 client for an ``http://`` upstream (aiohttp for ``https://``); ``aiohttp``: aiohttp for every upstream | ``lean`` |
| ``SYNTH_AGENT_MODEL_MAP`` | ``client-model=upstream-model,...``; ``*`` matches any model | forward as is |
| ``SYNTH_AGENT_API_KEYS`` | ``tenantA:key1,tenantB:key2`` | unset |
| ``SYNTH_AGENT_KEYS_FILE`` | JSON or TOML key file (see :mod:`synth_agent.proxy.auth`) | unset |
| ``SYNTH_AGENT_NO_AUTH`` | dev mode: no keys, everything is tenant ``default`` | ``false`` |
| ``SYNTH_AGENT_KEY_RATE_LIMIT`` / ``_KEY_BURST`` | requests per second / bucket size per API key | ``20`` / ``40`` |
| ``SYNTH_AGENT_AUTH_FAILURE_RATE`` / ``_BURST`` | failed authentications per second / in a burst, per client address, before 429 | ``1`` / ``20`` |
| ``SYNTH_AGENT_MAX_BODY_BYTES`` / ``_MAX_JSON_DEPTH`` | largest request body / deepest JSON nesting accepted | ``1048576`` / ``64`` |
| ``SYNTH_AGENT_MAX_MESSAGES`` / ``_MAX_CANDIDATES`` / ``_MAX_BATCH_VOTES`` | messages per conversation / rerank candidates / votes per request | ``256`` / ``8`` / ``1000`` |
| ``SYNTH_AGENT_SYNTHESIS`` | ``inline`` (in this process) or ``off`` (a ``synth-agent worker`` does it) | ``inline`` |
| ``SYNTH_AGENT_QUEUE`` | scale-out mode: a Postgres DSN; votes enqueue fits for ``synth-agent worker --queue`` (docs/deploy.md) | unset |
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def parse_model_map(spec: str | dict[str, str] | None) -> dict[str, str]:
    """``"gpt-4o=llama3,*=qwen"`` → ``{"gpt-4o": "llama3", "*": "qwen"}``; raises ValueError on a bad entry."""
    if spec is None or spec == "":
        return {}
    if isinstance(spec, dict):
        return {str(k): str(v) for k, v in spec.items()}
    out: dict[str, str] = {}
    for part in spec.split(","):
        if not part.strip():
            continue
        src, sep, dst = part.partition("=")
        if not sep or not src.strip() or not dst.strip():
            raise ValueError(f"model map entry {part!r} must look like client-model=upstream-model")
        out[src.strip()] = dst.strip()
    return out


class ProxySettings(BaseSettings):
    """What ``synth-agent serve`` needs beyond the core :class:`~synth_agent.config.Settings`."""

    model_config = SettingsConfigDict(env_prefix="SYNTH_AGENT_", extra="ignore", populate_by_name=True)

    host: str = "127.0.0.1"
    port: int = 8080
    upstream_base_url: str | None = None
    upstream_api_key: str | None = None
    model_map: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)
    default_model: str | None = Field(default=None, description="for /v1/ab and /v1/rerank bodies without one")
    upstream_timeout: float = Field(default=60.0, gt=0)
    upstream_retries: int = Field(default=3, ge=0)
    upstream_backoff: float = Field(default=0.05, ge=0, description="first retry delay, doubled per attempt")
    upstream_backoff_max: float = Field(default=2.0, ge=0)
    upstream_transport: Literal["lean", "aiohttp"] = Field(
        default="lean", description="lean: own HTTP/1.1 client for http:// upstreams (aiohttp for https://); aiohttp"
    )

    api_keys: str | None = None
    keys_file: Path | None = None
    no_auth: bool = False
    key_rate_limit: float = Field(default=20.0, ge=0, description="requests/second per key; 0 = unlimited")
    key_burst: int = Field(default=40, ge=1)
    auth_failure_rate: float = Field(default=1.0, ge=0, description="failed auths/second per client address; 0 = off")
    auth_failure_burst: int = Field(default=20, ge=1)

    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    max_json_depth: int = Field(default=64, ge=4, le=512)
    max_messages: int = Field(default=256, ge=1)
    max_batch_votes: int = Field(default=1000, ge=1)
    max_candidates: int = Field(default=8, ge=2)

    persona_ttl: float = Field(default=30.0, ge=0, description="seconds a cached persona is trusted")
    synthesis: Literal["inline", "off"] = "inline"
    queue: str | None = Field(default=None, description="Postgres DSN of the synthesis job queue (scale-out mode)")
    drain_timeout: float = Field(default=10.0, ge=0, description="shutdown: let running syntheses finish")
    poll_interval: float | None = Field(
        default=None, description="inline mode: also poll the store every N seconds (other writers)"
    )

    @field_validator("model_map", mode="before")
    @classmethod
    def _model_map(cls, v: object) -> dict[str, str]:
        if v is None or isinstance(v, str | dict):
            return parse_model_map(v)
        raise ValueError("model_map must be 'a=b,c=d' or a mapping")

    def upstream_model(self, model: str) -> str:
        return self.model_map.get(model) or self.model_map.get("*") or model
