"""What a fit costs and what the profile it saves costs to serve, per configuration (in-process simulator).

A fit's prompt tokens are paid once; the served demos are paid again by every live judgment with the
profile (the proxy's judge, ``synth-agent eval``): each carries the demos' turns. A change that makes fits
cheaper by choosing larger demo sets (``FitConfig(step1=...)``, docs/llm.md) moves cost from the fit to serving,
so both are printed side by side. Users are fitted one at a time against :class:`SimBackend` (no HTTP,
no latency: token counts are the simulator's, chars / 4, and do not depend on load).

    python bench/served_demos.py [--seeds 0,1] [--users 24] [--votes 12] [--config step1=race] ...
    python bench/served_demos.py --tenant --config race_demos=served   # fits see their tenant's prior

``--tenant``: each seed's users are fitted one after another into one store, so from the ninth user on each fit
applies the tenant prior the earlier users' selections give (``SelectionConfig.min_prior_users``), as in a
deployment; without it every fit is alone (no prior: the guard serves persona + demos to fewer users).
The last columns split the fits by what the guard serves: with ``FitConfig(race_demos="served")`` a fit that
serves the default skips step 3's race, so the two kinds of fit cost differently.

Each ``--config KEY=VALUE`` (repeatable) is one more arm next to the defaults; ``--arm 'JSON'`` gives an arm
several overrides at once.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
from typing import Any

from langgraph.store.memory import InMemoryStore
from rich.console import Console
from rich.table import Table

from store.memory import PreferenceMemory
from synth_agent import prompts
from synth_agent.engine import FitConfig, Synthesizer
from synth_agent.engine.selection import served
from synth_agent.sim.backend import SimBackend
from synth_agent.sim.population import Population


async def arm(
    overrides: dict[str, Any], seeds: list[int], users: int, votes: int, tenant: bool = False
) -> dict[str, float]:
    """Per-fit prompt tokens (mean, median, max), and per profile the served demos and their prompt tokens."""
    fit_tokens: list[int] = []
    n_demos: list[int] = []
    demo_tokens: list[float] = []
    by_served: dict[bool, list[int]] = {True: [], False: []}
    for seed in seeds:
        pop = Population(users, seed=seed)
        memory = PreferenceMemory(InMemoryStore(), tenant=f"seed{seed}") if tenant else None
        for uid in pop.user_ids:
            llm = SimBackend(seed)
            if memory is not None:
                await memory.add_votes(pop.votes(uid, votes))
                fit = await Synthesizer(llm, memory, FitConfig(**overrides)).fit(uid)
            else:
                fit = await Synthesizer(llm, None, FitConfig(**overrides)).fit(uid, pop.votes(uid, votes))
            fit_tokens.append(llm.stats.total().prompt_tokens)
            assert fit.profile is not None
            by_served[served(fit.profile) == "persona_demos"].append(fit_tokens[-1])
            demos = fit.profile.demos
            n_demos.append(len(demos))
            demo_tokens.append(sum(len(m["content"]) for d in demos for m in prompts.demo_turns(d)) / 4)
    return {
        "fit mean": statistics.fmean(fit_tokens), "fit median": statistics.median(fit_tokens),
        "fit max": max(fit_tokens), "demos": statistics.fmean(n_demos), "demo tokens": statistics.fmean(demo_tokens),
        "served pd": len(by_served[True]), "fit pd": statistics.fmean(by_served[True] or [0]),
        "fit other": statistics.fmean(by_served[False] or [0]),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1])
    ap.add_argument("--users", type=int, default=24)
    ap.add_argument("--votes", type=int, default=12)
    ap.add_argument("--config", action="append", default=[], metavar="KEY=VALUE", help="one more arm: one override")
    ap.add_argument("--arm", action="append", default=[], metavar="JSON", help="one more arm: FitConfig overrides")
    ap.add_argument("--tenant", action="store_true", help="fit each seed's users into one store (the tenant prior)")
    args = ap.parse_args()
    arms: list[dict[str, Any]] = [{}]
    for kv in args.config:
        key, _, value = kv.partition("=")
        try:
            arms.append({key: json.loads(value)})
        except json.JSONDecodeError:
            arms.append({key: value})
    arms += [json.loads(a) for a in args.arm]
    table = Table(title=f"{args.users} users x {args.votes} votes per seed, seeds {args.seeds} (SimBackend, chars / 4"
                        + ("; one tenant per seed, fitted in turn" if args.tenant else "") + ")")
    for col in ("arm", "fit prompt tokens: mean", "median", "max", "profile demos", "demo tokens per judgment",
                "users served persona + demos", "fit mean: those users", "fit mean: the others"):
        table.add_column(col, justify="right")
    n = args.users * len(args.seeds)
    for over in arms:
        r = asyncio.run(arm(over, args.seeds, args.users, args.votes, args.tenant))
        table.add_row(json.dumps(over) if over else "defaults", f"{r['fit mean']:,.0f}", f"{r['fit median']:,.0f}",
                      f"{r['fit max']:,}", f"{r['demos']:.2f}", f"{r['demo tokens']:,.0f}", f"{r['served pd']} of {n}",
                      f"{r['fit pd']:,.0f}", f"{r['fit other']:,.0f}")  # fmt: skip
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
