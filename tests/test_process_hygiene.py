"""Every process a command starts ends with it: `synth-agent serve` (which starts the offline simulator
as a child) is stopped with SIGTERM, Ctrl-C (SIGINT) and SIGKILL, and no process of its is left."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from synth_agent.lifecycle import PARENT_ENV, child_env, watch_parent_from_env

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = raw.rsplit(")", 1)[1].split()  # the command name may hold spaces and parentheses
    return fields[0], int(fields[1])


def alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def descendants(pid: int) -> set[int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))) is not None:
            parents[int(entry)] = st[1]
    out: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier and p not in out}
        out |= frontier
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(cond, timeout: float, step: float = 0.1) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return cond()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=["SIGTERM", "SIGINT", "SIGKILL"])
def test_serve_leaves_no_process_behind(tmp_path: Path, sig: signal.Signals) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "SYNTH_AGENT_"))}
    env["SYNTH_AGENT_HOME"] = str(tmp_path / "home")
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "synth_agent.cli", "serve", "--simulator", "--no-auth", "--synthesis", "off",
         "--port", str(port), "--log-level", "warning"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        def up() -> bool:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        assert wait_until(up, 180, 0.25), (tmp_path / "serve.log").read_text()
        started = descendants(proc.pid)
        text = (tmp_path / "serve.log").read_text()
        sim = re.search(r"offline simulator at (http://\S+/v1) \(pid (\d+)\)", text)
        assert sim and int(sim.group(2)) in started, text  # the simulator is serve's child ...
        assert httpx.get(sim.group(1).removesuffix("/v1") + "/healthz", timeout=5).status_code == 200  # ... and up

        os.kill(proc.pid, sig)
        code = proc.wait(timeout=60)
        if sig == signal.SIGTERM:
            assert code == 143, text
        elif sig == signal.SIGINT:
            assert code in (0, 130), text  # Ctrl-C is how a server is stopped: uvicorn exits cleanly
        # graceful stops have stopped the child before exiting; after SIGKILL the child notices within seconds
        assert wait_until(lambda: not any(alive(p) for p in started), 30), [p for p in started if alive(p)]
    finally:
        for p in [proc.pid, *descendants(proc.pid)]:
            if alive(p):
                os.kill(p, signal.SIGKILL)
        proc.wait(timeout=10)
        log.close()


def test_a_watched_child_exits_when_its_parent_dies(tmp_path: Path) -> None:
    """The mechanism on its own: a grandchild started with child_env() outlives its parent by < a few seconds."""
    script = tmp_path / "parent.py"
    script.write_text(
        "import subprocess, sys, time\n"
        "from synth_agent.lifecycle import child_env\n"
        "child = subprocess.Popen([sys.executable, '-c', "
        "'from synth_agent.lifecycle import watch_parent_from_env; import time; "
        "assert watch_parent_from_env(interval=0.1); time.sleep(120)'], env=child_env())\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert alive(child)
        parent.kill()
        parent.wait(timeout=10)
        assert wait_until(lambda: not alive(child), 10)
    finally:
        for p in descendants(parent.pid) | {parent.pid}:
            if alive(p):
                os.kill(p, signal.SIGKILL)


def test_child_env_is_consumed_by_the_child(monkeypatch: pytest.MonkeyPatch) -> None:
    env = child_env({})
    assert env[PARENT_ENV] == f"{os.getpid()}:main"
    monkeypatch.setenv(PARENT_ENV, f"{os.getppid()}:thread")  # "our parent" is pytest's parent: alive
    assert watch_parent_from_env(on_orphaned=lambda: pytest.fail("the parent is alive"))
    assert PARENT_ENV not in os.environ  # grandchildren are not confused by it
    assert watch_parent_from_env() is False
