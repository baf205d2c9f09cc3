"""Send one request per new prompt prefix first, so a prefix-caching server computes the prefix once.

A fit judges many validation votes with the same judge: the same system prompt, persona and few-shot
demos (thousands of tokens), then one vote (the last message). Sent all at once, the requests reach the
server together and each computes the shared prefix itself: vLLM's automatic prefix caching only reuses
blocks of prompts it has already processed (SGLang's scheduler holds such requests back on its own).
:class:`PrefixGate` does that on the client: the first request with a prefix it has not sent yet goes
alone; the others with the same prefix wait until it returns, then go together and find the prefix in
the server's cache.

The prefix is every message but the last, and only prefixes of at least ``min_tokens`` (characters / 4)
are held. A request that waits here holds no concurrency slot and its timeout has not started. The price
is time: the followers of a new prefix start one request later (on a real server the leader's whole
answer, though its prefill alone would do). Off by default (``EndpointConfig.prefix_warmup_tokens``);
docs/llm.md has the figures. Verdicts do not change: the same prompts are sent, only later.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

__all__ = ["FIT_CALL_SITES", "PrefixGate"]

FIT_CALL_SITES: tuple[str, ...] = (
    "bootstrap", "bootstrap_score", "persona", "persona_rationale", "demo_select", "select", "refit",
)
"""The call sites of a SynthesizeMe fit (:mod:`synth_agent.engine`; with or without a ``:logprob`` suffix): background work, where the server's
compute matters more than one request's wait. ``EndpointConfig.prefix_warmup_sites``' default, so a live
judgment (``proxy_judge``, ``proxy_rerank``, the chat graph's rerank) is never held behind another request."""

R = TypeVar("R")


class PrefixGate:
    """Per event loop: which prefixes have been sent (LRU of ``remember``) and which are being sent now."""

    def __init__(self, min_tokens: int, *, remember: int = 4096) -> None:
        if min_tokens < 1:
            raise ValueError(f"min_tokens must be >= 1, got {min_tokens}")
        self.min_chars = 4 * min_tokens
        self.remember = remember
        self._sent: OrderedDict[int, None] = OrderedDict()
        self._leaders: dict[int, asyncio.Future[None]] = {}
        self.held = 0
        """Requests that waited for a leader (a counter for tests and dashboards)."""

    def key(self, messages: Sequence[dict[str, str]]) -> int | None:
        """The prefix's name, or None when the prompt has no prefix worth holding a request for."""
        if len(messages) < 2 or sum(len(m["content"]) for m in messages[:-1]) < self.min_chars:
            return None
        return hash(tuple((m["role"], m["content"]) for m in messages[:-1]))

    async def run(self, messages: Sequence[dict[str, str]], call: Callable[[], Awaitable[R]]) -> R:
        """``await call()`` once the prefix of ``messages`` has been sent, or as its first sender."""
        key = self.key(messages)
        if key is None:
            return await call()
        waited = False
        while key not in self._sent and (leader := self._leaders.get(key)) is not None:
            waited = True
            await asyncio.shield(leader)  # the leader's outcome is its caller's; only its end matters here
        self.held += waited
        if key in self._sent:
            self._sent.move_to_end(key)
            return await call()
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._leaders[key] = done
        try:
            return await call()
        finally:
            # Answered, failed or cancelled: the followers go now (after a failure they may miss the cache,
            # but they never wait for one another in turn).
            del self._leaders[key]
            self._sent[key] = None
            if len(self._sent) > self.remember:
                self._sent.popitem(last=False)
            done.set_result(None)
