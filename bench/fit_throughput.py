"""Scale-out throughput: fits completed per minute with 1, 2 and 4 ``synth-agent worker --queue``
processes, and queue latency from the threshold vote to the fit starting (p50/p99).

One :class:`~synth_agent.scale.cluster.LocalCluster` (a real PostgreSQL, ``chroma run``, the
simulator at ``--latency-ms`` per request, one ``synth-agent serve --queue`` proxy) is started
once; workers are added between rounds (1 → 2 → 4 by default). Each round:

* **burst**: ``--users`` new users each post ``first_fit`` votes at once through the proxy, so
  each crosses the threshold and enqueues one job. Throughput = fits / (last fit finished −
  first vote sent). Every figure comes from the ``synth_runs`` records the workers write.
* **paced**: ``--paced`` more users cross the threshold one at a time, ``--gap`` seconds apart
  (a load the pool keeps up with), so the latency is the queue's own (enqueue → a worker
  starts the fit), not time spent waiting behind a burst. Burst latencies are printed too.

Debounce is 0 here (the default 2 s would be added to every latency). One machine with 2
cores runs everything (Postgres, Chroma, proxy, workers, simulator), so the ratio flattens
where CPU, not the simulated LLM latency, becomes the limit.

    python bench/fit_throughput.py [--workers 1,2,4] [--users 24] [--paced 8] [--latency-ms 50]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import statistics
import time
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from synth_agent.scale.cluster import LocalCluster
from synth_agent.sim.population import Population, vote_to_json


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))
    return xs[k]


def post_user(client: httpx.Client, url: str, votes: list[dict[str, Any]]) -> None:
    r = client.post(url + "/v1/votes", json={"votes": votes})
    r.raise_for_status()


def wait_fitted(c: LocalCluster, users: list[str], timeout: float) -> list[tuple[Any, ...]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = c.query("SELECT user_id, queued_at, started_at, finished_at, worker FROM synth_runs "
                       "WHERE user_id = ANY(%s) AND status = 'fitted'", (users,))
        if len(rows) >= len(users):
            return rows
        time.sleep(0.2)
    raise TimeoutError(f"only {len(rows)} of {len(users)} fits finished in {timeout:.0f}s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", default="1,2,4", help="worker counts, increasing (default 1,2,4)")
    ap.add_argument("--users", type=int, default=24, help="users per burst round (one fit each)")
    ap.add_argument("--paced", type=int, default=8, help="users per paced round (latency)")
    ap.add_argument("--gap", type=float, default=1.5, help="seconds between paced users")
    ap.add_argument("--latency-ms", type=float, default=50.0, help="simulator latency per request")
    ap.add_argument("--concurrency", type=int, default=1, help="fits at once per worker process")
    ap.add_argument("--trials", type=int, default=None, help="FitConfig.n_trials (default: the engine's)")
    ap.add_argument("--timeout", type=float, default=900.0)
    args = ap.parse_args()
    counts = [int(x) for x in args.workers.split(",")]
    assert counts == sorted(counts), "--workers must increase (workers are added between rounds)"
    env = {"SYNTH_AGENT_DEBOUNCE": "0", "SYNTH_AGENT_FIRST_FIT": "5"}
    if args.trials:
        env["SYNTH_AGENT_FIT_TRIALS"] = str(args.trials)
    rounds = len(counts)
    pop = Population(rounds * (args.users + args.paced), seed=7)
    console = Console()
    results = []
    t_start = time.monotonic()
    with LocalCluster(proxies=1, workers=counts[0], sim_latency_ms=args.latency_ms,
                      worker_concurrency=args.concurrency, env=env) as c, httpx.Client(timeout=120) as client:
        console.print(f"cluster up in {time.monotonic() - t_start:.0f}s: Postgres {c.dsn}, chroma :{c.chroma.port}, "
                      f"simulator {c.sim.base_url} at {args.latency_ms:g} ms")
        url = c.proxy_procs[0].url
        ids = pop.user_ids
        for r, n in enumerate(counts):
            while len(c.worker_procs) < n:
                c.add_worker()
            c.wait_workers(n)
            block = ids[r * (args.users + args.paced):(r + 1) * (args.users + args.paced)]
            burst, paced = block[:args.users], block[args.users:]
            payload = {u: [vote_to_json(v) for v in pop.votes(u, 5)] for u in block}
            t0 = time.time()
            with cf.ThreadPoolExecutor(8) as ex:
                list(ex.map(lambda u, p=payload: post_user(client, url, p[u]), burst))
            rows = wait_fitted(c, burst, args.timeout)
            span = max(r_[3] for r_ in rows) - t0
            burst_lat = [r_[2] - r_[1] for r_ in rows]
            workers_used = len({r_[4] for r_ in rows})
            for u in paced:
                post_user(client, url, payload[u])
                time.sleep(args.gap)
            prow = wait_fitted(c, paced, args.timeout)
            paced_lat = [r_[2] - r_[1] for r_ in prow]
            fit_s = [r_[3] - r_[2] for r_ in rows]
            results.append({
                "workers": n, "fits": len(rows), "span": span, "per_min": 60 * len(rows) / span,
                "fit_median": statistics.median(fit_s), "burst_p50": pct(burst_lat, 50), "burst_p99": pct(burst_lat, 99),
                "paced_p50": pct(paced_lat, 50), "paced_p99": pct(paced_lat, 99), "used": workers_used,
            })
            console.print(f"round {r + 1}: {n} worker(s): {len(rows)} fits in {span:.1f}s")
    base = results[0]["per_min"]
    t = Table(title=f"fit throughput: simulator at {args.latency_ms:g} ms, {args.concurrency} fit(s) per worker, "
                    f"{args.users} users per burst, {args.paced} paced users {args.gap:g}s apart (2 cores, all local)")
    for col in ("workers", "fits/min", "vs 1", "median fit s", "burst wait p50/p99 s", "paced latency p50/p99 s",
                "workers that fitted"):
        t.add_column(col, justify="right")
    for res in results:
        t.add_row(str(res["workers"]), f"{res['per_min']:.1f}", f"{res['per_min'] / base:.2f}x",
                  f"{res['fit_median']:.2f}", f"{res['burst_p50']:.2f} / {res['burst_p99']:.2f}",
                  f"{res['paced_p50']:.3f} / {res['paced_p99']:.3f}", str(res["used"]))
    console.print(t)


if __name__ == "__main__":
    main()
