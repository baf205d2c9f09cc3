"""The store's ledger: a small local SQLite file beside the Chroma data that holds what must be erasable.

Chroma cannot erase bytes on its own: its write log (``embeddings_queue``) keeps rows
until the vector segment persists, SQLite keeps deleted rows in free pages, page splits
leave stale copies of rows, and a deleted HNSW element keeps its vector in
``data_level0.bin``. None of that can be scrubbed without ``VACUUM``, which blocks the
whole database. So the store never gives Chroma anything it would have to erase:
every item is sealed (AES-256-GCM) with a data key of its own, and the keys live here.
Deleting an item destroys its key, which turns every copy Chroma ever made of it
(write log, free pages, server backups) into noise. This file is small and written
only by us, so it *can* be erased exactly:

* ``PRAGMA secure_delete = ON``: deleted rows are overwritten with zeros, never left in
  free space; every connection to this file sets it, so no page is ever freed dirty.
* WAL mode with ``synchronous = FULL``: a key is on disk before the item it opens is
  written to Chroma (an acknowledged write survives a crash), and after destroying keys
  ``PRAGMA wal_checkpoint(TRUNCATE)`` empties the WAL file, so no old frame survives.

It also holds the **batch journal**: one row per batch in flight (see
:mod:`store.chroma`), written before the batch touches Chroma and removed when it is
done, so a batch interrupted by a crash is rolled back (or, past its commit point,
finished) the next time the store opens. And the HMAC secret behind item ids and
namespace tokens, so no user id or label is ever written to Chroma in the clear.

And the **namespace index** (``members``): for every item, the keyed token of its namespace;
for every namespace record, the tokens of the namespaces above it. A read of one namespace
(one user's votes) looks its item ids up here and fetches them from Chroma by primary key,
so it costs what that namespace holds, not what the store holds (Chroma's metadata-filtered
``get`` grows with the collection: 33 ms at 200,000 votes). Rows are written in the same
transaction as the key they belong to and deleted with it, so the index never lists an
item whose key is gone. They hold HMAC tokens and item ids only, never a label.

One ledger per store directory; several processes may open it (SQLite locking).
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

LEDGER_FILE = "synth_agent_ledger.sqlite3"
"""File name of the ledger inside a store directory."""

KEY_BYTES = 32
_CACHE = 100_000  # data keys kept in memory (32 bytes each): reads of hot items never touch the file
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS keys (kid TEXT PRIMARY KEY, key BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS members (tok TEXT NOT NULL, kid TEXT NOT NULL, PRIMARY KEY (tok, kid)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS members_kid ON members (kid);
CREATE TABLE IF NOT EXISTS journal (
    txn TEXT PRIMARY KEY, owner TEXT NOT NULL, state TEXT NOT NULL, created REAL NOT NULL, body TEXT NOT NULL
);
"""


def process_owner() -> str:
    """Identifies this process in journal rows: ``host:pid:start-time`` (a reused pid is not the same owner)."""
    try:
        with open(f"/proc/{os.getpid()}/stat", "rb") as fh:
            start = fh.read().rsplit(b")", 1)[1].split()[19].decode()
    except OSError:
        start = "0"
    return f"{os.uname().nodename}:{os.getpid()}:{start}"


def owner_alive(owner: str) -> bool:
    """Whether the process that wrote a journal row still runs (other hosts: assumed alive)."""
    host, _, rest = owner.partition(":")
    pid_text, _, start = rest.partition(":")
    if host != os.uname().nodename or not pid_text.isdigit():
        return True
    try:
        with open(f"/proc/{pid_text}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[19].decode() == start
    except (OSError, IndexError):
        return False


def connect_erasable(path: Path) -> sqlite3.Connection:
    """A connection to a SQLite file whose deleted rows must leave no bytes: ``secure_delete`` (zeroed
    pages), WAL with ``synchronous = FULL`` (durable at commit). Use under a lock of your own."""
    conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=60)
    conn.execute("PRAGMA secure_delete = ON")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    return conn


def truncate_wal(conn: sqlite3.Connection, path: Path) -> None:
    """Checkpoint every WAL frame into the database and cut the WAL to zero bytes, or raise."""
    for attempt in range(100):
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if not busy:
            return
        time.sleep(min(0.01 * (attempt + 1), 0.1))
    raise RuntimeError(f"could not truncate the WAL of {path}: another process keeps reading it")


def close_erasable(conn: sqlite3.Connection) -> None:
    """Close, leaving no WAL behind when nobody else reads the file (best effort)."""
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    except sqlite3.Error:
        pass
    conn.close()


@runtime_checkable
class KeyLedger(Protocol):
    """What :class:`store.chroma.ChromaStore` needs from a ledger: this file's :class:`Ledger`, or one
    shared by many processes (the scale-out mode's Postgres ledger, ``synth_agent.scale.ledger``)."""

    owner: str

    def secret(self) -> bytes: ...
    def keys(self, kids: Iterable[str]) -> dict[str, bytes]: ...
    def ensure_keys(self, kids: Iterable[str], members: Mapping[str, Sequence[str]] | None = None) -> dict[str, bytes]: ...
    def destroy(self, kids: Iterable[str]) -> int: ...
    def members(self, tok: str, limit: int) -> list[str]: ...
    def add_members(self, rows: Iterable[tuple[str, str]]) -> int: ...
    def members_complete(self, name: str) -> bool: ...
    def mark_members_complete(self, name: str) -> None: ...
    def checkpoint(self) -> None: ...
    def journal_open(self, txn: str, body: dict[str, Any]) -> None: ...
    def journal_state(self, txn: str, state: str, body: dict[str, Any] | None = None) -> None: ...
    def journal_close(self, txn: str) -> None: ...
    def journal_orphans(self) -> list[tuple[str, str, dict[str, Any]]]: ...
    def close(self) -> None: ...


class Ledger:
    """Data keys, HMAC secret and batch journal in one SQLite file (``secure_delete``, WAL, fsync).

    Thread safe: one connection used under a lock (statements take microseconds).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = connect_erasable(self.path)
        self._conn.executescript(_SCHEMA)
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self._seen_version = self._data_version()
        self._secret: bytes | None = None
        self.owner = process_owner()

    # ------------------------------------------------------------------ secret

    def secret(self) -> bytes:
        """The store's HMAC secret (created on first use; never leaves this file and memory)."""
        if self._secret is None:
            with self._lock:
                self._conn.execute(
                    "INSERT OR IGNORE INTO meta (k, v) VALUES ('hmac_secret', ?)", (secrets.token_bytes(KEY_BYTES),)
                )
                row = self._conn.execute("SELECT v FROM meta WHERE k = 'hmac_secret'").fetchone()
            self._secret = bytes(row[0])
        return self._secret

    # ------------------------------------------------------------------ data keys

    def keys(self, kids: Iterable[str]) -> dict[str, bytes]:
        """The data keys that exist among ``kids`` (a destroyed or never-made key is simply absent)."""
        out: dict[str, bytes] = {}
        missing: list[str] = []
        with self._lock:
            self._drop_stale_cache()
            for kid in kids:
                key = self._cache.get(kid)
                if key is None:
                    missing.append(kid)
                else:
                    self._cache.move_to_end(kid)
                    out[kid] = key
            for start in range(0, len(missing), 500):
                chunk = missing[start : start + 500]
                marks = ",".join("?" * len(chunk))
                for kid, key in self._conn.execute(f"SELECT kid, key FROM keys WHERE kid IN ({marks})", chunk):
                    out[kid] = bytes(key)
                    self._remember(kid, bytes(key))
        return out

    def ensure_keys(self, kids: Iterable[str], members: Mapping[str, Sequence[str]] | None = None) -> dict[str, bytes]:
        """Keys for ``kids``, making (durably, in one transaction) those that do not exist yet.

        ``members``: namespace-index tokens per kid (see the module docstring), written in the
        transaction that makes the kid's key (a kid's namespace never changes: an existing key
        already has its rows).
        """
        wanted = list(dict.fromkeys(kids))
        have = self.keys(wanted)
        new = {kid: secrets.token_bytes(KEY_BYTES) for kid in wanted if kid not in have}
        if new:
            rows = [(tok, kid) for kid in new for tok in (members or {}).get(kid, ())]
            with self._lock:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    self._conn.executemany("INSERT OR IGNORE INTO keys (kid, key) VALUES (?, ?)", list(new.items()))
                    if rows:
                        self._conn.executemany("INSERT OR IGNORE INTO members (tok, kid) VALUES (?, ?)", rows)
                    marks = ",".join("?" * len(new))
                    stored = dict(self._conn.execute(f"SELECT kid, key FROM keys WHERE kid IN ({marks})", list(new)))
                    self._conn.execute("COMMIT")
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                for kid, key in stored.items():  # another process may have won the race: use its key
                    have[kid] = bytes(key)
                    self._remember(kid, bytes(key))
        return have

    def destroy(self, kids: Iterable[str]) -> int:
        """Erase keys for good: zeroed in the file (secure_delete) and in the WAL (checkpoint + truncate)."""
        kids = list(dict.fromkeys(kids))
        if not kids:
            return 0
        with self._lock:
            for kid in kids:
                self._cache.pop(kid, None)
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                n = 0
                for start in range(0, len(kids), 500):
                    chunk = kids[start : start + 500]
                    marks = ",".join("?" * len(chunk))
                    cur = self._conn.execute(f"DELETE FROM keys WHERE kid IN ({marks})", chunk)
                    n += cur.rowcount
                    self._conn.execute(f"DELETE FROM members WHERE kid IN ({marks})", chunk)
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._truncate_wal()
        return n

    # ------------------------------------------------------------------ namespace index

    def members(self, tok: str, limit: int) -> list[str]:
        """Up to ``limit`` kids indexed under ``tok``."""
        with self._lock:
            return [r[0] for r in self._conn.execute("SELECT kid FROM members WHERE tok = ? LIMIT ?", (tok, limit))]

    def add_members(self, rows: Iterable[tuple[str, str]]) -> int:
        """Backfill ``(tok, kid)`` rows, only for kids whose key exists (a destroyed key gets none)."""
        rows = list(rows)
        with self._lock:
            before = self._conn.total_changes
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.executemany("INSERT OR IGNORE INTO members (tok, kid) SELECT ?, kid FROM keys WHERE kid = ?", rows)
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            return self._conn.total_changes - before

    def members_complete(self, name: str) -> bool:
        """Whether collection ``name``'s items all have index rows (false for a ledger older than the index)."""
        with self._lock:
            return self._conn.execute("SELECT 1 FROM meta WHERE k = ?", (f"members:{name}",)).fetchone() is not None

    def mark_members_complete(self, name: str) -> None:
        """Record that collection ``name`` is indexed (after a backfill, or when it was created empty)."""
        with self._lock:
            self._conn.execute("INSERT OR IGNORE INTO meta (k, v) VALUES (?, x'01')", (f"members:{name}",))

    def checkpoint(self) -> None:
        """Copy the WAL into the database file and truncate it (after deleting anything sensitive)."""
        with self._lock:
            self._truncate_wal()

    def _data_version(self) -> int:
        return int(self._conn.execute("PRAGMA data_version").fetchone()[0])

    def _drop_stale_cache(self) -> None:
        """Under ``_lock``: forget every cached key once another connection has committed to the file.

        Why: another process (a ``forget`` or an ingest next to a running server) may have destroyed a
        key this process still caches; :meth:`ensure_keys` would then seal a re-created item under the
        destroyed key, with no row in the file, and the item could never be read again. SQLite's
        ``PRAGMA data_version`` changes exactly when another connection has committed since the last
        look (our own commits do not change it), and costs no disk read, so the cache stays valid
        between such commits and is dropped after them.
        """
        version = self._data_version()
        if version != self._seen_version:
            self._seen_version = version
            self._cache.clear()

    def _remember(self, kid: str, key: bytes) -> None:
        self._cache[kid] = key
        if len(self._cache) > _CACHE:
            self._cache.popitem(last=False)

    def _truncate_wal(self) -> None:
        """Checkpoint every WAL frame into the database and cut the WAL file to zero bytes.

        Another connection reading at that moment can make the checkpoint incomplete; retry
        briefly, then raise: an erasure must not be reported done while old frames remain.
        """
        truncate_wal(self._conn, self.path)

    # ------------------------------------------------------------------ journal

    def journal_open(self, txn: str, body: dict[str, Any]) -> None:
        with self._lock:
            self._conn.execute(
                "INSERT INTO journal (txn, owner, state, created, body) VALUES (?, ?, 'open', ?, ?)",
                (txn, self.owner, time.time(), json.dumps(body)),
            )

    def journal_state(self, txn: str, state: str, body: dict[str, Any] | None = None) -> None:
        with self._lock:
            if body is None:
                self._conn.execute("UPDATE journal SET state = ? WHERE txn = ?", (state, txn))
            else:
                self._conn.execute("UPDATE journal SET state = ?, body = ? WHERE txn = ?", (state, json.dumps(body), txn))

    def journal_close(self, txn: str) -> None:
        with self._lock:
            self._conn.execute("DELETE FROM journal WHERE txn = ?", (txn,))

    def journal_orphans(self) -> list[tuple[str, str, dict[str, Any]]]:
        """Batches left behind by processes that are gone: ``(txn, state, body)``, oldest first."""
        with self._lock:
            rows = self._conn.execute("SELECT txn, owner, state, body FROM journal ORDER BY created").fetchall()
        return [
            (txn, state, json.loads(body))
            for txn, owner, state, body in rows
            if owner != self.owner and not owner_alive(owner)
        ]

    # ------------------------------------------------------------------ collection generations

    def generation(self, name: str) -> tuple[int, str | None]:
        """``(active generation, owner of a compaction in progress or None)`` of store ``name``.

        A compaction (:meth:`store.chroma.ChromaStore.compact`) copies the live records into the
        collections of the next generation and switches to them here, in one transaction.
        """
        with self._lock:
            rows = dict(self._conn.execute(
                "SELECT k, v FROM meta WHERE k IN (?, ?)", (f"gen:{name}", f"compacting:{name}")).fetchall())
        gen = rows.get(f"gen:{name}")
        owner = rows.get(f"compacting:{name}")
        return (int(bytes(gen).decode()) if gen is not None else 0,
                bytes(owner).decode() if owner is not None else None)

    def compaction_begin(self, name: str, owner: str) -> bool:
        """Mark a compaction of ``name`` in progress (False: another one is). Writers of other
        processes see the mark after opening their journal row and wait (see ``ChromaStore``)."""
        with self._lock:
            cur = self._conn.execute(
                "INSERT OR IGNORE INTO meta (k, v) VALUES (?, ?)", (f"compacting:{name}", owner.encode()))
            return cur.rowcount == 1

    def compaction_end(self, name: str, owner: str, generation: int | None) -> None:
        """Clear the mark; with ``generation``, switch to it and reset the delete count, atomically."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                if generation is not None:
                    self._conn.execute("INSERT OR REPLACE INTO meta (k, v) VALUES (?, ?)",
                                       (f"gen:{name}", str(generation).encode()))
                    self._conn.execute("DELETE FROM meta WHERE k = ?", (f"deletes:{name}",))
                self._conn.execute("DELETE FROM meta WHERE k = ? AND v = ?", (f"compacting:{name}", owner.encode()))
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def count_deletes(self, name: str, n: int) -> int:
        """Add ``n`` records deleted from ``name``'s collections; returns the count since the last compaction."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                row = self._conn.execute("SELECT v FROM meta WHERE k = ?", (f"deletes:{name}",)).fetchone()
                total = (int(bytes(row[0]).decode()) if row else 0) + n
                self._conn.execute("INSERT OR REPLACE INTO meta (k, v) VALUES (?, ?)",
                                   (f"deletes:{name}", str(total).encode()))
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        return total

    def live_journal_owners(self, exclude: str) -> list[str]:
        """Owners (other than ``exclude``) of batches in flight whose process still runs."""
        with self._lock:
            owners = [r[0] for r in self._conn.execute("SELECT DISTINCT owner FROM journal")]
        return [o for o in owners if o != exclude and owner_alive(o)]

    def close(self) -> None:
        with self._lock:
            close_erasable(self._conn)


__all__ = ["KEY_BYTES", "KeyLedger", "LEDGER_FILE", "Ledger", "owner_alive", "process_owner"]
