"""SynthesizeMe end to end on a real model: a small fit that saves a persona the real model wrote.

Budgets are small on purpose (one slot, one CPU thread): 6 votes, 1 trial, 1 demo candidate,
at most 1 trace + 1 label per demo set, validation scored with the one-token log-probability
judge, one request in flight.
"""

from __future__ import annotations

import dataclasses

import httpx
import pytest
from langgraph.store.memory import InMemoryStore
from real_support import USER, Wiretap, ana_votes, endpoint, long_votes

from store.memory import PreferenceMemory
from synth_agent import prompts
from synth_agent.engine import FitConfig, Judge, Synthesizer
from synth_agent.engine.selection import SelectionConfig
from synth_agent.engine.synthesize import demo_from_vote, split_votes, stable_coin
from synth_agent.judge_server import LocalJudgeServer
from synth_agent.llm.cache import MemoryCache
from synth_agent.llm.client import LLMClient
from synth_agent.models import Trace

SMALL = FitConfig(n_trials=1, n_demo_candidates=1, max_bootstrapped_demos=1, max_labeled_demos=1, score_mode="logprob",
                  persona_max_tokens=160, selection=SelectionConfig(enabled=False))  # fmt: skip
"""Selection (issue 16) writes one persona per fold: it runs in the small fit only (2 folds), to keep the tier short."""
WITH_SELECTION = dataclasses.replace(SMALL, selection=SelectionConfig(folds=2))
"""6 votes → 4 train, 2 validation: 6 chain-of-thought bootstrap judgments (every context vote), 3 candidates × 2 and 1 demo
set × 2 log-probability judgments, 1 persona."""
N_VOTES = 6


@pytest.fixture(scope="module")
def fit_cache() -> MemoryCache:
    """One temperature-0 cache for this module's fits: the second fit replays the first one's answers."""
    return MemoryCache()


@pytest.mark.timeout(1200)
async def test_small_fit_saves_a_persona_the_real_model_wrote(
    real_server: LocalJudgeServer, fit_cache: MemoryCache, real_personas: list[str]
) -> None:
    """A whole fit on the real model completes and saves its persona: unreadable judgments are ties
    (counted per call site), so no answer the model gives can abort it."""
    memory = PreferenceMemory(InMemoryStore(), "acme")
    await memory.add_votes(list(ana_votes())[:N_VOTES])
    stages: list[str] = []
    async with LLMClient(endpoint(real_server), cache=fit_cache) as llm:
        tap = Wiretap(llm)
        result = await Synthesizer(tap, memory, WITH_SELECTION).fit(  # type: ignore[arg-type]
            USER, progress=lambda stage, done, total: stages.append(stage)
        )
        assert result.status == "fitted" and result.profile is not None, result.message
        saved = await memory.current_persona(USER)
        assert saved is not None and saved.version == 1 and saved.meta["demos_status"] == "selected"
        assert saved.persona == result.profile.persona and saved.persona.strip()
        assert "<persona>" not in saved.persona
        assert any(saved.persona in t for t in tap.texts("persona"))  # the real model's own words
        assert saved.meta["selection"]["served"] in ("persona_demos", "default")  # the guard decided what is served
        # step 1 traces every context vote (6 votes: 4 train, 2 validation), the persona is written from all
        assert saved.model == "smollm2" and saved.meta["n_traces"] == N_VOTES
        assert len(saved.demos) <= SMALL.max_bootstrapped_demos + SMALL.max_labeled_demos
        assert {"bootstrap", "candidates", "persona", "demos", "select", "save"} <= set(stages)
        assert result.usage["llm_requests"] > 0 and result.usage["prompt_tokens"] > 0
        assert llm.stats.total().errors == 0  # no HTTP failure, no prompt the server refused
        # step 1's traces of all 6 votes, kept for the next fit
        assert len(await memory.get_traces(USER)) == N_VOTES
        unreadable = {site: s.unparseable for site, s in llm.stats.by_site.items() if s.unparseable}
    written = [saved.persona]
    outcome = f"fit saved persona v1 with {len(saved.demos)} demo(s); unreadable answers per call site: {unreadable}"
    real_personas.extend(f"[{outcome}]\n{text}" for text in written)


@pytest.mark.timeout(1200)
async def test_fit_keeps_the_persona_when_the_demo_step_gets_unreadable_answers(
    real_server: LocalJudgeServer, fit_cache: MemoryCache
) -> None:
    memory = PreferenceMemory(InMemoryStore(), "acme")
    await memory.add_votes(list(ana_votes())[:N_VOTES])
    async with LLMClient(endpoint(real_server), cache=fit_cache) as llm:  # replays the previous test's answers up to the demo step
        # Every demo-selection judgment unreadable: the log-probabilities hold neither letter (the judge falls
        # back to chain of thought) and that answer is cut to one token ('{').
        tap = Wiretap(llm, truncate={"demo_select": 1}, no_letters=["demo_select:logprob"])
        result = await Synthesizer(tap, memory, SMALL).fit(USER)  # type: ignore[arg-type]
    # Each unreadable judgment is a tie (never right), counted, and the fit goes on.
    assert result.status == "fitted" and result.profile is not None, result.message
    saved = await memory.current_persona(USER)
    assert saved is not None and saved.persona == result.profile.persona
    assert saved.persona and saved.persona in tap.texts("persona")[-1]  # the real model's own words
    assert tap.texts("demo_select") and all(len(t) <= 4 for t in tap.texts("demo_select"))
    assert llm.stats.site("demo_select").unparseable == len(tap.texts("demo_select"))
    assert llm.stats.site("demo_select:logprob").unparseable == len(tap.texts("demo_select:logprob")) > 0
    assert saved.meta["demos_status"] == "selected" and llm.stats.total().errors == 0


@pytest.mark.timeout(1200)
async def test_fit_on_long_votes_keeps_every_prompt_inside_the_context_window(
    llm: LLMClient, real_server: LocalJudgeServer
) -> None:
    votes = long_votes(5)
    train, val = split_votes(votes)
    # Precondition, measured with the server's own tokenizer: the largest candidate the engine
    # builds (labels only: 4 demos) cannot fit, while one pair alone fits with room to answer.
    labels_only = [demo_from_vote(v, True, None) for v in train[:4]]
    big = prompts.judge_messages(val[0].context, val[0].chosen, val[0].rejected, demos=labels_only)
    small = prompts.judge_messages(val[0].context, val[0].chosen, val[0].rejected)
    window = real_server.spec.context_length
    assert window is not None and await count_tokens(real_server, big) > window > await count_tokens(real_server, small) + 400

    memory = PreferenceMemory(InMemoryStore(), "acme")
    await memory.add_votes(votes)
    # default demo budgets (up to 4 traces + 4 labels); log-probability scoring (one token per judgment)
    cfg = FitConfig(n_trials=1, n_demo_candidates=1, score_mode="logprob", persona_max_tokens=160,
                    selection=SelectionConfig(enabled=False))  # selection writes one persona per fold
    user = votes[0].user_id
    # A previous fit's verified traces for every train vote: this refit judges no train vote again
    # and goes straight to scoring candidate demo sets (the step that overflows).
    await memory.put_traces(user, [
        Trace(vote_id=v.id, chosen_first=(cf := stable_coin(cfg.seed, v.id, "bootstrap")), predicted="A" if cf else "B",
              verified=True, model=llm.model, reasoning="The preferred answer is direct and shows the steps.")
        for v in train
    ])  # fmt: skip
    result = await Synthesizer(llm, memory, cfg).fit(user)
    assert result.status == "fitted" and result.profile is not None, result.message
    assert llm.stats.total().errors == 0  # no request the server had to refuse
    trimmed = {site: s.trimmed for site, s in llm.stats.by_site.items() if s.trimmed}
    assert trimmed.get("persona", 0) == 1, trimmed  # the persona writer dropped examples to fit
    assert result.profile.meta["demos_status"] == "selected"
    # The race may never send the labels-only candidate (once a cheaper set is sure to win it is not
    # judged), so judge with it directly: its demos are dropped until the prompt fits, and the server answers.
    label, _, _ = await Judge(llm, demos=labels_only, mode="logprob", call_site="long").judge_order(
        val[0].context, val[0].chosen, val[0].rejected
    )
    assert label in ("A", "B", "tie") and llm.stats.total().errors == 0
    assert llm.stats.site("long:logprob").trimmed == 1 and llm.stats.site("long:logprob").requests == 1


async def count_tokens(server: LocalJudgeServer, messages: list[dict[str, str]]) -> int:
    """Tokens of the messages' text by the server's tokenizer (a lower bound: the chat template adds more)."""
    text = "\n".join(m["content"] for m in messages)
    root = server.base_url.removesuffix("/v1")
    async with httpx.AsyncClient(timeout=60) as http:
        r = await http.post(f"{root}/extras/tokenize/count", json={"input": text})
        r.raise_for_status()
        return int(r.json()["count"])
