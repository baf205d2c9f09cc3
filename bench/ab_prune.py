"""What opening an A/B pair costs when the user already has many open pairs.

``Personalizer.open_vote`` (the chat graph's A/B mode and the proxy's ``POST /v1/ab``) stores the
pair, then checks the user's open pairs: it drops expired ones and the oldest past
``max_open_votes`` (100). The check lists every open pair of the user (and unseals each), so doing
it on every opening made each A/B request pay for up to 100 stored pairs. It now runs on a user's
first opening in the process and then on every ``prune_every``-th (default 8).

This script fills an embedded ``ChromaStore`` (in a temporary directory, no embeddings: pairs are
not indexed) with ``--open`` pairs for one user, then opens ``--pairs`` more with
``prune_every=1`` (every opening checks: the behaviour before) and with the default, alternating
in rounds, and prints the median wall and CPU time per opening and the open pairs at the end.

    .venv/bin/python bench/ab_prune.py [--open 100] [--pairs 48] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time

from langchain_core.language_models.fake_chat_models import FakeListChatModel

from graphs.chat import Personalizer, pending_namespace
from store import ChromaStore
from synth_agent.models import Message

TENANT, USER = "bench", "user-1"


async def opening_costs(store: ChromaStore, prune_every: int, pairs: int) -> tuple[list[float], list[float]]:
    p = Personalizer(FakeListChatModel(responses=["x"]), store=store, prune_every=prune_every)
    context = [Message(role="user", content="What should I cook tonight? " * 8)]
    walls: list[float] = []
    cpus: list[float] = []
    for i in range(pairs):
        cands = [{"text": f"Answer A {i} " + "a" * 600, "personalized": True},
                 {"text": f"Answer B {i} " + "b" * 600, "personalized": False}]
        c0, t0 = time.process_time(), time.perf_counter()
        await p.open_vote(TENANT, USER, context, cands, 1, store)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return walls, cpus


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--open", type=int, default=100, help="open pairs the user has before the run")
    ap.add_argument("--pairs", type=int, default=48, help="pairs opened per setting and round")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as home, ChromaStore(path=home) as store:
        await opening_costs(store, 1, args.open)  # the user's backlog of open pairs (pruned to 100)
        results: dict[int, tuple[list[float], list[float]]] = {1: ([], []), 8: ([], [])}
        for _ in range(args.rounds):
            for every in (1, 8):
                w, c = await opening_costs(store, every, args.pairs)
                results[every][0].extend(w)
                results[every][1].extend(c)
        left = len(await store.asearch(pending_namespace(TENANT, USER), limit=1000))
    print(f"one user with ~{args.open} open A/B pairs; {args.rounds} rounds x {args.pairs} openings per setting")
    print("setting                         wall p50 ms   wall mean ms   CPU mean ms")
    for every, label in ((1, "check every opening (before)"), (8, "check every 8th (prune_every=8)")):
        w, c = results[every]
        print(f"{label:32s} {statistics.median(w) * 1e3:10.1f} {statistics.fmean(w) * 1e3:14.1f} "
              f"{statistics.fmean(c) * 1e3:13.1f}")
    print(f"open pairs at the end: {left}")


if __name__ == "__main__":
    asyncio.run(main())
