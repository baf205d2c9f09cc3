"""A/B voting loop: every turn shows two answers, the user's pick becomes a vote, personas fit in the background.

Before a persona exists the two answers are the agent at two seeds; once one is served, it is
personalized vs plain, so the votes also measure whether personalization helps (live lift). A
persona is served only where cross-validation on the user's votes says it beats the plain judge
(the per-user guard); a version that keeps losing A/B votes is demoted and refitted.
The votes here come from a simulated user with hidden preferences.

    python examples/ab_voting.py
"""

from __future__ import annotations

import asyncio
import os

import numpy as np
from langchain_openai import ChatOpenAI
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.store.memory import InMemoryStore

from graphs.chat import Personalizer, TenantMemories
from graphs.synthesis import SynthesisRunner, build_synthesis_graph
from synth_agent.engine.selection import served
from synth_agent.engine.synthesize import FitConfig
from synth_agent.llm.client import EndpointConfig, LLMClient
from synth_agent.scheduler import SynthesisPolicy, SynthesisScheduler
from synth_agent.sim.generator import PROMPT_POOL
from synth_agent.sim.population import Population, SimUser
from synth_agent.sim.server import llm_endpoint

MODEL = os.environ.get("SYNTH_AGENT_MODEL", "sim")
API_KEY = os.environ.get("OPENAI_API_KEY", "sim")


async def run(base_url: str, turns: int = 24, user: SimUser | None = None) -> float:
    store = InMemoryStore()
    memories = TenantMemories(store)
    llm = LLMClient(EndpointConfig(base_url=base_url, api_key=API_KEY, model=MODEL))
    # The synthesis graph checkpoints every node (use graphs.synthesis.open_checkpointer for SQLite).
    synthesis = build_synthesis_graph(
        llm=llm, memory_for=memories, fit_config=FitConfig(n_trials=4, n_demo_candidates=4), checkpointer=InMemorySaver()
    )
    scheduler = SynthesisScheduler(SynthesisRunner(synthesis, memories), memories, SynthesisPolicy(debounce=0.5))
    bot = Personalizer(
        ChatOpenAI(model=MODEL, base_url=base_url, api_key=API_KEY),  # type: ignore[arg-type]
        store=store, memory_for=memories, scheduler=scheduler, default_mode="ab",
    )
    user = user or Population(1, seed=0).users[0]  # a simulated user with hidden preferences
    rng = np.random.default_rng(0)
    config = {"configurable": {"user_id": user.user_id, "tenant_id": "demo"}}
    wins: list[bool] = []
    for turn in range(1, turns + 1):
        prompt = PROMPT_POOL[int(rng.integers(len(PROMPT_POOL)))]
        ab = (await bot.graph.ainvoke({"messages": [("user", prompt)]}, config))["ab"]
        pick = "a" if user.choose(ab["a"], ab["b"], rng) else "b"  # a real app shows both and asks
        receipt = await bot.submit_vote(ab["token"], pick, config=config)
        if receipt.chose_personalized is not None:
            wins.append(receipt.chose_personalized)
        print(f"turn {turn:2d}: persona v{ab['persona_version']}, picked {pick}"
              + ("" if receipt.chose_personalized is None else f" (personalized: {receipt.chose_personalized})"))
        await asyncio.sleep(0.05)  # the user reads; background synthesis runs meanwhile
    await scheduler.aclose(drain=True)
    profile = await memories("demo").current_persona(user.user_id)
    rate = sum(wins) / len(wins) if wins else float("nan")
    print(f"\nscheduler: {scheduler.stats.as_dict()}")
    print(f"persona v{profile.version if profile else 0}: {profile.persona if profile else '-'}")
    print(f"the per-user guard serves: {served(profile)}")
    if wins:
        print(f"personalized answer chosen in {sum(wins)}/{len(wins)} A/B turns ({rate:.0%})")
    else:
        print("no personalized-vs-plain pair: the guard never served this user a persona")
    await llm.aclose()
    return rate


def main() -> float:
    with llm_endpoint() as base_url:
        return asyncio.run(run(base_url))


if __name__ == "__main__":
    main()
