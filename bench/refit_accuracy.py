"""Accuracy and cost of an incremental refit against a full refit, on the seeded simulator population.

Per seed, ``Population(--users, seed)`` with ``--first + --new + --held`` votes per user (default
12 + 4 + 9), the in-process simulator (``SimBackend(seed)``) and ``FitConfig(seed=seed)``. Every user is
fitted on the first ``--first`` votes, then ``--new`` votes are added and the user is refitted twice,
each from the same first fit in its own preference memory:

* **incremental** — the default: the new votes are judged alone and the guard's evidence extended
  (:meth:`Synthesizer.update <synth_agent.engine.synthesize.Synthesizer.update>`), or a full fit where
  the new votes show the persona stale or the context grew too much;
* **full** — ``FitConfig(incremental=False)``: bootstrap, persona, demos and selection again.

The ``--held`` last votes are never seen by any fit: each arm's *served* judge (the guard's choice,
re-applied with the leave-one-out prior of the other users of the same arm, as ``synth_agent.evaluate``
does) judges them in both orders. Prints per seed and mean: served accuracy, users below the default
judge, persona + demos accuracy, how many refits stayed incremental, and the refits' LLM requests and
prompt tokens per user (the first fit's for scale).

    python bench/refit_accuracy.py                  # seeds 0-4, 24 users, 12 + 4 + 9 votes
    python bench/refit_accuracy.py --seeds 0 --new 2
    python bench/refit_accuracy.py --tenant         # each arm one tenant: the fits apply its prior themselves

``--tenant``: per seed and arm, all users live in one store and are fitted one after another (then all refitted
one after another), so each fit applies the tenant prior the users fitted before it give, as in a deployment, and
*served* is what the fit itself chose — nothing is re-applied afterwards. Use it where a change makes what a
profile holds depend on that choice (``FitConfig(race_demos="served")``: the leave-one-out re-application would
score unraced demos a fit under that prior would have raced).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import replace
from typing import Any

from fit_accuracy import parse_overrides  # bench/ is on sys.path when a bench script runs
from langgraph.store.memory import InMemoryStore

from store.memory import PreferenceMemory
from synth_agent.engine import FitConfig, Judge, Synthesizer
from synth_agent.engine.judge import count_correct
from synth_agent.engine.selection import Selection, population_prior
from synth_agent.engine.selection import served as served_configuration
from synth_agent.models import PersonaProfile, Vote
from synth_agent.sim.backend import SimBackend
from synth_agent.sim.population import Population

OVERRIDES: dict[str, Any] = {}
"""FitConfig overrides from ``--config KEY=VALUE``."""

ARMS = ("first", "incremental", "full")


def both(_v: Vote) -> tuple[bool, bool]:
    return (True, False)


async def one_user(llm: SimBackend, uid: str, votes: list[Vote], cfg: FitConfig, n_first: int, n_new: int,
                   tenant: str) -> dict[str, Any]:  # fmt: skip
    first_votes, new_votes, held = votes[:n_first], votes[n_first : n_first + n_new], votes[n_first + n_new :]
    out: dict[str, Any] = {"profiles": {}, "usage": {}}
    for arm, arm_cfg in (("incremental", cfg), ("full", replace(cfg, incremental=False))):
        mem = PreferenceMemory(InMemoryStore(), tenant=f"{tenant}-{arm}")
        await mem.add_votes(first_votes)
        first = await Synthesizer(llm, mem, arm_cfg).fit(uid)
        await mem.add_votes(new_votes)
        refit = await Synthesizer(llm, mem, arm_cfg).fit(uid)
        assert first.profile is not None and refit.profile is not None, (first.message, refit.message)
        out["profiles"]["first"] = first.profile
        out["usage"]["first"] = first.usage
        out["profiles"][arm] = refit.profile
        out["usage"][arm] = refit.usage
    await judge_held(llm, out, held)
    return out


async def judge_held(llm: SimBackend, out: dict[str, Any], held: list[Vote]) -> None:
    """Into ``out``: the default judge's correct held-out judgments (``default``, of ``judged``) and, per arm,
    those of the arm's profile as fitted (persona + demos, no guard: ``pd``)."""
    out["default"], out["judged"] = await count_correct(Judge(llm, call_site="eval_default"), held, both)
    out["pd"] = {}
    for arm in ARMS:
        p: PersonaProfile = out["profiles"][arm]
        out["pd"][arm], _ = await count_correct(Judge.from_profile(llm, p, guard=False, call_site="eval_pd"), held, both)


async def tenant_users(llm: SimBackend, pop: Population, cfg: FitConfig, args: argparse.Namespace,
                       tenant: str) -> dict[str, dict[str, Any]]:  # fmt: skip
    """``--tenant``: per arm one store for all users; first fits one after another, then the refits."""
    n = args.first + args.new + args.held
    votes = {u: pop.votes(u, n) for u in pop.user_ids}
    out: dict[str, dict[str, Any]] = {u: {"profiles": {}, "usage": {}} for u in pop.user_ids}
    for arm, arm_cfg in (("incremental", cfg), ("full", replace(cfg, incremental=False))):
        mem = PreferenceMemory(InMemoryStore(), tenant=f"{tenant}-{arm}")
        for stage, (lo, hi) in (("first", (0, args.first)), (arm, (args.first, args.first + args.new))):
            for u in pop.user_ids:
                await mem.add_votes(votes[u][lo:hi])
                fit = await Synthesizer(llm, mem, arm_cfg).fit(u)
                assert fit.profile is not None, fit.message
                if stage != "first" or arm == "incremental":  # both arms' first fits are the same fits
                    out[u]["profiles"][stage], out[u]["usage"][stage] = fit.profile, fit.usage
    for u in pop.user_ids:
        await judge_held(llm, out[u], votes[u][args.first + args.new :])
    return out


def served_by_fit(users: dict[str, dict[str, Any]], arm: str) -> dict[str, int]:
    """``--tenant``: per user, correct held-out judgments of what the fit itself chose to serve."""
    out = {}
    for u, r in users.items():
        chosen = served_configuration(r["profiles"][arm])
        if chosen not in ("persona_demos", "default"):
            raise SystemExit(f"served {chosen!r}: this bench scores persona_demos and default only")
        out[u] = r["pd"][arm] if chosen == "persona_demos" else r["default"]
    return out


def served_correct(users: dict[str, dict[str, Any]], arm: str, cfg: FitConfig) -> dict[str, int]:
    """Per user: correct held-out judgments of what the guard serves in ``arm`` (leave-one-out tenant prior)."""
    sc = cfg.selection
    sels = {u: Selection.from_meta(r["profiles"][arm].meta["selection"]) for u, r in users.items()}
    out = {}
    for u, sel in sels.items():
        prior = population_prior([s for v, s in sels.items() if v != u], min_users=sc.min_prior_users)
        chosen = sel.rechoose(sc.z, prior, sc.candidates)
        if chosen not in ("persona_demos", "default"):
            raise SystemExit(f"served {chosen!r}: this bench scores persona_demos and default only")
        out[u] = users[u]["pd"][arm] if chosen == "persona_demos" else users[u]["default"]
    return out


async def one_seed(seed: int, args: argparse.Namespace) -> dict[str, Any]:
    pop = Population(args.users, seed=seed)
    llm = SimBackend(seed)
    cfg = FitConfig(seed=seed, **OVERRIDES)  # type: ignore[arg-type]
    n = args.first + args.new + args.held
    t0 = time.perf_counter()
    if args.tenant:
        users = await tenant_users(llm, pop, cfg, args, f"s{seed}")
        results = list(users.values())
    else:
        results = await asyncio.gather(*(
            one_user(llm, u, pop.votes(u, n), cfg, args.first, args.new, f"s{seed}") for u in pop.user_ids
        ))  # fmt: skip
        users = dict(zip(pop.user_ids, results, strict=True))
    judged = sum(r["judged"] for r in results)
    row: dict[str, Any] = {"seed": seed, "default": sum(r["default"] for r in results) / judged}
    for arm in ARMS:
        served = served_by_fit(users, arm) if args.tenant else served_correct(users, arm, cfg)
        row[arm] = {
            "served": sum(served.values()) / judged,
            "below": sum(1 for u in users if served[u] < users[u]["default"]),
            "pd": sum(r["pd"][arm] for r in results) / judged,
            "requests": statistics.fmean(r["usage"][arm]["llm_requests"] for r in results),
            "prompt_tokens": statistics.fmean(r["usage"][arm]["prompt_tokens"] for r in results),
            "per_user": {u: [served[u], users[u]["default"], users[u]["judged"]] for u in users},
        }
    row["incremental_kept"] = sum(1 for r in results if "refit" in r["profiles"]["incremental"].meta)
    row["users"] = len(results)
    row["seconds"] = time.perf_counter() - t0
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2, 3, 4])
    ap.add_argument("--users", type=int, default=24)
    ap.add_argument("--first", type=int, default=12, help="votes of the first fit")
    ap.add_argument("--new", type=int, default=4, help="votes added before the refit")
    ap.add_argument("--held", type=int, default=9, help="held-out votes judged (both orders) per user")
    ap.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                    help='FitConfig override, repeatable (e.g. --config \'selection={"stop_early": false}\')')
    ap.add_argument("--tenant", action="store_true",
                    help="one store per arm, users fitted in turn: each fit applies the tenant prior itself")
    ap.add_argument("--json", help="write every row (per user: served correct, default correct, judged) here")
    ap.add_argument("--against", metavar="JSON",
                    help="another run's --json (same seeds and users): print the paired per-user served difference "
                         "(this run minus that one) per arm, with a 95%% CI over users")
    args = ap.parse_args()
    OVERRIDES.update(parse_overrides(args.config))
    rows = [asyncio.run(one_seed(s, args)) for s in args.seeds]
    print(f"{args.users} users per seed: first fit on {args.first} votes, refit after {args.new} more, "
          f"{args.held} held-out votes judged in both orders; served = "
          + ("what each fit chose under its tenant's prior" if args.tenant
             else "the guard's choice (leave-one-out prior)"))  # fmt: skip
    head = (f"{'seed':>4} {'default':>8} " + " ".join(f"{a + ' served':>18} {'below':>5} {'p+d':>6}" for a in ARMS)
            + f" {'kept':>5} {'req inc/full/first':>20} {'prompt tok inc/full/first':>28}")  # fmt: skip
    print(head)
    print("-" * len(head))

    def line(label: str, get: Any) -> None:
        cells = " ".join(f"{100 * get(a, 'served'):>18.1f} {get(a, 'below'):>5.1f} {100 * get(a, 'pd'):>6.1f}"
                         for a in ARMS)  # fmt: skip
        req = "/".join(f"{get(a, 'requests'):.1f}" for a in ("incremental", "full", "first"))
        tok = "/".join(f"{get(a, 'prompt_tokens'):,.0f}" for a in ("incremental", "full", "first"))
        print(f"{label:>4} {100 * get(None, 'default'):>8.1f} {cells} {get(None, 'kept'):>5.1f} {req:>20} {tok:>28}")

    for r in rows:
        line(str(r["seed"]), lambda a, k, r=r: r["default"] if a is None and k == "default" else (
            r["incremental_kept"] if a is None else r[a][k]))
    line("mean", lambda a, k: statistics.fmean(
        (r["default"] if k == "default" else r["incremental_kept"]) if a is None else r[a][k] for r in rows))
    print(f"\n'kept': refits that stayed incremental (the rest found the persona stale); "
          f"{sum(r['seconds'] for r in rows):.0f} s in all")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"args": vars(args), "rows": rows}, fh, indent=2)
    if args.against:
        with open(args.against, encoding="utf-8") as fh:
            other = {r["seed"]: r for r in json.load(fh)["rows"]}
        print(f"\nserved, this run minus {args.against}, per user (accuracy points): mean [95% CI over users]")
        for arm in ARMS:
            d = [(s - other[r["seed"]][arm]["per_user"][u][0]) / n
                 for r in rows for u, (s, _, n) in r[arm]["per_user"].items()]  # fmt: skip
            m, se = statistics.fmean(d), statistics.stdev(d) / len(d) ** 0.5
            print(f"  {arm:>11}: {100 * m:+.2f} [{100 * (m - 1.96 * se):+.2f}, {100 * (m + 1.96 * se):+.2f}] over "
                  f"{len(d)} users, {sum(x != 0 for x in d)} differ")


if __name__ == "__main__":
    main()
