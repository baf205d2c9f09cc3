"""Start-up time of ``synth-agent`` commands: wall and CPU per command, median of several runs.

Each command runs as a fresh process, the way a user types it, against a store home that
this script fills first (a simulated population ingested, one user fitted). With
``--baseline DIR`` the same commands of another checkout (``DIR/.venv/bin/synth-agent``,
e.g. ``/work/baseline``) run too, alternating with this tree's run by run (A B A B ...), each
tree on a home of its own, so a drifting machine load hits both alike; the ratio is taken
per pair.

Groups: *key-only* commands never open the store or an endpoint (help, argument errors);
*store* commands read or change the local store (``votes``, ``persona``, ``export-prompt``,
``forget``) with no server running, so they open it in their own process; *served* runs the same
commands while a ``synth-agent serve`` (started here for each tree, stopped at the end) owns the
home: this tree's CLI then asks it over its API (synth_agent.local_service), an older tree's
connects to its Chroma child; *floor* rows are not commands but what any in-process store command must pay
whatever this project does: the tree's Python importing ``chromadb`` (and LangGraph's
``BaseStore``, which ``ChromaStore`` implements: the read commands no longer import it, they read
through ``store.reader``), measured the same way. CPU is the child's user +
system time (``os.wait4``), which a loaded machine inflates less than wall time.

    .venv/bin/python bench/startup.py [--runs 7] [--baseline /work/baseline] [--only store] [--only served] [--no-bytecode-cache]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
USER = "bench-user@example.com"


PYTHON = "python"
"""A command whose argv starts with this runs the tree's ``.venv/bin/python`` instead of ``synth-agent``."""


def commands() -> list[tuple[str, str, list[str]]]:
    """(group, label, argv) of every measured command."""
    return [
        ("floor", "python: import chromadb", [PYTHON, "-c", "import chromadb"]),
        ("floor", "... + langgraph BaseStore", [PYTHON, "-c", "import chromadb, langgraph.store.base"]),
        ("key-only", "--help", ["--help"]),
        ("key-only", "votes --help", ["votes", "--help"]),
        ("key-only", "invalid user id (exit 2)", ["votes", "--user", " padded "]),
        ("key-only", "rerank, one candidate (exit 2)", ["rerank", "--user", USER, "--prompt", "p", "-c", "a"]),
        ("store", "votes --user U", ["votes", "--user", USER]),
        ("store", "persona --user U", ["persona", "--user", USER]),
        ("store", "export-prompt --user U", ["export-prompt", "--user", USER]),
        ("store", "forget --user X --yes", ["forget", "--user", "nobody@example.com", "--yes"]),
        ("served", "votes --user U", ["votes", "--user", USER]),
        ("served", "persona --user U", ["persona", "--user", USER]),
        ("served", "export-prompt --user U", ["export-prompt", "--user", USER]),
        ("served", "forget --user X --yes", ["forget", "--user", "nobody@example.com", "--yes"]),
    ]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_serve(exe: Path, env: dict[str, str], work: Path, name: str) -> subprocess.Popen[bytes]:
    """``synth-agent serve`` over the tree's home (API key, no background synthesis), once it is healthy."""
    import urllib.request

    port = free_port()
    log = open(work / f"serve-{name}.log", "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen([str(exe), "serve", "--port", str(port), "--synthesis", "off", "--log-level", "warning"],
                            env={**env, "SYNTH_AGENT_API_KEYS": "bench:sk-bench"}, cwd=work, stdin=subprocess.DEVNULL,
                            stdout=log, stderr=subprocess.STDOUT)
    log.close()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{name}: serve exited with {proc.returncode}: see {work / f'serve-{name}.log'}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                if r.status == 200:
                    time.sleep(1.0)  # let the start-up work (model warm-up, first poll) settle
                    return proc
        except OSError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"{name}: serve did not become healthy")


def stop_serve(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


def run_once(exe: Path, argv: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float, int]:
    """(wall s, CPU s, exit code) of one run."""
    if argv[:1] == [PYTHON]:
        exe, argv = exe.parent / "python", argv[1:]
    start = time.perf_counter()
    proc = subprocess.Popen([str(exe), *argv], env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return wall, usage.ru_utime + usage.ru_stime, proc.returncode


def prepare(tree: Path, work: Path, name: str, votes_file: Path, bytecode: bool) -> tuple[Path, dict[str, str]]:
    """A home with the population's votes and a fitted bench user, made by ``tree``'s own CLI.

    ``bytecode``: the children may write and read compiled bytecode, as on a user's machine (a
    wheel install compiles at install time; an editable one on first run). It goes to a cache
    of this run's own (``PYTHONPYCACHEPREFIX``), so no tree is written to; the set-up commands
    and the warm-up run fill it. Without it, with ``PYTHONDONTWRITEBYTECODE`` set (as in some
    sandboxes), every run compiles the tree's own modules again.
    """
    exe = tree / ".venv" / "bin" / "synth-agent"
    if not exe.exists():
        raise SystemExit(f"{exe} not found: run `make venv` in {tree}")
    home = work / name
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "SYNTH_AGENT_", "CHROMA_"))}
    env["SYNTH_AGENT_HOME"] = str(home)
    if bytecode:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(work / f"pycache-{name}")
    for argv in (["ingest", str(votes_file)], ["fit", "--user", USER]):
        r = subprocess.run([str(exe), *argv], env=env, cwd=home, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"{name}: `synth-agent {' '.join(argv)}` failed ({r.returncode}):\n{r.stderr[-2000:]}")
    return exe, env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=7, help="measured runs per command (after one warm-up run)")
    ap.add_argument("--baseline", type=Path, default=None, help="another checkout with its own .venv")
    ap.add_argument("--only", action="append", choices=["floor", "key-only", "store", "served"],
                    help="measure only this group (repeatable; default: all)")
    ap.add_argument("--no-bytecode-cache", dest="bytecode", action="store_false",
                    help="keep PYTHONDONTWRITEBYTECODE as set (every run then compiles what has no cached bytecode)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="startup-bench-") as tmp:
        work = Path(tmp)
        votes_file = work / "votes.jsonl"
        sys.path.insert(0, str(HERE))
        from synth_agent.sim.population import Population, vote_to_json

        pop = Population(4, seed=0)
        import json

        with votes_file.open("w") as f:
            for i, uid in enumerate(pop.user_ids):
                for v in pop.votes(uid, 12):
                    f.write(json.dumps({**vote_to_json(v), "user_id": USER if i == 0 else uid}) + "\n")
        trees = [("new", HERE)] + ([("old", args.baseline.resolve())] if args.baseline else [])
        setups = {name: prepare(tree, work, name, votes_file, args.bytecode) for name, tree in trees}
        mode = ("bytecode cached (PYTHONPYCACHEPREFIX in the run's temp dir)" if args.bytecode else
                "PYTHONDONTWRITEBYTECODE=" + os.environ.get("PYTHONDONTWRITEBYTECODE", "unset"))
        print(f"{len(trees)} tree(s): " + ", ".join(f"{n} = {t}" for n, t in trees)
              + f"; median of {args.runs} runs (after 1 warm-up); {mode}")
        head = f"{'group':<9} {'command':<34}{'new wall':>9}{'new CPU':>9}"
        if args.baseline:
            head += f"{'old wall':>10}{'old CPU':>9}{'new/old wall':>14}"
        print(head + "  exit")
        if shutil.which("uptime"):  # the load while measuring (set-up done), and again at the end
            print("load:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), flush=True)
        servers: dict[str, subprocess.Popen[bytes]] = {}
        try:
            for group, label, argv in commands():
                if args.only and group not in args.only:
                    continue
                if group == "served" and not servers:
                    print("served: the same store commands while `synth-agent serve` owns each tree's home", flush=True)
                    for name, _ in trees:
                        exe, env = setups[name]
                        servers[name] = start_serve(exe, env, work, name)
                measure(group, label, argv, args, trees, setups, work)
        finally:
            for proc in servers.values():
                stop_serve(proc)
        if shutil.which("uptime"):
            print("load:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


def measure(group: str, label: str, argv: list[str], args: argparse.Namespace, trees: list[tuple[str, Path]],
            setups: dict[str, tuple[Path, dict[str, str]]], work: Path) -> None:
    """One row: the command's median wall and CPU per tree, alternating the trees run by run."""
    res: dict[str, list[tuple[float, float, int]]] = {name: [] for name, _ in trees}
    for i in range(args.runs + 1):
        order = trees if i % 2 == 0 else trees[::-1]
        for name, _ in order:
            exe, env = setups[name]
            r = run_once(exe, argv, env, work)
            if i > 0:
                res[name].append(r)
    new = res["new"]
    line = (f"{group:<9} {label:<34}{statistics.median(w for w, _, _ in new):>8.2f}s"
            f"{statistics.median(c for _, c, _ in new):>8.2f}s")
    codes = {c for _, _, c in new}
    if args.baseline:
        old = res["old"]
        ratio = statistics.median(a[0] / b[0] for a, b in zip(new, old, strict=True))
        line += (f"{statistics.median(w for w, _, _ in old):>9.2f}s{statistics.median(c for _, c, _ in old):>8.2f}s"
                 f"{ratio:>14.2f}")
        codes |= {c for _, _, c in old}
    print(line + f"  {','.join(map(str, sorted(codes)))}", flush=True)


if __name__ == "__main__":
    main()
