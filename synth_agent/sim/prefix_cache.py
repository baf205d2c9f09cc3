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

import heapq
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from itertools import compress, count
from operator import ne
from typing import Any

__all__ = ["DEFAULT_CAPACITY_TOKENS", "PrefixCache"]

DEFAULT_CAPACITY_TOKENS = 262_144
"""The default capacity: about the KV cache an 8B model (Llama-3-8B, fp16: 128 KiB per token) gets
from 32 GiB of GPU memory."""

CHARS_PER_TOKEN = 4
"""The simulator's token: 4 characters of the prompt (``usage.prompt_tokens`` counts the same way)."""

PREFIX_MEMO = 1024
"""Prompt prefixes whose block names are remembered (least recently used forgotten first)."""


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading names ``a`` and ``b`` share (C-level passes)."""
    return next(compress(count(), map(ne, a, b)), min(len(a), len(b)))


class _Run:
    """A run of blocks in the tree of cached prefixes: blocks every prompt through it has in a row (an edge of a
    radix tree of block names), and the last touch (``add``) through it, which is every one of its blocks' last."""

    __slots__ = ("children", "depth", "key", "last", "names", "parent")

    def __init__(self, names: list[int], parent: _Run | None, last: int, depth: int) -> None:
        self.names = names
        self.key = names[0] if names else 0
        """Its first block's name: its key among its parent's children."""
        self.parent = parent
        self.last = last
        self.depth = depth
        """Blocks before this run's first (its position in every prompt through it)."""
        self.children: dict[int, _Run] = {}


class PrefixCache:
    """A bounded LRU of prompt blocks; thread-safe (``/stats`` reads it from other threads).

    The LRU is kept per run of blocks rather than per block: a request's ~175 blocks are mostly a prefix it
    shares with many others, and an ``OrderedDict`` with a ``move_to_end`` per block was ~14% of the
    simulator's CPU in fit_cost's 20-user run (docs/llm.md). Blocks are names in a hash chain, so a block is
    touched only with all the blocks before it: the blocks cached form a tree of prefixes, each run of it has
    one last touch for all its blocks, and the least recently used block is always the last block of the
    leaf run touched longest ago (ties: the deeper first, as the ``OrderedDict`` had them). Eviction takes
    them from a heap of leaf runs by last touch; the order is the ``OrderedDict``'s
    (``tests/test_prefix_cache.py`` compares them step by step). The one difference: a name twice in one
    prompt (a 64-bit hash collision, which would already make the model wrong) counts twice here.
    """

    def __init__(self, capacity_tokens: int = DEFAULT_CAPACITY_TOKENS, *, block_tokens: int = 16) -> None:
        if capacity_tokens < 0:
            raise ValueError(f"capacity_tokens must be >= 0, got {capacity_tokens}")
        if block_tokens < 1:
            raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
        self.block_tokens = block_tokens
        self.capacity_blocks = capacity_tokens // block_tokens
        self._block_chars = block_tokens * CHARS_PER_TOKEN
        self._root = _Run([], None, 0, 0)
        self._size = 0
        """Blocks cached."""
        self._leaves: list[tuple[int, int, _Run]] = []
        """Heap of (last touch, push number, run) of leaf runs; entries whose run was touched again, got
        children or left the tree since are skipped when they come up."""
        self._pushes = count()
        self._touch = 0
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
        usable = min(len(blocks), max(0, (prompt_tokens - 1) // self.block_tokens))
        i = 0
        with self._lock:
            run = self._root
            while i < usable:
                child = run.children.get(blocks[i])
                if child is None:
                    break
                names = child.names
                part = blocks[i : min(i + len(names), usable)]
                if len(part) == len(names) and part == names:
                    i += len(names)
                    run = child
                    continue
                i += _common(names, part)
                break
        return i * self.block_tokens

    def add(self, blocks: Sequence[int]) -> None:
        """A request finished: its blocks become reusable (most recently used, its first block last)."""
        if not self.enabled or not blocks:
            return
        names = list(blocks[: self.capacity_blocks])
        n = len(names)
        with self._lock:
            self._touch = touch = self._touch + 1
            run, i = self._root, 0
            while i < n:
                child = run.children.get(names[i])
                if child is None:  # new blocks: a new leaf run
                    child = _Run(names[i:], run, touch, i)
                    run.children[names[i]] = child
                    self._size += n - i
                    run, i = child, n
                    break
                have = child.names
                m = len(have)
                if names[i : i + m] != have:  # the prompt leaves (or ends inside) this run: split it there
                    j = _common(have, names[i : i + m])
                    upper = _Run(have[:j], run, child.last, child.depth)
                    run.children[names[i]] = upper
                    del have[:j]
                    child.parent, child.depth, child.key = upper, child.depth + j, have[0]
                    upper.children[have[0]] = child
                    child = upper
                    m = j
                child.last = touch
                run, i = child, i + m
            if not run.children:
                heapq.heappush(self._leaves, (touch, next(self._pushes), run))
            excess = self._size - self.capacity_blocks
            if excess > 0:
                self._evict(excess)
            if len(self._leaves) > 4 * max(1024, self.capacity_blocks):
                self._reheap()

    def _evict(self, excess: int) -> None:
        """Drop the ``excess`` least recently used blocks (the lock is held)."""
        leaves = self._leaves
        while excess > 0:
            last, _, run = leaves[0]
            if run.last != last or run.children or run.parent is None:  # stale entry
                heapq.heappop(leaves)
                continue
            names = run.names
            k = min(excess, len(names))
            del names[len(names) - k :]  # its deepest blocks first
            self._size -= k
            self.evicted_blocks += k
            excess -= k
            if not names:
                heapq.heappop(leaves)
                parent = run.parent
                del parent.children[run.key]
                run.parent = None
                if not parent.children and parent is not self._root:  # the parent is a leaf now
                    heapq.heappush(leaves, (parent.last, next(self._pushes), parent))

    def _reheap(self) -> None:
        """Rebuild the heap from the leaf runs (stale entries pile up while nothing is evicted)."""
        self._leaves = [(run.last, next(self._pushes), run) for run in self._runs() if not run.children]
        heapq.heapify(self._leaves)

    def _runs(self) -> Iterator[_Run]:
        stack = list(self._root.children.values())
        while stack:
            run = stack.pop()
            yield run
            stack.extend(run.children.values())

    def _order(self) -> list[int]:
        """Every cached block, least recently used first (for tests: the ``OrderedDict``'s order)."""
        with self._lock:
            runs = sorted(self._runs(), key=lambda r: (r.last, -r.depth))
            return [name for run in runs for name in reversed(run.names)]

    def clear(self) -> None:
        """Drop every block (vLLM's ``POST /reset_prefix_cache``)."""
        with self._lock:
            self._root = _Run([], None, 0, 0)
            self._leaves = []
            self._size = 0

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "capacity_tokens": self.capacity_blocks * self.block_tokens,
                "block_tokens": self.block_tokens,
                "cached_blocks": self._size,
                "evicted_blocks": self.evicted_blocks,
            }
