"""Judgments by a real model: chain of thought parsed from real JSON, log-probabilities read from real top-k."""

from __future__ import annotations

import json
import math

import pytest
from real_support import Wiretap, ana_votes

from synth_agent import prompts
from synth_agent.engine import Judge
from synth_agent.engine.judge import REASONING_CHARS, label_probability
from synth_agent.llm.client import LLMClient


async def test_cot_judgment_parses_a_real_answer_in_both_orders(llm: LLMClient) -> None:
    v = ana_votes()[0]
    judgment = await Judge(llm, mode="cot").compare(v.context, v.chosen, v.rejected)
    assert judgment.preferred in ("A", "B", "tie")
    assert [o.swapped for o in judgment.orders] == [False, True]
    assert all(o.preferred in ("A", "B") and o.p_a is None for o in judgment.orders)  # CoT: no probabilities
    if judgment.preferred == "tie":
        assert judgment.confidence == 0.0
    site = llm.stats.site("judge")
    # Two real generations (one per order); counted tokens come from the server's usage.
    assert site.requests >= 2 and site.errors == 0
    assert site.prompt_tokens > 200 and site.completion_tokens > 0


async def test_logprob_judgment_reads_real_top_logprobs(llm: LLMClient) -> None:
    v = ana_votes()[1]
    msgs = prompts.label_judge_messages(v.context, v.chosen, v.rejected)
    comp = await llm.complete(msgs, call_site="probe", max_tokens=1, logprobs=5)
    assert comp.top_logprobs  # one list of alternatives per generated token
    alternatives = comp.top_logprobs[0]  # the judge reads the first token only
    assert len(alternatives) == 5 and len({a.token for a in alternatives}) == 5
    assert all(a.logprob <= 0.0 for a in alternatives)
    assert sum(math.exp(a.logprob) for a in alternatives) <= 1.0 + 1e-6
    p_first = label_probability(comp)
    assert p_first is not None, f"neither A nor B among the top 5 first tokens: {alternatives}"

    judgment = await Judge(llm, mode="logprob").compare(v.context, v.chosen, v.rejected)
    # Both orders were read from log-probabilities, or the order fell back to chain of thought
    # (A and B both missing from the top 5: a real answer that starts with "The ...").
    fallbacks = sum(o.p_a is None for o in judgment.orders)
    assert all(o.p_a is None or 0.0 <= o.p_a <= 1.0 for o in judgment.orders)
    assert llm.stats.site("judge").requests >= fallbacks and llm.stats.site("judge").errors == 0
    per_order = [o.p_a if o.p_a is not None else float(o.preferred == "A") for o in judgment.orders]
    assert judgment.p_a == pytest.approx(sum(per_order) / 2)  # averaged over both orders
    # the (A, B) order is the probe's prompt: served by the temperature-0 cache, same P(A)
    site = llm.stats.site("judge:logprob")
    assert site.requests == 1 and site.cache_hits == 1
    assert judgment.orders[0].p_a == pytest.approx(p_first)


async def test_max_tokens_reaches_the_server(llm: LLMClient) -> None:
    v = ana_votes()[1]
    comp = await llm.complete(prompts.label_judge_messages(v.context, v.chosen, v.rejected), max_tokens=1, logprobs=5)
    assert comp.completion_tokens == 1 and comp.top_logprobs is not None and len(comp.top_logprobs) == 1


async def test_unparseable_judgment_is_a_tie_not_an_exception(llm: LLMClient) -> None:
    # One token of JSON ('{') can never name a preference: every attempt is unparseable, deterministically.
    v = ana_votes()[2]
    tap = Wiretap(llm, truncate={"judge": 1})
    judgment = await Judge(tap, mode="cot").compare(v.context, v.chosen, v.rejected)  # type: ignore[arg-type]
    assert judgment.preferred == "tie" and judgment.confidence == 0.0 and judgment.p_a == 0.5
    assert [o.preferred for o in judgment.orders] == ["tie", "tie"]
    assert len(tap.texts("judge")) == 6 and all(len(t) <= 4 for t in tap.texts("judge"))  # 3 tries per order
    assert llm.stats.site("judge").unparseable == 6 and llm.stats.site("judge").errors == 0


async def test_constrained_decoding_gives_a_readable_judgment_first_time(llm: LLMClient) -> None:
    # With the judgment's JSON schema sent in llama-cpp-python's form, the server can only generate
    # {"reasoning": <at most 600 characters>, "preferred": "A"|"B"}: every first answer parses.
    tap = Wiretap(llm)
    for v in ana_votes()[3:5]:
        await Judge(tap, mode="cot").compare(v.context, v.chosen, v.rejected)  # type: ignore[arg-type]
    answers = tap.texts("judge")
    assert len(answers) == 4 and llm.stats.site("judge").unparseable == 0
    for text in answers:
        answer = json.loads(text)
        assert answer["preferred"] in ("A", "B") and len(answer["reasoning"]) <= REASONING_CHARS
