"""The LLM interface the engine, judge and graphs program against.

Anything that can answer chat messages implements :class:`ChatBackend`: a single
endpoint client (:class:`synth_agent.llm.client.LLMClient`) or a pool of them.
Retries, throttling, caching and accounting live behind this interface, never at
call sites; call sites only name themselves (``call_site="bootstrap"``) so the
counters can say where requests and tokens went.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, runtime_checkable

from pydantic import BaseModel

ChatMessage = dict[str, str]
T = TypeVar("T", bound=BaseModel)


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float


@dataclass(frozen=True)
class Completion:
    """One model answer plus what it cost."""

    text: str
    model: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    """Of ``prompt_tokens``, those the server served from its prefix cache (``usage.prompt_tokens_details.
    cached_tokens``: OpenAI, vLLM with ``--enable-prompt-tokens-details``, SGLang); 0 when it does not say."""
    cached: bool = False
    top_logprobs: list[list[TokenLogprob]] | None = None
    """Per generated token, the alternatives with their log-probabilities (when requested and supported)."""
    attempts: int = 1
    """HTTP attempts this answer took (retries included); 0 when served from the cache."""


@dataclass
class CallSiteStats:
    requests: int = 0
    retries: int = 0
    cache_hits: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    """Of ``prompt_tokens``, those the server reported as read from its prefix cache (not computed again)."""
    unparseable: int = 0
    """Answers the call site could not read (each re-ask counts): what a weak model or a cut-off answer costs."""
    trimmed: int = 0
    """Prompts the call site shortened (demos or examples dropped) to fit the model's context window."""

    def add(self, other: CallSiteStats) -> None:
        for f in ("requests", "retries", "cache_hits", "errors", "prompt_tokens", "completion_tokens",
                  "cached_prompt_tokens", "unparseable", "trimmed"):  # fmt: skip
            setattr(self, f, getattr(self, f) + getattr(other, f))


@dataclass
class LLMStats:
    """Counters per call site. ``requests`` counts HTTP attempts that reached the endpoint (retries included)."""

    by_site: dict[str, CallSiteStats] = field(default_factory=dict)

    def site(self, name: str) -> CallSiteStats:
        return self.by_site.setdefault(name, CallSiteStats())

    def total(self) -> CallSiteStats:
        t = CallSiteStats()
        for s in self.by_site.values():
            t.add(s)
        return t

    def as_dict(self) -> dict[str, dict[str, int]]:
        out = {k: vars(v).copy() for k, v in sorted(self.by_site.items())}
        out["total"] = vars(self.total()).copy()
        return out


@runtime_checkable
class ChatBackend(Protocol):
    """What the engine needs from an LLM endpoint (or a pool of endpoints)."""

    model: str

    @property
    def stats(self) -> LLMStats:
        """Request, token and retry counters per call site (read-only: a pool sums its members')."""
        ...

    async def complete(
        self,
        messages: Sequence[ChatMessage],
        *,
        call_site: str = "default",
        temperature: float = 0.0,
        max_tokens: int | None = None,
        json_mode: bool = False,
        logprobs: int | None = None,
        seed: int | None = None,
        extra: dict[str, Any] | None = None,
        schema: dict[str, Any] | None = None,
    ) -> Completion:
        """Answer ``messages``. Temperature-0 answers may be served from the cache.

        ``schema`` (with ``json_mode``): the JSON schema the answer must follow. Endpoints configured
        for constrained decoding (``EndpointConfig.structured_output``) enforce it while decoding;
        others ask for any JSON and leave the reading to the call site's parser.
        """
        ...

    async def structured(
        self,
        messages: Sequence[ChatMessage],
        schema: type[T],
        *,
        call_site: str = "default",
        temperature: float = 0.0,
        max_tokens: int | None = None,
    ) -> T:
        """Answer ``messages`` as an instance of ``schema`` (JSON mode + tolerant parsing, retried on garbage)."""
        ...

    async def aclose(self) -> None: ...
