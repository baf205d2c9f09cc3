"""Store benchmark: vote ingest rate (with MiniLM embeddings) and ``relevant_votes`` latency.

Builds a store in a temporary directory, ingests ``--users`` x ``--votes`` synthetic votes
through ``PreferenceMemory.add_votes`` (``--chunk-users`` users per call, ``--writers`` calls
in flight: the store's group commit coalesces them), then times ``--queries`` calls of
``relevant_votes`` for random users. ``--mode server`` (default) is what ``synth-agent serve``
runs: Chroma in a child process; ``--mode inprocess`` is the library's ``ChromaStore(path)``.

``--paths`` also times the ways a per-user semantic query can be answered on the same data:
the store's exact ranking of the user's vectors (records fetched by id through the ledger's
namespace index, which is what ``relevant_votes`` does, or through Chroma's metadata filter on
the user's token, which is what it did before the index), Chroma's HNSW with a ``where`` filter on the
user (what the v1 store did), and a plain ``get`` of the user's vectors by token.

    .venv/bin/python bench/store_bench.py --users 1000
    nice .venv/bin/python bench/store_bench.py                 # the issue's 10,000 x 20 (long)
    .venv/bin/python bench/store_bench.py --users 1000 --mode inprocess --paths

``--populate pool`` makes the 10,000 x 20 figure measurable in minutes: the votes' texts come
from a pool of distinct texts (here every vote text is one of ``len(ASKS) x len(SUBJECTS) x
--votes`` = 1,800), each embedded once with the real MiniLM; the store's embedding function
then answers a text it has already embedded from that table instead of running the model again.
Everything else is the real write path (``PreferenceMemory.add_votes``, group commit, sealing,
the ledger, Chroma upserts and HNSW). Query texts are not in the table, so ``relevant_votes``
embeds every query with the model, as in production. The ingest rate of a pooled run is
therefore *not* an embedding figure (the table says so); time ingest with ``--populate embed``.

    .venv/bin/python bench/store_bench.py --populate pool --dir /tmp/sb10k --no-query      # fill once
    .venv/bin/python bench/store_bench.py --dir /tmp/sb10k --query-only                    # time queries
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from tqdm import tqdm  # noqa: E402
from vote_write import cpu_seconds  # noqa: E402

from store.chroma import ChromaStore  # noqa: E402
from store.embeddings import MiniLMEmbeddings  # noqa: E402
from store.memory import PreferenceMemory  # noqa: E402
from synth_agent.models import Message, Vote  # noqa: E402

SUBJECTS = [
    "a Python function", "a SQL query", "my sourdough starter", "a trip to Lisbon", "tomato plants",
    "a job interview", "my running plan", "a birthday gift for my dad", "a React component", "my budget",
    "learning Japanese", "a wedding speech", "a noisy neighbour", "a chess opening", "my cat's diet",
]
ASKS = [
    "How do I improve {s}?", "Can you explain the basics of {s}?", "What is wrong with {s}?",
    "Give me three ideas about {s}.", "Write a short summary about {s}.", "Is it worth worrying about {s}?",
]


def make_votes(rng: random.Random, user: str, n: int) -> list[Vote]:
    votes = []
    for i in range(n):
        text = rng.choice(ASKS).format(s=rng.choice(SUBJECTS))
        votes.append(
            Vote(
                user_id=user,
                context=[Message(role="user", content=f"{text} (#{i})")],
                chosen=f"A concise, direct answer about {text.lower()}",
                rejected=f"A long, meandering answer that never quite addresses {text.lower()}",
            )
        )
    return votes


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def timed(fn, n: int) -> list[float]:  # type: ignore[no-untyped-def]
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


async def run(args: argparse.Namespace) -> None:
    console = Console()
    rng = random.Random(args.seed)
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="synth-store-bench-"))
    store: ChromaStore | None = None
    try:
        t = time.perf_counter()
        emb = MiniLMEmbeddings(threads=args.threads)
        console.print(f"MiniLM loaded in {time.perf_counter() - t:.1f}s; store at {root} ({args.mode})")
        embed_s = [0.0]
        raw_embed = emb.embed_documents

        def timed_embed(texts: list[str]) -> list[list[float]]:
            t0 = time.perf_counter()
            try:
                return raw_embed(texts)
            finally:
                embed_s[0] += time.perf_counter() - t0

        pool: dict[str, list[float]] = {}

        def pooled_embed(texts: list[str]) -> list[list[float]]:
            todo = [t for t in dict.fromkeys(texts) if t not in pool]
            if todo:
                pool.update(zip(todo, timed_embed(todo), strict=True))
            return [pool[t] for t in texts]

        emb.embed_documents = pooled_embed if args.populate == "pool" else timed_embed  # type: ignore[method-assign]
        path = root / "chroma"
        store = (
            ChromaStore.local_server(path, embedding_function=emb)
            if args.mode == "server"
            else ChromaStore(path, embedding_function=emb)
        )
        mem = PreferenceMemory(store, "bench")
        users = [f"user{i:06d}@example.com" for i in range(args.users)]
        total = args.users * args.votes
        batches = [
            [v for u in users[s : s + args.chunk_users] for v in make_votes(rng, u, args.votes)]
            for s in range(0, len(users), args.chunk_users)
        ]
        if args.query_only:
            batches = []
        added = 0
        cpu0 = time.process_time()
        tree0 = cpu_seconds(os.getpid())
        t0 = time.perf_counter()
        with tqdm(total=total, unit="vote", desc="ingest", smoothing=0.05) as bar:
            sem = asyncio.Semaphore(args.writers)

            async def ingest(batch: list[Vote]) -> None:
                nonlocal added
                async with sem:
                    res = await mem.add_votes(batch)
                added += res.added
                bar.update(len(batch))

            await asyncio.gather(*(ingest(b) for b in batches))
        ingest_s = time.perf_counter() - t0
        ingest_cpu = time.process_time() - cpu0
        tree1 = cpu_seconds(os.getpid())
        tree_cpu = sum(tree1[k] - tree0.get(k, 0.0) for k in tree1)

        queries = [(rng.choice(users), rng.choice(ASKS).format(s=rng.choice(SUBJECTS))) for _ in range(args.queries)]
        if args.no_query:
            console.print(f"ingested {added:,} votes in {ingest_s:.1f} s ({added / ingest_s:,.0f} votes/s, "
                          f"populate={args.populate}, {len(pool):,} distinct texts embedded); store kept at {root}")
            return
        await mem.relevant_votes(*queries[0], k=args.k)  # warm
        latencies: list[float] = []
        for user, query in tqdm(queries, unit="query", desc="relevant_votes"):
            t = time.perf_counter()
            hits = await mem.relevant_votes(user, query, k=args.k)
            latencies.append((time.perf_counter() - t) * 1000)
            assert hits and all(v.user_id == user for v in hits)

        table = Table(title=f"store bench: {args.users:,} users x {args.votes} votes ({args.mode}, MiniLM, CPU)")
        table.add_column("metric")
        table.add_column("value", justify="right")
        table.add_row("votes in the store", f"{store.count() - len(users):,} (items minus user records)")
        table.add_row("votes ingested (this run)", f"{added:,}" + (" (pooled embeddings)" if args.populate == "pool" else ""))
        table.add_row("ingest time", f"{ingest_s:.1f} s")
        table.add_row("ingest rate" + (" (NOT an embedding figure: pooled)" if args.populate == "pool" else " (incl. embeddings)"),
                      f"{added / max(ingest_s, 1e-9):,.0f} votes/s")
        table.add_row("  of which embedding (wall, writer thread)", f"{embed_s[0]:.1f} s")
        table.add_row("  this process's CPU time (all threads)", f"{ingest_cpu:.1f} s")
        table.add_row("  CPU per vote, this process + its Chroma child", f"{tree_cpu / max(added, 1) * 1000:.2f} ms")
        table.add_row("  commits / largest", f"{store.stats.commits} / {store.stats.largest_commit}")
        table.add_row(f"relevant_votes k={args.k} p50", f"{statistics.median(latencies):.1f} ms")
        table.add_row(f"relevant_votes k={args.k} p95", f"{pct(latencies, 0.95):.1f} ms")
        table.add_row("queries", f"{len(latencies)}")
        if args.paths:
            # End to end from the query text (each path embeds it), on the same users and queries.
            sample = queries[:100]
            tok = {u: store._ptok(mem.namespace(u, "votes")) for u, _ in sample}
            it = itertools.cycle(sample)

            def exact() -> None:
                u, q = next(it)
                store._scored(store._prefix_where(mem.namespace(u, "votes")), None, q, args.k)

            def exact_by_id() -> None:
                u, q = next(it)
                ns = mem.namespace(u, "votes")
                members = store._members(ns)
                assert members is not None, "this store has no namespace index (older ledger, or unsealed)"
                store._scored(store._prefix_where(ns), None, q, args.k, members)

            def filtered_hnsw() -> None:
                u, q = next(it)
                store._vectors.query(query_embeddings=[emb.embed_query(q)], n_results=args.k * 3,
                                     where={"t4": tok[u]}, include=["metadatas", "distances"])

            def get_by_token() -> None:
                u, q = next(it)
                emb.embed_query(q)
                store._vectors.get(where={"t4": tok[u]}, include=["embeddings", "metadatas"])

            for name, fn in (("exact ranking, the user's records by id (ledger index)", exact_by_id),
                             ("exact ranking, the user's records by token filter", exact),
                             ("HNSW query with where=user (the v1 path)", filtered_hnsw),
                             ("embed + get the user's vectors by token", get_by_token)):
                lat = timed(fn, 100)
                table.add_row(f"{name} p50 / p95", f"{statistics.median(lat):.1f} / {pct(lat, 0.95):.1f} ms")
        console.print(table)
    finally:
        if store is not None:
            store.close()
        if not args.dir and not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=10_000, help="number of users (default 10,000)")
    ap.add_argument("--votes", type=int, default=20, help="votes per user (default 20)")
    ap.add_argument("--queries", type=int, default=200, help="relevant_votes calls to time (default 200)")
    ap.add_argument("--k", type=int, default=5, help="votes returned per query")
    ap.add_argument("--chunk-users", type=int, default=5, help="users per add_votes call (default 5: 100 votes)")
    ap.add_argument("--writers", type=int, default=8, help="add_votes calls in flight (default 8)")
    ap.add_argument("--mode", choices=["server", "inprocess"], default="server")
    ap.add_argument("--threads", type=int, default=1,
                    help="ONNX intra-op threads per embedding call (default 1, as synth-agent's own store: "
                    "the store's embedding stage runs one call per core)")
    ap.add_argument("--paths", action="store_true", help="also time the alternative per-user query paths")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", help="keep the store in this directory instead of a temp dir")
    ap.add_argument("--keep", action="store_true", help="do not delete the temp dir")
    ap.add_argument("--populate", choices=["embed", "pool"], default="embed",
                    help="embed: every vote text through the model; pool: each distinct text once (see above)")
    ap.add_argument("--no-query", action="store_true", help="ingest only (e.g. fill --dir once)")
    ap.add_argument("--query-only", action="store_true", help="time queries on the store in --dir, ingest nothing")
    args = ap.parse_args()
    if min(args.users, args.votes, args.queries, args.k, args.chunk_users, args.writers) < 1:
        ap.error("--users, --votes, --queries, --k, --chunk-users and --writers must be >= 1")
    if args.query_only and not args.dir:
        ap.error("--query-only needs --dir (a store filled by an earlier run)")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
