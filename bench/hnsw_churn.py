"""Does Chroma's local HNSW give back what deletes free? Churn at a constant stored count.

Writes ``--items`` records (384-d, like the store's vote vectors) to an embedded chromadb
collection, then runs ``--rounds`` rounds that each delete ``--churn`` random records and add as
many new ids, so the number of stored records never changes. After each round it prints the
records stored, the HNSW slots (``total_elements_added`` in the segment's id map: one per id ever
added) and live ids, the size of ``data_level0.bin`` (the vectors and level-0 links of every
slot) and this process's RSS. Then it upserts the same ``--same-ids`` ids over and over (what the
store's erasure flush does) to show whether that allocates slots too.

    .venv/bin/python bench/hnsw_churn.py                        # 5,000 stored, 20 rounds of 1,000
    .venv/bin/python bench/hnsw_churn.py --items 2000 --rounds 6

chromadb 1.5.9 (measured 2026-12-01): slots grow by one per new id and are never reused, so
memory and disk grow with every record ever written, not with what is stored; an upsert of an
existing id reuses its slot. ``chroma vacuum`` does not compact the index.
"""

from __future__ import annotations

import argparse
import pickle
import tempfile
from pathlib import Path

import numpy as np


def rss_mb() -> float:
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS")) / 1024


def segment(path: Path) -> tuple[int, int, int]:
    """(slots, live ids, data_level0.bin bytes) of the one vector segment under ``path``."""
    for meta in path.glob("*/index_metadata.pickle"):
        with meta.open("rb") as fh:
            m = pickle.load(fh)  # noqa: S301 - written by chromadb in our own temporary directory
        return int(m["total_elements_added"]), len(m["id_to_label"]), (meta.parent / "data_level0.bin").stat().st_size
    return 0, 0, 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=5000)
    ap.add_argument("--churn", type=int, default=1000, help="records deleted and added per round (multiple of 100)")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--same-ids", type=int, default=64, help="ids upserted again and again at the end")
    ap.add_argument("--upserts", type=int, default=50)
    args = ap.parse_args()

    import chromadb

    path = Path(tempfile.mkdtemp(prefix="hnsw-churn-"))
    client = chromadb.PersistentClient(path=str(path), settings=chromadb.Settings(anonymized_telemetry=False))
    col = client.create_collection("churn", configuration={"hnsw": {"space": "cosine", "sync_threshold": 64}})
    rng = np.random.default_rng(0)
    live: list[str] = []
    next_id = 0

    def add(n: int) -> None:
        nonlocal next_id
        ids = [f"v{next_id + i}" for i in range(n)]
        next_id += n
        col.add(ids=ids, embeddings=rng.standard_normal((n, 384)).astype(np.float32))
        live.extend(ids)

    def report(label: str) -> None:
        col.query(query_embeddings=rng.standard_normal((1, 384)).astype(np.float32), n_results=1)  # applies the log
        slots, ids, level0 = segment(path)
        print(f"{label:>12}  stored {col.count():6d}  slots {slots:7d}  live ids {ids:6d}  "
              f"data_level0 {level0 / 1e6:6.1f} MB  RSS {rss_mb():6.1f} MB", flush=True)

    for _ in range(0, args.items, 500):
        add(min(500, args.items - len(live)))
    print(f"chromadb {chromadb.__version__}, {path}")
    report("start")
    for r in range(1, args.rounds + 1):
        for _ in range(args.churn // 100):
            gone = [live.pop(int(rng.integers(len(live)))) for _ in range(100)]
            col.delete(ids=gone)
            add(100)
        report(f"churn {r}")
    same = [f"flush{k}" for k in range(args.same_ids)]
    for _ in range(args.upserts):
        col.upsert(ids=same, embeddings=rng.standard_normal((len(same), 384)).astype(np.float32))
    report(f"+{args.upserts} upserts")


if __name__ == "__main__":
    main()
