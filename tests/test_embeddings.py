"""The default embedder: all-MiniLM-L6-v2 in ONNX Runtime, no torch, no network."""

from __future__ import annotations

import functools
import importlib.util
import math
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from store.chroma import ChromaStore
from store.embedding_build import ENV_CACHE, int8_model
from store.embeddings import MAX_TOKENS, MINILM_DIMS, LazyMiniLMEmbeddings, MiniLMEmbeddings, minilm_path

REFERENCE = Path(__file__).parent / "data" / "minilm_reference.npz"
"""all-MiniLM-L6-v2 vectors from sentence-transformers on torch (``tests/data/make_minilm_reference.py``)."""


@functools.cache
def shared_minilm() -> MiniLMEmbeddings:
    return MiniLMEmbeddings()


def _cos(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def test_vectors_are_unit_length_and_384_wide() -> None:
    emb = shared_minilm()
    vecs = emb.embed_documents(["hello", "a much longer sentence about gardening and roses", ""])
    assert [len(v) for v in vecs] == [MINILM_DIMS] * 3
    for v in vecs:
        assert math.isclose(math.sqrt(sum(x * x for x in v)), 1.0, rel_tol=1e-4)


def test_similar_texts_are_closer_than_unrelated_ones() -> None:
    emb = shared_minilm()
    q, near, far = emb.embed_documents(
        ["How do I learn Python?", "Beginner tutorial for the Python programming language", "Best pizza in Rome"]
    )
    assert _cos(q, near) > _cos(q, far) + 0.2


@pytest.mark.parametrize("compute", ["int8", "float32"])
def test_batch_order_and_padding_do_not_change_a_vector(compute: str) -> None:
    """Batches are sorted by length and padded to their longest text: results must not depend on either.

    int8 quantises activations with a scale taken from the whole input, so it runs one text at a time.
    """
    emb = MiniLMEmbeddings(batch_size=3, compute=compute)
    texts = ["short", "a somewhat longer text about chess openings", "mid length text", "x " * 400, "tiny"]
    together = emb.embed_documents(texts)
    alone = [emb.embed_query(t) for t in texts]
    for a, b in zip(together, alone, strict=True):
        assert _cos(a, b) > 0.9999


def test_long_text_is_truncated_not_rejected() -> None:
    emb = shared_minilm()
    long = "word " * (MAX_TOKENS * 4)
    assert _cos(emb.embed_query(long), emb.embed_query("word " * MAX_TOKENS)) > 0.999


def test_thread_safe_under_concurrent_use() -> None:
    emb = shared_minilm()
    texts = [f"question number {i} about topic {i % 7}" for i in range(40)]
    expected = emb.embed_documents(texts)
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(emb.embed_query, texts))
    for a, b in zip(expected, got, strict=True):
        assert _cos(a, b) > 0.9999


def test_the_session_keeps_no_memory_arena() -> None:
    """ONNX Runtime's CPU arena would keep the high-water mark of every batch shape for the process's life.

    With it a serving process's RSS steps up with each larger group commit or longer text and no
    ``malloc_trim`` can give it back (docs/store.md, "Memory", session 29); without it the tensors
    go back to malloc after each run.
    """
    emb = shared_minilm()
    emb.embed_documents([f"text {i} " * (i % 9 + 1) for i in range(70)])
    assert emb._session.get_session_options().enable_cpu_mem_arena is False


def test_chroma_calling_convention() -> None:
    emb = shared_minilm()
    assert emb(["abc"]) == emb.embed_documents(["abc"])


def test_lazy_wrapper_loads_on_first_use_only() -> None:
    lazy = LazyMiniLMEmbeddings()
    assert not lazy.loaded
    assert len(lazy.embed_query("hi")) == MINILM_DIMS
    assert lazy.loaded


def test_missing_override_file_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYNTH_AGENT_EMBEDDING_MODEL", "/nonexistent/model.onnx")
    with pytest.raises(ValueError, match="SYNTH_AGENT_EMBEDDING_MODEL"):
        MiniLMEmbeddings()


def test_default_install_has_no_torch() -> None:
    """The light install: neither torch nor sentence-transformers is importable in the venv."""
    assert importlib.util.find_spec("torch") is None
    assert importlib.util.find_spec("sentence_transformers") is None


def test_embedding_imports_no_torch() -> None:
    code = "import sys; from store.embeddings import MiniLMEmbeddings; MiniLMEmbeddings().embed_query('x'); " \
           "print('torch' in sys.modules or 'sentence_transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    assert out.stderr == ""  # quiet: no progress bars or warnings


class _OtherModel:
    """A different embedding model: the same texts land elsewhere."""

    model_id = "other-model"

    def __init__(self, inner: MiniLMEmbeddings) -> None:
        self.inner = inner

    def __call__(self, input: list[str]) -> list[list[float]]:  # noqa: A002
        return [list(reversed(v)) for v in self.inner.embed_documents(list(input))]


def test_store_refuses_vectors_of_another_model_and_reindex_migrates(tmp_path: Path) -> None:
    emb = shared_minilm()
    path = tmp_path / "chroma"
    old = ChromaStore(path, embedding_function=_OtherModel(emb), index_fields=["text"])
    for key, text in {"garden": "tulips and roses in spring", "code": "a python function that sorts a list"}.items():
        old.put(("t",), key, {"text": text})
    old.put(("t",), "custom", {"text": "ignored", "title": "chess openings for beginners"}, index=["title"])
    old.put(("t",), "plain", {"text": "never embedded"}, index=False)

    with pytest.raises(ValueError, match="synth-agent reindex"):
        ChromaStore(path, embedding_function=emb, index_fields=["text"])

    store = ChromaStore(path, embedding_function=emb, index_fields=["text"], reindex=True)
    assert store.search(("t",), query="flowers", limit=1)[0].key == "garden"
    assert store.search(("t",), query="chess", limit=1)[0].key == "custom"  # re-embedded on its own field
    assert {h.key for h in store.search(("t",), query="never embedded", limit=10) if h.score is not None} == {
        "garden", "code", "custom"
    }
    # Recorded now: a plain reopen works, and the other model is refused in turn.
    ChromaStore(path, embedding_function=emb, index_fields=["text"])
    with pytest.raises(ValueError, match="other-model"):
        ChromaStore(path, embedding_function=_OtherModel(emb), index_fields=["text"])


def test_collections_without_a_recorded_model_are_adopted(tmp_path: Path) -> None:
    """Stores written before models were recorded (the torch MiniLM) open and record the model."""
    path = tmp_path / "chroma"
    legacy = ChromaStore(path, embedding_function=lambda texts: shared_minilm().embed_documents(texts))
    legacy.put(("t",), "k", {"text": "tulips and roses"})
    assert legacy._recorded_model() is None  # an embedder without model_id: nothing recorded
    store = ChromaStore(path, embedding_function=shared_minilm())
    assert store._recorded_model() == "all-MiniLM-L6-v2"
    assert store.search(("t",), query="flowers", limit=1)[0].key == "k"


@functools.cache
def _reference_ranking(compute: str) -> tuple[float, float, float, int, float]:
    """(min cosine, mean cosine, top-1 agreement, worst rank of torch's top hit, top-10 overlap) vs torch."""
    import numpy as np

    ref = np.load(REFERENCE)
    emb = MiniLMEmbeddings(compute=compute, threads=1)
    q = np.asarray(emb.embed_documents([str(t) for t in ref["queries"]]))
    d = np.asarray(emb.embed_documents([str(t) for t in ref["docs"]]))
    cos = np.concatenate([(q * ref["query_vectors"]).sum(1), (d * ref["doc_vectors"]).sum(1)])
    got, want = q @ d.T, ref["query_vectors"] @ ref["doc_vectors"].T
    best = want.argmax(1)
    worst_rank = int(max((row > row[b]).sum() for row, b in zip(got, best, strict=True)))
    overlap = float(np.mean([len(set(np.argsort(-g)[:10]) & set(np.argsort(-w)[:10])) / 10 for g, w in zip(got, want, strict=True)]))
    return float(cos.min()), float(cos.mean()), float((got.argmax(1) == best).mean()), worst_rank, overlap


def test_float32_vectors_are_the_torch_vectors() -> None:
    lo, mean, top1, worst, overlap = _reference_ranking("float32")
    assert lo > 0.998 and mean > 0.999
    assert top1 > 0.95 and worst <= 2 and overlap > 0.95


def test_int8_vectors_rank_like_the_torch_vectors() -> None:
    """int8 activations cost precision (cosine ~0.99): torch's best match stays among the top 3 of every query.

    Measured on 67 simulator questions against 144 answer sentences and whole answers (many
    near-duplicates, so exact top-1 agreement is ~0.85); see ``bench/embed_bench.py --quality``.
    """
    lo, mean, top1, worst, overlap = _reference_ranking("int8")
    assert lo > 0.975 and mean > 0.99
    assert top1 > 0.8 and worst <= 3 and overlap > 0.88


def test_int8_model_is_built_once_atomically_and_deterministically(tmp_path: Path) -> None:
    """Two processes building at once into an empty cache: one complete file, identical bytes, no leftovers."""
    code = "from store.embeddings import MiniLMEmbeddings; print(MiniLMEmbeddings(compute='int8').model_path)"
    env = {**__import__("os").environ, ENV_CACHE: str(tmp_path / "a")}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    paths = {p.communicate()[0].strip() for p in procs}
    assert [p.returncode for p in procs] == [0, 0]
    (path,) = paths
    assert [f.name for f in (tmp_path / "a").iterdir()] == [Path(path).name]
    built = Path(path).stat().st_mtime_ns
    assert int8_model(minilm_path(), tmp_path / "a") == path  # cached: not rebuilt
    assert Path(path).stat().st_mtime_ns == built
    again = int8_model(minilm_path(), tmp_path / "b")  # built anew elsewhere: the same bytes
    assert Path(again).name == Path(path).name and Path(again).read_bytes() == Path(path).read_bytes()


def test_int8_build_errors_say_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv(ENV_CACHE, str(blocker / "models"))
    with pytest.raises(ValueError, match=f"{ENV_CACHE}.*SYNTH_AGENT_EMBEDDING_COMPUTE=float32"):
        MiniLMEmbeddings(compute="int8")
    monkeypatch.setitem(sys.modules, "onnx", None)  # not installed
    with pytest.raises(ValueError, match="'onnx'"):
        MiniLMEmbeddings(compute="int8")
    assert len(MiniLMEmbeddings(compute="float32").embed_query("still works")) == MINILM_DIMS
    monkeypatch.setenv("SYNTH_AGENT_EMBEDDING_COMPUTE", "fp16")
    with pytest.raises(ValueError, match="float32, int8"):
        MiniLMEmbeddings()


def test_override_model_runs_as_is(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYNTH_AGENT_EMBEDDING_MODEL", minilm_path())
    emb = MiniLMEmbeddings()
    assert emb.model_path == minilm_path() and emb.compute == "as-is"


def test_store_written_with_float32_vectors_opens_with_int8(tmp_path: Path) -> None:
    """Same model, same id: int8 queries find what float32 (or the earlier torch embedder) stored, no reindex."""
    path = tmp_path / "chroma"
    texts = {"garden": "tulips and roses in spring", "code": "a python function that sorts a list",
             "food": "a recipe for tomato soup", "chess": "chess openings for beginners"}
    old = ChromaStore(path, embedding_function=MiniLMEmbeddings(compute="float32"), index_fields=["text"])
    for key, text in texts.items():
        old.put(("t",), key, {"text": text})
    old.close()
    store = ChromaStore(path, embedding_function=MiniLMEmbeddings(compute="int8"), index_fields=["text"])
    for query, key in {"flowers": "garden", "sorting code": "code", "soup": "food", "chess": "chess"}.items():
        assert store.search(("t",), query=query, limit=1)[0].key == key
