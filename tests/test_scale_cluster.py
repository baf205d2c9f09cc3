"""The scale-out topology with real processes: a Chroma server (``chroma run``), a PostgreSQL,
2 ``synth-agent serve --queue`` proxies and 2 ``synth-agent worker --queue`` workers
(:class:`synth_agent.scale.cluster.LocalCluster`), driven over HTTP like a user would.

The three must-hold cases of the scale-out issue: many users' votes through both proxies at
once (fits per user, single-flight from the run records, versions without gaps or duplicates,
personas readable on either proxy); a worker SIGKILLed mid-fit (the other worker resumes the
fit from its checkpoint); forget while a job is queued (it never runs, nothing of the user is
left on the Chroma server or in Postgres).
"""

from __future__ import annotations

import concurrent.futures as cf
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from graphs.synthesis import synthesis_thread_id
from synth_agent.scale.cluster import LocalCluster
from synth_agent.scale.queue import PRIVATE_COLUMNS, user_key
from synth_agent.sim.population import Population, vote_to_json

pytestmark = pytest.mark.slow

N_USERS = 20
PHASES = (5, 10)  # votes per user after each phase: thresholds 5 and 10 (first_fit 5, growth 2) -> 2 fits each
ENV = {
    "SYNTH_AGENT_FIRST_FIT": "5", "SYNTH_AGENT_REFIT_GROWTH": "2", "SYNTH_AGENT_REFIT_EVERY": "0",
    "SYNTH_AGENT_DEBOUNCE": "0.3", "SYNTH_AGENT_FIT_TRIALS": "2", "SYNTH_AGENT_FIT_DEMO_CANDIDATES": "2",
}


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(proxies=2, workers=2, sim_latency_ms=50, env=ENV, heartbeat=1.0, stall_timeout=4.0) as c:
        yield c


@pytest.fixture(scope="module")
def population() -> Population:
    return Population(N_USERS + 4, seed=15)


def _u(user: str) -> str:
    return quote(user, safe="")


def _post_votes(cluster: LocalCluster, jobs: list[tuple[int, dict[str, Any]]]) -> None:
    """Each (proxy index, vote) as its own request, 16 at a time."""
    with httpx.Client(timeout=60) as client:
        def post(job: tuple[int, dict[str, Any]]) -> int:
            i, vote = job
            return client.post(cluster.proxy_procs[i].url + "/v1/votes", json=vote).status_code

        with cf.ThreadPoolExecutor(16) as pool:
            codes = list(pool.map(post, jobs))
    assert codes == [200] * len(jobs)


def _wait(predicate: Any, timeout: float, what: str, cluster: LocalCluster, interval: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    logs = "\n".join(f"--- {p.name}\n{p.tail(1500)}" for p in [*cluster.proxy_procs, *cluster.worker_procs])
    raise AssertionError(f"timed out waiting for {what}\n{logs}")


def _versions(cluster: LocalCluster, users: list[str]) -> dict[str, int]:
    rows = cluster.query("SELECT user_id, version FROM synth_persona_versions WHERE user_id = ANY(%s)", (users,))
    return dict(rows)  # type: ignore[arg-type]


def _queue_idle(cluster: LocalCluster, users: list[str]) -> bool:
    keys = [user_key("default", u) for u in users]
    return cluster.query_one("SELECT count(*) FROM procrastinate_jobs WHERE lock = ANY(%s) AND status IN "
                             "('todo', 'doing')", (keys,), default=1) == 0


def test_many_users_through_two_proxies_fit_once_per_threshold(cluster: LocalCluster, population: Population) -> None:
    users = population.user_ids[:N_USERS]
    votes = {u: [vote_to_json(v) for v in population.votes(u, PHASES[-1])] for u in users}
    done = 0
    for phase, upto in enumerate(PHASES, start=1):
        # Interleave users; alternate proxies per vote, so each user's votes arrive through both at once.
        batch = [(k % 2, votes[u][k]) for k in range(done, upto) for u in users]
        _post_votes(cluster, batch)
        done = upto
        _wait(lambda p=phase: all(v == p for v in _versions(cluster, users).values())
              and len(_versions(cluster, users)) == len(users) and _queue_idle(cluster, users),
              240, f"phase {phase}: every user at persona v{phase}", cluster)

    runs = cluster.query("SELECT user_id, started_at, finished_at, status, version, worker FROM synth_runs "
                         "WHERE user_id = ANY(%s) ORDER BY started_at", (users,))
    by_user: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
    for r in runs:
        by_user[r[0]].append(r)
    workers = {r[5] for r in runs}
    assert len(workers) == 2, f"both workers should have fitted someone: {workers}"
    for u in users:
        mine = by_user[u]
        fitted = [r for r in mine if r[3] == "fitted"]
        assert [r[4] for r in fitted] == list(range(1, len(PHASES) + 1)), (u, mine)
        assert all(r[2] is not None for r in mine), f"a run of {u} never finished: {mine}"
        # Never two at once for one user: each run ends before the next one starts.
        for a, b in zip(mine, mine[1:], strict=False):
            assert a[2] <= b[1], f"overlapping runs for {u}: {a} / {b}"
        # Versions strictly increasing, no gap or duplicate, the same through either proxy.
        seen = []
        for proxy in cluster.proxy_procs:
            hist = httpx.get(f"{proxy.url}/v1/users/{_u(u)}/persona/history", timeout=30).json()["data"]
            assert [h["version"] for h in hist] == list(range(1, len(PHASES) + 1))
            cur = httpx.get(f"{proxy.url}/v1/users/{_u(u)}/persona", timeout=30)
            assert cur.status_code == 200 and cur.json()["version"] == len(PHASES)
            seen.append(cur.json()["persona"])
            assert len(hist[-1]["vote_ids"]) == PHASES[-1]
        assert seen[0] == seen[1]


def _worker_of(cluster: LocalCluster, name: str) -> int:
    pid = int(name.rsplit(":", 1)[1])
    return next(i for i, w in enumerate(cluster.worker_procs) if w.popen.pid == pid)


def _slow_fit_past_bootstrap(cluster: LocalCluster, population: Population, user: str) -> tuple[Any, int]:
    """Slow the LLM (a fit takes seconds), make ``user`` cross the threshold, and return the run record
    (id, worker, job id) once its bootstrap node is checkpointed, with the index of its worker."""
    cluster.sim.configure(latency_ms=250)
    _post_votes(cluster, [(k % 2, vote_to_json(v)) for k, v in enumerate(population.votes(user, 5))])
    run = _wait(lambda: cluster.query(
        "SELECT id, worker, job_id FROM synth_runs WHERE user_id = %s AND 'bootstrap' = ANY(nodes) "
        "AND finished_at IS NULL", (user,)), 120, "the fit to finish its bootstrap step", cluster, 0.05)[0]
    # ... and its checkpoint is written (steps: -1 input, 0 start, 1 after load_votes, 2 after bootstrap).
    thread = synthesis_thread_id("default", user, "v1")
    _wait(lambda: (cluster.query_one("SELECT max((metadata->>'step')::int) FROM checkpoints WHERE thread_id = %s",
                                     (thread,)) or -1) >= 2, 60, "the bootstrap checkpoint", cluster, 0.02)
    return run, _worker_of(cluster, run[1])


def test_sigkill_mid_fit_is_resumed_by_the_other_worker(cluster: LocalCluster, population: Population) -> None:
    user = population.user_ids[N_USERS]
    try:
        run, victim = _slow_fit_past_bootstrap(cluster, population, user)
        cluster.kill_worker(victim)  # SIGKILL: no cleanup, no goodbye to the queue
        assert cluster.query_one("SELECT status FROM synth_runs WHERE id = %s", (run[0],)) == "running"
        cluster.sim.configure(latency_ms=50)
        done = _wait(lambda: cluster.query(
            "SELECT worker, resumed, nodes, job_id, attempt FROM synth_runs WHERE user_id = %s AND status = 'fitted'",
            (user,)), 120, "the other worker to finish the fit", cluster)
    finally:
        cluster.sim.configure(latency_ms=50)
    worker, resumed, nodes, job_id, attempt = done[0]
    assert worker != run[1]
    assert job_id == run[2] and attempt >= 1  # the same job, retried
    assert resumed is True
    assert "load_votes" not in nodes and "bootstrap" not in nodes, nodes  # finished steps not paid again
    assert nodes[-1] == "save"
    assert cluster.query_one("SELECT status FROM synth_runs WHERE id = %s", (run[0],)) == "lost"
    profile = httpx.get(f"{cluster.proxy_procs[0].url}/v1/users/{_u(user)}/persona", timeout=30).json()
    assert profile["version"] == 1
    # Bring the pool back to two workers for what follows.
    cluster.add_worker()
    cluster.wait_workers(2)


def test_sigterm_mid_fit_hands_the_job_back_at_once(cluster: LocalCluster, population: Population) -> None:
    """A graceful stop (deploys, scale-in) aborts the running fit and requeues it without waiting for
    the stall timeout; the next attempt resumes from the checkpoint."""
    import signal

    user = population.user_ids[N_USERS + 2]
    try:
        run, victim = _slow_fit_past_bootstrap(cluster, population, user)
        cluster.kill_worker(victim, signal.SIGTERM)
        assert cluster.worker_procs[victim].popen.returncode == 0, cluster.worker_procs[victim].tail()
        assert cluster.query_one("SELECT status FROM synth_runs WHERE id = %s", (run[0],)) == "aborted"
        cluster.sim.configure(latency_ms=50)
        done = _wait(lambda: cluster.query(
            "SELECT worker, resumed, nodes, job_id FROM synth_runs WHERE user_id = %s AND status = 'fitted'",
            (user,)), 120, "another worker to finish the fit", cluster)
    finally:
        cluster.sim.configure(latency_ms=50)
    worker, resumed, nodes, job_id = done[0]
    assert worker != run[1] and job_id == run[2] and resumed is True
    assert "bootstrap" not in nodes and nodes[-1] == "save", nodes
    cluster.add_worker()
    cluster.wait_workers(2)


def _postgres_mentions(cluster: LocalCluster, needle: str) -> list[str]:
    """Every (table.column) of the public schema whose values contain ``needle`` (text or bytes)."""
    cols = cluster.query("SELECT table_name, column_name, data_type FROM information_schema.columns "
                         "WHERE table_schema = 'public'")
    hits = []
    for table, column, dtype in cols:
        if dtype == "bytea":
            cond = f'position(convert_to(%s, \'UTF8\') in "{column}") > 0'
        else:
            cond = f'"{column}"::text LIKE \'%%\' || %s || \'%%\''
        n = cluster.query_one(f'SELECT count(*) FROM "{table}" WHERE {cond}', (needle,), default=0)
        if n:
            hits.append(f"{table}.{column}")
    return hits


def _chroma_mentions(cluster: LocalCluster, needle: str) -> int:
    import chromadb

    assert cluster.chroma is not None
    client = chromadb.HttpClient(host="127.0.0.1", port=cluster.chroma.port)
    hits = 0
    for col in client.list_collections():
        c = client.get_collection(col.name, embedding_function=None)
        got = c.get(include=["documents", "metadatas"])
        for i, doc in enumerate(got["documents"] or []):
            if needle in (doc or "") or needle in repr((got["metadatas"] or [{}])[i]) or needle in got["ids"][i]:
                hits += 1
    return hits


def _files_containing(root: Path, needles: list[bytes]) -> dict[bytes, list[str]]:
    """Every file under ``root`` (read as bytes, all of it) that contains each needle."""
    hits: dict[bytes, list[str]] = {n: [] for n in needles}
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.is_symlink():
            continue
        try:
            data = path.read_bytes()
        except FileNotFoundError:  # a WAL segment or temp file removed while we walk
            continue
        for n in needles:
            if n in data:
                hits[n].append(str(path.relative_to(root)))
    return hits


def _item_blobs(cluster: LocalCluster) -> dict[str, str]:
    """id -> sealed blob of every item record on the Chroma server."""
    import chromadb

    assert cluster.chroma is not None
    client = chromadb.HttpClient(host="127.0.0.1", port=cluster.chroma.port)
    out: dict[str, str] = {}
    for col in client.list_collections():
        if col.name.endswith(".v2"):
            got = client.get_collection(col.name, embedding_function=None).get(include=["metadatas"])
            out.update({i: str((m or {}).get("b", "")) for i, m in zip(got["ids"], got["metadatas"] or [], strict=True)})
    return out


def test_forget_with_a_queued_job_cancels_it_and_leaves_nothing(cluster: LocalCluster, population: Population) -> None:
    user = population.user_ids[N_USERS + 1]
    marker = "ZEBRA-" + str(int(time.time()))  # a string only this user's votes contain
    assert cluster.base is not None
    pgdata, chroma_dir = cluster.base / "pg" / "data", cluster.base / "chroma"
    # Postgres compresses large values (pglz): a compressed copy of the marker would be invisible to a
    # byte scan, not gone. Store this test's rows uncompressed so the scan sees every copy there is.
    for table, columns in PRIVATE_COLUMNS.items():
        for column in columns:
            cluster.execute(f'ALTER TABLE "{table}" ALTER COLUMN "{column}" SET STORAGE EXTERNAL')
    votes = [vote_to_json(v) for v in population.votes(user, 10)]
    for v in votes:
        v["chosen"] = f"{v['chosen']} {marker}"
    cluster.sim.configure(latency_ms=250)
    try:
        _post_votes(cluster, [(k % 2, v) for k, v in enumerate(votes[:5])])
        key = user_key("default", user)
        _wait(lambda: cluster.query_one("SELECT count(*) FROM procrastinate_jobs WHERE lock = %s AND status = 'doing'",
                                        (key,), default=0), 60, "the first fit to start", cluster, 0.05)
        # Votes during the run: one follow-up is queued however many arrive, through either proxy.
        _post_votes(cluster, [(k % 2, v) for k, v in enumerate(votes[5:])])
        queued = _wait(lambda: cluster.query("SELECT id FROM procrastinate_jobs WHERE lock = %s AND status = 'todo'",
                                             (key,)), 30, "the follow-up to be queued", cluster, 0.05)
        assert len(queued) == 1
        assert cluster.query_one("SELECT count(*) FROM procrastinate_jobs WHERE lock = %s AND status = 'doing'",
                                 (key,)) == 1
        _wait(lambda: _postgres_mentions(cluster, marker), 30, "the checkpoint to hold the user's votes", cluster)
        # The Chroma server only ever sees sealed blobs, opaque ids and keyed tokens (the ledger is in Postgres).
        assert _chroma_mentions(cluster, marker) == 0 and _chroma_mentions(cluster, user) == 0
        blobs_before = _item_blobs(cluster)
        assert blobs_before and all(b.startswith("s") for b in blobs_before.values())
        # Control: the byte scan finds what is there. The user's id is in PGDATA (job args, checkpoints,
        # WAL), and the user's sealed records are in the Chroma server's files.
        cluster.execute("CHECKPOINT")  # the rows reach the table files too, not only the WAL
        pg_before = _files_containing(pgdata, [user.encode(), marker.encode()])
        assert pg_before[user.encode()] and pg_before[marker.encode()], f"control: {pg_before}"
        assert any(f.startswith("base/") for f in pg_before[marker.encode()]), f"control: {pg_before}"
        print(f"before forget: user id in {pg_before[user.encode()][:5]}, marker in {pg_before[marker.encode()][:5]}")
        sealed_seen = _files_containing(chroma_dir, [b[1:61].encode() for b in blobs_before.values()])
        assert all(sealed_seen.values()), "control: every sealed record should be in the Chroma server's files"
        assert _files_containing(chroma_dir, [user.encode(), marker.encode()]) == {user.encode(): [],
                                                                                  marker.encode(): []}
        t0 = time.perf_counter()
        r = httpx.delete(f"{cluster.proxy_procs[1].url}/v1/users/{_u(user)}", timeout=120)
        print(f"forget took {time.perf_counter() - t0:.3f}s")
        assert r.status_code == 200, r.text
        assert r.json()["deleted"]["votes"] == 10
    finally:
        cluster.sim.configure(latency_ms=50)
    mine = {i: b for i, b in blobs_before.items() if i not in _item_blobs(cluster)}
    assert len(mine) >= 10  # the user's votes (and persona/namespace records) are gone from the API ...
    chunks = {i: b[1:61].encode() for i, b in mine.items()}
    in_chroma = _files_containing(chroma_dir, list(chunks.values()))
    # ... their ciphertext may stay in the Chroma server's write log, but no key opens it any more.
    assert cluster.query("SELECT kid FROM synth_store_keys WHERE kid = ANY(%s)", (list(mine),)) == []
    print(f"sealed records of the user still in Chroma's files after forget: {sum(bool(v) for v in in_chroma.values())}"
          f"/{len(chunks)} (ciphertext without a key)")
    # Every byte of both data directories: neither the marker nor the user id.
    for root in (chroma_dir, pgdata):
        left = _files_containing(root, [user.encode(), marker.encode()])
        assert left == {user.encode(): [], marker.encode(): []}, (root, left)
    # The queued job is gone and never runs; the running one was aborted and saved nothing.
    time.sleep(3.0)  # several queue polls and abort checks of both workers
    assert cluster.query("SELECT id FROM procrastinate_jobs WHERE id = %s", (queued[0][0],)) == []
    assert cluster.query("SELECT id FROM synth_runs WHERE user_id = %s", (user,)) == []
    for proxy in cluster.proxy_procs:
        assert httpx.get(f"{proxy.url}/v1/users/{_u(user)}/persona", timeout=30).status_code == 404
    assert _postgres_mentions(cluster, user) == []
    assert _postgres_mentions(cluster, marker) == []
    assert _chroma_mentions(cluster, marker) == 0
    assert _chroma_mentions(cluster, user) == 0
    # Other users are untouched.
    other = population.user_ids[0]
    assert httpx.get(f"{cluster.proxy_procs[1].url}/v1/users/{_u(other)}/persona", timeout=30).status_code == 200
