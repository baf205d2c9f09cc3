"""Chat middleware: wrap any LangGraph agent or LangChain chat model so it speaks to each user's persona.

Per turn the graph loads the user's current persona (a cached store read, never an
LLM call), injects it as a system message built by
:func:`synth_agent.prompts.generation_system_prompt` (replacing an earlier injected
one, never stacking; the user's own system messages stay), runs the wrapped agent
and returns its answer. Modes, chosen per call with ``configurable["mode"]``:

* ``plain`` — persona injection only: exactly the wrapped agent's LLM calls.
* ``ab`` — two candidates (with vs without persona once one exists, before that
  two seeds of the wrapped agent) and a vote token; the pending pair is stored
  under the tenant/user, so it survives restarts and only that user can redeem it,
  once (:meth:`Personalizer.submit_vote`, or invoke the graph with ``{"vote": ...}``).
  A vote notifies the :class:`~synth_agent.scheduler.SynthesisScheduler`.
* ``rerank`` — n persona-injected candidates (``Send`` fan-out), ranked by the
  user's personalized judge; the best one is returned, with scores.

Who the user is: see :mod:`graphs.identity` (the signed-in user under LangGraph auth,
else ``synth_user_id`` / ``tenant_id`` from the run context or ``configurable``). The store
comes from ``compile(store=...)`` and reaches the nodes through ``Runtime``. Input, output
and context schemas (:class:`ChatInput`, :class:`ChatOutput`, :class:`ChatContext`) are
declared, so LangGraph Studio renders forms for them; the fan-out channels stay private.

    >>> from graphs.chat import personalize  # doctest: +SKIP
    >>> app = personalize(ChatOpenAI(...), store=store)  # doctest: +SKIP
    >>> await app.ainvoke({"messages": [("user", "hi")]},
    ...                   context={"synth_user_id": "ana@example.com"})  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import random
import secrets
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, Protocol

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AnyMessage, BaseMessage
from langchain_core.runnables import Runnable, RunnableConfig
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.graph.state import CompiledStateGraph
from langgraph.runtime import Runtime
from langgraph.store.base import BaseStore, PutOp
from langgraph.types import Checkpointer, Send
from pydantic import Field
from typing_extensions import TypedDict

from graphs._common import (
    KeyedLocks,
    MemoryFactory,
    PersonaCache,
    TenantMemories,
    append_or_reset,
    final_answer,
    is_persona_message,
    persona_message,
    text_of,
    to_context,
    with_persona,
)
from graphs.identity import DEFAULT_TENANT, IdentityContext, identity, run_values
from store.memory import PreferenceMemory, user_namespace
from synth_agent import prompts
from synth_agent.engine.judge import Judge
from synth_agent.engine.rerank import Strategy, rank
from synth_agent.engine.selection import served_persona
from synth_agent.lift import DemotionPolicy, TenantLift, load_user_lift, record_ab_vote
from synth_agent.llm.base import ChatBackend
from synth_agent.models import Message, PersonaProfile, Vote
from synth_agent.scheduler import SynthesisScheduler

__all__ = [
    "BackgroundSynthesis",
    "ChatContext",
    "ChatInput",
    "ChatOutput",
    "ChatState",
    "Mode",
    "Personalizer",
    "TenantMemories",
    "VoteError",
    "VoteReceipt",
    "graph",
    "pending_namespace",
    "personalize",
    "submit_vote",
]

log = logging.getLogger("synth_agent.graphs.chat")

Mode = Literal["plain", "ab", "rerank"]
MODES: tuple[str, ...] = ("plain", "ab", "rerank")
VARIANT_KEY = "synth_agent_variant"
"""``configurable`` key a wrapped graph may read to vary its output between A/B or rerank candidates."""


class _Messages(TypedDict, total=False):
    messages: Annotated[list[AnyMessage], add_messages]


class VoteInput(TypedDict):
    """The user's pick for an open A/B pair."""

    token: Annotated[str, Field(description="The vote token returned in `ab.token`.")]
    choice: Annotated[Literal["a", "b"], Field(description="The answer the user preferred.")]


class ChatInput(_Messages, total=False):
    """A turn (``messages``), or an A/B vote (``vote``) for a pair an earlier ``ab`` turn returned."""

    vote: VoteInput | None


class ABPair(TypedDict, total=False):
    """Two candidate answers awaiting the user's vote."""

    a: str
    b: str
    personalized: Literal["a", "b"] | None
    """Which one had the persona (None while the user has no persona: two seeds of the plain agent)."""
    persona_version: int
    token: str | None
    """Redeem with ``{"vote": {"token", "choice"}}``; None when both answers were identical."""
    reason: str


class RerankResult(TypedDict):
    """Best of n: the winner's index, scores and ranking, and every candidate."""

    winner: int
    scores: list[float]
    order: list[int]
    strategy: str
    personalized_judge: bool
    candidates: list[dict[str, Any]]


class VoteResult(TypedDict, total=False):
    """Outcome of a vote: ``ok`` and the receipt, or ``ok`` False and ``error``."""

    ok: bool
    error: str
    vote_id: str
    choice: Literal["a", "b"]
    chose_personalized: bool | None
    persona_version: int
    synthesis: dict[str, Any]
    """Background synthesis (under the LangGraph server): scheduled or not, and why."""


class ChatOutput(_Messages, total=False):
    """The conversation, plus the A/B pair, best-of-n result or vote outcome of this turn."""

    mode: Mode
    persona_version: int | None
    ab: ABPair | None
    rerank: RerankResult | None
    vote_result: VoteResult | None


class ChatState(ChatInput, ChatOutput, total=False):
    """What a thread keeps: the public input and output, plus private fan-out channels."""

    candidates: Annotated[list[dict[str, Any]], append_or_reset]
    persona_prompt: str | None


class ChatContext(IdentityContext, total=False):
    """Per-run settings of the chat graph (the LangGraph run ``context``, or ``configurable``)."""

    mode: Annotated[
        Mode,
        Field(description="plain: persona injected into one answer; ab: two answers (with and without the "
                          "persona) and a vote token; rerank: n answers, the user's judge picks the best."),
    ]
    n: Annotated[int, Field(ge=1, description="Candidates generated in rerank mode.")]
    strategy: Annotated[Strategy, Field(description="How rerank compares candidates.")]


class GenerateTask(TypedDict):
    """What one ``Send`` to ``generate`` carries (not graph state: ``generate`` declares ChatState as input)."""

    messages: list[AnyMessage]
    system_prompt: str | None
    persona_version: int
    index: int
    variant: int
    personalized: bool


class BackgroundSynthesis(Protocol):
    """Told about each recorded vote; may schedule the user's synthesis somewhere else (never inline).

    :class:`graphs.server.ServerSynthesis` schedules a background run on the LangGraph server.
    Returns what it did (reported in ``vote_result["synthesis"]``), or None.
    """

    async def vote_recorded(
        self, tenant_id: str, user_id: str, memory: PreferenceMemory
    ) -> dict[str, Any] | None: ...


class VoteError(ValueError):
    """A vote could not be recorded (unknown, foreign, expired or already used token; bad choice)."""


@dataclass(frozen=True)
class VoteReceipt:
    """A recorded A/B vote. ``chose_personalized`` is None when neither candidate had the persona."""

    vote_id: str
    tenant_id: str
    user_id: str
    choice: Literal["a", "b"]
    chose_personalized: bool | None
    persona_version: int
    synthesis: dict[str, Any] | None = None
    """What the ``background`` hook did about this vote (e.g. scheduled a synthesis run)."""
    chosen_text: str = ""
    """The answer the user picked (the graph appends it to the thread's conversation)."""
    prompt: str = ""
    """The last user message of the voted pair's conversation."""

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ok": True, "vote_id": self.vote_id, "choice": self.choice,
            "chose_personalized": self.chose_personalized, "persona_version": self.persona_version,
        }
        if self.synthesis is not None:
            out["synthesis"] = self.synthesis
        return out


def _choice(choice: Any) -> Literal["a", "b"]:
    c = str(choice).strip().lower() if choice is not None else ""
    mapped = {"a": "a", "b": "b", "0": "a", "1": "b", "first": "a", "second": "b"}.get(c)
    if mapped is None:
        raise VoteError(f"choice must be 'a' or 'b' (or 0/1), got {choice!r}")
    return mapped  # type: ignore[return-value]


class Personalizer:
    """Builds and serves the personalized chat graph; holds the persona cache and the vote API.

    ``agent``: a compiled LangGraph graph with a ``messages`` state (e.g. a prebuilt
    ReAct agent) or a LangChain chat model. ``llm``: the judge backend for ``rerank``
    (an ``LLMClient``; from the environment when omitted). ``store``: the LangGraph
    store, passed to ``compile(store=...)``. ``memory_for``: tenant → ``PreferenceMemory``
    (default: one per tenant over the run's store). ``scheduler``: notified of votes;
    its saves refresh the persona cache. ``background``: told about each recorded vote
    (:class:`BackgroundSynthesis`; under the LangGraph server, :class:`graphs.server.ServerSynthesis`).
    ``max_open_votes``: A/B pairs kept open per user (the oldest go first; expired ones, older than
    ``vote_ttl``, are dropped too). The check lists the user's open pairs, so it runs on the first pair a
    user opens in this process and then on every ``prune_every``-th: up to ``max_open_votes + prune_every - 1``
    can be open between checks (per process), and an A/B request does not pay a listing of up to
    ``max_open_votes`` pairs each time. ``rng``: A/B presentation order and vote tokens (default: system randomness; pass a seeded
    ``random.Random`` only for reproducible tests).

    The per-user guard (:mod:`synth_agent.engine.selection`) decides what is served: the persona is
    injected only where the user's cross-validated selection chose a configuration with a persona,
    and reranking uses :meth:`Judge.from_profile <synth_agent.engine.judge.Judge.from_profile>`,
    which honours it. Every A/B vote between a personalized and a plain answer is a live-lift event
    (:mod:`synth_agent.lift`, counted once per token); ``demotion`` (None: never) demotes a persona
    version that keeps losing and requests a refit from the ``scheduler``. ``lift``: this process's
    per-tenant counts (for ``/metrics``).
    """

    def __init__(
        self,
        agent: Runnable[Any, Any],
        *,
        llm: ChatBackend | None = None,
        store: BaseStore | None = None,
        memory_for: MemoryFactory | None = None,
        scheduler: SynthesisScheduler | None = None,
        background: BackgroundSynthesis | None = None,
        checkpointer: Checkpointer = None,
        default_mode: Mode = "plain",
        n_candidates: int = 4,
        rank_strategy: Strategy = "knockout",
        persona_ttl: float | None = 300.0,
        ab_alternative: Runnable[Any, Any] | None = None,
        vote_ttl: float | None = 7 * 24 * 3600.0,
        max_open_votes: int = 100,
        prune_every: int = 8,
        rng: random.Random | None = None,
        demotion: DemotionPolicy | None = DemotionPolicy(),
        name: str = "personalized_agent",
    ) -> None:
        if default_mode not in MODES:
            raise ValueError(f"default_mode must be one of {MODES}, got {default_mode!r}")
        if n_candidates < 2:
            raise ValueError("n_candidates must be at least 2 (rerank picks the best of n)")
        if not isinstance(agent, Runnable):
            raise TypeError(
                f"personalize() wraps a compiled LangGraph graph or a LangChain chat model, got {type(agent).__name__}"
            )
        self.agent = agent
        self.llm = llm
        self.store = store
        self.scheduler = scheduler
        self.background = background
        self.default_mode: Mode = default_mode
        self.n_candidates = n_candidates
        self.rank_strategy: Strategy = rank_strategy
        self.ab_alternative = ab_alternative
        self.vote_ttl = vote_ttl
        if max_open_votes < 1:
            raise ValueError("max_open_votes must be at least 1")
        self.max_open_votes = max_open_votes
        if prune_every < 1:
            raise ValueError("prune_every must be at least 1")
        self.prune_every = prune_every
        self._openings: OrderedDict[tuple[str, str], int] = OrderedDict()
        """Pairs opened per (tenant, user) since the last check, for the 10,000 most recent users."""
        self._rng = rng or random.SystemRandom()
        self._seeded = rng is not None
        self.personas = PersonaCache(persona_ttl)
        self._memory_for = memory_for
        self._memories: dict[int, TenantMemories] = {}
        self._cache_memories = persona_ttl != 0
        self._vote_locks = KeyedLocks()
        self.demotion = demotion
        self.lift = TenantLift()
        if scheduler is not None:
            scheduler.add_listener(self.on_persona_saved)
        self.graph: CompiledStateGraph[Any, Any, Any, Any] = self._build(checkpointer, name)

    # ------------------------------------------------------------------ public API

    def on_persona_saved(self, tenant_id: str, user_id: str, profile: PersonaProfile) -> None:
        """Scheduler hook: the next turn uses ``profile`` without reading the store."""
        self.personas.put(tenant_id, user_id, profile)

    def invalidate(self, tenant_id: str, user_id: str | None = None) -> None:
        """Forget cached personas (after a persona was changed or deleted elsewhere), and what this
        process counted about the user's open A/B pairs."""
        self.personas.invalidate(tenant_id, user_id)
        if user_id is None:
            for k in [k for k in self._openings if k[0] == tenant_id]:
                del self._openings[k]
        else:
            self._openings.pop((tenant_id, user_id), None)

    def memory(self, tenant_id: str, store: BaseStore | None = None) -> PreferenceMemory:
        if self._memory_for is not None:
            return self._memory_for(tenant_id)
        store = store or self.store
        if store is None:
            raise ValueError("no store: pass personalize(..., store=...) or memory_for=")
        if not self._cache_memories:
            return PreferenceMemory(store, tenant_id)
        mems = self._memories.get(id(store))
        if mems is None:
            mems = self._memories[id(store)] = TenantMemories(store)
        return mems(tenant_id)

    async def persona(self, tenant_id: str, user_id: str, store: BaseStore | None = None) -> PersonaProfile | None:
        return await self.personas.get(self.memory(tenant_id, store), tenant_id, user_id)

    async def submit_vote(
        self,
        token: str,
        choice: Literal["a", "b"] | str | int,
        *,
        config: RunnableConfig | None = None,
        tenant_id: str | None = None,
        user_id: str | None = None,
        store: BaseStore | None = None,
    ) -> VoteReceipt:
        """Record the user's pick for the A/B pair behind ``token``; then notify the scheduler.

        The user comes from ``config`` (see :mod:`graphs.identity`) or ``tenant_id``/``user_id``. A
        token belongs to one tenant/user and is redeemed once; anything else raises :class:`VoteError`.
        """
        if config is not None:
            tenant_id, user_id = identity(config)
        if not user_id:
            raise ValueError("submit_vote needs the user: config={'configurable': {'synth_user_id': ...}} or user_id=")
        tenant_id = tenant_id or DEFAULT_TENANT
        picked = _choice(choice)
        if not isinstance(token, str) or not token:
            raise VoteError("vote token must be a non-empty string")
        memory = self.memory(tenant_id, store)
        ns = pending_namespace(tenant_id, user_id)
        async with self._vote_locks.hold((tenant_id, user_id)):
            item = await memory.store.aget(ns, token)
            if item is None:
                raise VoteError(
                    "unknown vote token for this user: it was already used, expired, or belongs to another user"
                )
            pending = item.value
            if self.vote_ttl is not None and _age(pending.get("created_at")) > self.vote_ttl:
                await memory.store.adelete(ns, token)
                raise VoteError("this vote token has expired")
            a, b = pending["a"], pending["b"]
            chosen, rejected = (a, b) if picked == "a" else (b, a)
            vote = Vote(
                id=f"ab-{token}",
                user_id=user_id,
                context=pending["context"],
                chosen=chosen,
                rejected=rejected,
                timestamp=datetime.now(UTC),
            )
            added = await memory.add_vote(vote)
            await memory.store.adelete(ns, token)
        if not added:
            raise VoteError("this vote was already recorded")
        if self.scheduler is not None:
            self.scheduler.notify_vote(tenant_id, user_id)
        synthesis = None
        if self.background is not None:
            try:
                synthesis = await self.background.vote_recorded(tenant_id, user_id, memory)
            except Exception as exc:  # the vote is stored; scheduling a fit must never undo or fail it
                log.warning("background synthesis hook failed for a vote of %r/%r: %s", tenant_id, user_id, exc)
                synthesis = {"scheduled": False, "error": str(exc)}
        side = pending.get("personalized")
        version = int(pending.get("persona_version") or 0)
        if side is not None and version:
            await self._live_lift(memory, tenant_id, user_id, token, version, side == picked)
        return VoteReceipt(
            vote_id=vote.id,
            tenant_id=tenant_id,
            user_id=user_id,
            choice=picked,
            chose_personalized=None if side is None else side == picked,
            persona_version=int(pending.get("persona_version") or 0),
            synthesis=synthesis,
            chosen_text=chosen,
            prompt=next((m["content"] for m in reversed(pending["context"]) if m.get("role") == "user"), ""),
        )

    async def _live_lift(
        self, memory: PreferenceMemory, tenant_id: str, user_id: str, token: str, version: int, won: bool
    ) -> None:
        """Count a personalized-vs-plain vote (once per token) and demote the version if it keeps losing."""
        try:
            if not await record_ab_vote(memory, user_id, token, version, won):
                return
            self.lift.add(tenant_id, won)
            if self.demotion is None:
                return
            win = (await load_user_lift(memory, user_id)).version(version)
            if not self.demotion.should_demote(win):
                return
            current = await memory.current_persona(user_id)
            if current is None or current.version != version or current.meta.get("demoted"):
                return
            lo, hi = win.interval(self.demotion.z)
            await memory.update_persona_meta(user_id, version, {"demoted": {
                "at": datetime.now(UTC).isoformat(), "wins": win.wins, "votes": win.n, "ci_low": lo, "ci_high": hi,
            }})  # fmt: skip
            self.lift.demoted(tenant_id)
            self.invalidate(tenant_id, user_id)
            log.warning("persona v%d of a user of tenant %r demoted: won %d of %d A/B votes", version, tenant_id,
                        win.wins, win.n)
            if self.scheduler is not None:
                self.scheduler.request_fit(tenant_id, user_id)
        except Exception:  # the vote is stored; live statistics must never fail it
            log.exception("could not update the live lift of a user of tenant %r", tenant_id)

    # ------------------------------------------------------------------ generation

    async def _generate(
        self, messages: list[BaseMessage], variant: int, personalized: bool
    ) -> list[BaseMessage]:
        """Run the wrapped agent once; returns the messages it added (the answer last)."""
        agent = self.agent
        if not personalized and variant and self.ab_alternative is not None:
            agent, variant = self.ab_alternative, 0
        if isinstance(agent, BaseChatModel):
            model = agent.bind(seed=variant) if variant else agent
            answer = await model.ainvoke(messages)
            return [answer]
        conf: RunnableConfig = {"configurable": {VARIANT_KEY: variant}} if variant else {}
        out = await agent.ainvoke({"messages": messages}, conf)
        produced = out.get("messages", []) if isinstance(out, dict) else [out]
        seen = {m.id for m in messages if m.id}
        new = [m for m in produced if not (m.id and m.id in seen) and not is_persona_message(m)]
        return new or [final_answer(produced)]

    @asynccontextmanager
    async def _judge_llm(self) -> AsyncIterator[ChatBackend]:
        if self.llm is not None:
            yield self.llm
            return
        from synth_agent.config import Settings
        from synth_agent.services import open_llm

        client = open_llm(Settings())
        try:
            yield client
        finally:
            await client.aclose()

    # ------------------------------------------------------------------ graph

    def _build(self, checkpointer: Checkpointer, name: str) -> CompiledStateGraph[Any, Any, Any, Any]:
        def route(state: ChatState, config: RunnableConfig) -> str:
            if state.get("vote"):
                return "record_vote"
            mode = run_values(config).get("mode") or self.default_mode
            if mode not in MODES:
                raise ValueError(f"configurable mode must be one of {MODES}, got {mode!r}")
            return "respond" if mode == "plain" else "prepare"

        async def respond(state: ChatState, config: RunnableConfig, runtime: Runtime[ChatContext]) -> dict[str, Any]:
            # Plain mode in one node: one store read at most (cached), the wrapped agent's calls, nothing else.
            tenant, user = identity(config)
            messages = state.get("messages", [])
            if not any(m.type == "human" for m in messages):
                raise ValueError("the conversation has no user message to answer")
            profile = await self.persona(tenant, user, runtime.store)
            persona = served_persona(profile)  # the guard: no persona where it was not shown to help
            sys_msg = (
                persona_message(prompts.generation_system_prompt(persona), profile.version)
                if persona is not None and profile is not None
                else None
            )
            new = await self._generate(with_persona(messages, sys_msg), 0, True)
            final_answer(new)
            out: dict[str, Any] = {"messages": new, "persona_version": profile.version if profile else None}
            if state.get("mode") != "plain":
                out["mode"] = "plain"
            for stale in ("ab", "rerank", "vote_result"):  # left by an earlier turn on this thread
                if state.get(stale) is not None:
                    out[stale] = None
            if state.get("candidates"):
                out["candidates"] = None
            return out

        async def record_vote(state: ChatState, config: RunnableConfig, runtime: Runtime[ChatContext]) -> dict[str, Any]:
            vote: dict[str, Any] = dict(state.get("vote") or {})
            try:
                receipt = await self.submit_vote(
                    vote.get("token", ""), vote.get("choice", ""), config=config, store=runtime.store
                )
            except VoteError as exc:
                return {"vote": None, "vote_result": {"ok": False, "error": str(exc)}}
            out: dict[str, Any] = {"vote": None, "vote_result": receipt.as_dict()}
            messages = state.get("messages") or []
            if messages and messages[-1].type == "human" and text_of(messages[-1]) == receipt.prompt:
                # a thread's conversation continues with the answer the user picked
                out["messages"] = [AIMessage(content=receipt.chosen_text)]
            return out

        async def prepare(state: ChatState, config: RunnableConfig, runtime: Runtime[ChatContext]) -> dict[str, Any]:
            tenant, user = identity(config)
            mode = run_values(config).get("mode") or self.default_mode
            to_context(state.get("messages", []))  # fail fast: nothing to answer
            profile = await self.persona(tenant, user, runtime.store)
            persona = served_persona(profile)
            return {
                "mode": mode,
                "persona_version": profile.version if profile else None,
                "persona_prompt": prompts.generation_system_prompt(persona) if persona is not None else None,
                "candidates": None,
                "ab": None,
                "rerank": None,
                "vote_result": None,
            }

        def fan_out(state: ChatState, config: RunnableConfig) -> list[Send]:
            tasks = self._tasks(
                state["mode"], state["messages"], state.get("persona_prompt"), state.get("persona_version") or 0, config
            )
            return [Send("generate", t) for t in tasks]

        async def generate(task: GenerateTask) -> dict[str, Any]:
            sys_msg = (
                persona_message(task["system_prompt"], task["persona_version"])
                if task["personalized"] and task["system_prompt"]
                else None
            )
            new = await self._generate(with_persona(task["messages"], sys_msg), task["variant"], task["personalized"])
            answer = final_answer(new)
            return {
                "candidates": [
                    {
                        "index": task["index"],
                        "text": text_of(answer),
                        "personalized": bool(sys_msg),
                        "variant": task["variant"],
                        "messages": new,
                    }
                ]
            }

        async def finalize(state: ChatState, config: RunnableConfig, runtime: Runtime[ChatContext]) -> dict[str, Any]:
            tenant, user = identity(config)
            cands = sorted(state.get("candidates", []), key=lambda c: c["index"])
            mode = state["mode"]
            public = [{k: v for k, v in c.items() if k != "messages"} for c in cands]
            context = to_context(state["messages"])
            if mode == "ab":
                ab = await self.open_vote(tenant, user, context, cands, state.get("persona_version"), runtime.store)
                return {"ab": ab, "candidates": None}
            profile = await self.persona(tenant, user, runtime.store)
            strategy = run_values(config).get("strategy") or self.rank_strategy
            async with self._judge_llm() as llm:
                judge = Judge.from_profile(llm, profile, call_site="rerank")
                result = await rank(judge, context, [c["text"] for c in cands], strategy=strategy)
            best = cands[result.winner]
            info = {
                "winner": result.winner,
                "scores": result.scores,
                "order": result.order,
                "strategy": result.strategy,
                "personalized_judge": judge.personalized,
                "candidates": public,
            }
            return {"messages": best["messages"], "rerank": info}

        builder = StateGraph(
            ChatState, context_schema=ChatContext, input_schema=ChatInput, output_schema=ChatOutput
        )
        # langgraph's stubs type nodes as (state), (state, config) or (state, *, runtime); ours take
        # (state, config, runtime), which it supports at run time: hence the arg-type ignores
        # (an incremental mypy run reports the same mismatch as call-overload: both are ignored)
        builder.add_node("record_vote", record_vote)  # type: ignore[arg-type, call-overload]
        builder.add_node("respond", respond)  # type: ignore[arg-type, call-overload]
        builder.add_node("prepare", prepare)  # type: ignore[arg-type, call-overload]
        # Declared input ChatState: otherwise LangGraph turns GenerateTask's keys into state channels
        # (and Studio shows them); a Send hands the task to the node as is.
        builder.add_node("generate", generate, input_schema=ChatState)  # type: ignore[arg-type, call-overload]
        builder.add_node("finalize", finalize)  # type: ignore[arg-type, call-overload]
        builder.add_conditional_edges(START, route, ["record_vote", "respond", "prepare"])
        builder.add_edge("record_vote", END)
        builder.add_edge("respond", END)
        builder.add_conditional_edges("prepare", fan_out, ["generate"])
        builder.add_edge("generate", "finalize")
        builder.add_edge("finalize", END)
        return builder.compile(checkpointer=checkpointer, store=self.store, name=name)

    def _tasks(
        self, mode: str, messages: list[AnyMessage], system: str | None, version: int, config: RunnableConfig
    ) -> list[GenerateTask]:
        def task(index: int, variant: int, personalized: bool) -> GenerateTask:
            return GenerateTask(
                messages=messages, system_prompt=system, persona_version=version,
                index=index, variant=variant, personalized=personalized and system is not None,
            )

        if mode == "ab":
            if system is not None:
                return [task(0, 0, True), task(1, 0, False)]
            return [task(0, 0, False), task(1, 1, False)]
        n = int(run_values(config).get("n") or self.n_candidates)
        if n < 1:
            raise ValueError("configurable n (rerank candidates) must be at least 1")
        return [task(i, i, True) for i in range(n)]

    async def open_vote(
        self,
        tenant: str,
        user: str,
        context: list[Message],
        cands: list[dict[str, Any]],
        version: int | None,
        store: BaseStore | None,
    ) -> dict[str, Any]:
        """Store an A/B pair awaiting the user's vote and return its public view with the vote token.

        Shared by the chat graph's A/B mode and the proxy's ``/v1/ab``: the pair is kept under the
        user's namespace, so only that tenant/user can redeem it, once.
        """
        first, second = cands[0], cands[1]
        if self._rng.random() < 0.5:  # random presentation order: the user's position bias must not look like taste
            first, second = second, first
        personalized = "a" if first["personalized"] else "b" if second["personalized"] else None
        public = {
            "a": first["text"], "b": second["text"], "personalized": personalized, "persona_version": version or 0,
        }
        if first["text"].strip() == second["text"].strip():
            return {**public, "token": None, "reason": "both candidates are identical; nothing to vote on"}
        # A token only works for its own tenant/user (it is looked up in their namespace); a seeded rng
        # makes tokens, and so vote ids, reproducible for tests: never share a seed between instances.
        token = f"{self._rng.getrandbits(128):032x}" if self._seeded else secrets.token_urlsafe(18)
        memory = self.memory(tenant, store)
        value = {
            **public,
            "context": [m.model_dump() for m in context],
            "created_at": datetime.now(UTC).isoformat(),
        }
        ns = pending_namespace(tenant, user)
        await memory.store.aput(ns, token, value, index=False)
        if self._due_for_pruning(tenant, user):
            await self._prune_open_votes(memory.store, ns, keep=token)
        return {**public, "token": token}

    def _due_for_pruning(self, tenant: str, user: str) -> bool:
        """Whether this opening checks the user's open pairs: the first in this process, then every
        ``prune_every``-th (listing them costs ~36 ms of CPU at 100 open pairs, `bench/ab_prune.py`)."""
        key = (tenant, user)
        seen = self._openings.pop(key, None)
        self._openings[key] = 0 if seen is None else (seen + 1) % self.prune_every
        while len(self._openings) > 10_000:
            self._openings.popitem(last=False)
        return self._openings[key] == 0

    async def _prune_open_votes(self, store: BaseStore, ns: tuple[str, ...], keep: str) -> None:
        """Drop the user's expired A/B pairs, and the oldest past ``max_open_votes``.

        A pair nobody votes on was otherwise kept until its user was forgotten (expiry was only
        checked when a token was redeemed), so a server's stored data grew with every A/B request.
        """
        items: list[Any] = []
        while True:
            page = await store.asearch(ns, limit=500, offset=len(items))
            items += page
            if len(page) < 500:
                break
        if len(items) <= 1:
            return
        fresh: list[Any] = []
        stale: list[Any] = []
        for it in items:
            expired = self.vote_ttl is not None and _age(it.value.get("created_at")) > self.vote_ttl
            (stale if expired and it.key != keep else fresh).append(it)
        fresh.sort(key=lambda it: (it.key == keep, str(it.value.get("created_at") or "")), reverse=True)
        drop = stale + fresh[self.max_open_votes:]
        if drop:
            await store.abatch([PutOp(ns, it.key, None) for it in drop])  # one write for all of them


def pending_namespace(tenant_id: str, user_id: str) -> tuple[str, ...]:
    """Where open A/B pairs wait for their vote (next to the user's votes in PreferenceMemory's layout)."""
    return user_namespace(tenant_id, user_id, "pending_votes")


def _age(created_at: Any) -> float:
    try:
        return (datetime.now(UTC) - datetime.fromisoformat(str(created_at))).total_seconds()
    except (TypeError, ValueError):
        return 0.0


def personalize(agent: Runnable[Any, Any], **kwargs: Any) -> CompiledStateGraph[Any, Any, Any, Any]:
    """Wrap ``agent`` (compiled graph or chat model) in the personalization graph; see :class:`Personalizer`.

    Record A/B votes by invoking the returned graph with ``{"vote": {"token": ..., "choice": "a"}}``
    (or :func:`submit_vote`), or build a :class:`Personalizer` to call ``submit_vote`` directly.
    """
    return Personalizer(agent, **kwargs).graph


async def submit_vote(
    graph: CompiledStateGraph[Any, Any, Any, Any], token: str, choice: str, config: RunnableConfig
) -> dict[str, Any]:
    """Record a vote through a personalized graph; returns ``vote_result`` (``ok`` False with ``error`` if refused)."""
    out = await graph.ainvoke({"vote": {"token": token, "choice": choice}}, config)
    return out["vote_result"]


def _studio_graph() -> CompiledStateGraph[Any, Any, Any, Any]:
    """For langgraph.json: a chat model from the environment, no caches (no per-user state at module level);
    votes schedule background synthesis runs on the LangGraph server (:class:`graphs.server.ServerSynthesis`)."""
    from langchain_openai import ChatOpenAI

    from graphs.server import ServerSynthesis
    from synth_agent.config import Settings

    s = Settings()
    return personalize(
        ChatOpenAI(model=s.model, base_url=s.base_url, api_key=s.api_key),  # type: ignore[arg-type]
        persona_ttl=0,
        background=ServerSynthesis(),
        name="chat",
    )


graph = _studio_graph()

