"""What a fit costs and what the profile it saves costs to serve, per configuration (in-process simulator).

A fit's prompt tokens are paid once; the served demos are paid again by every live judgment with the
profile (the proxy's judge, ``synth-agent eval``): each carries the demos' turns. A change that makes fits
cheaper by choosing larger demo sets (``FitConfig(step1=...)``, docs/llm.md) moves cost from the fit to serving,
so both are printed side by side. Users are fitted one at a time against :class:`SimBackend` (no HTTP,
no latency: token counts are the simulator's, chars / 4, and do not depend on load).

    python bench/served_demos.py [--seeds 0,1] [--users 24] [--votes 12] [--config step1=race] ...

Each ``--config KEY=VALUE`` (repeatable) is one more arm next to the defaults; ``--arm 'JSON'`` gives an arm
several overrides at once.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
from typing import Any

from rich.console import Console
from rich.table import Table

from synth_agent import prompts
from synth_agent.engine import FitConfig, Synthesizer
from synth_agent.sim.backend import SimBackend
from synth_agent.sim.population import Population


async def arm(overrides: dict[str, Any], seeds: list[int], users: int, votes: int) -> dict[str, float]:
    """Per-fit prompt tokens (mean, median, max), and per profile the served demos and their prompt tokens."""
    fit_tokens: list[int] = []
    n_demos: list[int] = []
    demo_tokens: list[float] = []
    for seed in seeds:
        pop = Population(users, seed=seed)
        for uid in pop.user_ids:
            llm = SimBackend(seed)
            fit = await Synthesizer(llm, None, FitConfig(**overrides)).fit(uid, pop.votes(uid, votes))
            fit_tokens.append(llm.stats.total().prompt_tokens)
            assert fit.profile is not None
            demos = fit.profile.demos
            n_demos.append(len(demos))
            demo_tokens.append(sum(len(m["content"]) for d in demos for m in prompts.demo_turns(d)) / 4)
    return {
        "fit mean": statistics.fmean(fit_tokens), "fit median": statistics.median(fit_tokens),
        "fit max": max(fit_tokens), "demos": statistics.fmean(n_demos), "demo tokens": statistics.fmean(demo_tokens),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1])
    ap.add_argument("--users", type=int, default=24)
    ap.add_argument("--votes", type=int, default=12)
    ap.add_argument("--config", action="append", default=[], metavar="KEY=VALUE", help="one more arm: one override")
    ap.add_argument("--arm", action="append", default=[], metavar="JSON", help="one more arm: FitConfig overrides")
    args = ap.parse_args()
    arms: list[dict[str, Any]] = [{}]
    for kv in args.config:
        key, _, value = kv.partition("=")
        try:
            arms.append({key: json.loads(value)})
        except json.JSONDecodeError:
            arms.append({key: value})
    arms += [json.loads(a) for a in args.arm]
    table = Table(title=f"{args.users} users x {args.votes} votes per seed, seeds {args.seeds} (SimBackend, chars / 4)")
    for col in ("arm", "fit prompt tokens: mean", "median", "max", "served demos", "served demo tokens per judgment"):
        table.add_column(col, justify="right")
    for over in arms:
        r = asyncio.run(arm(over, args.seeds, args.users, args.votes))
        table.add_row(json.dumps(over) if over else "defaults", f"{r['fit mean']:,.0f}", f"{r['fit median']:,.0f}",
                      f"{r['fit max']:,}", f"{r['demos']:.2f}", f"{r['demo tokens']:,.0f}")  # fmt: skip
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
