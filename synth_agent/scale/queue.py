"""The synthesis job queue on Postgres (procrastinate), shared by every proxy replica and worker.

Why procrastinate (compared with pgqueuer, both async and maintained): its two per-job
locks are exactly the guarantee the product needs, enforced by unique indexes in Postgres:

* ``queueing_lock``: at most one job per lock in ``todo`` (a unique partial index); a second
  defer raises ``AlreadyEnqueued``. Our lock is the (tenant, user) key, so a burst of votes
  queues one fit, and votes arriving *while a fit runs* queue exactly one follow-up (the
  running job is ``doing``, not ``todo``).
* ``lock``: a job is not fetched while another job with the same lock is ``doing`` (and a
  unique index on ``doing`` backs it), so one user never has two fits at once, on any worker.

pgqueuer's ``dedupe_key`` covers queued *and* picked jobs (no follow-up while one runs) and
its serialized dispatch is per entrypoint, not per key. Procrastinate also has retries with
exponential backoff (``RetryStrategy``), worker heartbeats to find jobs of dead workers, and
aborting a running async job (the worker cancels its task), which forget needs.

What lives in Postgres besides procrastinate's tables (``ensure_schema`` creates them, under
an advisory lock so that replicas starting together do not race):

* ``synth_persona_versions``: one counter row per (tenant, user); :mod:`synth_agent.scale.versions`.
* ``synth_runs``: one record per fit attempt (job, attempt, worker, start/end, status, version,
  nodes executed, queue latency). Tests read it to prove single-flight; the bench reads the
  latency from it.
* the LangGraph checkpoints (``AsyncPostgresSaver``), one thread per persona version.
* ``synth_purge_pending``: tables whose erasure rewrite is owed (:mod:`synth_agent.scale.erasure`).
* the store's key ledger (``synth_store_keys``, ``synth_store_meta``; :mod:`synth_agent.scale.ledger`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import procrastinate
from procrastinate import exceptions as pexc
from psycopg_pool import AsyncConnectionPool

from synth_agent.scheduler import SchedulerStats, SynthesisPolicy

__all__ = [
    "QUEUE",
    "forget_everywhere",
    "TASK",
    "QueueScheduler",
    "ensure_schema",
    "make_app",
    "open_pool",
    "user_key",
]

log = logging.getLogger("synth_agent.scale.queue")

QUEUE = "synthesis"
TASK = "synth_agent.fit_user"
_SCHEMA_LOCK = 0x5AE7_1A57  # pg_advisory_xact_lock key for schema creation

TABLES = """
CREATE TABLE IF NOT EXISTS synth_persona_versions (
    tenant_id text NOT NULL,
    user_id text NOT NULL,
    version integer NOT NULL,
    PRIMARY KEY (tenant_id, user_id)
);
CREATE TABLE IF NOT EXISTS synth_runs (
    id bigserial PRIMARY KEY,
    tenant_id text NOT NULL,
    user_id text NOT NULL,
    job_id bigint,
    attempt integer NOT NULL DEFAULT 0,
    worker text NOT NULL,
    queued_at double precision,
    started_at double precision NOT NULL,
    finished_at double precision,
    status text NOT NULL DEFAULT 'running',
    version integer,
    resumed boolean NOT NULL DEFAULT false,
    nodes text[] NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS synth_runs_user_idx ON synth_runs (tenant_id, user_id);
CREATE TABLE IF NOT EXISTS synth_purge_pending (relname text PRIMARY KEY);
"""

PRIVATE_COLUMNS = {
    "procrastinate_jobs": ("args", "lock", "queueing_lock"),
    "synth_runs": ("tenant_id", "user_id"),
    "synth_persona_versions": ("tenant_id", "user_id"),
    "checkpoints": ("thread_id", "checkpoint", "metadata"),
    "checkpoint_blobs": ("thread_id", "blob"),
    "checkpoint_writes": ("thread_id", "blob"),
}
"""Columns that can hold a user's id or data: ``ANALYZE`` never samples them (``SET STATISTICS 0``),
so ``pg_statistic`` never keeps a copy that a forget would have to find."""


def user_key(tenant_id: str, user_id: str) -> str:
    """The lock and queueing lock of a user's jobs (JSON, so ids containing ':' cannot collide)."""
    return "synth:" + json.dumps([tenant_id, user_id], ensure_ascii=True, separators=(",", ":"))


def make_app(dsn: str, **connector_kw: Any) -> procrastinate.App:
    """A procrastinate app on ``dsn`` (not opened). Workers register the task on it; proxies only defer."""
    connector = procrastinate.PsycopgConnector(conninfo=dsn, **connector_kw)
    return procrastinate.App(connector=connector)


async def ensure_schema(dsn: str) -> None:
    """Create procrastinate's schema, ours and LangGraph's checkpoint tables if missing.

    Idempotent and safe from every process at once: a session advisory lock serialises it
    (the checkpointer's migrations use ``CREATE INDEX CONCURRENTLY``, so no transaction here, and
    waiters poll rather than block).
    """
    import psycopg
    from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
    from procrastinate.schema import SchemaManager
    from psycopg.rows import dict_row

    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        # Poll with try-lock instead of waiting in pg_advisory_lock: a waiting session is an open
        # transaction, and the holder's CREATE INDEX CONCURRENTLY waits for every open transaction
        # (a deadlock Postgres reports, seen with 4 processes starting at once).
        while True:
            cur = await conn.execute("SELECT pg_try_advisory_lock(%s) AS got", (_SCHEMA_LOCK,))
            got = await cur.fetchone()
            if got and got["got"]:
                break
            await asyncio.sleep(0.1)
        try:
            cur = await conn.execute("SELECT to_regclass('procrastinate_jobs') IS NOT NULL AS present")
            row = await cur.fetchone()
            if not (row and row["present"]):
                async with conn.transaction():
                    await conn.execute(SchemaManager.get_schema())  # type: ignore[arg-type]
            await conn.execute(TABLES)  # type: ignore[arg-type]
            await AsyncPostgresSaver(conn).setup()  # type: ignore[arg-type]
            await _no_statistics(conn)
        finally:
            await conn.execute("SELECT pg_advisory_unlock(%s)", (_SCHEMA_LOCK,))


async def _no_statistics(conn: Any) -> None:
    from psycopg import sql

    cur = await conn.execute(
        "SELECT c.relname, a.attname FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
        "WHERE c.relname = ANY(%s) AND a.attname = ANY(%s) AND a.attnum > 0 AND c.relkind = 'r' "
        "AND c.relnamespace = 'public'::regnamespace AND coalesce(a.attstattarget, -1) <> 0",
        (list(PRIVATE_COLUMNS), sorted({c for cols in PRIVATE_COLUMNS.values() for c in cols})))
    for row in await cur.fetchall():
        table, column = (row["relname"], row["attname"]) if isinstance(row, dict) else row
        if column in PRIVATE_COLUMNS.get(table, ()):
            await conn.execute(sql.SQL("ALTER TABLE {} ALTER COLUMN {} SET STATISTICS 0").format(
                sql.Identifier(table), sql.Identifier(column)))


def open_pool(dsn: str, *, max_size: int = 4) -> AsyncConnectionPool:
    """A small pool for our own tables (open it with ``await pool.open()``)."""
    return AsyncConnectionPool(dsn, min_size=1, max_size=max_size, open=False, kwargs={"autocommit": True})


class QueueScheduler:
    """The proxy side of the queue: a vote that makes a fit due enqueues one job for that user.

    Same surface as :class:`~synth_agent.scheduler.SynthesisScheduler` where the proxy uses it
    (``notify_vote``, ``request_fit``, ``policy``, ``stats``, ``is_busy``, ``aclose``), plus the
    forget hooks :meth:`cancel_user` and :meth:`erase_user`. The policy check (count the user's
    votes, read the current persona) runs in a background task, never in the request; one check
    per user at a time in this process, a vote during a check asks for one more.
    """

    distributed = True
    """Marks the scale-out scheduler for the proxy's forget route."""

    def __init__(self, dsn: str, memory_for: Callable[[str], Any], policy: SynthesisPolicy | None = None,
                 *, abort_timeout: float = 60.0, purge: bool | None = None) -> None:
        if purge is None:
            from synth_agent.scale.settings import ScaleSettings

            purge = ScaleSettings().forget_purge
        self.purge = purge
        """Whether a forget makes the deletion reach Postgres's files (``SYNTH_AGENT_FORGET_PURGE``)."""
        self.dsn = dsn
        self.memory_for = memory_for
        self.policy = policy or SynthesisPolicy()
        self.abort_timeout = abort_timeout
        self.app = make_app(dsn)
        self.pool = open_pool(dsn)
        self._checks: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._again: set[tuple[str, str]] = set()
        self._stats = SchedulerStats()
        self.enqueued = 0
        self.already_enqueued = 0

    async def open(self) -> QueueScheduler:
        await ensure_schema(self.dsn)
        await self.app.open_async()
        await self.pool.open(wait=True)
        return self

    async def aclose(self, *, drain: bool = True, drain_timeout: float | None = 10.0) -> None:
        tasks = list(self._checks.values())
        if tasks:
            if not drain:
                for t in tasks:
                    t.cancel()
            await asyncio.wait(tasks, timeout=drain_timeout)
        await self.app.close_async()
        await self.pool.close()

    # ------------------------------------------------------------------ the SynthesisScheduler surface

    @property
    def stats(self) -> SchedulerStats:
        s = SchedulerStats(**self._stats.as_dict())
        s.pending_users = len(self._checks)
        return s

    def add_listener(self, listener: Any) -> None:
        """Personas are saved by workers in other processes: nothing to call here. Proxies see a new
        version on their next store read (the persona cache's TTL bounds how stale a chat turn is)."""

    def is_busy(self, tenant_id: str, user_id: str) -> bool:
        return (tenant_id, user_id) in self._checks

    def notify_vote(self, tenant_id: str, user_id: str) -> None:
        """A vote was stored: check the policy in the background and enqueue a job if a fit is due."""
        self._stats.votes_notified += 1
        self._spawn((tenant_id, user_id), force=False)

    def request_fit(self, tenant_id: str, user_id: str) -> None:
        self._spawn((tenant_id, user_id), force=True)

    def _spawn(self, key: tuple[str, str], *, force: bool) -> None:
        if key in self._checks:
            self._again.add(key)
            return
        task = asyncio.get_running_loop().create_task(self._check_loop(key, force), name=f"enqueue:{key!r}")
        self._checks[key] = task

    async def _check_loop(self, key: tuple[str, str], force: bool) -> None:
        try:
            while True:
                self._again.discard(key)
                try:
                    await self.check(*key, force=force)
                except Exception:
                    self._stats.failures += 1
                    log.exception("could not enqueue a synthesis check for %r", key)
                if key not in self._again:
                    return
        finally:
            self._checks.pop(key, None)

    async def check(self, tenant_id: str, user_id: str, *, force: bool = False) -> bool:
        """Enqueue a fit for this user if one is due (or ``force``); True when a new job was queued."""
        self._stats.checks += 1
        if not force:
            memory = self.memory_for(tenant_id)
            n_votes, profile = await asyncio.gather(memory.count_votes(user_id), memory.current_persona(user_id))
            fitted_on = len(profile.vote_ids) if profile is not None else None
            if not self.policy.should_fit(n_votes, fitted_on):
                self._stats.runs_skipped += 1
                return False
        return await self.enqueue(tenant_id, user_id, force=force)

    async def enqueue(self, tenant_id: str, user_id: str, *, force: bool = False) -> bool:
        key = user_key(tenant_id, user_id)
        deferrer = self.app.configure_task(
            TASK, queue=QUEUE, lock=key, queueing_lock=key,
            schedule_in={"seconds": self.policy.debounce} if self.policy.debounce else None,
        )
        try:
            await deferrer.defer_async(tenant_id=tenant_id, user_id=user_id, queued_at=time.time(), force=force)
        except pexc.AlreadyEnqueued:
            self.already_enqueued += 1
            return False
        self.enqueued += 1
        self._stats.runs_started += 1
        return True

    # ------------------------------------------------------------------ forget

    async def cancel_user(self, tenant_id: str, user_id: str) -> dict[str, int]:
        """Cancel the user's queued jobs and abort a running one, waiting until it has stopped.

        Returns ``{"cancelled": n, "aborted": m}``. Raises TimeoutError if a running fit did not
        stop within ``abort_timeout`` (its worker would be dead: the stalled-job reaper fails it).
        """
        # A check task of this process could enqueue right after: let it finish first.
        task = self._checks.get((tenant_id, user_id))
        if task is not None:
            await asyncio.wait([task])
        key = user_key(tenant_id, user_id)
        jm = self.app.job_manager
        cancelled = aborted = 0
        for job in await jm.list_jobs_async(lock=key, status="todo"):
            assert job.id is not None
            if await jm.cancel_job_by_id_async(job.id, delete_job=True):
                cancelled += 1
        running = [j.id for j in await jm.list_jobs_async(lock=key, status="doing") if j.id is not None]
        for job_id in running:
            if await jm.cancel_job_by_id_async(job_id, abort=True):
                aborted += 1
        deadline = time.monotonic() + self.abort_timeout
        while running:
            running = [i for i in running if (await jm.get_job_status_async(i)).value == "doing"]
            if not running:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"a running fit of this user did not stop within {self.abort_timeout:.0f}s")
            await asyncio.sleep(0.1)
        return {"cancelled": cancelled, "aborted": aborted}

    async def forget(self, memory: Any, user_id: str) -> dict[str, int]:
        """Forget a user everywhere: stop their jobs (:meth:`cancel_user`), erase them from the store
        (``memory.forget_user``, a :class:`~store.memory.PreferenceMemory`), then from Postgres
        (:meth:`erase_user`). Returns the store's counts. TimeoutError (nothing deleted) if a running
        fit does not stop."""
        await self.cancel_user(memory.tenant, user_id)
        counts: dict[str, int] = await memory.forget_user(user_id)
        ledger = getattr(getattr(memory, "store", None), "ledger", None)
        await self.erase_user(memory.tenant, user_id, ledger=ledger, purge=self.purge)
        return counts

    async def erase_user(self, tenant_id: str, user_id: str, *, ledger: Any = None,
                         purge: bool = True) -> dict[str, Any]:
        """Delete every row that names this user: checkpoints, job rows (args hold the ids), run records,
        the version counter. Call after :meth:`cancel_user` (and after the store's forget).

        ``purge`` (default): then make the deletion reach the files (:func:`synth_agent.scale.erasure.purge`):
        the tables that held the rows, and the key partitions ``ledger`` (the store's
        :class:`~synth_agent.scale.ledger.PgLedger`) destroyed keys in, are rewritten and the WAL that
        held the old rows is removed."""
        from synth_agent.scale.checkpoints import erase_user_threads
        from synth_agent.scale.erasure import purge as purge_files

        key = user_key(tenant_id, user_id)
        async with self.pool.connection() as conn:
            threads = await erase_user_threads(conn, tenant_id, user_id)
            cur = await conn.execute("DELETE FROM procrastinate_jobs WHERE lock = %s OR queueing_lock = %s "
                                     "OR (args->>'tenant_id' = %s AND args->>'user_id' = %s)",
                                     (key, key, tenant_id, user_id))
            jobs = cur.rowcount
            cur = await conn.execute("DELETE FROM synth_runs WHERE tenant_id = %s AND user_id = %s",
                                     (tenant_id, user_id))
            runs = cur.rowcount
            cur = await conn.execute("DELETE FROM synth_persona_versions WHERE tenant_id = %s AND user_id = %s",
                                     (tenant_id, user_id))
            counters = cur.rowcount
        out: dict[str, Any] = {"checkpoint_threads": threads, "jobs": jobs, "runs": runs}
        if purge:
            # Finished jobs were deleted by the workers (their args are in dead tuples): always rewrite.
            tables = ["procrastinate_jobs"]
            if threads:
                tables += ["checkpoints", "checkpoint_blobs", "checkpoint_writes"]
            if runs:
                tables.append("synth_runs")
            if counters:
                tables.append("synth_persona_versions")
            dirty = getattr(ledger, "dirty_tables", None)
            if dirty is not None:
                tables += dirty()
            out["purge"] = dict(await purge_files(self.pool, tables))
        return out


async def forget_everywhere(dsn: str, memory: Any, user_id: str) -> dict[str, int]:
    """:meth:`QueueScheduler.forget` from a one-shot process (``synth-agent forget`` in scale-out mode)."""
    q = QueueScheduler(dsn, lambda _tenant: memory)
    await q.open()
    try:
        return await q.forget(memory, user_id)
    finally:
        await q.aclose()
