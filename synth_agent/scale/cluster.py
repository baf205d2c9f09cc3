"""The whole scale-out topology on one machine, as separate processes: for tests and benchmarks.

:class:`LocalCluster` starts a real PostgreSQL (:class:`~synth_agent.scale.postgres.LocalPostgres`),
a real ``chroma run`` server, the offline simulator as the LLM, then N ``synth-agent serve
--queue`` proxies and M ``synth-agent worker --queue`` workers, each in its own process with
its own ``SYNTH_AGENT_HOME`` (as on separate machines). Everything listens on free loopback
ports and is stopped on exit (children also end if this process is killed outright).

It only starts the commands a user would start (docs/deploy.md); it adds no shortcut.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from store.server import chroma_cli
from synth_agent.scale.postgres import LocalPostgres, free_port

__all__ = ["LocalCluster", "Proc"]


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    port: int | None = None
    home: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def _http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return 200 <= r.status < 300
    except OSError:
        return False


@dataclass
class LocalCluster:
    """``with LocalCluster(proxies=2, workers=2) as c:`` then ``c.proxies[0].url``, ``c.dsn``, ``c.kill_worker(0)``."""

    proxies: int = 2
    workers: int = 2
    sim_latency_ms: float = 50.0
    worker_concurrency: int = 2
    heartbeat: float = 1.0
    stall_timeout: float = 4.0
    env: Mapping[str, str] = field(default_factory=dict)
    """Extra environment for proxies and workers (policy: SYNTH_AGENT_DEBOUNCE, SYNTH_AGENT_FIT_TRIALS ...)."""
    base: Path | None = None
    startup_timeout: float = 120.0

    def __post_init__(self) -> None:
        self._own_base = self.base is None
        self.base = Path(tempfile.mkdtemp(prefix="synth-cluster-")) if self.base is None else Path(self.base)
        self.base.chmod(0o711)  # PostgreSQL runs unprivileged when we are root: it must enter this directory
        self.pg: LocalPostgres | None = None
        self.chroma: Proc | None = None
        self.sim: Any = None
        self.proxy_procs: list[Proc] = []
        self.worker_procs: list[Proc] = []
        self.killed: set[int] = set()

    # ------------------------------------------------------------------ lifecycle

    @property
    def dsn(self) -> str:
        assert self.pg is not None
        return self.pg.dsn

    def start(self) -> LocalCluster:
        from synth_agent.sim.server import SimProcess

        try:
            assert self.base is not None
            self.pg = LocalPostgres(self.base / "pg" / "data", startup_timeout=self.startup_timeout).start()
            self.chroma = self._start_chroma()
            self.sim = SimProcess(latency_ms=self.sim_latency_ms).start()
            self._wait_chroma()
            for _ in range(self.proxies):
                self.add_proxy(wait=False)
            for _ in range(self.workers):
                self.add_worker()
            for p in self.proxy_procs:
                self._wait_http(p, "/healthz")
            self.wait_workers(self.workers)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for p in [*self.proxy_procs, *self.worker_procs]:
            if p.alive():
                p.popen.send_signal(signal.SIGTERM)
        for p in [*self.proxy_procs, *self.worker_procs]:
            try:
                p.popen.wait(20)
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait()
        if self.chroma is not None and self.chroma.alive():
            self.chroma.popen.terminate()
            try:
                self.chroma.popen.wait(20)
            except subprocess.TimeoutExpired:
                self.chroma.popen.kill()
                self.chroma.popen.wait()
        if self.sim is not None:
            self.sim.stop()
            self.sim = None
        if self.pg is not None:
            self.pg.stop()
        if self._own_base and self.base is not None and not os.environ.get("SYNTH_AGENT_KEEP_CLUSTER"):
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ processes

    def _child_env(self, home: Path) -> dict[str, str]:
        from synth_agent.lifecycle import child_env

        assert self.chroma is not None and self.sim is not None
        env = child_env()
        for k in ("OPENAI_BASE_URL", "OPENAI_API_KEY", "SYNTH_AGENT_JUDGE_ENDPOINTS", "SYNTH_AGENT_POSTGRES_DSN"):
            env.pop(k, None)
        env.update({
            "SYNTH_AGENT_HOME": str(home), "CHROMA_HOST": "127.0.0.1", "CHROMA_PORT": str(self.chroma.port),
            "OPENAI_BASE_URL": self.sim.base_url, "SYNTH_AGENT_QUEUE": self.dsn, "PYTHONUNBUFFERED": "1",
        })
        env.update(self.env)
        return env

    def _spawn(self, name: str, args: list[str], env: dict[str, str], port: int | None, home: Path | None) -> Proc:
        assert self.base is not None
        log = self.base / f"{name}.log"
        fh = log.open("ab")
        try:
            popen = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=str(self.base))
        finally:
            fh.close()
        return Proc(name, popen, log, port, home)

    def _start_chroma(self) -> Proc:
        assert self.base is not None
        port = free_port()
        from synth_agent.lifecycle import child_env, parent_death_preexec

        log = self.base / "chroma.log"
        fh = log.open("ab")
        try:
            popen = subprocess.Popen(
                [chroma_cli(), "run", "--path", str(self.base / "chroma"), "--host", "127.0.0.1", "--port", str(port)],
                stdout=fh, stderr=subprocess.STDOUT, env=child_env(), preexec_fn=parent_death_preexec(),
            )
        finally:
            fh.close()
        return Proc("chroma", popen, log, port)

    def _wait_chroma(self) -> None:
        assert self.chroma is not None
        deadline = time.monotonic() + self.startup_timeout
        while not _http_ok(f"{self.chroma.url}/api/v2/heartbeat"):
            if not self.chroma.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"chroma run did not start: {self.chroma.tail()}")
            time.sleep(0.2)

    def _wait_http(self, p: Proc, path: str) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while not _http_ok(p.url + path):
            if not p.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{p.name} did not start: {p.tail()}")
            time.sleep(0.2)

    def add_proxy(self, *, wait: bool = True) -> Proc:
        assert self.base is not None
        i = len(self.proxy_procs)
        home = self.base / f"proxy{i}"
        port = free_port()
        p = self._spawn(f"proxy{i}", [sys.executable, "-m", "synth_agent.cli", "serve", "--no-auth",
                                      "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
                        self._child_env(home), port, home)
        self.proxy_procs.append(p)
        if wait:
            self._wait_http(p, "/healthz")
        return p

    def add_worker(self) -> Proc:
        assert self.base is not None
        i = len(self.worker_procs)
        home = self.base / f"worker{i}"
        p = self._spawn(f"worker{i}", [
            sys.executable, "-m", "synth_agent.cli", "worker", "--concurrency", str(self.worker_concurrency),
            "--heartbeat", str(self.heartbeat), "--stall-timeout", str(self.stall_timeout),
        ], self._child_env(home), None, home)
        self.worker_procs.append(p)
        return p

    def wait_workers(self, n: int) -> None:
        """Until ``n`` live workers have registered with the queue (heartbeat fresher than the stall timeout)."""
        deadline = time.monotonic() + self.startup_timeout
        while self.query_one("SELECT count(*) FROM procrastinate_workers WHERE last_heartbeat > now() - "
                             "make_interval(secs => %s)", (self.stall_timeout,), default=0) < n:
            dead = [w for i, w in enumerate(self.worker_procs) if not w.alive() and i not in self.killed]
            if dead or time.monotonic() > deadline:
                raise RuntimeError("worker(s) did not start: " + " | ".join(w.tail() for w in (dead or self.worker_procs)))
            time.sleep(0.2)

    def kill_worker(self, i: int, sig: int = signal.SIGKILL) -> None:
        w = self.worker_procs[i]
        self.killed.add(i)
        w.popen.send_signal(sig)
        w.popen.wait(30)

    # ------------------------------------------------------------------ Postgres reads (tests, bench)

    def query(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        import psycopg

        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                return list(conn.execute(sql, params).fetchall())  # type: ignore[arg-type]
        except psycopg.errors.UndefinedTable:
            return []

    def execute(self, sql: str, params: Any = None) -> None:
        """Run one statement that returns no rows (DDL, maintenance)."""
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(sql, params)  # type: ignore[arg-type]

    def query_one(self, sql: str, params: Any = None, default: Any = None) -> Any:
        rows = self.query(sql, params)
        return rows[0][0] if rows and rows[0] else default
