"""A LangGraph ``BaseStore`` backed by Chroma (a local directory, or a Chroma server).

See ``docs/store.md`` for the whole design; in short:

**Layout (v2).** Three collections, named after ``collection``:

* ``<collection>.v2``: one record per item. Its metadata is a *blob* (namespace, key,
  value and timestamps as one JSON document, sealed with the item's own data key when
  the store has a ledger), keyed tokens of every namespace prefix (``t0``, ``t1``, ...),
  a token of the whole namespace (``n``) and the number of vectors (``v``). Records
  carry a tiny placeholder vector (Chroma wants one).
* ``<collection>.v2.vectors``: one record per embedded text (``<item id>.<j>``), with
  the item id and the prefix tokens: the semantic index.
* ``<collection>.v2.namespaces``: one record per non-empty namespace (sealed labels,
  depth, per-level tokens from the front and the back) for ``list_namespaces``.

No user text, user id or namespace label is written to Chroma in the clear when a
ledger is in use (:mod:`store.ledger`, :mod:`store.sealing`).

**Reads of one namespace** (one user's votes) look the namespace's item ids up in the
ledger's namespace index and fetch the records by id, so they cost what the user has, not
what the store has (Chroma's metadata-filtered ``get`` grows with the collection). Other
prefixes use the prefix tokens as a Chroma ``where``.

**Search.** A semantic search first gets the prefix's vectors (by id through the index, or
by the prefix filter, up to ``exact_search_limit``); if that is all of them, every candidate is scored exactly
(cosine, max over an item's vectors): one user's votes are always ranked exactly.
Larger candidate sets go to Chroma's HNSW index, widening the request until enough
hits survive the filters, and a short answer from the index is never taken as the
whole truth (the search falls back to an exhaustive scan).

**Writes: group commit, all or nothing.** Puts are queued; an embedding stage
(``embed_workers`` threads, one per core by default) embeds their texts in batches while one
writer thread per store commits, in submission order, the batches already embedded (up to
``max_commit`` items per commit): one upsert per collection. ``insert`` (create-only puts)
checks inside the commit whether a key exists, so idempotent writers need no read first. A commit
is journaled in the ledger before it touches Chroma; vectors and new namespaces are
staged first (invisible: nothing refers to them yet), then the items upsert publishes
the batch. If anything fails before that point the batch is rolled back (compensating
deletes, earlier versions restored); after it, deletions are finished, from the
journal if the process died. A batch that shared a commit with a failing one is
retried on its own, so one caller's failure never fails another's write.

**Erasure.** Deleting an item scrubs its vectors in the HNSW segment (overwritten,
then deleted, then the segment is made to persist), deletes its records, and destroys
its data key (``secure_delete`` + WAL truncation in the ledger); only then does the
write return.

**Compaction (generations).** chromadb's local HNSW index never reuses a deleted record's
slot, so :meth:`ChromaStore.compact` copies the live records into the three collections of the
next generation (``<collection>.v2g<N>``...; generation 0 keeps the names above), switches to
them in the ledger in one transaction, then deletes the old ones. It runs in the writer between
commits (writes queue meanwhile); the owner of the directory runs it on its own once the records
deleted since the last one (counted in the ledger) reach ``compact_ratio`` x the live records
(off by default: chromadb 1.5.9 keeps a deleted collection's memory until its process ends).
Opening the store removes the collections of any other generation: a half-built next one (a
crash during the copy) or the previous one (a crash after the switch).

Reads never wait for the writer: they run in the caller's thread (``abatch``: a worker
thread) against Chroma directly.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import json
import logging
import os
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from uuid import UUID

from langchain_core.embeddings import Embeddings
from langgraph.store.base import (
    BaseStore,
    GetOp,
    InvalidNamespaceError,
    Item,
    ListNamespacesOp,
    MatchCondition,
    Op,
    PutOp,
    Result,
    SearchItem,
    SearchOp,
    get_text_at_path,
    tokenize_path,
    validate_op_namespace,
)

from store.clients import close_client, directory_client, http_client
from store.ledger import LEDGER_FILE, KeyLedger, Ledger, owner_alive
from store.malloc import malloc_trim_function
from store.reader import generation_names, index_members, is_generation_name, open_records
from store.sealing import Codec, SealError

if TYPE_CHECKING:
    import numpy as np

    from store.intake import IntakeJournal
    from store.server import LocalChromaServer
    from synth_agent.config import Settings

log = logging.getLogger("synth_agent.store")

EmbeddingFunctionLike = Embeddings | Callable[[list[str]], Any]
"""A LangChain ``Embeddings``, a Chroma embedding function, or any ``texts -> vectors`` callable."""

LAYOUT = 2
_PAGE = 1000
_FILTER_OPS = ("$eq", "$ne", "$gt", "$gte", "$lt", "$lte")
_FLUSH_PREFIX = "__flush__."


class _Embedder:
    """Adapts the accepted embedding callables to two sync functions returning plain float lists.

    Calls are serialised unless the embedder says it is thread safe (``thread_safe = True``,
    as :class:`~store.embeddings.MiniLMEmbeddings` does), so a search never queues behind
    the writer's embedding batch.
    """

    def __init__(self, ef: EmbeddingFunctionLike) -> None:
        self._lock: threading.Lock | contextlib.nullcontext[None] = (
            contextlib.nullcontext() if getattr(ef, "thread_safe", False) else threading.Lock()
        )
        if isinstance(ef, Embeddings):
            self._docs: Callable[[list[str]], Any] = ef.embed_documents
            self._query: Callable[[str], Any] = ef.embed_query
        elif callable(ef):
            self._docs = lambda texts: ef(list(texts))
            self._query = lambda text: ef([text])[0]
        else:
            raise ValueError(
                "embedding_function must be a LangChain Embeddings, a Chroma embedding function or a "
                f"callable texts -> vectors; got {type(ef).__name__}"
            )

    def documents(self, texts: list[str]) -> list[list[float]]:
        with self._lock:
            out = self._docs(texts)
        return [[float(x) for x in vec] for vec in out]

    def query(self, text: str) -> list[float]:
        with self._lock:
            out = self._query(text)
        return [float(x) for x in out]


# ---------------------------------------------------------------------- values and filters


def _json_default(obj: Any) -> Any:
    if isinstance(obj, datetime | date):
        return obj.isoformat()
    if isinstance(obj, UUID):
        return str(obj)
    dump = getattr(obj, "model_dump", None)
    if callable(dump):
        return dump(mode="json")
    if isinstance(obj, set | frozenset | tuple):
        return list(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON-serializable")


def _repeat_key(op: PutOp) -> tuple[Any, ...] | None:
    """What identifies a put whose preparation can be shared with an identical one (``_prepare_each``'s
    ``repeats``), or None: only a flat value of strings (a user's registration), a tuple of string
    labels and a string key, compared by exact type, so two puts share a key only if preparing them
    gives the same result (``1`` and ``True`` are equal in Python but not in JSON)."""
    value, index, ns, key = op.value, op.index, op.namespace, op.key
    if type(value) is not dict or not (index is None or index is False) or type(key) is not str or type(ns) is not tuple:
        return None
    items = tuple(value.items())
    for k, v in items:
        if type(k) is not str or type(v) is not str:
            return None
    for label in ns:
        if type(label) is not str:
            return None
    return (ns, key, items, index)


def _dumps(value: Any) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=_json_default)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"store values must be JSON-serializable dicts: {exc}") from exc
    _utf8(text, "the value")
    return text


def _utf8(text: str, what: str) -> None:
    """Everything the store writes must be valid UTF-8 (a lone surrogate is not): refuse it up front."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start : exc.end].encode("unicode_escape").decode()
        raise ValueError(f"{what} is not valid UTF-8 text (contains {bad} at position {exc.start})") from None


def _compare(item_value: Any, filter_value: Any) -> bool:
    """Same matching rules as ``InMemoryStore`` (JSONB-like), but a comparison with a missing or
    non-numeric value is simply false instead of raising."""
    if isinstance(filter_value, dict):
        if any(k.startswith("$") for k in filter_value):
            return all(_apply_operator(item_value, k, v) for k, v in filter_value.items())
        if not isinstance(item_value, dict):
            return False
        return all(_compare(item_value.get(k), v) for k, v in filter_value.items())
    if isinstance(filter_value, list | tuple):
        return (
            isinstance(item_value, list | tuple)
            and len(item_value) == len(filter_value)
            and all(_compare(a, b) for a, b in zip(item_value, filter_value, strict=True))
        )
    return bool(item_value == filter_value)


def _apply_operator(value: Any, operator: str, operand: Any) -> bool:
    if operator == "$eq":
        return bool(value == operand)
    if operator == "$ne":
        return bool(value != operand)
    if operator not in _FILTER_OPS:
        raise ValueError(f"unsupported filter operator {operator!r}; use one of {', '.join(_FILTER_OPS)}")
    try:
        a, b = float(value), float(operand)
    except (TypeError, ValueError):
        return False
    return {"$gt": a > b, "$gte": a >= b, "$lt": a < b, "$lte": a <= b}[operator]


def _check_filter(flt: Any) -> None:
    """Reject unknown ``$`` operators up front, even when no item would be compared."""
    if isinstance(flt, dict):
        for k, v in flt.items():
            if isinstance(k, str) and k.startswith("$") and k not in _FILTER_OPS:
                raise ValueError(f"unsupported filter operator {k!r}; use one of {', '.join(_FILTER_OPS)}")
            _check_filter(v)


_MISSING = object()


def _field(value: dict[str, Any], key: str) -> Any:
    """``value[key]``; a dotted key (``"user.access-level"``) that is not itself a field walks nested dicts."""
    if key in value or "." not in key:
        return value.get(key)
    node: Any = value
    for part in key.split("."):
        node = node.get(part, _MISSING) if isinstance(node, dict) else _MISSING
        if node is _MISSING:
            return None
    return node


def _matches(value: dict[str, Any], flt: dict[str, Any] | None) -> bool:
    return not flt or all(_compare(_field(value, k), v) for k, v in flt.items())


def _does_match(cond: MatchCondition, namespace: tuple[str, ...]) -> bool:
    path = tuple(cond.path)
    if len(namespace) < len(path):
        return False
    if cond.match_type not in ("prefix", "suffix"):
        raise ValueError(f"unsupported match type {cond.match_type!r}; use 'prefix' or 'suffix'")
    pairs = (
        zip(namespace, path, strict=False)
        if cond.match_type == "prefix"
        else zip(reversed(namespace), reversed(path), strict=False)
    )
    return all(p == "*" or n == p for n, p in pairs)


def _and(conds: list[dict[str, Any]]) -> dict[str, Any] | None:
    if not conds:
        return None
    return conds[0] if len(conds) == 1 else {"$and": conds}


def _placeholder(record_id: str) -> list[float]:
    """A cheap 2-d vector derived from the id: distinct points keep Chroma's HNSW graph healthy."""
    digest = __import__("hashlib").sha256(record_id.encode()).digest()
    return [int.from_bytes(digest[:4], "big") / 2**32 + 0.5, int.from_bytes(digest[4:8], "big") / 2**32 + 0.5]


def _nsjson(ns: Sequence[str]) -> str:
    return json.dumps(list(ns), ensure_ascii=False)


# ---------------------------------------------------------------------- write path types


@dataclass
class _Write:
    """One validated put (``doc`` set) or delete (``doc`` None), ready for the writer."""

    iid: str
    ns: tuple[str, ...]
    key: str
    value: dict[str, Any] | None
    texts: list[str] = field(default_factory=list)
    index: list[str] | None = None
    created: str | None = None  # kept as given by migrations; else taken from the stored item or now
    updated: str | None = None
    only_new: bool = False  # create-only (``insert``): a no-op when the key is already stored
    inserted: bool = False  # set by the commit that stored an ``only_new`` write
    vectors: list[Any] | None = None  # the texts' vectors, filled by the embedding stage


@dataclass
class _Submission:
    writes: list[_Write]
    future: concurrent.futures.Future[None] = field(default_factory=concurrent.futures.Future)
    todo: int = 0  # texts the embedding stage has not embedded yet; the writer commits it at 0
    error: BaseException | None = None  # the embedding failed: fail the submission, write nothing
    task: Callable[[], Any] | None = None  # maintenance (a compaction) run by the writer between commits
    result: Any = None
    gather: Callable[[], bool] | None = None  # background work: while it says True the writer may hold it (_gather_wait)


@dataclass
class _EmbedJob:
    """Up to ``embed_batch`` texts of one submission, for one embedding worker."""

    sub: _Submission
    slots: list[tuple[_Write, int]]  # (write, index of the text in write.texts)


@dataclass
class WriterStats:
    """What the writer has done (for metrics and tests)."""

    commits: int = 0
    submissions: int = 0
    writes: int = 0
    largest_commit: int = 0
    embed_calls: int = 0
    texts_embedded: int = 0
    failed_commits: int = 0
    isolated_retries: int = 0
    rollbacks: int = 0
    recovered: int = 0
    compactions: int = 0


@dataclass
class CompactionResult:
    """What one :meth:`ChromaStore.compact` did."""

    generation: int  # the generation now active
    items: int  # records copied per collection
    vectors: int
    namespaces: int
    deleted_before: int  # records deleted since the previous compaction (the ledger's count)
    seconds: float  # copy and switch: how long writes waited
    old_removed: bool  # the previous generation's collections were deleted (else: at the next open or compaction)


class ChromaStore(BaseStore):
    """LangGraph ``BaseStore`` persisted in Chroma, with exact-where-it-can semantic search.

    Give ``path`` for a store in a local directory (in-process Chroma; if a synth-agent
    server already serves that directory, the store connects through it), ``host``/``port``
    for a Chroma server, or a ready ``client``. :meth:`local_server` runs the directory's
    Chroma in a child process, which is what servers should use (Chroma's Python bindings
    hold the GIL for the whole of every call).

    ``ledger``: where data keys and the batch journal live. Default: a file in ``path``;
    none for a Chroma server (values are then stored in the clear, the journal is kept in
    memory, and erasure on the server is the operator's job: see ``docs/store.md``).
    ``seal``: seal values with per-item keys (default: whenever there is a ledger and a
    ``path``; pass ``seal=False`` for a ledger that only journals). Replicas sharing a Chroma
    server share a ledger in Postgres (``synth_agent.scale.ledger.PgLedger``, ``seal=True``).

    Without ``embedding_function`` the store has no vector index and a search ``query`` is
    ignored (as in ``InMemoryStore``). ``index_fields`` are the JSON paths embedded on
    ``put`` (``["$"]``, the whole value, when not given); ``put(..., index=[...])``
    overrides them and ``index=False`` stores an item that never appears as a semantic hit.

        >>> import tempfile
        >>> from store.embeddings import MiniLMEmbeddings
        >>> st = ChromaStore(path=tempfile.mkdtemp(), embedding_function=MiniLMEmbeddings())
        >>> st.put(("acme", "notes"), "n1", {"text": "prefers short bullet lists"})
        >>> st.put(("acme", "notes"), "n2", {"text": "asks about sourdough baking"})
        >>> st.get(("acme", "notes"), "n1").value
        {'text': 'prefers short bullet lists'}
        >>> [hit.key for hit in st.search(("acme",), query="bread", limit=1)]
        ['n2']
    """

    supports_ttl = False

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        client: Any = None,
        host: str | None = None,
        port: int | None = None,
        collection: str = "synth_agent_items",
        embedding_function: EmbeddingFunctionLike | None = None,
        index_fields: list[str] | None = None,
        reindex: bool = False,
        ledger: KeyLedger | str | Path | bool | None = None,
        seal: bool | None = None,
        exact_search_limit: int = 1000,
        max_commit: int = 512,
        sync_threshold: int = 64,
        embed_workers: int | None = None,
        embed_batch: int = 32,
        embed_nice: int = 0,
        intake: bool | int = False,
        compact_ratio: float = 0.0,
        compact_min: int = 2000,
        compact_max_records: int = 200_000,
        _server: LocalChromaServer | None = None,
    ) -> None:
        if sum(x is not None for x in (path, client, host)) > 1:
            raise ValueError("give only one of path= (local directory), host=/port= (server) or client=")
        if len(collection) < 3:
            raise ValueError(f"collection name {collection!r} is too short: Chroma needs at least 3 characters")
        if exact_search_limit < 1 or max_commit < 1 or sync_threshold < 2:
            raise ValueError("exact_search_limit and max_commit must be >= 1, sync_threshold >= 2")
        if (embed_workers is not None and embed_workers < 0) or embed_batch < 1 or not 0 <= embed_nice <= 19:
            raise ValueError("embed_workers must be >= 0, embed_batch >= 1 and embed_nice between 0 and 19")
        if compact_ratio < 0 or compact_min < 1 or compact_max_records < 0:
            raise ValueError("compact_ratio must be >= 0 (0: never on its own), compact_min >= 1, compact_max_records >= 0")
        self._embed_cfg = (embed_workers, embed_batch, embed_nice)
        self.compact_ratio = compact_ratio
        """Compact on its own once records deleted since the last compaction reach this share of the
        live records (and at least ``compact_min``); 0 (the default) turns it off. Off by default because
        chromadb 1.5.9 does not give back the memory of a deleted collection while its process runs: in
        the 15-minute soak, compacting every few minutes made Chroma's RSS grow 6.5 MB/min instead of
        0.8 (docs/store.md, "Compaction"). See :meth:`compact`."""
        self.compact_min = compact_min
        self.compact_max_records = compact_max_records
        """Stores with more live records than this are compacted only when asked (:meth:`compact`):
        a compaction holds writes for as long as the copy takes."""
        self._server = _server
        self._own_lock: Any = None
        self.intake: IntakeJournal | None = None
        """The intake journal (:mod:`store.intake`): with ``intake=True`` (or a backlog limit), create-only
        batches given to ``intake.append`` (``PreferenceMemory`` does so for votes) are acknowledged once
        journaled, and stored by a background drain."""
        attached = False
        self._owns_client = client is None
        """This store made its chromadb client (and closes it in :meth:`close`); a client given to it is the caller's."""
        if client is None:
            if host is not None:
                client = http_client(host, port or 8000)
            elif path is not None:
                Path(path).mkdir(parents=True, exist_ok=True)
                # a synth-agent server owns this directory (attached): go through it
                client, self._own_lock, attached = directory_client(Path(path))
            else:
                raise ValueError(
                    "ChromaStore needs a place to keep data: path= (a directory), host=/port= (a Chroma "
                    "server) or client="
                )
        # Only the process that owns the directory (or started its Chroma server) compacts on its own
        # and removes generations a crash left behind; processes attached through it follow.
        self._owns_dir = (path is not None and not attached) or (_server is not None and not _server.attached)
        try:
            self._setup(client, collection, path, embedding_function, index_fields, reindex, ledger, seal,
                        exact_search_limit, max_commit, sync_threshold)
            if path is not None:
                self._open_intake(intake, owner=not attached)
        except BaseException:
            if self._owns_client:
                close_client(client)
            if self._own_lock is not None:
                self._own_lock.release()
            raise

    def _setup(
        self,
        client: Any,
        collection: str,
        path: str | Path | None,
        embedding_function: EmbeddingFunctionLike | None,
        index_fields: list[str] | None,
        reindex: bool,
        ledger: KeyLedger | str | Path | bool | None,
        seal: bool | None,
        exact_search_limit: int,
        max_commit: int,
        sync_threshold: int,
    ) -> None:
        self.client = client
        self.collection_name = collection
        self.path = Path(path) if path is not None else None

        if ledger is None:
            ledger = self.path / LEDGER_FILE if self.path is not None else False
        if ledger is False:
            self.ledger: KeyLedger | None = None
        else:
            self.ledger = Ledger(Path(ledger)) if isinstance(ledger, (str, Path)) else ledger  # type: ignore[assignment]
        if seal is None:
            seal = self.ledger is not None and (self.path is not None or self._server is not None)
        if seal and self.ledger is None:
            raise ValueError("seal=True needs a ledger (a file for the data keys)")
        self.sealed = bool(seal)
        self.codec = Codec(self.ledger.secret() if self.sealed and self.ledger else b"")

        self._hnsw_sync = sync_threshold
        self._gen_cv = threading.Condition()
        self._gen_readers: dict[int, int] = {}
        self._restarting = False
        self.restart_after_compact = False
        """Restart the local Chroma server this store started after each compaction (reads wait for it,
        a few seconds): chromadb 1.5.9 frees a deleted collection's memory only when its process ends."""
        self._compact_token = f"{self.ledger.owner}#{uuid.uuid4().hex[:8]}" if self.ledger is not None else ""
        self._deleted_since_count = 0
        self._gen = 0
        gen_ledger = self._gen_ledger()
        if gen_ledger is not None:
            self._gen, mark = gen_ledger.generation(collection)
            if mark is not None and self._owns_dir and not owner_alive(mark.split("#")[0]):
                gen_ledger.compaction_end(collection, mark, None)  # a compaction that died before its switch
        self._items, self._vectors, self._namespaces = self._generation(self._gen)
        if self._owns_dir:
            self._drop_generations(keep=self._gen)
        recorded_seal = (self._items.metadata or {}).get("synth_agent_sealed")
        if recorded_seal is not None and bool(recorded_seal) != self.sealed:
            raise ValueError(
                f"the store {collection!r} was written {'sealed' if recorded_seal else 'in the clear'} but is opened "
                f"{'sealed' if self.sealed else 'in the clear'}: open it the way it was written "
                "(sealed stores need their ledger file, synth_agent_ledger.sqlite3)"
            )
        with warnings.catch_warnings():  # chromadb warns about the "legacy" config of embedding_function=None
            warnings.simplefilter("ignore", DeprecationWarning)
            conf = self._vectors.configuration or {}
        self._sync_threshold = int((conf.get("hnsw") or {}).get("sync_threshold") or sync_threshold)
        self._embedder = _Embedder(embedding_function) if embedding_function is not None else None
        fields = list(index_fields) if index_fields else ["$"]
        self.index_fields = fields
        self.embeddings = embedding_function
        """The embedding function (as ``InMemoryStore``/``SqliteStore`` expose it)."""
        self.index_config: dict[str, Any] | None = (
            {"fields": fields, "text_fields": list(index_fields) if index_fields else None,  # as SqliteStore
             "dims": getattr(embedding_function, "dims", None), "embed": embedding_function}
            if self._embedder
            else None
        )
        self._tokenized = [(p, p if p == "$" else tokenize_path(p)) for p in fields]
        self.exact_search_limit = exact_search_limit
        self.max_commit = max_commit
        try:
            self._max_batch = max(1, min(int(client.get_max_batch_size()), 5000))
        except Exception:  # noqa: BLE001 - older/remote clients may not expose it
            self._max_batch = 1000
        self.embedding_model: str | None = getattr(embedding_function, "model_id", None)

        self.stats = WriterStats()
        self._memory_journal: dict[str, tuple[str, dict[str, Any]]] = {}
        self._known_ns: set[str] = set()
        self._queue: collections.deque[_Submission] = collections.deque()
        # Writes in ``_queue``, kept as it changes (under ``_cv``) so health() reads it without the lock
        # and without walking a queue of thousands of submissions on every probe.
        self._queued_writes = 0
        self._cv = threading.Condition()
        self._closing = False
        self._consecutive_failures = 0
        self.probe_interval = 5.0
        """Seconds between health probes of an idle writer whose last commits failed."""
        self.last_error: str | None = None
        self._writer = threading.Thread(target=self._write_loop, name=f"chroma-writer-{collection}", daemon=True)
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        workers, self.embed_batch, self.embed_nice = self._embed_cfg
        if workers is None:
            workers = min(4, os.cpu_count() or 1)
        self._embed_jobs: collections.deque[_EmbedJob] = collections.deque()
        self._embedders = [
            threading.Thread(target=self._embed_loop, name=f"chroma-embed-{collection}-{i}", daemon=True)
            for i in range(workers if self._embedder is not None else 0)
        ]

        self._recover()
        self._indexed = self._backfill_index()
        legacy = self._legacy_collection()
        self.reindexed: int | None = None
        """Items re-embedded (or migrated from the v1 layout) when opened with ``reindex=True``."""
        if legacy is not None and not reindex:
            raise ValueError(
                f"the Chroma collection {collection!r} uses the v1 layout of an older synth-agent (values in the "
                "clear, slower per-user queries); migrate it once with `synth-agent reindex` "
                "(ChromaStore(..., reindex=True))"
            )
        for t in self._embedders:
            t.start()
        self._writer.start()
        if reindex:
            self.reindexed = self._migrate_v1(legacy) if legacy is not None else self.reindex()
        else:
            self._check_embedding_model()


    # ------------------------------------------------------------------ construction helpers

    @classmethod
    def local_server(
        cls,
        path: str | Path,
        *,
        embedding_function: EmbeddingFunctionLike | None = None,
        startup_timeout: float = 120.0,
        restart_after_compact: bool = True,
        **kw: Any,
    ) -> ChromaStore:
        """The store in ``path``, served by ``chroma run`` in a child process that ends with this one.

        Chroma work then runs outside this interpreter: writes never hold this process's GIL,
        so an event loop keeps answering while a commit is in flight. If another synth-agent
        process already serves ``path``, this store connects to that server instead.
        ``close()`` stops the server this store started.
        """
        from store.server import LocalChromaServer

        server = LocalChromaServer(Path(path), startup_timeout=startup_timeout).start()
        client = http_client(server.host, server.port)
        try:
            store = cls(
                client=client,
                embedding_function=embedding_function,
                ledger=Path(path) / LEDGER_FILE,
                seal=True,
                _server=server,
                **kw,
            )
        except BaseException:
            close_client(client)
            server.stop()
            raise
        store._owns_client = True
        store.restart_after_compact = restart_after_compact
        store.path = Path(path)
        try:
            store._open_intake(kw.get("intake", False), owner=not server.attached)
        except BaseException:
            store.close()
            raise
        return store

    def _open_intake(self, intake: bool | int, *, owner: bool) -> None:
        """The directory's intake journal: opened when asked for, or when one exists (its rows must not be missed).

        The process that owns the directory drains it (replaying what a crash left); one attached
        through another process's server only reads and purges it.
        """
        from store.intake import INTAKE_FILE, IntakeJournal

        if self.path is None or not self.sealed or self.ledger is None:
            if intake:
                raise ValueError("intake=True needs a local store directory (sealed, with its ledger)")
            return
        file = self.path / INTAKE_FILE
        if not intake and not file.exists():
            return
        limit = intake if isinstance(intake, int) and not isinstance(intake, bool) else 20_000
        self.intake = IntakeJournal(self, file, limit=limit, drain=owner, accept=bool(intake))

    def _stored_ids(self, ids: Sequence[str]) -> set[str]:
        """Which of ``ids`` are stored items (one indexed lookup per page)."""
        with self._reading():
            return set(self._by_ids(self._items, ids, [])["ids"])

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        embedding_function: EmbeddingFunctionLike | None = None,
        collection: str = "synth_agent_items",
        index_fields: list[str] | None = None,
    ) -> ChromaStore:
        """Chroma server when ``CHROMA_HOST`` is set, else the store under ``<home>/chroma`` (in-process)."""
        if settings.chroma_host:
            return cls(
                host=settings.chroma_host,
                port=settings.chroma_port,
                collection=collection,
                embedding_function=embedding_function,
                index_fields=index_fields,
            )
        return cls(
            Path(settings.home) / "chroma",
            collection=collection,
            embedding_function=embedding_function,
            index_fields=index_fields,
        )

    def _legacy_collection(self) -> Any:
        """The v1 items collection of an older synth-agent, if one with data exists under this name."""
        try:
            old = self.client.get_collection(self.collection_name, embedding_function=None)
        except Exception:  # noqa: BLE001 - not found (the error type differs between client kinds)
            return None
        try:
            return old if old.count() > 0 else None
        except Exception:  # noqa: BLE001
            return None

    # ------------------------------------------------------------------ embedding model

    def _recorded_model(self) -> str | None:
        return (self._vectors.metadata or {}).get("embedding_model")

    def _record_model(self) -> None:
        meta = {k: v for k, v in (self._vectors.metadata or {}).items() if not k.startswith("hnsw:")}
        self._vectors.modify(metadata={**meta, "embedding_model": self.embedding_model})

    def _check_embedding_model(self) -> None:
        """Vectors of two models are not comparable: refuse to mix them, say how to migrate.

        Embedders without a ``model_id`` attribute are not checked.
        """
        if self._embedder is None or not self.embedding_model:
            return
        recorded = self._recorded_model()
        if recorded is None:
            self._record_model()
        elif recorded != self.embedding_model:
            raise ValueError(
                f"the vectors of Chroma collection {self.collection_name!r} were made by embedding model "
                f"{recorded!r}, but this store embeds with {self.embedding_model!r}; vectors of two models "
                "cannot be compared. Re-embed everything once with `synth-agent reindex` "
                "(ChromaStore(..., reindex=True)), or open the store with the model it was built with."
            )

    # ------------------------------------------------------------------ tokens and records

    def _iid(self, ns: Sequence[str], key: str) -> str:
        return self.codec.token("item", json.dumps([list(ns), key], ensure_ascii=False))

    def _ptok(self, prefix: Sequence[str]) -> str:
        return self.codec.token("p", _nsjson(prefix))

    def _ntok(self, ns: Sequence[str]) -> str:
        return self.codec.token("n", _nsjson(ns))

    def _nsid(self, ns: Sequence[str]) -> str:
        return self.codec.token("ns", _nsjson(ns))

    def _prefix_tokens(self, ns: Sequence[str]) -> dict[str, str]:
        return {f"t{i}": self._ptok(ns[: i + 1]) for i in range(len(ns))}

    def _prefix_where(self, prefix: Sequence[str]) -> dict[str, Any] | None:
        return {f"t{len(prefix) - 1}": self._ptok(prefix)} if prefix else None

    def _keys_for(self, rids: Iterable[str]) -> dict[str, bytes]:
        if not self.sealed or self.ledger is None:
            return {}
        return self.ledger.keys(rids)

    def _open_items(self, ids: Sequence[str], metas: Sequence[Any]) -> dict[str, dict[str, Any]]:
        """Decoded item documents by id; records whose key is gone (being deleted) are skipped."""
        return open_records(self.codec, self._keys_for, ids, metas)

    @staticmethod
    def _to_item(doc: dict[str, Any], score: float | None = None, *, search: bool = False) -> Item:
        kwargs: dict[str, Any] = {
            "namespace": tuple(doc["ns"]),
            "key": doc["k"],
            "value": doc["v"],
            "created_at": datetime.fromisoformat(doc["c"]),
            "updated_at": datetime.fromisoformat(doc["u"]),
        }
        return SearchItem(**kwargs, score=score) if search else Item(**kwargs)

    # ------------------------------------------------------------------ batch API

    def batch(self, ops: Iterable[Op]) -> list[Result]:
        """Run ops like ``InMemoryStore``: reads see the state before this batch's writes.

        The batch's puts and deletes are one atomic unit: all stored, or none (see the module
        docstring); the call returns once they are durable.
        """
        results, writes = self._reads_and_prepare(list(ops))
        if writes:
            self._submit(writes).result()
        return results

    async def abatch(self, ops: Iterable[Op]) -> list[Result]:
        """Async twin of :meth:`batch`: reads in a worker thread, writes through the group-commit writer."""
        results, writes = await asyncio.to_thread(self._reads_and_prepare, list(ops))
        if writes:
            await asyncio.wrap_future(self._submit(writes))
        return results

    def insert(self, ops: Sequence[PutOp]) -> list[bool]:
        """Create-only puts, as one atomic batch: each item is written only if its key is not stored yet.

        Returns, per op, whether it was written (False: the key was already there, or an earlier
        op of the same call put it). Idempotent writers (votes with ids) need no read before the
        write: the check happens inside the commit, against the state it commits on.

            >>> import tempfile
            >>> from langgraph.store.base import PutOp
            >>> st = ChromaStore(path=tempfile.mkdtemp())
            >>> st.insert([PutOp(("n",), "a", {"x": 1}), PutOp(("n",), "a", {"x": 2})])
            [True, False]
            >>> st.insert([PutOp(("n",), "a", {"x": 3})]), st.get(("n",), "a").value
            ([False], {'x': 1})
        """
        writes = self._prepare_inserts(ops)
        self._submit(writes).result()
        return [w.inserted for w in writes]

    async def ainsert(self, ops: Sequence[PutOp]) -> list[bool]:
        """Async twin of :meth:`insert`."""
        return (await self.ainsert_batches([ops]))[0]  # type: ignore[return-value]

    async def ainsert_batches(self, batches: Sequence[Sequence[PutOp]]) -> list[list[bool] | BaseException]:
        """Several :meth:`insert` calls at once: each batch is all or nothing on its own.

        A batch that fails (invalid, or a backend error) returns its exception and fails no other.
        """
        return list(await asyncio.gather(*await self.ainsert_each(batches), return_exceptions=True))

    async def ainsert_each(self, batches: Sequence[Sequence[PutOp]]) -> list[asyncio.Future[list[bool]]]:
        """Queue several create-only batches; one future per batch, done as soon as *its* commit lands.

        All batches are prepared in one worker-thread call and queued together, so they usually
        share a commit. Callers that answer many requests (the group commit of
        :class:`~store.memory.PreferenceMemory`) can then answer each as its batch is stored,
        instead of all at once when the last one is.
        """
        prepared = await asyncio.to_thread(self._prepare_each, batches)
        loop = asyncio.get_running_loop()
        ok = [w for w in prepared if not isinstance(w, BaseException)]
        submitted = iter(self._submit_many(ok) if ok else [])
        out: list[asyncio.Future[list[bool]]] = []
        for writes in prepared:
            fut: asyncio.Future[list[bool]] = loop.create_future()
            if isinstance(writes, BaseException):
                fut.set_exception(writes)
            else:
                _chain_inserted(next(submitted), fut, writes, loop)
            out.append(fut)
        return out

    def _prepare_each(
        self, batches: Sequence[Sequence[PutOp]], repeats: dict[tuple[Any, ...], _Write] | None = None,
    ) -> list[list[_Write] | BaseException]:
        """Each create-only batch validated and prepared on its own: its writes, or its error.

        ``repeats`` (see :func:`_repeat_key`) lets callers that prepare many batches at once, such as the
        intake journal's group of requests, prepare an identical small put once: every single-vote
        request carries its user's registration put, so a group of ~100 requests for 20 users
        prepared the same 20 puts ~100 times. A repeat shares the first one's ``_Write``; which of
        them is new is still decided per item id when the group is written (create-only)."""
        out: list[list[_Write] | BaseException] = []
        for ops in batches:
            try:
                out.append(self._prepare_inserts(ops, repeats))
            except Exception as exc:  # noqa: BLE001 - that batch's error, not the others'
                out.append(exc)
        return out

    def _prepare_inserts(
        self, ops: Sequence[PutOp], repeats: dict[tuple[Any, ...], _Write] | None = None,
    ) -> list[_Write]:
        writes = []
        for op in ops:
            if not isinstance(op, PutOp) or op.value is None:
                raise ValueError("insert takes PutOps with a value (create-only puts); use batch() for deletes")
            seen = _repeat_key(op) if repeats is not None else None
            if seen is not None and (w := repeats.get(seen)) is not None:  # type: ignore[union-attr]
                writes.append(w)  # the very same put, prepared and validated already
                continue
            validate_op_namespace(op)
            if not op.namespace:
                raise InvalidNamespaceError("Namespace cannot be empty.")
            w = self._prepare(op if isinstance(op.value, dict) else op._replace(value=dict(op.value)))
            w.only_new = True
            if seen is not None:
                repeats[seen] = w  # type: ignore[index]
            writes.append(w)
        return writes

    def _reads_and_prepare(self, ops: list[Op]) -> tuple[list[Result], list[_Write]]:
        with self._reading():
            return self._reads_and_prepare_in(ops)

    def _reads_and_prepare_in(self, ops: list[Op]) -> tuple[list[Result], list[_Write]]:
        results: list[Result] = [None] * len(ops)
        puts: dict[tuple[tuple[str, ...], str], PutOp] = {}
        gets: list[tuple[int, GetOp]] = []
        searches: list[tuple[int, SearchOp]] = []
        lists: list[tuple[int, ListNamespacesOp]] = []
        for i, op in enumerate(ops):
            validate_op_namespace(op)
            if isinstance(op, GetOp):
                gets.append((i, op))
            elif isinstance(op, SearchOp):
                if op.limit < 0 or op.offset < 0:
                    raise ValueError("search limit and offset must be >= 0")
                if op.filter is not None and not isinstance(op.filter, dict):
                    raise ValueError("search filter must be a dict of field -> value or {'$op': value}")
                _check_filter(op.filter)
                searches.append((i, op))
            elif isinstance(op, ListNamespacesOp):
                lists.append((i, op))
            elif isinstance(op, PutOp):
                if not op.namespace:
                    raise InvalidNamespaceError("Namespace cannot be empty.")
                if op.value is not None and not isinstance(op.value, dict):
                    op = op._replace(value=dict(op.value))
                puts[(tuple(op.namespace), str(op.key))] = op
            else:
                raise ValueError(f"unknown store operation {type(op).__name__}")
        writes = [self._prepare(op) for op in puts.values()]  # validate every write before any read or write
        if gets:
            found = self._fetch([self._iid(op.namespace, str(op.key)) for _, op in gets])
            for i, op in gets:
                results[i] = found.get(self._iid(op.namespace, str(op.key)))
        for i, op in searches:
            results[i] = self._search(op)
        for i, op in lists:
            results[i] = self._list_namespaces(op)
        return results, writes

    def _prepare(self, op: PutOp) -> _Write:
        ns, key = tuple(op.namespace), str(op.key)
        for label in ns:
            _utf8(label, "a namespace label")
        _utf8(key, "the key")
        iid = self._iid(ns, key)
        if op.value is None:
            return _Write(iid, ns, key, None)
        value = json.loads(_dumps(op.value))
        return _Write(
            iid,
            ns,
            key,
            value,
            texts=self._texts(value, op.index),
            index=list(op.index) if isinstance(op.index, list) else None,
        )

    def _texts(self, value: dict[str, Any], index: Any) -> list[str]:
        """Texts to embed for one put, following InMemoryStore's rules."""
        if self._embedder is None or index is False:
            return []
        paths = self._tokenized if index is None else [(p, tokenize_path(p)) for p in index]
        out: list[str] = []
        for _, tokens in paths:
            out += [t for t in get_text_at_path(value, tokens) if isinstance(t, str)]
        for t in out:
            _utf8(t, "an indexed text")
        return out

    # ------------------------------------------------------------------ reads

    def _fetch(self, ids: Sequence[str], *, search: bool = False) -> dict[str, Item]:
        res = self._by_ids(self._items, list(dict.fromkeys(ids)), ["metadatas"])
        return {rid: self._to_item(doc, search=search) for rid, doc in self._open_items(res["ids"], res["metadatas"]).items()}

    def _pages(self, collection: Any, where: dict[str, Any] | None, include: list[str]) -> Iterator[dict[str, Any]]:
        offset = 0
        while True:
            res = collection.get(where=where, limit=_PAGE, offset=offset, include=include)
            yield res
            if len(res["ids"]) < _PAGE:
                return
            offset += _PAGE

    def _search(self, op: SearchOp) -> list[SearchItem]:
        if op.limit == 0:
            return []
        where = self._prefix_where(op.namespace_prefix)
        members = self._members(op.namespace_prefix)
        if not op.query or self._embedder is None:
            return self._scan(where, op.filter, op.offset, op.limit, unindexed_only=False, members=members)
        want = op.offset + op.limit
        scored = self._scored(where, op.filter, op.query, want, members)
        if len(scored) >= want:
            return scored[op.offset : want]
        # Like InMemoryStore: items stored with index=False fill the page after every scored hit.
        head = scored[op.offset :]
        skip = max(op.offset - len(scored), 0)
        return head + self._scan(where, op.filter, skip, op.limit - len(head), unindexed_only=True, members=members)

    def _members(self, prefix: Sequence[str]) -> list[str] | None:
        """The ids of the items stored in exactly ``prefix``, from the ledger's namespace index.

        None when the index cannot answer: no index (unsealed store, no ledger, or an older
        ledger not yet backfilled), the empty prefix, a prefix that has namespaces below it (the
        index lists only a namespace's own items), or more than ``exact_search_limit`` items (then
        the prefix filter and the HNSW index are the better tools).
        """
        if not self._indexed or not prefix or self.ledger is None:
            return None
        return index_members(self.ledger, self._ptok(prefix), self.exact_search_limit)

    def _index_rows(
        self, puts: Sequence[_Write], new_ns: dict[str, tuple[str, ...]],
        ns_toks: dict[tuple[str, ...], tuple[dict[str, str], str]] | None = None,
    ) -> dict[str, list[str]]:
        """Namespace-index tokens for a commit's keys: an item's own namespace, a namespace's proper prefixes."""
        if ns_toks is None:
            ns_toks = {ns: (self._prefix_tokens(ns), "") for ns in {w.ns for w in puts}}
        rows = {w.iid: [ns_toks[w.ns][0][f"t{len(w.ns) - 1}"]] for w in puts}
        rows.update({f"ns:{nid}": [self._ptok(ns[:i]) for i in range(1, len(ns))] for nid, ns in new_ns.items()})
        return rows

    def _backfill_index(self) -> bool:
        """Index the items and namespaces of a store written before the namespace index existed.

        Runs when the store opens, once per collection and ledger (an empty store is done at
        once); True when reads may use the index.
        """
        if not self.sealed or self.ledger is None:
            return False
        name = self._items.name
        if self.ledger.members_complete(name):
            return True
        t0, added = time.monotonic(), 0
        for res in self._pages(self._items, None, ["metadatas"]):
            rows = []
            for rid, meta in zip(res["ids"], res["metadatas"] or [], strict=True):
                depth = sum(1 for k in meta or {} if k[:1] == "t" and k[1:].isdigit())
                if depth:
                    rows.append((str(meta[f"t{depth - 1}"]), rid))
            added += self.ledger.add_members(rows)
        for res in self._pages(self._namespaces, None, ["metadatas"]):
            rows = [
                (str(meta[f"t{i}"]), f"ns:{rid}")
                for rid, meta in zip(res["ids"], res["metadatas"] or [], strict=True)
                for i in range(int((meta or {}).get("d", 0)) - 1)
            ]
            added += self.ledger.add_members(rows)
        self.ledger.mark_members_complete(name)
        if added:
            log.warning("indexed %d namespace entries of %s in %.1fs (once, for per-user reads)", added, name,
                        time.monotonic() - t0)
        return True

    def _by_ids(self, collection: Any, ids: Sequence[str], include: list[str]) -> dict[str, Any]:
        """``collection.get(ids=...)`` in pages, merged (Chroma returns only the ids it has)."""
        out: dict[str, Any] = {"ids": [], "metadatas": [], "embeddings": []}
        for start in range(0, len(ids), _PAGE):
            res = collection.get(ids=list(ids[start : start + _PAGE]), include=include)
            out["ids"] += list(res["ids"])
            out["metadatas"] += list(res["metadatas"] or [])
            if "embeddings" in include and len(res["ids"]):
                out["embeddings"] += list(res["embeddings"])
        return out

    def _scored(
        self,
        where: dict[str, Any] | None,
        flt: dict[str, Any] | None,
        query: str,
        want: int,
        members: list[str] | None = None,
    ) -> list[SearchItem]:
        """The ``want`` best items by cosine similarity: exact for small candidate sets, else via HNSW.

        With ``members`` (the namespace's item ids, from the ledger), the items and then their
        vectors are fetched by id while the query is embedded, and ranked exactly. Otherwise the
        prefix's vectors and items are fetched by Chroma's metadata filter (three things at once).
        """
        import numpy as np

        assert self._embedder is not None
        if members is not None:
            if not members:
                return []
            # Items, and every item's first vector (most items have one), while the query is embedded;
            # then the further vectors of items that have more. _rank drops vectors of items not
            # (yet, or any more) stored and beyond an item's count.
            pool = self._read_pool()
            fut_items = pool.submit(self._by_ids, self._items, members, ["metadatas"])
            fut_vec = pool.submit(self._by_ids, self._vectors, [f"{m}.0" for m in members], ["embeddings", "metadatas"])
            q = np.asarray(self._embedder.query(query), dtype=np.float32)
            q = q / max(float(np.linalg.norm(q)), 1e-12)
            found = fut_items.result()
            docs = self._open_items(found["ids"], found["metadatas"])
            vec = fut_vec.result()
            more = [f"{iid}.{j}" for iid, doc in docs.items() for j in range(1, doc["_v"])]
            if more:
                extra = self._by_ids(self._vectors, more, ["embeddings", "metadatas"])
                for k in ("ids", "metadatas", "embeddings"):
                    vec[k] += extra[k]
            emb = np.asarray(vec["embeddings"], dtype=np.float32) if vec["ids"] else np.zeros((0, len(q)), np.float32)
            return self._rank(vec["ids"], vec["metadatas"], emb, q, flt, want, docs)
        limit = self.exact_search_limit
        pool = self._read_pool()
        fut_vec = pool.submit(self._vectors.get, where=where, limit=limit + 1, include=["embeddings", "metadatas"])
        fut_items = pool.submit(self._items.get, where=where, limit=limit + 1, include=["metadatas"])
        q = np.asarray(self._embedder.query(query), dtype=np.float32)
        q = q / max(float(np.linalg.norm(q)), 1e-12)
        res = fut_vec.result()
        if len(res["ids"]) > limit:
            fut_items.cancel()
            return self._ann(where, flt, q, want)
        keep = [i for i, rid in enumerate(res["ids"]) if not rid.startswith(_FLUSH_PREFIX)]
        emb = np.asarray(res["embeddings"], dtype=np.float32)[keep] if keep else np.zeros((0, len(q)), np.float32)
        items = fut_items.result()
        docs = self._open_items(items["ids"], items["metadatas"] or [])
        return self._rank([res["ids"][i] for i in keep], [res["metadatas"][i] for i in keep], emb, q, flt, want, docs)

    def _read_pool(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="chroma-read")
        return self._pool

    def _rank(
        self,
        vec_ids: list[str],
        metas: list[Any],
        emb: np.ndarray,
        q: np.ndarray,
        flt: dict[str, Any] | None,
        want: int,
        known: dict[str, dict[str, Any]] | None = None,
    ) -> list[SearchItem]:
        """Score vectors exactly, best vector per item, then take items best first until ``want`` pass.

        ``known``: item documents already fetched; others are fetched in chunks, best first.
        """
        import numpy as np

        if not vec_ids:
            return []
        norms = np.linalg.norm(emb, axis=1)
        sims = (emb @ q) / np.clip(norms, 1e-12, None)
        cands: dict[str, list[tuple[float, int]]] = {}
        for rid, meta, sim in zip(vec_ids, metas, sims.tolist(), strict=True):
            iid = str((meta or {}).get("i", ""))
            if iid:
                cands.setdefault(iid, []).append((sim, int(rid.rsplit(".", 1)[1]) if "." in rid else 0))
        order = sorted(cands, key=lambda i: (-max(s for s, _ in cands[i]), i))
        known = dict(known or {})
        out: list[SearchItem] = []
        step = max(want * 2, 32)
        for start in range(0, len(order), step):
            chunk = order[start : start + step]
            missing = [i for i in chunk if i not in known]
            if missing:
                res = self._items.get(ids=missing, include=["metadatas"])
                known.update(self._open_items(res["ids"], res["metadatas"] or []))
            for iid in chunk:
                doc = known.get(iid)
                # a vector without its item is staged (batch in flight) or stale (j beyond the item's count)
                live = [s for s, j in cands[iid] if doc is not None and j < doc["_v"]]
                if not live or not _matches(doc["v"], flt):  # type: ignore[index]
                    continue
                out.append(self._to_item(doc, score=float(max(live)), search=True))  # type: ignore[arg-type]
                if len(out) >= want:
                    return out
        return out

    def _ann(self, where: dict[str, Any] | None, flt: dict[str, Any] | None, q: np.ndarray, want: int) -> list[SearchItem]:
        """Approximate candidates from HNSW, exact scores; never trust a short answer."""
        import numpy as np

        n = max(want * 3, 50)
        while True:
            res = self._vectors.query(
                query_embeddings=[q.tolist()], n_results=n, where=where, include=["metadatas", "embeddings"]
            )
            ids = res["ids"][0]
            emb = np.asarray(res["embeddings"][0], dtype=np.float32) if ids else np.zeros((0, len(q)), np.float32)
            scored = self._rank(ids, list(res["metadatas"][0]), emb, q, flt, want)
            if len(scored) >= want:
                return scored
            if len(ids) < n:
                # The index gave fewer neighbours than asked although the prefix holds more than the
                # exact limit: HNSW can lose reachability of some points. Scan everything instead.
                return self._exhaustive(where, flt, q, want)
            n *= 4

    def _exhaustive(self, where: dict[str, Any] | None, flt: dict[str, Any] | None, q: np.ndarray, want: int) -> list[SearchItem]:
        import numpy as np

        ids: list[str] = []
        metas: list[Any] = []
        embs: list[np.ndarray] = []
        for res in self._pages(self._vectors, where, ["embeddings", "metadatas"]):
            keep = [i for i, rid in enumerate(res["ids"]) if not rid.startswith(_FLUSH_PREFIX)]
            ids += [res["ids"][i] for i in keep]
            metas += [res["metadatas"][i] for i in keep]
            if keep:
                embs.append(np.asarray(res["embeddings"], dtype=np.float32)[keep])
        emb = np.concatenate(embs) if embs else np.zeros((0, len(q)), np.float32)
        return self._rank(ids, metas, emb, q, flt, want)

    def _scan(
        self,
        where: dict[str, Any] | None,
        flt: dict[str, Any] | None,
        offset: int,
        limit: int,
        *,
        unindexed_only: bool,
        members: list[str] | None = None,
    ) -> list[SearchItem]:
        if limit <= 0:
            return []
        out: list[SearchItem] = []
        skipped = 0
        pages = (
            self._pages(self._items, where, ["metadatas"])
            if members is None
            else iter([self._by_ids(self._items, members, ["metadatas"])] if members else [])
        )
        for res in pages:
            docs = self._open_items(res["ids"], res["metadatas"] or [])
            for rid in res["ids"]:
                doc = docs.get(rid)
                if doc is None or (unindexed_only and doc["_v"] > 0) or not _matches(doc["v"], flt):
                    continue
                if skipped < offset:
                    skipped += 1
                    continue
                out.append(self._to_item(doc, search=True))  # type: ignore[arg-type]
                if len(out) >= limit:
                    return out
        return out

    def _list_namespaces(self, op: ListNamespacesOp) -> list[tuple[str, ...]]:
        conds: list[dict[str, Any]] = []
        for cond in op.match_conditions or ():
            path = tuple(cond.path)
            conds.append({"d": {"$gte": len(path)}})
            labels = path if cond.match_type == "prefix" else tuple(reversed(path))
            tag = "l" if cond.match_type == "prefix" else "r"
            lead = 0
            if cond.match_type == "prefix":
                while lead < len(path) and path[lead] != "*":
                    lead += 1
                if lead:
                    conds.append({f"t{lead - 1}": self._ptok(path[:lead])})
            conds += [
                {f"{tag}{i}": self.codec.token("l", label)}
                for i, label in enumerate(labels)
                if label != "*" and i >= lead
            ]
        found: set[tuple[str, ...]] = set()
        for res in self._pages(self._namespaces, _and(conds), ["metadatas"]):
            metas = res["metadatas"] or []
            keys = self._keys_for([f"ns:{rid}" for rid in res["ids"]])
            for rid, meta in zip(res["ids"], metas, strict=True):
                try:
                    ns = tuple(self.codec.open(rid, str(meta["b"]), keys.get(f"ns:{rid}"))["ns"])
                except (SealError, KeyError, TypeError):
                    continue
                if all(_does_match(c, ns) for c in op.match_conditions or ()):
                    found.add(ns[: op.max_depth] if op.max_depth is not None else ns)
        return sorted(found)[op.offset : op.offset + op.limit]

    # ------------------------------------------------------------------ the writer

    def _submit(self, writes: list[_Write]) -> concurrent.futures.Future[None]:
        return self._submit_many([writes])[0]

    def _submit_many(
        self, batches: Sequence[list[_Write]], *, gather: Callable[[], bool] | None = None,
    ) -> list[concurrent.futures.Future[None]]:
        """Queue batches for the writer (each stored all or nothing), their texts for the embedding stage.

        ``gather``: the batches are background work (the intake journal's drain) that nobody waits for
        while ``gather()`` says True; the writer then commits them in larger groups (see :meth:`_gather_wait`).
        """
        subs = [_Submission(writes, gather=gather) for writes in batches]
        jobs: list[_EmbedJob] = []
        if self._embedders:
            for sub in subs:
                slots = [(w, j) for w in sub.writes if w.value is not None and w.vectors is None for j in range(len(w.texts))]
                for w in sub.writes:
                    if w.value is not None and w.vectors is None and w.texts:
                        w.vectors = [None] * len(w.texts)
                sub.todo = len(slots)
                jobs += [_EmbedJob(sub, slots[i : i + self.embed_batch]) for i in range(0, len(slots), self.embed_batch)]
        with self._cv:
            if self._closing:
                raise RuntimeError("this ChromaStore is closed")
            self._queue.extend(subs)
            self._queued_writes += sum(len(sub.writes) for sub in subs)
            self._embed_jobs.extend(jobs)
            self._cv.notify_all()
        return [sub.future for sub in subs]

    # The embedding stage: ``embed_workers`` threads embed queued texts (ONNX Runtime releases the
    # GIL, so they use every core) while the writer commits earlier batches. Jobs are taken in
    # queue order, so the writer, which commits in submission order, rarely waits.

    def _embed_loop(self) -> None:
        if self.embed_nice and hasattr(os, "setpriority") and hasattr(threading, "get_native_id"):
            # Linux: a thread's own nice value. Requests, reads and /healthz then pre-empt embedding.
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.embed_nice)
        assert self._embedder is not None
        while True:
            with self._cv:
                while not self._embed_jobs and not self._closing:
                    self._cv.wait()
                if not self._embed_jobs:
                    return
                jobs = [self._embed_jobs.popleft()]
                n = len(jobs[0].slots)
                while self._embed_jobs and n + len(self._embed_jobs[0].slots) <= self.embed_batch:
                    jobs.append(self._embed_jobs.popleft())
                    n += len(jobs[-1].slots)
            live = [j for j in jobs if j.sub.error is None]
            texts = list(dict.fromkeys(w.texts[k] for j in live for w, k in j.slots))  # identical texts once
            error: BaseException | None = None
            if texts:
                try:
                    vectors = self._embedder.documents(texts)
                    if len(vectors) != len(texts):
                        raise ValueError(f"the embedding function returned {len(vectors)} vectors for {len(texts)} texts")
                except BaseException as exc:  # noqa: BLE001 - the submissions fail, the worker lives on
                    error = exc
                else:
                    by_text = dict(zip(texts, vectors, strict=True))
                    for j in live:
                        for w, k in j.slots:
                            w.vectors[k] = by_text[w.texts[k]]  # type: ignore[index]
            with self._cv:
                if texts:
                    self.stats.embed_calls += 1
                    self.stats.texts_embedded += len(texts)
                for j in jobs:
                    if error is not None and j.sub.error is None:
                        j.sub.error = error
                    j.sub.todo -= len(j.slots)
                self._cv.notify_all()

    def _write_loop(self) -> None:
        while True:
            with self._cv:
                held: float | None = None  # since when the embedded head of the queue is held (_gather_wait)
                while True:
                    if self._queue and self._queue[0].todo == 0:
                        held = time.monotonic() if held is None else held
                        wait = self._gather_wait(held)
                        if wait <= 0:
                            break
                        self._cv.wait(timeout=wait)
                        continue
                    if self._closing and not self._queue:
                        break
                    if (
                        not self._cv.wait(timeout=self.probe_interval)
                        and self._consecutive_failures
                        and not self._queue
                    ):
                        break  # idle after failures: see below whether the backend is back
                if not self._queue and self._closing:
                    return
                take = self._take()
            if not take:
                self._probe()
                continue
            self._run(take)

    gather_writes = 256
    """Background writes (``_submit_many(gather=...)``) the writer gathers into one commit before it commits
    them, as long as more of them are still being embedded; see :meth:`_gather_wait`."""

    gather_hold = 1.0
    """Seconds the writer holds embedded background writes at most, waiting for the ones behind them."""

    def _gather_wait(self, held: float) -> float:
        """Under ``_cv``, the head of the queue embedded: seconds to hold it before committing (0: commit now).

        Why: a commit's cost is mostly per commit, not per write (the Chroma child's CPU per stored vote was
        2.4 ms in commits of 32 votes, 1.4 in commits of 128 and 1.0 in commits of 512; the writer's own 0.76,
        0.30 and 0.23 ms; docs/store.md, session 28), and the embedding stage hands the writer ~32 texts at a
        time, so the intake drain stored a burst in commits of ~31 votes. Background writes are therefore held
        while every queued submission is background work, fewer than ``gather_writes`` writes are embedded at
        the head and more are still being embedded behind them, for at most ``gather_hold`` seconds. Anything
        a caller waits for in the queue (a foreground write, a compaction, a reader that asked the drain to
        hurry: ``gather()`` False), a closing store, or nothing left embedding: commit now.
        """
        if self._closing:
            return 0.0
        asked: dict[int, bool] = {}
        ready = 0
        behind = False
        for sub in self._queue:
            if sub.task is not None or sub.gather is None:
                return 0.0
            ok = asked.get(id(sub.gather))
            if ok is None:
                ok = asked[id(sub.gather)] = bool(sub.gather())
            if not ok:
                return 0.0
            if sub.todo == 0 and not behind:
                ready += len(sub.writes)
            else:
                behind = True
        if not behind or ready >= self.gather_writes:
            return 0.0
        left = held + self.gather_hold - time.monotonic()
        return 0.0 if left <= 0 else min(left, 0.05)

    def _take(self) -> list[_Submission]:
        """Queued submissions from the head that are embedded, up to ``max_commit`` writes (always one)."""
        take: list[_Submission] = []
        n = 0
        if self._queue and self._queue[0].task is not None:
            sub = self._queue.popleft()
            self._queued_writes -= len(sub.writes)
            return [sub]
        while (self._queue and self._queue[0].todo == 0 and self._queue[0].task is None
               and (not take or n + len(self._queue[0].writes) <= self.max_commit)):
            sub = self._queue.popleft()
            take.append(sub)
            n += len(sub.writes)
        self._queued_writes -= n
        return take

    def _probe(self) -> None:
        """After failed commits and no traffic, a heartbeat decides whether the store is healthy again."""
        try:
            self._items.count()
        except Exception as exc:  # noqa: BLE001
            self.last_error = f"{type(exc).__name__}: {exc}"[:300]
        else:
            self._consecutive_failures = 0

    def _run(self, subs: list[_Submission]) -> None:
        task = subs[0].task
        if task is not None:
            sub = subs[0]
            if sub.future.set_running_or_notify_cancel():
                try:
                    sub.result = task()
                except BaseException as exc:  # noqa: BLE001 - the caller hears about it
                    sub.future.set_exception(exc)
                else:
                    sub.future.set_result(None)
            return
        try:
            self._run_commits(subs)
        finally:
            self._maybe_compact()

    def _run_commits(self, subs: list[_Submission]) -> None:
        live = []
        for s in subs:
            if not s.future.set_running_or_notify_cancel():
                continue
            if s.error is not None:  # its texts could not be embedded: nothing of it is written
                s.future.set_exception(s.error)
                continue
            live.append(s)
        if not live:
            return
        self.stats.submissions += len(live)
        try:
            self._commit([w for s in live for w in s.writes])
        except BaseException as exc:  # noqa: BLE001 - every waiter must hear about it
            self.stats.failed_commits += 1
            if len(live) == 1:
                live[0].future.set_exception(exc)
                return
            # A merged commit failed: give each caller its own commit, so one bad batch
            # (or a fault that hits one of them) fails nobody else.
            for sub in live:
                self.stats.isolated_retries += 1
                try:
                    self._commit(sub.writes)
                except BaseException as own:  # noqa: BLE001
                    sub.future.set_exception(own)
                else:
                    sub.future.set_result(None)
            return
        for sub in live:
            sub.future.set_result(None)

    def _journal_open(self, txn: str, body: dict[str, Any]) -> None:
        if self.ledger is not None:
            self.ledger.journal_open(txn, body)
        else:
            self._memory_journal[txn] = ("open", body)

    def _journal_state(self, txn: str, state: str) -> None:
        if self.ledger is not None:
            self.ledger.journal_state(txn, state)
        else:
            self._memory_journal[txn] = (state, self._memory_journal[txn][1])

    def _journal_close(self, txn: str) -> None:
        if self.ledger is not None:
            self.ledger.journal_close(txn)
        else:
            self._memory_journal.pop(txn, None)

    def _commit(self, writes: list[_Write]) -> None:
        """One atomic batch: stage vectors and namespaces, publish items, then finish deletions."""
        try:
            self._commit_inner(writes)
        except BaseException as exc:
            self._consecutive_failures += 1
            self.last_error = f"{type(exc).__name__}: {exc}"[:300]
            raise
        self._consecutive_failures = 0

    def _commit_inner(self, writes: list[_Write]) -> None:
        if not self._owns_dir:  # only the owner compacts, in this writer thread: it never has to follow
            self._follow_generation()
        by_id: dict[str, _Write] = {}
        fresh: set[str] = set()  # create-only puts that follow a delete of their key in this commit
        for w in writes:
            w.inserted = False
            prev = by_id.pop(w.iid, None)
            if w.only_new and prev is not None and prev.value is not None:
                by_id[w.iid] = prev  # an earlier put of this commit holds the key: the insert is a no-op
                continue
            fresh.discard(w.iid)
            if w.only_new and prev is not None:
                fresh.add(w.iid)
            by_id[w.iid] = w  # the last write of an item wins, in submission order
        ids = list(by_id)
        res = self._by_ids(self._items, ids, ["metadatas"])
        old_meta = {rid: dict(m or {}) for rid, m in zip(res["ids"], res["metadatas"], strict=True)}
        for iid in [i for i, w in by_id.items() if w.only_new and i not in fresh and i in old_meta]:
            del by_id[iid]  # create-only, and already stored
        old_docs = self._open_items(list(old_meta), list(old_meta.values()))
        puts = [w for w in by_id.values() if w.value is not None]
        dels = [w for w in by_id.values() if w.value is None and w.iid in old_meta]
        if not puts and not dels:
            return

        unembedded = [w for w in puts if w.texts and w.vectors is None]  # no embedding stage, or a retry
        flat = [t for w in unembedded for t in w.texts]
        if flat:
            assert self._embedder is not None
            vectors = self._embedder.documents(flat)
            if len(vectors) != len(flat):
                raise ValueError(f"the embedding function returned {len(vectors)} vectors for {len(flat)} texts")
            it = iter(vectors)
            for w in unembedded:
                w.vectors = [next(it) for _ in w.texts]

        new_ns = self._new_namespaces({w.ns for w in puts})
        # A namespace's tokens are HMACs: computed once per namespace of the commit, not once per item.
        ns_toks = {ns: (self._prefix_tokens(ns), self._ntok(ns)) for ns in {w.ns for w in puts}}
        keys = (
            self.ledger.ensure_keys([w.iid for w in puts] + [f"ns:{nid}" for nid in new_ns],
                                    members=self._index_rows(puts, new_ns, ns_toks))  # the namespace index (reads)
            if self.sealed and self.ledger is not None
            else {}
        )
        now = datetime.now(UTC).isoformat()
        txn = uuid.uuid4().hex
        item_ids, item_meta, vec_ids, vec_emb, vec_meta = [], [], [], [], []
        stale: list[str] = []
        for w in puts:
            old = old_docs.get(w.iid)
            doc = {
                "ns": list(w.ns),
                "k": w.key,
                "v": w.value,
                "c": w.created or (old["c"] if old else now),
                "u": w.updated or now,
                "ix": w.index,
            }
            toks, ntok = ns_toks[w.ns]
            item_ids.append(w.iid)
            item_meta.append({"b": self.codec.seal(w.iid, doc, keys.get(w.iid)), "n": ntok, "v": len(w.texts), **toks})
            for j in range(len(w.texts)):
                vec_ids.append(f"{w.iid}.{j}")
                vec_emb.append(w.vectors[j])  # type: ignore[index]
                vec_meta.append({"i": w.iid, **toks})
            old_n = int(old_meta.get(w.iid, {}).get("v", 0))
            stale += [f"{w.iid}.{j}" for j in range(len(w.texts), old_n)]
        updated = [w.iid for w in puts if w.iid in old_meta]
        before_vectors: dict[str, Any] = {}
        if updated and vec_ids:
            overwritten = [v for v in vec_ids if v.rsplit(".", 1)[0] in old_meta]
            if overwritten:
                res = self._vectors.get(ids=overwritten, include=["embeddings", "metadatas"])
                before_vectors = {
                    "ids": list(res["ids"]),
                    "embeddings": [[float(x) for x in e] for e in res["embeddings"]],
                    "metadatas": [dict(m or {}) for m in res["metadatas"] or []],
                }
        body = {
            "new_items": [i for i in item_ids if i not in old_meta],
            "new_vectors": [v for v in vec_ids if v.rsplit(".", 1)[0] not in old_meta],
            # Earlier versions of updated items: a failed publish may still have landed (a timeout
            # after the server applied it, or the first chunks of a huge batch), so roll back to them.
            "before_items": {i: old_meta[i] for i in updated},
            "before_vectors": before_vectors,
            "new_ns": list(new_ns),
            "new_keys": [i for i in item_ids if i not in old_meta] + [f"ns:{n}" for n in new_ns],
            "deletes": [
                {"i": w.iid, "v": int(old_meta[w.iid].get("v", 0)), "n": self._ntok(w.ns), "nid": self._nsid(w.ns)}
                for w in dels
            ],
            "stale": stale,
        }
        self._journal_open(txn, body)
        if not self._owns_dir:  # the owner's own compaction runs between its commits, never during one
            self._fence(txn, body)
        try:
            for sl in self._chunks(len(vec_ids)):
                self._vectors.upsert(ids=vec_ids[sl], embeddings=vec_emb[sl], metadatas=vec_meta[sl])
            if new_ns:
                nids = list(new_ns)
                self._namespaces.upsert(
                    ids=nids,
                    embeddings=[_placeholder(i) for i in nids],
                    metadatas=[self._ns_meta(nid, new_ns[nid], keys.get(f"ns:{nid}")) for nid in nids],
                )
            for sl in self._chunks(len(item_ids)):  # the commit point (one call unless the batch is huge)
                self._items.upsert(
                    ids=item_ids[sl], embeddings=[_placeholder(i) for i in item_ids[sl]], metadatas=item_meta[sl]
                )
        except BaseException:
            try:
                self._rollback(body)
            except BaseException:  # noqa: BLE001 - the journal keeps it for the next start
                log.exception("rolling back a failed batch failed; it will be rolled back when the store reopens")
            else:
                self._journal_close(txn)
                self.stats.rollbacks += 1
            raise
        self._journal_state(txn, "committed")
        self._known_ns.update(new_ns)
        self._finish(body)
        self._journal_close(txn)
        if dels and self.ledger is not None:
            self.ledger.checkpoint()  # the journal row is zeroed in the file too, not only in the WAL
        for w in puts:
            w.inserted = w.only_new
        self.stats.commits += 1
        self.stats.writes += len(by_id)
        self.stats.largest_commit = max(self.stats.largest_commit, len(by_id))

    def _chunks(self, n: int) -> Iterator[slice]:
        for start in range(0, n, self._max_batch):
            yield slice(start, start + self._max_batch)

    def _ns_meta(self, nid: str, ns: tuple[str, ...], key: bytes | None) -> dict[str, Any]:
        meta: dict[str, Any] = {"b": self.codec.seal(nid, {"ns": list(ns)}, key), "d": len(ns), **self._prefix_tokens(ns)}
        for i, label in enumerate(ns):
            meta[f"l{i}"] = self.codec.token("l", label)
        for i, label in enumerate(reversed(ns)):
            meta[f"r{i}"] = self.codec.token("l", label)
        return meta

    def _new_namespaces(self, namespaces: set[tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
        """Namespaces of this commit that have no registry record yet (known ones are cached)."""
        cand = {self._nsid(ns): ns for ns in namespaces}
        unknown = [nid for nid in cand if nid not in self._known_ns]
        if not unknown:
            return {}
        res = self._namespaces.get(ids=unknown, include=[])
        self._known_ns.update(res["ids"])
        return {nid: cand[nid] for nid in unknown if nid not in set(res["ids"])}

    def _rollback(self, body: dict[str, Any]) -> None:
        """Undo a batch that did not reach (or did not finish) its commit point; idempotent."""
        if body["new_items"]:
            for sl in self._chunks(len(body["new_items"])):
                self._items.delete(ids=body["new_items"][sl])
        before = body.get("before_items") or {}
        if before:
            ids = list(before)
            for sl in self._chunks(len(ids)):
                self._items.upsert(
                    ids=ids[sl], embeddings=[_placeholder(i) for i in ids[sl]], metadatas=[before[i] for i in ids[sl]]
                )
        if body["new_vectors"]:
            for sl in self._chunks(len(body["new_vectors"])):
                self._vectors.delete(ids=body["new_vectors"][sl])
        bv = body.get("before_vectors") or {}
        if bv.get("ids"):
            self._vectors.upsert(ids=bv["ids"], embeddings=bv["embeddings"], metadatas=bv["metadatas"])
        if body["new_ns"]:
            self._namespaces.delete(ids=body["new_ns"])
            self._known_ns.difference_update(body["new_ns"])
        if self.sealed and self.ledger is not None and body["new_keys"]:
            self.ledger.destroy(body["new_keys"])

    def _finish(self, body: dict[str, Any], attempts: int = 3) -> None:
        """Past the commit point: remove stale vectors and deleted items, erasing them for good."""
        for attempt in range(attempts):
            try:
                self._erase(body)
                return
            except Exception:
                if attempt == attempts - 1:
                    raise
                time.sleep(0.05 * 2**attempt)

    def _erase(self, body: dict[str, Any]) -> None:
        dels = body["deletes"]
        vec_ids = list(body["stale"]) + [f"{d['i']}.{j}" for d in dels for j in range(int(d["v"]))]
        if vec_ids:
            # Overwrite before deleting: a deleted HNSW element keeps its vector on disk, an
            # overwritten one does not. Then make the segment persist (see _flush_vectors).
            present = self._vectors.get(ids=vec_ids, include=["embeddings"])
            found = list(present["ids"])
            if found:
                dim = len(present["embeddings"][0])
                for sl in self._chunks(len(found)):
                    n = len(found[sl])
                    self._vectors.upsert(ids=found[sl], embeddings=[_scrub_vector(dim)] * n, metadatas=[{"i": ""}] * n)
                for sl in self._chunks(len(found)):
                    self._vectors.delete(ids=found[sl])
                self._deleted_since_count += len(found)
                self._flush_vectors(dim)
        if not dels:
            return
        gone = [d["i"] for d in dels]
        for sl in self._chunks(len(gone)):
            self._items.delete(ids=gone[sl])
        emptied: list[str] = []
        for ntok, nid in {(d["n"], d["nid"]) for d in dels}:
            if not self._items.get(where={"n": ntok}, limit=1, include=[])["ids"]:
                emptied.append(nid)
        if emptied:
            self._namespaces.delete(ids=emptied)
            self._known_ns.difference_update(emptied)
        self._deleted_since_count += len(gone) + len(emptied)
        if self.ledger is not None:
            if self.sealed:
                self.ledger.destroy(gone + [f"ns:{n}" for n in emptied])
            else:
                self.ledger.checkpoint()

    def _flush_vectors(self, dim: int) -> None:
        """Make the HNSW segment persist now, so scrubbed vectors are overwritten on disk before we return.

        Chroma persists a vector segment after ``sync_threshold`` log records; upserting that many
        fixed sentinel records (always the same ids, so they never accumulate) crosses it.
        """
        n = self._sync_threshold
        ids = [f"{_FLUSH_PREFIX}{k}" for k in range(n)]
        embs = [_sentinel_vector(dim, k) for k in range(n)]
        for sl in self._chunks(n):
            self._vectors.upsert(ids=ids[sl], embeddings=embs[sl], metadatas=[{"i": ""}] * len(ids[sl]))

    def _recover(self) -> None:
        """Finish or roll back batches that a crashed process left in the journal."""
        if self.ledger is None:
            return
        for txn, state, body in self.ledger.journal_orphans():
            try:
                if state == "open":
                    self._rollback(body)
                else:
                    self._finish(body)
            except Exception:
                log.exception("could not recover batch %s; it stays in the journal", txn)
                continue
            self.ledger.journal_close(txn)
            self.stats.recovered += 1
            log.warning("recovered an interrupted batch (%s at crash time)", state)

    # ------------------------------------------------------------------ generations and compaction
    #
    # chromadb 1.5.9's local HNSW index never reuses the slot of a deleted record: with deletes
    # balancing writes, the index (memory and data_level0.bin) grows with every record ever written.
    # A compaction copies the live records (ids, vectors, metadata: no re-embedding, blobs stay
    # sealed with the same keys) into the collections of the next generation, switches to them in
    # the ledger (one transaction), then deletes the old ones. It runs in the writer between
    # commits, so no write of this store lands in the old generation after the copy; writers of
    # other processes see the ledger's mark after opening their journal row and wait (``_fence``).

    def _gen_ledger(self) -> Ledger | None:
        """The ledger that records generations: this directory's own file (not a shared Postgres one)."""
        return self.ledger if isinstance(self.ledger, Ledger) else None

    def _generation(self, gen: int) -> tuple[Any, Any, Any]:
        """The items, vectors and namespaces collections of generation ``gen`` (created if missing)."""
        items_name, vectors_name, ns_name = generation_names(self.collection_name, gen)
        hnsw = {"sync_threshold": self._hnsw_sync}
        items = self.client.get_or_create_collection(
            items_name,
            embedding_function=None,
            metadata={"synth_agent_layout": LAYOUT, "synth_agent_sealed": self.sealed},
            configuration={"hnsw": {**hnsw, "sync_threshold": max(self._hnsw_sync, 256)}},
        )
        vectors = self.client.get_or_create_collection(
            vectors_name, embedding_function=None, configuration={"hnsw": {**hnsw, "space": "cosine"}}
        )
        namespaces = self.client.get_or_create_collection(ns_name, embedding_function=None, configuration={"hnsw": hnsw})
        return items, vectors, namespaces

    def _drop_generations(self, keep: int, *, leftover: bool = True) -> list[str]:
        """Delete the collections of every generation but ``keep`` (a crash left them: a half-built next
        generation, or the previous one after the switch), and the HNSW directories they leave behind."""
        keep_names = set(generation_names(self.collection_name, keep))
        gone = []
        for col in self.client.list_collections():
            name = col if isinstance(col, str) else col.name
            if is_generation_name(self.collection_name, name) and name not in keep_names:
                with contextlib.suppress(Exception):  # already gone (another process, a retry)
                    self.client.delete_collection(name)
                    gone.append(name)
        if gone:
            (log.warning if leftover else log.info)(
                "removed %d collection(s) of an earlier or unfinished compaction: %s", len(gone), ", ".join(gone))
            if self.path is not None:
                _remove_orphan_segment_dirs(self.path)
        return gone

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        """Counts a read against the generation it started on, so a compaction deletes the old
        generation only once the reads that may still use it are done."""
        if not self._owns_dir:
            self._follow_generation()
        with self._gen_cv:
            if self._restarting:  # the local Chroma server restarts after a compaction: a few seconds
                self._gen_cv.wait_for(lambda: not self._restarting, timeout=120)
            gen = self._gen
            self._gen_readers[gen] = self._gen_readers.get(gen, 0) + 1
        try:
            yield
        finally:
            with self._gen_cv:
                self._gen_readers[gen] -= 1
                if not self._gen_readers[gen]:
                    del self._gen_readers[gen]
                    self._gen_cv.notify_all()

    def _switch_to(self, gen: int, cols: tuple[Any, Any, Any] | None = None) -> None:
        items, vectors, namespaces = cols if cols is not None else self._generation(gen)
        with self._gen_cv:  # reads starting from here use the new generation
            self._items, self._vectors, self._namespaces = items, vectors, namespaces
            self._gen = gen

    def _follow_generation(self) -> None:
        """Switch to the generation the ledger says is active, if another process compacted."""
        ledger = self._gen_ledger()
        if ledger is not None:
            gen, _ = ledger.generation(self.collection_name)
            if gen != self._gen:
                self._switch_to(gen)

    def _fence(self, txn: str, body: dict[str, Any]) -> None:
        """Called with this commit's journal row open, before it writes: wait while another store
        compacts, and follow a generation switch made by another process."""
        ledger = self._gen_ledger()
        if ledger is None:
            return
        deadline = time.monotonic() + 600
        while True:
            gen, mark = ledger.generation(self.collection_name)
            if mark is None or mark == self._compact_token or not owner_alive(mark.split("#")[0]):
                if gen != self._gen:
                    self._switch_to(gen)
                return
            # The compaction waits for journal rows like ours: step out of its way, then come back.
            ledger.journal_close(txn)
            while ledger.generation(self.collection_name)[1] == mark and owner_alive(mark.split("#")[0]):
                if time.monotonic() > deadline:
                    raise TimeoutError("a compaction of this store by another process has held writes for 600 s")
                time.sleep(0.05)
            ledger.journal_open(txn, body)

    def compact(self, *, progress: Callable[[str, int, int], None] | None = None) -> CompactionResult:
        """Copy the live records into a new generation of collections, switch to it, delete the old one.

        Bounds what deleted records cost: chromadb's local HNSW index never reuses a deleted
        record's slot (docs/store.md, "Compaction"). Runs in the writer between commits: writes
        queue meanwhile (they are not lost, and not duplicated), reads go on against the old
        generation until the switch. Crash-safe at every step: the ledger says which generation
        is active, and opening the store removes a half-built or a superseded one.
        ``progress(collection, copied, total)`` is called from the writer thread as records are copied.
        Needs the store's own ledger file (a local directory, or ``ledger=`` a file path).
        """
        if self._gen_ledger() is None:
            raise ValueError("compaction needs the store's own ledger file (a local directory, or ledger=<file>)")
        if self.path is not None and not self._owns_dir:
            raise ValueError(f"the store in {self.path} is served by another process (synth-agent serve or worker); "
                             "it compacts on its own (SYNTH_AGENT_COMPACT_RATIO, default 1); stop it to compact now")
        sub = _Submission([], task=lambda: self._compact_now(progress))
        with self._cv:
            if self._closing:
                raise RuntimeError("this ChromaStore is closed")
            self._queue.append(sub)
            self._cv.notify_all()
        sub.future.result()
        return sub.result  # type: ignore[no-any-return]

    async def acompact(self, *, progress: Callable[[str, int, int], None] | None = None) -> CompactionResult:
        """Async twin of :meth:`compact` (waits in a worker thread)."""
        return await asyncio.to_thread(self.compact, progress=progress)

    def _maybe_compact(self) -> None:
        """After commits (writer thread): count deletes in the ledger; compact when they reach the threshold."""
        n, self._deleted_since_count = self._deleted_since_count, 0
        ledger = self._gen_ledger()
        if not n or ledger is None:
            return
        try:
            total = ledger.count_deletes(self.collection_name, n)
            if not self._owns_dir or self.compact_ratio <= 0 or total < self.compact_min:
                return
            live = int(self._items.count()) + int(self._vectors.count()) + int(self._namespaces.count())
            if total < self.compact_ratio * live or live > self.compact_max_records:
                return
            res = self._compact_now(None)
            log.info("compacted the store: generation %d, %d items, %d vectors in %.1fs (%d deleted records before)",
                     res.generation, res.items, res.vectors, res.seconds, res.deleted_before)
        except Exception:  # noqa: BLE001 - a failed compaction leaves the active generation as it was
            log.exception("automatic compaction failed; the store stays on its current generation")

    def _compact_now(self, progress: Callable[[str, int, int], None] | None) -> CompactionResult:
        """The compaction itself, in the writer thread (see :meth:`compact`)."""
        ledger = self._gen_ledger()
        assert ledger is not None
        name, token = self.collection_name, self._compact_token
        t0 = time.monotonic()
        if not ledger.compaction_begin(name, token):
            _, mark = ledger.generation(name)
            if mark is not None and not owner_alive(mark.split("#")[0]):
                ledger.compaction_end(name, mark, None)  # left by a process that died
            if not ledger.compaction_begin(name, token):
                raise RuntimeError("another process is compacting this store")
        new_cols: tuple[Any, Any, Any] | None = None
        restart = self.restart_after_compact and self._server is not None and not self._server.attached
        try:
            if restart:
                assert self._server is not None
                self._server.prepare_restart()  # the next Chroma child imports chromadb during the copy
            deadline = time.monotonic() + 60
            while ledger.live_journal_owners(exclude=""):  # batches of other processes begun before our mark
                if time.monotonic() > deadline:
                    raise TimeoutError("other processes kept batches in flight for 60 s; compaction skipped")
                time.sleep(0.05)
            gen, _ = ledger.generation(name)
            if gen != self._gen:
                self._switch_to(gen)
            deleted = self._deletes_counted(ledger)
            self._drop_generations(keep=gen)
            new_cols = self._generation(gen + 1)
            counts = self._copy_into(new_cols, progress)
            if self.sealed:
                ledger.mark_members_complete(new_cols[0].name)  # same ids: the namespace index holds
            self._fault("copied")
        except BaseException:
            if restart:
                assert self._server is not None
                self._server.discard_spare()
            ledger.compaction_end(name, token, None)
            if new_cols is not None:
                with contextlib.suppress(Exception):
                    self._drop_generations(keep=self._gen)
            raise
        ledger.compaction_end(name, token, gen + 1)  # the switch
        old = self._gen
        self._switch_to(gen + 1, new_cols)
        seconds = time.monotonic() - t0
        self.stats.compactions += 1
        self._fault("switched")
        with self._gen_cv:  # reads that began on the old generation finish first (bounded)
            removed = self._gen_cv.wait_for(lambda: not self._gen_readers.get(old), timeout=30)
        if removed:
            try:
                self._drop_generations(keep=gen + 1, leftover=False)
            except Exception:  # noqa: BLE001 - left for the next open or compaction
                log.exception("could not delete the previous generation; it is removed at the next open")
                removed = False
        if removed and restart:
            self._restart_server()
        elif restart:
            assert self._server is not None
            self._server.discard_spare()
        if self._owns_dir:
            _give_back_free_memory()
        return CompactionResult(gen + 1, counts[0], counts[1], counts[2], deleted, seconds, removed)

    def _restart_server(self) -> None:
        """Restart the local Chroma server (writer thread, after a compaction): new reads wait, reads in
        flight finish first; then the active generation's collections, through the same client.

        The client is kept when the server comes back on its port (the usual case; its connection pool
        drops the connections the old process closed): every ``chromadb.HttpClient`` registers its
        System (HTTP session, TLS context) in a class-level registry of chromadb 1.5.9 twice, and its
        ``close()`` releases only one of them, so a new client per restart leaked one System each
        (bench/compact_mem.py; docs/store.md, "Compaction")."""
        assert self._server is not None
        with self._gen_cv:
            self._restarting = True
            self._gen_cv.wait_for(lambda: not self._gen_readers, timeout=30)
        address = (self._server.host, self._server.port)
        try:
            self._server.restart()
            if (self._server.host, self._server.port) != address:  # the port was taken meanwhile (rare)
                old, self.client = self.client, http_client(self._server.host, self._server.port)
                with contextlib.suppress(Exception):
                    old.close()  # gives back one of the two systems chromadb 1.5.9 registers per client
            cols = self._generation(self._gen)
            with self._gen_cv:
                self._items, self._vectors, self._namespaces = cols
        finally:
            with self._gen_cv:
                self._restarting = False
                self._gen_cv.notify_all()

    def _fault(self, step: str) -> None:
        """Fault injection for tests (``store._compact_fault = fn``): called after each compaction step."""
        hook = getattr(self, "_compact_fault", None)
        if hook is not None:
            hook(step)

    def _deletes_counted(self, ledger: Ledger) -> int:
        return ledger.count_deletes(self.collection_name, 0)

    def _copy_into(self, cols: tuple[Any, Any, Any], progress: Callable[[str, int, int], None] | None) -> tuple[int, int, int]:
        """Copy every live record (ids, vectors, metadata, documents) of the active generation into ``cols``."""
        import numpy as np

        items, vectors, namespaces = cols
        conf = {k: v for k, v in (self._vectors.metadata or {}).items() if not k.startswith("hnsw:")}
        if conf:
            vectors.modify(metadata=conf)  # the embedding model the vectors were made with
        counts = []
        for label, src, dst in (("namespaces", self._namespaces, namespaces), ("vectors", self._vectors, vectors),
                                ("items", self._items, items)):
            ids = [i for i in src.get(include=[])["ids"] if not i.startswith(_FLUSH_PREFIX)]
            page = min(self._max_batch, 256)  # small pages, vectors as float32 arrays: little Python work per copy
            for start in range(0, len(ids), page):
                res = src.get(ids=ids[start : start + page], include=["embeddings", "metadatas", "documents"])
                if not len(res["ids"]):
                    continue
                docs = res.get("documents")
                kw: dict[str, Any] = {}
                if docs is not None and any(d is not None for d in docs):
                    kw["documents"] = list(docs)
                dst.upsert(ids=list(res["ids"]), embeddings=np.asarray(res["embeddings"], dtype=np.float32),
                           metadatas=[dict(m or {}) for m in res["metadatas"]], **kw)
                if progress is not None:
                    progress(label, min(start + page, len(ids)), len(ids))
            counts.append(len(ids))
        if counts[1] and self._embedder is not None:
            dim = len(vectors.get(limit=1, include=["embeddings"])["embeddings"][0])
            self._vectors_flush_into(vectors, dim)
        return counts[2], counts[1], counts[0]

    def _vectors_flush_into(self, vectors: Any, dim: int) -> None:
        """The erasure flush's sentinel records, in a new vectors collection (so they never accumulate)."""
        n = self._sync_threshold
        ids = [f"{_FLUSH_PREFIX}{k}" for k in range(n)]
        vectors.upsert(ids=ids, embeddings=[_sentinel_vector(dim, k) for k in range(n)], metadatas=[{"i": ""}] * n)


    # ------------------------------------------------------------------ maintenance

    def reindex(self) -> int:
        """Re-embed every indexed item with this store's embedding function; returns the items re-embedded.

        Each item is re-embedded on the fields it was indexed on (``index`` given to ``put``, or the
        store's ``index_fields``). Runs through the writer, a page at a time.
        """
        if self._embedder is None:
            raise ValueError("reindex needs an embedding_function")
        done = 0
        for res in list(self._pages(self._items, {"v": {"$gt": 0}}, ["metadatas"])):
            docs = self._open_items(res["ids"], res["metadatas"] or [])
            writes = []
            for doc in docs.values():
                ns, key = tuple(doc["ns"]), doc["k"]
                index = doc.get("ix")
                writes.append(
                    _Write(self._iid(ns, key), ns, key, doc["v"], texts=self._texts(doc["v"], index), index=index,
                           created=doc["c"], updated=doc["u"])
                )
            if writes:
                self._submit(writes).result()
                done += len(writes)
        if self.embedding_model:
            self._record_model()
        return done

    def _migrate_v1(self, legacy: Any) -> int:
        """Copy every item of a v1-layout collection into this (v2) store, then drop the v1 collections.

        v1 kept values in the clear: Chroma's files may still hold them in free pages after this;
        run ``chroma utils vacuum --path <dir>`` once, with the store stopped, to reclaim them.
        """
        moved = 0
        for res in list(self._pages(legacy, None, ["metadatas"])):
            writes = []
            for meta in res["metadatas"] or []:
                ns, key = tuple(json.loads(meta["ns"])), str(meta["key"])
                index = json.loads(meta["index"]) if meta.get("index") else None
                value = json.loads(meta["value"])
                texts = self._texts(value, index if index is not None else (None if int(meta.get("nvec", 0)) else False))
                writes.append(
                    _Write(self._iid(ns, key), ns, key, value, texts=texts, index=index,
                           created=str(meta["created_at"]), updated=str(meta["updated_at"]))
                )
            if writes:
                self._submit(writes).result()
                moved += len(writes)
        for name in (self.collection_name, f"{self.collection_name}_vectors", f"{self.collection_name}_namespaces"):
            with contextlib.suppress(Exception):
                self.client.delete_collection(name)
        if self.embedding_model:
            self._record_model()
        return moved

    def count(self) -> int:
        """Number of items in the store (all namespaces)."""
        with self._reading():
            return int(self._items.count())

    def health(self) -> dict[str, Any]:
        """Cheap, non-blocking health: never waits on Chroma or on a commit in flight."""
        writer_ok = self._writer.is_alive() and not self._closing
        server_ok = self._server is None or self._server.alive()
        pending = self._queued_writes  # an int read: no lock, never waits on the writer
        ok = writer_ok and server_ok and self._consecutive_failures < 3
        out: dict[str, Any] = {"ok": ok, "pending_writes": pending, "commits": self.stats.commits}
        if self.intake is not None:
            out.update(self.intake.status())
        if not server_ok:
            out["error"] = "the local Chroma server process is not running"
        elif self._consecutive_failures:
            out["error"] = self.last_error
        return out

    def close(self) -> None:
        """Finish queued writes, then stop the writer (and the local Chroma server this store started)."""
        if self.intake is not None and not self._closing:
            # Store what is journaled first if the backend answers (a bounded wait); what is left is
            # replayed by the next owner of the directory.
            self.intake.close(drain=self._consecutive_failures == 0)
        with self._cv:
            if self._closing:
                return
            self._closing = True
            self._cv.notify_all()
        if self._writer.is_alive() and threading.current_thread() is not self._writer:
            self._writer.join()
        for t in self._embedders:
            if t.is_alive() and threading.current_thread() is not t:
                t.join()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if self.ledger is not None:
            self.ledger.close()
        if self._owns_client:
            close_client(self.client)
        if self._server is not None:
            self._server.stop()
        if self._own_lock is not None:
            self._own_lock.release()
            self._own_lock = None

    def __enter__(self) -> ChromaStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _chain_inserted(
    src: concurrent.futures.Future[None],
    dst: asyncio.Future[list[bool]],
    writes: list[_Write],
    loop: asyncio.AbstractEventLoop,
) -> None:
    """Resolve ``dst`` (in ``loop``) with the writes' ``inserted`` flags once the writer is done with ``src``."""

    def settle(f: concurrent.futures.Future[None]) -> None:
        if dst.done():
            return
        if f.cancelled():
            dst.cancel()
        elif f.exception() is not None:
            dst.set_exception(f.exception())  # type: ignore[arg-type]
        else:
            dst.set_result([w.inserted for w in writes])

    def cancel_src(d: asyncio.Future[list[bool]]) -> None:
        if d.cancelled():
            src.cancel()  # not committed yet: the writer skips it

    dst.add_done_callback(cancel_src)
    src.add_done_callback(lambda f: loop.call_soon_threadsafe(settle, f))


def _give_back_free_memory() -> None:
    """glibc's ``malloc_trim(0)`` once, after a compaction (a no-op off glibc).

    The copy reads and writes every live record in pages (HTTP bodies, JSON, float32 arrays):
    memory freed afterwards stays with malloc, fragmented, and counts as this process's RSS. In
    ``bench/compact_mem.py`` (6 compactions of 1,000 items + 1,000 vectors, served store) RSS went
    up in steps of 35-60 MB while the Python heap stayed at 52 MB; a ``malloc_trim`` after each
    round held it flat at 212 MB (docs/store.md, "Compaction"). ctypes releases the GIL for the call.
    """
    trim = malloc_trim_function()
    if trim is None:
        return
    t = time.perf_counter()
    trim(0)
    log.debug("malloc_trim after the compaction: %.0f ms", (time.perf_counter() - t) * 1000)


def _remove_orphan_segment_dirs(path: Path) -> int:
    """Remove HNSW segment directories of deleted collections (chromadb 1.5.9 leaves them on disk).

    A stop-gap, as later chromadb releases do themselves: a directory named by a UUID that is not a
    segment in Chroma's catalogue belongs to no collection. Reads the catalogue read-only.
    """
    import shutil
    import sqlite3

    db = path / "chroma.sqlite3"
    if not db.exists():
        return 0
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        live = {str(r[0]) for r in con.execute("SELECT id FROM segments")}
    except sqlite3.Error:
        return 0
    finally:
        con.close()
    removed = 0
    for d in path.iterdir():
        try:
            UUID(d.name)
        except ValueError:
            continue
        if d.is_dir() and d.name not in live:
            shutil.rmtree(d, ignore_errors=True)
            removed += 1
    return removed


def _scrub_vector(dim: int) -> list[float]:
    return [1.0] + [0.0] * (dim - 1)


def _sentinel_vector(dim: int, k: int) -> list[float]:
    v = [0.0] * dim
    v[k % dim] = 1.0
    v[(k * 7 + 3) % dim] += 0.5
    return v


__all__ = ["LAYOUT", "ChromaStore", "CompactionResult", "EmbeddingFunctionLike", "WriterStats"]
