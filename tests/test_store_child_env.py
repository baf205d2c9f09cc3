"""The ``chroma run`` child of a serving store: warnings-only log (INFO grows ~2 kB per request), 2 malloc arenas."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pytest

from store.server import LOG_FILE, LocalChromaServer, child_env


def test_child_env_defaults_and_passes_explicit_settings_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RUST_LOG", raising=False)
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    env = child_env()
    assert (env["RUST_LOG"], env["MALLOC_ARENA_MAX"], env["ANONYMIZED_TELEMETRY"]) == ("warn", "2", "False")
    monkeypatch.setenv("RUST_LOG", "info")
    monkeypatch.setenv("MALLOC_ARENA_MAX", "8")
    assert (child_env()["RUST_LOG"], child_env()["MALLOC_ARENA_MAX"]) == ("info", "8")


def test_serving_process_caps_its_malloc_arenas_unless_told() -> None:
    """In a fresh interpreter (mallopt changes the process it runs in for good)."""
    code = "from synth_agent.serving import limit_malloc_arenas as f; print(f())"
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    told = subprocess.run([sys.executable, "-c", code], env={**env, "MALLOC_ARENA_MAX": "4"}, capture_output=True,
                          text=True, check=True)
    assert told.stdout.strip() == "False"  # glibc already applied the operator's value
    untold = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert untold.stdout.strip() == ("True" if platform.libc_ver()[0] == "glibc" else "False")


def test_local_server_does_not_log_every_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import chromadb

    monkeypatch.delenv("RUST_LOG", raising=False)
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    server = LocalChromaServer(tmp_path / "chroma", startup_timeout=120).start()
    try:
        assert server.proc is not None
        environ = Path(f"/proc/{server.proc.pid}/environ").read_bytes().split(b"\0")
        assert b"MALLOC_ARENA_MAX=2" in environ and b"RUST_LOG=warn" in environ
        client = chromadb.HttpClient(host=server.host, port=server.port)
        col = client.get_or_create_collection("quiet-log", embedding_function=None)
        for i in range(30):
            col.upsert(ids=[f"v{i}"], embeddings=[[0.1, 0.2, float(i)]], documents=[f"vote {i}"])
        assert col.count() == 30
    finally:
        server.stop()
    log = (tmp_path / "chroma" / LOG_FILE).read_text(errors="replace")
    # At Chroma's default level each of those 30 upserts writes INFO lines ("Cache miss for collection ...").
    assert " INFO " not in log and "collection_upsert" not in log


def test_malloc_trimmer_runs_on_its_interval_and_stops() -> None:
    from synth_agent.serving import start_malloc_trimmer

    assert start_malloc_trimmer(0) is None  # off by default
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("malloc_trim is glibc's")
    trimmer = start_malloc_trimmer(0.05)
    assert trimmer is not None
    try:
        deadline = time.monotonic() + 10
        while len(trimmer.durations) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(trimmer.durations) >= 3 and all(d >= 0 for d in trimmer.durations)
    finally:
        trimmer.stop()
        trimmer.join(timeout=5)
    assert not trimmer.is_alive()
