"""Scale-out forget: how long ``DELETE /v1/users/{u}`` takes, and how much it stalls other users.

One :class:`~synth_agent.scale.cluster.LocalCluster` (a real PostgreSQL, ``chroma run``, the
simulator, 2 ``serve --queue`` proxies, 2 ``worker --queue`` workers). ``--users`` users are
seeded with 6 votes each (one fit each). Then, while ``--clients`` threads keep reading other
users' personas and posting their votes through the second proxy (votes enqueue jobs and start
refits, so the queue and the checkpointer are busy), ``--forgets`` users are forgotten through
the first proxy, one every ``--gap`` seconds.

Printed: forget latency (p50, max), and the other users' request latency (p50, p99, max) for
requests that overlapped a forget vs. those that did not: the stall a forget causes.

Runs against any checkout that has ``synth_agent.scale.cluster`` (for a before/after, run it with
the other checkout's interpreter and cwd):

    python bench/forget_stall.py [--users 60] [--forgets 8] [--clients 4] [--gap 1.5]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import threading
import time
from typing import Any
from urllib.parse import quote

import httpx

from synth_agent.scale.cluster import LocalCluster
from synth_agent.sim.population import Population, vote_to_json

ENV = {
    "SYNTH_AGENT_FIRST_FIT": "5", "SYNTH_AGENT_REFIT_GROWTH": "2", "SYNTH_AGENT_REFIT_EVERY": "0",
    "SYNTH_AGENT_DEBOUNCE": "0.3", "SYNTH_AGENT_FIT_TRIALS": "2", "SYNTH_AGENT_FIT_DEMO_CANDIDATES": "2",
}


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def measure_purge(dsn: str, rounds: int = 3) -> list[dict[str, Any]]:
    """The purge step alone (rewrite the tables a forget touches, switch WAL, checkpoint), if this
    checkout has one."""
    try:
        from synth_agent.scale.erasure import purge
        from synth_agent.scale.ledger import PARTITIONS
    except ImportError:
        return []
    import asyncio

    from psycopg_pool import AsyncConnectionPool

    tables = ["procrastinate_jobs", "checkpoints", "checkpoint_blobs", "checkpoint_writes", "synth_runs",
              "synth_persona_versions", *(f"synth_store_keys_p{i}" for i in range(0, PARTITIONS, PARTITIONS // 8))]

    async def go() -> list[dict[str, Any]]:
        async with AsyncConnectionPool(dsn, min_size=1, max_size=1, kwargs={"autocommit": True}) as pool:
            return [dict(await purge(pool, tables)) for _ in range(rounds)]

    # Probes: what other requests do to these tables (a key lookup, the queue's job fetch, a checkpoint
    # read), each in a loop on its own connection while the purges run: their latency is the lock stall.
    import psycopg

    probes = {
        "key lookup": "SELECT key FROM synth_store_keys WHERE kid = ANY(%s)",
        "queue scan": "SELECT count(*) FROM procrastinate_jobs WHERE status = 'todo' AND cardinality(%s::text[]) > 0",
        "checkpoint read": "SELECT checkpoint_id FROM checkpoints WHERE thread_id = ANY(%s) LIMIT 1",
    }
    stop = threading.Event()
    lat: dict[str, list[float]] = {k: [] for k in probes}

    def probe(name: str, sql: str) -> None:
        rng = random.Random(name)
        with psycopg.connect(dsn, autocommit=True) as conn:
            while not stop.is_set():
                arg = [f"probe-{rng.random()}" for _ in range(8)]
                t0 = time.perf_counter()
                conn.execute(sql, (arg,)).fetchall()
                lat[name].append((time.perf_counter() - t0) * 1000)
                time.sleep(0.002)

    threads = [threading.Thread(target=probe, args=kv, daemon=True) for kv in probes.items()]
    for t in threads:
        t.start()
    time.sleep(1.0)
    quiet = {k: len(v) for k, v in lat.items()}
    out = asyncio.run(go())
    stop.set()
    for t in threads:
        t.join()
    for name, xs in lat.items():
        before, during = xs[: quiet[name]], xs[quiet[name]:]
        print(f"  probe {name:>15}: without purge p50 {pct(before, 50):5.1f} ms max {max(before):6.1f} ms | "
              f"during purges p50 {pct(during, 50):5.1f} ms p99 {pct(during, 99):6.1f} ms max {max(during):6.1f} ms")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=60)
    ap.add_argument("--forgets", type=int, default=8)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--gap", type=float, default=1.5)
    args = ap.parse_args()

    pop = Population(args.users, seed=23)
    users = pop.user_ids[: args.users]
    victims, others = users[: args.forgets], users[args.forgets:]
    votes = {u: [vote_to_json(v) for v in pop.votes(u, 40)] for u in users}
    with LocalCluster(proxies=2, workers=2, sim_latency_ms=50, env=ENV) as c, httpx.Client(timeout=120) as http:
        p0, p1 = c.proxy_procs[0].url, c.proxy_procs[1].url
        for u in users:
            http.post(p0 + "/v1/votes", json={"votes": votes[u][:6]}).raise_for_status()
        deadline = time.monotonic() + 300
        while c.query_one("SELECT count(DISTINCT user_id) FROM synth_runs WHERE status = 'fitted'", default=0) < len(users):
            if time.monotonic() > deadline:
                raise SystemExit("seeding fits did not finish in 300 s")
            time.sleep(0.5)
        sizes = c.query("SELECT relname, pg_total_relation_size(oid) FROM pg_class WHERE relname IN "
                        "('procrastinate_jobs', 'checkpoints', 'checkpoint_blobs', 'checkpoint_writes', 'synth_runs', "
                        "'synth_store_keys') OR relname LIKE 'synth_store_keys_p%%' ORDER BY 1")

        stop = threading.Event()
        samples: list[tuple[float, float, str, int]] = []
        lock = threading.Lock()
        next_vote = {u: 6 for u in others}

        def client(seed: int) -> None:
            rng = random.Random(seed)
            with httpx.Client(timeout=120) as h:
                while not stop.is_set():
                    u = rng.choice(others)
                    t0 = time.perf_counter()
                    if rng.random() < 0.5:
                        kind, r = "read", h.get(f"{p1}/v1/users/{quote(u, safe='')}/persona")
                    else:
                        with lock:
                            k = next_vote[u] = min(next_vote[u] + 1, 39)
                        kind, r = "vote", h.post(p1 + "/v1/votes", json=votes[u][k])
                    t1 = time.perf_counter()
                    with lock:
                        samples.append((t0, t1, kind, r.status_code))

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.clients)]
        for t in threads:
            t.start()
        time.sleep(5.0)  # load without forgets first
        forgets: list[tuple[float, float]] = []
        for u in victims:
            t0 = time.perf_counter()
            r = http.delete(f"{p0}/v1/users/{quote(u, safe='')}")
            forgets.append((t0, time.perf_counter()))
            assert r.status_code == 200, r.text
            time.sleep(args.gap)
        time.sleep(2.0)
        stop.set()
        for t in threads:
            t.join()
        print("purge alone, with probes on the tables it rewrites:")
        purge_alone = measure_purge(c.dsn)

    def overlaps(s: tuple[float, float, str, int]) -> bool:
        return any(s[0] < b and s[1] > a for a, b in forgets)

    errors = [s for s in samples if s[3] >= 400]
    print(f"load average: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    print("table sizes (bytes): " + ", ".join(f"{n}={b}" for n, b in sizes if not n.startswith("synth_store_keys_p"))
          + (f", key partitions={sum(b for n, b in sizes if n.startswith('synth_store_keys_p'))}" if sizes else ""))
    lat = [b - a for a, b in forgets]
    print(f"forget latency: p50 {statistics.median(lat) * 1000:.0f} ms, max {max(lat) * 1000:.0f} ms "
          f"({len(lat)} forgets)")
    for kind in ("read", "vote"):
        for label, pick in (("during a forget", True), ("otherwise", False)):
            xs = [(s[1] - s[0]) * 1000 for s in samples if s[2] == kind and overlaps(s) == pick]
            print(f"other users' {kind}s {label:>15}: n={len(xs):4d}  p50 {pct(xs, 50):7.1f} ms  "
                  f"p99 {pct(xs, 99):7.1f} ms  max {max(xs) if xs else float('nan'):7.1f} ms")
    print(f"errors: {len(errors)}")
    if purge_alone:
        print("purge alone (6 tables + 8 key partitions, WAL switch, checkpoint), after the run: "
              + ", ".join(f"{r['seconds'] * 1000:.0f} ms" for r in purge_alone))


if __name__ == "__main__":
    main()
