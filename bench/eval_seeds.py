"""Judge accuracy per method on the seeded 24 x 25 simulated population, seeds 0-4.

The source of every multi-seed accuracy figure in the README and docs/results.md. Per seed:
``Population(24, seed)`` with 25 votes per user, split 50/20/30 per user in time order
(train / validation / held-out target), every target vote judged in both orders, the
in-process simulator (``SimBackend(seed)``, the same brain as ``synth-agent sim-endpoint``)
and ``FitConfig(seed=seed)`` at the paper's budgets. Prints per-seed and mean tables of

* accuracy per method (default, persona, demos, persona_demos, unverified, memory);
* how many users persona + demos scores *below* the default judge (and how many tie);
* the persona written from all verified traces (``persona_traces="all"``, our default)
  vs only the best trial's (``"best"``, the paper's choice).

    python bench/eval_seeds.py                       # seeds 0-4, all of the above
    python bench/eval_seeds.py --seeds 0 --no-traces  # one seed, method table only
    python bench/eval_seeds.py --json out.json        # also write every figure as JSON
    python bench/eval_seeds.py --no-traces --oracle-votes 40  # + what a guard that knew each user's gain could do
    python bench/eval_seeds.py --candidate '{"selection": {"orders": 1}}' --shuffles 3   # paired gate, see below

``--candidate JSON`` (FitConfig overrides; repeatable, each against the base) is the accuracy gate for a cheaper setting: every user is fitted and
judged under the base configuration (``--config``) and under the candidate, each with ``--shuffles`` shuffles of
the cross-validation folds (shuffle 0 is the shipped one; the others re-deal the same votes with another salt, so
the guard's own fold noise is averaged out instead of read as a difference). Per user it takes the mean over
shuffles of served and of persona + demos accuracy in each arm and prints the paired difference (candidate minus
base) with a 95% confidence interval over users (mean +- 1.96 standard errors), per seed and over all seeds, the
users below the default judge per arm, and the fit cost of each arm. Only ``default``, ``persona_demos`` and
``served`` are judged there, and persona only / demos only are not cross-validated (``served`` does not depend on them).

``--oracle-votes N`` refits every user (same seed, same fit) and judges N *fresh* votes of the same
simulated user (another salt) with persona + demos and the default judge: a far better estimate of the
user's real gain than anything a fit can see. It prints what an oracle guard that serves persona + demos
exactly where that fresh gain exceeds a threshold scores on the held-out votes (accuracy, users below
default), and how the cross-validated gain, the held-out gain and the fresh gain correlate: the bound on
what *any* decision rule over persona + demos vs the default can reach on this measurement.
It also prints how well the guard's posterior (its mean gain per user, tenant prior leave-one-out) is
calibrated against the fresh gain, per band of that posterior: the users' fresh and held-out gains and how
many of them persona + demos leaves below the default on the held-out votes.

It uses only APIs that predate the honest simulator (issue 16), so the same file measures
the old code too: ``cd $(mktemp -d) && PYTHONPATH=/work/baseline /work/baseline/.venv/bin/python
/path/to/bench/eval_seeds.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import statistics
import sys
import time
from typing import Any

from fit_accuracy import parse_overrides  # bench/ is on sys.path when a bench script runs

from synth_agent.engine import FitConfig, Synthesizer
from synth_agent.engine.judge import Judge, count_correct
from synth_agent.evaluate import ALL_METHODS, EvalReport, evaluate
from synth_agent.sim.backend import SimBackend
from synth_agent.sim.population import Population

# "served" (what the per-user guard serves, issue 16) exists only where the code has it: the same file
# still measures older code.
METHODS = ("default", "persona", "demos", "persona_demos", *(("served",) if "served" in ALL_METHODS else ()),
           "unverified", "memory")
SHORT = {"default": "default", "persona": "persona", "demos": "demos", "persona_demos": "pers+demos",
         "served": "served", "unverified": "unverified", "memory": "memory"}


def population(n_users: int, seed: int, noise_fraction: float) -> Population:
    """The seeded population; ``noise_fraction`` only where the simulator supports noise users."""
    if noise_fraction:
        if "noise_fraction" not in inspect.signature(Population).parameters:
            sys.exit("this version of the simulator has no noise users (--noise-fraction)")
        return Population(n_users, seed, noise_fraction=noise_fraction)  # type: ignore[call-arg]
    return Population(n_users, seed)


OVERRIDES: dict[str, Any] = {}
"""FitConfig overrides from ``--config KEY=VALUE`` (``selection`` as a JSON object of SelectionConfig fields)."""


def fit_config(seed: int, overrides: dict[str, Any] | None = None, *, score_all: bool = True) -> FitConfig:
    """The default FitConfig (with ``--config`` overrides, or ``overrides``); where the guard exists, it also
    cross-validates the configurations it does not serve by default (persona only, demos only; ``score_all``),
    so ``--sweep`` can show what serving them would do."""
    over = dict(OVERRIDES if overrides is None else overrides)
    if "served" not in METHODS:
        return FitConfig(seed=seed, **over)
    from synth_agent.engine.selection import SelectionConfig

    sel = over.pop("selection", {})
    if isinstance(sel, SelectionConfig):  # fit_accuracy.parse_overrides builds one
        sel = {k: getattr(sel, k) for k in SelectionConfig.__dataclass_fields__ if k != "score_all"}
    return FitConfig(seed=seed, selection=SelectionConfig(**{"score_all": score_all, **sel}), **over)  # type: ignore[call-arg]


def fold_shuffle(k: int) -> None:
    """Deal the cross-validation folds with shuffle ``k`` (0: the shipped salt). The bench patches the method
    rather than adding a product knob: only the fold assignment's salt changes, nothing in the method."""
    orig = getattr(Synthesizer, "_shipped_cv_folds", Synthesizer.cv_folds)
    Synthesizer._shipped_cv_folds = orig  # type: ignore[attr-defined]
    if k == 0:
        Synthesizer.cv_folds = orig  # type: ignore[method-assign]
        return

    def cv_folds(self: Synthesizer, user_id: str, votes: Any) -> Any:
        return orig(self, f"{user_id}\x1ffold-shuffle-{k}", votes)

    Synthesizer.cv_folds = cv_folds  # type: ignore[method-assign]


GATE_METHODS = ("default", "persona_demos", "served")


async def gate_arm(seed: int, pop: Population, votes: list[Any], overrides: dict[str, Any], shuffle: int,
                   args: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    """One arm of the paired gate: per-user served / persona + demos / default accuracy, users below default, cost."""
    from fit_accuracy import fit_usage  # bench/ is on sys.path when a bench script runs

    fold_shuffle(shuffle)
    try:
        report = await evaluate(SimBackend(seed), votes, methods=GATE_METHODS,
                                config=fit_config(seed, overrides, score_all=False))  # fmt: skip
    finally:
        fold_shuffle(0)
    req, tok = fit_usage(report.usage, len(report.users))
    return {
        "per_user": {u.user_id: {m: u.accuracy(m) for m in GATE_METHODS} for u in report.users},
        "served_pd": sum(1 for u in report.users if (u.selection or {}).get("served") == "persona_demos"),
        "fit_requests": req, "fit_tokens": tok,
    }  # fmt: skip


def paired_ci(diffs: list[float]) -> tuple[float, float, float]:
    """Mean of per-user differences and its 95% confidence interval over users (normal approximation)."""
    n = len(diffs)
    mean = statistics.fmean(diffs)
    se = statistics.stdev(diffs) / n**0.5 if n > 1 else float("nan")
    return mean, mean - 1.96 * se, mean + 1.96 * se


async def run_gate(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each ``--candidate`` vs the base, paired per user, averaged over fold shuffles; prints per seed and overall."""
    base = dict(OVERRIDES)
    cands = [json.loads(c) for c in args.candidate]
    arms = {"base": base, **{f"candidate {i + 1}": c for i, c in enumerate(cands)}}
    rows: dict[str, dict[str, dict[str, float]]] = {a: {} for a in arms}  # arm -> seed/user -> metric
    cost: dict[str, list[tuple[float, float]]] = {a: [] for a in arms}
    below: dict[str, list[float]] = {a: [] for a in arms}
    served_pd: dict[str, list[float]] = {a: [] for a in arms}
    for seed in args.seeds:
        pop = population(args.users, seed, args.noise_fraction)
        votes = pop.all_votes(args.votes)
        t0 = time.perf_counter()
        for arm, over in arms.items():
            runs = [await gate_arm(seed, pop, votes, over, k, args) for k in range(args.shuffles)]
            rows[arm].update({
                f"{seed}/{u}": {m: statistics.fmean(r["per_user"][u][m] for r in runs) for m in GATE_METHODS}
                for u in runs[0]["per_user"]
            })  # fmt: skip
            cost[arm].append((runs[0]["fit_requests"], runs[0]["fit_tokens"]))
            below[arm].append(statistics.fmean(
                sum(1 for a in r["per_user"].values() if a["served"] < a["default"]) for r in runs))
            served_pd[arm].append(statistics.fmean(r["served_pd"] for r in runs))
        print(f"seed {seed} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    n_ctx = round(args.votes * 0.5) + max(1, round(args.votes * 0.2))
    shown = json.dumps(base, default=lambda o: {k: getattr(o, k) for k in o.__dataclass_fields__})
    print(f"\nPaired gate vs base {shown if base else '(defaults)'}; {args.users} users x {args.votes} votes, "
          f"seeds {','.join(map(str, args.seeds))}, {args.shuffles} fold shuffle(s) averaged per user")
    print("per-user difference candidate - base, accuracy points: mean [95% CI over users]")

    def arm_line(arm: str) -> str:
        req = statistics.fmean(c[0] for c in cost[arm])
        tok = statistics.fmean(c[1] for c in cost[arm])
        acc = {m: statistics.fmean(r[m] for r in rows[arm].values()) for m in GATE_METHODS}
        return (f"served {pct(acc['served'])}, persona + demos {pct(acc['persona_demos'])}, default "
                f"{pct(acc['default'])}; users served < default {sum(below[arm]):.1f} of {len(rows[arm])}, served "
                f"persona + demos {sum(served_pd[arm]):.1f}; fit {req:.1f} requests / {tok:,.0f} prompt tokens per "
                f"{n_ctx}-context-vote user")  # fmt: skip

    print(f"  base: {arm_line('base')}")
    out = []
    for arm, over in arms.items():
        if arm == "base":
            continue
        print(f"  {arm} {json.dumps(over)}: {arm_line(arm)}")
        res: dict[str, Any] = {"candidate": over, "below": sum(below[arm]), "below_base": sum(below["base"])}
        for m in ("served", "persona_demos"):
            for label, seeds in (("all", args.seeds), *((f"seed {s}", [s]) for s in args.seeds)):
                keys = [u for u in rows["base"] if int(u.split("/")[0]) in seeds]
                d = [rows[arm][u][m] - rows["base"][u][m] for u in keys]
                res.setdefault(m, {})[label] = ci = paired_ci(d)
                if label == "all":
                    all_ci = ci
            print(f"      {m:>13s}: {100 * all_ci[0]:+.2f} [{100 * all_ci[1]:+.2f}, {100 * all_ci[2]:+.2f}] over "
                  f"{len(rows['base'])} users; per seed "
                  + ", ".join(f"{s}: {100 * res[m][f'seed {s}'][0]:+.2f}" for s in args.seeds))
        out.append(res)
    return out


def below_default(report: EvalReport, method: str) -> tuple[int, int, int]:
    """(users where ``method`` < default, users where equal, users with both) by per-user accuracy."""
    below = ties = n = 0
    for u in report.users:
        a, d = u.accuracy(method), u.accuracy("default")
        if a is None or d is None:
            continue
        n += 1
        below += a < d
        ties += a == d
    return below, ties, n


async def one_seed(seed: int, args: argparse.Namespace) -> dict[str, Any]:
    pop = population(args.users, seed, args.noise_fraction)
    votes = pop.all_votes(args.votes)
    t0 = time.perf_counter()
    report = await evaluate(SimBackend(seed), votes, methods=METHODS, config=fit_config(seed))
    out: dict[str, Any] = {
        "seed": seed,
        "accuracy": {m: report.methods[m].accuracy for m in METHODS},
        "ci": {m: [report.methods[m].ci_low, report.methods[m].ci_high] for m in METHODS},
        "users": len(report.users),
        "below_default": {m: below_default(report, m)[0] for m in METHODS if m != "default"},
        "ties_default": {m: below_default(report, m)[1] for m in METHODS if m != "default"},
        "per_user": {u.user_id: {m: u.accuracy(m) for m in METHODS} for u in report.users},
    }
    if args.noise_fraction:
        noise = set(pop.noise_user_ids)  # type: ignore[attr-defined]
        out["noise_users"] = sorted(noise)
        out["noise_below_default"] = sum(
            1 for u in report.users
            if u.user_id in noise and (u.accuracy("persona_demos") or 0) < (u.accuracy("default") or 0))
        if "served" in METHODS:
            out["noise_served_default"] = sum(
                1 for u in report.users if u.user_id in noise and (u.selection or {}).get("served") == "default")
            out["strong_served_personalized"] = sum(
                1 for u in report.users if u.user_id not in noise and (u.selection or {}).get("served") != "default")
    if "served" in METHODS:
        out["guard"] = {u.user_id: {"selection": u.selection, "options": u.options, "judged": 2 * u.n_target}
                        for u in report.users}
    if args.oracle_votes:
        out["oracle"] = await fresh_gains(pop, votes, seed, args.oracle_votes)
    if args.traces:
        best = await evaluate(SimBackend(seed), votes, methods=("persona", "persona_demos"),
                              config=FitConfig(seed=seed, persona_traces="best"))
        out["traces"] = {
            "all": {m: report.methods[m].accuracy for m in ("persona", "persona_demos")},
            "best": {m: best.methods[m].accuracy for m in ("persona", "persona_demos")},
        }
    out["seconds"] = time.perf_counter() - t0
    return out


async def fresh_gains(pop: Population, votes: list[Any], seed: int, n_fresh: int) -> dict[str, float]:
    """Per user: persona + demos minus default accuracy on ``n_fresh`` fresh votes of the same simulated user
    (the fit is the one ``evaluate`` made: same votes, same seed, deterministic)."""
    from synth_agent.evaluate import split_for_eval

    llm = SimBackend(seed)
    by_user: dict[str, list[Any]] = {}
    for v in votes:
        by_user.setdefault(v.user_id, []).append(v)

    async def one(uid: str, vs: list[Any]) -> tuple[str, float]:
        context, _ = split_for_eval(vs)
        fit = await Synthesizer(llm, None, fit_config(seed)).fit(uid, context, save=False)
        fresh = pop.votes(uid, n_fresh, salt=1)
        both = lambda _v: (True, False)  # noqa: E731
        (pd, n), (d, _) = await asyncio.gather(
            count_correct(Judge.from_profile(llm, fit.profile, guard=False), fresh, both),
            count_correct(Judge(llm), fresh, both))
        return uid, (pd - d) / n

    return dict(await asyncio.gather(*(one(u, vs) for u, vs in by_user.items())))


def print_oracle(results: list[dict[str, Any]]) -> None:
    """What a guard that knew each user's gain (from fresh votes) would score on the held-out votes."""
    import numpy as np

    rows = [(r["oracle"][u], acc["persona_demos"], acc["default"],
             ((r.get("guard", {}).get(u) or {}).get("selection") or {}).get("gain", {}).get("persona_demos"))
            for r in results for u, acc in r["per_user"].items()]
    fresh = np.array([x[0] for x in rows])
    held = np.array([x[1] - x[2] for x in rows])
    print(f"\noracle guard: fresh-vote gain of persona + demos over default per user ({len(rows)} users): mean "
          f"{100 * fresh.mean():+.1f} points, sd {100 * fresh.std():.1f}; below 0 for {int((fresh < 0).sum())}")
    cv = [x[3] for x in rows if x[3] is not None]
    corr = f"corr(fresh, held-out gain) {np.corrcoef(fresh, held)[0, 1]:.2f}"
    if len(cv) == len(rows):
        corr += (f", corr(cross-validated, held-out) {np.corrcoef(cv, held)[0, 1]:.2f}, "
                 f"corr(cross-validated, fresh) {np.corrcoef(cv, fresh)[0, 1]:.2f}")
    print(corr)
    for t in (-0.05, 0.0, 0.05, 0.10, 0.15):
        served = [pd if g > t else d for g, pd, d, _ in rows]
        below = sum(1 for g, pd, d, _ in rows if g > t and pd < d)
        print(f"  serve persona + demos where fresh gain > {100 * t:+.0f} points: served "
              f"{pct(statistics.fmean(served))}, below default {below}/{len(rows)}, "
              f"default served {sum(1 for g, *_ in rows if g <= t)}")
    if len(cv) == len(rows):
        print_calibration(results)


def print_calibration(results: list[dict[str, Any]]) -> None:
    """Does the guard's posterior know whom persona + demos hurts? Per band of its posterior mean gain (the
    tenant prior leave-one-out, as ``served`` uses it): the users' real gain on fresh votes, their gain on the
    held-out votes, and how many of them persona + demos leaves below the default on the held-out votes."""
    import numpy as np

    from synth_agent.engine.selection import Selection, population_prior

    post, fresh, held = [], [], []
    for r in results:
        sels = {u: Selection.from_meta(g["selection"]) for u, g in r["guard"].items() if g["selection"]}
        for u, sel in sels.items():
            prior = population_prior([s for v, s in sels.items() if v != u]).get("persona_demos")
            post.append(sel.posterior("persona_demos", prior)[0] / 2)  # per vote out of 2 -> accuracy points
            fresh.append(r["oracle"][u])
            held.append(r["per_user"][u]["persona_demos"] - r["per_user"][u]["default"])
    p, f, h = np.array(post), np.array(fresh), np.array(held)
    slope, icept = np.polyfit(p, f, 1)
    print(f"\nguard posterior vs fresh gain ({len(p)} users): fresh = {slope:.2f} x posterior mean "
          f"{100 * icept:+.1f} points (1.00 x +0 if calibrated); truly hurt (fresh gain < 0): {int((f < 0).sum())}; "
          f"below default on held-out votes although fresh gain > 0: {int(((h < 0) & (f > 0)).sum())}")
    print("  posterior mean gain   users   fresh gain   held-out gain   p+d below default on held-out")
    for lo, hi in ((-1.0, 0.0), (0.0, 0.05), (0.05, 0.10), (0.10, 0.15), (0.15, 1.0)):
        m = (p > lo) & (p <= hi)
        if m.any():
            band = f"({max(100 * lo, -100):+.0f}, {min(100 * hi, 100):+.0f}] points"
            print(f"  {band:>19s}   {int(m.sum()):5d}   {100 * f[m].mean():+9.1f}   {100 * h[m].mean():+12.1f}"
                  f"   {int((h[m] < 0).sum()):5d} ({100 * (h[m] < 0).mean():.0f}%)")


def pct(x: float) -> str:
    return f"{100 * x:5.1f}"


def print_tables(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    n = results[0]["users"]
    print(f"\nAccuracy on held-out votes (%), {args.users} users x {args.votes} votes, 50/20/30 split, "
          "both orders judged; 'below' = users for whom persona + demos < default")
    head = "seed " + " ".join(f"{SHORT[m]:>10s}" for m in METHODS) + "   below  ties  users"
    print(head)
    print("-" * len(head))
    for r in results:
        row = " ".join(f"{pct(r['accuracy'][m]):>10s}" for m in METHODS)
        print(f"{r['seed']:>4d} {row}   {r['below_default']['persona_demos']:>5d} "
              f"{r['ties_default']['persona_demos']:>5d}  {r['users']:>5d}")
    if "served" in METHODS:
        print("\nwhat the per-user guard serves (issue 16): accuracy, users below / level with / served the default")
        for r in results:
            served = [g["selection"]["served"] for g in r["guard"].values() if g["selection"]]
            print(f"seed {r['seed']}: served {pct(r['accuracy']['served'])} vs default {pct(r['accuracy']['default'])}"
                  f" and persona + demos {pct(r['accuracy']['persona_demos'])}; below default "
                  f"{r['below_default']['served']}/{r['users']}, level {r['ties_default']['served']}; served: "
                  + ", ".join(f"{c} {served.count(c)}" for c in ("persona_demos", "persona", "demos", "default")))
    if len(results) > 1:
        mean = {m: statistics.fmean(r["accuracy"][m] for r in results) for m in METHODS}
        row = " ".join(f"{pct(mean[m]):>10s}" for m in METHODS)
        below = sum(r["below_default"]["persona_demos"] for r in results)
        ties = sum(r["ties_default"]["persona_demos"] for r in results)
        users = sum(r["users"] for r in results)
        print(f"mean {row}   {below:>5d} {ties:>5d}  {users:>5d}")
        gaps = [r["accuracy"]["persona_demos"] - r["accuracy"]["default"] for r in results]
        print(f"persona + demos minus default: min {100 * min(gaps):+.1f}, mean {100 * statistics.fmean(gaps):+.1f}, "
              f"max {100 * max(gaps):+.1f} points")
    if args.noise_fraction:
        print(f"noise users (hidden weights zero): {sum(len(r['noise_users']) for r in results)}, of whom "
              f"{sum(r['noise_below_default'] for r in results)} have persona + demos below the default judge")
        if "served" in METHODS:
            n_strong = sum(r["users"] - len(r["noise_users"]) for r in results)
            print(f"the guard serves the default judge to {sum(r['noise_served_default'] for r in results)} noise users "
                  f"and personalization to {sum(r['strong_served_personalized'] for r in results)} of {n_strong} others")
    if args.sweep and "served" in METHODS:
        print_sweep(results)
    if args.oracle_votes:
        print_oracle(results)
    print("\nusers below the default judge, per method (sum over seeds):  " + ", ".join(
        f"{m} {sum(r['below_default'][m] for r in results)}/{sum(r['users'] for r in results)}"
        for m in METHODS if m != "default"))
    if args.traces:
        print("\npersona written from all verified traces vs the best trial's only (%):")
        print("seed  persona/all persona/best  p+d/all  p+d/best")
        for r in results:
            t = r["traces"]
            print(f"{r['seed']:>4d}  {pct(t['all']['persona']):>11s} {pct(t['best']['persona']):>12s} "
                  f"{pct(t['all']['persona_demos']):>8s} {pct(t['best']['persona_demos']):>9s}")
        if len(results) > 1:
            def m(kind: str, meth: str) -> str:
                return pct(statistics.fmean(r["traces"][kind][meth] for r in results))
            print(f"mean  {m('all', 'persona'):>11s} {m('best', 'persona'):>12s} "
                  f"{m('all', 'persona_demos'):>8s} {m('best', 'persona_demos'):>9s}")
    print(f"\n({n} users per seed; {sum(r['seconds'] for r in results):.0f} s in all)")


def print_sweep(results: list[dict[str, Any]]) -> None:
    """The guard re-applied offline (no new judgments) at other z, candidates, with and without the prior."""
    from synth_agent.engine.selection import Selection, population_prior

    print("\nguard variants (re-applied to the same cross-validation results): served accuracy, users below default")
    for prior_on in (True, False):
        for cands in (("persona_demos",), ("persona_demos", "demos"), ("persona_demos", "persona", "demos")):
            for z in (0.0, 0.5, 1.0, 1.28, 1.645, 2.0):  # 0: the posterior mean alone (expected accuracy)
                acc = judged = below = n = dflt = 0
                for r in results:
                    sels = {u: Selection.from_meta(g["selection"]) for u, g in r["guard"].items() if g["selection"]}
                    for u, sel in sels.items():
                        prior = population_prior([s for v, s in sels.items() if v != u]) if prior_on else None
                        c = sel.rechoose(z, prior, cands)
                        opts = r["guard"][u]["options"]
                        acc += opts[c]
                        judged += r["guard"][u]["judged"]
                        n += 1
                        below += opts[c] < opts["default"]
                        dflt += c == "default"
                print(f"  prior {'on ' if prior_on else 'off'} z={z:<5} {'+'.join(cands):<28s} "
                      f"served {pct(acc / max(judged, 1))}  below {below:>3d}/{n}  default served {dflt:>3d}")


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    for seed in args.seeds:
        r = await one_seed(seed, args)
        print(f"seed {seed}: default {pct(r['accuracy']['default'])}, persona + demos "
              f"{pct(r['accuracy']['persona_demos'])} ({r['seconds']:.0f} s)", file=sys.stderr, flush=True)
        results.append(r)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2, 3, 4],
                    help="comma-separated seeds (default 0,1,2,3,4)")
    ap.add_argument("--users", type=int, default=24)
    ap.add_argument("--votes", type=int, default=25)
    ap.add_argument("--noise-fraction", type=float, default=0.0,
                    help="share of users whose votes are pure noise (hidden weights zero)")
    ap.add_argument("--no-traces", dest="traces", action="store_false",
                    help="skip the persona_traces all-vs-best comparison")
    ap.add_argument("--json", help="write every figure (per seed and per user) to this file")
    ap.add_argument("--sweep", action="store_true",
                    help="also re-apply the per-user guard at other settings (no new judgments)")
    ap.add_argument("--oracle-votes", type=int, default=0, metavar="N",
                    help="also judge N fresh votes per user to bound what any guard can reach (see above)")
    ap.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                    help='FitConfig override, repeatable (e.g. --config n_trials=3 --config \'selection={"orders": 1}\')')
    ap.add_argument("--candidate", action="append", default=[], metavar="JSON",
                    help='paired accuracy gate: FitConfig overrides as one JSON object, e.g. \'{"n_trials": 2}\' '
                         "(repeatable: each candidate against the base --config)")
    ap.add_argument("--shuffles", type=int, default=1,
                    help="with --candidate: cross-validation fold shuffles averaged per user (default 1)")
    args = ap.parse_args()
    OVERRIDES.update(parse_overrides(args.config))
    if args.candidate:
        gate = asyncio.run(run_gate(args))
        if args.json:
            with open(args.json, "w", encoding="utf-8") as fh:
                json.dump({"args": vars(args), "gate": gate}, fh, indent=2)
        return
    results = asyncio.run(main_async(args))
    print_tables(results, args)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"args": vars(args), "results": results}, fh, indent=2, ensure_ascii=False)


if __name__ == "__main__":
    main()
