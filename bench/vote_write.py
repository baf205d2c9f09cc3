"""Vote write benchmark: ``synth-agent serve`` under 200 concurrent writers, with /healthz sampled throughout.

Starts the offline simulator (upstream) and ``synth-agent serve`` (embedded store, API key auth)
as separate processes in a temporary home, warms the server up with one vote, then lets
``--writers`` clients each post ``--votes`` single-vote ``POST /v1/votes`` requests for
``--users`` users of one tenant, while a sampler calls ``GET /healthz`` back to back. Prints
votes/s acknowledged, write latency, /healthz latency and the drain (until every acknowledged vote is
stored and searchable: the rate that counts), then stops the server and counts what was stored
(with the repository's own code, so any version can be measured).

Two load generators post the same requests (the same bodies, byte for byte):

* ``--load python`` (the default): ``--writers`` aiohttp clients on uvloop in this process. It
  shares the machine's cores with the server: ~0.3–0.4 ms of client CPU per vote, a quarter of a
  core during a burst (``client_cpu_ms_per_vote``).
* ``--load wrk``: the compiled ``wrk`` (``apt-get install -y wrk`` on Debian/Ubuntu, ``brew install
  wrk`` on macOS) with a Lua script: ``--writers`` connections, one thread, posting the
  pre-encoded bodies in order (``WRK_LUA``) and stopping once every one is answered; latency
  percentiles are wrk's own. Only the light /healthz sampler stays in Python. Closed loop like the
  Python writers, but wrk cannot cap a single connection: the ``writers × votes`` votes go out
  ``writers`` at a time over ``writers`` connections (each sends ~``votes``). Not with ``--rate``.

    .venv/bin/python bench/vote_write.py                                  # this checkout
    .venv/bin/python bench/vote_write.py --repo /work/baseline            # another checkout, same load
    .venv/bin/python bench/vote_write.py --synthesis off                  # fits by a separate worker
    .venv/bin/python bench/vote_write.py --synthesis off --load wrk       # compiled load generator
    .venv/bin/python bench/vote_write.py --synthesis off --load wrk --trace /tmp/t.txt  # which requests make the tail

``--trace`` (with wrk): every request carries ``X-Request-ID: bench-<k>`` (its place in the send order;
the proxy echoes it), the Lua script notes its send and answer times (CLOCK_MONOTONIC, so a probe in
the server can be lined up with it), writes them to the file, and the bench prints latency by send
time, the first wave against the rest and the slowest 1 %. The /healthz samples go to ``FILE.healthz``
(``hz-<k>`` request ids, the same clock, the burst's start and end on the first line).

``/healthz`` is sampled from before the burst until the drain ends, so most samples fall after the last
acknowledgement; ``healthz_burst`` and ``healthz_after_burst`` split them (with ~20-50 samples in a ~1 s
burst and ~500 after it, ``healthz_p99_ms`` is set by the burst's slowest few).
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


def bodies(writers: int, per_writer: int, users: int) -> list[list[bytes]]:
    """Writer ``w``'s ``per_writer`` request bodies: one distinct vote each (id ``w{w}-{i}``, distinct
    content: the store dedupes by content hash too), for user ``w % users``. Both load generators post these."""
    return [[json.dumps(vote(f"user{w % users:02d}@bench", w, i)).encode() for i in range(per_writer)]
            for w in range(writers)]


def expected_ids(writers: int, per_writer: int, users: int) -> dict[str, set[str]]:
    """``{user: vote ids}`` the load sends, for the check of what was stored."""
    out: dict[str, set[str]] = {}
    for w in range(writers):
        out.setdefault(f"user{w % users:02d}@bench", set()).update(f"w{w}-{i}" for i in range(per_writer))
    return out


# wrk's Lua hooks (one thread, ``-t1``): post the bodies of BENCH_BODIES (one JSON per line) in file order,
# one per request, on whichever connection is free (closed loop). wrk asks request() once before the run
# to check the request's shape: that call gets the first body without using it up. Once every body is
# sent, a free connection gets an empty request (nothing is written and it idles: wrk has no per-connection
# stop); when the last response is in, the thread stops and prints FINISHED (the caller then ends wrk's
# fixed-duration wait with SIGINT). wrk calls response() before it records a latency, so every response
# is timed. done() prints what wrk measured (microseconds) as one JSON line.
WRK_LUA = textwrap.dedent("""\
    local bodies, sent, answered, ok, verified = {}, 0, 0, 0, false
    local trace = os.getenv("BENCH_TRACE")
    local now_us, sent_at, done_at, code = nil, {}, {}, {}
    if trace then  -- per-request times (CLOCK_MONOTONIC, as Python's time.monotonic), matched by X-Request-ID
      local ffi = require("ffi")
      ffi.cdef("typedef struct { long s; long ns; } bench_ts; int clock_gettime(int, bench_ts *);")
      local ts = ffi.new("bench_ts")
      now_us = function() ffi.C.clock_gettime(1, ts); return tonumber(ts.s) * 1000000 + tonumber(ts.ns) / 1000 end
    end
    function init(args)
      local k = 0
      for line in io.lines(os.getenv("BENCH_BODIES")) do
        k = k + 1
        local headers = {["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. os.getenv("BENCH_KEY")}
        if trace then headers["X-Request-ID"] = "bench-" .. k end
        bodies[k] = wrk.format("POST", "/v1/votes", headers, line)
      end
    end
    function request()
      if not verified then verified = true; return bodies[1] end
      if sent >= #bodies then return "" end
      sent = sent + 1
      if trace then sent_at[sent] = now_us() end
      return bodies[sent]
    end
    function response(status, headers, body)
      answered = answered + 1
      if status >= 200 and status < 300 then ok = ok + 1 end
      if trace then
        local rid = headers["x-request-id"] or headers["X-Request-ID"] or ""
        local k = tonumber(string.match(rid, "^bench%-(%d+)$"))
        if k then done_at[k] = now_us(); code[k] = status end
      end
      if answered == #bodies then
        if trace then
          local f = io.open(trace, "w")
          for k = 1, #bodies do
            f:write(string.format("%d %.1f %.1f %d\\n", k, sent_at[k] or -1, done_at[k] or -1, code[k] or 0))
          end
          f:close()
        end
        wrk.thread:set("ok", ok)
        wrk.thread:set("answered", answered)
        wrk.thread:stop()
        io.write("FINISHED\\n")
        io.flush()
      end
    end
    local threads = {}
    function setup(thread) threads[#threads + 1] = thread end
    function done(summary, latency, requests)
      local e, ok, answered = summary.errors, 0, 0
      for _, t in ipairs(threads) do
        ok = ok + (t:get("ok") or 0)
        answered = answered + (t:get("answered") or 0)
      end
      io.write(string.format(
        'BENCH {"requests": %d, "ok": %d, "answered": %d, "duration_us": %d, "non2xx": %d, "connect": %d, '
        .. '"read": %d, "write": %d, "timeout": %d, "p50": %d, "p90": %d, "p95": %d, "p99": %d, "max": %d}\\n',
        summary.requests, ok, answered, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
        latency:percentile(50), latency:percentile(90), latency:percentile(95), latency:percentile(99), latency.max))
    end
""")


class WrkBurst:
    """wrk posting ``lines`` (one request body each) over ``connections`` connections: ``start``, ``finished``
    (blocks until the last response is in), then ``result`` (what wrk measured, and its CPU seconds).

    wrk sleeps its whole ``-d`` before it reports, and corrects its latencies for coordinated omission
    with an interval of run time / (requests / connections): samples above twice that interval get
    synthetic companions. The run is therefore ended (SIGINT) no earlier than 3× the burst's duration,
    which puts the interval above any latency of the burst, so wrk's percentiles are the measured ones."""

    def __init__(self, url: str, lines: list[bytes], connections: int, limit_s: int = 120,
                 trace: Path | None = None) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="vote-wrk-")
        lua, data = Path(self.tmp.name) / "votes.lua", Path(self.tmp.name) / "bodies.jsonl"
        lua.write_text(WRK_LUA)
        data.write_bytes(b"".join(line + b"\n" for line in lines))
        self.cmd = ["wrk", "-t1", f"-c{connections}", f"-d{limit_s}s", "--timeout", f"{limit_s}s", "-s", str(lua), url]
        self.env = {**os.environ, "BENCH_BODIES": str(data), "BENCH_KEY": KEY}
        if trace is not None:  # each request carries X-Request-ID bench-<k>; see WRK_LUA and read_trace
            self.env["BENCH_TRACE"] = str(trace)

    def start(self) -> None:
        import resource

        self.cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def finished(self) -> None:
        assert self.proc.stdout is not None
        self.out = []
        for line in self.proc.stdout:  # ends at FINISHED, or at EOF if wrk hit its -d limit
            self.out.append(line)
            if line.startswith("FINISHED"):
                break
        self.burst = time.perf_counter() - self.t0

    def result(self) -> dict[str, Any]:
        import resource

        if self.proc.poll() is None:  # (else wrk ran into its -d limit: the burst never finished)
            time.sleep(max(0.0, self.t0 + 3 * self.burst - time.perf_counter()))
            self.proc.send_signal(signal.SIGINT)
        rest, err = self.proc.communicate(timeout=60)
        cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.tmp.cleanup()
        line = next((ln for ln in "".join(self.out).splitlines() + rest.splitlines() if ln.startswith("BENCH ")), None)
        if line is None:
            raise SystemExit(f"wrk printed no summary:\n{''.join(self.out)}{rest}\n{err}")
        out: dict[str, Any] = json.loads(line[len("BENCH "):])
        out["cpu"] = (cpu1.ru_utime + cpu1.ru_stime) - (self.cpu0.ru_utime + self.cpu0.ru_stime)
        return out


def read_trace(path: Path) -> list[tuple[int, float, float, int]]:
    """``--trace``'s lines as ``(k, sent ms, latency ms, status)``, sent from the burst's first send (k is the
    body's place in the send order, 1-based: the first ``writers`` are the first wave)."""
    rows = [(int(k), float(s), float(d), int(c)) for k, s, d, c in (ln.split() for ln in path.read_text().splitlines())]
    t0 = min(s for _, s, _, _ in rows if s >= 0)
    return [(k, (s - t0) / 1000, (d - s) / 1000 if d >= 0 and s >= 0 else float("nan"), c) for k, s, d, c in rows]


def trace_summary(rows: list[tuple[int, float, float, int]], writers: int, parts: int = 10) -> list[str]:
    """Which requests make the tail: latency by send time (``parts`` slices of the burst), the first wave
    against the rest, and the slowest 1 % with their send times."""
    done = [r for r in rows if r[2] == r[2]]
    end = max(s for _, s, _, _ in done)
    out = ["latency by send time (ms from the first send): n, p50, p99, max"]
    for i in range(parts):
        lo, hi = end * i / parts, end * (i + 1) / parts
        lat = [d for _, s, d, _ in done if lo <= s < hi or (i == parts - 1 and s == hi)]
        if lat:
            out.append(f"  {lo:6.0f}-{hi:6.0f}  {len(lat):4d}  {pct(lat, 0.5):6.1f}  {pct(lat, 0.99):6.1f}  {max(lat):6.1f}")
    for name, part in (("first wave", [d for k, _, d, _ in done if k <= writers]),
                       ("the rest", [d for k, _, d, _ in done if k > writers])):
        if part:
            out.append(f"{name:11} n={len(part)} p50={pct(part, 0.5):.1f} p99={pct(part, 0.99):.1f} max={max(part):.1f}")
    slow = sorted(done, key=lambda r: -r[2])[: max(1, len(done) // 100)]
    out.append("slowest 1 % (k, sent ms, latency ms): " + ", ".join(f"{k}@{s:.0f}:{d:.0f}" for k, s, d, _ in slow))
    return out


async def load(
    url: str, writers: int, per_writer: int, users: int, server_pid: int, rate: float | None = None,
    generator: str = "python", trace: Path | None = None,
) -> dict[str, object]:
    """The writers (``generator``: ``python`` or ``wrk``) and the /healthz sampler (aiohttp: a light client).

    Closed loop by default (each writer sends its next vote when the last one is answered, so
    latency is about writers / throughput); with ``rate`` (Python writers only) the votes are sent on
    a schedule of ``rate`` votes/s in all (open loop), and latency is what one vote waits at that load.
    """
    import aiohttp

    headers = {"Authorization": f"Bearer {KEY}"}
    lat: list[float] = []
    errors: list[str] = []
    health: list[float] = []
    health_at: list[float] = []  # each sample's start (perf_counter), to split the burst from the drain after it
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
        sends = bodies(writers, per_writer, users)
        post_headers = {"Content-Type": "application/json"}

        async def writer(w: int) -> None:
            for i in range(per_writer):
                if rate:
                    await asyncio.sleep(max(0.0, t0 + (i * writers + w) / rate - time.perf_counter()))
                t = time.perf_counter()
                try:
                    async with client.post("/v1/votes", data=sends[w][i], headers=post_headers) as resp:
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
                    rid = {"X-Request-ID": f"hz-{len(health)}"} if trace else None
                    async with hc.get("/healthz", headers=rid) as resp:
                        await resp.read()
                        health_bad += resp.status != 200
                    health.append((time.perf_counter() - t) * 1000)
                    health_at.append(t)
                    await asyncio.sleep(0.01)

        sample = asyncio.create_task(sampler())
        cpu0, self0 = cpu_seconds(server_pid), time.process_time()
        loop0 = loop_cpu_seconds(server_pid)
        t0 = time.perf_counter() + (0.5 if rate else 0.0)
        wrk: dict[str, Any] = {}
        if generator == "wrk":
            # in the order w0-0, w1-0, …, w0-1, …: the order the Python writers start them in
            burst = WrkBurst(url, [sends[w][i] for i in range(per_writer) for w in range(writers)], writers,
                             trace=trace)
            burst.start()
            await asyncio.to_thread(burst.finished)
        else:
            await asyncio.gather(*(writer(w) for w in range(writers)))
        t_end = time.perf_counter()
        wall = t_end - t0
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
        if generator == "wrk":
            wrk = await asyncio.to_thread(burst.result)  # wrk's figures (its wait overlapped the drain)
    server_cpu = sum(cpu1.get(k, 0.0) - cpu0.get(k, 0.0) for k in cpu1)
    split = {k.split("[")[0]: round(cpu1[k] - cpu0.get(k, 0.0), 2) for k in cpu1 if cpu1[k] - cpu0.get(k, 0.0) > 0.05}
    # the /healthz samples for --trace (k, sent, answered: CLOCK_MONOTONIC µs, as the writes)
    health_lines = [f"# burst {t0 * 1e6:.1f} {t_end * 1e6:.1f}"] + [
        f"{k} {at * 1e6:.1f} {(at + h / 1000) * 1e6:.1f}" for k, (h, at) in enumerate(zip(health, health_at, strict=True))]
    # /healthz while votes were being acknowledged (a sample started before the last answer) and after (the drain)
    in_burst = [h for h, at in zip(health, health_at, strict=True) if at < t_end]
    after = [h for h, at in zip(health, health_at, strict=True) if at >= t_end]
    out: dict[str, object] = {
        "health_burst": in_burst, "health_after": after, "health_lines": health_lines,
        "server_cpu_split_s": split, "wall": wall, "drain": drain, "errors": errors, "health": health,
        "health_bad": health_bad, "server_cpu": server_cpu, "client_cpu": client_cpu, "loop_cpu": loop_cpu}
    if wrk:
        bad = wrk["answered"] - wrk["ok"] + wrk["connect"] + wrk["read"] + wrk["write"] + wrk["timeout"]
        if bad:
            errors.append(f"wrk: {wrk}")
        out.update(acked=wrk["ok"], p50=wrk["p50"] / 1000, p90=wrk["p90"] / 1000, p99=wrk["p99"] / 1000,
                   max=wrk["max"] / 1000,
                   generator_cpu=wrk["cpu"], n_errors=bad)
    else:
        out.update(acked=len(lat), p50=statistics.median(lat) if lat else None, p90=pct(lat, 0.9) if lat else None,
                   p99=pct(lat, 0.99) if lat else None,
                   max=max(lat) if lat else None, generator_cpu=0.0, n_errors=len(errors))
    return out


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


def _summary(values: list[float]) -> str:
    """``n=…, p50=…, p99=…, max=…`` (ms) of some /healthz samples."""
    if not values:
        return "n=0"
    return f"n={len(values)} p50={pct(values, 0.5):.1f} p99={pct(values, 0.99):.1f} max={max(values):.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", type=Path, default=HERE, help="checkout whose `synth-agent serve` is measured")
    ap.add_argument("--python", help="its interpreter (default: <repo>/.venv/bin/python)")
    ap.add_argument("--writers", type=int, default=200)
    ap.add_argument("--votes", type=int, default=5, help="votes per writer, one per request")
    ap.add_argument("--users", type=int, default=20)
    ap.add_argument("--synthesis", choices=["inline", "off"], default="inline")
    ap.add_argument("--rate", type=float, help="open loop: send the votes at this many per second in all")
    ap.add_argument("--load", choices=["python", "wrk"], default="python",
                    help="load generator: aiohttp writers in this process, or wrk (compiled, Lua script)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--trace", type=Path, help="with --load wrk: write each request's send time and latency here "
                    "(k sent_us answered_us status; CLOCK_MONOTONIC) and print which requests make the tail")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: stop the server and simulator we started
    repo = args.repo.resolve()
    python = args.python or str(repo / ".venv" / "bin" / "python")
    if args.load == "wrk":
        if shutil.which("wrk") is None:
            raise SystemExit("wrk is not installed: `apt-get install -y wrk` (Debian/Ubuntu) or `brew install wrk`")
        if args.rate:
            raise SystemExit("--rate needs the Python writers (--load python): wrk runs a closed loop")
    elif args.trace:
        raise SystemExit("--trace needs --load wrk")
    result, stored = measure(repo, python, args.synthesis,
                          lambda url, pid: run(load(url, args.writers, args.votes, args.users, pid, args.rate,
                                                    args.load, args.trace)))
    res: dict[str, Any] = result  # type: ignore[assignment]
    health = res["health"]
    total = args.writers * args.votes
    acked: int = res["acked"]
    kept = sum(n for n, _, _ in stored.values())
    unique = sum(u for _, u, _ in stored.values())
    # What was stored against what was sent: no vote the load did not send, none twice, and (when every
    # request was acknowledged) every one of them.
    sent = expected_ids(args.writers, args.votes, args.users)
    stored_ids = {u: set(ids) for u, (_, _, ids) in stored.items()}
    unexpected = sum(len(ids - sent.get(u, set())) for u, ids in stored_ids.items())
    missing = sum(len(ids - stored_ids.get(u, set())) for u, ids in sent.items())
    ms = lambda v: round(v, 1) if v is not None else None  # noqa: E731
    figures = {
        "repo": str(repo), "load": args.load, "synthesis": args.synthesis, "writers": args.writers, "votes": total,
        "offered_rate": args.rate or "closed loop",
        "acknowledged": acked, "errors": res["n_errors"], "stored": kept, "stored_unique": unique,
        "sent_not_stored": missing, "stored_not_sent": unexpected,
        "wall_s": round(res["wall"], 2),
        # acknowledged per second, and stored + searchable per second (the real throughput: until the drain ends)
        "ack_votes_per_s": round(acked / res["wall"], 1),
        "drain_after_last_ack_s": round(res["drain"], 2),
        "stored_votes_per_s": round(acked / (res["wall"] + res["drain"]), 1),
        "write_p50_ms": ms(res["p50"]), "write_p90_ms": ms(res["p90"]), "write_p99_ms": ms(res["p99"]), "write_max_ms": ms(res["max"]),
        "healthz_samples": len(health), "healthz_p50_ms": round(statistics.median(health), 1),
        "healthz_p99_ms": round(pct(health, 0.99), 1), "healthz_max_ms": round(max(health), 1),
        "healthz_not_200": res["health_bad"],
        # the same samples split: while votes were acknowledged, and after the last answer (the drain)
        "healthz_burst": _summary(res["health_burst"]), "healthz_after_burst": _summary(res["health_after"]),
        "server_cpu_ms_per_vote": round(res["server_cpu"] / max(acked, 1) * 1000, 2),
        # the server's event-loop thread alone, during the writes (parsing, validation, journal hand-off, answers)
        "loop_cpu_ms_per_vote": round(res["loop_cpu"] / max(acked, 1) * 1000, 2),
        # the load generator during the writes (it shares the cores): this process (Python writers and the
        # /healthz sampler) and, with --load wrk, wrk's own CPU
        "client_cpu_ms_per_vote": round(res["client_cpu"] / max(acked, 1) * 1000, 2),
        "wrk_cpu_ms_per_vote": round(res["generator_cpu"] / max(acked, 1) * 1000, 2),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "server_cpu_split_s": res["server_cpu_split_s"],
    }
    print(f"vote_write: {args.writers} writers x {args.votes} votes, {args.users} users, synthesis={args.synthesis}, "
          f"load={args.load}, repo={repo}")
    for k, v in figures.items():
        if k not in ("repo",):
            print(f"  {k:18} {v}")
    if res["errors"]:
        print("  first errors:", res["errors"][:5])
    if args.trace:
        Path(f"{args.trace}.healthz").write_text("\n".join(res["health_lines"]) + "\n")
        for line in trace_summary(read_trace(args.trace), args.writers):
            print("  " + line)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
