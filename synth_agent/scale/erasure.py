"""Making a forget reach Postgres's files, not only its rows.

``DELETE`` in PostgreSQL marks tuples dead; their bytes stay where they were:

* **heap and TOAST pages**: a dead tuple's bytes stay in its page until the page is
  rewritten. Plain ``VACUUM`` makes the space reusable and compacts the live tuples of
  a page (``PageRepairFragmentation``), but it never zeroes the hole that is left, so
  the old bytes survive until something happens to overwrite them. ``VACUUM FULL``
  writes a new copy of the table and its indexes (new relfilenodes) with live tuples
  only; the old files are truncated at commit and unlinked at the next checkpoint.
* **index pages**: B-tree entries keep the key (``lock``, ``thread_id``, ...) until the
  index is rebuilt; ``VACUUM FULL`` rebuilds every index of the table.
* **WAL**: every insert was logged with its tuple (and full-page images after each
  checkpoint). A segment is removed only when a checkpoint's redo point has moved past
  it; with ``wal_recycle = on`` (the default) it is *renamed* for reuse, contents intact,
  until overwritten. So: ``pg_switch_wal()`` closes the current segment, one ``CHECKPOINT``
  moves the redo point into the new one and removes every older segment, and with
  ``wal_recycle = off`` removal is ``unlink``. (New segments are zero-filled:
  ``wal_init_zero`` is on by default.) ``wal_keep_size``, replication slots and
  ``archive_mode`` keep segments longer: see docs/deploy.md for what an operator must set.
* **planner statistics**: ``ANALYZE`` copies sample values into ``pg_statistic``. The
  columns that can hold a user's id or data have ``SET STATISTICS 0``
  (:func:`synth_agent.scale.queue.ensure_schema`), so no copy is ever made.

:func:`purge` does exactly that for the tables a forget touched, one table at a time. A
``VACUUM FULL`` holds an ``ACCESS EXCLUSIVE`` lock on its table while it rewrites it, so
the tables are kept small (the keys table is hash-partitioned and only the partitions that
held a destroyed key are rewritten; finished jobs are deleted by the workers), the lock is
requested with a short ``lock_timeout`` (a waiting exclusive request would queue every
later reader behind it) and retried, and purges are serialised by an advisory lock. The tables
to rewrite are recorded in ``synth_purge_pending`` first and struck off only after the
checkpoint, so a purge that fails is completed by the next one.
The figures (forget latency, the stall other users see) are in docs/deploy.md.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import Any

__all__ = ["PENDING_TABLE", "PURGE_LOCK", "PurgeReport", "purge"]

log = logging.getLogger("synth_agent.scale.erasure")

PURGE_LOCK = 0x5AE7_E8A5  # pg_advisory_lock key: one purge at a time
PENDING_TABLE = "synth_purge_pending"
"""Names of tables whose rewrite is owed (created by :func:`synth_agent.scale.queue.ensure_schema`)."""
_LOCK_TIMEOUT_MS = 200


class PurgeReport(dict[str, Any]):
    """``{"tables": [...], "seconds": s, "lock_retries": n, "wal_segments_removed": k}``."""


async def _vacuum_full(conn: Any, table: str, *, attempts: int = 50) -> int:
    """``VACUUM (FULL)`` one table, asking for its lock with a short timeout; returns retries used."""
    from psycopg import errors, sql

    for attempt in range(attempts):
        try:
            await conn.execute(sql.SQL("VACUUM (FULL) {}").format(sql.Identifier(*table.split("."))))
            return attempt
        except errors.LockNotAvailable:
            await asyncio.sleep(min(0.05 * (attempt + 1), 0.5))
    raise TimeoutError(f"could not lock {table} for the erasure rewrite after {attempts} attempts")


async def _wal_segments(conn: Any) -> int | None:
    """Files in pg_wal (for the report; needs superuser or pg_monitor, else None)."""
    from psycopg import errors

    try:
        cur = await conn.execute("SELECT count(*) FROM pg_ls_waldir()")
        row = await cur.fetchone()
        return int(row[0]) if row else None
    except errors.InsufficientPrivilege:
        return None


async def purge(pool: Any, tables: Iterable[str], *, lock_attempts: int = 50) -> PurgeReport:
    """Rewrite ``tables`` and retire the WAL that held their old rows; return when that is on disk.

    ``pool``: an async psycopg pool on the scale-out Postgres, as a role that owns the tables
    and may run ``CHECKPOINT`` (superuser or ``pg_checkpoint``) and ``pg_switch_wal()``.
    Tables a failed purge left owed are rewritten too. TimeoutError if a table stays locked by
    others for ``lock_attempts`` tries (about 20 s by default); the table stays owed.
    """
    started = time.perf_counter()
    wanted = list(dict.fromkeys(t for t in tables if t))
    retries = 0
    async with pool.connection() as conn:
        await conn.set_autocommit(True)
        # Recorded first, removed only once rewritten and checkpointed: a purge that fails (lock
        # timeout, lost connection, a crash) is finished by the next one, whoever's forget runs it.
        if wanted:
            await conn.execute(f"INSERT INTO {PENDING_TABLE} (relname) SELECT unnest(%s::text[]) "
                               "ON CONFLICT DO NOTHING", (wanted,))
        await conn.execute("SELECT pg_advisory_lock(%s)", (PURGE_LOCK,))
        try:
            cur = await conn.execute(f"SELECT relname FROM {PENDING_TABLE} ORDER BY relname")
            wanted = list(dict.fromkeys([*wanted, *(r[0] for r in await cur.fetchall())]))
            await conn.execute(f"SET lock_timeout = '{_LOCK_TIMEOUT_MS}ms'")
            present = []
            for t in wanted:
                cur = await conn.execute("SELECT to_regclass(%s) IS NOT NULL", (t,))
                row = await cur.fetchone()
                if row and row[0]:
                    present.append(t)
            for t in present:
                retries += await _vacuum_full(conn, t, attempts=lock_attempts)
            await conn.execute("RESET lock_timeout")
            before = await _wal_segments(conn)
            # The switch closes the segment holding the old rows; the checkpoint writes the rewritten
            # tables out, unlinks the old table files and, its redo point being in the new segment,
            # removes every older one (unlinks it, with wal_recycle = off). Measured necessary, each:
            # without the switch the current segment keeps the rows; with wal_recycle = on the old
            # segment is renamed to a future one, contents intact (docs/deploy.md).
            await conn.execute("SELECT pg_switch_wal()")
            await conn.execute("CHECKPOINT")
            after = await _wal_segments(conn)
            await conn.execute(f"DELETE FROM {PENDING_TABLE} WHERE relname = ANY(%s)", (wanted,))
        finally:
            await conn.execute("SELECT pg_advisory_unlock(%s)", (PURGE_LOCK,))
    removed = max(0, before - after) if before is not None and after is not None else None
    report = PurgeReport(tables=present, seconds=round(time.perf_counter() - started, 4),
                         lock_retries=retries, wal_segments_removed=removed)
    log.info("erasure purge: %s", report)
    return report
