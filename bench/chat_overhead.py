"""Latency the personalization wrapper adds to a chat turn (plain mode, persona present).

Calls the wrapped chat model directly (with the same persona system prompt, so the
prompt is identical) and through ``personalize()``, interleaved, against the
simulator with zero latency, at concurrency 1 and 32; prints median and p99 of
each and the difference. A second table runs the same comparison over an
in-process model (no HTTP), which isolates the graph's own cost.

    .venv/bin/python bench/chat_overhead.py [--requests 400]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

import httpx
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_openai import ChatOpenAI
from langgraph.store.memory import InMemoryStore

from graphs.chat import Personalizer, TenantMemories
from synth_agent import prompts
from synth_agent.models import PersonaProfile
from synth_agent.sim.server import SimProcess

PERSONA = "The user strongly prefers bullet lists and short, concise answers. The user dislikes emoji."
QUESTION = "How do I start learning Python?"


class EchoModel(BaseChatModel):
    """No I/O at all: what is left is the framework's own cost."""

    @property
    def _llm_type(self) -> str:
        return "echo"

    def _generate(self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kw: Any) -> ChatResult:
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content="ok"))])

    async def _agenerate(self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kw: Any) -> ChatResult:
        return self._generate(messages)


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


async def measure(model: BaseChatModel, requests: int, concurrency: int) -> dict[str, list[float]]:
    store = InMemoryStore()
    mems = TenantMemories(store)
    users = [f"user-{i}" for i in range(concurrency)]
    for u in users:
        await mems("bench").save_persona(PersonaProfile(user_id=u, persona=PERSONA))
    app = Personalizer(model, store=store, memory_for=mems).graph
    system = SystemMessage(prompts.generation_system_prompt(PERSONA))
    lat: dict[str, list[float]] = {"direct": [], "wrapped": []}

    async def direct() -> None:
        t = time.perf_counter()
        await model.ainvoke([system, HumanMessage(QUESTION)])
        lat["direct"].append(time.perf_counter() - t)

    async def wrapped(user: str) -> None:
        t = time.perf_counter()
        await app.ainvoke(
            {"messages": [HumanMessage(QUESTION)]}, {"configurable": {"user_id": user, "tenant_id": "bench"}}
        )
        lat["wrapped"].append(time.perf_counter() - t)

    async def worker(i: int) -> None:
        for k in range(requests // concurrency):
            if (i + k) % 2:  # interleave so drift hits both sides alike
                await direct()
                await wrapped(users[i])
            else:
                await wrapped(users[i])
                await direct()

    for i in range(concurrency):  # warm up: connections, persona cache, first-call imports
        await wrapped(users[i])
        await direct()
    lat = {"direct": [], "wrapped": []}
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return lat


def report(title: str, rows: list[tuple[int, dict[str, list[float]]]]) -> None:
    print(f"\n{title}")
    print(f"{'concurrency':>11} {'n':>5} {'direct p50':>11} {'wrapped p50':>12} {'added p50':>10} "
          f"{'direct p99':>11} {'wrapped p99':>12} {'added p99':>10}")
    for c, lat in rows:
        d, w = lat["direct"], lat["wrapped"]
        d50, w50, d99, w99 = statistics.median(d), statistics.median(w), pct(d, 0.99), pct(w, 0.99)
        print(f"{c:>11} {len(w):>5} {d50 * 1e3:>9.2f}ms {w50 * 1e3:>10.2f}ms {(w50 - d50) * 1e3:>8.2f}ms "
              f"{d99 * 1e3:>9.2f}ms {w99 * 1e3:>10.2f}ms {(w99 - d99) * 1e3:>8.2f}ms")


async def main_async(requests: int) -> None:
    with SimProcess(latency_ms=0) as ep:  # own process: the server does not share our GIL
        model = ChatOpenAI(
            model="sim", base_url=ep.base_url, api_key="sim",  # type: ignore[arg-type]
            http_async_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=64)),
        )
        sim_rows = [(c, await measure(model, requests, c)) for c in (1, 32)]
    echo_rows = [(c, await measure(EchoModel(), requests, c)) for c in (1, 32)]
    report("against the simulator (zero latency, own process), plain mode, persona present:", sim_rows)
    report("framework cost only (in-process model, no HTTP):", echo_rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=320, help="requests per side per concurrency level")
    args = parser.parse_args()
    asyncio.run(main_async(args.requests))


if __name__ == "__main__":
    main()
