"""All-or-nothing batches, group commit and failure isolation of ChromaStore's write path.

Backend failures are injected with :class:`store.testing.FaultyClient` at every step of a
commit (staging vectors, registering namespaces, publishing items, a huge batch's second
chunk, erasing); crashes are real (a child process ``os._exit``s mid-commit) and the next
open of the store must roll the batch back or finish it.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import chromadb
import pytest
from chromadb.config import Settings as ChromaSettings
from langgraph.store.base import PutOp

from store.chroma import ChromaStore
from store.embeddings import MiniLMEmbeddings
from store.ledger import LEDGER_FILE
from store.memory import PreferenceMemory
from store.testing import Fault, FaultyClient, InjectedFault
from synth_agent.models import Message, Vote

try:
    from tests.store_conformance import shared_minilm
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    from store_conformance import shared_minilm  # type: ignore[no-redef]

REPO = Path(__file__).resolve().parents[1]
ITEMS, VECTORS, NAMESPACES = ".v2", ".v2.vectors", ".v2.namespaces"


@pytest.fixture(scope="module")
def minilm() -> MiniLMEmbeddings:
    return shared_minilm()


def _client(path: Path) -> FaultyClient:
    return FaultyClient(chromadb.PersistentClient(path=str(path), settings=ChromaSettings(anonymized_telemetry=False)))


def _store(path: Path, client: FaultyClient, minilm: MiniLMEmbeddings, **kw: object) -> ChromaStore:
    return ChromaStore(client=client, ledger=path / LEDGER_FILE, seal=True, embedding_function=minilm,
                       index_fields=["text"], **kw)  # type: ignore[arg-type]


def vote(user: str, i: int, text: str = "question") -> Vote:
    return Vote(user_id=user, context=[Message(role="user", content=f"{text} {i}")], chosen=f"yes {i}", rejected=f"no {i}")


def _raw_counts(store: ChromaStore) -> dict[str, int]:
    """Records in each collection, sentinels excluded: what a failed batch must not leave behind."""
    vec_ids = store._vectors.get(include=[])["ids"]
    return {
        "items": store._items.count(),
        "vectors": sum(1 for i in vec_ids if not i.startswith("__flush__")),
        "namespaces": store._namespaces.count(),
    }


@pytest.mark.parametrize(
    "fault",
    [
        Fault("upsert", collection=VECTORS),
        Fault("upsert", collection=NAMESPACES),
        Fault("upsert", collection=ITEMS),
    ],
    ids=["staging-vectors", "registering-namespaces", "publishing-items"],
)
async def test_backend_failure_mid_batch_stores_nothing(tmp_path: Path, minilm: MiniLMEmbeddings, fault: Fault) -> None:
    client = _client(tmp_path)
    store = _store(tmp_path, client, minilm)
    mem = PreferenceMemory(store, "acme")
    await mem.add_votes([vote("keep@x.io", i) for i in range(3)])
    before = _raw_counts(store)
    client.faults.append(fault)
    batch = [vote("ana@x.io", i) for i in range(600)]
    with pytest.raises(InjectedFault):
        await mem.add_votes(batch)
    assert fault.fired == 1
    assert _raw_counts(store) == before  # nothing staged is left: vectors, namespaces, items, all rolled back
    assert await mem.count_votes("ana@x.io") == 0 and await mem.list_users() == ["keep@x.io"]
    assert await store.alist_namespaces(prefix=mem.namespace("ana@x.io", "votes")[:4]) == []
    assert store.stats.rollbacks == 1 and store.ledger is not None and store.ledger.journal_orphans() == []
    res = await mem.add_votes(batch)  # the backend is back: the same batch goes through whole
    assert res.added == 600 and await mem.count_votes("ana@x.io") == 600
    store.close()


async def test_failure_in_a_later_chunk_of_a_huge_batch_rolls_back_the_earlier_ones(
    tmp_path: Path, minilm: MiniLMEmbeddings
) -> None:
    client = _client(tmp_path)
    store = _store(tmp_path, client, minilm)
    store._max_batch = 100  # a 250-item batch is then published in three upserts
    ns = ("docs",)
    await store.aput(ns, "old", {"text": "the original"})
    client.faults.append(Fault("upsert", collection=ITEMS, skip=1))  # chunk 1 lands, chunk 2 fails
    ops = [PutOp(ns, f"k{i}", {"text": f"new text {i}"}) for i in range(249)] + [PutOp(ns, "old", {"text": "changed"})]
    with pytest.raises(InjectedFault):
        await store.abatch(ops)
    assert [i.key for i in await store.asearch(ns, limit=1000)] == ["old"]
    old = await store.aget(ns, "old")
    assert old is not None and old.value == {"text": "the original"}
    hits = await store.asearch(ns, query="the original", limit=3)
    assert [h.key for h in hits] == ["old"] and hits[0].score is not None and hits[0].score > 0.99
    store.close()


async def test_one_callers_failure_does_not_fail_the_others(tmp_path: Path, minilm: MiniLMEmbeddings) -> None:
    """20 concurrent valid writers share commits with one whose batch the backend rejects: only it fails."""
    client = _client(tmp_path)
    store = _store(tmp_path, client, minilm)
    mem = PreferenceMemory(store, "acme")
    poison = [vote("bo@x.io", i, "poison") for i in range(50)]  # small enough to share a commit
    poison_item = store._iid(mem.namespace("bo@x.io", "votes"), poison[0].id)
    block = Fault("upsert", collection=ITEMS, action="block")  # hold the first commit, so the rest queue up
    client.faults += [
        block,
        Fault("upsert", collection=ITEMS, times=99, when=lambda kw: poison_item in kw.get("ids", ())),
    ]
    first = asyncio.create_task(mem.add_vote(vote("bo@x.io", -1)))
    await asyncio.to_thread(block.reached.wait, 30)
    bad = asyncio.create_task(mem.add_votes(poison))
    good = [asyncio.create_task(mem.add_vote(vote("bo@x.io", i, "fine"))) for i in range(20)]
    await asyncio.sleep(0.3)  # let them queue behind the blocked commit
    block.release.set()
    assert await first is True
    assert all(await asyncio.gather(*good))
    with pytest.raises(InjectedFault):
        await bad
    assert await mem.count_votes("bo@x.io") == 21
    assert store.stats.isolated_retries >= 2  # the merged commit failed, then each caller had its own
    store.close()


async def test_invalid_text_is_refused_before_anything_is_written(tmp_path: Path, minilm: MiniLMEmbeddings) -> None:
    """A lone surrogate cannot be stored as UTF-8: the store refuses the whole batch up front."""
    client = _client(tmp_path)
    store = _store(tmp_path, client, minilm)
    mem = PreferenceMemory(store)
    batch = [vote("cy@x.io", i) for i in range(599)]
    bad = vote("cy@x.io", 999)
    bad.chosen = "broken \ud800 text"  # mutated after validation, as a caller could
    calls = len(client.calls)
    with pytest.raises(ValueError, match="UTF-8"):
        await mem.add_votes([*batch, bad])
    assert not [c for c in client.calls[calls:] if c[1] in ("upsert", "add", "update", "delete")]
    assert await mem.count_votes("cy@x.io") == 0
    with pytest.raises(ValueError, match="UTF-8"):
        await store.aput(("n", "\udc00"), "k", {"v": 1})
    store.close()


async def test_group_commit_embeds_in_batches_and_upserts_once_per_commit(tmp_path: Path, minilm: MiniLMEmbeddings) -> None:
    calls: list[int] = []

    class Counting(MiniLMEmbeddings):
        def __init__(self) -> None:  # share the loaded model
            self.__dict__.update(minilm.__dict__)

        def embed_documents(self, texts: list[str]) -> list[list[float]]:
            calls.append(len(texts))
            return super().embed_documents(texts)

    client = _client(tmp_path)
    store = ChromaStore(client=client, ledger=tmp_path / LEDGER_FILE, embedding_function=Counting(), index_fields=["text"])
    mem = PreferenceMemory(store)
    flags = await asyncio.gather(*(mem.add_vote(vote(f"u{i % 20}", i)) for i in range(200)))
    assert all(flags) and sum((await mem.users_with_counts()).values()) == 200
    s = store.stats
    assert s.commits < 200 / 4 and s.largest_commit > 10  # 200 writers coalesced into a few commits
    # the embedding stage embeds each vote once, in batches of at most embed_batch texts
    assert sum(calls) == 200 and max(calls) <= store.embed_batch and len(calls) <= 200 / 4
    assert s.texts_embedded == 200 and s.embed_calls == len(calls)
    upserts = [c for c in client.calls if c[1] == "upsert" and c[0].endswith(".v2")]
    assert len(upserts) == s.commits  # one items upsert per commit
    store.close()


async def test_reads_do_not_wait_for_a_commit_in_flight(tmp_path: Path, minilm: MiniLMEmbeddings) -> None:
    client = _client(tmp_path)
    store = _store(tmp_path, client, minilm)
    await store.aput(("r",), "a", {"text": "already here"})
    block = Fault("upsert", collection=ITEMS, action="block")
    client.faults.append(block)
    write = asyncio.create_task(store.aput(("r",), "b", {"text": "in flight"}))
    await asyncio.to_thread(block.reached.wait, 30)
    try:
        got = await asyncio.wait_for(store.aget(("r",), "a"), timeout=30)
        hits = await asyncio.wait_for(store.asearch(("r",), query="already", limit=5), timeout=30)
        assert got is not None and [h.key for h in hits] == ["a"]  # b is not visible before its commit point
        assert store.health()["ok"] and store.health()["pending_writes"] == 0
        # writes queued behind the blocked commit are counted (health reads a running count, no lock)
        queued = [asyncio.create_task(store.abatch([PutOp(("r",), k, {"text": k}) for k in keys]))
                  for keys in (["c", "d"], ["e"])]
        for _ in range(3000):
            if store.health()["pending_writes"] == 3:
                break
            await asyncio.sleep(0.01)
        assert store.health()["pending_writes"] == 3
    finally:
        block.release.set()
    await write
    await asyncio.gather(*queued)
    assert await store.aget(("r",), "b") is not None
    assert store.health()["pending_writes"] == 0
    store.close()


_CRASH = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    import chromadb
    from chromadb.config import Settings
    from store.chroma import ChromaStore
    from store.ledger import LEDGER_FILE
    from store.memory import PreferenceMemory
    from store.testing import Fault, FaultyClient
    from synth_agent.models import Message, Vote

    path, phase = Path(sys.argv[1]), sys.argv[2]
    client = FaultyClient(chromadb.PersistentClient(path=str(path), settings=Settings(anonymized_telemetry=False)))
    store = ChromaStore(client=client, ledger=path / LEDGER_FILE, seal=True, embedding_function=lambda t: [[1.0, float(len(x))] for x in t], index_fields=["text"])
    mem = PreferenceMemory(store, "acme")
    votes = [Vote(user_id="dee@x.io", context=[Message(role="user", content=f"q {i}")], chosen="a", rejected="b") for i in range(50)]
    if phase == "before-commit":
        client.faults.append(Fault("upsert", collection=".v2", action="exit"))
        asyncio.run(mem.add_votes(votes))
    else:
        asyncio.run(mem.add_votes(votes))
        client.faults.append(Fault("delete", collection=".v2", action="exit"))
        asyncio.run(mem.forget_user("dee@x.io"))
    """
)


@pytest.mark.parametrize("phase", ["before-commit", "after-commit"])
async def test_crash_mid_batch_is_repaired_on_next_open(tmp_path: Path, phase: str) -> None:
    """kill -9 style: the writer dies inside a commit; reopening rolls it back (or finishes it)."""
    proc = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", _CRASH, str(tmp_path), phase], cwd=REPO,
        env={**os.environ, "ANONYMIZED_TELEMETRY": "False"}, capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 137, proc.stderr
    ledger = tmp_path / LEDGER_FILE
    import sqlite3

    with sqlite3.connect(ledger) as con:
        rows = con.execute("SELECT state, body FROM journal").fetchall()
    assert len(rows) == 1 and rows[0][0] == ("open" if phase == "before-commit" else "committed")
    store = ChromaStore(tmp_path, embedding_function=lambda t: [[1.0, float(len(x))] for x in t], index_fields=["text"])
    assert store.stats.recovered == 1
    mem = PreferenceMemory(store, "acme")
    assert await mem.count_votes("dee@x.io") == 0 and await mem.list_users() == []
    assert _raw_counts(store) == {"items": 0, "vectors": 0, "namespaces": 0}
    with sqlite3.connect(ledger) as con:
        assert con.execute("SELECT count(*) FROM journal").fetchone()[0] == 0
        assert con.execute("SELECT count(*) FROM keys").fetchone()[0] == 0  # no key of the batch survives
    store.close()
    assert json.loads(rows[0][1])  # the journal row said what to undo


async def test_health_reports_a_failing_backend_and_its_recovery(tmp_path: Path, minilm: MiniLMEmbeddings) -> None:
    client = _client(tmp_path)
    store = _store(tmp_path, client, minilm)
    store.probe_interval = 0.05
    assert store.health()["ok"]
    client.faults += [Fault("upsert", collection=ITEMS, times=3), Fault("count", collection=ITEMS, times=2)]
    for i in range(3):
        with pytest.raises(InjectedFault):
            await store.aput(("h",), f"k{i}", {"text": "x"})
    h = store.health()
    assert not h["ok"] and "injected fault" in h["error"]
    for _ in range(600):  # the idle writer probes until the backend answers again (2 probes fail first)
        if store.health()["ok"]:
            break
        await asyncio.sleep(0.05)
    assert store.health()["ok"]
    await store.aput(("h",), "k", {"text": "back"})
    store.close()


async def test_vote_rounds_make_progress_with_duplicates_and_forgets() -> None:
    """A storm of concurrent writes, repeated vote ids and forgets on a store that never yields:
    every call finishes (the round loop must not spin while finished rounds wait to be reaped)."""
    from langgraph.store.memory import InMemoryStore

    mem = PreferenceMemory(InMemoryStore())

    async def writer(w: int) -> None:
        for i in range(10):
            await mem.add_votes([vote(f"u{w % 3}", i % 4), vote(f"u{w % 3}", 100 + w * 10 + i)])
            if i % 5 == 4:
                await mem.forget_user(f"u{(w + 1) % 3}")

    await asyncio.wait_for(asyncio.gather(*(writer(w) for w in range(30))), timeout=120)
    counts = await mem.users_with_counts()
    assert all(n >= 0 for n in counts.values())
    assert all(len(ids) == len(set(ids)) for ids in [[v.id for v in await mem.list_votes(u)] for u in counts])


async def test_create_only_batches_write_absent_keys_once(tmp_path: Path, minilm: MiniLMEmbeddings) -> None:
    """``insert``: the existence check runs inside the commit, so concurrent inserts of one key store it once."""
    store = _store(tmp_path, _client(tmp_path), minilm)
    await store.aput(("n",), "old", {"text": "was here"})
    batches = [[PutOp(("n",), "k", {"text": f"writer {i}"}), PutOp(("n",), "old", {"text": "again"})] for i in range(20)]
    results = await store.ainsert_batches(batches)
    assert not any(isinstance(r, BaseException) for r in results)
    assert sum(r[0] for r in results) == 1 and not any(r[1] for r in results)  # type: ignore[index]
    winner = next(i for i, r in enumerate(results) if r[0])  # type: ignore[index]
    assert (await store.aget(("n",), "k")).value == {"text": f"writer {winner}"}  # type: ignore[union-attr]
    assert (await store.aget(("n",), "old")).value == {"text": "was here"}  # type: ignore[union-attr]
    # a key deleted earlier in the same commit is absent for a later insert
    await store.abatch([PutOp(("n",), "old", None)])
    assert await store.ainsert([PutOp(("n",), "old", {"text": "new"})]) == [True]
    with pytest.raises(ValueError, match="create-only"):
        store.insert([PutOp(("n",), "x", None)])
    bad = await store.ainsert_batches([[PutOp(("n",), "y", {"text": "\ud800"})], [PutOp(("n",), "z", {"text": "fine"})]])
    assert isinstance(bad[0], ValueError) and bad[1] == [True]  # an invalid batch fails alone
    assert await store.aget(("n",), "y") is None
    store.close()


async def test_an_embedding_failure_fails_only_its_batch(tmp_path: Path) -> None:
    """The embedding stage runs before the commit: a batch whose texts cannot be embedded stores nothing."""

    def embed(texts: list[str]) -> list[list[float]]:
        if any("poison" in t for t in texts):
            raise RuntimeError("embedding failed")
        return [[1.0, float(len(t))] for t in texts]

    store = ChromaStore(client=_client(tmp_path), ledger=tmp_path / LEDGER_FILE, embedding_function=embed,
                        index_fields=["text"], embed_batch=1)
    mem = PreferenceMemory(store)
    ok = [mem.add_vote(vote("ann@x.io", i)) for i in range(10)]
    res = await asyncio.gather(*ok, mem.add_vote(vote("bob@x.io", 0, text="poison")), return_exceptions=True)
    assert res[:10] == [True] * 10 and isinstance(res[10], RuntimeError)
    assert await mem.count_votes("ann@x.io") == 10 and await mem.count_votes("bob@x.io") == 0
    assert "bob@x.io" not in await mem.list_users()
    assert store.health()["ok"]
    store.close()


def _gated_store(tmp_path: Path) -> tuple[ChromaStore, Any]:
    """A store whose embedding of texts containing "slow" waits for the returned event (one text per call)."""
    import threading

    gate = threading.Event()

    def embed(texts: list[str]) -> list[list[float]]:
        if any("slow" in t for t in texts):
            assert gate.wait(60)
        return [[1.0, float(len(t))] for t in texts]

    store = ChromaStore(client=_client(tmp_path), ledger=tmp_path / LEDGER_FILE, embedding_function=embed,
                        index_fields=["text"], embed_batch=1, embed_workers=2)
    store.gather_hold = 60.0  # held until the slow one is embedded, however loaded the machine
    return store, gate


def _puts(store: ChromaStore, name: str, texts: list[str]) -> list[Any]:
    return store._prepare_inserts([PutOp(("g", name), f"k{i}", {"text": t}) for i, t in enumerate(texts)])


def test_background_batches_are_gathered_into_one_commit_while_more_are_embedded(tmp_path: Path) -> None:
    """The intake drain's batches (``gather``) embedded first wait for the ones still being embedded behind
    them and are stored in one commit with them (a commit's cost is mostly per commit)."""
    import time

    store, gate = _gated_store(tmp_path)
    try:
        before = store.stats.commits
        fast, slow = store._submit_many([_puts(store, "a", ["fast one", "fast two"]), _puts(store, "b", ["slow one"])],
                                        gather=lambda: True)
        deadline = time.monotonic() + 30
        while store._queue and store._queue[0].todo and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)  # the fast batch is embedded: without gathering it would be committed by now
        assert not fast.done()
        gate.set()
        fast.result(timeout=60)
        slow.result(timeout=60)
        assert store.stats.commits - before == 1 and store.stats.largest_commit == 3
        assert store.get(("g", "a"), "k1") is not None and store.get(("g", "b"), "k0") is not None
    finally:
        gate.set()
        store.close()


@pytest.mark.parametrize("case", ["foreground-behind", "hurried"])
def test_gathering_never_holds_what_a_caller_waits_for(tmp_path: Path, case: str) -> None:
    """A background batch is committed without waiting when a foreground write is queued behind it, or as
    soon as its submitter stops allowing the hold (a reader waits for the drain: ``IntakeJournal._hurry``)."""
    store, gate = _gated_store(tmp_path)
    hurry = [False]
    try:
        (fast,) = store._submit_many([_puts(store, "a", ["fast one"])], gather=lambda: not hurry[0])
        if case == "foreground-behind":
            slow = store._submit(_puts(store, "b", ["slow one"]))
        else:
            (slow,) = store._submit_many([_puts(store, "b", ["slow one"])], gather=lambda: not hurry[0])
            hurry[0] = True
        fast.result(timeout=60)  # stored while the slow batch is still being embedded
        assert not slow.done()
        gate.set()
        slow.result(timeout=60)
    finally:
        gate.set()
        store.close()
