"""Conformance of ChromaStore (embedded) and InMemoryStore, plus Chroma-only guarantees (persistence)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
from langgraph.store.base import PutOp
from langgraph.store.memory import InMemoryStore

from store.chroma import ChromaStore
from store.embeddings import MINILM_DIMS, MiniLMEmbeddings, chroma_embedding_function, minilm_path
from store.memory import PreferenceMemory, decode_label, encode_label
from synth_agent.config import Settings
from synth_agent.models import PersonaProfile

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

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def minilm() -> MiniLMEmbeddings:
    return shared_minilm()


class TestChromaEmbedded(BaseStoreConformance, MemoryConformance):
    @pytest.fixture
    def store(self, tmp_path: Path, minilm: MiniLMEmbeddings) -> ChromaStore:
        return ChromaStore(tmp_path / "chroma", embedding_function=minilm, index_fields=["text"])


class TestInMemoryStore(BaseStoreConformance, MemoryConformance):
    @pytest.fixture
    def store(self, minilm: MiniLMEmbeddings) -> InMemoryStore:
        return InMemoryStore(index={"dims": MINILM_DIMS, "embed": minilm, "fields": ["text"]})


def test_label_encoding_round_trips() -> None:
    for text in ["a.b", "%2E", "x/y%", "ü.@ ", "..", "%"]:
        label = encode_label(text)
        assert "." not in label and decode_label(label) == text
    assert encode_label("a.b") != encode_label("a%2Eb")


async def test_votes_survive_reopen_in_process(tmp_path: Path, minilm: MiniLMEmbeddings) -> None:
    path = tmp_path / "db"
    mem = PreferenceMemory(ChromaStore(path, embedding_function=minilm, index_fields=["text"]), "t")
    votes = [make_vote("ana@example.com", text, i) for i, text in enumerate(TOPICS.values())]
    await mem.add_votes(votes)
    await mem.save_persona(PersonaProfile(user_id="ana@example.com", persona="Pythonista"))

    reopened = PreferenceMemory(ChromaStore(path, embedding_function=minilm, index_fields=["text"]), "t")
    assert [v.id for v in await reopened.list_votes("ana@example.com")] == [v.id for v in votes]
    assert (await reopened.relevant_votes("ana@example.com", "python list bug", k=1))[0].id == votes[0].id
    persona = await reopened.current_persona("ana@example.com")
    assert persona is not None and persona.version == 1


async def test_votes_survive_process_restart(tmp_path: Path) -> None:
    """A separate process writes and exits; this process then reads everything back."""
    path = tmp_path / "db"
    script = textwrap.dedent(
        f"""
        import asyncio, json, sys
        from store.chroma import ChromaStore
        from store.memory import PreferenceMemory
        from synth_agent.models import Message, PersonaProfile, Vote

        async def main():
            mem = PreferenceMemory(ChromaStore({str(path)!r}), "acme")
            votes = [Vote(user_id="élodie.d@x.fr", context=[Message(role="user", content=f"q{{i}}")],
                          chosen=f"yes {{i}}", rejected=f"no {{i}}") for i in range(12)]
            res = await mem.add_votes(votes)
            await mem.save_persona(PersonaProfile(user_id="élodie.d@x.fr", persona="terse"))
            print(json.dumps({{"added": res.added, "ids": [v.id for v in votes]}}))

        asyncio.run(main())
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ANONYMIZED_TELEMETRY": "False"}
    proc = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", script],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    written = json.loads(proc.stdout.strip().splitlines()[-1])
    assert written["added"] == 12

    mem = PreferenceMemory(ChromaStore(path), "acme")
    assert [v.id for v in await mem.list_votes("élodie.d@x.fr")] == written["ids"]
    assert await mem.list_users() == ["élodie.d@x.fr"]
    persona = await mem.current_persona("élodie.d@x.fr")
    assert persona is not None and persona.persona == "terse"
    # No vector index on this store: relevance falls back to the most recent votes.
    recent = await mem.relevant_votes("élodie.d@x.fr", "anything", k=2)
    assert [v.id for v in recent] == written["ids"][::-1][:2]
    assert await PreferenceMemory(ChromaStore(path), "other").list_users() == []


async def test_update_keeps_created_at(tmp_path: Path) -> None:
    store = ChromaStore(tmp_path / "db")
    await store.aput(("n",), "k", {"v": 1})
    first = await store.aget(("n",), "k")
    await store.aput(("n",), "k", {"v": 2})
    second = await store.aget(("n",), "k")
    assert first is not None and second is not None
    assert second.created_at == first.created_at and second.updated_at > first.updated_at


async def test_deleted_namespace_leaves_listing(tmp_path: Path) -> None:
    store = ChromaStore(tmp_path / "db")
    await store.aput(("a", "b"), "k", {"v": 1})
    await store.aput(("a", "b"), "k2", {"v": 2})
    await store.aput(("a", "c"), "k", {"v": 3})
    await store.adelete(("a", "b"), "k")
    assert await store.alist_namespaces() == [("a", "b"), ("a", "c")]
    await store.adelete(("a", "b"), "k2")
    assert await store.alist_namespaces() == [("a", "c")]
    assert store.count() == 1


async def test_collections_are_separate_stores(tmp_path: Path) -> None:
    one = ChromaStore(tmp_path / "db", collection="one")
    two = ChromaStore(client=one.client, collection="two")
    await one.aput(("n",), "k", {"v": 1})
    assert await two.aget(("n",), "k") is None and await two.alist_namespaces() == []


def test_constructor_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="path="):
        ChromaStore()
    with pytest.raises(ValueError, match="only one"):
        ChromaStore(tmp_path, host="localhost")
    with pytest.raises(ValueError, match="3 characters"):
        ChromaStore(tmp_path, collection="ab")
    with pytest.raises(ValueError, match="embedding_function"):
        ChromaStore(tmp_path, embedding_function=42)  # type: ignore[arg-type]
    store = ChromaStore(tmp_path)
    with pytest.raises(ValueError, match="JSON-serializable"):
        store.put(("n",), "k", {"v": object()})
    with pytest.raises(ValueError, match="operator"):
        store.search(("n",), filter={"v": {"$regex": "x"}})


def test_from_settings_uses_home(tmp_path: Path) -> None:
    store = ChromaStore.from_settings(Settings(home=tmp_path / "home"))
    store.put(("s",), "k", {"v": 1})
    assert (tmp_path / "home" / "chroma").is_dir()
    assert ChromaStore.from_settings(Settings(home=tmp_path / "home")).get(("s",), "k") is not None


def test_chroma_embedding_function_matches_langchain_embeddings(tmp_path: Path, minilm: MiniLMEmbeddings) -> None:
    ef = chroma_embedding_function()
    a = [float(x) for x in ef(["python code"])[0]]
    b = minilm.embed_query("python code")
    assert len(a) == len(b) == MINILM_DIMS
    assert sum(x * y for x, y in zip(a, b, strict=True)) > 0.99
    store = ChromaStore(tmp_path / "db", embedding_function=ef, index_fields=["text"],
                        collection=f"c{uuid.uuid4().hex[:8]}")
    for name, text in TOPICS.items():
        store.put(("e",), name, {"text": text})
    assert store.search(("e",), query="tulips and roses", limit=1)[0].key == "garden"
    assert Path(minilm_path()).is_file()


class _FlakyStore(InMemoryStore):
    """InMemoryStore whose writes fail while ``down`` is set: a store outage."""

    down = True

    async def abatch(self, ops):  # type: ignore[no-untyped-def]
        ops = list(ops)
        if self.down and any(isinstance(op, PutOp) for op in ops):
            raise ConnectionError("store is down")
        return await super().abatch(ops)


async def test_store_outage_reports_every_concurrent_caller() -> None:
    store = _FlakyStore()
    mem = PreferenceMemory(store)
    votes = [make_vote("f", f"question {i}", i) for i in range(20)]
    results = await asyncio.gather(*(mem.add_vote(v) for v in votes), return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)
    assert await mem.count_votes("f") == 0
    store.down = False
    assert all(await asyncio.gather(*(mem.add_vote(v) for v in votes)))
    assert await mem.count_votes("f") == 20 and await mem.list_users() == ["f"]


async def test_v1_layout_is_refused_then_migrated_by_reindex(tmp_path: Path, minilm: MiniLMEmbeddings) -> None:
    """A directory written by the first store layout (values in the clear) migrates once, losing nothing."""
    import chromadb
    from chromadb.config import Settings as ChromaSettings

    path = tmp_path / "db"
    client = chromadb.PersistentClient(path=str(path), settings=ChromaSettings(anonymized_telemetry=False))
    v1 = client.get_or_create_collection("synth_agent_items", embedding_function=None)
    rows = [
        ((("synth_agent", "acme", "user", "ana", "votes"), "v1"), {"text": TOPICS["python"], "vote_id": "v1"}, 1, None),
        ((("synth_agent", "acme", "user", "ana", "personas"), "0000000001"), {"version": 1}, 0, None),
        ((("notes",), "n"), {"title": "t", "body": TOPICS["garden"]}, 1, ["body"]),
    ]
    v1.add(
        ids=[f"id{i}" for i in range(len(rows))],
        embeddings=[[0.5, 0.5]] * len(rows),
        metadatas=[
            {"ns": json.dumps(list(ns)), "key": key, "value": json.dumps(value), "created_at": "2024-01-01T00:00:00+00:00",
             "updated_at": "2024-01-02T00:00:00+00:00", "nvec": nvec, **({"index": json.dumps(ix)} if ix else {})}
            for (ns, key), value, nvec, ix in rows
        ],
    )
    del client, v1
    with pytest.raises(ValueError, match="reindex"):
        ChromaStore(path, embedding_function=minilm, index_fields=["text"])
    store = ChromaStore(path, embedding_function=minilm, index_fields=["text"], reindex=True)
    assert store.reindexed == 3
    got = await store.aget(("synth_agent", "acme", "user", "ana", "votes"), "v1")
    assert got is not None and got.value["vote_id"] == "v1" and got.created_at.year == 2024
    assert (await store.asearch(("notes",), query="tulips in spring", limit=1))[0].key == "n"  # indexed on body
    assert (await store.asearch(("synth_agent",), query="python lists", limit=1))[0].key == "v1"
    assert await store.aget(("synth_agent", "acme", "user", "ana", "personas"), "0000000001") is not None
    names = {c.name for c in store.client.list_collections()}
    assert "synth_agent_items" not in names
    store.close()
    ChromaStore(path, embedding_function=minilm, index_fields=["text"]).close()  # opens normally now
