"""The synthesis graph: load_votes → bootstrap → persona → select → demos → save, one node per step.

``select`` runs before ``demos``: with ``FitConfig(race_demos="served")`` step 3 races demo sets only where the
guard serves persona + demos; for the other users ``demos`` keeps an unraced set and asks nothing.

A user who only added a few votes since a fit with the same configuration goes load_votes → refit instead: the
engine's incremental refit judges the new votes alone and saves, or (the new votes show the persona stale) hands
over to bootstrap for a full fit.

Each node calls the matching :class:`~synth_agent.engine.synthesize.Synthesizer`
step (``select``: cross-validated choice of the served configuration and the per-user guard,
:mod:`synth_agent.engine.selection`; it judges through the user's judgment ledger) and returns JSON-ready state (votes, traces and demos as dicts), so any
checkpointer can persist it. With a checkpointer a crashed run resumes from the
last finished node: rerunning thread ``synth:{tenant}:{user}:{run_id}`` does not
pay again for finished LLM work. :class:`SynthesisRunner` picks the thread (one
per persona version to be produced, ``run_id = "v<N>"``), so resuming needs no
bookkeeping beyond the checkpointer itself.

A run saves a new persona version only when it has something new to learn from: the
engine's own rule (:meth:`Synthesizer.plan <synth_agent.engine.synthesize.Synthesizer.plan>`:
the current persona was fitted on exactly this split with the same budgets, model and
prompts) ends it after ``load_votes`` without an LLM call and saves nothing, unless the
input says ``force``. The split is the engine's too: incremental, so a refit keeps earlier
validation votes on their side and the judgment ledger (loaded and saved by the nodes that
judge) serves every judgment made before. Background runs (``due_only``) fit only when the refit policy says a fit is
due. ``save`` writes at most once per run: each fresh run gets a ``fit_id``, kept in
the checkpoint and in the saved profile's meta, so a resumed run that crashed after
saving does not save twice while a later run on the same thread (Studio reuses
threads) saves its own new version.

``graph`` (module level, no checkpointer) is what ``langgraph.json`` loads; LangGraph
Studio / ``langgraph dev`` supply their own checkpointer and store. It reads the
LLM endpoint from the environment (``OPENAI_BASE_URL`` ...) per node and holds no
per-user state. Code builds its own with :func:`build_synthesis_graph`.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import fields, replace
from typing import Annotated, Any, Literal

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.runtime import Runtime
from langgraph.store.base import BaseStore
from langgraph.types import Checkpointer, Durability
from pydantic import Field
from typing_extensions import TypedDict

from graphs._common import MemoryFactory, erase_threads, open_checkpointer
from graphs.identity import IdentityContext, IdentityMissing, resolve_identity, run_values
from store.memory import PreferenceMemory
from synth_agent.engine.ledger import JudgmentLedger
from synth_agent.engine.selection import Selection, tenant_prior
from synth_agent.engine.synthesize import CountingBackend, FitConfig, Synthesizer, selection_meta
from synth_agent.llm.base import ChatBackend
from synth_agent.models import Demo, PersonaProfile, Trace, Vote, validate_user_id
from synth_agent.scheduler import SynthesisPolicy

__all__ = [
    "NODES",
    "SynthesisContext",
    "SynthesisInput",
    "SynthesisOutput",
    "SynthesisRunner",
    "SynthesisState",
    "build_synthesis_graph",
    "erase_synthesis_checkpoints",
    "graph",
    "open_checkpointer",
    "synthesis_thread_id",
]

log = logging.getLogger("synth_agent.graphs.synthesis")

NODES = ("load_votes", "refit", "bootstrap", "persona", "select", "demos", "save")
"""Every node; a run visits ``refit`` (then ends) or the full-fit path ``bootstrap`` … ``save``, or both when
the incremental refit finds the persona stale."""

NodeEvent = Callable[[str, Literal["start", "end"], dict[str, Any]], Any]
"""``on_event(node, phase, info)``: observability hook (node-entry logs, progress, tests)."""

LLMProvider = Callable[[], Any]
"""Returns an async context manager yielding a :class:`ChatBackend` for one node."""


Status = Literal["loaded", "not_enough_votes", "unchanged", "not_due", "fitted"]


class SynthesisInput(TypedDict, total=False):
    """Whom to fit, and whether to fit even without new votes.

    The user may also come from the run context (``synth_user_id``); under LangGraph auth it is
    the signed-in user and an input ``user_id`` must match it.
    """

    user_id: Annotated[str, Field(description="The user to fit (or context synth_user_id; auth: the signed-in user).")]
    tenant_id: Annotated[str, Field(description="The user's tenant; default 'default'.")]
    run_id: Annotated[str, Field(description="A label stored with the persona (SynthesisRunner uses v<N>).")]
    force: Annotated[bool, Field(description="Fit even when the current persona already used every vote.")]
    due_only: Annotated[
        bool, Field(description="Fit only when the refit policy says a fit is due (background runs).")
    ]


class SynthesisOutput(TypedDict, total=False):
    """What the run did (``status``, ``message``) and the persona it saved or found (``profile``)."""

    tenant_id: str
    user_id: str
    run_id: str
    status: Status
    message: str
    n_votes: int
    persona: str
    bootstrap_accuracy: float
    val_accuracy: float | None
    """Step 3's validation accuracy; None when the demos were not raced (the guard serves none)."""
    profile: dict[str, Any] | None
    usage: dict[str, dict[str, int]]


class SynthesisState(SynthesisInput, SynthesisOutput, total=False):
    """Everything here is plain JSON: votes, traces and demos are stored as dicts. Private channels
    (``votes`` ... ``fit_id``) are the work in progress, checkpointed so a crashed run resumes."""

    fit_id: str
    fit_key: str
    votes: list[dict[str, Any]]
    train_ids: list[str]
    val_ids: list[str]
    traces: list[dict[str, Any]]
    persona_trace_ids: list[str]
    bootstrap_demos: list[dict[str, Any]]
    reused_traces: int
    demos: list[dict[str, Any]]
    demos_status: str
    """"selected" (step 3 raced them) or "unraced" (the guard serves no demos; FitConfig(race_demos="served"))."""
    selection: dict[str, Any] | None
    new_ids: list[str]
    base_version: int
    """The persona version that was current when ``load_votes`` ran (0: none): a version saved after it
    by another run of the same fit is not saved again."""


class SynthesisContext(IdentityContext, total=False):
    """Per-run settings of the synthesis graph (the LangGraph run ``context``, or ``configurable``)."""

    fit_config: Annotated[
        dict[str, Any],
        Field(description="Overrides of FitConfig fields for this run, e.g. {\"n_trials\": 4, \"n_demo_candidates\": 4}."),
    ]


def synthesis_thread_id(tenant_id: str, user_id: str, run_id: str) -> str:
    return f"synth:{tenant_id}:{user_id}:{run_id}"


async def erase_synthesis_checkpoints(
    checkpointer: BaseCheckpointSaver[Any], tenant_id: str, user_id: str, versions: int = 0
) -> list[str]:
    """Erase every synthesis checkpoint thread of one user (they hold the user's votes in the clear).

    Threads ``v1 … v<versions+1>`` (every version fitted, plus one pending), and with the SQLite
    checkpointer every other ``synth:<tenant>:<user>:<run>`` thread it holds (so a forget that
    is retried after a failure still finds versions whose personas are already gone). Returns
    once the deletion is on disk (:func:`graphs._common.erase_threads`). Returns the thread ids.
    """
    if checkpointer is None or not hasattr(checkpointer, "adelete_thread"):
        return []
    threads = [synthesis_thread_id(tenant_id, user_id, f"v{v}") for v in range(1, versions + 2)]
    conn = getattr(checkpointer, "conn", None)
    if conn is not None and hasattr(conn, "execute") and hasattr(checkpointer, "lock"):
        prefix = synthesis_thread_id(tenant_id, user_id, "")
        async with checkpointer.lock, conn.execute(
            "SELECT DISTINCT thread_id FROM checkpoints WHERE substr(thread_id, 1, ?) = ?", (len(prefix), prefix)
        ) as cur:
            found = [row[0] async for row in cur]
        # run ids never contain ":"; a longer remainder is another user whose id starts with this one's
        threads += [t for t in found if ":" not in t[len(prefix):] and t not in threads]
    await erase_threads(checkpointer, threads)
    return threads


_FIT_FIELDS = {f.name for f in fields(FitConfig)}


class _Deps:
    """What the nodes need that cannot live in state: the LLM, the tenant memories, the fit budget."""

    def __init__(
        self,
        llm: ChatBackend | LLMProvider | None,
        memory_for: MemoryFactory | None,
        fit_config: FitConfig | None,
        on_event: NodeEvent | None,
    ) -> None:
        self._llm = llm
        self.memory_for = memory_for
        self.fit_config = fit_config or FitConfig()
        self.on_event = on_event

    @asynccontextmanager
    async def llm(self) -> AsyncIterator[ChatBackend]:
        if self._llm is None:
            # Studio / langgraph dev: a client from the environment per node, closed after it,
            # so the module-level graph keeps no connections or cached answers between runs.
            from synth_agent.config import Settings
            from synth_agent.services import open_llm

            client = open_llm(Settings())
            try:
                yield client
            finally:
                await client.aclose()
        elif callable(self._llm) and not hasattr(self._llm, "complete"):
            async with self._llm() as client:
                yield client
        else:
            yield self._llm  # type: ignore[misc]

    def memory(self, tenant: str, store: BaseStore | None) -> PreferenceMemory:
        if self.memory_for is not None:
            return self.memory_for(tenant)
        if store is None:
            raise ValueError(
                "the synthesis graph needs a store: compile(store=...) / build_synthesis_graph(store=...), "
                "or pass memory_for="
            )
        return PreferenceMemory(store, tenant)

    def config(self, config: RunnableConfig | None) -> FitConfig:
        over = run_values(config).get("fit_config")
        if not over:
            return self.fit_config
        if isinstance(over, FitConfig):
            return over
        if not isinstance(over, dict) or set(over) - _FIT_FIELDS:
            raise ValueError(f"configurable fit_config must be a FitConfig or a dict of {sorted(_FIT_FIELDS)}")
        return replace(self.fit_config, **over)


def _who(state: SynthesisState, config: RunnableConfig | None) -> tuple[str, str]:
    """The run's user: LangGraph auth's signed-in user, else the context, else the input (see graphs.identity)."""
    try:
        who = resolve_identity(config, user_id=state.get("user_id"), tenant_id=state.get("tenant_id"))
    except IdentityMissing as exc:
        raise IdentityMissing(f"the synthesis graph needs a user: {exc}") from exc
    assert who is not None
    return who.tenant_id, who.user_id


def _votes(state: SynthesisState) -> tuple[list[Vote], list[Vote]]:
    by_id = {v["id"]: Vote.model_validate(v) for v in state.get("votes", [])}
    return [by_id[i] for i in state.get("train_ids", [])], [by_id[i] for i in state.get("val_ids", [])]


def _traces(state: SynthesisState) -> list[Trace]:
    return [Trace.model_validate(t) for t in state.get("traces", [])]


def _usage(state: SynthesisState, node: str, llm: CountingBackend) -> dict[str, dict[str, int]]:
    return {**state.get("usage", {}), node: llm.usage()}


def build_synthesis_graph(
    *,
    llm: ChatBackend | LLMProvider | None = None,
    memory_for: MemoryFactory | None = None,
    fit_config: FitConfig | None = None,
    checkpointer: Checkpointer = None,
    store: BaseStore | None = None,
    on_event: NodeEvent | None = None,
    policy: SynthesisPolicy | None = None,
    name: str = "synthesis",
) -> CompiledStateGraph[Any, Any, Any, Any]:
    """Compile the synthesis graph.

    ``llm``: the judge/persona backend (an ``LLMClient``), or a zero-argument callable
    returning an async context manager of one; default: from the environment per node.
    ``memory_for(tenant)``: the tenant's ``PreferenceMemory`` (use :class:`graphs.chat.TenantMemories`
    so there is one per tenant); default: one over the graph's store per node.
    ``fit_config``: budgets; a run can override fields via ``configurable["fit_config"]``.
    ``checkpointer``: makes runs resumable (see :func:`open_checkpointer`).
    ``policy``: when a ``due_only`` (background) run fits; default :class:`SynthesisPolicy()`.
    """
    deps = _Deps(llm, memory_for, fit_config, on_event)
    refit = policy or SynthesisPolicy()

    def node(name: str, fn: Callable[..., Awaitable[dict[str, Any]]]) -> Callable[..., Awaitable[dict[str, Any]]]:
        async def run(state: SynthesisState, config: RunnableConfig, runtime: Runtime) -> dict[str, Any]:
            info = {"tenant_id": state.get("tenant_id"), "user_id": state.get("user_id"), "run_id": state.get("run_id")}
            if deps.on_event:
                deps.on_event(name, "start", info)
            log.debug("synthesis node %s start %s", name, info)
            out = await fn(state, config, runtime)
            if deps.on_event:
                deps.on_event(name, "end", info)
            return out

        run.__name__ = name
        return run

    async def load_votes(state: SynthesisState, config: RunnableConfig, runtime: Runtime) -> dict[str, Any]:
        tenant, user = _who(state, config)
        cfg = deps.config(config)
        memory = deps.memory(tenant, runtime.store)
        votes = await memory.list_votes(user)
        current = await memory.current_persona(user)
        async with deps.llm() as backend:  # the engine's rule: one place for the split and "nothing new"
            plan = Synthesizer(backend, None, cfg).plan(votes, current, force=bool(state.get("force")))
        train, val = plan.train, plan.val
        n = plan.n_context
        fresh: dict[str, Any] = {
            "tenant_id": tenant, "user_id": user, "run_id": state.get("run_id", ""),
            "force": False, "due_only": False,  # inputs, consumed: a later run on this thread starts clean
            "fit_id": uuid.uuid4().hex, "fit_key": plan.key, "n_votes": n,
            "votes": [v.model_dump(mode="json") for v in (*train, *val)],
            "train_ids": [v.id for v in train], "val_ids": [v.id for v in val],
            "traces": [], "persona_trace_ids": [], "bootstrap_demos": [], "bootstrap_accuracy": 0.0,
            "reused_traces": 0, "persona": "", "demos": [], "demos_status": "selected", "val_accuracy": 0.0,
            "profile": None, "usage": {},
            "selection": None, "new_ids": [v.id for v in plan.new],
            "base_version": current.version if current is not None else 0,
        }
        kept = {"profile": current.model_dump(mode="json")} if current is not None else {}
        if plan.status == "not_enough_votes":
            return {
                **fresh, "status": "not_enough_votes",
                "message": f"{user!r} has {n} context vote(s); a persona needs at least {cfg.min_votes}",
            }
        if plan.status == "unchanged":
            assert current is not None
            return {
                **fresh, **kept, "status": "unchanged", "persona": current.persona,
                "message": f"persona v{current.version} already uses all {n} votes of {user!r}: nothing saved "
                           "(input force=true refits anyway)",
            }
        fitted_on = len(current.vote_ids) if current is not None else None
        if state.get("due_only") and not refit.should_fit(len(votes), fitted_on):
            return {
                **fresh, **kept, "status": "not_due",
                "message": f"no fit due for {user!r}: {len(votes)} votes, next fit at "
                           f"{refit.next_threshold(fitted_on)}",
            }
        return {**fresh, "status": "loaded", "message": f"{n} votes ({len(train)} train, {len(val)} validation)"}

    def after_load(state: SynthesisState) -> str:
        if state.get("status") != "loaded":
            return END
        return "refit" if state.get("new_ids") else "bootstrap"

    async def refit_node(state: SynthesisState, config: RunnableConfig, runtime: Runtime) -> dict[str, Any]:
        """The engine's incremental refit (:meth:`Synthesizer.update`): judge the new votes only and save, or hand
        over to the full fit when they show the persona stale."""
        tenant, user = _who(state, config)
        cfg = deps.config(config)
        train, val = _votes(state)
        memory = deps.memory(tenant, runtime.store)
        fit_id = state.get("fit_id")
        current = await memory.current_persona(user)
        if fit_id and current is not None and current.meta.get("fit_id") == fit_id:  # saved, then crashed
            return {"status": "fitted", "profile": current.model_dump(mode="json"),
                    "message": f"persona v{current.version} for {user!r} (incremental refit)"}  # fmt: skip
        async with deps.llm() as backend:
            llm = CountingBackend(backend)
            synth = Synthesizer(backend, memory, cfg)
            plan = synth.plan([*train, *val], current)
            if plan.status != "fit" or not plan.new:
                return {"new_ids": []}  # the current persona changed since load_votes: fit in full
            ledger = await JudgmentLedger.load(memory, user, backend.model)
            prior = await tenant_prior(memory, user, cfg.selection)
            sel = await synth.update(user, plan, llm=llm, ledger=ledger, prior=prior)
            raced = await synth.refit_demos(user, plan, sel, llm=llm, ledger=ledger) if sel is not None else None
            await ledger.save(memory, user, backend.model, keep_unused=True)
            usage = _usage(state, "refit", llm)
            if sel is None:
                return {"new_ids": [], "usage": usage}  # stale: the full fit follows (traces and judgments kept)
            profile = synth.updated_profile(plan, sel, _total_usage(usage), raced)
        thread = (config.get("configurable") or {}).get("thread_id")
        profile.meta.update(synthesis_thread=thread, run_id=state.get("run_id", ""), fit_id=fit_id)
        saved = await memory.save_persona(profile, since=state.get("base_version"))
        if saved.meta.get("fit_id") != fit_id:
            return _saved_by_another_run(saved, user, usage)
        return {
            "status": "fitted", "profile": saved.model_dump(mode="json"), "persona": saved.persona,
            "selection": saved.meta.get("selection"), "usage": usage,
            "message": f"persona v{saved.version} for {user!r}: v{current.version if current else 0}'s persona and "
                       f"demos kept, {len(plan.new)} new vote(s) judged",
        }  # fmt: skip

    def after_refit(state: SynthesisState) -> str:
        return END if state.get("status") == "fitted" else "bootstrap"

    async def bootstrap(state: SynthesisState, config: RunnableConfig, runtime: Runtime) -> dict[str, Any]:
        tenant, user = _who(state, config)
        train, val = _votes(state)
        memory = deps.memory(tenant, runtime.store)
        async with deps.llm() as backend:
            llm = CountingBackend(backend)
            synth = Synthesizer(backend, memory, deps.config(config))
            ledger = await JudgmentLedger.load(memory, user, backend.model)
            out = await synth.bootstrap(user, train, val, llm=llm, ledger=ledger)
            await ledger.save(memory, user, backend.model)  # the run's first judging node prunes the ledger
        return {
            "traces": [t.model_dump(mode="json") for t in out.traces],
            "persona_trace_ids": out.persona_trace_ids,
            "bootstrap_demos": [d.model_dump(mode="json") for d in out.demos],
            "bootstrap_accuracy": out.accuracy,
            "reused_traces": out.reused_traces,
            "usage": _usage(state, "bootstrap", llm),
        }

    async def persona(state: SynthesisState, config: RunnableConfig, runtime: Runtime) -> dict[str, Any]:
        train, val = _votes(state)
        async with deps.llm() as backend:
            llm = CountingBackend(backend)
            synth = Synthesizer(backend, None, deps.config(config))
            text = await synth.write_persona([*train, *val], _traces(state), state.get("persona_trace_ids", []),
                                             llm=llm)  # fmt: skip
        return {"persona": text, "usage": _usage(state, "persona", llm)}

    async def demos(state: SynthesisState, config: RunnableConfig, runtime: Runtime) -> dict[str, Any]:
        tenant, user = _who(state, config)
        train, val = _votes(state)
        seed = [Demo.model_validate(d) for d in state.get("bootstrap_demos", [])]
        memory = deps.memory(tenant, runtime.store)
        cfg = deps.config(config)
        async with deps.llm() as backend:
            llm = CountingBackend(backend)
            synth = Synthesizer(backend, None, cfg)
            if not synth.races_demos(Selection.from_meta(sel) if (sel := state.get("selection")) else None):
                # the guard serves no demos: cross-validation's recipe on all train votes, unraced (a refit that
                # serves them races then)
                kept = synth.unraced_demos(user, train, val, _traces(state))
                return {"demos": [d.model_dump(mode="json") for d in kept], "val_accuracy": None,
                        "demos_status": "unraced"}  # fmt: skip
            ledger = await JudgmentLedger.load(memory, user, backend.model)
            out = await synth.select_demos(user, state["persona"], train, val, _traces(state), seed_demos=seed, llm=llm,
                                           ledger=ledger)
            await ledger.save(memory, user, backend.model, keep_unused=True)  # bootstrap's entries stay
        return {
            "demos": [d.model_dump(mode="json") for d in out.demos],
            "val_accuracy": out.accuracy,
            "demos_status": "selected",
            "usage": _usage(state, "demos", llm),
        }

    async def select(state: SynthesisState, config: RunnableConfig, runtime: Runtime) -> dict[str, Any]:
        tenant, user = _who(state, config)
        cfg = deps.config(config)
        if not cfg.selection.enabled:
            return {"selection": None}
        train, val = _votes(state)
        memory = deps.memory(tenant, runtime.store)
        async with deps.llm() as backend:
            llm = CountingBackend(backend)
            synth = Synthesizer(backend, memory, cfg)
            ledger = await JudgmentLedger.load(memory, user, backend.model)
            prior = await tenant_prior(memory, user, cfg.selection)
            sel = await synth.select_configuration(
                user, [*train, *val], _traces(state), llm=llm, ledger=ledger, prior=prior
            )
            await ledger.save(memory, user, backend.model, keep_unused=True)
        return {"selection": sel.as_meta(), "usage": _usage(state, "select", llm)}

    async def save(state: SynthesisState, config: RunnableConfig, runtime: Runtime) -> dict[str, Any]:
        tenant, user = _who(state, config)
        cfg = deps.config(config)
        memory = deps.memory(tenant, runtime.store)
        thread = (config.get("configurable") or {}).get("thread_id")
        fit_id = state.get("fit_id")
        current = await memory.current_persona(user)
        if fit_id and current is not None and current.meta.get("fit_id") == fit_id:
            saved = current  # this run already saved, then crashed before its checkpoint: never save twice
        else:
            traces = _traces(state)
            async with deps.llm() as backend:
                model = backend.model
                config_key = Synthesizer(backend, None, cfg).config_key()
            profile = PersonaProfile(
                user_id=user,
                persona=state["persona"],
                demos=[Demo.model_validate(d) for d in state.get("demos", [])],
                val_accuracy=state.get("val_accuracy"),
                model=model,
                prompt_version=cfg.persona_prompt_version,
                vote_ids=[*state.get("train_ids", []), *state.get("val_ids", [])],
                meta={
                    "train_ids": state.get("train_ids", []),
                    "val_ids": state.get("val_ids", []),
                    "bootstrap_accuracy": state.get("bootstrap_accuracy"),
                    "n_traces": len(traces),
                    "n_verified": sum(t.verified for t in traces),
                    "reused_traces": state.get("reused_traces", 0),
                    "persona_trace_ids": state.get("persona_trace_ids", []),
                    "verify": cfg.verify,
                    "seed": cfg.seed,
                    "usage": _total_usage(state.get("usage", {})),
                    "synthesis_thread": thread,
                    "run_id": state.get("run_id", ""),
                    "fit_id": fit_id,
                    "fit_key": state.get("fit_key"),
                    "config_key": config_key,
                    "full_fit_votes": len(state.get("train_ids", [])) + len(state.get("val_ids", [])),
                    "demos_status": state.get("demos_status", "selected"),
                    **selection_meta(
                        Selection.from_meta(sel) if (sel := state.get("selection")) else None,
                        [Demo.model_validate(d) for d in state.get("bootstrap_demos", [])],
                    ),
                },
            )
            saved = await memory.save_persona(profile, since=state.get("base_version"))
            if saved.meta.get("fit_id") != fit_id:
                return _saved_by_another_run(saved, user)
        return {
            "status": "fitted",
            "profile": saved.model_dump(mode="json"),
            "message": f"persona v{saved.version} for {user!r} ("
                       + (f"validation accuracy {saved.val_accuracy:.0%})" if saved.val_accuracy is not None
                          else f"serves {(saved.meta.get('selection') or {}).get('served')}; demos not raced)"),
        }

    builder = StateGraph(
        SynthesisState, context_schema=SynthesisContext, input_schema=SynthesisInput, output_schema=SynthesisOutput
    )
    builder.add_node("load_votes", node("load_votes", load_votes))
    builder.add_node("refit", node("refit", refit_node))
    builder.add_node("bootstrap", node("bootstrap", bootstrap))
    builder.add_node("persona", node("persona", persona))
    builder.add_node("demos", node("demos", demos))
    builder.add_node("select", node("select", select))
    builder.add_node("save", node("save", save))
    builder.add_edge(START, "load_votes")
    builder.add_conditional_edges("load_votes", after_load, ["refit", "bootstrap", END])
    builder.add_conditional_edges("refit", after_refit, ["bootstrap", END])
    builder.add_edge("bootstrap", "persona")
    # select before demos: with FitConfig(race_demos="served") step 3 races only where the guard serves its demos
    builder.add_edge("persona", "select")
    builder.add_edge("select", "demos")
    builder.add_edge("demos", "save")
    builder.add_edge("save", END)
    return builder.compile(checkpointer=checkpointer, store=store, name=name)


def _saved_by_another_run(
    saved: PersonaProfile, user: str, usage: dict[str, dict[str, int]] | None = None
) -> dict[str, Any]:
    """The answer of a run whose result another run had saved first (same votes, settings and model)."""
    return {
        "status": "unchanged", "profile": saved.model_dump(mode="json"), "persona": saved.persona,
        **({"usage": usage} if usage is not None else {}),
        "message": f"persona v{saved.version} of {user!r} was saved by another run of the same fit while this one "
                   "ran: nothing saved",
    }  # fmt: skip


def _total_usage(usage: dict[str, dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for per_node in usage.values():
        for k, v in per_node.items():
            total[k] = total.get(k, 0) + int(v)
    return total


class SynthesisRunner:
    """Runs the synthesis graph for one user, resuming an interrupted run instead of starting over.

    The thread is ``synth:{tenant}:{user}:v<N>`` where N is the persona version the
    run will produce, so after a crash the next run for that user lands on the same
    thread and continues from its last checkpoint. Implements
    :class:`synth_agent.scheduler.SynthesisRunner`.
    """

    def __init__(
        self,
        graph: CompiledStateGraph[Any, Any, Any, Any],
        memory_for: MemoryFactory,
        *,
        durability: Durability = "sync",
        config: RunnableConfig | None = None,
    ) -> None:
        self.graph = graph
        self.memory_for = memory_for
        self.durability = durability
        self.base_config = config or {}

    async def run(self, tenant_id: str, user_id: str, *, run_id: str | None = None) -> PersonaProfile | None:
        """Fit (or resume fitting) ``user_id``; the saved profile, or None when nothing was saved
        (too few votes, or the current persona already uses every vote: see ``Synthesizer.plan``)."""
        state = await self.run_state(tenant_id, user_id, run_id=run_id)
        if state.get("status") == "fitted" and state.get("profile"):
            return PersonaProfile.model_validate(state["profile"])
        return None

    async def run_state(self, tenant_id: str, user_id: str, *, run_id: str | None = None) -> dict[str, Any]:
        """Like :meth:`run` but returns the final graph state (usage per node, accuracies, message)."""
        validate_user_id(user_id)
        if run_id is None:
            current = await self.memory_for(tenant_id).current_persona(user_id)
            run_id = f"v{(current.version if current else 0) + 1}"
        conf = dict(self.base_config.get("configurable") or {})
        conf.update(
            thread_id=synthesis_thread_id(tenant_id, user_id, run_id), tenant_id=tenant_id, synth_user_id=user_id
        )
        config: RunnableConfig = {**self.base_config, "configurable": conf}
        inputs: SynthesisState = {"tenant_id": tenant_id, "user_id": user_id, "run_id": run_id}
        if not self.graph.checkpointer:  # not resumable; (langgraph rejects durability without a checkpointer)
            return await self.graph.ainvoke(inputs, config)
        snap = await self.graph.aget_state(config)
        if snap.next:
            log.info("resuming synthesis %s at %s", conf["thread_id"], snap.next)
            return await self.graph.ainvoke(None, config, durability=self.durability)
        return await self.graph.ainvoke(inputs, config, durability=self.durability)


graph = build_synthesis_graph()
"""For ``langgraph.json``: no checkpointer (the platform brings one), LLM from the environment."""
