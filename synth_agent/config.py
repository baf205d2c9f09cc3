"""Configuration from environment variables (and CLI flags, which override them).

| variable | meaning | default |
|---|---|---|
| ``SYNTH_AGENT_HOME`` | directory for the embedded Chroma store, checkpoints, caches | ``./.synth-agent`` |
| ``CHROMA_HOST`` / ``CHROMA_PORT`` | use a Chroma server over HTTP instead of the embedded store | unset |
| ``OPENAI_BASE_URL`` | OpenAI-compatible endpoint (OpenAI, vLLM, SGLang, Ollama, the simulator) | simulator ``http://127.0.0.1:8765/v1`` |
| ``OPENAI_API_KEY`` | key for that endpoint | ``sim`` |
| ``SYNTH_AGENT_MODEL`` | model name for judge/persona calls | ``sim`` (the simulator's) |
| ``SYNTH_AGENT_MAX_CONCURRENCY`` | most requests in flight per endpoint (the adaptive limit's ceiling) | ``16`` |
| ``SYNTH_AGENT_ADAPTIVE_CONCURRENCY`` | adapt in-flight requests to the server's capacity (``0``: always the maximum) | ``1`` |
| ``SYNTH_AGENT_REQUEST_TIMEOUT`` | seconds per HTTP attempt (time queued on our side never counts) | ``60`` |
| ``SYNTH_AGENT_MAX_RETRIES`` | retries of 429/5xx/timeouts per call | ``6`` |
| ``SYNTH_AGENT_CONTEXT_LENGTH`` | the model's context window in tokens (default: as the server states) | unset |
| ``SYNTH_AGENT_RATE_LIMIT`` | max requests per second per endpoint (0 = unlimited) | ``0`` |
| ``SYNTH_AGENT_MAX_CONTENT_CHARS`` | largest accepted message/response | ``32000`` |
| ``SYNTH_AGENT_LLM_DISK_CACHE`` | also cache temperature-0 LLM answers on disk (they contain users' votes) | ``0`` |
| ``SYNTH_AGENT_LLM_CACHE_MB`` | memory for cached temperature-0 LLM answers, per process (``0``: no memory cache) | ``64`` |
| ``SYNTH_AGENT_LLM_CACHE_ENTRIES`` | most answers in that memory cache (``0``: no memory cache) | ``10000`` |
| ``SYNTH_AGENT_MALLOC_TRIM_S`` | ``serve``: give memory malloc holds free back to the OS every N seconds (glibc) | ``0`` (off) |
| ``SYNTH_AGENT_EVENT_LOOP`` | ``fit``/``eval``/``worker``: ``uvloop`` or ``asyncio`` (see :mod:`synth_agent.runner`) | ``uvloop`` |
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_SIM_URL = "http://127.0.0.1:8765/v1"


class Settings(BaseSettings):
    """Process settings. Construct explicitly (``Settings(home=...)``) or let env vars fill it.

    One convention for ``Settings``, :class:`~synth_agent.llm.EndpointConfig` and
    :class:`~synth_agent.engine.FitConfig`: validated when built, frozen, and **strict in Python**
    (a value of the wrong type is an error naming the field, not a silent conversion), while
    **text from outside is parsed**: environment variables (``SYNTH_AGENT_MAX_CONCURRENCY=4``,
    ``SYNTH_AGENT_ADAPTIVE_CONCURRENCY=0``) and CLI flags. Two conversions are not errors: a path
    may be given as ``str``, and a ``float`` field takes an ``int``.

        >>> Settings(max_concurrency=4, home="data").home
        PosixPath('data')
        >>> Settings(max_concurrency="4")
        Traceback (most recent call last):
        ...
        pydantic_core._pydantic_core.ValidationError: 1 validation error for Settings
        max_concurrency
          Input should be a valid integer [type=int_type, input_value='4', input_type=str]
        ...
    """

    # Validated when loaded (SYNTH_AGENT_MAX_CONCURRENCY=0 fails at start-up, naming the variable), and
    # frozen: a changed copy is ``settings.model_copy(update=...)`` or ``Settings(**overrides)``. Strict:
    # pydantic-settings still parses environment strings for strict models (its env source coerces them).
    model_config = SettingsConfigDict(env_prefix="SYNTH_AGENT_", extra="ignore", populate_by_name=True, frozen=True,
                                      strict=True)

    home: Path = Field(default=Path(".synth-agent"), strict=False)  # a str path is fine
    chroma_host: str | None = Field(default=None, validation_alias="CHROMA_HOST")
    chroma_port: int = Field(default=8000, ge=1, le=65535, validation_alias="CHROMA_PORT")
    base_url: str = Field(default=DEFAULT_SIM_URL, min_length=1, validation_alias="OPENAI_BASE_URL")
    api_key: str = Field(default="sim", validation_alias="OPENAI_API_KEY")
    model: str = Field(default="sim", min_length=1)
    max_concurrency: int = Field(default=16, ge=1)
    adaptive_concurrency: bool = True
    rate_limit: float = Field(default=0.0, ge=0)
    request_timeout: float = Field(default=60.0, gt=0)
    max_retries: int = Field(default=6, ge=0)
    context_length: int | None = Field(default=None, ge=1)
    structured_output: Literal["json_object", "json_schema", "json_object_schema"] = "json_object"
    prefix_warmup_tokens: int = Field(default=0, ge=0)
    max_content_chars: int = Field(default=32_000, ge=1)
    llm_disk_cache: bool = False
    llm_cache_mb: float = Field(default=64.0, ge=0)
    llm_cache_entries: int = Field(default=10_000, ge=0)
    malloc_trim_s: float = Field(default=0.0, ge=0)

    @property
    def uses_simulator(self) -> bool:
        return self.base_url.rstrip("/") == DEFAULT_SIM_URL.rstrip("/") or self.api_key == "sim"
