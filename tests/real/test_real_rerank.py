"""Best-of-n reranking with a real model as the judge (both strategies, default and personalized judge)."""

from __future__ import annotations

import pytest
from real_support import PERSONA, ana_votes

from synth_agent.engine import Judge
from synth_agent.engine.rerank import rank
from synth_agent.engine.synthesize import demo_from_vote
from synth_agent.llm.client import LLMClient

QUESTION = "How do I sort a dictionary by value in Python?"
CANDIDATES = [
    "```python\nsorted(d.items(), key=lambda kv: kv[1])\n```",
    "Sorting is a big topic with a long history! 😊 There are many ways to think about it, and the best "
    "one depends on what you need, so it may help to read about the options first.",
    "Use `sorted` with a key: `dict(sorted(d.items(), key=lambda kv: kv[1]))` gives a new dict ordered by value.",
]


async def test_round_robin_rerank_with_the_logprob_judge(llm: LLMClient) -> None:
    result = await rank(Judge(llm, mode="logprob"), QUESTION, CANDIDATES, strategy="round_robin")
    assert len(result.comparisons) == 3  # every pair once
    assert sorted(result.order) == [0, 1, 2] and result.winner == result.order[0]
    assert sum(result.scores) == pytest.approx(1.0)
    orders = [o for _, _, judgment in result.comparisons for o in judgment.orders]
    read = sum(o.p_a is not None for o in orders)  # calibrated P(A) from real log-probabilities
    assert len(orders) == 6 and read >= 1
    # an order whose top 5 held neither A nor B fell back to chain of thought, and only those did
    site, fallback = llm.stats.site("judge:logprob"), llm.stats.site("judge")
    assert site.requests + site.cache_hits == 6 and site.errors == 0
    assert (fallback.requests > 0) == (read < 6) and fallback.errors == 0


async def test_knockout_rerank_with_a_personalized_cot_judge(llm: LLMClient) -> None:
    demos = [demo_from_vote(v, True, None) for v in ana_votes()[:1]]  # one label-only demo
    judge = Judge(llm, persona=PERSONA, demos=demos, mode="cot", call_site="rerank")
    result = await rank(judge, QUESTION, CANDIDATES, strategy="knockout")
    assert len(result.comparisons) == 2  # n - 1 matches
    assert result.winner in (0, 1, 2) and sum(result.scores) == pytest.approx(1.0)
    site = llm.stats.site("rerank")
    assert site.requests >= 4 and site.errors == 0  # two matches, both orders each
