"""A read-only view of a local store directory that imports neither LangGraph nor LangChain.

Why it exists: a one-shot read command (``synth-agent votes``, ``persona``, ``export-prompt``)
with no server running opens the store in its own process. Opening a
:class:`~store.chroma.ChromaStore` imports LangGraph's ``BaseStore``, whose module imports
``langchain_core.embeddings`` and with it LangChain's runnables and callbacks: about a quarter
of a second of CPU before anything is read, for types a read does not need
(docs/cli.md#start-up-time). This module reads the same records the same way (the layout is
described in :mod:`store.chroma`): the namespace's item ids from the ledger's namespace index,
the records from Chroma by id, each blob opened with its item's data key.

It only serves a store in a clean state: :meth:`StoreReader.open` returns None, and the caller
opens the full store (which recovers, migrates, backfills and drains as usual), when the
directory has no ledger yet, the store is unsealed or of the v1 layout, a crashed process left a
batch in the journal, the namespace index is not complete, or the intake journal holds votes not
stored yet. It takes the directory's lock (or connects through the server that owns the
directory) exactly as the full store does, and never writes a record.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from store.clients import close_client
from store.ledger import LEDGER_FILE, KeyLedger, Ledger
from store.sealing import Codec, SealError

INTAKE_FILE = "synth_agent_intake.sqlite3"
"""The intake journal's file (:data:`store.intake.INTAKE_FILE`; that module imports LangGraph)."""
_PAGE = 1000  # as store.chroma: ids per Chroma get


@dataclass(frozen=True)
class StoredItem:
    """One stored item, with the attributes of LangGraph's ``Item`` that readers use."""

    namespace: tuple[str, ...]
    key: str
    value: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    score: float | None = None


def _nsjson(ns: Sequence[str]) -> str:
    return json.dumps(list(ns), ensure_ascii=False)  # exactly as store.chroma: the tokens must match


class StoreReader:
    """Items of one namespace prefix, read from a local store directory (see the module docstring).

    Use :meth:`open`; :meth:`close` (or ``with``) releases the ledger and the directory.
    """

    def __init__(self, client: Any, items: Any, ledger: Ledger, lock: Any, exact_search_limit: int) -> None:
        self.client = client
        self._items = items
        self.ledger = ledger
        self._lock = lock
        self.codec = Codec(ledger.secret())
        self.exact_search_limit = exact_search_limit

    @classmethod
    def open(cls, path: str | Path, *, collection: str = "synth_agent_items",
             exact_search_limit: int = 1000) -> StoreReader | None:
        """A reader of the store in ``path``, or None when only the full store may open it (see above)."""
        path = Path(path)
        if not (path / LEDGER_FILE).is_file() or _intake_rows(path / INTAKE_FILE):
            return None
        from store.clients import directory_client

        client, lock, _ = directory_client(path)
        ledger: Ledger | None = None
        try:
            ledger = Ledger(path / LEDGER_FILE)
            generation, _ = ledger.generation(collection)  # a compaction in progress: its source is still active
            items = _collection(client, generation_names(collection, generation)[0])
            usable = (
                items is not None
                and bool((items.metadata or {}).get("synth_agent_sealed"))
                and not ledger.journal_orphans()  # a crashed batch: the full store finishes or rolls it back
                and ledger.members_complete(items.name)
                and not _has_records(_collection(client, collection))  # v1 data: the full store says to migrate
            )
            if usable:
                return cls(client, items, ledger, lock, exact_search_limit)
        except BaseException:
            if ledger is not None:
                ledger.close()
            close_client(client)
            if lock is not None:
                lock.release()
            raise
        ledger.close()
        close_client(client)  # the full store opens its own
        if lock is not None:
            lock.release()
        return None

    # ------------------------------------------------------------------ reads (as ChromaStore's)

    def search(self, namespace_prefix: Sequence[str], *, limit: int = 10, offset: int = 0) -> list[StoredItem]:
        """Items under ``namespace_prefix``, in the order ``ChromaStore.search`` without a query gives them."""
        if limit <= 0:
            return []
        out: list[StoredItem] = []
        skipped = 0
        for rids, metas in self._pages(tuple(namespace_prefix)):
            docs = self._open_items(rids, metas)
            for rid in rids:
                doc = docs.get(rid)
                if doc is None:
                    continue
                if skipped < offset:
                    skipped += 1
                    continue
                out.append(doc)
                if len(out) >= limit:
                    return out
        return out

    async def asearch(self, namespace_prefix: Sequence[str], *, limit: int = 10, offset: int = 0) -> list[StoredItem]:
        """:meth:`search`, for code written against ``BaseStore.asearch`` (run in the caller: reads are short)."""
        return self.search(namespace_prefix, limit=limit, offset=offset)

    def get(self, namespace: Sequence[str], key: str) -> StoredItem | None:
        """The item ``key`` of ``namespace``, or None (as ``ChromaStore.get``)."""
        rid = self.codec.token("item", json.dumps([list(namespace), key], ensure_ascii=False))
        res = self._items.get(ids=[rid], include=["metadatas"])
        return self._open_items(list(res["ids"]), list(res["metadatas"] or [])).get(rid)

    async def aget(self, namespace: Sequence[str], key: str) -> StoredItem | None:
        return self.get(namespace, key)

    def _pages(self, prefix: tuple[str, ...]) -> Iterator[tuple[list[str], list[Any]]]:
        if not prefix:
            raise ValueError("a namespace prefix is needed")
        ptok = self.codec.token("p", _nsjson(prefix))
        kids = index_members(self.ledger, ptok, self.exact_search_limit)
        if kids is not None:
            for start in range(0, len(kids), _PAGE):  # the namespace's own items, by id
                res = self._items.get(ids=kids[start : start + _PAGE], include=["metadatas"])
                yield list(res["ids"]), list(res["metadatas"] or [])
            return
        offset = 0  # namespaces below the prefix, or many items: Chroma's filter on the prefix token
        while True:
            res = self._items.get(where={f"t{len(prefix) - 1}": ptok}, limit=_PAGE, offset=offset, include=["metadatas"])
            yield list(res["ids"]), list(res["metadatas"] or [])
            if len(res["ids"]) < _PAGE:
                return
            offset += _PAGE

    def _open_items(self, ids: Sequence[str], metas: Sequence[Any]) -> dict[str, StoredItem]:
        """Decoded items by id; records whose key is gone (being deleted) are skipped, as ChromaStore does."""
        return {
            rid: StoredItem(tuple(doc["ns"]), doc["k"], doc["v"], datetime.fromisoformat(doc["c"]),
                            datetime.fromisoformat(doc["u"]))
            for rid, doc in open_records(self.codec, self.ledger.keys, ids, metas).items()
        }

    def close(self) -> None:
        """Close the ledger and the chromadb client, and give the directory back."""
        self.ledger.close()
        close_client(self.client)
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> StoreReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def generation_names(collection: str, generation: int) -> tuple[str, str, str]:
    """Names of the items, vectors and namespaces collections of one generation of store ``collection``.

    Generation 0 keeps the names of the layout before compaction existed; a compaction
    (:meth:`store.chroma.ChromaStore.compact`) writes generation N+1 and the ledger says which is active.
    """
    base = f"{collection}.v2" if generation == 0 else f"{collection}.v2g{generation}"
    return base, f"{base}.vectors", f"{base}.namespaces"


def is_generation_name(collection: str, name: str) -> bool:
    """Whether ``name`` is a collection of some generation of store ``collection``."""
    return name == f"{collection}.v2" or name.startswith((f"{collection}.v2.", f"{collection}.v2g"))


def index_members(ledger: KeyLedger, ptok: str, limit: int) -> list[str] | None:
    """The ids of the items stored in exactly the namespace whose prefix token is ``ptok``, from the
    ledger's namespace index; None when the index cannot list them exactly (the namespace has
    namespaces below it, which the index lists as ``ns:`` entries, or more than ``limit`` items).
    Shared by :class:`~store.chroma.ChromaStore` and :class:`StoreReader`, so both read alike."""
    kids = ledger.members(ptok, limit + 1)
    if len(kids) > limit or any(k.startswith("ns:") for k in kids):
        return None
    return kids


def open_records(codec: Codec, keys_for: Callable[[list[str]], dict[str, bytes]], ids: Sequence[str],
                 metas: Sequence[Any]) -> dict[str, dict[str, Any]]:
    """Item documents by record id, unsealed with their data keys (``keys_for`` looks them up).

    A record without a blob, or whose key is gone (its item is being deleted: the key goes first,
    so the bytes are unreadable), is skipped. Shared by :class:`~store.chroma.ChromaStore` and
    :class:`StoreReader`.
    """
    keys = keys_for([rid for rid, m in zip(ids, metas, strict=True) if m and str(m.get("b", "")).startswith("s")])
    out: dict[str, dict[str, Any]] = {}
    for rid, meta in zip(ids, metas, strict=True):
        if not meta or "b" not in meta:
            continue
        try:
            doc = codec.open(rid, str(meta["b"]), keys.get(rid))
        except SealError:
            continue
        doc["_v"] = int(meta.get("v", 0))
        out[rid] = doc
    return out


def _collection(client: Any, name: str) -> Any:
    try:
        return client.get_collection(name, embedding_function=None)
    except Exception:  # noqa: BLE001 - not found (the error type differs between client kinds)
        return None


def _has_records(collection: Any) -> bool:
    if collection is None:
        return False
    try:
        return int(collection.count()) > 0
    except Exception:  # noqa: BLE001
        return False


def _intake_rows(file: Path) -> bool:
    """Whether the intake journal holds writes not stored yet (then the full store reads them, and drains)."""
    if not file.exists():
        return False
    conn = sqlite3.connect(f"file:{file}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT EXISTS (SELECT 1 FROM rows)").fetchone()[0] == 1
    except sqlite3.Error:  # no table yet, or unreadable: let the full store decide
        return True
    finally:
        conn.close()


__all__ = ["INTAKE_FILE", "StoreReader", "StoredItem", "generation_names", "index_members", "is_generation_name",
           "open_records"]
