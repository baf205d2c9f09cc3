"""Fresh-clone install: wall time of ``make venv`` and the size of the ``.venv`` it builds.

Clones a commit of this repository into a temporary directory (as a new user would clone it),
runs ``make venv`` there, and reports the wall time, the virtualenv's size on disk, its number
of installed distributions and whether torch is among them. ``--commit`` may be given several
times (e.g. the starting commit and ``HEAD``); they are measured one after the other, in the
order given, with pip's wheel cache as this machine has it (no network downloads: what a second
install on a developer machine or a CI runner with a warm cache sees).

    .venv/bin/python bench/install_size.py --commit 18b3792 --commit HEAD
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent


def du(path: Path) -> int:
    """Bytes on disk under ``path`` (like ``du -s``, symlinks not followed)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_blocks * 512
            except OSError:
                pass
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--commit", action="append", default=None, help="commit to clone (repeatable; default HEAD)")
    args = ap.parse_args()
    commits = args.commit or ["HEAD"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="install-bench-") as tmp:
        for i, commit in enumerate(commits):
            sha = subprocess.run(["git", "rev-parse", "--short", commit], cwd=HERE, capture_output=True, text=True,
                                 check=True).stdout.strip()
            dest = Path(tmp) / f"clone{i}"
            subprocess.run(["git", "clone", "-q", "--no-checkout", str(HERE), str(dest)], check=True)
            subprocess.run(["git", "checkout", "-q", sha], cwd=dest, check=True)
            env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
            start = time.perf_counter()
            r = subprocess.run(["make", "venv"], cwd=dest, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - start
            if r.returncode != 0:
                raise SystemExit(f"make venv failed at {sha}:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
            freeze = subprocess.run([str(dest / ".venv/bin/python"), "-m", "pip", "list", "--format=freeze"],
                                    capture_output=True, text=True, check=True).stdout.splitlines()
            torch = [ln for ln in freeze if ln.lower().startswith(("torch==", "nvidia-", "sentence-transformers=="))]
            rows.append((sha, wall, du(dest / ".venv"), len(freeze), ", ".join(torch) or "none"))
            print(f"{sha}: make venv {wall:.0f}s, .venv {du(dest / '.venv') / 2**30:.2f} GiB", flush=True)
    print(f"{'commit':<10}{'make venv':>11}{'.venv size':>12}{'packages':>10}  torch / CUDA / sentence-transformers")
    for sha, wall, size, n, torch in rows:
        print(f"{sha:<10}{wall:>10.0f}s{size / 2**30:>10.2f} GiB{n:>10}  {torch}")


if __name__ == "__main__":
    main()
