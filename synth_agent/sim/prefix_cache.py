"""The simulator's model of a server's automatic prefix cache, and the ``cached_tokens`` it reports.

vLLM (``--enable-prefix-caching``, on by default in its V1 engine), SGLang (RadixAttention) and
llama.cpp (``cache_prompt``) keep the KV cache of prompts they have computed and reuse it for a later
prompt that starts the same way: those prompt tokens are billed (``usage.prompt_tokens``) but not
computed again, and OpenAI-compatible servers report them as ``usage.prompt_tokens_details.
cached_tokens``. This module models that the way vLLM does, and errs on the side of fewer hits:

* **Blocks.** The prompt is cut into blocks of ``block_tokens`` tokens (vLLM's default block size, 16)
  and each *full* block is named by a hash chain: the hash of the previous block's name, the block's
  text and the roles of the messages that start inside it. A block can only be reused after the very
  same prefix, as on a real server. Tokens are the simulator's (4 characters of the messages'
  concatenated contents, as ``usage.prompt_tokens`` counts them).
* **Finished requests only.** A request looks its blocks up when it *arrives* and adds them when it
  *finishes*: requests that run concurrently with the same prefix all miss (as on vLLM, where a batch's
  requests each compute their own copy; SGLang's scheduler holds such requests back itself). A real
  server can reuse a prefix once its prefill is done, long before the answer ends: this model counts
  fewer hits than vLLM would.
* **At least one token is computed.** Like vLLM, a prompt that is entirely cached still computes its
  last token (the hit stops at the last full block before it).
* **Bounded.** At most ``capacity_tokens`` tokens are kept; the least recently used blocks go first,
  and a request's blocks are touched from its last to its first, so the tails of prefixes are evicted
  before their heads (vLLM frees blocks in the same order). Blocks a running request uses are not
  pinned here (vLLM pins them); they are added back when it finishes.

The model changes no answer and no latency: the simulator's time per request does not depend on
how much of the prompt was cached (a real server's prefill would be shorter).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

__all__ = ["DEFAULT_CAPACITY_TOKENS", "PrefixCache"]

DEFAULT_CAPACITY_TOKENS = 262_144
"""The default capacity: about the KV cache an 8B model (Llama-3-8B, fp16: 128 KiB per token) gets
from 32 GiB of GPU memory."""

CHARS_PER_TOKEN = 4
"""The simulator's token: 4 characters of the prompt (``usage.prompt_tokens`` counts the same way)."""

PREFIX_MEMO = 1024
"""Prompt prefixes whose block names are remembered (least recently used forgotten first)."""


class PrefixCache:
    """A bounded LRU of prompt blocks; thread-safe (``/stats`` reads it from other threads)."""

    def __init__(self, capacity_tokens: int = DEFAULT_CAPACITY_TOKENS, *, block_tokens: int = 16) -> None:
        if capacity_tokens < 0:
            raise ValueError(f"capacity_tokens must be >= 0, got {capacity_tokens}")
        if block_tokens < 1:
            raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
        self.block_tokens = block_tokens
        self.capacity_blocks = capacity_tokens // block_tokens
        self._block_chars = block_tokens * CHARS_PER_TOKEN
        self._blocks: OrderedDict[int, None] = OrderedDict()
        self._lock = threading.Lock()
        self._prefix_names: OrderedDict[tuple[Any, ...], tuple[int, ...]] = OrderedDict()
        """Block names of prompt prefixes seen (every message but the last), most recent last: a fit sends one
        prefix (instructions, persona, demos) with many votes, and hashing its ~250 blocks again for each
        request was ~0.4 ms of the simulator's CPU per request (fit_cost's 20-user run)."""
        self.evicted_blocks = 0

    @property
    def enabled(self) -> bool:
        return self.capacity_blocks > 0

    def blocks(self, messages: Sequence[dict[str, str]], model: str = "") -> list[int]:
        """The names of the prompt's full blocks, first to last (a hash chain: each names its whole prefix)."""
        starts: list[tuple[int, str]] = []  # (character offset, role) of each message
        pos = 0
        for m in messages:
            starts.append((pos, m["role"]))
            pos += len(m["content"])
        size = self._block_chars
        # The blocks that end within the prefix depend on the prefix alone: reuse them when it was seen before.
        key = (model, *((m["role"], m["content"]) for m in messages[:-1])) if len(messages) > 1 else None
        with self._lock:
            known = self._prefix_names.get(key) if key is not None else None
            if known is not None:
                self._prefix_names.move_to_end(key)  # type: ignore[arg-type]  # not None here
        names: list[int] = list(known) if known else []
        name = names[-1] if names else hash(model)
        first_end = size * (len(names) + 1)
        k = sum(1 for offset, _ in starts if offset < first_end - size)  # messages begun in the known blocks
        # only the text from the message the first new block starts in: the known blocks need none of it
        # (joining the whole ~17k-character prompt again was ~1% of the simulator's CPU)
        j = max(k - 1, 0)
        base = starts[j][0]
        text = "".join(m["content"] for m in messages[j:])
        for end in range(first_end, pos + 1, size):
            first = k
            while k < len(starts) and starts[k][0] < end:
                k += 1
            roles = tuple(starts[first:k]) if k > first else None
            name = hash((name, text[end - size - base : end - base], roles))
            names.append(name)
        if key is not None and known is None:
            with self._lock:
                self._prefix_names[key] = tuple(names[: starts[-1][0] // size])
                while len(self._prefix_names) > PREFIX_MEMO:
                    self._prefix_names.popitem(last=False)
        return names

    def lookup(self, blocks: Sequence[int], prompt_tokens: int) -> int:
        """Prompt tokens served from the cache: the leading blocks present, short of the last prompt token."""
        if not self.enabled:
            return 0
        usable = max(0, (prompt_tokens - 1) // self.block_tokens)
        hit = 0
        with self._lock:
            present = self._blocks
            for name in blocks[:usable]:
                if name not in present:
                    break
                hit += 1
        return hit * self.block_tokens

    def add(self, blocks: Sequence[int]) -> None:
        """A request finished: its blocks become reusable (most recently used, its first block last)."""
        if not self.enabled or not blocks:
            return
        with self._lock:
            present = self._blocks
            for name in reversed(blocks[: self.capacity_blocks]):
                present[name] = None
                present.move_to_end(name)
            while len(present) > self.capacity_blocks:
                present.popitem(last=False)
                self.evicted_blocks += 1

    def clear(self) -> None:
        """Drop every block (vLLM's ``POST /reset_prefix_cache``)."""
        with self._lock:
            self._blocks.clear()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "capacity_tokens": self.capacity_blocks * self.block_tokens,
                "block_tokens": self.block_tokens,
                "cached_blocks": len(self._blocks),
                "evicted_blocks": self.evicted_blocks,
            }
