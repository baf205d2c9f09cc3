"""The ``chroma run`` child of a serving store logs warnings only (its INFO log grows ~2 kB per request, unbounded)."""

from __future__ import annotations

from pathlib import Path

import pytest

from store.server import LOG_FILE, LocalChromaServer, child_env


def test_child_env_defaults_to_warnings_and_passes_an_explicit_rust_log(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RUST_LOG", raising=False)
    env = child_env()
    assert env["RUST_LOG"] == "warn" and env["ANONYMIZED_TELEMETRY"] == "False"
    monkeypatch.setenv("RUST_LOG", "info")
    assert child_env()["RUST_LOG"] == "info"


def test_local_server_does_not_log_every_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import chromadb

    monkeypatch.delenv("RUST_LOG", raising=False)
    server = LocalChromaServer(tmp_path / "chroma", startup_timeout=120).start()
    try:
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
