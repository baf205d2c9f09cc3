"""The chat middleware graph: persona injection, plain/A-B/rerank modes, votes, background synthesis."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.prebuilt import create_react_agent
from langgraph.store.memory import InMemoryStore
from pydantic import Field

from graphs._common import PERSONA_MARKER, TenantMemories
from graphs.chat import Personalizer, VoteError, personalize, submit_vote
from graphs.synthesis import SynthesisRunner, build_synthesis_graph
from synth_agent.engine.selection import SelectionConfig, served_persona
from synth_agent.engine.synthesize import FitConfig
from synth_agent.llm.client import EndpointConfig, LLMClient
from synth_agent.models import PersonaProfile
from synth_agent.scheduler import SynthesisPolicy, SynthesisScheduler
from synth_agent.sim.generator import PROMPT_POOL
from synth_agent.sim.population import Population
from synth_agent.sim.server import SimEndpoint

USER = {"configurable": {"user_id": "zoë@example.com", "tenant_id": "acme"}}


class RecordingModel(BaseChatModel):
    """A chat model that records what it was sent and answers with a text that varies by seed."""

    calls: list[tuple[list[BaseMessage], dict[str, Any]]] = Field(default_factory=list)

    @property
    def _llm_type(self) -> str:
        return "recording"

    def _generate(self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kw: Any) -> ChatResult:
        self.calls.append((list(messages), kw))
        persona = any(m.additional_kwargs.get(PERSONA_MARKER) for m in messages)
        text = f"answer to {messages[-1].content!s} (seed {kw.get('seed', 0)}, persona {persona})"
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content=text))])


@pytest.fixture(scope="module")
def sim() -> Iterator[SimEndpoint]:
    with SimEndpoint(seed=0) as ep:
        yield ep


@pytest.fixture
async def llm(sim: SimEndpoint) -> AsyncIterator[LLMClient]:
    client = LLMClient(EndpointConfig(base_url=sim.base_url))
    yield client
    await client.aclose()


def chat_model(sim: SimEndpoint) -> ChatOpenAI:
    # Own HTTP client: langchain-openai otherwise shares one across instances, bound to the first
    # event loop, and pytest gives every test a new loop.
    return ChatOpenAI(
        model="sim", base_url=sim.base_url, api_key="sim", http_async_client=httpx.AsyncClient()  # type: ignore[arg-type]
    )


async def give_persona(mems: TenantMemories, tenant: str, user: str, text: str) -> PersonaProfile:
    return await mems(tenant).save_persona(PersonaProfile(user_id=user, persona=text))


# ------------------------------------------------------------------ injection


async def test_persona_injected_once_user_system_kept_no_stacking() -> None:
    store = InMemoryStore()
    mems = TenantMemories(store)
    await give_persona(mems, "acme", "zoë@example.com", "The user strongly prefers bullet lists.")
    model = RecordingModel()
    app = personalize(model, store=store, memory_for=mems, checkpointer=InMemorySaver())
    cfg = {"configurable": {**USER["configurable"], "thread_id": "t1"}}
    await app.ainvoke({"messages": [SystemMessage("Answer in French."), HumanMessage("hi")]}, cfg)
    out = await app.ainvoke({"messages": [HumanMessage("and again")]}, cfg)
    for sent, _ in model.calls:
        injected = [m for m in sent if m.additional_kwargs.get(PERSONA_MARKER)]
        assert len(injected) == 1 and sent[0] is injected[0]
        assert "bullet lists" in str(injected[0].content) and "<persona>" in str(injected[0].content)
        assert [m.content for m in sent if isinstance(m, SystemMessage)][1:] == ["Answer in French."]
    assert len(model.calls[1][0]) == 5  # persona, user system, hi, answer, and again
    # the conversation state never stores the injected message
    assert not any(m.additional_kwargs.get(PERSONA_MARKER) for m in out["messages"])
    assert out["messages"][-1].content.startswith("answer to and again")
    # a message list that already carries an injected persona gets it replaced, not stacked
    stale = SystemMessage("old persona", id="synth-agent-persona", additional_kwargs={PERSONA_MARKER: True})
    await app.ainvoke({"messages": [stale, HumanMessage("third")]}, {"configurable": {**USER["configurable"], "thread_id": "t2"}})
    sent = model.calls[-1][0]
    assert [m.content for m in sent].count("old persona") == 0
    assert sum(1 for m in sent if m.additional_kwargs.get(PERSONA_MARKER)) == 1


async def test_no_persona_means_no_injection_and_identity_is_required() -> None:
    model = RecordingModel()
    app = personalize(model, store=InMemoryStore())
    await app.ainvoke({"messages": [("user", "hi")]}, USER)
    assert not any(isinstance(m, SystemMessage) for m in model.calls[0][0])
    with pytest.raises(ValueError, match="user_id"):
        await app.ainvoke({"messages": [("user", "hi")]}, {"configurable": {}})
    with pytest.raises(ValueError, match="mode"):
        await app.ainvoke({"messages": [("user", "hi")]}, {"configurable": {"user_id": "u", "mode": "nope"}})


async def test_plain_mode_makes_exactly_the_wrapped_calls(sim: SimEndpoint) -> None:
    """Persona present: a plain turn costs the wrapped agent's requests and not one more."""
    store = InMemoryStore()
    mems = TenantMemories(store)
    await give_persona(mems, "acme", "zoë@example.com", "The user strongly prefers short, concise answers.")

    @tool
    def word_count(text: str) -> int:
        """Count the words in a text."""
        return len(text.split())

    model = chat_model(sim)
    agent = create_react_agent(model, [word_count])
    for wrapped in (model, agent):
        p = Personalizer(wrapped, store=store, memory_for=mems)
        msgs = {"messages": [("user", "How do I start running?")]}
        sim.reset_stats()
        direct = await wrapped.ainvoke(msgs["messages"] if wrapped is model else msgs)
        direct_calls = sim.stats()["completions"]
        for _ in range(3):
            sim.reset_stats()
            out = await p.graph.ainvoke(msgs, USER)
            assert sim.stats()["completions"] == direct_calls == 1
            assert sim.stats()["by_path"] == {"/v1/chat/completions": 1}
        answer = out["messages"][-1].content
        assert answer and answer != (direct.content if wrapped is model else direct["messages"][-1].content)
        assert p.personas.misses == 1 and p.personas.hits == 2  # one store read, then cached


# ------------------------------------------------------------------ A/B votes


async def test_ab_votes_are_per_user_single_use_and_survive_restarts() -> None:
    store = InMemoryStore()
    mems = TenantMemories(store)
    model = RecordingModel()
    p = Personalizer(model, store=store, memory_for=mems, default_mode="ab", rng=random.Random(1))
    out = await p.graph.ainvoke({"messages": [("user", "hi")]}, USER)
    ab = out["ab"]
    assert ab["token"] and ab["a"] != ab["b"] and ab["personalized"] is None
    assert {ab["a"], ab["b"]} == {"answer to hi (seed 0, persona False)", "answer to hi (seed 1, persona False)"}
    assert "messages" in out and len(out["messages"]) == 1  # A/B appends nothing until the user picks

    other_user = {"configurable": {"user_id": "mallory", "tenant_id": "acme"}}
    other_tenant = {"configurable": {"user_id": "zoë@example.com", "tenant_id": "evil"}}
    for cfg in (other_user, other_tenant):
        with pytest.raises(VoteError, match="unknown vote token"):
            await p.submit_vote(ab["token"], "a", config=cfg)
    with pytest.raises(VoteError, match="choice"):
        await p.submit_vote(ab["token"], "c", config=USER)

    restarted = Personalizer(model, store=store, memory_for=TenantMemories(store))  # a new process, same store
    receipt = await restarted.submit_vote(ab["token"], "b", config=USER)
    assert receipt.choice == "b" and receipt.chose_personalized is None
    with pytest.raises(VoteError):
        await p.submit_vote(ab["token"], "a", config=USER)
    votes = await mems("acme").list_votes("zoë@example.com")
    assert len(votes) == 1 and votes[0].chosen == ab["b"] and votes[0].rejected == ab["a"]
    assert votes[0].context[-1].content == "hi"
    assert await mems("acme").count_votes("mallory") == 0

    # votes through the graph itself (what LangGraph Studio / the HTTP API can do)
    out = await p.graph.ainvoke({"messages": [("user", "again")]}, USER)
    res = await submit_vote(p.graph, out["ab"]["token"], "a", USER)
    assert res["ok"] and res["choice"] == "a"
    res = await submit_vote(p.graph, out["ab"]["token"], "a", USER)
    assert res == {"ok": False, "error": res["error"]} and "unknown vote token" in res["error"]
    assert len(p._vote_locks) == 0  # no per-user lock is kept once a vote is recorded


async def test_concurrent_double_submit_records_one_vote() -> None:
    store = InMemoryStore()
    mems = TenantMemories(store)
    p = Personalizer(RecordingModel(), store=store, memory_for=mems, default_mode="ab")
    token = (await p.graph.ainvoke({"messages": [("user", "hi")]}, USER))["ab"]["token"]
    results = await asyncio.gather(*(p.submit_vote(token, "a", config=USER) for _ in range(5)), return_exceptions=True)
    assert sum(not isinstance(r, Exception) for r in results) == 1
    assert all(isinstance(r, VoteError) for r in results if isinstance(r, Exception))
    assert await mems("acme").count_votes("zoë@example.com") == 1


async def test_open_ab_pairs_are_bounded_per_user() -> None:
    """A pair nobody votes on used to stay until its user was forgotten: a user keeps at most
    ``max_open_votes`` open pairs (the oldest go first), and expired ones go when a new pair opens."""
    from graphs.chat import pending_namespace

    store = InMemoryStore()
    mems = TenantMemories(store)
    p = Personalizer(RecordingModel(), store=store, memory_for=mems, default_mode="ab", max_open_votes=3,
                     prune_every=1, rng=random.Random(5))
    tokens = [(await p.graph.ainvoke({"messages": [("user", f"hi {i}")]}, USER))["ab"]["token"] for i in range(5)]
    ns = pending_namespace("acme", "zoë@example.com")
    assert sorted(it.key for it in await store.asearch(ns, limit=50)) == sorted(tokens[2:])
    with pytest.raises(VoteError, match="unknown vote token"):
        await p.submit_vote(tokens[0], "a", config=USER)
    await p.submit_vote(tokens[4], "a", config=USER)  # a kept pair still redeems
    assert await mems("acme").count_votes("zoë@example.com") == 1

    p.vote_ttl = 0.0  # every open pair is now expired: the next one to open clears them
    fresh = (await p.graph.ainvoke({"messages": [("user", "again")]}, USER))["ab"]["token"]
    assert [it.key for it in await store.asearch(ns, limit=50)] == [fresh]
    with pytest.raises(ValueError):
        Personalizer(RecordingModel(), store=store, max_open_votes=0)
    with pytest.raises(ValueError):
        Personalizer(RecordingModel(), store=store, prune_every=0)


async def test_open_ab_pairs_are_checked_on_the_first_and_every_nth_opening() -> None:
    """Checking lists the user's open pairs, so it runs on a user's first opening in the process and then
    every ``prune_every``-th: the bound can be passed by ``prune_every - 1`` between checks, never more."""
    from graphs.chat import pending_namespace

    store = InMemoryStore()
    mems = TenantMemories(store)
    p = Personalizer(RecordingModel(), store=store, memory_for=mems, default_mode="ab", max_open_votes=2,
                     prune_every=3, rng=random.Random(7))
    ns = pending_namespace("acme", "zoë@example.com")

    async def open_pairs(n: int) -> list[int]:
        counts = []
        for i in range(n):
            await p.graph.ainvoke({"messages": [("user", f"hi {i}")]}, USER)
            counts.append(len(await store.asearch(ns, limit=50)))
        return counts

    # checked at openings 1, 4, 7: the count drops back to the bound there, and never exceeds 2 + 3 - 1
    assert await open_pairs(7) == [1, 2, 3, 2, 3, 4, 2]
    p.invalidate("acme", "zoë@example.com")  # forgetting the user drops the count too: the next opening checks
    p.max_open_votes = 1
    assert await open_pairs(1) == [1]


async def test_ab_with_persona_is_personalized_vs_plain() -> None:
    store = InMemoryStore()
    mems = TenantMemories(store)
    await give_persona(mems, "acme", "zoë@example.com", "The user prefers emoji.")
    p = Personalizer(RecordingModel(), store=store, memory_for=mems, rng=random.Random(0))
    out = await p.graph.ainvoke({"messages": [("user", "hi")]}, {"configurable": {**USER["configurable"], "mode": "ab"}})
    ab = out["ab"]
    side = ab["personalized"]
    assert side in ("a", "b") and "persona True" in ab[side] and ab["persona_version"] == 1
    receipt = await p.submit_vote(ab["token"], side, config=USER)
    assert receipt.chose_personalized is True and receipt.persona_version == 1


# ------------------------------------------------------------------ rerank


async def test_rerank_mode_returns_the_judges_pick_with_scores(sim: SimEndpoint, llm: LLMClient) -> None:
    store = InMemoryStore()
    mems = TenantMemories(store)
    await give_persona(mems, "acme", "zoë@example.com", "The user strongly prefers code blocks. The user strongly dislikes emoji.")
    p = Personalizer(chat_model(sim), llm=llm, store=store, memory_for=mems)
    sim.reset_stats()
    out = await p.graph.ainvoke(
        {"messages": [("user", "How do I reverse a list in Python?")]},
        {"configurable": {**USER["configurable"], "mode": "rerank", "n": 4}},
    )
    info = out["rerank"]
    assert len(info["candidates"]) == 4 and len(info["scores"]) == 4 and info["personalized_judge"]
    assert all(c["personalized"] for c in info["candidates"])
    assert len({c["text"] for c in info["candidates"]}) == 4  # one seed per candidate
    assert out["messages"][-1].content == info["candidates"][info["winner"]]["text"]
    assert info["winner"] == info["order"][0]
    assert sim.stats()["completions"] >= 4 + 3 * 2  # 4 candidates + a knockout of 3 pairs in both orders


# ------------------------------------------------------------------ end to end


async def _chat_user(
    p: Personalizer, sched: SynthesisScheduler, user: Any, seed: int, turns: int, measure: bool
) -> tuple[int, int]:
    rng = np.random.default_rng(seed)
    cfg = {"configurable": {"user_id": user.user_id, "tenant_id": "acme", "mode": "ab"}}
    wins = n = 0
    for _ in range(turns):
        prompt = PROMPT_POOL[int(rng.integers(len(PROMPT_POOL)))]
        out = await p.graph.ainvoke({"messages": [("user", prompt)]}, cfg)
        ab = out["ab"]
        assert ab["token"], ab
        pick_a = user.choose(ab["a"], ab["b"], rng)  # the hidden preferences decide
        receipt = await p.submit_vote(ab["token"], "a" if pick_a else "b", config=cfg)
        if measure:
            assert receipt.chose_personalized is not None
            n += 1
            wins += int(receipt.chose_personalized)
        await sched.wait_user_idle("acme", user.user_id)  # keeps each user's run reproducible
    return wins, n


async def test_end_to_end_users_prefer_the_personalized_agent(sim: SimEndpoint, llm: LLMClient) -> None:
    """Simulated users vote A/B for 30 turns; background synthesis fits at 5, 10, 20 votes; then the
    personalized answers win a clear majority of a further 30 turns by the users' hidden preferences."""
    store = InMemoryStore()
    mems = TenantMemories(store)
    # The guard is off here: this test is about A/B plumbing and personas carrying the users' taste; what
    # the guard serves (and that it serves a strong user's persona) is tested in test_personalize.py.
    unguarded = FitConfig(n_trials=4, n_demo_candidates=4, selection=SelectionConfig(enabled=False))
    synth = build_synthesis_graph(llm=llm, memory_for=mems, fit_config=unguarded, checkpointer=InMemorySaver())
    sched = SynthesisScheduler(SynthesisRunner(synth, mems), mems, SynthesisPolicy(debounce=0.0))
    model = chat_model(sim)
    users = Population(2, seed=0).users
    # one Personalizer per user (same store, scheduler, model) so each user's A/B order rng is its own
    bots = [
        Personalizer(model, llm=llm, store=store, memory_for=mems, scheduler=sched, rng=random.Random(7 + i))
        for i in range(len(users))
    ]

    await asyncio.gather(*(_chat_user(bots[i], sched, u, i, 30, measure=False) for i, u in enumerate(users)))
    await sched.wait_idle()
    for u in users:
        history = await mems("acme").persona_history(u.user_id)
        assert [len(h.vote_ids) for h in history] == [5, 10, 20]  # fitted at the policy's thresholds
    assert sched.stats.failures == 0 and sched.stats.max_in_flight_per_user == 1

    results = await asyncio.gather(
        *(_chat_user(bots[i], sched, u, 100 + i, 30, measure=True) for i, u in enumerate(users))
    )
    await sched.aclose()
    wins, n = sum(w for w, _ in results), sum(k for _, k in results)
    rate = wins / n
    print(f"\npersonalized win rate after synthesis: {rate:.2f} ({wins}/{n}); per user {results}")
    assert n == 60
    assert rate >= 0.65


async def test_fifty_users_concurrently_lose_no_vote(llm: LLMClient) -> None:
    """50 users chat and vote at once while their personas are fitted in the background."""
    store = InMemoryStore()
    mems = TenantMemories(store)
    synth = build_synthesis_graph(
        llm=llm, memory_for=mems, fit_config=FitConfig(n_trials=1, n_demo_candidates=1), checkpointer=InMemorySaver()
    )
    sched = SynthesisScheduler(SynthesisRunner(synth, mems), mems, SynthesisPolicy(debounce=0.0))
    p = Personalizer(RecordingModel(), store=store, memory_for=mems, scheduler=sched, default_mode="ab")
    users = [f"user {i} ✓" for i in range(50)]
    n_votes = 7

    async def chat(i: int, user: str) -> int:
        cfg = {"configurable": {"user_id": user, "tenant_id": "acme"}}
        rng = random.Random(i)
        for t in range(n_votes):
            out = await p.graph.ainvoke({"messages": [("user", PROMPT_POOL[(i + t) % len(PROMPT_POOL)])]}, cfg)
            await p.submit_vote(out["ab"]["token"], rng.choice("ab"), config=cfg)
            await asyncio.sleep(0)
        return n_votes

    sent = await asyncio.gather(*(chat(i, u) for i, u in enumerate(users)))
    await sched.wait_idle()
    counts = await mems("acme").users_with_counts()
    assert counts == {u: n for u, n in zip(users, sent, strict=True)}  # every vote stored, none twice
    st = sched.stats
    assert st.max_in_flight_per_user == 1 and st.failures == 0 and st.votes_notified == 50 * n_votes
    assert st.runs_succeeded >= 50 and all(sched.runs_for("acme", u) >= 1 for u in users)
    for u in users[:5]:
        assert (await mems("acme").current_persona(u)) is not None
    # the scheduler's listener refreshed the cache: the next turn needs no store read
    misses = p.personas.misses
    out = await p.graph.ainvoke({"messages": [("user", "hi")]}, {"configurable": {"user_id": users[0], "tenant_id": "acme", "mode": "plain"}})
    assert p.personas.misses == misses
    # these users vote by coin flip: the persona is injected exactly where the per-user guard serves it
    current = await mems("acme").current_persona(users[0])
    assert ("persona True" in out["messages"][-1].content) == (served_persona(current) is not None)
    await sched.aclose()


async def test_a_vote_on_a_thread_continues_the_conversation_with_the_pick() -> None:
    """Studio and SDK users keep a thread: after the vote, the picked answer is the assistant's turn."""
    store = InMemoryStore()
    p = Personalizer(RecordingModel(), store=store, default_mode="ab", checkpointer=InMemorySaver(), rng=random.Random(3))
    cfg = {"configurable": {"thread_id": "t-ab"}}
    ctx = {"synth_user_id": "zoë@example.com", "tenant_id": "acme"}
    out = await p.graph.ainvoke({"messages": [("user", "hi")]}, cfg, context=ctx)
    assert [m.type for m in out["messages"]] == ["human"]
    res = await p.graph.ainvoke({"vote": {"token": out["ab"]["token"], "choice": "b"}}, cfg, context=ctx)
    assert res["vote_result"]["ok"] and [m.type for m in res["messages"]] == ["human", "ai"]
    assert res["messages"][-1].content == out["ab"]["b"]
    await p.graph.ainvoke({"messages": [("user", "and then?")]}, cfg, context=ctx)
    sent = p.agent.calls[-1][0]  # type: ignore[attr-defined]
    assert [m.content for m in sent] == ["hi", out["ab"]["b"], "and then?"]


async def test_persona_cache_answers_warm_reads_synchronously():
    """``PersonaCache.cached``: a fresh entry without awaiting (the proxy's hot path), nothing when
    cold, expired or disabled; only ``get`` reads the store."""
    from graphs._common import PersonaCache

    store = InMemoryStore()
    mems = TenantMemories(store)
    await give_persona(mems, "acme", "zoë@example.com", "The user strongly prefers short, concise answers.")
    cache = PersonaCache(ttl=60)
    assert cache.cached("acme", "zoë@example.com") == (False, None)
    profile = await cache.get(mems("acme"), "acme", "zoë@example.com")
    assert profile is not None and cache.misses == 1
    assert cache.cached("acme", "zoë@example.com") == (True, profile) and cache.hits == 1
    assert cache.cached("other", "zoë@example.com") == (False, None)
    cache.invalidate("acme", "zoë@example.com")
    assert cache.cached("acme", "zoë@example.com") == (False, None)
    off = PersonaCache(ttl=0)
    await off.get(mems("acme"), "acme", "zoë@example.com")
    assert off.cached("acme", "zoë@example.com") == (False, None)


async def test_persona_cache_is_bounded():
    """One entry per user ever served used to stay for the life of the process, expired or not:
    the cache keeps at most ``max_entries`` (oldest written out first) and drops expired ones on write."""
    from graphs._common import PersonaCache

    store = InMemoryStore()
    mems = TenantMemories(store)
    cache = PersonaCache(ttl=None, max_entries=3)
    for i in range(10):
        await cache.get(mems("acme"), "acme", f"u{i}")
    assert len(cache) == 3 and [cache.cached("acme", f"u{i}")[0] for i in (6, 7, 8, 9)] == [False, True, True, True]
    cache.put("acme", "u7", None)  # a write makes u7 the newest: u8 is the next out
    await cache.get(mems("acme"), "acme", "u10")
    assert [cache.cached("acme", u)[0] for u in ("u7", "u8", "u9", "u10")] == [True, False, True, True]

    short = PersonaCache(ttl=0.05, max_entries=100)
    for i in range(5):
        await short.get(mems("acme"), "acme", f"u{i}")
    await asyncio.sleep(0.06)  # all five expired
    await short.get(mems("acme"), "acme", "late")
    assert len(short) == 1
