"""ChromaStore over HTTP against a real ``chroma run`` server (the multi-machine deployment path)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from store.chroma import ChromaStore
from store.embeddings import MiniLMEmbeddings
from store.memory import PreferenceMemory

try:
    from tests.store_conformance import (
        TOPICS,
        BaseStoreConformance,
        MemoryConformance,
        make_vote,
        shared_minilm,
    )
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    from store_conformance import (  # type: ignore[no-redef]
        TOPICS,
        BaseStoreConformance,
        MemoryConformance,
        make_vote,
        shared_minilm,
    )

STARTUP_TIMEOUT_S = 60.0


def _chroma_cli() -> str | None:
    local = Path(sys.executable).parent / "chroma"
    return str(local) if local.exists() else shutil.which("chroma")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _heartbeat(port: int) -> bool:
    for path in ("/api/v2/heartbeat", "/api/v1/heartbeat"):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:
                if resp.status == 200:
                    return True
        except OSError:
            continue
    return False


@pytest.fixture(scope="module")
def chroma_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    cli = _chroma_cli()
    if cli is None:
        pytest.skip("the 'chroma' CLI is not installed in this environment")
    port = _free_port()
    data = tmp_path_factory.mktemp("chroma-server")
    log = (data / "server.log").open("wb")
    proc = subprocess.Popen(
        [cli, "run", "--path", str(data / "db"), "--host", "127.0.0.1", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not _heartbeat(port):
            if proc.poll() is not None:
                pytest.fail(f"chroma server exited with {proc.returncode}: {(data / 'server.log').read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"chroma server gave no heartbeat within {STARTUP_TIMEOUT_S:.0f}s")
            time.sleep(0.2)
        yield "127.0.0.1", port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


@pytest.fixture(scope="module")
def minilm() -> MiniLMEmbeddings:
    return shared_minilm()


class TestChromaServer(BaseStoreConformance, MemoryConformance):
    """The full conformance suite over HTTP; each test gets its own collections on the shared server."""

    @pytest.fixture
    def store(self, chroma_server: tuple[str, int], minilm: MiniLMEmbeddings) -> ChromaStore:
        host, port = chroma_server
        return ChromaStore(
            host=host,
            port=port,
            collection=f"t_{uuid.uuid4().hex[:12]}",
            embedding_function=minilm,
            index_fields=["text"],
        )


class TestChromaServerSealed(BaseStoreConformance, MemoryConformance):
    """What ``synth-agent serve`` runs: a Chroma server with values sealed by a local ledger."""

    @pytest.fixture
    def store(self, chroma_server: tuple[str, int], minilm: MiniLMEmbeddings, tmp_path: Path) -> ChromaStore:
        import chromadb
        from chromadb.config import Settings

        host, port = chroma_server
        client = chromadb.HttpClient(host=host, port=port, settings=Settings(anonymized_telemetry=False))
        return ChromaStore(
            client=client,
            ledger=tmp_path / "ledger.sqlite3",
            seal=True,
            collection=f"s_{uuid.uuid4().hex[:12]}",
            embedding_function=minilm,
            index_fields=["text"],
        )


async def test_server_data_visible_to_a_second_client(chroma_server: tuple[str, int], minilm: MiniLMEmbeddings) -> None:
    """Two clients (as two app servers would) share one Chroma server's data."""
    host, port = chroma_server
    name = f"s_{uuid.uuid4().hex[:12]}"
    writer = PreferenceMemory(ChromaStore(host=host, port=port, collection=name, embedding_function=minilm))
    votes = [make_vote("shared@example.com", text, i) for i, text in enumerate(TOPICS.values())]
    assert (await writer.add_votes(votes)).added == len(votes)
    reader = PreferenceMemory(ChromaStore(host=host, port=port, collection=name, embedding_function=minilm))
    assert [v.id for v in await reader.list_votes("shared@example.com")] == [v.id for v in votes]
    top = await reader.relevant_votes("shared@example.com", "a bug in my Python script", k=1)
    assert top[0].id == votes[0].id
