"""`make demo`: the product's main job end to end, offline by default.

Simulated population → votes JSONL → Chroma store → concurrent SynthesizeMe fits
(saved as persona versions) → evaluation of default vs personalized judges on
held-out votes → personas, accuracy table, LLM cost, plots.

Set OPENAI_BASE_URL / OPENAI_API_KEY / SYNTH_AGENT_MODEL to run the same job on a
real model (the votes are still simulated).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from synth_agent.cli import print_report
from synth_agent.config import Settings
from synth_agent.engine import FitConfig, Synthesizer
from synth_agent.evaluate import EvalReport, evaluate, split_for_eval, write_plots
from synth_agent.ingest import read_jsonl
from synth_agent.models import Vote
from synth_agent.services import open_llm, open_memory, simulator_if_needed
from synth_agent.sim.population import Population, write_population_jsonl
from synth_agent.sim.traits import PHRASES

console = Console()


def prepare(users: int, votes: int, seed: int, out: Path) -> tuple[Population, list[Vote]]:
    """Simulate the population and label each user's votes 50/20/30 (train / val / held-out test)."""
    out.mkdir(parents=True, exist_ok=True)
    raw = out / "population.jsonl"
    population = write_population_jsonl(raw, users, votes, seed)
    by_user: dict[str, list[Vote]] = {}
    for v in read_jsonl(raw).votes:
        by_user.setdefault(v.user_id, []).append(v)
    labelled: list[Vote] = []
    for vs in by_user.values():
        context, target = split_for_eval(vs)
        labelled += context + [v.model_copy(update={"split": "test"}) for v in target]
    data = out / "votes.jsonl"
    data.write_text("".join(v.model_dump_json() + "\n" for v in labelled))
    console.print(f"[bold]1.[/] simulated {users} users × {votes} votes → {data} (50/20/30 train/val/test)")
    return population, labelled


def hidden_taste(population: Population, user_id: str) -> str:
    """The simulator's ground truth for a user, in words (never shown to any model)."""
    user = population.user(user_id)
    if user.is_noise:
        return "no preference at all (every vote a coin flip)"
    w = user.weights
    top = sorted(w, key=lambda t: -abs(w[t]))[:3]
    return ", ".join(f"{'likes' if w[t] > 0 else 'dislikes'} {PHRASES[t]} ({w[t]:+.1f})" for t in top)


def per_user_summary(report: EvalReport, method: str = "persona_demos") -> str:
    """One line: for how many users ``method`` is below / level with / above the default judge."""
    below, equal, above = report.versus_default(method)
    return (
        f"per user, {method} vs the default judge: below for {below}, level for {equal}, above for {above} "
        f"of {below + equal + above} users (each on their own held-out votes; simulated LLM, not a real model)"
    )


async def run(settings: Settings, population: Population, labelled: list[Vote], seed: int, out: Path) -> None:
    t0 = time.perf_counter()
    by_user: dict[str, list[Vote]] = {}
    for v in labelled:
        by_user.setdefault(v.user_id, []).append(v)
    memory = open_memory(settings)
    res = await memory.add_votes(labelled)
    console.print(f"[bold]2.[/] stored {res.added} votes in Chroma at {settings.home} ({res.duplicates} duplicates)")

    llm = open_llm(settings, disk_cache=False)
    try:
        synth = Synthesizer(llm, memory, FitConfig(seed=seed))
        with Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
        ) as prog:
            task = prog.add_task("[bold]3.[/] fitting personas (all users concurrently)", total=len(by_user))

            async def fit_one(uid: str):
                r = await synth.fit(uid)
                prog.advance(task)
                return r

            fits = await asyncio.gather(*(fit_one(u) for u in by_user))
        fit_requests = llm.stats.total().requests
        fitted = [f for f in fits if f.profile is not None]
        console.print(f"    {len(fitted)}/{len(fits)} personas saved; {fit_requests} LLM requests for all fits")

        with Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
        ) as prog:
            task = prog.add_task("[bold]4.[/] evaluating judges on held-out votes", total=len(by_user))
            report = await evaluate(
                llm, labelled, config=FitConfig(seed=seed), curve_sizes=(5, 7, 10),
                on_user_done=lambda _u: prog.advance(task),
            )
        for f in fitted[:2]:
            assert f.profile is not None
            hidden = hidden_taste(population, f.user_id)
            console.rule(f"persona of {f.user_id} (v{f.profile.version}, {len(f.profile.demos)} demos)")
            console.print(f.profile.persona)
            if hidden:
                console.print(f"[dim]simulator ground truth (never shown to the model): {hidden}[/]")
        console.rule("results")
        print_report(report)
        console.print(per_user_summary(report))
        n_target = max((u.n_target for u in report.users), default=0)
        console.print(f"[dim]{len(report.users)} users × {n_target} held-out votes: the intervals are wide. "
                      "python bench/eval_seeds.py measures 5 seeds × 24 users × 25 votes (docs/results.md).[/]")
        total = llm.stats.total()
        cost = Table("", "requests", "retries", "cache hits", "prompt tokens", "completion tokens", title="LLM usage")
        cost.add_row("all", str(total.requests), str(total.retries), str(total.cache_hits),
                     str(total.prompt_tokens), str(total.completion_tokens))
        console.print(cost)
        (out / "report.json").write_text(report.to_json())
        plots = write_plots(report, out)
        console.print(f"report: {out / 'report.json'}   plots: {', '.join(map(str, plots))}")
        (out / "summary.json").write_text(json.dumps({
            m: round(s.accuracy, 4) for m, s in report.methods.items()}, indent=2))
    finally:
        await llm.aclose()
    console.print(f"done in {time.perf_counter() - t0:.1f}s")


# What one run with the default sizes cost, measured on the simulator (seed 0; `python -m synth_agent.demo`
# prints its own "LLM usage" table at the end): shown before a run against a real endpoint starts.
MEASURED_COST = {"users": 20, "votes": 15, "requests": 3961, "prompt_tokens": 12_100_000, "completion_tokens": 399_000}


def cost_notice(users: int, votes: int) -> str:
    """What a run of this size costs, in words (scaled from the measured default run by users × votes)."""
    m = MEASURED_COST
    scale = (users * votes) / (m["users"] * m["votes"])
    return (f"this demo makes about {m['requests'] * scale:,.0f} LLM requests with about "
            f"{m['prompt_tokens'] * scale / 1e6:.1f}M prompt and {m['completion_tokens'] * scale / 1e6:.2f}M completion "
            f"tokens ({users} users × {votes} votes; measured: {m['requests']:,} requests, "
            f"{m['prompt_tokens'] / 1e6:.1f}M prompt tokens at {m['users']} × {m['votes']} on the simulator)")


def main() -> None:
    ap = argparse.ArgumentParser(description="synth-agent end-to-end demo (offline simulator by default)")
    ap.add_argument("--users", type=int, default=20)
    ap.add_argument("--votes", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("out/demo"))
    ap.add_argument("--home", type=Path, default=Path(".synth-agent/demo"), help="store directory (wiped first)")
    ap.add_argument("--yes", action="store_true", help="run against a real endpoint without asking (it costs money)")
    ap.add_argument("--verbose", action="store_true", help="also show libraries' warnings and progress bars")
    args = ap.parse_args()
    from synth_agent.cli import quiet_third_party

    quiet_third_party(verbose=args.verbose)
    settings = Settings().model_copy(update={"home": args.home})
    with simulator_if_needed(settings, quiet=True) as live:
        if live.base_url != settings.base_url:
            console.print(
                "[bold yellow]Running against the offline simulator[/] (a simulated LLM; no real model). "
                "To use a real model: OPENAI_BASE_URL=... OPENAI_API_KEY=... SYNTH_AGENT_MODEL=... make demo — "
                f"against a paid endpoint {cost_notice(args.users, args.votes)}."
            )
        else:
            console.print(f"[bold]Using endpoint {live.base_url} (model {live.model})[/]: {cost_notice(args.users, args.votes)}.")
            if not args.yes:
                if not sys.stdin.isatty():
                    console.print("[bold red]error:[/] not starting without confirmation: pass --yes "
                                  "(make demo DEMO_ARGS=--yes) to run against this endpoint")
                    raise SystemExit(2)
                if input("Start? [y/N] ").strip().lower() not in ("y", "yes"):
                    raise SystemExit(1)
        if settings.chroma_host is None and args.home.exists():  # only once the run is certain
            shutil.rmtree(args.home)
        population, labelled = prepare(args.users, args.votes, args.seed, args.out)
        asyncio.run(run(live, population, labelled, args.seed, args.out))


if __name__ == "__main__":
    main()
