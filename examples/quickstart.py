"""Quickstart (the README's example): votes → persona → personalized judge.

Runs offline against the bundled simulator; set OPENAI_BASE_URL / OPENAI_API_KEY /
SYNTH_AGENT_MODEL to use a real model instead.
"""

import asyncio
import os

from langgraph.store.memory import InMemoryStore

from store.memory import PreferenceMemory
from synth_agent.engine import Judge, Synthesizer
from synth_agent.llm import EndpointConfig, LLMClient
from synth_agent.sim import Population
from synth_agent.sim.server import llm_endpoint


async def personalize(base_url: str, model: str, api_key: str) -> str:
    memory = PreferenceMemory(InMemoryStore(), tenant="acme")  # or ChromaStore(path=...)
    population = Population(1, seed=0)  # a simulated user with hidden tastes
    user = population.user_ids[0]
    await memory.add_votes(population.votes(user, 15))  # A/B votes: context, chosen, rejected
    async with LLMClient(EndpointConfig(base_url=base_url, model=model, api_key=api_key)) as llm:
        fit = await Synthesizer(llm, memory).fit(user)  # bootstrap → persona → demos, saved as v1
        print(f"persona v{fit.profile.version}: {fit.profile.persona}")
        judge = Judge.from_profile(llm, fit.profile)
        verdict = await judge.compare("How do I learn Spanish?", "Practice daily.", "## Plan\n- Daily practice\n- Podcasts")
        print(f"prefers {verdict.preferred} (confidence {verdict.confidence:.2f})")
        return fit.profile.persona


def main() -> str:
    with llm_endpoint() as base_url:  # OPENAI_BASE_URL, or the offline simulator
        model = os.environ.get("SYNTH_AGENT_MODEL", "sim")
        return asyncio.run(personalize(base_url, model, os.environ.get("OPENAI_API_KEY", "sim")))


if __name__ == "__main__":
    main()
