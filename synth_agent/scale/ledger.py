"""The store's key ledger in Postgres, shared by every proxy replica and worker.

In the embedded mode every stored item is sealed with its own AES-GCM key kept in a local
SQLite file (:mod:`store.ledger`): forgetting destroys the keys, so what Chroma's write log
keeps is ciphertext nobody can open. A per-process file cannot serve replicas on several
machines, so in the scale-out mode the keys and the HMAC secret behind Chroma ids and
namespace tokens live here, in the Postgres the queue already uses. The Chroma server then
holds exactly what an embedded store holds: opaque ids, keyed tokens, sealed blobs.

Same interface as :class:`store.ledger.Ledger` (:class:`store.ledger.KeyLedger`), with
three differences:

* **No key cache.** Another replica may destroy a key (forget) or re-create an item under a
  new key at any moment; a cached key would then open nothing, or make a key that only this
  process knows. Every lookup is one indexed query (one per read batch, well under 1 ms on a
  LAN), and :meth:`ensure_keys` is ``INSERT ... ON CONFLICT DO NOTHING`` + ``SELECT`` in one
  transaction, so the key that wins a race is the one everyone uses.
* **Erasure reaches the files in a separate step.** ``DELETE`` leaves the row's bytes in a
  dead tuple (and in WAL) until the table is rewritten, so :meth:`destroy` remembers which
  partitions held destroyed keys and :meth:`dirty_tables` hands them to
  :func:`synth_agent.scale.erasure.purge`, which rewrites them (``VACUUM FULL``) and
  retires the WAL. The keys table is hash-partitioned (:data:`PARTITIONS`), so a rewrite
  touches a small slice and blocks only lookups of keys in that slice, for milliseconds,
  however many users the deployment has.
* **The namespace index** (which item ids a namespace holds, see :mod:`store.ledger`) is a
  table here too (:data:`MEMBERS_TABLE`), written in the transaction that makes an item's
  key and deleted in the one that destroys it; its rows are keyed tokens and item ids (the
  same values the Chroma server stores in the clear), so erasure does not need to purge it.
* **The batch journal stays local** (a SQLite file in the process's home, as before): it
  is private to the process that writes the batch, and keeping it out of Postgres saves
  three round trips per commit.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from store.ledger import KEY_BYTES, Ledger

__all__ = ["KEYS_TABLE", "MEMBERS_TABLE", "PARTITIONS", "PgLedger", "ensure_ledger_schema"]

KEYS_TABLE = "synth_store_keys"
META_TABLE = "synth_store_meta"
MEMBERS_TABLE = "synth_store_members"
PARTITIONS = 32
_SCHEMA_LOCK = 0x5AE7_1A58  # pg_advisory_xact_lock key: creating the ledger's tables

_DDL = [
    f"CREATE TABLE IF NOT EXISTS {META_TABLE} (k text PRIMARY KEY, v bytea NOT NULL)",
    f"CREATE TABLE IF NOT EXISTS {KEYS_TABLE} (kid text NOT NULL, key bytea NOT NULL, PRIMARY KEY (kid)) "
    "PARTITION BY HASH (kid)",
    *(f"CREATE TABLE IF NOT EXISTS {KEYS_TABLE}_p{i} PARTITION OF {KEYS_TABLE} "
      f"FOR VALUES WITH (MODULUS {PARTITIONS}, REMAINDER {i})" for i in range(PARTITIONS)),
    # Keys never go to the planner's statistics (pg_statistic would keep copies of values).
    *(f"ALTER TABLE {KEYS_TABLE}_p{i} ALTER COLUMN key SET STATISTICS 0" for i in range(PARTITIONS)),
    f"ALTER TABLE {META_TABLE} ALTER COLUMN v SET STATISTICS 0",
]
_DDL_MEMBERS = [  # added after the keys table: created on its own for deployments that predate it
    f"CREATE TABLE IF NOT EXISTS {MEMBERS_TABLE} (tok text NOT NULL, kid text NOT NULL, PRIMARY KEY (tok, kid))",
    f"CREATE INDEX IF NOT EXISTS {MEMBERS_TABLE}_kid ON {MEMBERS_TABLE} (kid)",
]


def ensure_ledger_schema(conn: Any) -> None:
    """Create the ledger's tables if missing (idempotent; serialised across processes). ``conn``: psycopg, sync."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
        present = conn.execute("SELECT to_regclass(%s) IS NOT NULL, to_regclass(%s) IS NOT NULL",
                               (f"{KEYS_TABLE}_p{PARTITIONS - 1}", f"{MEMBERS_TABLE}_kid")).fetchone()
        assert present is not None
        for stmt in ([] if present[0] else _DDL) + ([] if present[1] else _DDL_MEMBERS):
            conn.execute(stmt)


class PgLedger:
    """Data keys and the HMAC secret in Postgres (see the module docstring); journal in a local file.

    ``dsn``: the scale-out Postgres (``SYNTH_AGENT_QUEUE``). ``journal``: the local SQLite ledger
    that keeps this process's batch journal (its key table stays empty). Thread safe: a small
    connection pool; statements take well under a millisecond.

    >>> led = PgLedger("postgresql://postgres@127.0.0.1:5432/postgres", journal="/tmp/j.sqlite3")  # doctest: +SKIP
    >>> k = led.ensure_keys(["item-1"])["item-1"]; led.keys(["item-1"]) == {"item-1": k}            # doctest: +SKIP
    True
    """

    shared = True
    """Keys are shared with other processes (the store must not rely on a private cache)."""

    def __init__(self, dsn: str, *, journal: str | Path | Ledger, pool_size: int = 4) -> None:
        import psycopg
        from psycopg_pool import ConnectionPool

        self.dsn = dsn
        with psycopg.connect(dsn, autocommit=True) as conn:
            ensure_ledger_schema(conn)
        self._pool = ConnectionPool(dsn, min_size=1, max_size=pool_size, open=True,
                                    kwargs={"autocommit": True}, name="synth-ledger")
        self._journal = journal if isinstance(journal, Ledger) else Ledger(Path(journal))
        self.owner = self._journal.owner
        self._secret: bytes | None = None
        self._dirty: set[str] = set()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ secret

    def secret(self) -> bytes:
        """The deployment's HMAC secret (made once by whichever process comes first)."""
        if self._secret is None:
            with self._pool.connection() as conn:
                conn.execute(f"INSERT INTO {META_TABLE} (k, v) VALUES ('hmac_secret', %s) ON CONFLICT DO NOTHING",
                             (secrets.token_bytes(KEY_BYTES),))
                row = conn.execute(f"SELECT v FROM {META_TABLE} WHERE k = 'hmac_secret'").fetchone()
            assert row is not None
            self._secret = bytes(row[0])
        return self._secret

    # ------------------------------------------------------------------ data keys

    def keys(self, kids: Iterable[str]) -> dict[str, bytes]:
        """The data keys that exist among ``kids`` (destroyed or never made: absent)."""
        wanted = list(dict.fromkeys(kids))
        if not wanted:
            return {}
        with self._pool.connection() as conn:
            rows = conn.execute(f"SELECT kid, key FROM {KEYS_TABLE} WHERE kid = ANY(%s)", (wanted,)).fetchall()
        return {kid: bytes(key) for kid, key in rows}

    def ensure_keys(self, kids: Iterable[str], members: Mapping[str, Sequence[str]] | None = None) -> dict[str, bytes]:
        """Keys for ``kids``, making those that do not exist yet (committed before this returns).

        ``members``: namespace-index tokens per kid, written in the same transaction for the keys
        this call makes (whoever makes a key writes its rows).
        """
        wanted = list(dict.fromkeys(kids))
        if not wanted:
            return {}
        fresh = [secrets.token_bytes(KEY_BYTES) for _ in wanted]
        with self._pool.connection() as conn, conn.transaction():
            made = conn.execute(f"INSERT INTO {KEYS_TABLE} (kid, key) SELECT * FROM unnest(%s::text[], %s::bytea[]) "
                                "ON CONFLICT DO NOTHING RETURNING kid", (wanted, fresh)).fetchall()
            idx = [(tok, kid) for (kid,) in made for tok in (members or {}).get(kid, ())]
            if idx:
                conn.execute(f"INSERT INTO {MEMBERS_TABLE} (tok, kid) SELECT * FROM unnest(%s::text[], %s::text[]) "
                             "ON CONFLICT DO NOTHING", ([t for t, _ in idx], [k for _, k in idx]))
            rows = conn.execute(f"SELECT kid, key FROM {KEYS_TABLE} WHERE kid = ANY(%s)", (wanted,)).fetchall()
        return {kid: bytes(key) for kid, key in rows}

    def destroy(self, kids: Iterable[str]) -> int:
        """Delete keys (the rows; their bytes leave the files at the next :func:`~synth_agent.scale.erasure.purge`)."""
        wanted = list(dict.fromkeys(kids))
        if not wanted:
            return 0
        with self._pool.connection() as conn, conn.transaction():
            rows = conn.execute(f"DELETE FROM {KEYS_TABLE} WHERE kid = ANY(%s) RETURNING tableoid::regclass::text",
                                (wanted,)).fetchall()
            conn.execute(f"DELETE FROM {MEMBERS_TABLE} WHERE kid = ANY(%s)", (wanted,))
        with self._lock:
            self._dirty.update(r[0] for r in rows)
        return len(rows)

    # ------------------------------------------------------------------ namespace index

    def members(self, tok: str, limit: int) -> list[str]:
        """Up to ``limit`` kids indexed under ``tok``."""
        with self._pool.connection() as conn:
            rows = conn.execute(f"SELECT kid FROM {MEMBERS_TABLE} WHERE tok = %s LIMIT %s", (tok, limit)).fetchall()
        return [r[0] for r in rows]

    def add_members(self, rows: Iterable[tuple[str, str]]) -> int:
        """Backfill ``(tok, kid)`` rows for kids whose key exists; the key rows are share-locked meanwhile,
        so a concurrent :meth:`destroy` waits and then deletes what this added."""
        rows = list(rows)
        if not rows:
            return 0
        with self._pool.connection() as conn, conn.transaction():
            cur = conn.execute(
                f"INSERT INTO {MEMBERS_TABLE} (tok, kid) SELECT v.tok, k.kid FROM {KEYS_TABLE} k "
                "JOIN unnest(%s::text[], %s::text[]) AS v(tok, kid) ON v.kid = k.kid FOR SHARE OF k "
                "ON CONFLICT DO NOTHING", ([t for t, _ in rows], [k for _, k in rows]))
            return cur.rowcount

    def members_complete(self, name: str) -> bool:
        """Whether collection ``name``'s items all have index rows (false for a deployment older than the index)."""
        with self._pool.connection() as conn:
            return conn.execute(f"SELECT 1 FROM {META_TABLE} WHERE k = %s", (f"members:{name}",)).fetchone() is not None

    def mark_members_complete(self, name: str) -> None:
        with self._pool.connection() as conn:
            conn.execute(f"INSERT INTO {META_TABLE} (k, v) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                         (f"members:{name}", b"\x01"))

    def dirty_tables(self) -> list[str]:
        """Partitions that held keys destroyed since the last call (taken: the caller purges them)."""
        with self._lock:
            out, self._dirty = sorted(self._dirty), set()
        return out

    def checkpoint(self) -> None:
        """Nothing to do here per write: erasure in Postgres is :func:`~synth_agent.scale.erasure.purge`."""
        self._journal.checkpoint()

    # ------------------------------------------------------------------ journal (local)

    def journal_open(self, txn: str, body: dict[str, Any]) -> None:
        self._journal.journal_open(txn, body)

    def journal_state(self, txn: str, state: str, body: dict[str, Any] | None = None) -> None:
        self._journal.journal_state(txn, state, body)

    def journal_close(self, txn: str) -> None:
        self._journal.journal_close(txn)

    def journal_orphans(self) -> list[tuple[str, str, dict[str, Any]]]:
        return self._journal.journal_orphans()

    def close(self) -> None:
        self._pool.close()
        self._journal.close()
