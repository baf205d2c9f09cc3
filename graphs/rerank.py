"""Personalized best-of-n as its own graph: generate n candidates (``Send`` fan-out), let the user's judge pick.

Input ``{"messages": [...]}`` generates ``n`` persona-injected candidates with the
configured generator (a LangChain chat model, or an ``LLMClient``), each with its
own seed; ``{"messages": [...], "given": ["answer 1", "answer 2", ...]}`` only ranks.
The judge is the user's personalized judge (``Judge.from_profile``: persona + demos),
or the default judge while the user has no persona. Run context (:class:`RerankContext`,
or ``configurable``): ``synth_user_id``, ``tenant_id`` (see :mod:`graphs.identity`), ``n``,
``strategy`` (``knockout`` | ``round_robin``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AnyMessage, BaseMessage
from langchain_core.runnables import RunnableConfig
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.graph.state import CompiledStateGraph
from langgraph.runtime import Runtime
from langgraph.store.base import BaseStore
from langgraph.types import Checkpointer, Send
from pydantic import Field
from typing_extensions import TypedDict

from graphs._common import (
    MemoryFactory,
    PersonaCache,
    append_or_reset,
    persona_message,
    text_of,
    to_context,
    with_persona,
)
from graphs.identity import IdentityContext, identity, run_values
from store.memory import PreferenceMemory
from synth_agent import prompts
from synth_agent.engine.judge import Judge
from synth_agent.engine.rerank import Strategy, rank
from synth_agent.engine.selection import served_persona
from synth_agent.llm.base import ChatBackend

__all__ = ["RerankContext", "RerankInput", "RerankOutput", "RerankState", "build_rerank_graph", "graph"]


class _Messages(TypedDict, total=False):
    messages: Annotated[list[AnyMessage], add_messages]


class RerankInput(_Messages, total=False):
    """The conversation to answer; ``given``: rank these answers instead of generating n."""

    given: list[str] | None


class RerankOutput(_Messages, total=False):
    """The best answer (also appended to ``messages``), its index, scores and the ranking."""

    candidates: Annotated[list[dict[str, Any]], append_or_reset]
    persona_version: int | None
    winner: int
    best: str
    scores: list[float]
    order: list[int]
    strategy: str
    personalized_judge: bool


class RerankState(RerankInput, RerankOutput, total=False):
    persona_prompt: str | None


class RerankContext(IdentityContext, total=False):
    """Per-run settings of the rerank graph (the LangGraph run ``context``, or ``configurable``)."""

    n: Annotated[int, Field(ge=1, description="Candidates to generate (ignored when `given` is passed).")]
    strategy: Annotated[Strategy, Field(description="How candidates are compared: knockout or round_robin.")]


class _GenTask(TypedDict):
    messages: list[AnyMessage]
    persona_prompt: str | None
    persona_version: int
    index: int


def _messages_for_backend(messages: list[BaseMessage]) -> list[dict[str, str]]:
    roles = {"human": "user", "ai": "assistant", "system": "system"}
    return [{"role": roles[m.type], "content": text_of(m)} for m in messages if m.type in roles]


def build_rerank_graph(
    generator: BaseChatModel | ChatBackend | None = None,
    *,
    llm: ChatBackend | None = None,
    store: BaseStore | None = None,
    memory_for: MemoryFactory | None = None,
    n: int = 4,
    strategy: Strategy = "knockout",
    temperature: float = 0.9,
    persona_ttl: float | None = 300.0,
    checkpointer: Checkpointer = None,
    name: str = "rerank",
) -> CompiledStateGraph[Any, Any, Any, Any]:
    """Compile the best-of-n graph.

    ``generator`` writes candidates (default: ``llm``); ``llm`` is the judge backend
    (default: from the environment, per run). ``store`` / ``memory_for`` give the
    personas, as in :func:`graphs.chat.personalize`.
    """
    if n < 1:
        raise ValueError("n must be at least 1")
    cache = PersonaCache(persona_ttl)

    @asynccontextmanager
    async def judge_llm() -> AsyncIterator[ChatBackend]:
        if llm is not None:
            yield llm
            return
        from synth_agent.config import Settings
        from synth_agent.services import open_llm

        client = open_llm(Settings())
        try:
            yield client
        finally:
            await client.aclose()

    def memory(tenant: str, run_store: BaseStore | None) -> PreferenceMemory:
        if memory_for is not None:
            return memory_for(tenant)
        if run_store is None:
            raise ValueError("the rerank graph needs a store: build_rerank_graph(store=...) or memory_for=")
        return PreferenceMemory(run_store, tenant)

    async def prepare(state: RerankState, config: RunnableConfig, runtime: Runtime[RerankContext]) -> dict[str, Any]:
        tenant, user = identity(config)
        to_context(state.get("messages", []))
        given = state.get("given")
        if given is not None and (not isinstance(given, list) or not given):
            raise ValueError("given must be a non-empty list of candidate answers")
        profile = await cache.get(memory(tenant, runtime.store), tenant, user)
        persona = served_persona(profile)  # the per-user guard
        return {
            "candidates": None,
            "persona_prompt": prompts.generation_system_prompt(persona) if persona is not None else None,
            "persona_version": profile.version if profile else None,
        }

    def fan_out(state: RerankState, config: RunnableConfig) -> list[Send] | str:
        if state.get("given"):
            return "rank"
        k = int(run_values(config).get("n") or n)
        if k < 1:
            raise ValueError("configurable n must be at least 1")
        return [
            Send(
                "generate",
                _GenTask(
                    messages=state["messages"],
                    persona_prompt=state.get("persona_prompt"),
                    persona_version=state.get("persona_version") or 0,
                    index=i,
                ),
            )
            for i in range(k)
        ]

    async def generate(task: _GenTask) -> dict[str, Any]:
        sys_msg = persona_message(task["persona_prompt"], task["persona_version"]) if task["persona_prompt"] else None
        msgs = with_persona(task["messages"], sys_msg)
        seed = task["index"]
        gen = generator if generator is not None else llm
        if gen is None:
            async with judge_llm() as backend:
                comp = await backend.complete(
                    _messages_for_backend(msgs), call_site="generate", temperature=temperature, seed=seed
                )
            text = comp.text
        elif isinstance(gen, BaseChatModel):
            answer = await (gen.bind(seed=seed) if seed else gen).ainvoke(msgs)
            text = text_of(answer)
        else:
            comp = await gen.complete(
                _messages_for_backend(msgs), call_site="generate", temperature=temperature, seed=seed
            )
            text = comp.text
        return {"candidates": [{"index": task["index"], "text": text}]}

    async def rank_node(state: RerankState, config: RunnableConfig, runtime: Runtime[RerankContext]) -> dict[str, Any]:
        tenant, user = identity(config)
        given = state.get("given")
        texts = list(given) if given else [c["text"] for c in sorted(state["candidates"], key=lambda c: c["index"])]
        profile = await cache.get(memory(tenant, runtime.store), tenant, user)
        how = run_values(config).get("strategy") or strategy
        async with judge_llm() as backend:
            judge = Judge.from_profile(backend, profile, call_site="rerank")
            result = await rank(judge, to_context(state["messages"]), texts, strategy=how)
        best = texts[result.winner]
        out: dict[str, Any] = {
            "winner": result.winner,
            "best": best,
            "scores": result.scores,
            "order": result.order,
            "strategy": result.strategy,
            "personalized_judge": judge.personalized,
            "given": None,
        }
        if given:
            out["candidates"] = [{"index": i, "text": t} for i, t in enumerate(texts)]
        out["messages"] = [AIMessage(content=best)]
        return out

    builder = StateGraph(
        RerankState, context_schema=RerankContext, input_schema=RerankInput, output_schema=RerankOutput
    )
    # langgraph's stubs type nodes as (state), (state, config) or (state, *, runtime); ours take
    # (state, config, runtime), which it supports at run time: hence the arg-type ignores
    # (an incremental mypy run reports the same mismatch as call-overload: both are ignored)
    builder.add_node("prepare", prepare)  # type: ignore[arg-type, call-overload]
    builder.add_node("generate", generate, input_schema=RerankState)  # type: ignore[arg-type, call-overload]  # keeps _GenTask's keys out of the state
    builder.add_node("rank", rank_node)  # type: ignore[arg-type, call-overload]
    builder.add_edge(START, "prepare")
    builder.add_conditional_edges("prepare", fan_out, ["generate", "rank"])
    builder.add_edge("generate", "rank")
    builder.add_edge("rank", END)
    return builder.compile(checkpointer=checkpointer, store=store, name=name)


graph = build_rerank_graph(persona_ttl=0)
"""For ``langgraph.json``: generator and judge from the environment, no caches (no per-user state)."""
