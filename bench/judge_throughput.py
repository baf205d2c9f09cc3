"""Judge throughput: chain-of-thought vs log-probability mode, one endpoint vs a pool, for best-of-n reranking.

Each query ranks ``--n`` candidates with a personalized judge (persona + demos)
by knockout (n-1 comparisons, each judged in both orders). The simulated
endpoints charge ``--latency-ms`` per request plus ``--per-token-ms`` per
generated token and serve ``--slots`` requests at once (server-side slots,
stated at ``/props`` like llama.cpp, so the client's adaptive limiter caps itself
there; more requests queue in the client, not the server): CoT generates ~100
tokens per judgment, logprob mode one. Caches are off so every judgment is paid for.
All figures are measured: wall time, requests and the simulator's token counts.

    .venv/bin/python bench/judge_throughput.py
    .venv/bin/python bench/judge_throughput.py --queries 32 --n 8 --latency-ms 20 --per-token-ms 1
"""

from __future__ import annotations

import argparse
import asyncio
import time
from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np
from rich.console import Console
from rich.table import Table

from synth_agent.engine.judge import Judge, JudgeMode
from synth_agent.engine.rerank import rank
from synth_agent.llm.base import ChatBackend
from synth_agent.llm.client import EndpointConfig, LLMClient
from synth_agent.llm.pool import EndpointPool
from synth_agent.models import Demo, Message
from synth_agent.sim.generator import PROMPT_POOL, generate_candidates
from synth_agent.sim.population import Population
from synth_agent.sim.server import SimEndpoint

PERSONA = (
    "The user strongly prefers bullet lists and worked examples. "
    "The user dislikes emoji and hedging. The user somewhat prefers short answers."
)


@dataclass
class Row:
    mode: str
    backend: str
    queries: int
    comparisons: int
    seconds: float
    requests: int
    prompt_tokens: int
    completion_tokens: int

    @property
    def judgments_per_s(self) -> float:
        return self.comparisons / self.seconds

    @property
    def ranks_per_s(self) -> float:
        return self.queries / self.seconds


def make_demos() -> tuple[Demo, ...]:
    votes = Population(1, seed=11).all_votes(4)
    return tuple(
        Demo(vote_id=v.id, context=v.context, chosen=v.chosen, rejected=v.rejected, chosen_first=i % 2 == 0,
             reasoning="The user chose the response with the clearer structure.")
        for i, v in enumerate(votes)
    )  # fmt: skip


def make_queries(n_queries: int, n: int, seed: int) -> list[tuple[list[Message], list[str]]]:
    rng = np.random.default_rng(seed)
    out = []
    for q in range(n_queries):
        prompt = PROMPT_POOL[q % len(PROMPT_POOL)]
        out.append(([Message(role="user", content=prompt)], generate_candidates(prompt, n, rng)))
    return out


async def run_one(
    backend: ChatBackend, mode: JudgeMode, label: str, queries: list[tuple[list[Message], list[str]]],
    concurrency: int, demos: tuple[Demo, ...],
) -> Row:  # fmt: skip
    judge = Judge(backend, persona=PERSONA, demos=demos, mode=mode)
    sem = asyncio.Semaphore(concurrency)
    comparisons = 0

    async def one(ctx: list[Message], cands: list[str]) -> None:
        nonlocal comparisons
        async with sem:
            res = await rank(judge, ctx, cands, strategy="knockout")
        comparisons += len(res.comparisons)

    start = time.perf_counter()
    await asyncio.gather(*(one(c, cs) for c, cs in queries))
    seconds = time.perf_counter() - start
    total = backend.stats.total()
    return Row(mode, label, len(queries), comparisons, seconds, total.requests, total.prompt_tokens,
               total.completion_tokens)  # fmt: skip


async def main(args: argparse.Namespace) -> list[Row]:
    demos = make_demos()
    queries = make_queries(args.queries, args.n, args.seed)
    rows: list[Row] = []
    with ExitStack() as stack:
        eps = [
            stack.enter_context(SimEndpoint(latency_ms=args.latency_ms, per_token_latency_ms=args.per_token_ms,
                                            slots=args.slots))
            for _ in range(args.endpoints)
        ]

        def client(ep: SimEndpoint) -> LLMClient:
            cfg = EndpointConfig(base_url=ep.base_url, max_concurrency=64, max_retries=1)
            return LLMClient(cfg, cache=False)

        for mode in ("cot", "logprob"):
            for label in ("1 endpoint", f"pool of {args.endpoints}"):
                backend: ChatBackend
                if label == "1 endpoint":
                    backend = client(eps[0])
                else:
                    backend = EndpointPool([client(ep) for ep in eps], cache=False, health_interval=0)
                try:
                    rows.append(await run_one(backend, mode, label, queries, args.concurrency, demos))  # type: ignore[arg-type]
                finally:
                    await backend.aclose()
    return rows


def print_rows(rows: list[Row], args: argparse.Namespace) -> None:
    t = Table(
        "mode", "backend", "judgments/s", "best-of-n/s", "requests", "completion tok / judgment",
        "prompt tok / judgment", "wall s",
        title=(
            f"best-of-{args.n} knockout reranking, {args.queries} queries ({args.concurrency} at once); "
            f"sim latency {args.latency_ms:g} ms/request + {args.per_token_ms:g} ms/token, {args.slots} slots/endpoint"
        ),
    )  # fmt: skip
    for r in rows:
        t.add_row(
            r.mode, r.backend, f"{r.judgments_per_s:.1f}", f"{r.ranks_per_s:.2f}", str(r.requests),
            f"{r.completion_tokens / r.comparisons:.1f}", f"{r.prompt_tokens / r.comparisons:.0f}",
            f"{r.seconds:.2f}",
        )  # fmt: skip
    Console(width=160).print(t)
    print(
        "a judgment = one pairwise comparison judged in both orders (2 requests); the simulators run in this\n"
        "process, so rates also include their CPU cost per request."
    )


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--queries", type=int, default=24, help="best-of-n queries per configuration")
    p.add_argument("--n", type=int, default=8, help="candidates per query")
    p.add_argument("--concurrency", type=int, default=8, help="queries ranked at once")
    p.add_argument("--latency-ms", type=float, default=20.0, help="simulated latency per request")
    p.add_argument("--per-token-ms", type=float, default=1.0, help="simulated latency per generated token")
    p.add_argument("--slots", type=int, default=8, help="requests each simulated server serves at once")
    p.add_argument("--endpoints", type=int, default=3, help="endpoints in the pool")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    print_rows(asyncio.run(main(a)), a)
