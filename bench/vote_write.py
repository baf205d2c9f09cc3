"""Vote write benchmark: ``synth-agent serve`` under 200 concurrent writers, with /healthz sampled throughout.

Starts the offline simulator (upstream) and ``synth-agent serve`` (embedded store, API key auth)
as separate processes in a temporary home, warms the server up with one vote, then lets
``--writers`` clients each post ``--votes`` single-vote ``POST /v1/votes`` requests for
``--users`` users of one tenant, while a sampler calls ``GET /healthz`` back to back. Prints
votes/s acknowledged, write latency, /healthz latency and the drain (until every acknowledged vote is
stored and searchable: the rate that counts), then stops the server and counts what was stored
(with the repository's own code, so any version can be measured).

    .venv/bin/python bench/vote_write.py                                  # this checkout
    .venv/bin/python bench/vote_write.py --repo /work/baseline            # another checkout, same load
    .venv/bin/python bench/vote_write.py --synthesis off                  # fits by a separate worker
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(HERE))

from synth_agent.sim.server import SimProcess  # noqa: E402

KEY = "sk-bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


def start_server(repo: Path, python: str, home: Path, upstream: str, synthesis: str) -> tuple[subprocess.Popen[bytes], str, Path]:
    port = free_port()
    log = home.parent / "serve.log"
    env = {**os.environ, "SYNTH_AGENT_API_KEYS": f"bench:{KEY}", "OPENAI_BASE_URL": upstream, "OPENAI_API_KEY": "sim",
           "ANONYMIZED_TELEMETRY": "False", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "SYNTH_AGENT_KEY_RATE_LIMIT": "100000", "SYNTH_AGENT_KEY_BURST": "100000",
           "PYTHONPATH": str(repo)}
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [python, "-m", "synth_agent.cli", "--home", str(home), "serve", "--port", str(port), "--synthesis", synthesis,
             "--log-level", "warning"],
            cwd=home.parent, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return proc, url, log
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    os.killpg(proc.pid, signal.SIGKILL)
    raise SystemExit("serve did not become healthy within 300 s")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # anything it left behind (its own process group)
    except ProcessLookupError:
        pass


def cpu_seconds(root: int) -> dict[str, float]:
    """User+system CPU seconds of ``root`` and of each of its descendants, by command name."""
    tick = os.sysconf("SC_CLK_TCK")
    procs: dict[int, tuple[int, str, float]] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            raw = Path(f"/proc/{pid}/stat").read_bytes()
        except OSError:
            continue
        name = raw[raw.index(b"(") + 1 : raw.rindex(b")")].decode(errors="replace")
        fields = raw[raw.rindex(b")") + 2 :].split()
        procs[int(pid)] = (int(fields[1]), name, (int(fields[11]) + int(fields[12])) / tick)
    out: dict[str, float] = {}
    todo = [root]
    while todo:
        pid = todo.pop()
        if pid in procs:
            _, name, secs = procs[pid]
            out[f"{name}[{pid}]"] = secs
            todo += [p for p, (ppid, _, _) in procs.items() if ppid == pid]
    return out


def loop_cpu_seconds(pid: int) -> float:
    """User+system CPU seconds of ``pid``'s main thread: the server's event loop (uvicorn runs it there)."""
    try:
        raw = Path(f"/proc/{pid}/task/{pid}/stat").read_bytes()
    except OSError:
        return 0.0
    fields = raw[raw.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def vote(user: str, w: int, i: int) -> dict[str, object]:
    return {"id": f"w{w}-{i}", "user_id": user,
            "context": [{"role": "user", "content": f"Writer {w} asks question {i}: how do I plan a trip to city {i}?"}],
            "chosen": f"A short, direct plan for trip {i}.", "rejected": f"A long, rambling answer about trip {i}."}


async def load(
    url: str, writers: int, per_writer: int, users: int, server_pid: int, rate: float | None = None
) -> dict[str, object]:
    """The writers and the /healthz sampler (aiohttp: a light client, so the server gets the CPU).

    Closed loop by default (each writer sends its next vote when the last one is answered, so
    latency is about writers / throughput); with ``rate`` the votes are sent on a schedule of
    ``rate`` votes/s in all (open loop), and latency is what one vote waits at that load.
    """
    import aiohttp

    headers = {"Authorization": f"Bearer {KEY}"}
    lat: list[float] = []
    errors: list[str] = []
    health: list[float] = []
    health_bad = 0
    done = asyncio.Event()
    timeout = aiohttp.ClientTimeout(total=600)
    conn = aiohttp.TCPConnector(limit=writers + 4)
    async with aiohttp.ClientSession(base_url=url, headers=headers, timeout=timeout, connector=conn) as client:
        async with client.post("/v1/votes", json=vote("warmup@bench", -1, 0)) as r:  # loads the embedding model
            if r.status != 200:
                raise SystemExit(f"warm-up vote failed: {r.status} {await r.text()}")

        # Bodies encoded before the clock starts: the load generator shares the machine's cores with the
        # server, and its per-request CPU is not what is measured.
        bodies = [[json.dumps(vote(f"user{w % users:02d}@bench", w, i)).encode() for i in range(per_writer)]
                  for w in range(writers)]
        post_headers = {"Content-Type": "application/json"}

        async def writer(w: int) -> None:
            for i in range(per_writer):
                if rate:
                    await asyncio.sleep(max(0.0, t0 + (i * writers + w) / rate - time.perf_counter()))
                t = time.perf_counter()
                try:
                    async with client.post("/v1/votes", data=bodies[w][i], headers=post_headers) as resp:
                        body = await resp.read()
                        ok = resp.status == 200
                        if not ok:
                            errors.append(f"{resp.status} {body[:120]!r}")
                except aiohttp.ClientError as exc:
                    ok = False
                    errors.append(type(exc).__name__)
                if ok:
                    lat.append((time.perf_counter() - t) * 1000)

        async def sampler() -> None:
            nonlocal health_bad
            async with aiohttp.ClientSession(base_url=url, timeout=timeout) as hc:
                while not done.is_set():
                    t = time.perf_counter()
                    async with hc.get("/healthz") as resp:
                        await resp.read()
                        health_bad += resp.status != 200
                    health.append((time.perf_counter() - t) * 1000)
                    await asyncio.sleep(0.01)

        sample = asyncio.create_task(sampler())
        cpu0, self0 = cpu_seconds(server_pid), time.process_time()
        loop0 = loop_cpu_seconds(server_pid)
        t0 = time.perf_counter() + (0.5 if rate else 0.0)
        await asyncio.gather(*(writer(w) for w in range(writers)))
        wall = time.perf_counter() - t0
        loop_cpu = loop_cpu_seconds(server_pid) - loop0  # the event loop's CPU while votes were acknowledged
        client_cpu = time.process_time() - self0  # this process (writers and sampler) while votes were acknowledged
        # Drain: until every acknowledged vote is stored and searchable. A server with an intake journal
        # reports its backlog in /healthz (``pending_votes``); one without acknowledges only stored votes.
        drain_t = time.perf_counter()
        async with aiohttp.ClientSession(base_url=url, timeout=timeout) as poll:
            while True:
                try:
                    async with poll.get("/healthz") as resp:
                        pending = (await resp.json()).get("pending_votes")
                except aiohttp.ClientError:  # a kept-alive connection the server closed: ask again
                    continue
                if not pending:
                    break
                await asyncio.sleep(0.02)
        drain = time.perf_counter() - drain_t
        cpu1 = cpu_seconds(server_pid)
        done.set()
        await sample
    server_cpu = sum(cpu1.get(k, 0.0) - cpu0.get(k, 0.0) for k in cpu1)
    split = {k.split("[")[0]: round(cpu1[k] - cpu0.get(k, 0.0), 2) for k in cpu1 if cpu1[k] - cpu0.get(k, 0.0) > 0.05}
    return {"server_cpu_split_s": split, "wall": wall, "drain": drain, "lat": lat, "errors": errors, "health": health,
            "health_bad": health_bad, "server_cpu": server_cpu, "client_cpu": client_cpu,
            "loop_cpu": loop_cpu}


COUNT = textwrap.dedent(
    """
    import asyncio, json, sys
    from synth_agent.config import Settings
    from synth_agent.services import open_memory
    mem = open_memory(Settings(home=sys.argv[1]), sys.argv[2])
    async def main():
        users = [u for u in await mem.list_users() if u != "warmup@bench"]
        out = {}
        for u in users:
            ids = [v.id for v in await mem.list_votes(u)]
            out[u] = [len(ids), len(set(ids)), ids]
        print(json.dumps(out))
    asyncio.run(main())
    close = getattr(mem.store, "close", None)
    if close: close()
    """
)


def count_stored(repo: Path, python: str, home: Path, tenant: str = "bench") -> dict[str, list]:  # type: ignore[type-arg]
    """``{user: [votes stored, distinct ids, ids]}``, read with the measured checkout's own code."""
    env = {**os.environ, "PYTHONPATH": str(repo), "ANONYMIZED_TELEMETRY": "False", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([python, "-c", COUNT, str(home), tenant], cwd=repo, env=env, capture_output=True, text=True,
                         timeout=600)
    if out.returncode != 0:
        raise SystemExit(f"counting failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def measure(repo: Path, python: str, synthesis: str, drive, *, seed: int = 0,  # type: ignore[no-untyped-def]
            sim_latency_ms: float = 0.0, tenant: str = "bench") -> tuple[object, dict[str, list]]:  # type: ignore[type-arg]
    """Simulator + ``serve`` of ``repo`` in a temporary home; ``drive(url, server_pid)``; then count what is stored."""
    tmp = Path(tempfile.mkdtemp(prefix="synth-bench-"))
    home = tmp / "home"
    home.mkdir()
    try:
        with SimProcess(seed=seed, latency_ms=sim_latency_ms) as sim:
            proc, url, _ = start_server(repo, python, home, sim.base_url, synthesis)
            try:
                result = drive(url, proc.pid)
            finally:
                stop_server(proc)
        return result, count_stored(repo, python, home, tenant)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(main: Coroutine[Any, Any, dict[str, object]]) -> dict[str, object]:
    """The load generator's event loop: uvloop when installed (as the server's), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", type=Path, default=HERE, help="checkout whose `synth-agent serve` is measured")
    ap.add_argument("--python", help="its interpreter (default: <repo>/.venv/bin/python)")
    ap.add_argument("--writers", type=int, default=200)
    ap.add_argument("--votes", type=int, default=5, help="votes per writer, one per request")
    ap.add_argument("--users", type=int, default=20)
    ap.add_argument("--synthesis", choices=["inline", "off"], default="inline")
    ap.add_argument("--rate", type=float, help="open loop: send the votes at this many per second in all")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: stop the server and simulator we started
    repo = args.repo.resolve()
    python = args.python or str(repo / ".venv" / "bin" / "python")
    res, stored = measure(repo, python, args.synthesis,
                          lambda url, pid: run(load(url, args.writers, args.votes, args.users, pid, args.rate)))
    lat, health = res["lat"], res["health"]
    total = args.writers * args.votes
    acked = len(lat)  # type: ignore[arg-type]
    kept = sum(n for n, _, _ in stored.values())
    unique = sum(u for _, u, _ in stored.values())
    figures = {
        "repo": str(repo), "synthesis": args.synthesis, "writers": args.writers, "votes": total,
        "offered_rate": args.rate or "closed loop",
        "acknowledged": acked, "errors": len(res["errors"]), "stored": kept, "stored_unique": unique,  # type: ignore[arg-type]
        "wall_s": round(res["wall"], 2),
        # acknowledged per second, and stored + searchable per second (the real throughput: until the drain ends)
        "ack_votes_per_s": round(acked / res["wall"], 1),  # type: ignore[operator]
        "drain_after_last_ack_s": round(res["drain"], 2),  # type: ignore[arg-type]
        "stored_votes_per_s": round(acked / (res["wall"] + res["drain"]), 1),  # type: ignore[operator]
        "write_p50_ms": round(statistics.median(lat), 1) if lat else None,  # type: ignore[arg-type]
        "write_p99_ms": round(pct(lat, 0.99), 1), "write_max_ms": round(max(lat), 1) if lat else None,  # type: ignore[arg-type,type-var]
        "healthz_samples": len(health), "healthz_p50_ms": round(statistics.median(health), 1),  # type: ignore[arg-type]
        "healthz_p99_ms": round(pct(health, 0.99), 1), "healthz_max_ms": round(max(health), 1),  # type: ignore[arg-type,type-var]
        "healthz_not_200": res["health_bad"],
        "server_cpu_ms_per_vote": round(res["server_cpu"] / max(acked, 1) * 1000, 2),  # type: ignore[operator]
        # the server's event-loop thread alone, during the writes (parsing, validation, journal hand-off, answers)
        "loop_cpu_ms_per_vote": round(res["loop_cpu"] / max(acked, 1) * 1000, 2),  # type: ignore[operator]
        # the load generator (writers and /healthz sampler) during the writes: it shares the cores
        "client_cpu_ms_per_vote": round(res["client_cpu"] / max(acked, 1) * 1000, 2),  # type: ignore[operator]
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "server_cpu_split_s": res["server_cpu_split_s"],
    }
    print(f"vote_write: {args.writers} writers x {args.votes} votes, {args.users} users, synthesis={args.synthesis}, "
          f"repo={repo}")
    for k, v in figures.items():
        if k not in ("repo",):
            print(f"  {k:18} {v}")
    if res["errors"]:
        print("  first errors:", res["errors"][:5])  # type: ignore[index]
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
