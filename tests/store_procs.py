"""Real processes for store tests: ``synth-agent serve`` (with its own Chroma child) over a home directory."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServeProcess:
    """``python -m synth_agent.cli --home H serve`` on a free port, API key ``tenant:key``."""

    def __init__(self, home: Path, upstream: str, *, key: str = "acme:sk-store", synthesis: str = "inline",
                 startup_timeout: float = 180.0) -> None:
        self.home = home
        self.upstream = upstream
        self.tenant, _, self.key = key.partition(":")
        self.synthesis = synthesis
        self.port = free_port()
        self.timeout = startup_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = home.parent / f"serve-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def start(self) -> ServeProcess:
        env = {
            **os.environ,
            "SYNTH_AGENT_API_KEYS": f"{self.tenant}:{self.key}",
            "OPENAI_BASE_URL": self.upstream,
            "OPENAI_API_KEY": "sim",
            "ANONYMIZED_TELEMETRY": "False",
            "HF_HUB_OFFLINE": "1",
        }
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "synth_agent.cli", "--home", str(self.home), "serve", "--port", str(self.port),
                 "--synthesis", self.synthesis, "--log-level", "warning"],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return self
            time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"serve did not become healthy in {self.timeout:.0f}s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        """Graceful shutdown (SIGTERM), as an orchestrator would do."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self.proc = None

    def kill(self) -> None:
        """``kill -9``: no cleanup of any kind."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None


def chroma_children_gone(home: Path, timeout: float = 30.0) -> bool:
    """True once no ``chroma run`` process serves ``home/chroma`` (the server's child ends with it)."""
    target = str(home / "chroma").encode()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = False
        for pid in filter(str.isdigit, os.listdir("/proc")):
            with contextlib.suppress(OSError):
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                if b"chroma" in cmd and b"run" in cmd and target in cmd:
                    alive = True
                    break
        if not alive:
            return True
        time.sleep(0.2)
    return False
