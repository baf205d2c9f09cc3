"""One owner per store directory, and ``chroma run`` as a child process for servers.

Chroma's in-process client (``PersistentClient``) holds the Python GIL for the whole of
every call: a 50-vector upsert stops an asyncio server's event loop for tens of
milliseconds, a bulk upsert for seconds (the reason ``/healthz`` once took 10 s under
write load). A server therefore runs the directory's Chroma as ``chroma run`` in a child
process (:class:`LocalChromaServer`, used by :meth:`store.chroma.ChromaStore.local_server`)
and talks to it over loopback HTTP, which releases the GIL while it waits.

Two processes must never open one Chroma directory directly (SQLite and the HNSW files
would be written by two writers). The owner of a directory holds an exclusive ``flock``
on ``<dir>/synth_agent.lock`` for as long as it uses it; a server also records its port
in ``<dir>/synth_agent_server.json`` so that other synth-agent processes (the CLI, a
worker) connect through it instead of opening the files. The child ends with its parent
(``PR_SET_PDEATHSIG``); a child orphaned anyway is stopped by the next owner before it
starts its own.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import IO, Any

LOCK_FILE = "synth_agent.lock"
STATE_FILE = "synth_agent_server.json"
LOG_FILE = "chroma-server.log"


class StoreBusyError(RuntimeError):
    """Another process owns this store directory (and serves no Chroma server to connect through)."""


class DirectoryLock:
    """Exclusive, process-wide ownership of a store directory (shared by every store of this process)."""

    _held: dict[str, tuple[IO[bytes], int]] = {}
    served: dict[str, tuple[str, int]] = {}
    """Directories this process serves with a child Chroma server: stores opened here connect to it."""
    _guard = threading.Lock()

    def __init__(self, path: Path) -> None:
        self.key = str(path.resolve())
        self._released = False
        self.first = True

    @classmethod
    def acquire(cls, path: Path) -> DirectoryLock | None:
        """The lock, or None when another process holds it (``first``: not yet held by this process)."""
        lock = cls(path)
        with cls._guard:
            held = cls._held.get(lock.key)
            if held is not None:
                cls._held[lock.key] = (held[0], held[1] + 1)
                lock.first = False
                return lock
            fh = open(path / LOCK_FILE, "ab")  # noqa: SIM115 - kept open while the lock is held
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.close()
                return None
            cls._held[lock.key] = (fh, 1)
        return lock

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        with self._guard:
            fh, n = self._held[self.key]
            if n > 1:
                self._held[self.key] = (fh, n - 1)
                return
            del self._held[self.key]
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
            fh.close()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _heartbeat(host: str, port: int, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/api/v2/heartbeat", timeout=timeout) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def running_server(path: Path) -> tuple[str, int] | None:
    """``(host, port)`` of the live synth-agent Chroma server of ``path``, if there is one."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
        host, port, pid = str(state["host"]), int(state["port"]), int(state["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not _pid_alive(pid) or not _heartbeat(host, port):
        return None
    return host, port


def recorded_pid(path: Path) -> int | None:
    """The pid of the Chroma child recorded in ``path``'s state file (alive or not), if one is recorded."""
    try:
        return int(json.loads((path / STATE_FILE).read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _stop_orphan(path: Path) -> None:
    """A server recorded in the state file whose owner is gone (we hold the lock now): stop it."""
    pid = recorded_pid(path)
    if pid is None:
        return
    if _pid_alive(pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            cmdline = b""
        if b"chroma" in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(OSError):
        (path / STATE_FILE).unlink()


def attach_or_lock(path: Path, *, wait: float = 5.0) -> tuple[tuple[str, int] | None, DirectoryLock | None]:
    """Either the address of the server that owns ``path`` (connect to it), or the lock (open the files).

    Waits up to ``wait`` seconds for a server that is still starting.
    """
    deadline = time.monotonic() + wait
    while True:
        served = DirectoryLock.served.get(str(path.resolve()))
        if served is not None:
            return served, None
        lock = DirectoryLock.acquire(path)
        if lock is not None:
            if lock.first:
                _stop_orphan(path)
            return None, lock
        running = running_server(path)
        if running is not None:
            return running, None
        if time.monotonic() > deadline:
            raise StoreBusyError(
                f"another process is using the store in {path} and serves no Chroma server to connect through; "
                "stop it, or point CHROMA_HOST/CHROMA_PORT at a shared Chroma server"
            )
        time.sleep(0.2)


def chroma_cli() -> str:
    local = Path(sys.executable).parent / "chroma"
    found = str(local) if local.exists() else shutil.which("chroma")
    if not found:
        raise RuntimeError("the 'chroma' command (installed with chromadb) was not found next to Python or on PATH")
    return found


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _parent_death_preexec() -> Any:
    """Linux: the child gets SIGTERM when the thread that started it (here: this process) dies."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    prctl = libc.prctl

    def preexec() -> None:
        prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG

    return preexec


CHILD_MALLOC_ARENAS = "2"


def child_env() -> dict[str, str]:
    """The environment of ``chroma run``: ours, with telemetry off, Chroma's log kept to warnings, 2 malloc arenas.

    At its default level Chroma logs every request at INFO (about 2 kB per call: 2.7 MB a minute
    into ``chroma-server.log`` at 15 requests/s, unbounded on disk). Its many Tokio threads each
    get a glibc malloc arena of their own by default (up to 8 per core), which holds freed memory
    apart: with ``MALLOC_ARENA_MAX=2`` its RSS slope in the 10-minute soak fell from 3.0 to
    2.0 MB/min and its end RSS by 16 MB (docs/store.md, "Memory over time"). ``RUST_LOG`` and
    ``MALLOC_ARENA_MAX`` set in our environment are passed on as they are.
    """
    return {
        **os.environ,
        "ANONYMIZED_TELEMETRY": "False",
        "RUST_LOG": os.environ.get("RUST_LOG") or "warn",
        "MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX") or CHILD_MALLOC_ARENAS,
    }


_SPARE = """\
import ctypes, json, sys
try:  # PR_SET_NAME: named `chroma` (ps, top, /proc/<pid>/status) like the command it stands for
    ctypes.CDLL(None).prctl(15, b"chroma", 0, 0, 0)
except (OSError, AttributeError):
    pass
from chromadb.cli.cli import app  # the `chroma` command's entry point (chromadb's console script)
line = sys.stdin.readline()  # the arguments of `chroma run`, once the old server has ended
if not line.strip():
    sys.exit(0)  # not needed after all (the compaction failed, or we are stopping)
sys.argv = ["chroma", *json.loads(line)]
sys.exit(app())
"""
"""A ``chroma`` command that imports chromadb first and starts the server when told (:meth:`LocalChromaServer.prepare_restart`)."""


class LocalChromaServer:
    """``chroma run --path <dir>`` on a free loopback port, owned by this process."""

    def __init__(self, path: Path, *, host: str = "127.0.0.1", startup_timeout: float = 120.0) -> None:
        self.path = Path(path)
        self.host = host
        self.port = 0
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.attached = False
        self.restarting = False
        self._lock: DirectoryLock | None = None
        self._spare: subprocess.Popen[bytes] | None = None

    def start(self) -> LocalChromaServer:
        """Start the server, or attach to the one another synth-agent process runs for this directory."""
        self.path.mkdir(parents=True, exist_ok=True)
        running, lock = attach_or_lock(self.path, wait=self.startup_timeout)
        if running is not None:
            self.host, self.port = running
            self.attached = True
            return self
        assert lock is not None
        if not lock.first:
            lock.release()
            raise StoreBusyError(
                f"this process already has the store in {self.path} open in-process; close it before serving it"
            )
        self._lock = lock
        try:
            self._spawn()
            DirectoryLock.served[str(self.path.resolve())] = (self.host, self.port)
        except BaseException:
            self.stop()
            raise
        return self

    def prepare_restart(self) -> None:
        """Start the interpreter of the next child now; :meth:`restart` then only starts its server.

        Why: ``chroma run`` spends ~2 s importing chromadb before its server opens the directory,
        and reads wait while the server restarts. The spare imports it while the old server still
        answers (a compaction's copy) and touches nothing in the directory until :meth:`restart`
        tells it to start, after the old server has ended. Only when ``chroma`` is the console script
        next to this interpreter (else :meth:`restart` starts ``chroma run`` as before).
        """
        if self.attached or self.proc is None or self._spare is not None:
            return
        if not (Path(sys.executable).parent / "chroma").exists():
            return
        self._spare = self._popen([sys.executable, "-c", _SPARE], stdin=subprocess.PIPE)

    def discard_spare(self) -> None:
        """End the spare of :meth:`prepare_restart` unused (it has not touched the directory yet)."""
        spare, self._spare = self._spare, None
        if spare is None:
            return
        with contextlib.suppress(OSError):
            assert spare.stdin is not None
            spare.stdin.close()
        spare.terminate()
        try:
            spare.wait(timeout=15)
        except subprocess.TimeoutExpired:
            spare.kill()
            spare.wait(timeout=10)

    def restart(self) -> None:
        """Stop the child and start a new one on the same port if it is free (else another).

        Why: chromadb 1.5.9 keeps the index of a deleted collection in memory until its process
        ends; after a compaction (``ChromaStore.compact``) a fresh process loads only the live one.
        The new one is the spare of :meth:`prepare_restart` when there is one.
        """
        if self.attached or self.proc is None:
            raise RuntimeError("only the process that started the Chroma server can restart it")
        self.restarting = True
        try:
            self._end_child()
            self._spawn(port=self.port)
            DirectoryLock.served[str(self.path.resolve())] = (self.host, self.port)
        finally:
            self.restarting = False
            self.discard_spare()

    def _start_child(self) -> subprocess.Popen[bytes]:
        """``chroma run`` on ``self.port``: the prepared spare if it is still alive, else a new process."""
        args = ["run", "--path", str(self.path), "--host", self.host, "--port", str(self.port)]
        spare, self._spare = self._spare, None
        if spare is not None and spare.poll() is None:
            try:
                assert spare.stdin is not None
                spare.stdin.write(json.dumps(args).encode() + b"\n")
                spare.stdin.close()
                return spare
            except OSError:  # it died meanwhile: start one the usual way
                spare.kill()
                spare.wait(timeout=10)
        return self._popen([chroma_cli(), *args], stdin=subprocess.DEVNULL)

    def _popen(self, argv: list[str], *, stdin: int) -> subprocess.Popen[bytes]:
        """A child of this process with the Chroma log as its output, ended if this process dies."""
        log = open(self.path / LOG_FILE, "ab")  # noqa: SIM115 - handed to the child
        try:
            return subprocess.Popen(
                argv,
                stdin=stdin,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_parent_death_preexec(),  # noqa: PLW1509 - only sets the death signal
                env=child_env(),
            )
        finally:
            log.close()

    def _spawn(self, port: int | None = None) -> None:
        deadline = time.monotonic() + self.startup_timeout
        for attempt in range(5):
            self.port = port if port is not None and attempt < 2 else _free_port(self.host)
            self.proc = self._start_child()
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break  # port taken under our feet, or a real failure: retry, then report
                if _heartbeat(self.host, self.port, timeout=1.0):
                    state = {"host": self.host, "port": self.port, "pid": self.proc.pid, "owner": os.getpid()}
                    tmp = self.path / (STATE_FILE + ".tmp")
                    tmp.write_text(json.dumps(state))
                    tmp.replace(self.path / STATE_FILE)
                    return
                time.sleep(0.1)
            else:
                raise RuntimeError(f"the Chroma server for {self.path} gave no heartbeat in {self.startup_timeout:.0f}s")
        tail = (self.path / LOG_FILE).read_text(errors="replace")[-2000:]
        raise RuntimeError(f"the Chroma server for {self.path} exited with {self.proc.returncode if self.proc else '?'}:\n{tail}")

    def _end_child(self) -> None:
        """Terminate the child (SIGTERM, 15 s to exit, then SIGKILL) and reap it."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def alive(self) -> bool:
        if self.attached or self.restarting:
            return True
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        self.discard_spare()
        if not self.attached:
            DirectoryLock.served.pop(str(self.path.resolve()), None)
        if self.proc is not None:
            self._end_child()
            self.proc = None
            with contextlib.suppress(OSError):
                (self.path / STATE_FILE).unlink()
        if self._lock is not None:
            self._lock.release()
            self._lock = None


__all__ = [
    "DirectoryLock", "LocalChromaServer", "StoreBusyError", "attach_or_lock", "child_env", "chroma_cli", "recorded_pid", "running_server",
]
