"""Scale-out pieces against a real PostgreSQL (started from the pinned pgserver wheel): the local
server itself, the queue's per-user locks, persona versions under concurrent savers, and the
exact matching of a user's checkpoint threads."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from langgraph.store.memory import InMemoryStore

from store.memory import PreferenceMemory
from synth_agent.models import PersonaProfile
from synth_agent.scale.checkpoints import erase_user_threads, user_threads
from synth_agent.scale.postgres import LocalPostgres
from synth_agent.scale.queue import QueueScheduler, ensure_schema, open_pool, user_key
from synth_agent.scale.versions import PgVersionedMemory
from synth_agent.scheduler import SynthesisPolicy


@pytest.fixture(scope="module")
def pg() -> Iterator[LocalPostgres]:
    base = Path(tempfile.mkdtemp(prefix="synth-pg-"))
    base.chmod(0o711)
    with LocalPostgres(base / "data") as server:
        yield server
    subprocess.run(["rm", "-rf", str(base)], check=False)


@pytest.fixture
async def schema(pg: LocalPostgres) -> AsyncIterator[str]:
    await ensure_schema(pg.dsn)
    await ensure_schema(pg.dsn)  # idempotent
    yield pg.dsn
    async with await psycopg.AsyncConnection.connect(pg.dsn, autocommit=True) as conn:
        await conn.execute("TRUNCATE procrastinate_jobs, synth_runs, synth_persona_versions CASCADE")


def test_local_postgres_is_a_real_server_on_loopback(pg: LocalPostgres) -> None:
    with psycopg.connect(pg.dsn) as conn:
        version = conn.execute("SHOW server_version").fetchone()
        listen = conn.execute("SHOW listen_addresses").fetchone()
    assert version and int(version[0].split(".")[0]) >= 13  # 16 from the pinned wheel; SYNTH_AGENT_PG_BIN may differ
    assert listen == ("127.0.0.1",)
    assert pg.proc is not None and pg.proc.poll() is None


def test_local_postgres_stops_and_restarts_with_its_data(tmp_path: Path) -> None:
    base = Path(tempfile.mkdtemp(prefix="synth-pg-"))
    base.chmod(0o711)
    try:
        server = LocalPostgres(base / "data").start()
        with psycopg.connect(server.dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE kept (x int)")
            conn.execute("INSERT INTO kept VALUES (42)")
        proc = server.proc
        server.stop()
        assert proc is not None and proc.poll() is not None
        again = LocalPostgres(base / "data").start()  # no initdb this time, a new port
        try:
            with psycopg.connect(again.dsn) as conn:
                assert conn.execute("SELECT x FROM kept").fetchone() == (42,)
        finally:
            again.stop()
    finally:
        subprocess.run(["rm", "-rf", str(base)], check=False)


def test_postgres_cli_reports_a_bad_data_dir_in_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    out = subprocess.run([sys.executable, "-m", "synth_agent.cli", "postgres", "--data", str(blocker / "pg"),
                          "--port", "0"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.startswith("error: ") and "Traceback" not in out.stderr


async def test_schema_creation_from_many_processes_at_once_does_not_deadlock(pg: LocalPostgres) -> None:
    """Proxies and workers starting together all run ensure_schema on an empty database (the
    checkpointer's CREATE INDEX CONCURRENTLY once deadlocked against sessions waiting for the lock)."""
    async with await psycopg.AsyncConnection.connect(pg.dsn, autocommit=True) as conn:
        await conn.execute("CREATE DATABASE fresh_schema")
    dsn = pg.dsn.rsplit("/", 1)[0] + "/fresh_schema"
    await asyncio.wait_for(asyncio.gather(*(ensure_schema(dsn) for _ in range(6))), 120)
    tables = {r[0] for r in await _rows(dsn, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert {"procrastinate_jobs", "synth_runs", "synth_persona_versions", "checkpoints"} <= tables


class _Memories:
    def __init__(self, store: InMemoryStore) -> None:
        self.mem = PreferenceMemory(store, "t1")

    def __call__(self, tenant: str) -> PreferenceMemory:
        return self.mem


async def test_queue_keeps_one_queued_job_per_user_and_running_jobs_exclusive(schema: str) -> None:
    q = QueueScheduler(schema, _Memories(InMemoryStore()), SynthesisPolicy(debounce=0))
    await q.open()
    try:
        assert await q.enqueue("t1", "ann", force=True)
        assert not await q.enqueue("t1", "ann", force=True)  # queueing lock: at most one queued
        assert await q.enqueue("t1", "bob", force=True)  # another user is independent
        assert await q.enqueue("t2", "ann", force=True)  # ... and so is another tenant
        jm = q.app.job_manager
        # A worker takes ann's job: it is `doing`, so exactly one follow-up may queue behind it.
        fetched = await jm.fetch_job(queues=None, worker_id=await jm.register_worker())
        assert fetched is not None and fetched.lock == user_key("t1", "ann")
        assert await q.enqueue("t1", "ann", force=True)
        assert not await q.enqueue("t1", "ann", force=True)
        # The lock: while ann's first job runs her follow-up is never handed out, whatever polls.
        others = [await jm.fetch_job(queues=None, worker_id=await jm.register_worker()) for _ in range(3)]
        got = sorted(j.lock for j in others if j is not None)
        assert got == sorted([user_key("t1", "bob"), user_key("t2", "ann")])
        # Forget ann: her queued follow-up is cancelled and deleted; the running one is asked to abort.
        result = await asyncio.wait_for(_cancel_with_fake_worker(q, fetched.id), 30)
        assert result == {"cancelled": 1, "aborted": 1}
        rows = await _rows(schema, "SELECT status FROM procrastinate_jobs WHERE lock = %s", user_key("t1", "ann"))
        assert rows == [("aborted",)]
        erased = await q.erase_user("t1", "ann")
        assert erased["jobs"] == 1
        left = await _rows(schema, "SELECT args->>'tenant_id', args->>'user_id' FROM procrastinate_jobs ORDER BY 1, 2")
        assert left == [("t1", "bob"), ("t2", "ann")]  # ann of t1 is gone; the same name in t2 is not hers
    finally:
        await q.aclose()


async def _cancel_with_fake_worker(q: QueueScheduler, running_id: int | None) -> dict[str, int]:
    """cancel_user waits for the running job to stop; play the worker that honours the abort."""
    assert running_id is not None

    async def worker() -> None:
        jm = q.app.job_manager
        while running_id not in set(await jm.list_jobs_to_abort_async()):  # noqa: ASYNC110 (polls Postgres)
            await asyncio.sleep(0.05)
        from procrastinate.jobs import Status

        await jm.finish_job_by_id_async(running_id, status=Status.ABORTED, delete_job=False)

    task = asyncio.create_task(worker())
    try:
        return await q.cancel_user("t1", "ann")
    finally:
        await task


async def _rows(dsn: str, sql: str, *params: object) -> list[tuple[object, ...]]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(sql, params or None)  # type: ignore[arg-type]
        return list(await cur.fetchall())


class NetworkStore(InMemoryStore):
    """InMemoryStore answers without yielding; a store over the network (a Chroma server) yields on
    every call, which is where another process's save can slip in."""

    async def abatch(self, ops):  # type: ignore[no-untyped-def, override]
        await asyncio.sleep(0.002)
        return await super().abatch(ops)


def _profile(user: str, i: int) -> PersonaProfile:
    return PersonaProfile(user_id=user, persona=f"persona {i}", vote_ids=[f"v{i}"])


async def test_concurrent_savers_in_separate_processes_never_share_a_version(schema: str) -> None:
    """Two 'processes' (own memory object, own lock table, own pool) save 12 personas each at once."""
    store = NetworkStore()
    pools = [open_pool(schema), open_pool(schema)]
    for p in pools:
        await p.open(wait=True)
    try:
        a, b = (PgVersionedMemory(store, "t1", p) for p in pools)
        saved = await asyncio.gather(*(m.save_persona(_profile("zoë", i)) for i in range(12) for m in (a, b)))
        versions = sorted(s.version for s in saved)
        assert versions == list(range(1, 25))
        history = await a.persona_history("zoë")
        assert [h.version for h in history] == list(range(1, 25))
        assert await _rows(schema, "SELECT version FROM synth_persona_versions WHERE user_id = 'zoë'") == [(24,)]
    finally:
        for p in pools:
            await p.close()


async def test_without_postgres_the_same_race_collides() -> None:
    """The control: plain PreferenceMemory objects (one per process) allocate 'latest + 1' and collide."""
    store = NetworkStore()
    a, b = PreferenceMemory(store, "t1"), PreferenceMemory(store, "t1")
    saved = await asyncio.gather(*(m.save_persona(_profile("zoë", i)) for i in range(12) for m in (a, b)))
    assert len({s.version for s in saved}) < len(saved)


async def test_version_counter_adopts_personas_saved_before_and_refuses_going_back(schema: str) -> None:
    store = InMemoryStore()
    plain = PreferenceMemory(store, "t1")
    for i in range(3):
        await plain.save_persona(_profile("old-user", i))
    pool = open_pool(schema)
    await pool.open(wait=True)
    try:
        mem = PgVersionedMemory(store, "t1", pool)
        assert (await mem.save_persona(_profile("old-user", 9))).version == 4
        with pytest.raises(ValueError, match="not above"):
            await plain.save_persona(_profile("old-user", 10), version=4)
        assert [p.version for p in await plain.persona_history("old-user")] == [1, 2, 3, 4]
    finally:
        await pool.close()


async def test_user_threads_match_exactly(schema: str) -> None:
    from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
    from psycopg.rows import dict_row

    async with await psycopg.AsyncConnection.connect(schema, autocommit=True, row_factory=dict_row) as conn:
        saver = AsyncPostgresSaver(conn)  # type: ignore[arg-type]
        from langgraph.checkpoint.base import empty_checkpoint

        for thread in ("synth:t1:bob:v1", "synth:t1:bob:v2", "synth:t1:bob:x:v1", "synth:t1:bo_:v1",
                       "synth:t1:bob%:v1", "synth:t2:bob:v1"):
            cfg = {"configurable": {"thread_id": thread, "checkpoint_ns": ""}}
            await saver.aput(cfg, empty_checkpoint(), {"source": "input", "step": 0}, {})  # type: ignore[arg-type]
        assert await user_threads(conn, "t1", "bob") == ["synth:t1:bob:v1", "synth:t1:bob:v2"]
        assert await erase_user_threads(conn, "t1", "bob") == 2
        cur = await conn.execute("SELECT DISTINCT thread_id FROM checkpoints ORDER BY 1")
        left = [r["thread_id"] for r in await cur.fetchall()]
        assert left == ["synth:t1:bo_:v1", "synth:t1:bob%:v1", "synth:t1:bob:x:v1", "synth:t2:bob:v1"]


class FlakyLLM:
    """A real LLM client on the simulator whose first ``failures`` calls raise (an endpoint outage)."""

    def __init__(self, inner: Any, failures: int) -> None:
        self.inner, self.failures, self.model = inner, failures, inner.model

    async def complete(self, *a: Any, **kw: Any) -> Any:
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionError("simulated outage")
        return await self.inner.complete(*a, **kw)

    async def structured(self, *a: Any, **kw: Any) -> Any:
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionError("simulated outage")
        return await self.inner.structured(*a, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_a_failing_fit_is_retried_with_backoff_then_succeeds(schema: str) -> None:
    """The worker in this process: the first attempt fails (LLM outage), procrastinate schedules a retry
    after the backoff, the retry fits and saves v1."""
    from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver

    from synth_agent.llm.client import EndpointConfig, LLMClient
    from synth_agent.scale.queue import QUEUE
    from synth_agent.scale.worker import QueueWorker, WorkerOptions
    from synth_agent.sim.population import Population
    from synth_agent.sim.server import SimEndpoint

    store = NetworkStore()
    pop = Population(1, seed=4)
    user = pop.user_ids[0]
    await PreferenceMemory(store, "t1").add_votes(pop.votes(user, 6))
    pool = open_pool(schema, max_size=6)
    await pool.open(wait=True)
    with SimEndpoint(seed=2) as sim:
        llm = FlakyLLM(LLMClient(EndpointConfig(base_url=sim.base_url, max_retries=0)), failures=1)
        try:
            async with AsyncPostgresSaver.from_conn_string(schema) as saver:
                worker = QueueWorker(schema, store, llm, saver, pool, policy=SynthesisPolicy(debounce=0),
                                     options=WorkerOptions(concurrency=1, backoff=2, max_attempts=3, name="w-test"))
                q = QueueScheduler(schema, worker.memories, SynthesisPolicy(debounce=0))
                await q.open()
                try:
                    assert await q.enqueue("t1", user)
                    async with worker.app.open_async():
                        await worker.app.run_worker_async(queues=[QUEUE], wait=False, install_signal_handlers=False)
                    job = await _rows(schema, "SELECT status, attempts, scheduled_at > now() FROM procrastinate_jobs")
                    assert job == [("todo", 1, True)]  # retry scheduled in the future: the backoff
                    runs = await _rows(schema, "SELECT status, attempt FROM synth_runs ORDER BY id")
                    assert runs == [("failed", 0)]
                    await asyncio.sleep(2.5)
                    async with worker.app.open_async():
                        await worker.app.run_worker_async(queues=[QUEUE], wait=False, install_signal_handlers=False)
                    assert await _rows(schema, "SELECT status FROM procrastinate_jobs") == [("succeeded",)]
                    runs = await _rows(schema, "SELECT status, attempt, version FROM synth_runs ORDER BY id")
                    assert runs[-1] == ("fitted", 1, 1)
                    assert (await worker.memories("t1").current_persona(user)).version == 1  # type: ignore[union-attr]
                finally:
                    await q.aclose()
        finally:
            await llm.aclose()
            await pool.close()


# ---------------------------------------------------------------------- the shared key ledger and the purge


def test_pg_ledger_is_shared_and_never_serves_a_stale_key(pg: LocalPostgres, tmp_path: Path) -> None:
    """Two ledgers (two replicas): a key made by one is the key the other uses; a key destroyed by
    one is gone for the other at once; re-creating an item after that gives a new key both see."""
    from synth_agent.scale.ledger import PgLedger

    a = PgLedger(pg.dsn, journal=tmp_path / "a.sqlite3")
    b = PgLedger(pg.dsn, journal=tmp_path / "b.sqlite3")
    try:
        assert a.secret() == b.secret() and len(a.secret()) == 32
        ka = a.ensure_keys(["item-1", "item-2"])
        assert b.ensure_keys(["item-2", "item-1"]) == ka  # the race's winner is used by everyone
        assert b.keys(["item-1", "item-3"]) == {"item-1": ka["item-1"]}
        assert b.destroy(["item-1"]) == 1
        assert a.keys(["item-1"]) == {}  # no cache in front of Postgres
        assert b.dirty_tables() and b.dirty_tables() == []  # handed over once, to the purge
        fresh = b.ensure_keys(["item-1"])["item-1"]
        assert fresh != ka["item-1"] and a.keys(["item-1"]) == {"item-1": fresh}
        # The journal stays local to each process.
        a.journal_open("t1", {"x": 1})
        assert b.journal_orphans() == [] and a.journal_orphans() == []
        a.journal_close("t1")
    finally:
        a.close()
        b.close()


def test_pg_ledger_keeps_the_namespace_index(pg: LocalPostgres, tmp_path: Path) -> None:
    """The scale-out ledger runs the same namespace-index checks as the local one (tests/test_store_index.py):
    per-user reads by id, rows gone with their keys; a second replica sees the index at once."""
    from synth_agent.scale.ledger import MEMBERS_TABLE, PgLedger

    try:
        from tests.test_store_index import check_namespace_index
    except ImportError:  # run from inside tests/
        from test_store_index import check_namespace_index  # type: ignore[no-redef]

    with psycopg.connect(pg.dsn, autocommit=True) as conn:  # a fresh index (this module's server is shared)
        conn.execute(f"DROP TABLE IF EXISTS {MEMBERS_TABLE}")
        conn.execute("DELETE FROM synth_store_meta WHERE k LIKE 'members:%'")
    a = PgLedger(pg.dsn, journal=tmp_path / "a.sqlite3")
    b = PgLedger(pg.dsn, journal=tmp_path / "b.sqlite3")
    try:
        check_namespace_index(tmp_path, a)  # the store closes its ledger
        a = PgLedger(pg.dsn, journal=tmp_path / "a2.sqlite3")
        assert not b.members_complete("other.v2") and a.members_complete("synth_agent_items.v2")
        assert b.members_complete("synth_agent_items.v2")
        a.ensure_keys(["i1", "i2"], members={"i1": ["tok"], "i2": ["tok"]})
        assert sorted(b.members("tok", 10)) == ["i1", "i2"] and b.members("tok", 1) in (["i1"], ["i2"])
        assert b.ensure_keys(["i3"], members={"i3": ["tok"]}) and len(a.members("tok", 10)) == 3
        assert b.add_members([("tok", "no-such-key")]) == 0  # backfill only indexes live keys
        b.destroy(["i1", "i3"])
        assert a.members("tok", 10) == ["i2"]
    finally:
        a.close()
        b.close()


def _files_with(root: Path, needle: bytes) -> list[str]:
    out = []
    for p in root.rglob("*"):
        try:
            if p.is_file() and needle in p.read_bytes():
                out.append(str(p.relative_to(root)))
        except FileNotFoundError:
            pass
    return out


async def test_purge_removes_deleted_rows_from_table_files_and_wal(schema: str, pg: LocalPostgres) -> None:
    """A deleted row's bytes are in the table file and the WAL until the purge; after it, nowhere in
    PGDATA. (Control first: the scan finds the row before the purge.) Plain VACUUM is not enough."""
    from synth_agent.scale.erasure import purge

    marker = b"PURGE-MARKER-8c1f"
    async with await psycopg.AsyncConnection.connect(schema, autocommit=True) as conn:
        await conn.execute("INSERT INTO synth_runs (tenant_id, user_id, worker, started_at) "
                           "SELECT 't', 'other-' || g, 'w', 0 FROM generate_series(1, 200) g")
        await conn.execute("INSERT INTO synth_runs (tenant_id, user_id, worker, started_at) VALUES ('t', %s, 'w', 0)",
                           (marker.decode(),))
        await conn.execute("CHECKPOINT")
        assert any(f.startswith("base/") for f in _files_with(pg.data_dir, marker))  # control
        await conn.execute("DELETE FROM synth_runs WHERE user_id = %s", (marker.decode(),))
        await conn.execute("VACUUM synth_runs")
        await conn.execute("CHECKPOINT")
        assert _files_with(pg.data_dir, marker), "plain VACUUM + CHECKPOINT should leave the bytes (else drop FULL)"
    pool = open_pool(schema)
    await pool.open()
    try:
        report = await purge(pool, ["synth_runs", "no_such_table"])
    finally:
        await pool.close()
    assert report["tables"] == ["synth_runs"]
    assert _files_with(pg.data_dir, marker) == []
    async with await psycopg.AsyncConnection.connect(schema, autocommit=True) as conn:
        cur = await conn.execute("SELECT count(*) FROM synth_runs WHERE user_id LIKE 'other-%'")
        assert (await cur.fetchone())[0] == 200  # other users' rows are untouched


async def test_private_columns_are_never_sampled_by_analyze(schema: str) -> None:
    from synth_agent.scale.queue import PRIVATE_COLUMNS

    async with await psycopg.AsyncConnection.connect(schema, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT c.relname, a.attname, a.attstattarget FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
            "WHERE c.relname = ANY(%s) AND a.attnum > 0 AND NOT a.attisdropped", (list(PRIVATE_COLUMNS),))
        targets = {(t, c): s for t, c, s in await cur.fetchall()}
    for table, columns in PRIVATE_COLUMNS.items():
        for column in columns:
            assert targets[(table, column)] == 0, (table, column)


async def test_a_purge_that_cannot_lock_a_table_leaves_it_owed_and_the_next_purge_finishes_it(
        schema: str, pg: LocalPostgres) -> None:
    from synth_agent.scale.erasure import PENDING_TABLE, purge

    marker = "OWED-MARKER-41d2"
    pool = open_pool(schema)
    await pool.open()
    try:
        async with await psycopg.AsyncConnection.connect(schema, autocommit=True) as conn:
            await conn.execute("INSERT INTO synth_runs (tenant_id, user_id, worker, started_at) VALUES ('t', %s, 'w', 0)",
                               (marker,))
            await conn.execute("DELETE FROM synth_runs WHERE user_id = %s", (marker,))
        async with await psycopg.AsyncConnection.connect(schema) as holder:  # a long reader holds a lock
            await holder.execute("LOCK TABLE synth_runs IN ACCESS SHARE MODE")
            with pytest.raises(TimeoutError):
                await purge(pool, ["synth_runs"], lock_attempts=2)
            await holder.rollback()
        async with await psycopg.AsyncConnection.connect(schema, autocommit=True) as conn:
            cur = await conn.execute(f"SELECT relname FROM {PENDING_TABLE}")
            assert [r[0] for r in await cur.fetchall()] == ["synth_runs"]
        report = await purge(pool, [])  # e.g. the next user's forget
        assert "synth_runs" in report["tables"]
        assert _files_with(pg.data_dir, marker.encode()) == []
        async with await psycopg.AsyncConnection.connect(schema, autocommit=True) as conn:
            cur = await conn.execute(f"SELECT count(*) FROM {PENDING_TABLE}")
            assert (await cur.fetchone())[0] == 0
    finally:
        await pool.close()


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="the privilege drop happens only as root")
def test_unreachable_binaries_say_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    """As root PostgreSQL runs as ``nobody``; binaries under a mode-700 directory (a clone in
    ``mktemp -d``) used to fail with a bare PermissionError from exec."""
    tmp_path = Path(tempfile.mkdtemp(prefix="synth-pg-"))  # pytest's own tmp root is mode 700
    locked = tmp_path / "locked"
    (locked / "bin").mkdir(parents=True)
    for name in ("initdb", "postgres"):
        (locked / "bin" / name).write_text("#!/bin/sh\n")
        (locked / "bin" / name).chmod(0o755)
    locked.chmod(0o700)
    tmp_path.chmod(0o755)
    monkeypatch.setenv("SYNTH_AGENT_PG_BIN", str(locked / "bin"))
    server = LocalPostgres(tmp_path / "data")
    with pytest.raises(RuntimeError, match=rf"cannot enter {locked}.*chmod o\+x"):
        server.initdb()
    assert not (tmp_path / "data" / "PG_VERSION").exists()
    subprocess.run(["rm", "-rf", str(tmp_path)], check=False)
