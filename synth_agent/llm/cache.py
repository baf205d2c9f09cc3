"""Content-addressed response caches for temperature-0 LLM calls.

A temperature-0 judgment of the same prompt by the same model is (for our
purposes) the same answer, and the SynthesizeMe search asks many identical
questions (the same validation vote under different candidate demo sets shares
prefixes, and re-runs repeat whole judgments). Caching them by a hash of the
full request makes repeated work free. Values are plain JSON-able dicts so any
backend (memory, SQLite, Redis...) can hold them.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import sys
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import orjson

CachedValue = dict[str, Any]


def cache_key(
    *,
    model: str,
    base_url: str,
    messages: Sequence[Mapping[str, Any]],
    temperature: float,
    max_tokens: int | None,
    json_mode: bool,
    logprobs: int | None,
    seed: int | None,
    extra: Mapping[str, Any] | None,
    schema: Mapping[str, Any] | None = None,
) -> str:
    """sha256 of the canonical JSON of everything that can change the answer."""
    payload = {
        "model": model,
        "base_url": base_url.rstrip("/"),
        "messages": [m if type(m) is dict else dict(m) for m in messages],
        "temperature": float(temperature),
        "max_tokens": max_tokens,
        "json_mode": bool(json_mode),
        "logprobs": logprobs,
        "seed": seed,
        "extra": dict(extra) if extra else None,
    }
    if schema is not None:  # only then: keys of calls without a schema stay what they were
        payload["schema"] = dict(schema)
    canonical = orjson.dumps(payload, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS, default=str)
    return hashlib.sha256(canonical).hexdigest()


@runtime_checkable
class ResponseCache(Protocol):
    """Async key/value store for completed answers (never failures).

    ``clear`` is part of the contract because cached prompts quote users' votes: forgetting a user
    (``DELETE /v1/users/{u}``, ``synth-agent forget``) empties the cache, since a content-addressed
    cache cannot pick out one user's entries.
    """

    async def get(self, key: str) -> CachedValue | None: ...

    async def set(self, key: str, value: CachedValue) -> None: ...

    async def clear(self) -> None: ...


def resolve_cache(cache: ResponseCache | bool) -> ResponseCache | None:
    """The cache a client uses: ``True`` → a new :class:`MemoryCache`, ``False`` → none, else the given one.

    A cache without ``get``, ``set`` and ``clear`` is refused here, at construction, rather than
    found out at the first forget (which could then not erase what the cache holds).
    """
    if cache is True:
        return MemoryCache()
    if cache is False:
        return None
    if not isinstance(cache, ResponseCache):
        raise TypeError(
            f"cache must be True, False or a ResponseCache (async get, set and clear), not {type(cache).__name__}"
        )
    return cache


DEFAULT_MAX_ENTRIES = 10_000
DEFAULT_MAX_BYTES = 64 * 2**20


def value_bytes(value: Any) -> int:
    """Bytes a JSON-like value takes as Python objects (containers and their items, recursively).

    ``sys.getsizeof`` of each object reached; shared objects are counted once. It is what the
    cache's byte bound counts: the memory an entry keeps alive, not its length as JSON (a cached
    answer of 1 kB of JSON is about 3 kB of dicts and strings).
    """
    seen: set[int] = set()
    todo = [value]
    total = 0
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj)
        if isinstance(obj, dict):
            todo.extend(obj.keys())
            todo.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            todo.extend(obj)
    return total


class MemoryCache:
    """Bounded in-process LRU; the default, scoped to one client (no global state).

    Bounded twice, whichever bound is reached first evicts the least recently used answers:
    ``max_entries`` answers and ``max_bytes`` bytes (keys and values as Python objects, see
    :func:`value_bytes`), so a few long answers cannot grow it past its byte budget. A value
    larger than the whole budget is not cached. ``synth-agent serve`` sets both from
    ``SYNTH_AGENT_LLM_CACHE_ENTRIES`` and ``SYNTH_AGENT_LLM_CACHE_MB``.

        >>> import asyncio
        >>> cache = MemoryCache(max_entries=100, max_bytes=2_000)
        >>> for i in range(10):
        ...     asyncio.run(cache.set(f"k{i}", {"text": "x" * 300}))
        >>> len(cache) < 10 and cache.nbytes <= 2_000
        True
        >>> asyncio.run(cache.get("k9")) is not None, asyncio.run(cache.get("k0"))
        (True, None)
    """

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_entries < 1:
            raise ValueError("MemoryCache max_entries must be >= 1")
        if max_bytes < 1:
            raise ValueError("MemoryCache max_bytes must be >= 1")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.nbytes = 0
        """Bytes the cached keys and values take now (as counted for ``max_bytes``)."""
        self._data: OrderedDict[str, tuple[CachedValue, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    async def clear(self) -> None:
        """Drop every answer (``forget`` calls it: cached prompts and answers may quote a user's votes)."""
        self._data.clear()
        self.nbytes = 0

    async def get(self, key: str) -> CachedValue | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        self._data.move_to_end(key)
        return entry[0]

    async def set(self, key: str, value: CachedValue) -> None:
        size = sys.getsizeof(key) + value_bytes(value)
        old = self._data.pop(key, None)
        if old is not None:
            self.nbytes -= old[1]
        if size > self.max_bytes:
            return  # it would evict everything else and still not fit
        self._data[key] = (value, size)
        self.nbytes += size
        while len(self._data) > self.max_entries or self.nbytes > self.max_bytes:
            _, (_, dropped) = self._data.popitem(last=False)
            self.nbytes -= dropped


class SqliteCache:
    """On-disk cache that survives restarts, so a re-run of a synthesis does not re-pay its judgments.

    sqlite3 calls run in a worker thread (one connection guarded by a lock) so
    the event loop never blocks on disk I/O. Safe to share between clients and
    between event loops; several processes may point at the same file (WAL mode).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = sqlite3.connect(
            str(self.path), check_same_thread=False, isolation_level=None, timeout=30
        )
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, value TEXT NOT NULL,"
                " created REAL NOT NULL DEFAULT (julianday('now')))"
            )

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError(f"SqliteCache({self.path}) is closed; create a new one to keep caching")
        return self._conn

    def _get(self, key: str) -> CachedValue | None:
        with self._lock:
            row = self._db().execute("SELECT value FROM responses WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def _set(self, key: str, value: CachedValue) -> None:
        text = json.dumps(value, ensure_ascii=False)
        with self._lock:
            self._db().execute("INSERT OR REPLACE INTO responses (key, value) VALUES (?, ?)", (key, text))

    async def get(self, key: str) -> CachedValue | None:
        return await asyncio.to_thread(self._get, key)

    def _clear(self) -> None:
        with self._lock:
            db = self._db()
            db.execute("PRAGMA secure_delete=ON")  # the deleted rows' bytes are overwritten, not left in free pages
            db.execute("DELETE FROM responses")
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    async def clear(self) -> None:
        """Drop every answer, overwriting their bytes in the file (``forget`` calls it)."""
        await asyncio.to_thread(self._clear)

    async def set(self, key: str, value: CachedValue) -> None:
        await asyncio.to_thread(self._set, key, value)

    def __len__(self) -> int:
        with self._lock:
            return int(self._db().execute("SELECT COUNT(*) FROM responses").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    async def aclose(self) -> None:
        self.close()
