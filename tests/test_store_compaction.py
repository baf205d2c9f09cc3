"""Compaction of the Chroma store: a new generation of collections holding only the live records.

chromadb's local HNSW index never reuses a deleted record's slot (bench/hnsw_churn.py), so
``ChromaStore.compact`` copies the live records into new collections, switches to them in the
ledger and deletes the old ones. These tests check that nothing is lost or duplicated (also
when the process dies between the steps), that reads answer the same, that writes arriving
during a compaction are kept, and that erasure still leaves no bytes behind. The conformance
suite runs on a store that compacts after every commit with a delete.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from langgraph.store.base import PutOp

from store.chroma import ChromaStore
from store.embeddings import MiniLMEmbeddings
from store.ledger import LEDGER_FILE, Ledger
from store.memory import PreferenceMemory
from store.reader import StoreReader, generation_names

try:
    from tests.store_conformance import BaseStoreConformance, MemoryConformance, make_vote, shared_minilm
    from tests.test_store_erasure import scan
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    from store_conformance import (  # type: ignore[no-redef]
        BaseStoreConformance,
        MemoryConformance,
        make_vote,
        shared_minilm,
    )
    from test_store_erasure import scan  # type: ignore[no-redef]

REPO = Path(__file__).resolve().parents[1]
TOPICS = ["sourdough bread baking", "python list comprehension bug", "marathon training plan",
          "tomato garden pests", "jazz piano voicings", "tax return deadline"]


@pytest.fixture(scope="module")
def minilm() -> MiniLMEmbeddings:
    return shared_minilm()


def _open(path: Path, minilm: MiniLMEmbeddings, **kw: object) -> ChromaStore:
    return ChromaStore(path, embedding_function=minilm, index_fields=["text"], **kw)  # type: ignore[arg-type]


def _fill(st: ChromaStore) -> None:
    """60 items in 6 namespaces, then the 40 of four users deleted (their namespaces emptied)."""
    for u in range(6):
        st.batch([PutOp(("t", f"user{u}"), f"k{i}", {"text": f"{TOPICS[(u + i) % 6]} note {i}", "n": i})
                  for i in range(10)])
    st.batch([PutOp(("t", f"user{u}"), f"k{i}", None) for u in range(4) for i in range(10)])


def _snapshot(st: ChromaStore) -> dict[str, object]:
    """Everything a reader can see: every item, namespace listing, and semantic searches with scores."""
    items = sorted((tuple(h.namespace), h.key, str(h.value)) for h in st.search(("t",), limit=1000))
    searches = {q: [(h.key, tuple(h.namespace), round(float(h.score or 0), 6)) for h in st.search(("t",), query=q, limit=8)]
                for q in ("bread", "piano chords", "deadline for taxes")}
    per_user = {u: [(h.key, round(float(h.score or 0), 6)) for h in st.search(("t", f"user{u}"), query="garden", limit=3)]
                for u in range(6)}
    return {"items": items, "count": st.count(), "namespaces": st.list_namespaces(prefix=("t",)),
            "searches": searches, "per_user": per_user}


def _collections(st: ChromaStore) -> set[str]:
    return {c if isinstance(c, str) else c.name for c in st.client.list_collections()}


def test_compaction_keeps_every_record_and_every_answer(tmp_path: Path, minilm: MiniLMEmbeddings) -> None:
    path = tmp_path / "db"
    st = _open(path, minilm, compact_ratio=0)
    _fill(st)
    before = _snapshot(st)
    assert before["count"] == 20
    res = st.compact()
    assert (res.generation, res.items, res.vectors) == (1, 20, 20)
    assert res.deleted_before >= 40 + 40 + 1 and res.old_removed
    assert _snapshot(st) == before
    assert _collections(st) == set(generation_names("synth_agent_items", 1))
    st.batch([PutOp(("t", "user9"), "new", {"text": "after the compaction"})])  # writes go to the new generation
    again = st.compact()
    assert again.generation == 2 and again.items == 21 and again.deleted_before == 0
    st.close()

    st = _open(path, minilm)  # reopened: the ledger says which generation is active
    assert st.count() == 21 and st.get(("t", "user9"), "new") is not None
    assert _snapshot(st)["per_user"] == before["per_user"]
    st.close()
    reader = StoreReader.open(path)  # the light reader of CLI commands finds the active generation too
    assert reader is not None
    try:
        assert [i.key for i in reader.search(("t", "user5"), limit=100)] == [f"k{i}" for i in range(10)]
    finally:
        reader.close()


def test_compaction_removes_the_old_segment_directories(tmp_path: Path, minilm: MiniLMEmbeddings) -> None:
    """chromadb 1.5.9 leaves a deleted collection's HNSW directory on disk; the store removes it."""
    path = tmp_path / "db"
    st = _open(path, minilm, compact_ratio=0)
    _fill(st)
    st.compact()
    dirs_one = {d.name for d in path.iterdir() if d.is_dir()}
    for _ in range(3):
        st.batch([PutOp(("t", "churn"), f"c{i}", {"text": f"churn {i}"}) for i in range(30)])
        st.batch([PutOp(("t", "churn"), f"c{i}", None) for i in range(30)])
        st.compact()
    dirs_four = {d.name for d in path.iterdir() if d.is_dir()}
    assert len(dirs_four) == len(dirs_one) and not dirs_four & dirs_one  # as many as one generation has
    st.close()


@pytest.mark.parametrize("step", ["copied", "switched"])
def test_a_crash_during_compaction_loses_and_duplicates_nothing(
    tmp_path: Path, minilm: MiniLMEmbeddings, step: str
) -> None:
    """The process dies (``os._exit``) after the copy (before the switch) or after the switch (before
    the old generation is deleted); the next open finds every record exactly once."""
    path = tmp_path / "db"
    st = _open(path, minilm, compact_ratio=0)
    _fill(st)
    before = _snapshot(st)
    st.close()
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(REPO)!r})
        from store.chroma import ChromaStore
        from tests.store_conformance import shared_minilm
        st = ChromaStore({str(path)!r}, embedding_function=shared_minilm(), index_fields=["text"], compact_ratio=0)
        st._compact_fault = lambda s: os._exit(9) if s == {step!r} else None
        st.compact()
        os._exit(0)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 9, proc.stderr[-2000:]
    with _ledger(path) as ledger:
        gen, mark = ledger.generation("synth_agent_items")
    # Dead after the copy: still generation 0, and the dead process's mark is left. After the switch: 1, no mark.
    assert (gen, mark is not None) == ((0, True) if step == "copied" else (1, False))

    st = _open(path, minilm)
    assert _collections(st) == set(generation_names("synth_agent_items", gen))  # the other generation is gone
    assert _snapshot(st) == before
    ids = st._items.get(include=[])["ids"]
    assert len(ids) == len(set(ids)) == 20
    st.batch([PutOp(("t", "user0"), "w", {"text": "a write after the crash"})])  # the stale mark holds nothing up
    res = st.compact()
    assert res.generation == gen + 1 and res.items == 21
    st.close()


class _ledger:
    """A read of the ledger's generation row, closed afterwards."""

    def __init__(self, path: Path) -> None:
        self.ledger = Ledger(path / LEDGER_FILE)

    def __enter__(self) -> Ledger:
        return self.ledger

    def __exit__(self, *exc: object) -> None:
        self.ledger.close()


def test_writes_during_a_compaction_wait_and_are_kept(tmp_path: Path, minilm: MiniLMEmbeddings) -> None:
    """A write submitted while the copy runs is committed after the switch, in the new generation."""
    st = _open(tmp_path / "db", minilm, compact_ratio=0)
    _fill(st)
    started, release = threading.Event(), threading.Event()

    def hold(step: str) -> None:
        if step == "copied":
            started.set()
            release.wait(30)

    st._compact_fault = hold  # type: ignore[attr-defined]
    done: list[object] = []
    t = threading.Thread(target=lambda: done.append(st.compact()))
    t.start()
    assert started.wait(60)
    fut = st._submit(st._reads_and_prepare([PutOp(("t", "user1"), "during", {"text": "written during the copy"})])[1])
    reads = st.search(("t", "user5"), limit=100)  # reads go on meanwhile, against the old generation
    assert len(reads) == 10 and not fut.done()  # the write waits for the compaction
    release.set()
    fut.result(timeout=60)
    t.join(60)
    assert done and st._gen == 1
    assert st.get(("t", "user1"), "during") is not None and st.count() == 21
    ids = st._items.get(include=[])["ids"]
    assert len(ids) == len(set(ids)) == 21
    st.close()


def test_the_store_compacts_on_its_own_past_the_threshold(tmp_path: Path, minilm: MiniLMEmbeddings) -> None:
    """Deleted records are counted in the ledger; past ``compact_min`` and ``compact_ratio`` x live records,
    the writer compacts right after the commit (the next write, queued behind it, is the barrier)."""
    st = _open(tmp_path / "db", minilm, compact_ratio=0.5, compact_min=50)
    st.batch([PutOp(("t", "a"), f"k{i}", {"text": f"note {i}"}) for i in range(40)])
    st.batch([PutOp(("t", "a"), f"k{i}", None) for i in range(10)])  # 20 records deleted: below compact_min
    st.batch([PutOp(("t", "b"), "x", {"text": "barrier"})])
    assert st.stats.compactions == 0
    # 50 more deleted (items and vectors): 70 >= 0.5 x (6 items + 6 vectors + 64 flush records + 2 namespaces)
    st.batch([PutOp(("t", "a"), f"k{i}", None) for i in range(10, 35)])
    st.batch([PutOp(("t", "b"), "y", {"text": "barrier"})])
    assert st.stats.compactions == 1 and st._gen == 1 and st.count() == 7
    st.close()


async def test_erasure_holds_across_compactions(tmp_path: Path, minilm: MiniLMEmbeddings) -> None:
    """After compaction and forget (and a compaction after the forget), no file holds the user's marker or id."""
    path = tmp_path / "db"
    marker, user = "QX9COMPACTMARK", "compact-erase@example.com"
    st = _open(path, minilm, compact_ratio=0)
    mem = PreferenceMemory(st, "t")
    await mem.add_votes([make_vote(user, f"{marker} topic {i}", i) for i in range(8)])
    await mem.add_votes([make_vote("other@example.com", f"other topic {i}", i) for i in range(5)])
    st.compact()
    assert await mem.count_votes(user) == 8
    await mem.forget_user(user)
    assert scan(path, [marker, user]) == {}
    await st.acompact()
    assert scan(path, [marker, user]) == {}
    assert await mem.count_votes("other@example.com") == 5
    st.close()
    assert scan(path, [marker, user]) == {}


def test_compact_through_the_local_chroma_server(tmp_path: Path, minilm: MiniLMEmbeddings) -> None:
    """The served store (``chroma run`` child, HTTP client): same guarantees."""
    path = tmp_path / "db"
    st = ChromaStore.local_server(path, embedding_function=minilm, index_fields=["text"], compact_ratio=0)
    try:
        assert st._server is not None and st._server.proc is not None
        pid = st._server.proc.pid
        _fill(st)
        before = _snapshot(st)
        assert st.compact().generation == 1
        assert st._server.proc.pid != pid  # restarted: chromadb frees a deleted collection's memory only then
        assert _snapshot(st) == before and st.health()["ok"]
        st.batch([PutOp(("t", "user5"), "z", {"text": "after the restart"})])
        assert st.get(("t", "user5"), "z") is not None
        st.batch([PutOp(("t", "user5"), "z", None)])
    finally:
        st.close()
    st = _open(path, minilm)
    assert st._gen == 1 and _snapshot(st) == before
    st.close()


def test_restarts_after_compaction_do_not_accumulate_http_clients(tmp_path: Path, minilm: MiniLMEmbeddings) -> None:
    """A restart of the served Chroma keeps the store's HTTP client (same port): chromadb 1.5.9 keeps
    every ``HttpClient`` it made (its HTTP session and TLS context) registered even after ``close()``,
    so a new client per restart grew a server that compacts for days by one per compaction."""
    import gc

    import httpx

    def sessions() -> int:
        gc.collect()
        return sum(isinstance(o, httpx.Client) for o in gc.get_objects())

    st = ChromaStore.local_server(tmp_path / "db", embedding_function=minilm, index_fields=["text"], compact_ratio=0)
    try:
        assert st._server is not None and st._server.proc is not None
        _fill(st)
        st.compact()
        before, pids = sessions(), {st._server.proc.pid}
        for _ in range(3):
            st.batch([PutOp(("t", "user5"), "z", {"text": "churn"})])
            st.batch([PutOp(("t", "user5"), "z", None)])
            st.compact()
            pids.add(st._server.proc.pid)
        assert len(pids) == 4 and st._gen == 4  # restarted after each compaction
        assert sessions() == before
        assert st.get(("t", "user5"), "k1") is not None and st.health()["ok"]
    finally:
        st.close()


def _children() -> list[int]:
    """This process's child processes (from /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == os.getpid():
                out.append(int(d.name))
    return out


def test_the_restart_starts_the_child_prepared_during_the_copy(tmp_path: Path, minilm: MiniLMEmbeddings) -> None:
    """The next Chroma child imports chromadb while the copy runs (reads wait only for its server to
    start); a compaction that fails ends that spare, and none is left behind either way."""
    others = set(_children())  # of earlier tests or session fixtures (in the full suite: the model server)
    st = ChromaStore.local_server(tmp_path / "db", embedding_function=minilm, index_fields=["text"], compact_ratio=0)
    try:
        assert st._server is not None and st._server.proc is not None
        _fill(st)
        before = _snapshot(st)
        assert st.compact().generation == 1
        assert st._server.proc.args[:2] == [sys.executable, "-c"]  # the spare, now the server
        assert Path(f"/proc/{st._server.proc.pid}/comm").read_text().strip() == "chroma"  # named as before
        assert set(_children()) - others == {st._server.proc.pid}
        assert _snapshot(st) == before and st.health()["ok"]

        def fail(step: str) -> None:
            if step == "copied":
                raise RuntimeError("injected")

        st._compact_fault = fail  # type: ignore[attr-defined]
        with pytest.raises(RuntimeError, match="injected"):
            st.compact()
        assert set(_children()) - others == {st._server.proc.pid} and st._gen == 1
        assert _snapshot(st) == before
    finally:
        st.close()
    assert set(_children()) - others == set()


def test_cli_store_compact(tmp_path: Path, minilm: MiniLMEmbeddings) -> None:
    home = tmp_path / "home"
    st = _open(home / "chroma", minilm, compact_ratio=0)
    _fill(st)
    st.close()
    run = subprocess.run([sys.executable, "-m", "synth_agent.cli", "--home", str(home), "store", "compact"],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stderr
    assert "generation 1, 20 item(s)" in " ".join(run.stdout.split())
    st = _open(home / "chroma", minilm)
    assert st._gen == 1 and st.count() == 20
    st.close()

    served = ChromaStore.local_server(home / "chroma", embedding_function=minilm, index_fields=["text"])
    try:  # a server owns the directory: refused with one line, nothing changed
        run = subprocess.run([sys.executable, "-m", "synth_agent.cli", "--home", str(home), "store", "compact"],
                             capture_output=True, text=True, timeout=300, cwd=REPO)
        assert run.returncode == 1 and "served by another process" in run.stderr, run.stderr
        assert len(run.stderr.strip().splitlines()) == 1 and served._gen == 1 and served.count() == 20
    finally:
        served.close()


class TestChromaCompacting(BaseStoreConformance, MemoryConformance):
    """The conformance suite on a store that compacts after every commit that deletes something."""

    @pytest.fixture
    def store(self, tmp_path: Path, minilm: MiniLMEmbeddings) -> ChromaStore:
        st = _open(tmp_path / "chroma", minilm, compact_ratio=0.001, compact_min=1)
        st.batch([PutOp(("zz",), "x", {"text": "gone"})])
        st.batch([PutOp(("zz",), "x", None)])  # compacts on its own after this commit...
        st.compact()  # ...queued behind it: generation 2 from here on
        assert st._gen == 2
        return st
