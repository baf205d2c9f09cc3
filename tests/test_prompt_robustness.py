"""Prompts that survive a weak model (issue 13, items 3-4), without a model: scripted backends.

* an unreadable judgment is a tie with confidence 0, counted per call site, never an exception;
* judge prompts lose demos (from the end) until they fit the context window; a prompt that cannot
  fit even without demos fails with an error naming the window; the persona writer drops examples;
* a fit whose demo step fails keeps the persona it wrote, saved without demos and marked as such;
* constrained decoding: the judgment's JSON schema reaches the server in its dialect.

The same behaviours against the real model are in ``tests/real``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from langgraph.store.memory import InMemoryStore
from test_llm_client import Capture, completion_body

from store.memory import PreferenceMemory
from synth_agent.engine import FitConfig, Judge, Synthesizer
from synth_agent.engine.judge import JUDGMENT_SCHEMA
from synth_agent.llm.base import ChatMessage, Completion, LLMStats
from synth_agent.llm.budget import PromptTooLongError, estimate_tokens
from synth_agent.llm.client import EndpointConfig, LLMClient, response_format
from synth_agent.llm.errors import ContextOverflowError, UnavailableError
from synth_agent.models import Demo, as_messages
from synth_agent.sim.backend import SimBackend
from synth_agent.sim.population import Population

Q = as_messages("q?")


class Scripted:
    """A ChatBackend that answers ``reply(call_site, messages)`` and records every request."""

    def __init__(self, reply: Any, *, context_length: int | None = None) -> None:
        self.reply = reply
        self.model = "scripted"
        self.stats = LLMStats()
        self.context_length = context_length
        self.sent: list[tuple[str, list[ChatMessage], dict[str, Any]]] = []

    async def complete(self, messages: Sequence[ChatMessage], **kw: Any) -> Completion:
        site = kw.get("call_site", "default")
        self.sent.append((site, list(messages), kw))
        self.stats.site(site).requests += 1
        return Completion(text=self.reply(site, messages), model=self.model)

    async def structured(self, messages: Sequence[ChatMessage], schema: Any, **kw: Any) -> Any:
        raise NotImplementedError

    async def aclose(self) -> None:
        return None


def demo(i: int, size: int) -> Demo:
    return Demo(vote_id=f"d{i}", context=[{"role": "user", "content": f"question {i}"}], chosen="x" * size,
                rejected="y" * size, chosen_first=True, reasoning=None)  # fmt: skip


async def test_unreadable_judgment_is_a_tie_with_zero_confidence_and_is_counted() -> None:
    llm = Scripted(lambda site, m: "I cannot decide, both have merits.")
    judgment = await Judge(llm).compare("q?", "one", "two")  # type: ignore[arg-type]
    assert judgment.preferred == "tie" and judgment.confidence == 0.0 and judgment.p_a == 0.5
    assert [o.preferred for o in judgment.orders] == ["tie", "tie"]
    assert llm.stats.site("judge").unparseable == 6  # 3 attempts in each order, each one counted
    assert all(kw["schema"] == JUDGMENT_SCHEMA and kw["json_mode"] for _, _, kw in llm.sent)


async def test_one_unreadable_order_makes_a_tie_not_a_win_for_a_position() -> None:
    # Readable only when "one" is shown first: that order says A; the other order is unreadable.
    llm = Scripted(lambda site, m: '{"reasoning": "r", "preferred": "A"}' if "<response_a>\none" in m[-1]["content"]
                   else "no idea")  # fmt: skip
    judgment = await Judge(llm).compare("q?", "one", "two")  # type: ignore[arg-type]
    assert judgment.preferred == "tie" and judgment.confidence == 0.0
    assert judgment.p_a == pytest.approx(0.75)  # A won one order, the other is 0.5: a lean, not a verdict


async def test_judge_drops_demos_from_the_end_until_the_prompt_fits() -> None:
    demos = tuple(demo(i, 900) for i in range(4))  # ~600 tokens each by the estimate
    llm = Scripted(lambda site, m: '{"reasoning": "r", "preferred": "B"}', context_length=2000)
    label, _, _ = await Judge(llm, demos=demos).judge_order(Q, "one", "two")  # type: ignore[arg-type]
    assert label == "B"
    _, sent, kw = llm.sent[0]
    assert estimate_tokens(sent) + kw["max_tokens"] <= 2000
    shown = [m["content"] for m in sent if m["role"] == "user"][:-1]
    assert 0 < len(shown) < 4 and "question 0" in shown[0]  # the first demos are kept (stable prefix)
    assert llm.stats.site("judge").trimmed == 1

    roomy = Scripted(lambda site, m: '{"reasoning": "r", "preferred": "B"}', context_length=None)
    await Judge(roomy, demos=demos).judge_order(Q, "one", "two")  # type: ignore[arg-type]
    assert len(roomy.sent[0][1]) == 2 + 2 * 4 and roomy.stats.site("judge").trimmed == 0  # no window: all demos


async def test_a_server_that_counts_more_tokens_than_the_estimate_gets_fewer_demos() -> None:
    # Text the character estimate under-counts (e.g. CJK): the server refuses; the judge halves the demos.
    class Strict(Scripted):
        async def complete(self, messages: Sequence[ChatMessage], **kw: Any) -> Completion:
            if len(messages) > 2 + 2 * 1:
                self.sent.append(("refused", list(messages), kw))
                raise ContextOverflowError("HTTP 400: maximum context length is 4096 tokens", context_length=4096)
            return await super().complete(messages, **kw)

    llm = Strict(lambda site, m: '{"reasoning": "r", "preferred": "A"}', context_length=100_000)
    label, _, _ = await Judge(llm, demos=tuple(demo(i, 10) for i in range(4))).judge_order(Q, "one", "two")  # type: ignore[arg-type]
    assert label == "A" and [len(m) for _, m, _ in llm.sent] == [10, 6, 4]  # 4 demos, then 2, then 1
    assert llm.stats.site("judge").trimmed == 2


async def test_a_pair_too_long_even_without_demos_names_the_window() -> None:
    llm = Scripted(lambda site, m: "A", context_length=1000)
    with pytest.raises(PromptTooLongError, match="context window of 1000 tokens") as err:
        await Judge(llm, demos=(demo(0, 10),)).judge_order(Q, "x" * 5000, "y" * 10)  # type: ignore[arg-type]
    assert err.value.context_length == 1000 and err.value.call_site == "judge"
    assert llm.sent == []  # nothing the server would have to refuse was sent


async def test_persona_writer_drops_examples_to_fit() -> None:
    pop = Population(1, seed=3)
    uid = pop.user_ids[0]
    votes = pop.votes(uid, 8)
    llm = Scripted(lambda site, m: "<persona>Likes short answers.</persona>", context_length=1500)
    from synth_agent.models import Trace

    traces = [Trace(vote_id=v.id, chosen_first=True, reasoning="r " * 50, predicted="A", verified=True, model="scripted")
              for v in votes]  # fmt: skip
    persona = await Synthesizer(llm).write_persona(votes, traces, [v.id for v in votes])  # type: ignore[arg-type]
    assert persona == "Likes short answers."
    _, sent, kw = llm.sent[0]
    assert estimate_tokens(sent) + kw["max_tokens"] <= 1500
    assert sent[1]["content"].count("<example>") < len(votes) and llm.stats.site("persona").trimmed == 1


class FailingDemoStep(SimBackend):
    """The simulator, except that every demo-selection judgment fails for good (e.g. a server gone)."""

    async def complete(self, messages: Sequence[ChatMessage], **kw: Any) -> Completion:
        if kw.get("call_site", "").startswith("demo_select"):
            raise UnavailableError("HTTP 503: the judge server went away", call_site="demo_select")
        return await super().complete(messages, **kw)


async def test_fit_keeps_the_persona_when_the_demo_step_fails() -> None:
    pop = Population(2, seed=5)
    uid = pop.user_ids[0]
    mem = PreferenceMemory(InMemoryStore(), tenant="t1")
    await mem.add_votes(pop.votes(uid, 10))
    # race_demos="always" (the default), named: this user is served the default, so with "served" step 3 never runs
    result = await Synthesizer(FailingDemoStep(5), mem, FitConfig(seed=1, race_demos="always")).fit(uid)
    assert result.status == "fitted" and result.profile is not None
    assert result.demo_error is not None and "503" in result.demo_error
    assert "WITHOUT demos" in result.message
    saved = await mem.current_persona(uid)
    assert saved is not None and saved.version == 1 and saved.persona == result.profile.persona
    assert saved.demos == [] and saved.val_accuracy is None
    assert saved.meta["demos_status"] == "failed" and "503" in saved.meta["demo_error"]
    # Not "unchanged": the next fit (server back) runs the demo step again and saves v2 with demos.
    again = await Synthesizer(SimBackend(5), mem, FitConfig(seed=1, race_demos="always")).fit(uid)
    assert again.status == "fitted" and again.demo_error is None
    v2 = await mem.current_persona(uid)
    assert v2 is not None and v2.version == 2 and v2.meta["demos_status"] == "selected"


def test_response_format_dialects() -> None:
    schema = {"type": "object"}
    assert response_format("json_object", schema) == {"response_format": {"type": "json_object"}}
    assert response_format("json_object_schema", schema) == {
        "response_format": {"type": "json_object", "schema": schema}
    }
    assert response_format("json_schema", schema, "Verdict")["response_format"]["json_schema"] == {
        "name": "Verdict", "schema": schema, "strict": False,
    }  # fmt: skip


@pytest.fixture(scope="module")
def capture() -> Iterator[tuple[Capture, str]]:
    from synth_agent.serving import ThreadedServer

    cap = Capture()
    cap.reply = (200, completion_body('{"reasoning": "r", "preferred": "A"}'))
    with ThreadedServer(cap.app, lifespan="off", name="capture") as srv:
        yield cap, f"{srv.url}/v1"


@pytest.mark.parametrize("dialect", ["json_object", "json_schema", "json_object_schema"])
async def test_judge_sends_its_schema_in_the_endpoints_dialect(capture, dialect: str) -> None:
    cap, url = capture
    bodies = cap.bodies
    cfg = EndpointConfig(base_url=url, model="m", structured_output=dialect, probe_server=False)  # type: ignore[arg-type]
    async with LLMClient(cfg, cache=False) as llm:
        bodies.clear()
        label, _, _ = await Judge(llm).judge_order(Q, "one", "two")
    assert label == "A"
    assert bodies[-1]["response_format"] == response_format(dialect, JUDGMENT_SCHEMA)["response_format"]  # type: ignore[arg-type]
