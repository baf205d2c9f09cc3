"""A LangGraph ``BaseStore`` backed by Chroma (embedded directory or Chroma server).

Layout (three collections, so each query touches only what it needs):

* ``<collection>``: one record per item. Metadata holds the namespace as JSON
  (exact round trip of any label), one key per level (``ns_0``, ``ns_1``, ... and
  ``depth``) and one per prefix (``p_0``, ``p_1``, ...: the JSON of the first
  i+1 labels) so that a namespace prefix becomes one selective Chroma ``where``, the key,
  timestamps and the value as JSON. Chroma insists on an embedding per record,
  so items carry a tiny deterministic placeholder vector and are never ranked.
* ``<collection>_vectors``: one record per embedded text (an item indexed on
  several fields or on ``list[*]`` paths has several), cosine space. Semantic
  search ranks these and max-pools them per item, like ``InMemoryStore``.
* ``<collection>_namespaces``: one record per non-empty namespace, with levels
  from the front (``ns_i``) and from the back (``rs_i``), so ``list_namespaces``
  filters prefixes/suffixes in Chroma instead of scanning every item.

Writes are serialised per store instance (a thread lock) because an update is a
read-modify-write over the three collections; reads run concurrently. Value
filters are applied in Python after the namespace ``where``, with paging.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
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

if TYPE_CHECKING:
    from synth_agent.config import Settings

EmbeddingFunctionLike = Embeddings | Callable[[list[str]], Any]
"""A LangChain ``Embeddings``, a Chroma embedding function, or any ``texts -> vectors`` callable."""

_PAGE = 1000
_FILTER_OPS = ("$eq", "$ne", "$gt", "$gte", "$lt", "$lte")


class _Embedder:
    """Adapts the accepted embedding callables to two sync functions returning plain float lists."""

    def __init__(self, ef: EmbeddingFunctionLike) -> None:
        self._lock = threading.Lock()
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
        # Serialised: a user's embedding function need not be thread safe.
        with self._lock:
            out = self._docs(texts)
        return [[float(x) for x in vec] for vec in out]

    def query(self, text: str) -> list[float]:
        with self._lock:
            out = self._query(text)
        return [float(x) for x in out]


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


def _dumps(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=_json_default)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"store values must be JSON-serializable dicts: {exc}") from exc


def _item_id(namespace: tuple[str, ...], key: str) -> str:
    raw = json.dumps([list(namespace), key], ensure_ascii=False)
    return hashlib.sha256(raw.encode()).hexdigest()[:40]


def _ns_id(namespace: tuple[str, ...]) -> str:
    return hashlib.sha256(json.dumps(list(namespace), ensure_ascii=False).encode()).hexdigest()[:40]


def _placeholder(record_id: str) -> list[float]:
    """A cheap 2-d vector derived from the id: distinct points keep Chroma's HNSW graph healthy."""
    return [int(record_id[:8], 16) / 2**32 + 0.5, int(record_id[8:16], 16) / 2**32 + 0.5]


def _prefix_key(prefix: Sequence[str]) -> str:
    return json.dumps(list(prefix), ensure_ascii=False)


def _level_meta(namespace: tuple[str, ...], *, reverse: bool = False) -> dict[str, Any]:
    """Per-level keys (``ns_i``) for wildcard matching, and one key per whole prefix (``p_i``).

    ``p_i`` makes a namespace-prefix filter a single selective equality: Chroma
    evaluates each ``$and`` clause on its own, and clauses such as ``ns_0 ==
    "synth_agent"`` match every record, which made per-user queries O(collection).
    """
    meta: dict[str, Any] = {"depth": len(namespace)}
    for i, label in enumerate(namespace):
        meta[f"ns_{i}"] = label
        meta[f"p_{i}"] = _prefix_key(namespace[: i + 1])
    if reverse:
        for i, label in enumerate(reversed(namespace)):
            meta[f"rs_{i}"] = label
    return meta


def _and(conds: list[dict[str, Any]]) -> dict[str, Any] | None:
    if not conds:
        return None
    return conds[0] if len(conds) == 1 else {"$and": conds}


def _prefix_where(prefix: Sequence[str]) -> dict[str, Any] | None:
    return {f"p_{len(prefix) - 1}": _prefix_key(prefix)} if prefix else None


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


def _matches(value: dict[str, Any], flt: dict[str, Any] | None) -> bool:
    return not flt or all(_compare(value.get(k), v) for k, v in flt.items())


def _does_match(cond: MatchCondition, namespace: tuple[str, ...]) -> bool:
    path = tuple(cond.path)
    if len(namespace) < len(path):
        return False
    pairs = (
        zip(namespace, path, strict=False)
        if cond.match_type == "prefix"
        else zip(reversed(namespace), reversed(path), strict=False)
    )
    if cond.match_type not in ("prefix", "suffix"):
        raise ValueError(f"unsupported match type {cond.match_type!r}; use 'prefix' or 'suffix'")
    return all(p == "*" or n == p for n, p in pairs)


class ChromaStore(BaseStore):
    """LangGraph ``BaseStore`` persisted in Chroma, with optional semantic search.

    Give ``path`` for the embedded store (default), ``host``/``port`` for a Chroma
    server, or a ready ``client``. Without ``embedding_function`` the store has no
    vector index and a search ``query`` is ignored (as in ``InMemoryStore``).
    ``index_fields`` are the default JSON paths embedded on ``put`` (``["$"]``,
    the whole value, when not given); ``put(..., index=[...])`` overrides them and
    ``index=False`` stores an item that never appears as a semantic hit.

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
    ) -> None:
        if sum(x is not None for x in (path, client, host)) > 1:
            raise ValueError("give only one of path= (embedded), host=/port= (server) or client=")
        if len(collection) < 3:
            raise ValueError(
                f"collection name {collection!r} is too short: Chroma needs at least 3 characters"
            )
        if client is None:
            import chromadb
            from chromadb.config import Settings as ChromaSettings

            settings = ChromaSettings(anonymized_telemetry=False)
            if host is not None:
                client = chromadb.HttpClient(host=host, port=port or 8000, settings=settings)
            elif path is not None:
                Path(path).mkdir(parents=True, exist_ok=True)
                client = chromadb.PersistentClient(path=str(path), settings=settings)
            else:
                raise ValueError(
                    "ChromaStore needs a place to keep data: path= (a directory), host=/port= (a Chroma "
                    "server) or client="
                )
        self.client = client
        self.collection_name = collection
        self._items = client.get_or_create_collection(collection, embedding_function=None)
        self._vectors = client.get_or_create_collection(
            f"{collection}_vectors", embedding_function=None, configuration={"hnsw": {"space": "cosine"}}
        )
        self._namespaces = client.get_or_create_collection(
            f"{collection}_namespaces", embedding_function=None
        )
        self._embedder = _Embedder(embedding_function) if embedding_function is not None else None
        fields = list(index_fields) if index_fields else ["$"]
        self.index_fields = fields
        self.index_config: dict[str, Any] | None = {"fields": fields} if self._embedder else None
        self._tokenized = [(p, p if p == "$" else tokenize_path(p)) for p in fields]
        self._write_lock = threading.Lock()
        try:
            self._max_batch = int(client.get_max_batch_size())
        except Exception:  # noqa: BLE001 - older/remote clients may not expose it
            self._max_batch = 1000
        self.embedding_model: str | None = getattr(embedding_function, "model_id", None)
        self.reindexed: int | None = self.reindex() if reindex else None
        """Items re-embedded when opened with ``reindex=True``."""
        if not reindex:
            self._check_embedding_model()

    # ------------------------------------------------------------------ embedding model

    def _recorded_model(self) -> str | None:
        return (self._vectors.metadata or {}).get("embedding_model")

    def _record_model(self) -> None:
        meta = {k: v for k, v in (self._vectors.metadata or {}).items() if not k.startswith("hnsw:")}
        self._vectors.modify(metadata={**meta, "embedding_model": self.embedding_model})

    def _check_embedding_model(self) -> None:
        """Vectors of two models are not comparable: refuse to mix them, say how to migrate.

        Collections written before models were recorded were all made with all-MiniLM-L6-v2 (the
        torch build of the same model, cosine >= 0.999 to the ONNX vectors), so they are adopted.
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

    def reindex(self) -> int:
        """Re-embed every indexed item with this store's embedding function; returns the items re-embedded.

        Each item is re-embedded on the fields it was indexed on (``index`` given to ``put``, or the
        store's ``index_fields``). Old vectors are replaced item by item under the write lock, so
        readers see either vector of an item, never none; run it once after changing the model.
        """
        if self._embedder is None:
            raise ValueError("reindex needs an embedding_function")
        done = 0
        with self._write_lock:
            for _, meta in list(self._pages(self._items, {"nvec": {"$gt": 0}})):
                ns = tuple(json.loads(meta["ns"]))
                fields = json.loads(meta["index"]) if meta.get("index") else None
                op = PutOp(ns, meta["key"], json.loads(meta["value"]), index=fields)
                texts = self._texts(op)
                vectors = self._embedder.documents([t for _, t in texts]) if texts else []
                iid = _item_id(ns, meta["key"])
                old = [f"{iid}:{j}" for j in range(int(meta.get("nvec", 0)))]
                if old:
                    self._vectors.delete(ids=old)
                if texts:
                    self._vectors.upsert(
                        ids=[f"{iid}:{j}" for j in range(len(texts))],
                        embeddings=vectors,
                        metadatas=[{"item_id": iid, "path": path, **_level_meta(ns)} for path, _ in texts],
                    )
                if len(texts) != int(meta.get("nvec", 0)):
                    self._items.update(ids=[iid], metadatas=[{**meta, "nvec": len(texts)}])
                done += 1
            if self.embedding_model:
                self._record_model()
        return done

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        embedding_function: EmbeddingFunctionLike | None = None,
        collection: str = "synth_agent_items",
        index_fields: list[str] | None = None,
    ) -> ChromaStore:
        """Chroma server when ``CHROMA_HOST`` is set, else the embedded store under ``<home>/chroma``."""
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

    # ------------------------------------------------------------------ batch API

    def batch(self, ops: Iterable[Op]) -> list[Result]:
        """Run ops like ``InMemoryStore``: reads see the state before this batch's writes."""
        ops = list(ops)
        results: list[Result] = [None] * len(ops)
        puts: dict[tuple[tuple[str, ...], str], PutOp] = {}
        gets: list[tuple[int, GetOp]] = []
        searches: list[tuple[int, SearchOp]] = []
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
                results[i] = self._list_namespaces(op)
            elif isinstance(op, PutOp):
                if not op.namespace:
                    raise InvalidNamespaceError("Namespace cannot be empty.")
                if op.value is not None and not isinstance(op.value, dict):
                    op = op._replace(value=dict(op.value))
                puts[(tuple(op.namespace), str(op.key))] = op
            else:
                raise ValueError(f"unknown store operation {type(op).__name__}")
        if gets:
            found = self._fetch({_item_id(tuple(op.namespace), str(op.key)) for _, op in gets})
            for i, op in gets:
                results[i] = found.get(_item_id(tuple(op.namespace), str(op.key)))
        if searches:
            queries = {op.query for _, op in searches if op.query} if self._embedder else set()
            qvecs = {q: self._embedder.query(q) for q in queries} if self._embedder else {}
            for i, op in searches:
                results[i] = self._search(op, qvecs.get(op.query) if op.query else None)
        if puts:
            self._apply_puts(puts)
        return results

    async def abatch(self, ops: Iterable[Op]) -> list[Result]:
        """Async twin of :meth:`batch`; Chroma and the embedder block, so run in a worker thread."""
        return await asyncio.to_thread(self.batch, list(ops))

    # ------------------------------------------------------------------ reads

    @staticmethod
    def _to_item(meta: dict[str, Any], score: float | None = None, *, search: bool = False) -> Item:
        kwargs: dict[str, Any] = {
            "namespace": tuple(json.loads(meta["ns"])),
            "key": meta["key"],
            "value": json.loads(meta["value"]),
            "created_at": datetime.fromisoformat(meta["created_at"]),
            "updated_at": datetime.fromisoformat(meta["updated_at"]),
        }
        return SearchItem(**kwargs, score=score) if search else Item(**kwargs)

    def _fetch(self, ids: Iterable[str], *, search: bool = False) -> dict[str, Item]:
        ids = list(ids)
        out: dict[str, Item] = {}
        for start in range(0, len(ids), _PAGE):
            res = self._items.get(ids=ids[start : start + _PAGE], include=["metadatas"])
            for rid, meta in zip(res["ids"], res["metadatas"] or [], strict=True):
                out[rid] = self._to_item(dict(meta), search=search)
        return out

    def _pages(self, collection: Any, where: dict[str, Any] | None) -> Iterator[tuple[str, dict[str, Any]]]:
        offset = 0
        while True:
            res = collection.get(where=where, limit=_PAGE, offset=offset, include=["metadatas"])
            for rid, meta in zip(res["ids"], res["metadatas"] or [], strict=True):
                yield rid, dict(meta)
            if len(res["ids"]) < _PAGE:
                return
            offset += _PAGE

    def _search(self, op: SearchOp, qvec: list[float] | None) -> list[SearchItem]:
        if op.limit == 0:
            return []
        where = _prefix_where(op.namespace_prefix)
        if qvec is None:
            if not op.filter:
                res = self._items.get(where=where, limit=op.limit, offset=op.offset, include=["metadatas"])
                return [self._to_item(dict(m), search=True) for m in res["metadatas"] or []]  # type: ignore[misc]
            return self._scan(where, op.filter, op.offset, op.limit, unindexed_only=False)

        want = op.offset + op.limit
        total = self._vectors.count()
        n = max(want * 3, 20)
        scored: list[SearchItem] = []
        while total:
            n_eff = min(n, total)
            res = self._vectors.query(
                query_embeddings=[qvec], n_results=n_eff, where=where, include=["metadatas", "distances"]
            )
            best: dict[str, float] = {}
            for meta, dist in zip(res["metadatas"][0], res["distances"][0], strict=True):  # type: ignore[index]
                best.setdefault(str(meta["item_id"]), 1.0 - float(dist))  # hits arrive best first
            items = self._fetch(best)
            scored = []
            for iid, score in best.items():
                item = items.get(iid)
                if item is not None and _matches(item.value, op.filter):
                    scored.append(
                        SearchItem(
                            item.namespace,
                            item.key,
                            item.value,
                            item.created_at,
                            item.updated_at,
                            score=score,
                        )
                    )
            if len(scored) >= want or len(res["ids"][0]) < n_eff or n_eff >= total:
                break
            n *= 4
        if len(scored) >= want:
            return scored[op.offset : want]
        # Like InMemoryStore: items stored with index=False fill the page after every scored hit.
        head = scored[op.offset :]
        skip = max(op.offset - len(scored), 0)
        return head + self._scan(where, op.filter, skip, op.limit - len(head), unindexed_only=True)

    def _scan(
        self,
        where: dict[str, Any] | None,
        flt: dict[str, Any] | None,
        offset: int,
        limit: int,
        *,
        unindexed_only: bool,
    ) -> list[SearchItem]:
        if limit <= 0:
            return []
        if unindexed_only:
            where = _and([*(where.get("$and", [where]) if where else []), {"nvec": 0}])
        out: list[SearchItem] = []
        skipped = 0
        for _, meta in self._pages(self._items, where):
            item = self._to_item(meta, search=True)
            if not _matches(item.value, flt):
                continue
            if skipped < offset:
                skipped += 1
                continue
            out.append(item)  # type: ignore[arg-type]
            if len(out) >= limit:
                break
        return out

    def _list_namespaces(self, op: ListNamespacesOp) -> list[tuple[str, ...]]:
        conds: list[dict[str, Any]] = []
        for cond in op.match_conditions or ():
            path = tuple(cond.path)
            conds.append({"depth": {"$gte": len(path)}})
            labels = path if cond.match_type == "prefix" else tuple(reversed(path))
            tag = "ns" if cond.match_type == "prefix" else "rs"
            lead = 0
            if cond.match_type == "prefix":
                while lead < len(path) and path[lead] != "*":
                    lead += 1
                if lead:
                    conds.append({f"p_{lead - 1}": _prefix_key(path[:lead])})
            conds += [{f"{tag}_{i}": label} for i, label in enumerate(labels) if label != "*" and i >= lead]
        found: set[tuple[str, ...]] = set()
        for _, meta in self._pages(self._namespaces, _and(conds)):
            ns = tuple(json.loads(meta["ns"]))
            if all(_does_match(c, ns) for c in op.match_conditions or ()):
                found.add(ns[: op.max_depth] if op.max_depth is not None else ns)
        return sorted(found)[op.offset : op.offset + op.limit]

    # ------------------------------------------------------------------ writes

    def _texts(self, op: PutOp) -> list[tuple[str, str]]:
        """(path label, text) pairs to embed for one put, following InMemoryStore's rules."""
        if self._embedder is None or op.value is None or op.index is False:
            return []
        paths = self._tokenized if op.index is None else [(p, tokenize_path(p)) for p in op.index]
        out: list[tuple[str, str]] = []
        for path, tokens in paths:
            texts = get_text_at_path(op.value, tokens)
            if len(texts) == 1:
                out.append((path, texts[0]))
            else:
                out += [(f"{path}.{i}", t) for i, t in enumerate(texts)]
        return out

    def _chunks(self, n: int) -> Iterator[slice]:
        step = max(1, min(self._max_batch, 5000))
        for start in range(0, n, step):
            yield slice(start, start + step)

    def _apply_puts(self, puts: dict[tuple[tuple[str, ...], str], PutOp]) -> None:
        # Serialise values and embed outside the lock: those are the slow parts.
        rows: list[tuple[str, tuple[str, ...], str, str, list[tuple[str, str]]]] = []
        deletes: dict[str, tuple[str, ...]] = {}
        index_paths: dict[str, list[str] | None] = {}
        for (ns, key), op in puts.items():
            iid = _item_id(ns, key)
            if op.value is None:
                deletes[iid] = ns
            else:
                rows.append((iid, ns, key, _dumps(op.value), self._texts(op)))
                index_paths[iid] = list(op.index) if isinstance(op.index, list) else None
        flat = [text for *_, texts in rows for _, text in texts]
        vectors = self._embedder.documents(flat) if flat and self._embedder else []
        if len(vectors) != len(flat):
            raise ValueError(f"the embedding function returned {len(vectors)} vectors for {len(flat)} texts")

        with self._write_lock:
            ids = [iid for iid, *_ in rows] + list(deletes)
            old = {}
            for start in range(0, len(ids), _PAGE):
                res = self._items.get(ids=ids[start : start + _PAGE], include=["metadatas"])
                old.update({rid: dict(m) for rid, m in zip(res["ids"], res["metadatas"] or [], strict=True)})
            stale = [f"{rid}:{j}" for rid, meta in old.items() for j in range(int(meta.get("nvec", 0)))]
            for sl in self._chunks(len(stale)):
                self._vectors.delete(ids=stale[sl])
            gone = [iid for iid in deletes if iid in old]
            for sl in self._chunks(len(gone)):
                self._items.delete(ids=gone[sl])

            now = datetime.now(UTC).isoformat()
            item_ids, item_meta, vec_ids, vec_meta, vec_emb = [], [], [], [], []
            it = iter(vectors)
            for iid, ns, key, value_json, texts in rows:
                created = old[iid]["created_at"] if iid in old else now
                meta = {
                    "ns": json.dumps(list(ns), ensure_ascii=False),
                    "key": key,
                    "value": value_json,
                    "created_at": created,
                    "updated_at": now,
                    "nvec": len(texts),
                    **_level_meta(ns),
                }
                if index_paths.get(iid) is not None:  # put(..., index=[...]): what reindex re-embeds
                    meta["index"] = json.dumps(index_paths[iid], ensure_ascii=False)
                item_ids.append(iid)
                item_meta.append(meta)
                for j, (path, _) in enumerate(texts):
                    vec_ids.append(f"{iid}:{j}")
                    vec_meta.append({"item_id": iid, "path": path, **_level_meta(ns)})
                    vec_emb.append(next(it))
            for sl in self._chunks(len(item_ids)):
                self._items.upsert(
                    ids=item_ids[sl],
                    embeddings=[_placeholder(i) for i in item_ids[sl]],
                    metadatas=item_meta[sl],
                )
            for sl in self._chunks(len(vec_ids)):
                self._vectors.upsert(ids=vec_ids[sl], embeddings=vec_emb[sl], metadatas=vec_meta[sl])

            live = {ns for _, ns, *_ in rows}
            if live:
                reg = {_ns_id(ns): ns for ns in live}
                reg_ids = list(reg)
                for sl in self._chunks(len(reg_ids)):
                    self._namespaces.upsert(
                        ids=reg_ids[sl],
                        embeddings=[_placeholder(i) for i in reg_ids[sl]],
                        metadatas=[
                            {
                                "ns": json.dumps(list(reg[i]), ensure_ascii=False),
                                **_level_meta(reg[i], reverse=True),
                            }
                            for i in reg_ids[sl]
                        ],
                    )
            for ns in {ns for ns in deletes.values() if ns not in live}:
                ns_json = json.dumps(list(ns), ensure_ascii=False)
                if not self._items.get(where={"ns": ns_json}, limit=1, include=[])["ids"]:
                    self._namespaces.delete(ids=[_ns_id(ns)])

    def count(self) -> int:
        """Number of items in the store (all namespaces)."""
        return int(self._items.count())


__all__ = ["ChromaStore", "EmbeddingFunctionLike"]
