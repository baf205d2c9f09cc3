"""The ledger's namespace index: per-namespace reads by primary key, kept with the keys.

A read of one namespace (one user's votes) must cost what that namespace holds: the store
looks the item ids up in the ledger and fetches them by id, never through Chroma's
metadata filter. These tests check the behaviour that makes that safe: the index lists
exactly the live items of a namespace, loses rows with the keys they belong to (delete,
forget, a rolled-back batch), refuses to answer for a prefix with namespaces below it,
and is rebuilt for a store written before it existed. ``check_namespace_index`` runs the
same checks on any ledger (``tests/test_scale_postgres.py`` runs it on ``PgLedger``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import chromadb
from chromadb.config import Settings as ChromaSettings
from langgraph.store.base import PutOp

from store.chroma import ChromaStore
from store.ledger import LEDGER_FILE, KeyLedger, Ledger


def _embed(texts: list[str]) -> list[list[float]]:
    """Deterministic 16-d vectors (a hash per word), so similar wording scores higher."""
    out = []
    for t in texts:
        v = [0.0] * 16
        for w in t.lower().split():
            v[hashlib.sha256(w.encode()).digest()[0] % 16] += 1.0
        out.append(v)
    return out


class _GetSpy:
    """Wraps a Chroma collection and records the ``where`` of every ``get``."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.wheres: list[Any] = []

    def get(self, *args: Any, **kwargs: Any) -> Any:
        self.wheres.append(kwargs.get("where"))
        return self.inner.get(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _client(path: Path) -> Any:
    return chromadb.PersistentClient(path=str(path), settings=ChromaSettings(anonymized_telemetry=False))


def check_namespace_index(tmp_path: Path, ledger: KeyLedger) -> None:
    """The namespace index behaves on ``ledger`` (a fresh one, used by nobody else)."""
    client = _client(tmp_path / "chroma")
    st = ChromaStore(client=client, ledger=ledger, seal=True, embedding_function=_embed, index_fields=["text"])
    try:
        u1, u2 = ("acme", "u1", "votes"), ("acme", "u2", "votes")
        st.batch([PutOp(u1, f"k{i}", {"text": f"topic {i} bread baking"}) for i in range(5)]
                 + [PutOp(u2, f"k{i}", {"text": f"topic {i} chess openings"}) for i in range(7)]
                 + [PutOp(u1, "note", {"text": "unindexed"}, index=False)])
        assert len(ledger.members(st._ptok(u1), 100)) == 6 and len(ledger.members(st._ptok(u2), 100)) == 7
        assert ledger.members(st._ptok(("acme",)), 100) and all(  # namespaces below a prefix are listed as such
            k.startswith("ns:") for k in ledger.members(st._ptok(("acme",)), 100))

        items, vectors = _GetSpy(st._items), _GetSpy(st._vectors)
        st._items, st._vectors = items, vectors
        hits = st.search(u1, query="bread baking", limit=10)
        assert [h.key for h in hits][:5] == sorted([h.key for h in hits][:5], key=lambda k: -next(
            x.score for x in hits if x.key == k))
        assert {h.key for h in hits} == {f"k{i}" for i in range(5)} | {"note"}  # unindexed fills the page last
        assert hits[-1].key == "note" and hits[-1].score is None
        assert [h.key for h in st.search(u2, limit=3, offset=2)] == ["k2", "k3", "k4"]  # scan: insertion order
        assert items.wheres and all(w is None for w in items.wheres + vectors.wheres)  # by id, never a filter
        assert st.search(("acme", "nobody", "votes"), query="bread") == []
        # An item with several vectors scores its best one (the second text here).
        st.batch([PutOp(u2, "multi", {"a": "zebra quartz", "text": "violin sonata tempo"}, index=["a", "text"])])
        best = st.search(u2, query="violin sonata tempo", limit=1)[0]
        assert best.key == "multi" and best.score is not None and best.score > 0.99
        st.batch([PutOp(u2, "multi", None)])

        # A prefix with namespaces below it is not a namespace of its own: the filter path answers.
        items.wheres.clear()
        assert len(st.search(("acme",), query="chess", limit=20)) == 13
        assert any(w is not None for w in items.wheres + vectors.wheres)

        # Deleting items drops their rows with their keys; emptied namespaces drop theirs.
        st.batch([PutOp(u1, "k0", None), PutOp(u1, "note", None)])
        assert len(ledger.members(st._ptok(u1), 100)) == 4
        assert {h.key for h in st.search(u1, query="bread", limit=10)} == {"k1", "k2", "k3", "k4"}
        st.batch([PutOp(u2, f"k{i}", None) for i in range(7)])
        assert ledger.members(st._ptok(u2), 100) == []
        assert not any(k.startswith(f"ns:{st._nsid(u2)}") for k in ledger.members(st._ptok(("acme",)), 100))
        assert st.search(u2, query="chess") == []
    finally:
        st.close()


def test_namespace_index_on_the_sqlite_ledger(tmp_path: Path) -> None:
    check_namespace_index(tmp_path, Ledger(tmp_path / LEDGER_FILE))


def test_a_store_written_before_the_index_is_backfilled_when_opened(tmp_path: Path) -> None:
    """An older ledger has keys but no index rows and no flag: opening the store rebuilds the index
    from Chroma's records, only for items whose key exists; until then reads use the filter."""
    path = tmp_path / "db"
    st = ChromaStore(path, embedding_function=_embed, index_fields=["text"])
    ns = ("acme", "u1", "votes")
    st.batch([PutOp(ns, f"k{i}", {"text": f"vote {i} about sourdough"}) for i in range(4)]
             + [PutOp(("acme", "u1", "personas"), "p", {"x": 1}, index=False)])
    before = {h.key for h in st.search(ns, query="sourdough", limit=10)}
    gone = st._iid(ns, "k0")
    st.close()

    import sqlite3

    with sqlite3.connect(path / LEDGER_FILE) as conn:  # what a ledger of the previous release holds
        rows = conn.execute("SELECT tok, kid FROM members ORDER BY tok, kid").fetchall()
        assert len(rows) == 5 + 2 * 2  # 5 items; 2 namespaces x 2 proper prefixes
        conn.execute("DELETE FROM members")
        conn.execute("DELETE FROM meta WHERE k LIKE 'members:%'")
        conn.execute("DELETE FROM keys WHERE kid = ?", (gone,))
        lost = conn.total_changes
    assert lost

    st = ChromaStore(path, embedding_function=_embed, index_fields=["text"])
    try:
        assert st.ledger is not None
        with sqlite3.connect(path / LEDGER_FILE) as conn:
            again = conn.execute("SELECT tok, kid FROM members ORDER BY tok, kid").fetchall()
        assert set(again) < set(rows) and len(again) == len(rows) - 1  # the item whose key is gone: no row
        assert {h.key for h in st.search(ns, query="sourdough", limit=10)} == before - {"k0"}
        assert st._members(ns) is not None
    finally:
        st.close()
