"""Accuracy and cost of fits on the seeded simulator population, several seeds.

Fits every user of a ``--users`` × ``--votes`` simulated population (default 24 × 25,
the test suite's population) for each seed in ``--seeds`` with the in-process
simulator, then judges each user's held-out target votes in both orders
(``synth_agent.evaluate``: 50/20/30 split). Prints accuracy per method and seed, the
mean over seeds, and what the fits cost (LLM requests and prompt tokens per user).

It only uses APIs that exist since the first release (``evaluate``, ``FitConfig``,
``SimBackend``, ``Population``), so the same file measures an older checkout too:

    .venv/bin/python bench/fit_accuracy.py
    cd /tmp && /path/to/old/checkout/.venv/bin/python /path/to/this/bench/fit_accuracy.py   # "before"
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

from synth_agent.engine import FitConfig
from synth_agent.evaluate import evaluate
from synth_agent.sim.backend import SimBackend
from synth_agent.sim.population import Population

FIT_SITES_EXCLUDED = ("eval_",)


def fit_usage(usage: dict[str, dict[str, int]], n_users: int) -> tuple[float, float]:
    """LLM requests and prompt tokens per user spent by fitting (evaluation call sites excluded)."""
    req = tok = 0
    for site, s in usage.items():
        if site == "total" or site.startswith(FIT_SITES_EXCLUDED):
            continue
        req += s["requests"]
        tok += s["prompt_tokens"]
    return req / n_users, tok / n_users


def parse_overrides(items: list[str]) -> dict[str, object]:
    """``key=value`` FitConfig overrides (values parsed as JSON when they parse, else strings);
    ``selection={"orders": 1}`` becomes a ``SelectionConfig``."""
    out: dict[str, object] = {}
    for item in items:
        key, _, raw = item.partition("=")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    if isinstance(out.get("selection"), dict):
        from synth_agent.engine.selection import SelectionConfig

        out["selection"] = SelectionConfig(**out["selection"])  # type: ignore[arg-type]
    return out


async def one_seed(
    seed: int, users: int, votes: int, methods: list[str], overrides: dict[str, object]
) -> dict[str, object]:
    pop = Population(users, seed=seed)
    llm = SimBackend(seed)
    t0 = time.perf_counter()
    config = FitConfig(seed=seed, **overrides)  # type: ignore[arg-type]
    report = await evaluate(llm, pop.all_votes(votes), methods=methods, config=config)
    wall = time.perf_counter() - t0
    req, tok = fit_usage(report.usage, len(report.users))
    below = sum(
        1 for u in report.users
        if "default" in u.judged and (u.accuracy("persona_demos") or 0) < (u.accuracy("default") or 0)
    )  # fmt: skip
    return {
        "seed": seed,
        "accuracy": {m: s.accuracy for m, s in report.methods.items()},
        "users_below_default": below,
        "fit_requests_per_user": req,
        "fit_prompt_tokens_per_user": tok,
        "wall_s": wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--users", type=int, default=24)
    ap.add_argument("--votes", type=int, default=25)
    ap.add_argument("--methods", default="default,persona,demos,persona_demos")
    ap.add_argument("--json", action="store_true", help="print one JSON object per seed instead of a table")
    ap.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                    help="FitConfig override, repeatable (e.g. --config n_trials=5)")
    args = ap.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        row = asyncio.run(one_seed(seed, args.users, args.votes, methods, parse_overrides(args.config)))
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
    if args.json:
        return
    head = f"{'seed':>5} " + " ".join(f"{m:>14}" for m in methods)
    head += f" {'pd<default':>10} {'fit req/user':>12} {'fit prompt tok/user':>20} {'wall s':>7}"
    print(f"{args.users} users x {args.votes} votes, in-process simulator, held-out votes judged in both orders"
          + (f"; FitConfig overrides {' '.join(args.config)}" if args.config else ""))
    print(head)
    for r in rows:
        acc = r["accuracy"]
        print(f"{r['seed']:>5} " + " ".join(f"{acc[m] * 100:>13.1f}%" for m in methods)
              + f" {r['users_below_default']:>10} {r['fit_requests_per_user']:>12.1f}"
              f" {r['fit_prompt_tokens_per_user']:>20,.0f} {r['wall_s']:>7.1f}")  # fmt: skip
    mean = {m: statistics.mean(r["accuracy"][m] for r in rows) for m in methods}
    print(f"{'mean':>5} " + " ".join(f"{mean[m] * 100:>13.1f}%" for m in methods)
          + f" {statistics.mean(r['users_below_default'] for r in rows):>10.1f}"
          f" {statistics.mean(r['fit_requests_per_user'] for r in rows):>12.1f}"
          f" {statistics.mean(r['fit_prompt_tokens_per_user'] for r in rows):>20,.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
