"""The proxy's throughput and tail at 64 connections: direct to the simulator vs through ``synth-agent serve``.

A compiled load generator (``wrk``) posts the same chat completion over and over, so the
client's own CPU stays out of the figures. Everything runs as a user would start it, each
in its own process: the simulator (``synth-agent sim-endpoint --latency-ms 0``) and the proxy
(``synth-agent serve`` with an embedded Chroma store under a fresh home, API keys on, the
per-key rate limit off, default logging). The bench user has a stored persona, so every
proxied request authenticates, reads the (cached) persona, injects it and forwards; the
direct requests carry the same persona system message, so the simulator does identical work
on both paths.

``--baseline DIR`` adds the proxy of another checkout (its ``DIR/.venv/bin/synth-agent``,
e.g. ``/work/baseline``) in the same run: the "before" figure. Targets are measured in
rounds, the order rotating between rounds, and each figure is the median over rounds.

wrk is a Debian/Ubuntu package: ``apt-get install -y wrk`` (macOS: ``brew install wrk``).

    .venv/bin/python bench/proxy_overhead.py [--duration 15] [--connections 64] [--rounds 3]
        [--baseline /work/baseline] [--latency-ms 0]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

KEY = "sk-bench"
USER = "bench-user@example.com"
PERSONA = "The user strongly prefers bullet lists and short, concise answers. The user dislikes emoji."
QUESTION = "How do I start learning Python?"
HERE = Path(__file__).resolve().parent.parent

# wrk's Lua hooks: the request, then one JSON line with what wrk measured (microseconds).
LUA = textwrap.dedent("""\
    wrk.method = "POST"
    wrk.body = os.getenv("BENCH_BODY")
    wrk.headers["Content-Type"] = "application/json"
    wrk.headers["Authorization"] = "Bearer " .. os.getenv("BENCH_KEY")
    function done(summary, latency, requests)
      local e = summary.errors
      io.write(string.format(
        'BENCH {"requests": %d, "duration_us": %d, "non2xx": %d, "connect": %d, "read": %d, "write": %d, '
        .. '"timeout": %d, "p50": %d, "p90": %d, "p99": %d, "max": %d}\\n',
        summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
        latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
    end
""")

SEED = textwrap.dedent("""\
    import asyncio, sys
    from synth_agent.config import Settings
    from synth_agent.models import PersonaProfile
    from synth_agent.services import open_memory
    memory = open_memory(Settings(), sys.argv[1])
    asyncio.run(memory.save_persona(PersonaProfile(user_id=sys.argv[2], persona=sys.argv[3])))
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_up(url: str, proc: subprocess.Popen[Any], what: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with code {proc.returncode} before it answered")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{what} did not come up within {timeout:.0f}s")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Target:
    name: str
    url: str
    body: str
    key: str
    proc: subprocess.Popen[Any] | None = None
    log: Path | None = None


def start_proxy(name: str, tree: Path, sim_url: str, workdir: Path, stream: bool) -> Target:
    """``synth-agent serve`` of ``tree`` with a fresh home holding the bench user's persona."""
    exe = tree / ".venv" / "bin" / "synth-agent"
    py = tree / ".venv" / "bin" / "python"
    if not exe.exists():
        raise SystemExit(f"{exe} not found: run `make venv` in {tree}")
    home = workdir / name
    home.mkdir()
    env = {**os.environ, "SYNTH_AGENT_HOME": str(home), "OPENAI_BASE_URL": sim_url, "OPENAI_API_KEY": "sim",
           "SYNTH_AGENT_API_KEYS": f"bench:{KEY}"}
    env.pop("PYTHONPATH", None)
    subprocess.run([str(py), "-c", SEED, "bench", USER, PERSONA], cwd=home, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    port = free_port()
    log = workdir / f"{name}.log"
    proc = subprocess.Popen(
        [str(exe), "serve", "--port", str(port), "--rate-limit", "0"],
        cwd=home, env=env, stdin=subprocess.DEVNULL, stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/v1"
    wait_up(f"http://127.0.0.1:{port}/healthz", proc, f"the {name} proxy")
    body = json.dumps({"model": "sim", "user": USER, "stream": stream,
                       "messages": [{"role": "user", "content": QUESTION}]})
    # one request by hand: it must succeed and carry the persona (else the bench measures something else)
    r = httpx.post(url + "/chat/completions", content=body, timeout=60,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    if r.status_code != 200 or r.headers.get("x-synth-persona-version") != "1":
        raise SystemExit(f"the {name} proxy answered {r.status_code} (persona version "
                         f"{r.headers.get('x-synth-persona-version')!r}): {r.text[:300]}")
    return Target(name, url + "/chat/completions", body, KEY, proc, log)


def run_wrk(t: Target, args: argparse.Namespace, lua: Path, sim_pid: int) -> dict[str, float]:
    """One wrk run against ``t``; also the CPU the proxy and the simulator spent per request."""
    env = {**os.environ, "BENCH_BODY": t.body, "BENCH_KEY": t.key}
    sim0 = cpu_seconds(sim_pid)
    proxy0 = cpu_seconds(t.proc.pid) if t.proc is not None else 0.0
    cmd = ["wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{args.duration}s", "--timeout", "10s",
           "-s", str(lua), t.url]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    sim_cpu = cpu_seconds(sim_pid) - sim0
    proxy_cpu = cpu_seconds(t.proc.pid) - proxy0 if t.proc is not None else 0.0
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("BENCH ")), None)
    if line is None:
        raise SystemExit(f"wrk printed no summary:\n{res.stdout}\n{res.stderr}")
    raw = json.loads(line[len("BENCH "):])
    errors = raw["non2xx"] + raw["connect"] + raw["read"] + raw["write"] + raw["timeout"]
    return {
        "rps": raw["requests"] / (raw["duration_us"] / 1e6),
        "p50": raw["p50"] / 1000, "p90": raw["p90"] / 1000, "p99": raw["p99"] / 1000, "max": raw["max"] / 1000,
        "errors": errors, "requests": raw["requests"],
        "proxy_cpu_ms": 1000 * proxy_cpu / max(1, raw["requests"]),
        "sim_cpu_ms": 1000 * sim_cpu / max(1, raw["requests"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=15, help="seconds per wrk run")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="wrk threads")
    ap.add_argument("--rounds", type=int, default=3, help="runs per target (order rotates); medians reported")
    ap.add_argument("--latency-ms", type=float, default=0.0, help="the simulator's added latency per request")
    ap.add_argument("--stream", action="store_true", help="post stream: true (wrk times the whole stream)")
    ap.add_argument("--baseline", type=Path, default=None,
                    help="another checkout with its own .venv (e.g. /work/baseline): its proxy is measured too")
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: `apt-get install -y wrk` (Debian/Ubuntu) or `brew install wrk`")

    from synth_agent import prompts

    procs: list[subprocess.Popen[Any]] = []
    with tempfile.TemporaryDirectory(prefix="proxy-bench-") as tmp:
        work = Path(tmp)
        lua = work / "post.lua"
        lua.write_text(LUA)
        try:
            sim_port = free_port()
            sim = subprocess.Popen(
                [str(HERE / ".venv" / "bin" / "synth-agent"), "sim-endpoint", "--port", str(sim_port),
                 "--latency-ms", f"{args.latency_ms:g}"],
                cwd=work, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                env={**os.environ, "SYNTH_AGENT_SIM_ACCESS_LOG": "0"},  # its output goes nowhere: do not format it
            )
            procs.append(sim)
            sim_url = f"http://127.0.0.1:{sim_port}/v1"
            wait_up(f"http://127.0.0.1:{sim_port}/healthz", sim, "the simulator")
            system = prompts.generation_system_prompt(PERSONA)
            direct_body = json.dumps({"model": "sim", "stream": args.stream, "messages": [
                {"role": "system", "content": system}, {"role": "user", "content": QUESTION}]})
            targets = [Target("direct", sim_url + "/chat/completions", direct_body, "sim")]
            trees = [("proxy (this tree)", HERE)]
            if args.baseline is not None:
                trees.append(("proxy (baseline)", args.baseline.resolve()))
            for i, (name, tree) in enumerate(trees):
                t = start_proxy(f"proxy{i}", tree, sim_url, work, args.stream)
                t.name = name
                assert t.proc is not None
                procs.append(t.proc)
                targets.append(t)
            runs: dict[str, list[dict[str, float]]] = {t.name: [] for t in targets}
            for r in range(args.rounds):
                order = targets[r % len(targets):] + targets[: r % len(targets)]
                for t in order:
                    m = run_wrk(t, args, lua, sim.pid)
                    runs[t.name].append(m)
                    print(f"round {r + 1} {t.name:<18} {m['rps']:8.0f} req/s  p50 {m['p50']:7.1f}  p99 {m['p99']:7.1f}"
                          f"  max {m['max']:7.1f} ms  errors {m['errors']:.0f}  proxy CPU {m['proxy_cpu_ms']:.2f} ms/req",
                          file=sys.stderr, flush=True)
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()

    med = {name: {k: statistics.median(m[k] for m in ms) for k in ms[0]} for name, ms in runs.items()}
    direct = med["direct"]["rps"]
    print(f"wrk -t{args.threads} -c{args.connections} -d{args.duration}s, simulator at {args.latency_ms:g} ms, "
          f"{'streaming, ' if args.stream else ''}median of {args.rounds} round(s); latencies in ms")
    print(f"{'target':<20}{'req/s':>9}{'of direct':>11}{'p50':>8}{'p90':>8}{'p99':>8}{'max':>9}{'errors':>8}"
          f"{'proxy CPU':>11}{'sim CPU':>9}  (ms/request)")
    for name, m in med.items():
        proxy_cpu = f"{m['proxy_cpu_ms']:.2f}" if name != "direct" else "-"
        print(f"{name:<20}{m['rps']:>9.0f}{m['rps'] / direct:>10.0%} {m['p50']:>8.1f}{m['p90']:>8.1f}{m['p99']:>8.1f}"
              f"{m['max']:>9.1f}{sum(x['errors'] for x in runs[name]):>8.0f}{proxy_cpu:>11}{m['sim_cpu_ms']:>9.2f}")


if __name__ == "__main__":
    main()
