"""Cost of one SynthesizeMe fit: LLM requests, tokens and wall time per 12-vote user.

Against the simulator endpoint over HTTP with a fixed per-request latency (default
50 ms), at the paper's budgets (10 trials, 10 demo candidates). Prints one user fitted
alone (median of several users, each with a fresh client so nothing is cached across
users), then N users fitted concurrently through one shared client.

    python bench/fit_cost.py [--latency-ms 50] [--users 20] [--votes 12] [--solo 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from rich.console import Console
from rich.table import Table

from synth_agent.engine import FitConfig, Synthesizer
from synth_agent.llm.client import EndpointConfig, LLMClient
from synth_agent.sim.population import Population
from synth_agent.sim.server import SimEndpoint, SimProcess


async def fit_one(base_url: str, uid: str, votes: list, cfg: FitConfig, concurrency: int) -> dict[str, float]:
    async with LLMClient(EndpointConfig(base_url=base_url, max_concurrency=concurrency)) as llm:
        t0 = time.perf_counter()
        res = await Synthesizer(llm, None, cfg).fit(uid, votes)
        wall = time.perf_counter() - t0
        tot = llm.stats.total()
    return {
        "requests": tot.requests,
        "prompt_tokens": tot.prompt_tokens,
        "completion_tokens": tot.completion_tokens,
        "wall_s": wall,
        "val_acc": res.profile.val_accuracy if res.profile else float("nan"),
    }


async def fit_many(base_url: str, pop: Population, n_votes: int, cfg: FitConfig, concurrency: int) -> dict[str, float]:
    async with LLMClient(EndpointConfig(base_url=base_url, max_concurrency=concurrency)) as llm:
        t0 = time.perf_counter()
        await asyncio.gather(*(Synthesizer(llm, None, cfg).fit(u, pop.votes(u, n_votes)) for u in pop.user_ids))
        wall = time.perf_counter() - t0
        tot = llm.stats.total()
    n = len(pop.user_ids)
    return {"requests": tot.requests / n, "tokens": (tot.prompt_tokens + tot.completion_tokens) / n,
            "wall_total_s": wall, "wall_per_user_s": wall / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latency-ms", type=float, default=50.0)
    ap.add_argument("--users", type=int, default=20)
    ap.add_argument("--votes", type=int, default=12)
    ap.add_argument("--solo", type=int, default=5, help="users fitted one at a time for the per-fit figures")
    ap.add_argument("--concurrency", type=int, default=32, help="max requests in flight per client")
    ap.add_argument("--in-process", action="store_true",
                    help="run the simulator in this process (shares the GIL with the client; slower)")
    args = ap.parse_args()
    cfg = FitConfig(n_trials=10, n_demo_candidates=10, seed=0)
    pop = Population(args.users, seed=0)
    console = Console()
    sim = SimEndpoint if args.in_process else SimProcess
    with sim(latency_ms=args.latency_ms) as ep:
        solo = [
            asyncio.run(fit_one(ep.base_url, u, pop.votes(u, args.votes), cfg, args.concurrency))
            for u in pop.user_ids[: args.solo]
        ]
        many = asyncio.run(fit_many(ep.base_url, pop, args.votes, cfg, args.concurrency))
    t = Table(title=f"One fit of a {args.votes}-vote user, simulator at {args.latency_ms:.0f} ms/request "
                    f"(median of {len(solo)} users; 10 trials, 10 candidates)")
    for col in ("LLM requests", "prompt tokens", "completion tokens", "wall time (s)"):
        t.add_column(col, justify="right")
    t.add_row(
        f"{statistics.median(s['requests'] for s in solo):.0f} (max {max(s['requests'] for s in solo):.0f})",
        f"{statistics.median(s['prompt_tokens'] for s in solo):,.0f}",
        f"{statistics.median(s['completion_tokens'] for s in solo):,.0f}",
        f"{statistics.median(s['wall_s'] for s in solo):.2f} (max {max(s['wall_s'] for s in solo):.2f})",
    )
    console.print(t)
    t2 = Table(title=f"{args.users} users fitted concurrently (one client, {args.concurrency} in flight)")
    for col in ("requests / user", "tokens / user", "wall total (s)", "wall / user (s)"):
        t2.add_column(col, justify="right")
    t2.add_row(f"{many['requests']:.1f}", f"{many['tokens']:,.0f}", f"{many['wall_total_s']:.2f}",
               f"{many['wall_per_user_s']:.3f}")
    console.print(t2)
    console.print("Reference implementation (paper's code, same kind of endpoint): ~255 requests, ~16 s per user.")


if __name__ == "__main__":
    main()
