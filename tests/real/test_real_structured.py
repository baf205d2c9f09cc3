"""Structured answers from a real model: the persona writer, the insight extractor and ``structured()``.

A 135M model follows formats loosely. Each call site must either read the answer or
fail in the documented way (a typed error naming the call site), never hang, leak a
pydantic error or return garbage silently.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field
from real_support import ana_votes, endpoint

from synth_agent import prompts
from synth_agent.engine import FitConfig, Synthesizer
from synth_agent.engine.synthesize import stable_coin
from synth_agent.evaluate import memory_persona
from synth_agent.judge_server import LocalJudgeServer
from synth_agent.llm.client import LLMClient, LLMError
from synth_agent.models import Trace


async def test_persona_writer_reads_a_real_persona(llm: LLMClient) -> None:
    train = list(ana_votes()[:3])
    traces = [
        Trace(
            vote_id=v.id, chosen_first=stable_coin(0, v.id, "bootstrap"), predicted="A", verified=True,
            model=llm.model,
            reasoning="The preferred answer is short and shows a small code example; the other one is long, "
            "vague and full of emoji.",
        )
        for v in train
    ]  # fmt: skip
    persona = await Synthesizer(llm, config=FitConfig(persona_max_tokens=160)).write_persona(
        train, traces, [v.id for v in train]
    )
    assert persona.strip() == persona and persona
    assert "<persona>" not in persona and "</persona>" not in persona  # tags stripped by parse_persona
    site = llm.stats.site("persona")
    assert site.requests == 1 and site.errors == 0 and 0 < site.completion_tokens <= 160


async def test_insight_extractor_returns_one_insight_per_vote(llm: LLMClient) -> None:
    votes = list(ana_votes()[3:5])
    profile = await memory_persona(llm, votes)
    header, _, body = profile.partition("\n")
    assert header == "Observations from this user's past choices:"
    assert body.startswith("- ") and body[2:].strip()  # real insights (they may span lines)
    site = llm.stats.site("memory_insight")
    assert site.requests == 2 and site.completion_tokens > 0 and site.errors == 0


class Verdict(BaseModel):
    preferred: Literal["A", "B"]
    reason: str = Field(min_length=1, max_length=200)


async def test_structured_answer_is_constrained_to_the_schema(llm: LLMClient) -> None:
    # The pydantic schema goes to llama-cpp-python as {"type": "json_object", "schema": ...}: the server
    # can only generate a Verdict (reason bounded to 200 characters, so it closes within 120 tokens).
    assert llm.config.structured_output == "json_object_schema"
    site = llm.stats.site("structured")
    for v in ana_votes()[6:8]:
        msgs = [
            {"role": "system", "content": "Say which response is better, and why, in one sentence."},
            {"role": "user", "content": prompts.render_pair(v.context, v.chosen, v.rejected)},
        ]
        verdict = await llm.structured(msgs, Verdict, call_site="structured", max_tokens=120)
        assert verdict.preferred in ("A", "B") and 1 <= len(verdict.reason) <= 200
    assert site.requests == 2 and site.retries == 0 and site.unparseable == 0 and site.errors == 0


async def test_structured_answer_parses_or_fails_over_predictably(real_server: LocalJudgeServer) -> None:
    # Without constrained decoding (any JSON): read, or the documented typed failure.
    llm = LLMClient(endpoint(real_server, structured_output="json_object"))
    v = ana_votes()[5]
    msgs = [
        {"role": "system", "content": 'Answer with a JSON object: {"preferred": "A" or "B", "reason": "<one sentence>"}'},
        {"role": "user", "content": prompts.render_pair(v.context, v.chosen, v.rejected) + "\n\nWhich is better?"},
    ]
    site = llm.stats.site("structured")
    try:
        verdict = await llm.structured(msgs, Verdict, call_site="structured", max_tokens=120)
    except LLMError as e:
        # The documented failure: every re-ask was garbage; the error names the schema and the call site.
        assert "Verdict" in str(e) and "'structured'" in str(e) and e.call_site == "structured"
        assert site.errors == 1 and site.retries == llm.config.structured_retries
        assert site.requests == llm.config.structured_retries + 1
    else:
        assert isinstance(verdict, Verdict) and verdict.preferred in ("A", "B")
        assert site.errors == 0 and site.requests == site.retries + 1
    finally:
        await llm.aclose()
    assert site.unparseable == site.requests - (site.errors == 0)  # every answer but a readable last one
