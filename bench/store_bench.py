"""Store benchmark: vote ingest rate (with MiniLM embeddings) and ``relevant_votes`` latency.

Builds an embedded ChromaStore in a temporary directory, ingests ``--users`` x
``--votes`` synthetic votes through ``PreferenceMemory.add_votes`` (batched puts),
then times ``--queries`` calls of ``relevant_votes`` for random users.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/store_bench.py --users 1000
    HF_HUB_OFFLINE=1 .venv/bin/python bench/store_bench.py            # the spec's 10,000 x 20
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from tqdm import tqdm  # noqa: E402

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


async def run(args: argparse.Namespace) -> None:
    console = Console()
    rng = random.Random(args.seed)
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="synth-store-bench-"))
    try:
        t = time.perf_counter()
        emb = MiniLMEmbeddings()
        console.print(f"MiniLM loaded in {time.perf_counter() - t:.1f}s; store at {root}")
        embed_s = [0.0]
        raw_embed = emb.embed_documents

        def timed_embed(texts: list[str]) -> list[list[float]]:
            t0 = time.perf_counter()
            try:
                return raw_embed(texts)
            finally:
                embed_s[0] += time.perf_counter() - t0

        emb.embed_documents = timed_embed  # type: ignore[method-assign]
        mem = PreferenceMemory(ChromaStore(root / "chroma", embedding_function=emb, index_fields=["text"]), "bench")
        users = [f"user{i:06d}@example.com" for i in range(args.users)]
        total = args.users * args.votes

        ingest_s = 0.0
        cpu0 = time.process_time()
        added = 0
        with tqdm(total=total, unit="vote", desc="ingest", smoothing=0.05) as bar:
            for start in range(0, len(users), args.chunk_users):
                batch = [v for u in users[start : start + args.chunk_users] for v in make_votes(rng, u, args.votes)]
                t = time.perf_counter()
                res = await mem.add_votes(batch)
                ingest_s += time.perf_counter() - t
                added += res.added
                bar.update(len(batch))

        ingest_cpu = time.process_time() - cpu0
        ingest_embed = embed_s[0]
        latencies: list[float] = []
        for _ in tqdm(range(args.queries), unit="query", desc="relevant_votes"):
            user = rng.choice(users)
            query = rng.choice(ASKS).format(s=rng.choice(SUBJECTS))
            t = time.perf_counter()
            hits = await mem.relevant_votes(user, query, k=args.k)
            latencies.append((time.perf_counter() - t) * 1000)
            assert hits and all(v.user_id == user for v in hits)

        table = Table(title=f"store bench: {args.users:,} users x {args.votes} votes (embedded Chroma, MiniLM, CPU)")
        table.add_column("metric")
        table.add_column("value", justify="right")
        table.add_row("votes ingested", f"{added:,}")
        table.add_row("ingest time", f"{ingest_s:.1f} s")
        table.add_row("ingest rate (incl. embeddings)", f"{added / ingest_s:,.0f} votes/s")
        table.add_row("  of which embedding", f"{ingest_embed:.1f} s")
        table.add_row("  process CPU time (all threads)", f"{ingest_cpu:.1f} s")
        table.add_row(f"relevant_votes k={args.k} p50", f"{statistics.median(latencies):.1f} ms")
        table.add_row(f"relevant_votes k={args.k} p95", f"{pct(latencies, 0.95):.1f} ms")
        table.add_row("queries", f"{len(latencies)}")
        console.print(table)
    finally:
        if not args.dir and not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=10_000, help="number of users (default 10,000)")
    ap.add_argument("--votes", type=int, default=20, help="votes per user (default 20)")
    ap.add_argument("--queries", type=int, default=200, help="relevant_votes calls to time (default 200)")
    ap.add_argument("--k", type=int, default=5, help="votes returned per query")
    ap.add_argument("--chunk-users", type=int, default=50, help="users per add_votes call")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", help="keep the store in this directory instead of a temp dir")
    ap.add_argument("--keep", action="store_true", help="do not delete the temp dir")
    args = ap.parse_args()
    if min(args.users, args.votes, args.queries, args.k, args.chunk_users) < 1:
        ap.error("--users, --votes, --queries, --k and --chunk-users must be >= 1")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
