"""Wrap a prebuilt tool-calling LangGraph agent so it answers in each user's learned style.

Runs offline: without OPENAI_BASE_URL it starts the simulated LLM endpoint. With a
real endpoint set OPENAI_BASE_URL / OPENAI_API_KEY / SYNTH_AGENT_MODEL.

    python examples/react_agent.py
"""

from __future__ import annotations

import asyncio
import os
import warnings

from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from langgraph.prebuilt import create_react_agent
from langgraph.store.memory import InMemoryStore

from graphs.chat import TenantMemories, personalize
from graphs.synthesis import SynthesisRunner, build_synthesis_graph
from synth_agent.engine.synthesize import FitConfig
from synth_agent.llm.client import EndpointConfig, LLMClient
from synth_agent.sim.population import Population
from synth_agent.sim.server import llm_endpoint

MODEL = os.environ.get("SYNTH_AGENT_MODEL", "sim")
API_KEY = os.environ.get("OPENAI_API_KEY", "sim")


@tool
def word_count(text: str) -> int:
    """Count the words in a text."""
    return len(text.split())


async def run(base_url: str) -> str:
    store = InMemoryStore()  # or store.chroma.ChromaStore(path=...) to keep personas across restarts
    memories = TenantMemories(store)
    llm = LLMClient(EndpointConfig(base_url=base_url, api_key=API_KEY, model=MODEL))

    # A user with a dozen past A/B votes (simulated here) gets a persona.
    pop = Population(1, seed=3)
    user_id = pop.user_ids[0]
    await memories("default").add_votes(pop.votes(user_id, 12))
    synthesis = build_synthesis_graph(llm=llm, memory_for=memories, fit_config=FitConfig(n_trials=3, n_demo_candidates=3))
    profile = await SynthesisRunner(synthesis, memories).run("default", user_id)
    assert profile is not None
    print(f"persona v{profile.version} of {user_id!r}:\n  {profile.persona}\n")

    # Any compiled graph with a `messages` state can be wrapped; here the prebuilt ReAct agent.
    model = ChatOpenAI(model=MODEL, base_url=base_url, api_key=API_KEY)  # type: ignore[arg-type]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # langgraph 1.x points to langchain.agents.create_agent
        agent = create_react_agent(model, [word_count])
    app = personalize(agent, store=store, memory_for=memories)

    question = "How many words are in 'the quick brown fox'? And how do I start learning Python?"
    out = await app.ainvoke({"messages": [("user", question)]}, {"configurable": {"user_id": user_id}})
    answer = out["messages"][-1].content
    print(f"personalized answer:\n{answer}")
    await llm.aclose()
    return str(answer)


def main() -> str:
    with llm_endpoint() as base_url:
        return asyncio.run(run(base_url))


if __name__ == "__main__":
    main()
