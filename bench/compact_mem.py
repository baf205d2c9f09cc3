"""What does each compaction of a served store cost the server process's memory? Churn + compact, repeated.

Issue 10: with automatic compaction on, the server (Python) process grew ~2.4 MB/min faster in the
soak (docs/store.md, "Compaction"). This harness isolates it: it opens the store the way ``serve``
does (:meth:`store.chroma.ChromaStore.local_server`: Chroma in a ``chroma run`` child, sealed, with
a ledger, 2 malloc arenas) and runs ``--rounds`` rounds; each deletes ``--churn`` records and adds
as many (so the stored count stays at ``--items``), then — per arm — compacts (``compact``: the copy,
the switch and the restart of the Chroma child, as ``serve`` does), compacts without the restart
(``norestart``), or does nothing more (``churn``: the baseline), then searches once. After each
round it collects garbage and records, for this process: RSS after the churn, after the compaction
and at the end of the round, its anonymous part, the Python heap traced by ``tracemalloc``, the
Chroma child's RSS, and how many chromadb client systems (``SharedSystemClient._identifier_to_system``)
and ``Client``/``System``/``SSLContext`` objects are alive; with ``--trim`` also RSS after
``malloc_trim(0)`` (what glibc held free; it changes the rounds after it), with ``--reader`` the
latency of a thread reading one user's items every 20 ms (p50/p99/max per round: reads wait while
the Chroma child restarts). At the end: the per-round slopes after ``--warm`` rounds (least
squares); ``--diff`` also the Python heap's allocation sites that grew most from then to the last
round (``tracemalloc`` snapshot diff; slow).

Each arm runs in a fresh process (RSS is per process), with the interpreter and the code of
``--repo`` (default: this checkout), so ``--repo /work/ref`` measures the code before a change.

    .venv/bin/python bench/compact_mem.py                                  # arms churn, compact; 6 rounds each
    .venv/bin/python bench/compact_mem.py --arms compact --rounds 6 --churn 100 --reader   # ~2 min
    .venv/bin/python bench/compact_mem.py --arms compact --repo /work/ref --trim

The default embedder is a deterministic 384-d hash (no model: the server's embedder is not what is
measured); ``--embedder minilm`` uses the real one.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def status_mb(field: str) -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":")) / 1024


def child_rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:")) / 1024
    except OSError:
        return 0.0


def slope(ys: list[float]) -> float:
    """Least-squares slope per step of ``ys`` (0 for fewer than two points)."""
    n = len(ys)
    if n < 2:
        return 0.0
    mx, my = (n - 1) / 2, sum(ys) / n
    return sum((i - mx) * (y - my) for i, y in enumerate(ys)) / sum((i - mx) ** 2 for i in range(n))


def live_types(*names: str) -> dict[str, int]:
    counts = dict.fromkeys(names, 0)
    for o in gc.get_objects():
        t = type(o).__name__
        if t in counts:
            counts[t] += 1
    return counts


def run_arm(args: argparse.Namespace) -> None:
    """One arm in this process (started by :func:`main` with the interpreter of ``--repo``)."""
    import ctypes
    import tracemalloc

    sys.path.insert(0, str(args.repo))
    sys.path.insert(0, str(HERE))
    tracemalloc.start(args.frames)
    try:  # as `synth-agent serve` does before its threads start
        from synth_agent.serving import limit_malloc_arenas

        limit_malloc_arenas()
    except ImportError:
        pass
    from hnsw_churn import HashEmbeddings
    from langgraph.store.base import PutOp

    from store.chroma import ChromaStore

    libc = ctypes.CDLL("libc.so.6")
    if args.embedder == "minilm":
        from store.embeddings import MiniLMEmbeddings

        ef = MiniLMEmbeddings(threads=1)
    else:
        ef = HashEmbeddings()
    arm = args._arm
    path = Path(tempfile.mkdtemp(prefix=f"compact-mem-{arm}-")) / "chroma"
    st = ChromaStore.local_server(path, embedding_function=ef, index_fields=["text"], compact_ratio=0,
                                  restart_after_compact=(arm == "compact"))
    try:
        from chromadb.api.shared_system_client import SharedSystemClient
    except ImportError:  # pragma: no cover - other chromadb layouts
        SharedSystemClient = None  # type: ignore[assignment,misc]  # noqa: N806
    import numpy as np

    rng = np.random.default_rng(0)
    live: list[str] = []
    next_id = 0

    def add(n: int) -> None:
        nonlocal next_id
        keys = [f"v{next_id + i}" for i in range(n)]
        next_id += n
        st.batch([PutOp(("t", f"u{int(k[1:]) % 50}"), k, {"text": f"vote text {k} about topic {int(k[1:]) % 97}"})
                  for k in keys])
        live.extend(keys)

    for _ in range(0, args.items, 250):
        add(min(250, args.items - len(live)))
    waits: list[float] = []  # --reader: latency of each read, this round
    stop_reader = threading.Event()

    def reader() -> None:  # one user's reads, back to back with a pause, as the server's persona reads
        while not stop_reader.is_set():
            t = time.monotonic()
            st.search(("t", "u7"), limit=10)
            waits.append(time.monotonic() - t)
            stop_reader.wait(0.02)

    reader_thread = threading.Thread(target=reader, daemon=True)
    if args.reader:
        reader_thread.start()
    rows = []
    snap0 = None
    t_start = time.monotonic()
    for r in range(1, args.rounds + 1):
        t0 = time.monotonic()
        for _ in range(args.churn // 50):
            gone = [live.pop(int(rng.integers(len(live)))) for _ in range(50)]
            st.batch([PutOp(("t", f"u{int(k[1:]) % 50}"), k, None) for k in gone])
            add(50)
        t1 = time.monotonic()
        rss_churned = status_mb("VmRSS")
        if arm != "churn":
            st.compact()
        t2 = time.monotonic()
        rss_compacted = status_mb("VmRSS")
        st.search(("t",), query="vote text", limit=3)  # a read after the round (and after a restart)
        gc.collect()
        read_ms = sorted(w * 1000 for w in waits)
        waits.clear()
        row = {
            "round": r, "churn_s": round(t1 - t0, 2), "compact_s": round(t2 - t1, 2),
            "rss_after_churn_mb": round(rss_churned, 1), "rss_after_compact_mb": round(rss_compacted, 1),
            "rss_mb": round(status_mb("VmRSS"), 1), "anon_mb": round(status_mb("RssAnon"), 1),
            "py_heap_mb": round(tracemalloc.get_traced_memory()[0] / 1e6, 2),
            "chroma_rss_mb": round(child_rss_mb(st._server.proc.pid), 1) if st._server and st._server.proc else 0.0,
            "systems": len(SharedSystemClient._identifier_to_system) if SharedSystemClient else -1,
            **live_types("Client", "System", "Collection", "SSLContext"),
        }
        if args.reader and read_ms:
            row.update(reads=len(read_ms), read_p50_ms=round(read_ms[len(read_ms) // 2], 1),
                       read_p99_ms=round(read_ms[int(len(read_ms) * 0.99)], 1), read_max_ms=round(read_ms[-1], 1))
        if args.trim:
            libc.malloc_trim(0)
            row["rss_trimmed_mb"] = round(status_mb("VmRSS"), 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if r == args.warm and args.diff:
            snap0 = tracemalloc.take_snapshot()
    elapsed = time.monotonic() - t_start
    stop_reader.set()
    if args.reader:
        reader_thread.join()
    after = rows[args.warm - 1:] if args.warm <= len(rows) else rows
    summary: dict[str, object] = {
        "arm": arm, "repo": str(args.repo), "embedder": args.embedder, "items": args.items, "churn": args.churn,
        "rounds": args.rounds, "warm": args.warm, "seconds": round(elapsed, 1),
        "rss_per_round_mb": round(slope([x["rss_mb"] for x in after]), 2),
        "anon_per_round_mb": round(slope([x["anon_mb"] for x in after]), 2),
        "py_heap_per_round_mb": round(slope([x["py_heap_mb"] for x in after]), 3),
        "chroma_rss_per_round_mb": round(slope([x["chroma_rss_mb"] for x in after]), 2),
    }
    if args.reader:
        summary["read_max_ms_per_round"] = [x.get("read_max_ms") for x in rows]
    if args.trim:
        summary["rss_trimmed_per_round_mb"] = round(slope([x["rss_trimmed_mb"] for x in after]), 2)
    print("SUMMARY " + json.dumps(summary), flush=True)
    if snap0 is not None:
        filters = [tracemalloc.Filter(False, tracemalloc.__file__)]
        diff = tracemalloc.take_snapshot().filter_traces(filters).compare_to(snap0.filter_traces(filters), "traceback")
        grown = sum(d.size_diff for d in diff)
        print(f"python heap growth after round {args.warm}: {grown / 1e3:.1f} kB; top sites:")
        for d in diff[: args.top]:
            where = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in d.traceback)
            print(f"  {d.size_diff / 1e3:+9.1f} kB {d.count_diff:+6d} objs  {where}")
    st.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", type=Path, default=HERE.parent, help="checkout whose store is measured")
    ap.add_argument("--python", help="its interpreter (default: <repo>/.venv/bin/python)")
    ap.add_argument("--arms", default="churn,compact", help="comma-separated: churn, compact, norestart")
    ap.add_argument("--items", type=int, default=1000)
    ap.add_argument("--churn", type=int, default=100, help="records deleted and added per round (multiple of 50)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--warm", type=int, default=3, help="rounds before the slope and the heap diff start")
    ap.add_argument("--embedder", choices=("hash", "minilm"), default="hash")
    ap.add_argument("--trim", action="store_true", help="also RSS after malloc_trim(0), every round")
    ap.add_argument("--reader", action="store_true",
                    help="a thread reads one user's items every 20 ms; per round: read latency p50/p99/max")
    ap.add_argument("--diff", action="store_true", help="print the tracemalloc snapshot diff (slow)")
    ap.add_argument("--frames", type=int, default=6, help="tracemalloc frames per allocation")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--_arm", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.repo = args.repo.resolve()
    if args._arm:
        run_arm(args)
        return
    python = args.python or str(args.repo / ".venv" / "bin" / "python")
    with open("/proc/loadavg") as fh:
        print(f"{time.strftime('%H:%M:%S', time.gmtime())} UTC, load {fh.read().split()[:3]}, repo {args.repo}",
              flush=True)
    for arm in args.arms.split(","):
        cmd = [python, __file__, "--_arm", arm, "--repo", str(args.repo), "--items", str(args.items),
               "--churn", str(args.churn), "--rounds", str(args.rounds), "--warm", str(args.warm),
               "--embedder", args.embedder, "--frames", str(args.frames), "--top", str(args.top)]
        cmd += ["--diff"] * args.diff
        cmd += ["--trim"] * args.trim + ["--reader"] * args.reader
        subprocess.run(cmd, check=True, cwd="/tmp", env={**os.environ, "PYTHONPATH": str(args.repo)})


if __name__ == "__main__":
    main()
