"""``synth-agent worker --queue postgres://...``: fit personas from the Postgres job queue.

A worker never scans users. It runs procrastinate's worker on the ``synthesis`` queue;
each job is one (tenant, user). Procrastinate's ``lock`` keeps a user's jobs one at a
time across all workers, its ``queueing_lock`` keeps at most one more queued (see
:mod:`synth_agent.scale.queue`).

A job:

1. finds the user's synthesis thread (``synth:{tenant}:{user}:v<N>``, N = current version + 1)
   in the Postgres checkpointer. An interrupted run there (a killed worker, an abort at
   shutdown) is **resumed**: finished nodes are not paid for again;
2. otherwise checks the refit policy (a follow-up queued during a run may find nothing
   due) and runs the synthesis graph;
3. the graph's ``save`` writes the persona to Chroma with a version allocated under a
   Postgres row lock (:mod:`synth_agent.scale.versions`).

Every attempt leaves a record in ``synth_runs`` (start, end, status, version, the nodes it
executed, queue latency), so single-flight and resumption can be checked from outside.

Failures raise, and procrastinate retries with exponential backoff (``--max-attempts``).
A worker killed outright stops heartbeating; every worker runs a reaper that, after
``--stall-timeout`` seconds without a heartbeat, puts such a worker's jobs back in the
queue (or, if the user already has a follow-up queued, fails the stalled one: the
follow-up resumes the same checkpoint thread).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import procrastinate
from procrastinate import utils as putils
from procrastinate.jobs import Status

from graphs.synthesis import SynthesisRunner, build_synthesis_graph, synthesis_thread_id
from synth_agent.scale.queue import QUEUE, TASK, ensure_schema, make_app, open_pool
from synth_agent.scale.versions import PgVersionedMemories
from synth_agent.scheduler import SynthesisPolicy

__all__ = ["QueueWorker", "WorkerOptions", "open_queue_worker"]

log = logging.getLogger("synth_agent.scale.worker")


@dataclass(frozen=True)
class WorkerOptions:
    """Knobs of one worker process (CLI flags / env, see docs/deploy.md)."""

    concurrency: int = 2
    """Fits run at once in this process (different users; the LLM calls are async)."""
    max_attempts: int = 5
    """Attempts per job before it is marked failed (the next vote enqueues a new one)."""
    backoff: int = 2
    """Retry n waits ``backoff ** n`` seconds."""
    heartbeat: float = 5.0
    """Seconds between this worker's heartbeats."""
    stall_timeout: float = 30.0
    """A worker silent this long is dead: its running jobs go back to the queue."""
    poll_interval: float = 1.0
    """Upper bound between queue polls (new jobs are also announced with LISTEN/NOTIFY)."""
    name: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")


class QueueWorker:
    """One worker process's fitting machinery: the procrastinate app, the graph, the reaper."""

    def __init__(self, dsn: str, store: Any, llm: Any, checkpointer: Any, pool: Any, *,
                 options: WorkerOptions | None = None, policy: SynthesisPolicy | None = None,
                 fit_config: Any = None) -> None:
        self.dsn = dsn
        self.options = options or WorkerOptions()
        self.policy = policy or SynthesisPolicy()
        self.pool = pool
        self.memories = PgVersionedMemories(store, pool)
        self.checkpointer = checkpointer
        self.graph = build_synthesis_graph(llm=llm, memory_for=self.memories, fit_config=fit_config,
                                           checkpointer=checkpointer, on_event=self._on_event, policy=self.policy)
        self.runner = SynthesisRunner(self.graph, self.memories)
        self.app = make_app(dsn)
        self.app.task(
            name=TASK, queue=QUEUE, pass_context=True,
            retry=procrastinate.RetryStrategy(max_attempts=self.options.max_attempts,
                                              exponential_wait=self.options.backoff),
        )(self._fit)
        self._runs: dict[tuple[str, str], tuple[int, list[asyncio.Task[Any]]]] = {}
        self.fits = 0

    # ------------------------------------------------------------------ the job

    def _on_event(self, node: str, phase: str, info: dict[str, Any]) -> None:
        if phase != "end":
            return
        run = self._runs.get((str(info.get("tenant_id")), str(info.get("user_id"))))
        if run is None:
            return
        rec, pending = run
        pending.append(asyncio.get_running_loop().create_task(self._exec(
            "UPDATE synth_runs SET nodes = array_append(nodes, %s) WHERE id = %s", (node, rec))))

    async def _exec(self, sql: str, params: tuple[Any, ...]) -> Any:
        async with self.pool.connection() as conn:
            cur = await conn.execute(sql, params)  # type: ignore[arg-type]
            return await cur.fetchone() if cur.description else None

    async def _fit(self, context: procrastinate.JobContext, tenant_id: str, user_id: str,
                   queued_at: float | None = None, force: bool = False) -> dict[str, Any]:
        key = (tenant_id, user_id)
        job = context.job
        started = time.time()
        memory = self.memories(tenant_id)
        current = await memory.current_persona(user_id)
        run_id = f"v{(current.version if current else 0) + 1}"
        config = {"configurable": {"thread_id": synthesis_thread_id(tenant_id, user_id, run_id)}}
        snap = await self.graph.aget_state(config)  # type: ignore[arg-type]
        resumed = bool(snap.next)
        row = await self._exec(
            "INSERT INTO synth_runs (tenant_id, user_id, job_id, attempt, worker, queued_at, started_at, resumed) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
            (tenant_id, user_id, job.id, job.attempts, self.options.name, queued_at, started, resumed))
        rec = int(row[0])
        pending: list[asyncio.Task[Any]] = []
        self._runs[key] = (rec, pending)
        status, version = "failed", None
        try:
            if not resumed and not force:
                n = await memory.count_votes(user_id)
                fitted_on = len(current.vote_ids) if current is not None else None
                if not self.policy.should_fit(n, fitted_on):
                    status = "not_due"
                    return {"status": status}
            state = await self.runner.run_state(tenant_id, user_id, run_id=run_id)
            status = str(state.get("status") or "done")
            if status == "fitted" and state.get("profile"):
                version = int(state["profile"]["version"])
                self.fits += 1
            return {"status": status, "version": version}
        except asyncio.CancelledError:
            status = "aborted"
            raise
        finally:
            self._runs.pop(key, None)
            await asyncio.shield(self._finish(rec, pending, status, version))

    async def _finish(self, rec: int, pending: list[asyncio.Task[Any]], status: str, version: int | None) -> None:
        try:
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
            await self._exec("UPDATE synth_runs SET finished_at = %s, status = %s, version = %s WHERE id = %s",
                             (time.time(), status, version, rec))
        except Exception:
            log.exception("could not record the end of synthesis run %s", rec)

    # ------------------------------------------------------------------ dead workers

    async def reap_stalled(self) -> int:
        """Put the jobs of workers that stopped heartbeating back in the queue; returns how many."""
        jm = self.app.job_manager
        n = 0
        for job in await jm.get_stalled_jobs(task_name=TASK, seconds_since_heartbeat=self.options.stall_timeout):
            assert job.id is not None
            try:
                await jm.retry_job_by_id_async(job.id, retry_at=putils.utcnow())
                log.warning("job %s of a dead worker is back in the queue", job.id)
            except Exception as exc:
                if "queueing_lock" not in str(exc) and "unique" not in str(exc).lower():
                    log.debug("stalled job %s not retried (another worker did?): %s", job.id, exc)
                    continue
                # A follow-up is already queued for this user: it resumes the same checkpoint thread.
                await jm.finish_job_by_id_async(job.id, status=Status.FAILED, delete_job=False)
                log.warning("job %s of a dead worker failed; the user's queued follow-up resumes it", job.id)
            await self._exec("UPDATE synth_runs SET status = 'lost', finished_at = %s "
                             "WHERE job_id = %s AND finished_at IS NULL", (time.time(), job.id))
            n += 1
        return n

    async def _reaper(self) -> None:
        interval = max(0.5, self.options.stall_timeout / 3)
        while True:
            try:
                await self.reap_stalled()
            except Exception:
                log.exception("stalled-job check failed; will retry")
            await asyncio.sleep(interval)

    # ------------------------------------------------------------------ run

    async def run(self, stop: asyncio.Event) -> None:
        """Work until ``stop`` is set; running fits are aborted and go back to the queue
        (they resume from their checkpoint on the next attempt)."""
        o = self.options
        async with self.app.open_async():
            worker = asyncio.create_task(self.app.run_worker_async(
                queues=[QUEUE], name=o.name, concurrency=o.concurrency, wait=True,
                install_signal_handlers=False, update_heartbeat_interval=o.heartbeat,
                stalled_worker_timeout=o.stall_timeout, fetch_job_polling_interval=o.poll_interval,
                abort_job_polling_interval=min(1.0, o.poll_interval), shutdown_graceful_timeout=0,
                delete_jobs="successful",  # a finished job's args (user ids) do not pile up in Postgres
            ))
            reaper = asyncio.create_task(self._reaper())
            stopped = asyncio.create_task(stop.wait())
            try:
                await asyncio.wait([worker, stopped], return_when=asyncio.FIRST_COMPLETED)
            finally:
                for t in (reaper, stopped, worker):
                    t.cancel()
                for t in (reaper, stopped, worker):
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await t
            if worker.done() and not worker.cancelled() and worker.exception() is not None:
                raise worker.exception()  # type: ignore[misc]


@contextlib.asynccontextmanager
async def open_queue_worker(settings: Any, dsn: str, *, options: WorkerOptions | None = None,
                            policy: SynthesisPolicy | None = None, fit_config: Any = None
                            ) -> AsyncIterator[QueueWorker]:
    """A queue worker over the configured store and LLM, Postgres at ``dsn`` (all closed on exit)."""
    from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver

    from synth_agent.services import open_llm, open_store

    await ensure_schema(dsn)
    store = await asyncio.to_thread(open_store, settings, server=True, queue=dsn)  # one embedding thread, like serve
    llm = open_llm(settings)
    pool = open_pool(dsn, max_size=4 + 2 * (options or WorkerOptions()).concurrency)
    await pool.open(wait=True)
    try:
        async with AsyncPostgresSaver.from_conn_string(dsn) as saver:
            yield QueueWorker(dsn, store, llm, saver, pool, options=options, policy=policy, fit_config=fit_config)
    finally:
        await pool.close()
        await llm.aclose()
        close = getattr(store, "close", None)
        if close is not None:
            await asyncio.to_thread(close)
