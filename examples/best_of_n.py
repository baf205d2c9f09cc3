"""Personalized best-of-n: generate n candidates, let the user's persona-guided judge pick one.

    python examples/best_of_n.py
"""

from __future__ import annotations

import asyncio
import os

from langgraph.store.memory import InMemoryStore

from graphs.chat import TenantMemories
from graphs.rerank import build_rerank_graph
from graphs.synthesis import SynthesisRunner, build_synthesis_graph
from synth_agent.engine.synthesize import FitConfig
from synth_agent.llm.client import EndpointConfig, LLMClient
from synth_agent.sim.population import Population
from synth_agent.sim.server import llm_endpoint

MODEL = os.environ.get("SYNTH_AGENT_MODEL", "sim")
API_KEY = os.environ.get("OPENAI_API_KEY", "sim")


async def run(base_url: str) -> str:
    store = InMemoryStore()
    memories = TenantMemories(store)
    llm = LLMClient(EndpointConfig(base_url=base_url, api_key=API_KEY, model=MODEL))
    pop = Population(1, seed=1)
    user_id = pop.user_ids[0]
    await memories("default").add_votes(pop.votes(user_id, 15))
    synthesis = build_synthesis_graph(llm=llm, memory_for=memories, fit_config=FitConfig(n_trials=3, n_demo_candidates=3))
    profile = await SynthesisRunner(synthesis, memories).run("default", user_id)
    print(f"persona: {profile.persona if profile else '-'}\n")

    # The generator may be an LLMClient (as here) or any LangChain chat model.
    best_of_n = build_rerank_graph(llm, llm=llm, store=store, n=4, strategy="round_robin")
    out = await best_of_n.ainvoke(
        {"messages": [("user", "How should I structure a weekly workout plan?")]},
        {"configurable": {"user_id": user_id}},
    )
    for c in out["candidates"]:
        mark = "*" if c["index"] == out["winner"] else " "
        print(f"{mark} candidate {c['index']}: score {out['scores'][c['index']]:.2f}, {len(c['text'].split())} words")
    print(f"\nchosen for {user_id!r}:\n{out['best']}")
    await llm.aclose()
    return str(out["best"])


def main() -> str:
    with llm_endpoint() as base_url:
        return asyncio.run(run(base_url))


if __name__ == "__main__":
    main()
