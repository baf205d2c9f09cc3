"""`make demo-real`: the demo at tiny scale against a real small model (SmolLM2-135M on llama.cpp, CPU).

The same job as ``make demo`` — simulated users' votes → store → SynthesizeMe fits →
evaluation on held-out votes — with a *real* model writing the personas and judging,
at a scale a CPU finishes: 3 users × 7 votes (5 to fit, 2 held out), the smallest search
budgets, log-probability judges for the evaluation, one request in flight (llama-cpp-python
serves one at a time). Simulated answers are long (500–1,000 tokens a pair) and reading
prompts is what a CPU spends its time on: see docs/judges.md for the measured speed.

Be clear about what it shows: the prompts, parsers, log-probability reading and the
whole pipeline running on a real model's outputs. It does not show personalization
lift: a 135M-parameter model is far too weak a judge for that, and 3 users × 3 held-out
votes are far too few to measure it. Use ``synth-agent eval`` with a capable model on
your own votes for that (``docs/judges.md``).

    python -m synth_agent.demo_real [--users 3] [--votes 7] [--model smollm2|FILE.gguf] [--threads N]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from synth_agent.config import Settings
from synth_agent.engine import FitConfig, Synthesizer
from synth_agent.engine.selection import SelectionConfig
from synth_agent.engine.synthesize import FitResult
from synth_agent.evaluate import EvalReport
from synth_agent.judge_server import JudgeServerError, LocalJudgeServer, ServerSpec, resolve_gguf
from synth_agent.llm.client import LLMClient, LLMError
from synth_agent.models import Vote
from synth_agent.prompts import ParseError

console = Console()

TINY = FitConfig(n_trials=1, n_demo_candidates=1, max_bootstrapped_demos=1, max_labeled_demos=1, candidate_wave=2,
                 score_mode="logprob", selection=SelectionConfig(enabled=False))  # fmt: skip
"""The smallest budgets, validation scored with the one-token log-probability judge: on a shared 2-core
machine a user's fit with chain-of-thought scoring took ~12 minutes (simulated answers are long). No
cross-validated selection (it writes one persona per fold): the demo evaluates persona + demos itself."""
METHODS = ("default_logprob", "persona_demos_logprob")
"""Log-probability judges: one generated token per judgment (on CPU, reading the prompt is the cost)."""
CAPTION = (
    "Honest caption: SmolLM2-135M is a 135M-parameter model, far too weak a judge to show personalization "
    "lift, and {n} held-out judgments are far too few to measure one (see the 95% intervals). This run shows "
    "the pipeline, prompts, parsers and log-probability reading working on a real model's answers, not "
    "accuracy. `make demo` shows the method on the simulator; `synth-agent eval` with a capable model "
    "on your own votes measures real lift."
)


async def run(server: LocalJudgeServer, labelled: list[Vote], home: Path, seed: int) -> EvalReport | None:
    from synth_agent.cli import print_report
    from synth_agent.evaluate import evaluate
    from synth_agent.services import open_memory

    settings = Settings().model_copy(update={"home": home})
    memory = open_memory(settings)
    added = await memory.add_votes(labelled)
    by_user: dict[str, list[Vote]] = {}
    for v in labelled:
        by_user.setdefault(v.user_id, []).append(v)
    console.print(f"[bold]2.[/] stored {added.added} votes in Chroma at {home}")
    cfg = server.endpoint(timeout=600.0, max_retries=1)
    config = replace(TINY, seed=seed)
    report: EvalReport | None = None
    async with LLMClient(cfg) as llm:
        t0 = time.perf_counter()
        fits: list[FitResult] = []
        failed: dict[str, str] = {}
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console) as prog:  # fmt: skip
            task = prog.add_task("[bold]3.[/] fitting personas on the real model (one request at a time)",
                                 total=len(by_user))  # fmt: skip
            for uid in by_user:
                try:
                    fits.append(await Synthesizer(llm, memory, config).fit(uid))
                except (ParseError, LLMError) as e:
                    # Unreadable judgments are ties and long prompts are trimmed, so only an empty
                    # persona, a vote too long for the window or a failing server ends a user's fit.
                    # Nothing is saved for that user; the others go on.
                    failed[uid] = str(e).splitlines()[0][:200]
                prog.advance(task)
        saved = [f for f in fits if f.profile is not None]
        console.print(f"    {len(saved)}/{len(by_user)} personas saved in {time.perf_counter() - t0:.0f}s, "
                      f"{llm.stats.total().requests} requests")  # fmt: skip
        for uid, why in failed.items():
            console.print(f"    [yellow]fit failed for {uid}:[/] {why}", highlight=False)
        for f in fits:
            if f.demo_error:
                console.print(f"    [yellow]{f.user_id}: {f.message}[/]", highlight=False)
        unreadable = {site: s.unparseable for site, s in llm.stats.by_site.items() if s.unparseable}
        console.print(f"    unreadable answers per call site (each a tie): {unreadable or 'none'}")
        if saved:
            first = saved[0]
            assert first.profile is not None
            console.rule(f"persona of {first.user_id}, written by {server.model} (verbatim)")
            console.print(first.profile.persona, markup=False, highlight=False)
            fitted_votes = [v for v in labelled if v.user_id in {f.user_id for f in saved}]
            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TimeElapsedColumn(), console=console) as prog:  # fmt: skip
                task = prog.add_task("[bold]4.[/] evaluating judges on held-out votes", total=len(saved))
                # The evaluation refits each user with the same prompts: the client's temperature-0
                # cache answers those calls, so only the held-out judgments cost model time.
                try:
                    report = await evaluate(
                        llm, fitted_votes, methods=METHODS, config=config, concurrency=1,
                        on_user_done=lambda _u: prog.advance(task),
                    )  # fmt: skip
                except (ParseError, LLMError) as e:
                    console.print(f"[yellow]evaluation stopped:[/] {str(e).splitlines()[0][:200]}")
        if report is not None:
            console.rule(f"results ({len(saved)} user(s) with a persona)")
            print_report(report)
            judgments = max((s.n_judgments for s in report.methods.values()), default=0)
            console.print(CAPTION.format(n=judgments), style="yellow")
        total = llm.stats.total()
        console.print(f"{total.requests} LLM requests, {total.prompt_tokens} prompt / "
                      f"{total.completion_tokens} completion tokens")  # fmt: skip
    return report


def save(report: EvalReport, out: Path) -> None:
    from synth_agent.evaluate import write_plots

    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(report.to_json())
    plots = write_plots(report, out)
    console.print(f"report: {out / 'report.json'}   plots: {', '.join(map(str, plots))}")


def main() -> None:
    from synth_agent.demo import prepare

    ap = argparse.ArgumentParser(description="synth-agent demo on a real small model (llama.cpp on CPU)")
    ap.add_argument("--users", type=int, default=3)
    ap.add_argument("--votes", type=int, default=7, help="per user: 5 context + 2 held out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="smollm2", help="'smollm2' (from PyPI) or a local GGUF file")
    ap.add_argument("--ctx", type=int, default=4096, help="context window (tokens)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: every core)")
    ap.add_argument("--out", type=Path, default=Path("out/demo-real"))
    args = ap.parse_args()
    try:
        gguf, name = resolve_gguf(args.model)
    except JudgeServerError as e:
        raise SystemExit(f"error: {e}") from None
    t0 = time.perf_counter()
    spec = ServerSpec("llamacpp", str(gguf), port=0, served_model_name=name, max_model_len=args.ctx,
                      threads=args.threads)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="synth-agent-demo-real-") as tmp:
        home = Path(tmp) / "home"
        try:
            server = LocalJudgeServer(spec, log_file=Path(tmp) / "llamacpp.log").start()
        except JudgeServerError as e:
            raise SystemExit(f"error: {e}") from None
        try:
            console.print(f"llama.cpp serving {name} ({gguf.name}) at {server.base_url}, "
                          f"loaded in {server.load_seconds:.1f}s; context {spec.context_length} tokens")  # fmt: skip
            _, labelled = prepare(args.users, args.votes, args.seed, args.out)
            report = asyncio.run(run(server, labelled, home, args.seed))
        finally:
            server.stop()
            shutil.rmtree(home, ignore_errors=True)
    if report is not None:
        save(report, args.out)
    console.print(f"done in {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
