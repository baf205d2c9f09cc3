"""``synth-agent judge-server llamacpp --model smollm2`` as a user runs it: start, health wait, settings, Ctrl-C."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import openai


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def read_settings(proc: subprocess.Popen[bytes], until: str, timeout: float) -> list[str]:
    """Lines the command printed on stdout until one starts with ``until`` (bounded; raw reads, no buffering
    that would hide lines from select)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1.0)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                break  # the command exited
            buf += chunk
            lines = buf.decode(errors="replace").splitlines()
            if any(line.startswith(until) for line in lines):
                return lines
    raise AssertionError(f"no {until!r} line within {timeout}s (exit code {proc.poll()}); got {buf!r}")


def test_cli_starts_serves_prints_settings_and_stops_on_ctrl_c(smollm2_gguf: Path, tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "server.log"
    cmd = [
        sys.executable, "-m", "synth_agent.cli", "judge-server", "llamacpp", "--model", "smollm2",
        "--port", str(port), "--threads", "1", "--ctx-size", "1024", "--log-file", str(log),
    ]  # fmt: skip
    # As from a terminal: SIGINT at its default. A test run started as a background job of a
    # non-interactive shell (`make test &`) inherits SIGINT ignored, and Python then keeps it ignored.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        lines = read_settings(proc, "# context window", timeout=240)
        base = f"http://127.0.0.1:{port}/v1"
        assert f"OPENAI_BASE_URL={base}" in lines and "SYNTH_AGENT_MODEL=smollm2" in lines
        assert "SYNTH_AGENT_MAX_CONCURRENCY=1" in lines
        assert "# context window: 1024 tokens per request (prompt + answer)" in lines
        reply = openai.OpenAI(base_url=base, api_key="none", max_retries=0, timeout=120).chat.completions.create(
            model="smollm2", max_tokens=4, messages=[{"role": "user", "content": "Say hi."}]
        )
        assert reply.choices[0].message.content is not None
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends: the command stops its server, then exits
        assert proc.wait(timeout=60) == 0
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, "the server still listens after Ctrl-C"
    finally:
        if proc.poll() is None:  # the test failed midway: stop the server the command started, then it
            for child in children(proc.pid):
                os.kill(child, signal.SIGKILL)
            proc.kill()
            proc.wait()


def children(pid: int) -> list[int]:
    """Direct child processes of ``pid`` (Linux /proc), so a failed test leaves no server behind."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found
