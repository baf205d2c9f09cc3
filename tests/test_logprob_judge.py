"""The log-probability judge end to end on the simulator: agreement, cost, fallback, reranking, prefix layout."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from synth_agent import prompts
from synth_agent.engine import FitConfig
from synth_agent.engine.judge import Judge, label_probability
from synth_agent.engine.rerank import rank
from synth_agent.evaluate import evaluate
from synth_agent.llm.base import Completion, TokenLogprob
from synth_agent.llm.client import EndpointConfig, LLMClient
from synth_agent.models import Demo, Judgment, Message, Vote
from synth_agent.sim.generator import generate_candidates
from synth_agent.sim.population import Population
from synth_agent.sim.server import SimEndpoint

PERSONA = "The user strongly prefers bullet lists and dislikes emoji. The user prefers short answers."


@pytest.fixture
async def llm() -> AsyncIterator[LLMClient]:
    async with SimEndpoint() as ep, LLMClient(EndpointConfig(base_url=ep.base_url)) as client:
        yield client


def demos_from(votes: Sequence[Vote]) -> tuple[Demo, ...]:
    return tuple(
        Demo(vote_id=v.id, context=v.context, chosen=v.chosen, rejected=v.rejected, chosen_first=i % 2 == 0,
             reasoning=None if i % 3 == 2 else "The user likes structure.")
        for i, v in enumerate(votes)
    )  # fmt: skip


async def test_logprob_judge_agrees_with_cot_for_one_token(llm: LLMClient) -> None:
    votes = Population(2, seed=5).all_votes(6)
    persona_kw = {"persona": PERSONA, "demos": demos_from(votes[:3])}
    for kw in ({}, persona_kw):
        cot, lp = Judge(llm, **kw), Judge(llm, mode="logprob", **kw)  # type: ignore[arg-type]
        for v in votes[3:]:
            a, b = await cot.compare(v.context, v.chosen, v.rejected), await lp.compare(v.context, v.chosen, v.rejected)
            assert a.preferred == b.preferred
            assert all(o.p_a is not None for o in b.orders) and all(o.p_a is None for o in a.orders)
            assert not b.reasoning and a.reasoning
            if b.preferred != "tie":  # calibrated: the probability agrees with the verdict
                assert (b.p_a > 0.5) == (b.preferred == "A") and 0 < b.confidence <= 1
    site = llm.stats.site("judge:logprob")
    assert site.requests > 0 and site.completion_tokens == site.requests  # one token per judgment
    assert llm.stats.site("judge").completion_tokens > 20 * llm.stats.site("judge").requests


async def test_falls_back_to_cot_when_the_endpoint_returns_no_logprobs() -> None:
    v, w = Population(1, seed=2).all_votes(2)
    async with (
        SimEndpoint(logprobs_supported=False) as ep,
        LLMClient(EndpointConfig(base_url=ep.base_url)) as client,
    ):
        j = await Judge(client, mode="logprob").compare(v.context, v.chosen, v.rejected)
        assert j.reasoning and all(o.p_a is None for o in j.orders)  # the CoT answer, parsed
        assert client.stats.site("judge:logprob").requests == 2 and client.stats.site("judge").requests == 2
        ep.configure(logprobs_supported=True)
        j2 = await Judge(client, mode="logprob").compare(w.context, w.chosen, w.rejected)
        assert all(o.p_a is not None for o in j2.orders)


def test_label_probability_reads_only_answer_labels() -> None:
    def comp(*alts: tuple[str, float]) -> Completion:
        return Completion("x", top_logprobs=[[TokenLogprob(t, lp) for t, lp in alts]])

    assert label_probability(Completion("A")) is None
    assert label_probability(comp(("Response", -0.1), ("The", -2.0))) is None
    p = label_probability(comp(("A", -0.2), (" B", -1.8), ("C", -3.0)))
    assert p is not None and 0.8 < p < 0.85


async def test_reranker_uses_logprob_confidence(llm: LLMClient) -> None:
    import numpy as np

    ctx = [Message(role="user", content="How do I sort a list in Python?")]
    candidates = generate_candidates(ctx[0].content, 8, np.random.default_rng(4))
    judge = Judge(llm, persona=PERSONA, mode="logprob")
    ko = await rank(judge, ctx, candidates, strategy="knockout")
    rr = await rank(judge, ctx, candidates, strategy="round_robin")
    assert len(ko.comparisons) == 7 and len(rr.comparisons) == 28
    assert all(0.0 <= jd.p_a <= 1.0 for _, _, jd in rr.comparisons)
    assert abs(sum(rr.scores) - 1.0) < 1e-6 and rr.scores[rr.winner] == max(rr.scores)


@dataclass(frozen=True)
class LeaningTieJudge(Judge):
    """Every comparison is a tie leaning ``lean`` towards A (a logprob judge whose two orders disagree)."""

    lean: float = 0.5

    async def compare(self, context: Sequence[Message], a: str, b: str, *, extra_demos: Sequence[Demo] = ()) -> Judgment:
        return Judgment(preferred="tie", confidence=0.0, p_a=self.lean)


async def test_ties_are_broken_by_the_judges_probability() -> None:
    ctx = [Message(role="user", content="q")]
    nobody: Any = None
    leans_b = await rank(LeaningTieJudge(nobody, lean=0.3), ctx, ["x", "y"], strategy="knockout")
    leans_a = await rank(LeaningTieJudge(nobody, lean=0.7), ctx, ["x", "y"], strategy="knockout")
    assert leans_b.winner == 1 and leans_a.winner == 0
    rr = await rank(LeaningTieJudge(nobody, lean=0.7), ctx, ["x", "y", "z"], strategy="round_robin")
    assert rr.winner == 0 and rr.scores[0] > rr.scores[1] > rr.scores[2]


async def test_logprob_judge_accuracy_close_to_cot_with_far_fewer_tokens(llm: LLMClient) -> None:
    votes = Population(5, seed=1).all_votes(14)
    report = await evaluate(
        llm, votes, methods=["default", "default_logprob", "persona_demos", "persona_demos_logprob"],
        config=FitConfig(n_trials=2, n_demo_candidates=2),
    )  # fmt: skip
    acc = {m: s.accuracy for m, s in report.methods.items()}
    assert acc["default_logprob"] >= acc["default"] - 0.05
    assert acc["persona_demos_logprob"] >= acc["persona_demos"] - 0.05
    for site in ("eval_default", "eval_persona_demos"):
        cot, lp = report.usage[site], report.usage[site + ":logprob"]
        assert lp["requests"] == cot["requests"] > 0
        assert lp["completion_tokens"] * 5 <= cot["completion_tokens"]


def test_judge_prompt_prefix_is_byte_identical_across_pairs_and_orders() -> None:
    """Everything before the final user turn (instruction, persona, demos) is the same for every pair and order."""
    votes = Population(1, seed=9).all_votes(8)
    demos = demos_from(votes[:4])
    for build in (prompts.judge_messages, prompts.label_judge_messages):
        rendered: set[str] = set()
        lasts = []
        for v in votes[4:]:
            for first, second in ((v.chosen, v.rejected), (v.rejected, v.chosen)):
                msgs = build(v.context, first, second, persona=PERSONA, demos=demos)
                rendered.add(json.dumps(msgs[:-1], ensure_ascii=False))
                assert msgs[-1]["role"] == "user" and msgs[-1]["content"].startswith("<conversation>")
                lasts.append(msgs[-1]["content"])
        assert len(rendered) == 1  # one shared prefix per user
        assert len(set(lasts)) == len(lasts)  # only the final turn varies
        prefix = rendered.pop().encode("utf-8")
        assert PERSONA.encode("utf-8") in prefix and len(prefix) > 2000
