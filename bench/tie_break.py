"""Persona + demos with the default judge breaking its ties, on the seeded 24 x 25 population (issue 16).

A chain-of-thought judge gives no probabilities, so the only sign that the personalized judge is unsure
of a pair is that its two presentation orders disagree (``Judge.compare`` reports a tie). This measures the
soft decision that sign allows: where persona + demos splits its orders, the default judge's two verdicts
decide instead ("tie-break"); elsewhere persona + demos decides. It needs per-vote verdicts on the held-out
votes, which ``evaluate`` sums away, so the bench records them (it wraps ``synth_agent.evaluate``'s target
scorer; the fits and judgments are the ones ``bench/eval_seeds.py`` makes). On the cross-validated votes the
same rule is free: ``per_vote`` already holds both judges' correct counts per vote.

Per seed, and summed: the default judge, persona + demos to all, tie-break to all, and the guard (tenant prior
leave-one-out, as ``served``) serving persona + demos or tie-break where it serves a personalized judge, each
with the users below the default judge on their held-out votes; then the guard at other ``z`` (no new
judgments; "CV tie-break" also scores the tie-break rule on the cross-validated votes the guard reads).

    python bench/tie_break.py --seeds 5,6,7,8,9 --config demo_votes=context
    python bench/tie_break.py --json out.json      # seeds 0-4, per-vote verdicts kept
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from collections.abc import Sequence
from typing import Any

from fit_accuracy import parse_overrides  # bench/ is on sys.path when a bench script runs

import synth_agent.evaluate as evaluate_module
from synth_agent.engine import FitConfig
from synth_agent.engine.judge import Judge
from synth_agent.engine.selection import Selection, SelectionConfig, choose, population_prior
from synth_agent.models import Vote
from synth_agent.sim.backend import SimBackend
from synth_agent.sim.population import Population

Z_SWEEP = (0.0, 0.5, 1.0, 1.28, 1.645, 2.0)


def tie_break(pd: Sequence[int], default: Sequence[int]) -> list[int]:
    """Per vote (correct orders out of 2): persona + demos, or the default judge's count where persona +
    demos split its two orders (count 1). A split default as well stays a tie (1)."""
    return [d if p == 1 else p for p, d in zip(pd, default, strict=True)]


async def judged_seed(seed: int, overrides: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per user: held-out per-vote correct counts of persona + demos and the default judge, and the selection."""
    recorded: dict[tuple[str, str], list[int]] = {}

    async def per_vote_targets(judge: Judge, targets: Sequence[Vote]) -> int:
        counts = []
        for v in targets:
            (a, _, _), (b, _, _) = await asyncio.gather(judge.judge_order(v.context, v.chosen, v.rejected),
                                                        judge.judge_order(v.context, v.rejected, v.chosen))
            counts.append((a == "A") + (b == "B"))
        recorded[(judge.call_site, targets[0].user_id)] = counts
        return sum(counts)

    over = dict(overrides)
    sel = over.pop("selection", SelectionConfig())
    config = FitConfig(seed=seed, selection=sel, **over)
    original = evaluate_module._judge_targets
    evaluate_module._judge_targets = per_vote_targets  # type: ignore[assignment]
    try:
        report = await evaluate_module.evaluate(SimBackend(seed), Population(24, seed).all_votes(25),
                                                methods=("default", "persona_demos", "served"), config=config)
    finally:
        evaluate_module._judge_targets = original  # type: ignore[assignment]
    return {u.user_id: {"pd": recorded[("eval_persona_demos", u.user_id)], "default": recorded[("eval_default", u.user_id)],
                        "selection": u.selection} for u in report.users}  # fmt: skip


def score(users: dict[str, dict[str, Any]], z: float | None, rule: str, cv_tie_break: bool = False) -> tuple[float, int]:
    """(mean per-user accuracy, users below the default) when ``rule`` ("pd" or "tie_break") is served where
    the guard at ``z`` serves persona + demos (``z`` None: to everyone)."""
    sels = {u: Selection.from_meta(x["selection"]) for u, x in users.items()}
    if cv_tie_break:
        sels = {u: choose({"default": s.per_vote["default"],
                           "persona_demos": tie_break(s.per_vote["persona_demos"], s.per_vote["default"])}, z=z or 0.0)
                for u, s in sels.items()}  # fmt: skip
    accs, below = [], 0
    for u, x in users.items():
        served = "persona_demos"
        if z is not None:
            prior = population_prior([s for v, s in sels.items() if v != u])
            served = sels[u].rechoose(z, prior, ("persona_demos",))
        got = x["default"] if served == "default" else x["pd"] if rule == "pd" else tie_break(x["pd"], x["default"])
        accs.append(sum(got) / (2 * len(got)))
        below += sum(got) < sum(x["default"])
    return statistics.fmean(accs), below


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2, 3, 4])
    ap.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                    help="FitConfig override, repeatable (e.g. --config demo_votes=context)")
    ap.add_argument("--json", help="write the per-vote verdicts and selections to this file")
    args = ap.parse_args()
    overrides = parse_overrides(args.config)
    z0 = overrides["selection"].z if isinstance(overrides.get("selection"), SelectionConfig) else SelectionConfig().z
    seeds: dict[int, dict[str, dict[str, Any]]] = {}
    for seed in args.seeds:
        seeds[seed] = asyncio.run(judged_seed(seed, overrides))
        print(f"seed {seed} judged", file=sys.stderr, flush=True)

    def pct(x: float) -> str:
        return f"{100 * x:5.1f}"

    print(f"\nheld-out accuracy (%) and users below the default judge; config {args.config or '(defaults)'}, guard z={z0}")
    print("seed  default   p+d to all   tie-break to all   served (guard)   served, tie-break   p+d order splits")
    n_all = 0
    for seed, users in seeds.items():
        n = len(users)
        n_all += n
        dflt = statistics.fmean(sum(x["default"]) / (2 * len(x["default"])) for x in users.values())
        cols = [score(users, None, "pd"), score(users, None, "tie_break"), score(users, z0, "pd"),
                score(users, z0, "tie_break")]  # fmt: skip
        splits = sum(c == 1 for x in users.values() for c in x["pd"])
        votes = sum(len(x["pd"]) for x in users.values())
        print(f"{seed:>4d}  {pct(dflt)}   " + "   ".join(f"{pct(a)} ({b:>2d})" for a, b in cols)
              + f"   {splits}/{votes}")
    every = {f"{s}/{u}": x for s, users in seeds.items() for u, x in users.items()}
    # the guard's prior comes from the user's own population (seed), so pool per seed
    print(f"\nguard re-applied at other z, summed over seeds ({n_all} users): mean accuracy / users below default")
    for z in (None, *Z_SWEEP):
        cells = []
        for rule, cv in (("pd", False), ("tie_break", False), ("tie_break", True)):
            if z is None and cv:
                continue
            res = [score(users, z, rule, cv) for users in seeds.values()]
            acc = sum(a * len(u) for (a, _), u in zip(res, seeds.values(), strict=True)) / n_all
            cells.append(f"{pct(acc)} / {sum(b for _, b in res):>3d}")
        label = "to all " if z is None else f"z={z:<5}"
        print(f"  {label}  p+d {cells[0]}   tie-break {cells[1]}" + (f"   CV tie-break {cells[2]}" if len(cells) > 2 else ""))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"args": vars(args), "users": every}, fh, indent=2)


if __name__ == "__main__":
    main()
