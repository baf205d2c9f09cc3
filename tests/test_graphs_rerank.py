"""The standalone best-of-n graph: Send fan-out to generate, the user's judge picks."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from langgraph.store.memory import InMemoryStore

from graphs._common import TenantMemories
from graphs.rerank import build_rerank_graph
from synth_agent.llm.client import EndpointConfig, LLMClient
from synth_agent.models import PersonaProfile
from synth_agent.sim.server import SimEndpoint
from synth_agent.sim.traits import TRAITS, trait_vector

CFG = {"configurable": {"user_id": "李雷", "tenant_id": "acme"}}


@pytest.fixture(scope="module")
def sim() -> Iterator[SimEndpoint]:
    with SimEndpoint(seed=2) as ep:
        yield ep


@pytest.fixture
async def llm(sim: SimEndpoint) -> AsyncIterator[LLMClient]:
    client = LLMClient(EndpointConfig(base_url=sim.base_url))
    yield client
    await client.aclose()


async def test_generates_n_candidates_and_returns_the_best(sim: SimEndpoint, llm: LLMClient) -> None:
    store = InMemoryStore()
    mems = TenantMemories(store)
    await mems("acme").save_persona(
        PersonaProfile(user_id="李雷", persona="The user strongly prefers code blocks. The user strongly dislikes emoji.")
    )
    g = build_rerank_graph(llm, llm=llm, store=store, n=3)
    sim.reset_stats()
    out = await g.ainvoke({"messages": [("user", "How do I sort a dict by value in Python?")]}, CFG)
    assert len(out["candidates"]) == 3 and len({c["text"] for c in out["candidates"]}) == 3
    assert out["personalized_judge"] and out["best"] == out["candidates"][out["winner"]]["text"]
    assert out["messages"][-1].content == out["best"] and out["order"][0] == out["winner"]
    assert sim.stats()["completions"] >= 3  # the generations; the judge's calls come on top
    # the persona asks for code blocks: the winner has at least as many as any candidate
    code = TRAITS.index("code")
    assert trait_vector(out["best"])[code] == max(trait_vector(c["text"])[code] for c in out["candidates"])


async def test_ranks_given_candidates_without_generating(sim: SimEndpoint, llm: LLMClient) -> None:
    g = build_rerank_graph(llm, llm=llm, store=InMemoryStore())
    given = ["Short answer.", "A much longer answer with detail.\n\n- point one\n- point two", "Another one."]
    sim.reset_stats()
    out = await g.ainvoke(
        {"messages": [("user", "Explain recursion")], "given": given},
        {"configurable": {**CFG["configurable"], "strategy": "round_robin"}},
    )
    assert out["strategy"] == "round_robin" and len(out["scores"]) == 3
    assert not out["personalized_judge"] and out["best"] in given
    assert sim.stats()["completions"] <= 3 * 2  # three pairs, both orders: judge calls only
    with pytest.raises(ValueError, match="non-empty list"):
        await g.ainvoke({"messages": [("user", "x")], "given": []}, CFG)
