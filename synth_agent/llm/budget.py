"""Prompt budgets: does a prompt fit the model's context window, before it is sent?

A self-hosted server refuses a prompt longer than its window (llama.cpp: HTTP 400 after
reading nothing; the caller loses the call, and in a fit, minutes of work). Call sites
that can shorten their prompt (the judge drops demos, the persona writer drops examples)
ask :func:`fits` first and shorten until it says yes; a prompt that cannot be shortened
enough raises :class:`PromptTooLongError`, which names the limit.

The window is the backend's ``context_length`` (configured with
``EndpointConfig.context_length`` / ``SYNTH_AGENT_CONTEXT_LENGTH``, or stated by the server:
llama.cpp's llama-server, SGLang and vLLM report it; llama-cpp-python's server does not, so
``synth-agent judge-server llamacpp`` prints the setting). Without a known window nothing
is trimmed. Tokens are *estimated* from characters (no tokenizer download): conservative on
purpose, so an estimate that says "fits" is a prompt the server takes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

from synth_agent.llm.errors import ContextOverflowError

__all__ = ["CHARS_PER_TOKEN", "PromptTooLongError", "context_length", "estimate_tokens", "fits", "note", "too_long"]

CHARS_PER_TOKEN = 3.0
"""Characters per token assumed by :func:`estimate_tokens`. BPE tokenizers of current chat models read
~3.5–4.5 characters of English prose per token (SmolLM2 on our judge prompts: measured in
``bench/real_model.py``); 3 leaves room for code, markup and non-English text."""
PER_MESSAGE = 8
"""Chat-template tokens per message (role markers, separators) plus the assistant header."""


class PromptTooLongError(ContextOverflowError):
    """Even the shortest prompt a call site can make does not fit the model's context window."""


def _unwrap(llm: Any) -> Any:
    """The backend under wrappers that hold it as ``inner`` (counting, recording, test taps)."""
    seen = 0
    while hasattr(llm, "inner") and seen < 16:
        llm, seen = llm.inner, seen + 1
    return llm


def context_length(llm: Any) -> int | None:
    """The backend's context window in tokens, when it knows one."""
    value = getattr(_unwrap(llm), "context_length", None)
    return value if isinstance(value, int) and value > 0 else None


def estimate_tokens(messages: Sequence[dict[str, str]]) -> int:
    """A conservative token count of a chat prompt (see :data:`CHARS_PER_TOKEN`).

        >>> estimate_tokens([{"role": "user", "content": "x" * 300}])
        116
    """
    chars = sum(len(m.get("content", "")) for m in messages)
    return math.ceil(chars / CHARS_PER_TOKEN) + PER_MESSAGE * (len(messages) + 1)


def fits(llm: Any, messages: Sequence[dict[str, str]], max_tokens: int | None) -> bool:
    """Whether ``messages`` plus ``max_tokens`` of answer fit ``llm``'s window (True when it states none)."""
    window = context_length(llm)
    return window is None or estimate_tokens(messages) + (max_tokens or 0) <= window


def too_long(llm: Any, messages: Sequence[dict[str, str]], max_tokens: int | None, *, call_site: str, what: str) -> PromptTooLongError:
    """The error for a prompt that cannot be shortened enough: names the window and what to do."""
    window = context_length(llm)
    need = estimate_tokens(messages) + (max_tokens or 0)
    return PromptTooLongError(
        f"the {what} at call site {call_site!r} needs about {need} tokens ({estimate_tokens(messages)} of prompt "
        f"+ {max_tokens or 0} of answer) even at its shortest, over the model's context window of {window} tokens. "
        "Serve the model with a larger window (judge-server --ctx-size) or shorten the votes' texts.",
        context_length=window,
        call_site=call_site,
    )


def note(llm: Any, call_site: str, counter: Literal["unparseable", "trimmed"], n: int = 1) -> None:
    """Add ``n`` to a call site's ``unparseable`` or ``trimmed`` counter, in the backend's own counters."""
    base = _unwrap(llm)
    record = getattr(base, "note", None)
    if callable(record):
        record(call_site, counter, n)
    else:
        site = base.stats.site(call_site)
        setattr(site, counter, getattr(site, counter) + n)
