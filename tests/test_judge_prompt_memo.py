"""A judge renders its system turn and each demo once per family of judges, and sends the same prompts as before.

The prompts a :class:`Judge` sends must equal :func:`prompts.judge_messages` /
:func:`prompts.label_judge_messages` (what the simulator, the ledger and the golden profiles were built on),
with its own demos, extra demos, demos trimmed to fit the window, and judges made by ``with_demos``.
"""

from __future__ import annotations

from typing import Any

import pytest

from synth_agent import prompts
from synth_agent.engine.judge import Judge
from synth_agent.llm.base import Completion, LLMStats, TokenLogprob
from synth_agent.llm.budget import estimate_tokens
from synth_agent.models import Demo, Vote
from synth_agent.sim.population import Population

PERSONA = "The user prefers bullet lists."


class Recorder:
    """A backend that records every prompt and answers "A" (JSON, or as a top log-probability)."""

    model = "rec"

    def __init__(self, context_length: int | None = None) -> None:
        self.sent: list[tuple[str, list[dict[str, str]]]] = []
        self.stats = LLMStats()
        self.context_length = context_length

    async def complete(self, messages: Any, *, call_site: str = "default", logprobs: int | None = None,
                       **kw: Any) -> Completion:  # fmt: skip
        self.sent.append((call_site, [dict(m) for m in messages]))
        if logprobs:
            return Completion("A", top_logprobs=[[TokenLogprob("A", -0.1), TokenLogprob("B", -2.5)]])
        return Completion('{"reasoning": "r", "preferred": "A"}')


def demos_from(votes: list[Vote]) -> tuple[Demo, ...]:
    return tuple(
        Demo(vote_id=v.id, context=v.context, chosen=v.chosen, rejected=v.rejected, chosen_first=i % 2 == 0,
             reasoning=None if i % 3 == 2 else f"Reason {i}.")
        for i, v in enumerate(votes)
    )  # fmt: skip


@pytest.mark.parametrize("mode", ["cot", "logprob"])
@pytest.mark.parametrize("persona", [None, PERSONA])
async def test_judge_sends_what_the_prompt_builders_make(mode: str, persona: str | None) -> None:
    votes = Population(1, seed=4).all_votes(9)
    demos, extra, pairs = demos_from(votes[:4]), demos_from(votes[4:6]), votes[6:]
    build = prompts.label_judge_messages if mode == "logprob" else prompts.judge_messages
    llm = Recorder()
    base = Judge(llm, persona=persona, demos=demos, mode=mode)  # type: ignore[arg-type]
    expected = []
    for judge, shown, more in ((base, demos, ()), (base, demos, extra), (base.with_demos(demos[1:3]), demos[1:3], ()),
                               (base.with_demos(()), (), extra[:1])):  # fmt: skip
        for v in pairs:
            for first, second in ((v.chosen, v.rejected), (v.rejected, v.chosen)):
                await judge.judge_order(v.context, first, second, extra_demos=more)
                expected.append(build(v.context, first, second, persona=persona, demos=[*shown, *more]))
    assert [m for _, m in llm.sent] == expected


async def test_trimmed_prompts_equal_the_builders_with_fewer_demos() -> None:
    votes = Population(1, seed=6).all_votes(6)
    demos, v = demos_from(votes[:5]), votes[5]
    full = prompts.judge_messages(v.context, v.chosen, v.rejected, persona=PERSONA, demos=demos)
    shorter = prompts.judge_messages(v.context, v.chosen, v.rejected, persona=PERSONA, demos=demos[:2])
    window = (estimate_tokens(shorter) + estimate_tokens(full)) // 2 + 400  # room for 2 demos, not 5
    llm = Recorder(context_length=window)
    judge = Judge(llm, persona=PERSONA, demos=demos)
    await judge.judge_order(v.context, v.chosen, v.rejected)
    ((_, sent),) = llm.sent
    assert 3 <= len(sent) < len(full) and sent == full[: len(sent) - 1] + [full[-1]]
    assert llm.stats.site("judge").trimmed == 1


async def test_each_demo_is_rendered_once_per_family_of_judges(monkeypatch: pytest.MonkeyPatch) -> None:
    """Candidate demo sets of one fit share their demos: each is rendered once, not once per judgment."""
    calls: list[str] = []
    real = prompts.demo_turns

    def counting(demo: Demo, *, label_only: bool = False) -> Any:
        calls.append(demo.vote_id)
        return real(demo, label_only=label_only)

    monkeypatch.setattr(prompts, "demo_turns", counting)
    votes = Population(1, seed=8).all_votes(10)
    demos, val = demos_from(votes[:4]), votes[4:]
    base = Judge(Recorder(), persona=PERSONA)
    candidates = [base.with_demos(demos[:2]), base.with_demos(demos[1:4]), base.with_demos(demos)]
    for judge in candidates:
        for v in val:
            await judge.judge_order(v.context, v.chosen, v.rejected)
            await judge.judge_order(v.context, v.rejected, v.chosen)
    assert sorted(calls) == sorted(d.vote_id for d in demos)  # 4 renders for 3 judges x 12 judgments


async def test_the_rendered_demos_of_a_long_lived_judge_stay_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Extra demos passed per call are rendered and kept up to a bound, never without limit."""
    import synth_agent.engine.judge as judge_module

    monkeypatch.setattr(judge_module, "RENDERED_DEMOS_MAX", 3)
    votes = Population(1, seed=3).all_votes(8)
    llm = Recorder()
    judge = Judge(llm, persona=PERSONA)
    v = votes[-1]
    for d in demos_from(votes[:7]):
        await judge.judge_order(v.context, v.chosen, v.rejected, extra_demos=[d])
        assert llm.sent[-1][1] == prompts.judge_messages(v.context, v.chosen, v.rejected, persona=PERSONA, demos=[d])
    assert len(judge._turns().demos) <= 3
