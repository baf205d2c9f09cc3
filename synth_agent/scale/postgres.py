"""A local PostgreSQL server for tests, development and single-machine deployments.

The scale-out mode needs a Postgres (job queue, synthesis checkpoints, persona version
counters). In production that is whatever Postgres you run; for tests and local runs
this module starts a real one from pinned pip packages, the way a user would start
``postgres`` by hand: ``initdb`` once, then the ``postgres`` server on a loopback TCP
port, as a child process that ends with its parent.

Binaries, first found wins: ``SYNTH_AGENT_PG_BIN`` (a directory holding ``initdb`` and
``postgres``); the PostgreSQL 16 build inside the ``pgserver`` wheel (``pip install
'synth-agent[scale]'``; pinned in requirements.lock, so ``make venv`` has it); ``pg_config
--bindir``; Debian's ``/usr/lib/postgresql/<n>/bin``. We use only pgserver's binaries,
not its Python launcher (that one listens on a Unix socket only and changes permissions of
every parent directory when run as root).

PostgreSQL refuses to run as root. When this process is root (containers, CI), the server
runs as the unprivileged user ``nobody`` (``SYNTH_AGENT_PG_USER`` to choose another); the
data directory is handed to that user and its parent directories must be traversable by it.

CLI: ``synth-agent postgres --data DIR --port 5432`` runs one in the foreground and prints
the DSN to give ``serve`` and ``worker`` (``SYNTH_AGENT_QUEUE``).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["ERASURE_SETTINGS", "LocalPostgres", "PostgresNotFound", "find_pg_bin"]

ERASURE_SETTINGS = {
    "wal_recycle": "off",  # a WAL segment past the redo point is unlinked, not renamed for reuse with its contents
    "wal_keep_size": "0",  # ... and none is kept back for standbys (there are none here)
    "archive_mode": "off",  # no copy of a segment outside pg_wal
    "log_error_verbosity": "terse",  # no DETAIL lines: a unique violation's DETAIL prints the key (a user's lock)
    "log_min_error_statement": "panic",  # failing statements are not copied into the log
}
"""Server settings under which a forget's :func:`~synth_agent.scale.erasure.purge` leaves no bytes of the
user in PGDATA or the server log (docs/deploy.md: what to set on a Postgres you run yourself)."""


class PostgresNotFound(RuntimeError):
    """No PostgreSQL binaries were found (the message says how to get them)."""


def find_pg_bin() -> Path:
    """The directory holding ``initdb`` and ``postgres`` (see the module docstring for the order)."""
    candidates: list[Path] = []
    if os.environ.get("SYNTH_AGENT_PG_BIN"):
        candidates.append(Path(os.environ["SYNTH_AGENT_PG_BIN"]))
    spec = importlib.util.find_spec("pgserver")  # located, not imported: its import has side effects
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / "pginstall" / "bin" for p in spec.submodule_search_locations]
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True)
            candidates.append(Path(out.stdout.strip()))
        except (OSError, subprocess.SubprocessError):
            pass
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    for c in candidates:
        if (c / "initdb").is_file() and (c / "postgres").is_file():
            return c
    raise PostgresNotFound(
        "no PostgreSQL binaries found: pip install 'synth-agent[scale]' (bundles PostgreSQL 16 via pgserver), "
        "install Debian's postgresql, or set SYNTH_AGENT_PG_BIN to a directory with initdb and postgres"
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _run_as() -> tuple[int, int] | None:
    """(uid, gid) to drop to when we are root, else None."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None
    name = os.environ.get("SYNTH_AGENT_PG_USER", "nobody")
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise RuntimeError(
            f"PostgreSQL cannot run as root and the user {name!r} does not exist: "
            "set SYNTH_AGENT_PG_USER to an unprivileged user"
        ) from None
    return pw.pw_uid, pw.pw_gid


def _preexec(ids: tuple[int, int] | None) -> Any:
    """Drop privileges (as root) and ask for SIGINT (fast shutdown) when our thread dies."""
    from synth_agent.lifecycle import parent_death_preexec

    pdeath = parent_death_preexec()
    if ids is None and pdeath is None:
        return None
    if pdeath is not None:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl

    def preexec() -> None:
        if ids is not None:
            os.setgroups([])
            os.setgid(ids[1])
            os.setuid(ids[0])
        if pdeath is not None:  # after setuid: a credential change clears the parent-death signal
            prctl(1, int(signal.SIGINT), 0, 0, 0)

    return preexec


class LocalPostgres:
    """``initdb`` (once) + ``postgres`` on ``host:port`` as a child process.

    >>> with LocalPostgres("/tmp/pg-data") as pg:       # doctest: +SKIP
    ...     print(pg.dsn)                               # postgresql://postgres@127.0.0.1:5xxxx/postgres

    ``port=0`` picks a free port. Authentication is ``trust`` on loopback only (the server
    listens on ``host`` and nowhere else): fine for tests and one machine; a shared
    deployment uses a managed Postgres with passwords (docs/deploy.md).
    """

    def __init__(self, data_dir: str | Path, *, port: int = 0, host: str = "127.0.0.1",
                 startup_timeout: float = 60.0, log_file: str | Path | None = None) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.host = host
        self.port = port or free_port(host)
        self.startup_timeout = startup_timeout
        self.log_file = Path(log_file) if log_file else self.data_dir.parent / f"{self.data_dir.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._ids = _run_as()
        self._bin = find_pg_bin()

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@{self.host}:{self.port}/postgres"

    def _chown(self, path: Path) -> None:
        if self._ids is None:
            return
        uid, gid = self._ids
        for p in [path, *path.rglob("*")]:
            os.lchown(p, uid, gid)

    def _check_traversable(self) -> None:
        """As root, fail with what to do if ``nobody`` cannot reach the data directory or the binaries.

        Without this, a clone under a mode-700 directory (``mktemp -d``) fails with a bare
        ``PermissionError`` from ``exec`` after the privilege drop.
        """
        if self._ids is None:
            return
        for what, path in (("the data directory", self.data_dir), ("the PostgreSQL binaries", self._bin)):
            for parent in [*reversed(path.parents)] + ([path] if what != "the data directory" else []):
                st = parent.stat()
                if st.st_uid != self._ids[0] and not st.st_mode & 0o001:
                    raise RuntimeError(
                        f"PostgreSQL runs as an unprivileged user here (we are root; SYNTH_AGENT_PG_USER), "
                        f"and it cannot enter {parent} to reach {what} ({path}): chmod o+x {parent}, or put "
                        "it under a traversable path (e.g. /tmp or /var/lib)"
                    )

    def initdb(self) -> None:
        if (self.data_dir / "PG_VERSION").exists():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._check_traversable()
        self.data_dir.chmod(0o700)
        self._chown(self.data_dir)
        out = subprocess.run(
            [str(self._bin / "initdb"), "-D", str(self.data_dir), "-U", "postgres", "--auth=trust",
             "--encoding=UTF8", "--locale=C"],
            capture_output=True, text=True, cwd=str(self.data_dir), preexec_fn=_preexec(self._ids), timeout=300,
        )
        if out.returncode != 0:
            raise RuntimeError(f"initdb failed ({out.returncode}): {out.stderr.strip()[-2000:]}")

    def start(self) -> LocalPostgres:
        self.initdb()
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_file.open("ab")
        try:
            self.proc = subprocess.Popen(
                [str(self._bin / "postgres"), "-D", str(self.data_dir), "-p", str(self.port), "-h", self.host,
                 "-c", "unix_socket_directories=", "-c", "max_connections=200", "-c", "listen_addresses=" + self.host,
                 *[arg for k, v in ERASURE_SETTINGS.items() for arg in ("-c", f"{k}={v}")]],
                stdout=log, stderr=subprocess.STDOUT, cwd=str(self.data_dir), preexec_fn=_preexec(self._ids),
                start_new_session=True,
            )
        finally:
            log.close()
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_file.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"postgres exited with {self.proc.returncode}: {tail}")
            if self._ready():
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"postgres did not accept connections within {self.startup_timeout:.0f}s")

    def _ready(self) -> bool:
        try:
            import psycopg

            with psycopg.connect(self.dsn, connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return True
        except Exception:
            return False

    def stop(self, timeout: float = 30.0) -> None:
        """Fast shutdown (SIGINT: roll back open transactions, checkpoint, exit)."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> LocalPostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_forever(data_dir: Path, port: int, host: str) -> int:
    """``synth-agent postgres``: run until SIGINT/SIGTERM; returns an exit code."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with LocalPostgres(data_dir, port=port, host=host, log_file=data_dir.parent / f"{data_dir.name}.log") as pg:
        print(f"synth-agent postgres: {pg.dsn} (data {data_dir}, log {pg.log_file}); Ctrl-C to stop", file=sys.stderr)
        print(pg.dsn, flush=True)
        try:
            while not stop.is_set() and pg.proc is not None and pg.proc.poll() is None:
                stop.wait(0.5)
        except KeyboardInterrupt:
            pass
        code = pg.proc.returncode if pg.proc is not None and pg.proc.poll() is not None else 0
    return int(code or 0)
