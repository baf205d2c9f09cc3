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
    .venv/bin/python bench/hnsw_churn.py --store --items 2000 --rounds 6 --compact-every 2
                 # the same churn through ChromaStore, without and with compaction, side by side

``--store`` runs the churn through :class:`store.chroma.ChromaStore` (a cheap deterministic 384-d
embedder, so only Chroma is measured) twice, each in a fresh process: without compaction, then
calling ``compact()`` every ``--compact-every`` rounds. It prints, after each round, the slots and
live ids summed over every HNSW segment of the store directory, their ``data_level0.bin`` bytes,
the number of segment directories on disk and the process's RSS.

chromadb 1.5.9 (measured 2026-12-01): slots grow by one per new id and are never reused, so
memory and disk grow with every record ever written, not with what is stored; an upsert of an
existing id reuses its slot. ``chroma vacuum`` does not compact the index.
"""

from __future__ import annotations

import argparse
import pickle
import sys
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


def segments(path: Path) -> tuple[int, int, int, int]:
    """(slots, live ids, data_level0.bin bytes, segment directories) summed over every segment under ``path``."""
    slots = ids = level0 = dirs = 0
    for meta in path.glob("*/index_metadata.pickle"):
        with meta.open("rb") as fh:
            m = pickle.load(fh)  # noqa: S301 - written by chromadb in our own temporary directory
        slots += int(m["total_elements_added"])
        ids += len(m["id_to_label"])
        level0 += (meta.parent / "data_level0.bin").stat().st_size
    dirs = sum(1 for d in path.iterdir() if d.is_dir())
    return slots, ids, level0, dirs


class HashEmbeddings:
    """A deterministic 384-d ``texts -> vectors`` callable (no model: only Chroma's cost is measured)."""

    thread_safe = True

    def __call__(self, texts: list[str]) -> list[list[float]]:
        import hashlib

        out = []
        for t in texts:
            seed = int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "big")
            out.append(np.random.default_rng(seed).standard_normal(384).astype(np.float32).tolist())
        return out


def store_run(args: argparse.Namespace, compact_every: int) -> None:
    """One churn through ChromaStore (this process), compacting every ``compact_every`` rounds (0: never)."""
    import time

    from langgraph.store.base import PutOp

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from store.chroma import ChromaStore

    path = Path(tempfile.mkdtemp(prefix="hnsw-churn-store-"))
    st = ChromaStore(path / "db", embedding_function=HashEmbeddings(), index_fields=["text"], compact_ratio=0)
    rng = np.random.default_rng(0)
    live: list[str] = []
    next_id = 0
    label = f"compact every {compact_every}" if compact_every else "no compaction"

    def add(n: int) -> None:
        nonlocal next_id
        keys = [f"v{next_id + i}" for i in range(n)]
        next_id += n
        st.batch([PutOp(("t", f"u{int(k[1:]) % 50}"), k, {"text": f"vote text {k}"}) for k in keys])
        live.extend(keys)

    def report(what: str) -> None:
        st.search(("t",), query="vote", limit=1)  # a query applies Chroma's log to the index
        slots, ids, level0, dirs = segments(path / "db")
        print(f"{label:>16} {what:>10}  stored {st.count():6d}  slots {slots:7d}  live ids {ids:6d}  "
              f"data_level0 {level0 / 1e6:6.1f} MB  segment dirs {dirs}  RSS {rss_mb():6.1f} MB", flush=True)

    for _ in range(0, args.items, 500):
        add(min(500, args.items - len(live)))
    report("start")
    for r in range(1, args.rounds + 1):
        for _ in range(args.churn // 100):
            gone = [live.pop(int(rng.integers(len(live)))) for _ in range(100)]
            st.batch([PutOp(("t", f"u{int(k[1:]) % 50}"), k, None) for k in gone])
            add(100)
        if compact_every and r % compact_every == 0:
            t0 = time.monotonic()
            res = st.compact()
            print(f"{label:>16} compacted: generation {res.generation}, {res.items} items + {res.vectors} vectors "
                  f"copied in {time.monotonic() - t0:.1f}s", flush=True)
        report(f"churn {r}")
    st.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=5000)
    ap.add_argument("--churn", type=int, default=1000, help="records deleted and added per round (multiple of 100)")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--same-ids", type=int, default=64, help="ids upserted again and again at the end")
    ap.add_argument("--upserts", type=int, default=50)
    ap.add_argument("--store", action="store_true", help="churn through ChromaStore, without and with compaction")
    ap.add_argument("--compact-every", type=int, default=2, help="with --store: rounds between compactions")
    ap.add_argument("--_one", type=int, default=-1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._one >= 0:
        store_run(args, args._one)
        return
    if args.store:
        import subprocess

        for every in (0, args.compact_every):  # each in a fresh process: RSS is per process
            subprocess.run([sys.executable, __file__, "--items", str(args.items), "--churn", str(args.churn),
                            "--rounds", str(args.rounds), "--_one", str(every)], check=True)
        return

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
