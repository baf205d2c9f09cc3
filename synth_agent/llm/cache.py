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
    """Async key/value store for completed answers (never failures)."""

    async def get(self, key: str) -> CachedValue | None: ...

    async def set(self, key: str, value: CachedValue) -> None: ...


class MemoryCache:
    """Bounded in-process LRU; the default, scoped to one client (no global state)."""

    def __init__(self, max_entries: int = 10_000) -> None:
        if max_entries < 1:
            raise ValueError("MemoryCache max_entries must be >= 1")
        self.max_entries = max_entries
        self._data: OrderedDict[str, CachedValue] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    async def get(self, key: str) -> CachedValue | None:
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    async def set(self, key: str, value: CachedValue) -> None:
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)


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
