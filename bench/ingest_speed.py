"""``synth-agent ingest`` throughput with embeddings on, as a user runs it: votes per second.

Each run is a fresh process on a fresh store home ingesting the same simulated JSONL file
(``--users`` × ``--votes``), so the figure includes start-up, opening the embedded Chroma store,
loading the embedding model and embedding every vote. Reported: the median wall time over
``--runs`` and votes/s computed from it, plus the command's own work without start-up (the same
file ingested a second time into the now-warm store is all duplicates: its wall time is
start-up + reading, which the first figure minus it isolates as store + embedding time).

With ``--baseline DIR`` the same file is ingested by another checkout (``DIR/.venv/bin/synth-agent``,
e.g. ``/work/baseline``, whose embeddings ran on torch) in alternating order, run by run.

    .venv/bin/python bench/ingest_speed.py [--users 20] [--votes 15] [--runs 3] [--baseline /work/baseline]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent


def timed(exe: Path, argv: list[str], env: dict[str, str], cwd: Path) -> float:
    start = time.perf_counter()
    r = subprocess.run([str(exe), *argv], env=env, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if r.returncode != 0:
        raise SystemExit(f"`{exe} {' '.join(argv)}` failed ({r.returncode}):\n{r.stderr[-2000:]}")
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=20)
    ap.add_argument("--votes", type=int, default=15)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--baseline", type=Path, default=None, help="another checkout with its own .venv")
    args = ap.parse_args()
    trees = [("new", HERE)] + ([("old", args.baseline.resolve())] if args.baseline else [])
    for _, tree in trees:
        if not (tree / ".venv" / "bin" / "synth-agent").exists():
            raise SystemExit(f"{tree}/.venv/bin/synth-agent not found: run `make venv` there")
    with tempfile.TemporaryDirectory(prefix="ingest-bench-") as tmp:
        work = Path(tmp)
        sys.path.insert(0, str(HERE))
        from synth_agent.sim.population import Population, vote_to_json

        pop = Population(args.users, seed=0)
        votes_file = work / "votes.jsonl"
        n = 0
        with votes_file.open("w") as f:
            for uid in pop.user_ids:
                for v in pop.votes(uid, args.votes):
                    f.write(json.dumps(vote_to_json(v)) + "\n")
                    n += 1
        base_env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "SYNTH_AGENT_", "CHROMA_"))}
        first: dict[str, list[float]] = {name: [] for name, _ in trees}
        again: dict[str, list[float]] = {name: [] for name, _ in trees}
        for i in range(args.runs):
            for name, tree in (trees if i % 2 == 0 else trees[::-1]):
                home = work / f"{name}-{i}"
                env = {**base_env, "SYNTH_AGENT_HOME": str(home)}
                exe = tree / ".venv" / "bin" / "synth-agent"
                first[name].append(timed(exe, ["ingest", str(votes_file)], env, work))
                again[name].append(timed(exe, ["ingest", str(votes_file)], env, work))
                print(f"run {i + 1} {name}: first ingest {first[name][-1]:.2f}s, re-ingest (all duplicates) "
                      f"{again[name][-1]:.2f}s", file=sys.stderr, flush=True)
        print(f"ingest of {n} votes ({args.users} users × {args.votes}), embeddings on, fresh store per run; "
              f"median of {args.runs}")
        print(f"{'tree':<6}{'wall':>8}{'votes/s':>9}{'re-ingest':>11}{'store+embed':>13}{'votes/s (work)':>16}")
        for name, _ in trees:
            w, w2 = statistics.median(first[name]), statistics.median(again[name])
            work_s = max(w - w2, 1e-9)
            print(f"{name:<6}{w:>7.2f}s{n / w:>9.0f}{w2:>10.2f}s{work_s:>12.2f}s{n / work_s:>16.0f}")


if __name__ == "__main__":
    main()
