"""Typed errors of the LLM client layer: callers branch on the class, never on message text.

Every failure that leaves :class:`~synth_agent.llm.client.LLMClient` or
:class:`~synth_agent.llm.pool.EndpointPool` is an :class:`LLMError`; the subclass
says what went wrong and so what a caller can do about it::

    LLMError                      base: endpoint, call_site, status, retry_after, attempts, cause
    ├── RateLimitedError          429 after every retry (server-stated Retry-After in .retry_after)
    ├── UnavailableError          5xx, dropped connections, "server busy" after every retry
    │   └── LLMTimeoutError       the endpoint did not answer within EndpointConfig.timeout
    ├── RejectedError             a 4xx the endpoint will refuse again (401, 403, 404 ...): not retried
    │   └── InvalidRequestError   400 / 413 / 422: the request itself is bad, every endpoint would refuse it
    │       └── ContextOverflowError   the prompt does not fit the model's context window
    └── UnparseableResponseError  the endpoint answered, but not with a usable chat completion /
                                  structured answer

Classification happens once, in :func:`error_for_status` (HTTP status, the OpenAI error
``code``, and the wording llama.cpp, vLLM, SGLang and OpenAI use for a context overflow),
so call sites only ``except ContextOverflowError`` (the persona writer trims its examples),
``except InvalidRequestError`` (the pool does not fail over) or ``except LLMTimeoutError``
(the proxy answers 504). Modelled on Graphiti's ``llm_client/errors.py``.

    >>> err = error_for_status(400, "This model's maximum context length is 4096 tokens. "
    ...                        "However, you requested 4842 tokens.")
    >>> type(err).__name__, err.context_length, err.retryable
    ('ContextOverflowError', 4096, False)
    >>> isinstance(error_for_status(503, "busy"), UnavailableError)
    True
"""

from __future__ import annotations

import copy
import email.utils
import re
import time
from collections.abc import Mapping
from typing import Any

__all__ = [
    "ContextOverflowError",
    "InvalidRequestError",
    "LLMError",
    "LLMTimeoutError",
    "RateLimitedError",
    "RejectedError",
    "UnavailableError",
    "UnparseableResponseError",
    "error_for_status",
    "parse_retry_after",
]


class LLMError(RuntimeError):
    """An LLM call failed for good (retries exhausted, request rejected, or answer unreadable).

    ``retryable`` says whether the same request may succeed if sent again (the client's
    retry loop uses it; once an error reaches a caller its retries are already spent).
    """

    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        endpoint: str = "",
        call_site: str = "",
        cause: BaseException | None = None,
        status: int | None = None,
        retry_after: float | None = None,
        attempts: int = 0,
        retryable: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.endpoint = endpoint
        self.call_site = call_site
        self.cause = cause
        self.status = status
        self.retry_after = retry_after
        """Seconds the server asked us to wait (``Retry-After`` / ``retry-after-ms``), if it said."""
        self.attempts = attempts
        if retryable is not None:
            self.retryable = retryable

    def with_context(self, message: str, *, endpoint: str, call_site: str, attempts: int) -> LLMError:
        """The same kind of error (same fields) with the caller-facing message and where it happened."""
        err = copy.copy(self)
        err.args = (message,)
        err.endpoint, err.call_site, err.attempts = endpoint, call_site, attempts
        return err


class RateLimitedError(LLMError):
    """HTTP 429: the endpoint asked us to slow down (``retry_after`` holds its stated delay)."""

    retryable = True


class UnavailableError(LLMError):
    """The endpoint is down, overloaded or broke the connection (5xx, 409, connection errors)."""

    retryable = True


class LLMTimeoutError(UnavailableError):
    """No answer within ``EndpointConfig.timeout`` (time spent waiting in our own queue never counts)."""


class RejectedError(LLMError):
    """The endpoint refused the request (a 4xx other than 408/409/429); sending it again will not help."""


class InvalidRequestError(RejectedError):
    """400 / 413 / 422: the request itself is bad, so any endpoint would refuse it (no failover)."""


class ContextOverflowError(InvalidRequestError):
    """The prompt (plus the tokens asked for) does not fit the model's context window."""

    def __init__(self, message: str, *, context_length: int | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.context_length = context_length
        """The model's context length in tokens, when the server said."""


class UnparseableResponseError(LLMError):
    """The endpoint answered, but not with something we can use (no chat completion, no valid JSON)."""


# ------------------------------------------------------------------ classification

_OVERFLOW = re.compile(
    r"context[ _-]?(?:length|window|size)|maximum context|too many tokens|exceeds? (?:the )?(?:available )?context"
    r"|prompt is too long|input is too long|longer than the model",
    re.I,
)
_OVERFLOW_CODES = {"context_length_exceeded", "exceed_context_size_error", "string_above_max_length"}
_LIMIT = re.compile(
    r"(?:maximum context length is|context (?:window|size|length) (?:of|is)|context length \(|n_ctx[ =:]+)"
    r"\s*\(?(\d+)",
    re.I,
)


def _context_length(message: str) -> int | None:
    m = _LIMIT.search(message)
    return int(m.group(1)) if m else None


def parse_retry_after(headers: Mapping[str, str] | None) -> float | None:
    """The server's requested delay in seconds (``retry-after-ms``, or ``Retry-After`` seconds / HTTP date)."""
    if not headers:
        return None
    try:
        if (ms := headers.get("retry-after-ms")) is not None:
            return max(0.0, float(ms) / 1000.0)
        raw = headers.get("retry-after")
        if raw is None:
            return None
        try:
            return max(0.0, float(raw))
        except ValueError:
            when = email.utils.parsedate_to_datetime(raw)
            return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError, OverflowError):
        return None


def error_for_status(
    status: int,
    message: str,
    *,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
    cause: BaseException | None = None,
) -> LLMError:
    """The typed error for an HTTP error answer (``message``/``code`` from the body's ``error`` object)."""
    text = f"HTTP {status}: {message}"[:500]
    kw: dict[str, Any] = {"status": status, "cause": cause, "retry_after": parse_retry_after(headers)}
    if status == 429:
        return RateLimitedError(text, **kw)
    if status == 408:
        return LLMTimeoutError(text, **kw)
    if status == 409 or status >= 500:
        return UnavailableError(text, **kw)
    if status in (400, 413, 422):
        if (code or "") in _OVERFLOW_CODES or _OVERFLOW.search(message or ""):
            return ContextOverflowError(text, context_length=_context_length(message or ""), **kw)
        return InvalidRequestError(text, **kw)
    return RejectedError(text, **kw)
