"""Export a learned persona as a system prompt and use it with another model, outside synth-agent.

    python examples/export_persona.py
"""

from __future__ import annotations

import asyncio
import os

from langchain_core.messages import HumanMessage, SystemMessage
from langchain_openai import ChatOpenAI
from langgraph.store.memory import InMemoryStore

from graphs.chat import TenantMemories
from graphs.synthesis import SynthesisRunner, build_synthesis_graph
from synth_agent.engine.synthesize import FitConfig
from synth_agent.export import export_profile
from synth_agent.llm.client import EndpointConfig, LLMClient
from synth_agent.sim.population import Population
from synth_agent.sim.server import llm_endpoint

MODEL = os.environ.get("SYNTH_AGENT_MODEL", "sim")
API_KEY = os.environ.get("OPENAI_API_KEY", "sim")


async def run(base_url: str) -> str:
    memories = TenantMemories(InMemoryStore())
    llm = LLMClient(EndpointConfig(base_url=base_url, api_key=API_KEY, model=MODEL))
    pop = Population(1, seed=2)
    user_id = pop.user_ids[0]
    await memories("default").add_votes(pop.votes(user_id, 12))
    synthesis = build_synthesis_graph(llm=llm, memory_for=memories, fit_config=FitConfig(n_trials=3, n_demo_candidates=3))
    profile = await SynthesisRunner(synthesis, memories).run("default", user_id)
    assert profile is not None

    system_prompt = export_profile(profile, "system")  # also "messages" (judge prompt) and "json"
    print(f"system prompt for any chat model:\n{system_prompt}\n")

    other_model = ChatOpenAI(model=MODEL, base_url=base_url, api_key=API_KEY)  # type: ignore[arg-type]
    answer = await other_model.ainvoke([SystemMessage(system_prompt), HumanMessage("How do I make good coffee?")])
    print(f"answer with the exported persona:\n{answer.content}")
    await llm.aclose()
    return system_prompt


def main() -> str:
    with llm_endpoint() as base_url:
        return asyncio.run(run(base_url))


if __name__ == "__main__":
    main()
