"""Soak test: ``synth-agent serve`` under ~15 mixed requests/s for 10 minutes; memory over time.

Starts the offline simulator (``--sim-latency-ms`` per request) and ``synth-agent serve``
(inline synthesis, embedded store) as separate processes, then sends an open-loop mix at
``--rate`` requests/s: chat completions, votes, A/B pairs (half of them redeemed), reranks,
judgments, persona reads and ``--delete-share`` user deletions. Every 5 s it records the
resident memory of the server process and of its children (the store's Chroma process).
At the end it stops the server and checks that every acknowledged vote of a user not deleted
afterwards is stored. Prints per-kind counts, errors and latency, RSS at start/end, and the
RSS slope after ``--warmup`` seconds (least squares, MB/min); writes a plot of RSS over time.

What grows is set against the data written: every 5 s it also records each process's anonymous
and file-backed RSS (``smaps_rollup``), the votes stored (acknowledged since their user's last
delete) and written, and the bytes under the server's home; it prints votes stored/written per
minute, disk MB/min and RSS and disk KB per stored vote. A write-heavy mix cannot be flat (new
votes must live somewhere: Chroma keeps its HNSW indexes in memory, and what deletes give back
is measured, not assumed); a mix that writes nothing new must be (``--then-mix`` without vote/ab).
``--malloc-trim`` shows what malloc held free at the end; ``--tracemalloc`` where Python grew.

``--tracemalloc`` starts tracing when the warm-up ends (the warm-up runs untraced, at full speed), so a
snapshot holds what was allocated since and is still alive: its traced total first rises as objects
made before (caches, in-flight work) are replaced, then levels off unless something accumulates. Each
minute ``<out>/tracemalloc.jsonl`` gets the traced total and the top sites (by line; with
``SOAK_TRACEMALLOC_FRAMES=N`` > 1 also by whole traceback, ``top_tb``), and every 5 minutes the whole
snapshot goes to ``tracemalloc.jsonl.<s>.snap`` (``tracemalloc.Snapshot.load``; diff two of them to see
what grew in between). Tracing is costly: with 8 frames the server kept up with ``--rate 6``, not 15
(at 15 the requests piled up in the server and their objects were most of what grew), and each snapshot
holds the GIL for seconds (latencies of a traced run mean nothing; neither does its RSS, which carries
the traces themselves). Session 29's run and how to read it: docs/store.md, "Memory".

Processes are keyed by role, not name: ``server``, ``chroma`` (the child the server's state file
names) and ``chroma-spare`` (the next child, started during a compaction's copy; also named
``chroma``). Each change of child is a compaction's restart: the report lists them with the RSS
before, during and right after, the latency of requests in flight around them against the rest,
and every failed request (when it was sent, and whether it went out on a reused keep-alive
connection: only those can meet a server closing an idle connection). The server's log is copied
to ``<out>/serve.log``.
RSS is not a timing figure: run it without the bench lock, and note the load it prints.

    .venv/bin/python bench/soak.py                               # 10 minutes, this checkout
    .venv/bin/python bench/soak.py --repo /work/baseline         # the same load on another checkout
    .venv/bin/python bench/soak.py --duration 120 --warmup 30    # a quick look
    .venv/bin/python bench/soak.py --warmup 240 --then-mix chat=38,persona=15,rerank=5,judge=5 --then-at 180
                                                                 # writes for 3 minutes, then reads only
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pickle
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from contextvars import ContextVar
from pathlib import Path
from urllib.parse import quote

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from vote_write import KEY, measure, pct  # noqa: E402

from store.server import recorded_pid  # noqa: E402

TRACEMALLOC_LAUNCHER = """\
# Written by bench/soak.py --tracemalloc: runs `python -m synth_agent.cli ...`; from the end of the warm-up on,
# with tracemalloc on, appends every 60 s the allocation sites that grew most (JSON lines).
import json, linecache, os, runpy, sys, threading, time, tracemalloc

OUT = os.environ["SOAK_TRACEMALLOC_OUT"]
FRAMES = int(os.environ.get("SOAK_TRACEMALLOC_FRAMES", "1"))

def watch():
    while not os.path.exists(os.environ["SOAK_TRACEMALLOC_GO"]):  # soak.py creates it when the warm-up ends
        time.sleep(1)
    # Traced from the end of the warm-up only: what a snapshot holds is what was allocated since and is still
    # alive, and the warm-up (model loading, the first requests) runs at full speed.
    tracemalloc.start(FRAMES)
    base, t0 = tracemalloc.take_snapshot(), time.monotonic()
    filters = [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, linecache.__file__)]
    base = base.filter_traces(filters)
    base.dump(f"{OUT}.0.snap")
    n = 0
    while True:
        time.sleep(60)
        snap = tracemalloc.take_snapshot().filter_traces(filters)
        diff = snap.compare_to(base, "lineno")
        rec = {
            "t_after_warmup_s": round(time.monotonic() - t0),
            "traced_mb": round(tracemalloc.get_traced_memory()[0] / 1e6, 2),
            "growth_mb": round(sum(d.size_diff for d in diff) / 1e6, 3),
            "top": [[str(d.traceback), round(d.size_diff / 1e3, 1), d.count_diff] for d in diff[:30]],
        }
        if FRAMES > 1:  # whole tracebacks (innermost frame first), grouped by traceback
            rec["top_tb"] = [[list(d.traceback.format(most_recent_first=True)), round(d.size_diff / 1e3, 1),
                              d.count_diff] for d in snap.compare_to(base, "traceback")[:15]]
        with open(OUT, "a") as fh:
            fh.write(json.dumps(rec) + "\\n")
        n += 1
        if n % 5 == 0:  # a whole snapshot every 5 minutes, for offline diffs (tracemalloc.Snapshot.load)
            snap.dump(f"{OUT}.{rec['t_after_warmup_s']}.snap")

threading.Thread(target=watch, daemon=True, name="soak-tracemalloc").start()
sys.argv = ["synth_agent.cli", *sys.argv[1:]]
runpy.run_module("synth_agent.cli", run_name="__main__", alter_sys=True)
"""


def traced_python(python: str, out: Path) -> str:
    """A wrapper for ``python`` that starts ``serve`` under :data:`TRACEMALLOC_LAUNCHER` (other commands as is)."""
    launcher = out / "tracemalloc_launch.py"
    launcher.write_text(TRACEMALLOC_LAUNCHER)
    wrapper = out / "python-traced"
    wrapper.write_text(
        "#!/bin/sh\n"
        f"export SOAK_TRACEMALLOC_OUT={out / 'tracemalloc.jsonl'} SOAK_TRACEMALLOC_GO={out / 'tracemalloc.go'}\n"
        f'case "$1 $2 $*" in "-m synth_agent.cli "*" serve "*) shift 2; exec {python} {launcher} "$@";; esac\n'
        f'exec {python} "$@"\n'
    )
    wrapper.chmod(0o755)
    return str(wrapper)


def malloc_trim(root: int, chroma_pid: int | None = None) -> dict[str, list[float]]:
    """RSS (MB) of each process (by role) before and after glibc's ``malloc_trim(0)``, called in it through gdb.

    What a trim gives back is memory malloc held free (fragmentation, idle arenas), not data.
    """
    before = rss_mb(root, chroma_pid)
    for key in before:
        pid = key[key.index("[") + 1 : -1]
        subprocess.run(["gdb", "-p", pid, "-batch", "-ex", "call (int) malloc_trim(0)"], capture_output=True,
                       timeout=120, check=False)
    after = rss_mb(root, chroma_pid)
    b, a = by_role(before), by_role({k: v for k, v in after.items() if k in before})
    return {role: [round(mb, 1), round(a.get(role, float("nan")), 1)] for role, mb in b.items()}


KINDS = {"chat": 0.38, "vote": 0.25, "ab": 0.10, "rerank": 0.05, "judge": 0.05, "persona": 0.15}


def parse_mix(text: str) -> dict[str, float]:
    """``chat=1,persona=2`` -> normalised weights (argparse type)."""
    out: dict[str, float] = {}
    for part in text.split(","):
        kind, _, w = part.partition("=")
        if kind.strip() not in KINDS:
            raise argparse.ArgumentTypeError(f"unknown kind {kind.strip()!r}; use {', '.join(KINDS)}")
        out[kind.strip()] = float(w or 1)
    total = sum(out.values())
    if total <= 0:
        raise argparse.ArgumentTypeError("the mix needs a positive weight")
    return {k: v / total for k, v in out.items()}


def serving_chroma_pid(home: Path | None) -> int | None:
    """The pid of the Chroma child the server serves its store with (the state file it writes), if any."""
    return None if home is None else recorded_pid(home / "chroma")


def rss_mb(root: int, chroma_pid: int | None = None) -> dict[str, float]:
    """Resident memory (MB) of ``root`` and of each descendant, by ``role[pid]``.

    Roles: ``server`` (``root``), ``chroma`` (the Chroma child serving the store: ``chroma_pid``,
    from :func:`serving_chroma_pid`), ``chroma-spare`` (another Chroma process while that one is
    alive: the next child started during a compaction's copy, named ``chroma`` too), else the
    process name. Keyed by name alone, the spare and the child (both ``chroma``) would overwrite
    each other, and the per-process split would follow whichever came last.
    """
    parents: dict[int, int] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            raw = Path(f"/proc/{pid}/stat").read_bytes()
            parents[int(pid)] = int(raw[raw.rindex(b")") + 2 :].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    found: list[tuple[int, str, float, bool]] = []  # (pid, name, MB, runs chromadb)
    todo = [root]
    while todo:
        pid = todo.pop()
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        name = next(line.split()[1] for line in status.splitlines() if line.startswith("Name:"))
        kb = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
        found.append((pid, name, kb / 1024, pid != root and (name == "chroma" or b"chroma" in cmdline)))
        todo += [p for p, pp in parents.items() if pp == pid]
    serving_alive = any(pid == chroma_pid for pid, *_ in found)
    out: dict[str, float] = {}
    for pid, name, mb, chroma in found:
        if pid == root:
            role = "server"
        elif chroma:
            # before the state file names a child, or between the old child's end and the new one's heartbeat,
            # the one Chroma process there is counts as the child
            role = "chroma" if pid == chroma_pid or not serving_alive else "chroma-spare"
        else:
            role = name
        out[f"{role}[{pid}]"] = mb
    return out


def by_role(sample: dict[str, float]) -> dict[str, float]:
    """``role[pid] -> MB`` summed by role."""
    out: dict[str, float] = defaultdict(float)
    for key, mb in sample.items():
        out[key.split("[")[0]] += mb
    return dict(out)


def smaps_mb(root: int, chroma_pid: int | None = None) -> dict[str, dict[str, float]]:
    """Anonymous vs file-backed resident memory (MB) of ``root`` and each descendant, from ``smaps_rollup``.

    Anonymous is the heap (malloc arenas, Python objects, HNSW indexes); file-backed is mapped code and
    files (shared libraries, the ONNX model, SQLite if mmapped): the part that is data cannot hide there.
    """
    out: dict[str, dict[str, float]] = {}
    for key in rss_mb(root, chroma_pid):
        pid = key[key.index("[") + 1 : -1]
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        kb = {line.split(":")[0]: int(line.split()[1]) for line in text.splitlines()[1:] if line.endswith("kB")}
        anon, rss = kb.get("Anonymous", 0), kb.get("Rss", 0)
        out[key] = {"anon": anon / 1024, "file": (rss - anon) / 1024}
    return out


def home_of(pid: int) -> Path | None:
    """The ``--home`` the measured server was started with (to size its data on disk)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    for i, arg in enumerate(argv[:-1]):
        if arg == b"--home":
            return Path(argv[i + 1].decode())
    return None


def disk_mb(path: Path | None) -> float:
    """Bytes of every file under ``path`` (MB): what the stored data takes on disk."""
    if path is None:
        return float("nan")
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(dirpath, name)).st_size
            except OSError:
                continue
    return total / 1e6


def hnsw_state(home: Path | None) -> tuple[int, int, float]:
    """(slots, live items, MB) over every HNSW segment of the store's Chroma, as last persisted.

    chromadb's local HNSW gives every new id a new slot (label) and only marks a deleted one:
    slots = ``total_elements_added`` of the segment's ``index_metadata.pickle``, live items = its
    id map; MB = ``data_level0.bin`` + ``link_lists.bin`` (the vectors and links of every slot,
    deleted ones included: what the index holds in memory). Persisted every ``sync_threshold``
    (64–256) records per collection, so it lags the live process by that much.
    """
    slots = live = 0
    nbytes = 0
    if home is None:
        return 0, 0, 0.0
    for meta in (home / "chroma").glob("*/index_metadata.pickle"):
        try:
            with meta.open("rb") as fh:
                m = pickle.load(fh)  # noqa: S301 - the file is Chroma's own, written by the server we started
            slots += int(m.get("total_elements_added") or 0)
            live += len(m.get("id_to_label") or {})
            nbytes += sum((meta.parent / f).stat().st_size for f in ("data_level0.bin", "link_lists.bin")
                          if (meta.parent / f).exists())
        except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError):
            continue  # being replaced while we read: the next sample gets it
    return slots, live, nbytes / 1e6


def fit_level(points: list[tuple[float, float, float]]) -> tuple[float, float, float]:
    """Least squares ``rss = a + b * items + c * minutes``: (b in KB per item, c in MB/min, corr(items, t)).

    ``c`` is the growth at a constant amount of stored data; it can only be told apart from ``b``
    when the data is not growing in step with time (|corr| well below 1, e.g. deletes balancing writes).
    """
    import numpy as np

    if len(points) < 4:
        return float("nan"), float("nan"), float("nan")
    t = np.array([p[0] / 60 for p in points])
    n = np.array([p[1] for p in points], dtype=float)
    y = np.array([p[2] for p in points])
    corr = float(np.corrcoef(n, t)[0, 1]) if n.std() > 0 else float("nan")
    coef, *_ = np.linalg.lstsq(np.column_stack([np.ones_like(t), n, t]), y, rcond=None)
    return float(coef[1] * 1024), float(coef[2]), corr


def slope_mb_per_min(points: list[tuple[float, float]]) -> float:
    if len(points) < 2:
        return float("nan")
    xs, ys = [p[0] / 60 for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else float("nan")


_CONNECTION_REUSED: ContextVar[list[bool | None] | None] = ContextVar("connection_reused", default=None)
"""Per request task: whether aiohttp sent it on a pooled keep-alive connection (True) or a new one (False)."""


def connection_trace():  # type: ignore[no-untyped-def]
    """aiohttp trace hooks that record, per request task, whether its connection was reused from the pool.

    A request on a connection the server closes as it goes out fails with ``ServerDisconnectedError``
    or ``ClientOSError`` (reset): only a reused connection can meet that race, never a new one.
    """
    import aiohttp

    async def reused(*_: object) -> None:
        if (flag := _CONNECTION_REUSED.get()) is not None:
            flag[0] = True

    async def created(*_: object) -> None:
        if (flag := _CONNECTION_REUSED.get()) is not None:
            flag[0] = False

    trace = aiohttp.TraceConfig()
    trace.on_connection_reuseconn.append(reused)
    trace.on_connection_create_end.append(created)
    return trace


class Mix:
    """The traffic: users, what was acknowledged, latency and errors per kind."""

    def __init__(self, url: str, users: int, seed: int) -> None:
        self.url = url
        self.rng = random.Random(seed)
        self.users = [f"soak{u:03d}@example.com" for u in range(users)]
        self.acked: list[tuple[str, str, float]] = []  # (user, vote id, sent at)
        self.deletes: dict[str, list[tuple[float, float]]] = defaultdict(list)  # user -> (sent, answered)
        self.lat: dict[str, list[float]] = defaultdict(list)
        self.errors: dict[str, list[str]] = defaultdict(list)
        self.n = 0
        self.t0 = time.perf_counter()
        self.live: dict[str, int] = defaultdict(int)  # user -> votes acknowledged since their last delete
        self.done: list[tuple[float, float, str]] = []  # (sent, answered, kind), seconds since t0, requests answered ok
        # (sent s, kind, error, whether the request went out on a pooled keep-alive connection)
        self.error_log: list[tuple[float, str, str, bool | None]] = []

    def expected(self) -> dict[str, set[str]]:
        """Acknowledged votes that must be stored: sent after every delete of their user had answered."""
        out: dict[str, set[str]] = defaultdict(set)
        for user, vid, sent in self.acked:
            if all(done < sent for _, done in self.deletes.get(user, [])):
                out[user].add(vid)
        return out

    def convo(self) -> list[dict[str, str]]:
        topic = self.rng.choice(["a trip to Lisbon", "a Python bug", "tomato plants", "a job interview", "my budget"])
        return [{"role": "user", "content": f"Help me with {topic}, request {self.n}."}]

    async def one(self, session, kind: str) -> None:  # type: ignore[no-untyped-def]
        self.n += 1
        reused: list[bool | None] = [None]
        _CONNECTION_REUSED.set(reused)  # this task's: set by the session's trace hooks
        user = self.rng.choice(self.users)
        seg = quote(user, safe="")
        t = time.perf_counter()
        try:
            if kind == "chat":
                body = {"model": "sim", "user": user, "messages": self.convo()}
                ok = await self._post(session, "/v1/chat/completions", body)
            elif kind == "vote":
                vid = f"soak-{self.n}"
                body = {"id": vid, "user_id": user, "context": self.convo(), "chosen": f"short {self.n}",
                        "rejected": f"long rambling {self.n}"}
                ok = await self._post(session, "/v1/votes", body)
                if ok:
                    self.acked.append((user, vid, t))
                    self.live[user] += 1
            elif kind == "ab":
                res = await self._post(session, "/v1/ab", {"model": "sim", "user": user, "messages": self.convo()})
                if res and isinstance(res, dict) and res.get("token") and self.rng.random() < 0.5:
                    receipt = await self._post(session, f"/v1/ab/{res['token']}/vote", {"user": user, "choice": "a"})
                    if receipt and isinstance(receipt, dict) and receipt.get("vote_id"):
                        self.acked.append((user, receipt["vote_id"], t))
                        self.live[user] += 1
                ok = bool(res)
            elif kind == "rerank":
                body = {"model": "sim", "user": user, "messages": self.convo(),
                        "candidates": ["A short answer.", "A long answer with a list:\n- one\n- two", "Maybe."]}
                ok = await self._post(session, "/v1/rerank", body)
            elif kind == "judge":
                body = {"user": user, "messages": self.convo(), "a": "Short.", "b": "Long and detailed."}
                ok = await self._post(session, "/v1/judge", body)
            elif kind == "persona":
                async with session.get(f"/v1/users/{seg}/persona") as r:
                    await r.read()
                    ok = r.status in (200, 404)
                    if not ok:
                        self._error(kind, str(r.status), t)
            else:  # delete
                async with session.delete(f"/v1/users/{seg}") as r:
                    await r.read()
                    ok = r.status == 200
                    self.deletes[user].append((t, time.perf_counter()))
                    if ok:
                        self.live[user] = 0
                    if not ok:
                        self._error(kind, str(r.status), t)
        except Exception as exc:  # noqa: BLE001 - a soak counts failures, it does not stop on them
            self._error(kind, type(exc).__name__, t, f": {exc}")
            return
        if ok:
            answered = time.perf_counter()
            self.lat[kind].append((answered - t) * 1000)
            self.done.append((t - self.t0, answered - self.t0, kind))

    def _error(self, kind: str, what: str, sent: float, detail: str = "") -> None:
        self.errors[kind].append(what)
        self.error_log.append((round(sent - self.t0, 2), kind, (what + detail)[:200], (_CONNECTION_REUSED.get() or [None])[0]))

    async def _post(self, session, path: str, body: dict[str, object]):  # type: ignore[no-untyped-def]
        async with session.post(path, json=body) as r:
            data = await r.read()
            if r.status != 200:
                self._error(path.split("/")[2], f"{r.status} {data[:100]!r}", time.perf_counter())
                return None
            return json.loads(data) or True


class Trace:
    """What is sampled every 5 s besides RSS: anonymous/file split, votes stored, bytes on disk."""

    def __init__(self, pid: int) -> None:
        self.home = home_of(pid)
        self.smaps: list[tuple[float, dict[str, dict[str, float]]]] = []
        self.data: list[tuple[float, int, float]] = []  # (t, votes stored, MB on disk)
        self.written: list[tuple[float, float]] = []  # (t, votes acknowledged so far, deleted ones included)
        self.trim: dict[str, list[float]] | None = None
        self.hnsw: list[tuple[float, int, int, float]] = []  # (t, slots, live items, MB) of Chroma's HNSW

    def chroma_pid(self) -> int | None:
        return serving_chroma_pid(self.home)

    def sample(self, now: float, pid: int, mix: Mix) -> None:
        self.smaps.append((now, smaps_mb(pid, self.chroma_pid())))
        self.data.append((now, sum(mix.live.values()), disk_mb(self.home)))
        self.written.append((now, float(len(mix.acked))))
        self.hnsw.append((now, *hnsw_state(self.home)))


async def drive(args: argparse.Namespace, url: str, pid: int) -> tuple[Mix, list[tuple[float, dict[str, float]]], Trace]:
    import aiohttp

    mix = Mix(url, args.users, args.seed)
    trace = Trace(pid)
    def table(mix_w: dict[str, float], delete_share: float) -> tuple[list[str], list[float]]:
        return list(mix_w) + ["delete"], [w * (1 - delete_share) for w in mix_w.values()] + [delete_share]

    kinds, weights = table(args.mix or KINDS, args.delete_share)
    samples: list[tuple[float, dict[str, float]]] = []
    tasks: set[asyncio.Task[None]] = set()
    timeout = aiohttp.ClientTimeout(total=300)
    headers = {"Authorization": f"Bearer {KEY}"}
    # aiohttp's default pool (100 connections, idle ones reused for 15 s) unless --client-keepalive says otherwise
    connector = aiohttp.TCPConnector(**({"keepalive_timeout": args.client_keepalive} if args.client_keepalive else {}))
    async with aiohttp.ClientSession(base_url=url, headers=headers, timeout=timeout, connector=connector,
                                     trace_configs=[connection_trace()]) as session:
        t0 = time.monotonic()
        mix.t0 = time.perf_counter()  # request times and samples share one origin
        next_sample = 0.0
        i = 0
        while (now := time.monotonic() - t0) < args.duration:
            if now >= next_sample:
                samples.append((now, rss_mb(pid, trace.chroma_pid())))
                trace.sample(now, pid, mix)
                next_sample += 5.0
                done = sum(len(v) for v in mix.lat.values())
                errs = sum(len(v) for v in mix.errors.values())
                total = sum(samples[-1][1].values())
                print(f"  t={now:5.0f}s  requests ok {done:6d}  errors {errs:4d}  RSS {total:7.1f} MB", flush=True)
            if args.tracemalloc and now >= args.warmup and not (go := args.out / "tracemalloc.go").exists():
                go.touch()
            if args.then_mix and now >= args.then_at:
                kinds, weights = table(args.then_mix, 0.0)
            task = asyncio.create_task(mix.one(session, mix.rng.choices(kinds, weights)[0]))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
            await asyncio.sleep(max(0.0, t0 + i / args.rate - time.monotonic()))
        await asyncio.gather(*tasks)
        samples.append((end := time.monotonic() - t0, rss_mb(pid, trace.chroma_pid())))
        trace.sample(end, pid, mix)
        if args.malloc_trim:
            trace.trim = await asyncio.to_thread(malloc_trim, pid, trace.chroma_pid())
    if trace.home is not None and (log := trace.home.parent / "serve.log").exists():
        shutil.copyfile(log, args.out / "serve.log")  # the server's warnings (a failed compaction shows there)
    return mix, samples, trace


def halves(samples: list[tuple[float, dict[str, float]]], warmup: float) -> dict[str, list[float]]:
    """RSS slope (MB/min) in the first and the second half of the time after ``warmup``, total and per process."""
    after = [(t, s) for t, s in samples if t >= warmup]
    if len(after) < 4:
        return {}
    mid = (after[0][0] + after[-1][0]) / 2
    parts = [[p for p in after if p[0] <= mid], [p for p in after if p[0] >= mid]]
    names = sorted({k.split("[")[0] for _, s in after for k in s})
    out = {"total": [round(slope_mb_per_min([(t, sum(s.values())) for t, s in part]), 3) for part in parts]}
    for name in names:
        out[name] = [round(slope_mb_per_min([(t, sum(v for k, v in s.items() if k.split("[")[0] == name))
                                             for t, s in part]), 3) for part in parts]
    return out


def chroma_restarts(samples: list[tuple[float, dict[str, float]]]) -> list[dict[str, object]]:
    """Each change of the serving Chroma child in the samples (a compaction's restart), with RSS around it.

    ``copy_from_s``: the first sample of the run-up that shows the spare (the copy had begun), else the
    last sample of the old child; ``at_s``: the first sample of the new child. ``before``: the last sample
    without a spare before that; ``after``: the first sample of the new child without a spare.
    """
    def child(sample: dict[str, float]) -> int | None:
        return next((int(k[k.index("[") + 1 : -1]) for k in sample if k.startswith("chroma[")), None)

    def spare(sample: dict[str, float]) -> bool:
        return any(k.startswith("chroma-spare[") for k in sample)

    out: list[dict[str, object]] = []
    last: int | None = None
    for i, (t, sample) in enumerate(samples):
        pid = child(sample)
        if pid is None:
            continue
        if last is not None and pid != last:
            j = i - 1
            while j > 0 and (spare(samples[j][1]) or child(samples[j][1]) is None):
                j -= 1  # back to the last sample before the spare: before the copy
            k = i
            while k < len(samples) - 1 and spare(samples[k][1]):
                k += 1
            run_up = [s for s in samples[j + 1 : i] if spare(s[1])]
            roles = [by_role(s) for _, s in samples[j : k + 1]]
            out.append({
                "copy_from_s": round(run_up[0][0] if run_up else samples[i - 1][0], 1), "at_s": round(t, 1),
                "server_before_mb": round(roles[0].get("server", 0.0), 1),
                "server_max_during_mb": round(max(r.get("server", 0.0) for r in roles), 1),
                "server_after_mb": round(roles[-1].get("server", 0.0), 1),
                "chroma_before_mb": round(roles[0].get("chroma", 0.0), 1),
                "chroma_after_mb": round(roles[-1].get("chroma", 0.0), 1),
                "spare_max_mb": round(max(r.get("chroma-spare", 0.0) for r in roles), 1),
            })
        last = pid
    return out


def around_restarts(mix: Mix, restarts: list[dict[str, object]], margin: float = 2.0) -> dict[str, object]:
    """Latency of the requests in flight during a restart's run-up (copy + restart) against all others;
    errors of requests sent then. A window is ``copy_from_s - margin`` to ``at_s`` (samples are 5 s apart)."""
    windows = [(float(r["copy_from_s"]) - margin, float(r["at_s"])) for r in restarts]  # type: ignore[arg-type]

    def near(a: float, b: float) -> bool:
        return any(a <= hi and b >= lo for lo, hi in windows)

    lat_near: dict[str, list[float]] = defaultdict(list)
    lat_else: dict[str, list[float]] = defaultdict(list)
    for sent, answered, kind in mix.done:
        (lat_near if near(sent, answered) else lat_else)[kind].append((answered - sent) * 1000)
    return {
        "windows_s": [[round(a, 1), round(b, 1)] for a, b in windows],
        "latency_near_n_p50_max_ms": {k: [len(v), round(statistics.median(v), 1), round(max(v), 1)]
                                      for k, v in sorted(lat_near.items())},
        "latency_elsewhere_p99_max_ms": {k: [round(pct(v, 0.99), 1), round(max(v), 1)] for k, v in sorted(lat_else.items())},
        "errors_near": sum(1 for sent, *_ in mix.error_log if near(sent, sent)),
    }


def data_report(samples: list[tuple[float, dict[str, float]]], trace: Trace, warmup: float) -> dict[str, object]:
    """RSS growth set against the data written: is it the data, or something per request?

    New votes must live somewhere (Chroma keeps each collection's HNSW index in memory), so a
    write-heavy mix cannot be flat; what can be judged is the growth per vote stored, next to the
    bytes each vote takes on disk. A mix that stores no new data (reads only, or deletes as fast as
    writes) should show a slope near 0.
    """
    votes = [(t, float(n)) for t, n, _ in trace.data if t >= warmup]
    disk = [(t, mb) for t, _, mb in trace.data if t >= warmup]
    rss = [(t, sum(s.values())) for t, s in samples if t >= warmup]
    votes_per_min, disk_slope, rss_slope = slope_mb_per_min(votes), slope_mb_per_min(disk), slope_mb_per_min(rss)
    names = sorted({k.split("[")[0] for _, s in trace.smaps for k in s})

    def part(name: str, kind: str) -> list[tuple[float, float]]:
        return [(t, sum(v[kind] for k, v in s.items() if k.split("[")[0] == name)) for t, s in trace.smaps if t >= warmup]

    # "Per stored vote" only means something while the stored votes grow: with deletes balancing
    # writes (the mix reaches that within ~10 minutes) it would divide by ~0.
    written_per_min = slope_mb_per_min([p for p in trace.written if p[0] >= warmup])
    per_vote = votes_per_min > max(0.5, 0.1 * written_per_min)
    chroma = [(t, sum(v for k, v in s.items() if k.split("[")[0] == "chroma")) for t, s in samples]
    hnsw = {t: (slots, live, mb) for t, slots, live, mb in trace.hnsw}
    joined = [(t, *hnsw[t], mb) for t, mb in chroma if t >= warmup and t in hnsw]  # (t, slots, live, hnsw MB, RSS)
    kb_live, c_live, corr_live = fit_level([(t, live, rss) for t, _, live, _, rss in joined])
    slot_rate = slope_mb_per_min([(t, float(slots)) for t, slots, _, _, _ in joined])
    hnsw_rate = slope_mb_per_min([(t, mb) for t, _, _, mb, _ in joined])
    end = trace.hnsw[-1] if trace.hnsw else (0.0, 0, 0, 0.0)
    out: dict[str, object] = {
        "hnsw_slots_live_tombstoned_end": [end[1], end[2], end[1] - end[2]],
        "hnsw_mb_end": round(end[3], 1),
        "hnsw_slots_per_min_after_warmup": round(slot_rate, 1),
        "hnsw_mb_per_min_after_warmup": round(hnsw_rate, 3),
        # Chroma's RSS with the HNSW bytes (live and deleted slots) taken out: what grows besides the index
        "chroma_rss_slope_net_of_hnsw_mb_per_min": round(slope_mb_per_min([(t, rss - mb) for t, _, _, mb, rss
                                                                          in joined]), 3),
        # rss = a + b * live items + c * t: b per stored item, c the growth at constant stored data
        "chroma_fit_kb_per_live_item": round(kb_live, 2),
        "chroma_fit_mb_per_min_at_constant_data": round(c_live, 3),
        "chroma_fit_corr_live_items_time": round(corr_live, 2),
    }
    return {
        "votes_stored_end": trace.data[-1][1] if trace.data else 0,
        "votes_stored_per_min_after_warmup": round(votes_per_min, 1),
        # Deleted votes count here: what Chroma's memory follows is what was written.
        "votes_written_per_min_after_warmup": round(written_per_min, 1),
        "disk_mb_end": round(trace.data[-1][2], 1) if trace.data else None,
        "disk_mb_per_min_after_warmup": round(disk_slope, 3),
        "disk_kb_per_stored_vote": round(disk_slope / votes_per_min * 1000, 2) if per_vote else None,
        "rss_kb_per_stored_vote": round(rss_slope / votes_per_min * 1024, 2) if per_vote else None,
        "anon_file_mb_end": {name: {kind: round(sum(v[kind] for k, v in trace.smaps[-1][1].items()
                                                       if k.split("[")[0] == name), 1) for kind in ("anon", "file")}
                             for name in names} if trace.smaps else {},
        "anon_file_slope_after_warmup_mb_per_min": {
            name: {kind: round(slope_mb_per_min(part(name, kind)), 3) for kind in ("anon", "file")} for name in names},
        **out,
    }


def plot(samples: list[tuple[float, dict[str, float]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({k.split("[")[0] for _, s in samples for k in s})
    fig, ax = plt.subplots(figsize=(8, 4))
    for name in names:
        ax.plot([t / 60 for t, _ in samples], [sum(v for k, v in s.items() if k.split("[")[0] == name) for _, s in samples],
                label=name)
    ax.plot([t / 60 for t, _ in samples], [sum(s.values()) for _, s in samples], label="total", linewidth=2)
    ax.set_xlabel("minutes")
    ax.set_ylabel("RSS (MB)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", type=Path, default=HERE.parent, help="checkout whose `synth-agent serve` is measured")
    ap.add_argument("--python", help="its interpreter (default: <repo>/.venv/bin/python)")
    ap.add_argument("--duration", type=float, default=600.0, help="seconds of traffic (default 600)")
    ap.add_argument("--rate", type=float, default=15.0, help="requests per second (default 15)")
    ap.add_argument("--users", type=int, default=60)
    ap.add_argument("--delete-share", type=float, default=0.02)
    ap.add_argument("--mix", type=parse_mix, default=None,
                    help="request mix as kind=weight,... (kinds: " + ", ".join(KINDS) + "); default: the issue's mix. "
                         "E.g. --mix persona=1 --delete-share 0 for reads only (does RSS grow without new data?)")
    ap.add_argument("--then-mix", type=parse_mix, default=None,
                    help="switch to this mix (no deletes) after --then-at seconds, e.g. persona=1,chat=1: "
                         "write data first, then see whether memory grows on reads alone")
    ap.add_argument("--then-at", type=float, default=180.0)
    ap.add_argument("--warmup", type=float, default=120.0, help="seconds left out of the RSS slope (default 120)")
    ap.add_argument("--sim-latency-ms", type=float, default=20.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("."), help="where to write soak.png and soak.json")
    ap.add_argument("--malloc-trim", action="store_true",
                    help="at the end, call malloc_trim(0) in the server and Chroma processes (gdb) and report "
                         "RSS before/after: memory malloc held free, not data")
    ap.add_argument("--client-keepalive", type=float, default=None,
                    help="seconds the load generator keeps an idle connection for reuse (default: aiohttp's, 15 s)")
    ap.add_argument("--tracemalloc", action="store_true",
                    help="trace the server's Python allocations from the end of the warm-up: the sites that grew "
                         "most go to <out>/tracemalloc.jsonl every 60 s, whole snapshots every 5 min "
                         "(slows the server: diagnosis only, see above)")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: stop the server and simulator we started
    repo = args.repo.resolve()
    python = args.python or str(repo / ".venv" / "bin" / "python")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.tracemalloc:
        python = traced_python(python, args.out.resolve())
        for stale in [args.out / "tracemalloc.go", *args.out.glob("tracemalloc.jsonl*")]:
            stale.unlink(missing_ok=True)
    load0 = os.getloadavg()
    (mix, samples, trace), stored = measure(repo, python, "inline", lambda url, pid: asyncio.run(drive(args, url, pid)),
                                     seed=args.seed, sim_latency_ms=args.sim_latency_ms)
    totals = [(t, sum(s.values())) for t, s in samples]
    after = [p for p in totals if p[0] >= args.warmup]
    expected = mix.expected()
    lost = {u: sorted(ids - set(stored.get(u, [0, 0, []])[2])) for u, ids in expected.items()}
    lost = {u: ids for u, ids in lost.items() if ids}
    acked = sum(len(v) for v in expected.values())
    report = {
        "repo": str(repo), "duration_s": args.duration, "rate": args.rate,
        "load_avg_before_after": [round(x, 2) for x in (*load0, *os.getloadavg())],
        "malloc_arena_max": os.environ.get("MALLOC_ARENA_MAX", "unset"),
        "malloc_trim_s": os.environ.get("SYNTH_AGENT_MALLOC_TRIM_S", "unset"),
        "requests_ok": {k: len(v) for k, v in mix.lat.items()},
        "errors": {k: len(v) for k, v in mix.errors.items()},
        "first_errors": {k: v[:3] for k, v in mix.errors.items()},
        "latency_p50_ms": {k: round(statistics.median(v), 1) for k, v in mix.lat.items() if v},
        "latency_p99_ms": {k: round(pct(v, 0.99), 1) for k, v in mix.lat.items() if v},
        "acknowledged_votes_checked": acked, "acknowledged_votes_missing": sum(len(v) for v in lost.values()),
        "missing_examples": {u: ids[:3] for u, ids in list(lost.items())[:3]},
        # when each missing vote was sent, and that user's deletes (sent, answered), seconds into the run
        "missing_timeline": {
            u: {"votes_sent": [round(t - mix.t0, 2) for uu, vid, t in mix.acked if uu == u and vid in ids],
                "deletes": [(round(a - mix.t0, 2), round(b - mix.t0, 2)) for a, b in mix.deletes.get(u, [])]}
            for u, ids in list(lost.items())[:3]
        },
        "rss_start_mb": round(totals[0][1], 1), "rss_end_mb": round(totals[-1][1], 1),
        "rss_by_process_end_mb": {k: round(v, 1) for k, v in by_role(samples[-1][1]).items()},
        "rss_slope_after_warmup_mb_per_min": round(slope_mb_per_min(after), 3),
        "rss_slope_whole_run_mb_per_min": round(slope_mb_per_min(totals), 3),
        # Levelling off shows as a smaller slope in the second half of the measured window than in the first.
        "rss_slope_after_warmup_halves_mb_per_min": halves(samples, args.warmup),
        "rss_slope_after_warmup_by_process_mb_per_min": {
            name: round(slope_mb_per_min([(t, sum(v for k, v in s.items() if k.split("[")[0] == name))
                                          for t, s in samples if t >= args.warmup]), 3)
            for name in sorted({k.split("[")[0] for _, s in samples for k in s})},
    }
    restarts = chroma_restarts(samples)
    report["chroma_restarts"] = restarts
    report["server_rss_after_each_restart_mb"] = [r["server_after_mb"] for r in restarts]
    report["around_restarts"] = around_restarts(mix, restarts)
    # each failed request: (sent, s into the run; kind; what; sent on a reused keep-alive connection?)
    report["error_log"] = mix.error_log[:30]
    report.update(data_report(samples, trace, args.warmup))
    if trace.trim is not None:
        report["malloc_trim_rss_before_after_mb"] = trace.trim
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps({**report, "rss_samples": totals, "rss_samples_by_process": [
        (t, {k: round(v, 1) for k, v in s.items()}) for t, s in samples],  # role[pid]
        "smaps_samples": [(t, {k: {kk: round(vv, 2) for kk, vv in v.items()} for k, v in s.items()})
                          for t, s in trace.smaps],
        "data_samples": trace.data, "hnsw_samples": trace.hnsw, "load_before": load0, "load_after": os.getloadavg()}, indent=2))
    plot(samples, args.out / "soak.png", f"soak: {args.rate:g} req/s, {repo.name}")
    for k, v in report.items():
        print(f"  {k:36} {v}")
    print(f"  plot: {args.out / 'soak.png'}")


if __name__ == "__main__":
    main()
