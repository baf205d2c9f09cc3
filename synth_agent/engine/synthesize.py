"""SynthesizeMe: turn one user's votes into a persona and judge demos.

Three steps (Ryan et al., ACL 2025), each an async method so the synthesis graph
can run them as resumable nodes:

1. :meth:`Synthesizer.bootstrap` — a judge without user information reasons about
   every train vote (one randomized presentation order per vote); traces whose
   prediction matches the real vote are *verified*. Candidate few-shot sets of
   verified traces (plus zero-shot and labels-only) are scored on the validation
   votes; the best set's traces feed step 2.
2. :meth:`Synthesizer.write_persona` — one LLM call turns those traces into a
   persona, trimming examples if the prompt overflows.
3. :meth:`Synthesizer.select_demos` — random search over demo sets for the
   persona-informed judge, scored on validation, early stop at a target.

Cost control (``bench/fit_cost.py`` measures it):

* candidate demo sets are **raced** on the validation votes (:func:`~synth_agent.engine.search.race`):
  a candidate that can no longer beat the leader is not judged further — same winner, fewer judgments;
* every single-order judgment goes through a **judgment ledger**
  (:class:`~synth_agent.engine.ledger.JudgmentLedger`) kept per user in the preference memory, so a
  refit pays only for judgments it has not made before (and ``forget`` erases the ledger);
* presentation orders are a pure function of (seed, vote id), so a refit re-uses stored traces for
  votes already judged;
* fitting again with nothing new (same votes, same budgets, same model and prompts) makes no LLM
  request and saves no new version (:attr:`FitResult.status` ``"unchanged"``);
* after a few new votes a refit is incremental (:meth:`Synthesizer.update`): only the new votes are
  judged, persona and demos are kept unless those votes show them stale;
* the LLM layer caches temperature-0 calls.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, Protocol

import orjson
from pydantic import ConfigDict
from pydantic.dataclasses import dataclass as pydantic_dataclass

from synth_agent import prompts
from synth_agent.engine.judge import Judge
from synth_agent.engine.ledger import JudgmentLedger, pair_digest
from synth_agent.engine.search import RaceResult, race
from synth_agent.engine.selection import (
    Configuration,
    GainPrior,
    Selection,
    SelectionConfig,
    choose,
    demoted,
    settled,
    tenant_prior,
)
from synth_agent.llm.base import ChatBackend, ChatMessage, Completion, LLMStats
from synth_agent.llm.budget import fits, note, too_long
from synth_agent.llm.errors import ContextOverflowError, LLMError
from synth_agent.models import Demo, PersonaProfile, Trace, Vote, validate_user_id

ProgressFn = Callable[[str, int, int], None]
"""``progress(stage, done, total)``; stages: refit (an incremental refit), bootstrap, candidates, persona, demos,
select, save."""


# a pydantic dataclass: fields are validated when built and strictly (FitConfig(n_trials="3") fails at once,
# naming the field, like Settings and EndpointConfig; the CLI and ScaleSettings parse strings first), frozen
@pydantic_dataclass(frozen=True, config=ConfigDict(extra="forbid", strict=True))
class FitConfig:
    """Budgets and knobs of one fit.

    The paper searches 10 trial sets in step 1 and 10 demo candidates in step 3. With 4–5
    validation votes, picking the best of many candidates mostly picks noise: on the
    simulator's 24 × 25 population (seeds 0–4, ``bench/fit_accuracy.py``) 4 and 4 score
    at least as well as 10 and 10 for a third of the prompt tokens, so they are the default;
    pass ``n_trials=10, n_demo_candidates=10`` for the paper's budgets.
    """

    train_fraction: float = 0.7
    min_votes: int = 5
    n_trials: int = 4
    n_demo_candidates: int = 4
    max_bootstrapped_demos: int = 4
    max_labeled_demos: int = 4
    target_accuracy: float = 1.0
    """A candidate demo set that is sure to reach this validation accuracy wins at once."""
    candidate_wave: int = 5
    """Candidates raced at once; a later wave starts only if it could beat the best so far."""
    val_both_orders: bool = False
    verify: bool = True
    seed: int = 0
    persona_prompt_version: str = prompts.PERSONA_WRITER_VERSION
    max_persona_examples: int = 16
    max_persona_prompt_chars: int = 60_000
    persona_max_tokens: int = 400
    """The persona writer's answer cap (its prompt is budgeted to leave room for it)."""
    score_mode: Literal["cot", "logprob"] = "cot"
    """Judge used to score candidate demo sets on validation: chain of thought (the judge the profile
    is served with), or the one-token log-probability judge (fewer tokens; demos then show labels
    only; calls fall back to chain of thought where the endpoint returns no log-probabilities)."""
    persona_traces: Literal["all", "best"] = "all"
    """Traces the persona is written from: every verified trace of every context vote (train and
    validation), or only the best trial's (the paper's choice). "all" grounds the persona in more
    evidence; with small trials (1–4 traces) "best" under-informs it — measured in the README's eval table."""
    persona_votes: Literal["all", "verified", "choices"] = "verified"
    """Votes the persona writer sees: "verified" — only those whose default-judge trace matched the vote
    (the paper's choice, over every context vote); "all" — also the others, each with a label-conditioned
    rationale (the insight prompt: what the choice reveals, one short call per vote). Verified votes are the
    ones where the user agreed with the generic judge, so a persona written from them alone leans toward
    generic taste; the votes it drops are where the user departs from it (docs/personalization.md, "What the
    persona is written from"). "all" writes the better persona alone (+0.8 points on seeds 0–4, ~7% more
    tokens) but makes the per-user guard serve persona + demos to more users, and on one of eight populations
    more than 1 in 10 then fall below the default judge; "verified" keeps every population at or under
    1 in 10 (docs/results.md, "Persona from every context vote"). "choices" — every context vote with no extra
    call: verified ones with their trace, the others as the bare choice (:data:`NO_NOTE`), so a claim is weighed
    against every choice, not only those the generic judge got right (fewer unsupported traits; pair it with
    ``persona_prompt_version="persona_writer.v3"`` for a real LLM; docs/results.md, "Demos from every context
    vote")."""
    demo_votes: Literal["search", "context"] = "search"
    """Where the persona judge's demos come from: "search" — step 3's random search over small sets of train
    traces and labelled train votes, raced on the validation votes (the paper's); "context" — every context vote
    (train and validation, the most recent ``max_context_demos``) as a labelled demo, no search."""
    max_context_demos: int = 16
    """With ``demo_votes="context"``: at most this many demos (the most recent votes)."""
    step1: Literal["most_traces", "race"] = "most_traces"
    """How step 1 picks among its candidate sets (:meth:`Synthesizer.bootstrap_candidates`). "most_traces" (the
    default since 2026-12-02) — the set with the most verified traces, then the fewest demos, judging nothing;
    "race" — the paper's: the set the default judge gets most validation votes right with, ties to more traces.
    Step 1's winner is step 3's first candidate (winning ties) and the ``"demos"`` configuration. Why no race:
    it scores sets with a judge that is not the one served (no persona) on the same four or five validation
    votes step 3 races on, so beyond its preference for more traces it mostly picks noise, and it was a quarter
    of a 12-vote fit's prompt tokens. Step 3 still validates the set with the persona judge against random
    rivals, and cross-validation still guards what is served. Why the fewest demos among equally many traces:
    the extras are bare labels, and step 1's pick often wins step 3 and is served, so every live judgment carries
    its demos; taking the most demos instead (tried the same day) served ~0.5 more demos per profile and passed
    the same gate no better. On the paired gate (24 × 25, seeds 0–4 and 5–9, 3 fold shuffles) "most_traces" is
    as accurate as "race" for ~20% fewer prompt tokens per fit; the served set is ~0.5 demo larger
    (docs/llm.md, "What a fit costs with selection")."""
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    """Cross-validated choice of the served configuration and the per-user guard (issue 16); see
    :mod:`synth_agent.engine.selection`. ``SelectionConfig(enabled=False)`` serves persona + demos always."""
    incremental: bool = True
    """Refit incrementally when the user only added votes since a fit with this configuration and model: judge
    the new votes alone (the current persona + demos and the default judge), extend the guard's evidence and keep
    persona and demos — unless the new votes show them stale (:meth:`Synthesizer.update`); needs selection."""
    full_refit_growth: float = 0.5
    """A full refit once the user's context votes exceed the last full fit's by more than this fraction."""
    race_demos: Literal["always", "served"] = "always"
    """When step 3 races demo sets: "always" (the default) — in every fit, alongside cross-validation; "served" —
    only when the guard serves persona + demos, for deployments where a fit's prompt tokens are the cost. A fit
    then cross-validates first and, for a user the guard serves the default (or persona only), keeps the set
    cross-validation's recipe draws from all train votes as the profile's demos, unraced
    (``meta["demos_status"] == "unraced"``, no validation accuracy), and makes no step-3 request; an incremental
    refit judges the new votes with those demos (the recipe cross-validation scored) and, where its guard now
    serves persona + demos, races then (:meth:`Synthesizer.refit_demos`).
    What a first fit serves is the same as with "always": the race is deterministic and shares no judgment with
    cross-validation (tested user by user), and so does a full refit's (``bench/refit_accuracy.py --tenant``;
    after an incremental refit -0.23 points [-1.46, +1.00]). The prices: a fit that does serve persona + demos
    runs the race after cross-validation instead of alongside (longer), and a guard re-applied later to stored
    evidence (``synth-agent eval`` races for every user for this reason) would find unraced demos (docs/llm.md,
    "Step 3 only where its demos are served"). Not part of the fit key: switching it never makes a profile
    refit."""

    def __post_init__(self) -> None:
        if not 0.0 < self.train_fraction < 1.0:
            raise ValueError("train_fraction must be between 0 and 1")
        if self.min_votes < 2:
            raise ValueError("min_votes must be at least 2 (one train and one validation vote)")
        if self.persona_traces not in ("all", "best"):
            raise ValueError("persona_traces must be 'all' or 'best'")
        if self.persona_votes not in ("all", "verified", "choices"):
            raise ValueError("persona_votes must be 'all', 'verified' or 'choices'")
        if self.demo_votes not in ("search", "context"):
            raise ValueError("demo_votes must be 'search' or 'context'")
        if self.score_mode not in ("cot", "logprob"):
            raise ValueError("score_mode must be 'cot' or 'logprob'")
        if self.step1 not in ("most_traces", "race"):
            raise ValueError("step1 must be 'most_traces' or 'race'")
        if self.race_demos not in ("served", "always"):
            raise ValueError("race_demos must be 'served' or 'always'")
        if not self.full_refit_growth >= 0:
            raise ValueError("full_refit_growth must be >= 0")
        for name in ("n_trials", "n_demo_candidates", "candidate_wave", "max_persona_examples", "persona_max_tokens",
                     "max_context_demos"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")


class VoteStore(Protocol):
    """The slice of :class:`store.memory.PreferenceMemory` the engine uses.

    Optional, used when present: ``current_persona(user_id)`` (skip a fit with nothing new) and
    ``get_cached_judgment`` / ``put_cached_judgment`` (the user's judgment ledger).
    """

    async def list_votes(self, user_id: str) -> list[Vote]: ...
    async def get_traces(self, user_id: str) -> list[Trace]: ...
    async def put_traces(self, user_id: str, traces: list[Trace]) -> None: ...
    async def save_persona(self, profile: PersonaProfile) -> PersonaProfile: ...


@dataclass
class FitResult:
    """Outcome of :meth:`Synthesizer.fit`. ``status='not_enough_votes'`` is a normal result, not an error.

    ``status='unchanged'``: the current persona was fitted on exactly these votes with the same
    budgets, model and prompts; nothing was asked of the LLM and nothing was saved (``profile`` is
    the current version).
    """

    user_id: str
    status: Literal["fitted", "not_enough_votes", "unchanged"]
    message: str
    n_votes: int
    profile: PersonaProfile | None = None
    bootstrap_demos: list[Demo] = field(default_factory=list)
    traces: list[Trace] = field(default_factory=list)
    usage: dict[str, int] = field(default_factory=dict)
    demo_error: str | None = None
    """Set when step 3 failed and the persona was saved without demos (``profile.meta["demos_status"]``
    is then ``"failed"``); the next fit tries the demo step again."""


@dataclass(frozen=True)
class FitPlan:
    """What a fit of one user would work on, decided before any LLM call (:meth:`Synthesizer.plan`).

    ``status``: ``"fit"`` (go ahead), ``"not_enough_votes"``, or ``"unchanged"`` (``current`` was fitted
    on exactly this split with the same budgets, model and prompts: fitting again would pay for nothing new).
    """

    status: Literal["fit", "not_enough_votes", "unchanged"]
    train: list[Vote]
    val: list[Vote]
    key: str
    current: PersonaProfile | None
    new: list[Vote] = field(default_factory=list)
    """With ``status="fit"``: the votes added since ``current`` when an incremental refit may do
    (:meth:`Synthesizer.update`); empty: a full fit."""

    @property
    def n_context(self) -> int:
        return len(self.train) + len(self.val)


@dataclass
class BootstrapOutcome:
    traces: list[Trace]
    persona_trace_ids: list[str]
    demos: list[Demo]
    accuracy: float
    candidates_scored: int
    reused_traces: int
    judgments: int = 0
    """Validation judgments the candidate race needed (ledger hits included)."""


@dataclass
class DemoOutcome:
    demos: list[Demo]
    accuracy: float
    candidates_scored: int
    judgments: int = 0


class CountingBackend:
    """Wraps a backend to count one fit's own calls (the shared client's stats mix all fits)."""

    def __init__(self, inner: ChatBackend) -> None:
        self.inner = inner
        self.model = inner.model
        self.stats: LLMStats = inner.stats
        self.calls = 0
        self.cached = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cached_prompt_tokens = 0

    async def complete(self, messages: Sequence[ChatMessage], **kw: Any) -> Completion:
        comp = await self.inner.complete(messages, **kw)
        self.calls += 1
        if comp.cached:
            self.cached += 1
        else:
            self.prompt_tokens += comp.prompt_tokens
            self.completion_tokens += comp.completion_tokens
            self.cached_prompt_tokens += comp.cached_prompt_tokens
        return comp

    async def structured(self, messages: Sequence[ChatMessage], schema: Any, **kw: Any) -> Any:
        self.calls += 1
        return await self.inner.structured(messages, schema, **kw)

    async def aclose(self) -> None:  # the inner client is owned by the caller
        return None

    def usage(self) -> dict[str, int]:
        return {
            "llm_calls": self.calls,
            "llm_requests": self.calls - self.cached,
            "cache_hits": self.cached,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_prompt_tokens": self.cached_prompt_tokens,
        }


def stable_coin(*parts: object) -> bool:
    """A deterministic fair coin from its arguments (presentation order of a vote)."""
    h = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return h[0] & 1 == 1


def stable_rng(*parts: object) -> random.Random:
    h = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(h[:8], "big"))


def split_votes(
    votes: Sequence[Vote],
    train_fraction: float = 0.7,
    *,
    previous: tuple[Sequence[str], Sequence[str]] | None = None,
) -> tuple[list[Vote], list[Vote]]:
    """Temporal train/validation split of a user's context votes (time order kept).

    Votes that carry ``split`` labels are honoured (``train``/``val``; ``test`` votes are
    never context). Otherwise the first ``train_fraction`` are train, the rest validation,
    with at least one of each.

    ``previous`` (the train and validation vote ids of the last fit) makes a refit
    incremental: those votes keep their side, and only the votes added since are split,
    temporally among themselves. Old validation votes then stay validation votes, so their
    stored judgments stay valid, and a refit pays for what is new.
    """
    ordered = [v for v in votes if v.split != "test"]
    if any(v.split for v in ordered):
        train = [v for v in ordered if v.split == "train"]
        val = [v for v in ordered if v.split == "val"]
        if train and val:
            return train, val
    if previous is not None:
        old_train, old_val = set(previous[0]), set(previous[1])
        if old_train and old_val and any(v.id in old_train for v in ordered) and any(v.id in old_val for v in ordered):
            new = [v for v in ordered if v.id not in old_train and v.id not in old_val]
            n_new_train = round(len(new) * train_fraction)
            to_train = {v.id for v in new[:n_new_train]} | old_train
            return [v for v in ordered if v.id in to_train], [v for v in ordered if v.id not in to_train]
    n = len(ordered)
    if n < 2:
        return list(ordered), []
    n_train = min(n - 1, max(1, round(n * train_fraction)))
    return list(ordered[:n_train]), list(ordered[n_train:])


async def _per_vote(
    judge: Judge, votes: Sequence[Vote], order: Callable[[Vote], bool] | None = None
) -> dict[str, int]:
    """Correct judgments out of 2 per vote id: both presentation orders, or (``order`` given: whether the
    chosen answer is shown first) that one order, counted 0 or 2."""

    async def one(v: Vote) -> tuple[str, int]:
        if order is not None:
            cf = order(v)
            first, second = (v.chosen, v.rejected) if cf else (v.rejected, v.chosen)
            label, _, _ = await judge.judge_order(v.context, first, second)
            return v.id, 2 * (label == ("A" if cf else "B"))
        (a, _, _), (b, _, _) = await asyncio.gather(
            judge.judge_order(v.context, v.chosen, v.rejected), judge.judge_order(v.context, v.rejected, v.chosen)
        )
        return v.id, (a == "A") + (b == "B")

    return dict(await asyncio.gather(*(one(v) for v in votes)))


def _seed_default(default: Judge, votes: Sequence[Vote], traces: Sequence[Trace]) -> None:
    """A trace is the default judge's verdict in one order: record it in ``default``'s ledger (chain of thought
    only), so judging that order again costs nothing."""
    if default.mode != "cot" or default.ledger is None:
        return
    by_id = {v.id: v for v in votes}
    prefix = default._ledger_prefix()
    for t in traces:
        v = by_id.get(t.vote_id)
        if v is not None and t.model == default.llm.model and t.predicted != "tie":  # ties are never kept
            first, second = (v.chosen, v.rejected) if t.chosen_first else (v.rejected, v.chosen)
            default.ledger.seed(pair_digest(prefix, v.context, first, second), t.predicted, None)


def selection_meta(selection: Selection | None, bootstrap_demos: Sequence[Demo]) -> dict[str, Any]:
    """What a saved profile records about selection: the result, and step 1's demos when they are served or
    scored (an incremental refit judges every scored configuration)."""
    if selection is None:
        return {}
    out: dict[str, Any] = {"selection": selection.as_meta()}
    if selection.served == "demos" or "demos" in selection.per_vote:
        out["bootstrap_demos"] = [d.model_dump(mode="json") for d in bootstrap_demos]
    return out


RATIONALE_MAX_TOKENS = 120
"""Answer cap of one rationale call (one or two sentences)."""
NO_RATIONALE = "(no rationale: only the user's choice is known)"
NO_NOTE = "(only the user's choice is known)"
"""The note of a vote shown to the persona writer without reasoning (``persona_votes="choices"``)."""
Rationales = dict[str, tuple[Demo, str]]
"""Vote id -> (the vote as shown to the persona writer, the rationale of its choice)."""


def demo_from_vote(vote: Vote, chosen_first: bool, reasoning: str | None) -> Demo:
    return Demo(
        vote_id=vote.id,
        context=vote.context,
        chosen=vote.chosen,
        rejected=vote.rejected,
        chosen_first=chosen_first,
        reasoning=reasoning,
    )


def _demo_chars(demos: Sequence[Demo]) -> int:
    """Prompt size of a demo set, in characters (what a judgment with it costs)."""
    return sum(
        len(d.chosen) + len(d.rejected) + len(d.reasoning or "") + sum(len(m.content) for m in d.context)
        for d in demos
    )


def _n_traces(demos: Sequence[Demo]) -> int:
    """Demos of a set that are traces (with the judge's reasoning), not bare labels."""
    return sum(1 for d in demos if d.reasoning is not None)


def _demo_key(demos: Sequence[Demo]) -> tuple[tuple[str, bool, bool], ...]:
    return tuple((d.vote_id, d.chosen_first, d.reasoning is not None) for d in demos)


class Synthesizer:
    """Fits personas for users of one tenant on one LLM backend.

    Holds no per-user state: many fits (different users, even different
    backends via separate instances) run concurrently in one process.

        >>> import asyncio
        >>> from langgraph.store.memory import InMemoryStore
        >>> from store.memory import PreferenceMemory
        >>> from synth_agent.sim import Population
        >>> from synth_agent.sim.backend import SimBackend
        >>> memory = PreferenceMemory(InMemoryStore(), tenant="acme")
        >>> user = Population(1, seed=0).user_ids[0]
        >>> _ = asyncio.run(memory.add_votes(Population(1, seed=0).votes(user, 12)))
        >>> synth = Synthesizer(SimBackend(), memory)
        >>> fit = asyncio.run(synth.fit(user))
        >>> fit.status, fit.profile.version, len(fit.profile.demos) > 0
        ('fitted', 1, True)
        >>> asyncio.run(synth.fit(user)).status  # no new votes: nothing asked, nothing saved
        'unchanged'
    """

    def __init__(self, llm: ChatBackend, memory: VoteStore | None = None, config: FitConfig | None = None):
        self.llm = llm
        self.memory = memory
        self.config = config or FitConfig()

    # ------------------------------------------------------------------ helpers
    def _order(self, vote: Vote, purpose: str) -> bool:
        return stable_coin(self.config.seed, vote.id, purpose)

    def _trace_demo(self, vote: Vote, trace: Trace) -> Demo:
        """A trace as a few-shot demo. Without verification the judge's own answer is the label."""
        if self.config.verify or trace.verified:
            return demo_from_vote(vote, trace.chosen_first, trace.reasoning)
        # Unverified and wrong: the demo shows the judge's prediction as if it were the user's.
        return Demo(
            vote_id=vote.id,
            context=vote.context,
            chosen=vote.rejected,
            rejected=vote.chosen,
            chosen_first=not trace.chosen_first,
            reasoning=trace.reasoning,
        )

    def _val_jobs(self, val: Sequence[Vote]) -> list[tuple[Vote, bool]]:
        """Validation judgments as (vote, chosen shown first), in a fixed order."""
        both = self.config.val_both_orders
        return [(v, cf) for v in val for cf in ((True, False) if both else (self._order(v, "val"),))]

    async def _race(
        self,
        judge: Judge,
        val: Sequence[Vote],
        candidates: Sequence[Sequence[Demo]],
        *,
        priority: Callable[[int], tuple[float, ...]] | None = None,
    ) -> RaceResult[Judge]:
        """The candidate demo set whose judge gets most validation judgments right (see :func:`race`)."""
        jobs = self._val_jobs(val)
        judges = [judge.with_demos(c) for c in candidates]  # one prompt prefix (and ledger digest) each
        # The first candidate opens (zero-shot / the seed); the rest go cheapest prompt first, so a
        # strong champion is found early and the expensive sets that cannot beat it are dropped soonest.
        order = [0, *sorted(range(1, len(candidates)), key=lambda i: (_demo_chars(candidates[i]), i))]

        async def right(j: Judge, i: int) -> bool:
            v, cf = jobs[i]
            first, second = (v.chosen, v.rejected) if cf else (v.rejected, v.chosen)
            label, _, _ = await j.judge_order(v.context, first, second)
            return label == ("A" if cf else "B")

        return await race(
            judges, len(jobs), right, priority=priority, target=self.config.target_accuracy,
            wave=self.config.candidate_wave, order=order,
        )  # fmt: skip

    # ------------------------------------------------------------------ step 1
    async def verify(
        self,
        user_id: str,
        train: Sequence[Vote],
        *,
        progress: ProgressFn | None = None,
        llm: ChatBackend | None = None,
        call_site: str = "bootstrap",
    ) -> tuple[list[Trace], int]:
        """Bootstrap traces: judge each train vote without user info (stored traces are reused).

        Returns the traces in train order and how many came from the store.
        """
        llm = llm or self.llm
        stored: dict[tuple[str, bool, str], Trace] = {}
        if self.memory is not None:
            stored = {(t.vote_id, t.chosen_first, t.model): t for t in await self.memory.get_traces(user_id)}
        judge = Judge(llm, call_site=call_site)
        pending: list[tuple[Vote, bool]] = []
        traces_by_vote: dict[str, Trace] = {}
        for v in train:
            cf = self._order(v, "bootstrap")
            hit = stored.get((v.id, cf, llm.model))
            if hit is not None:
                traces_by_vote[v.id] = hit
            else:
                pending.append((v, cf))
        reused = len(traces_by_vote)
        done = 0
        total = len(pending)
        if progress:
            progress("bootstrap", 0, total)

        async def one(v: Vote, cf: bool) -> Trace:
            nonlocal done
            first, second = (v.chosen, v.rejected) if cf else (v.rejected, v.chosen)
            label, reasoning, _ = await judge.judge_order(v.context, first, second)
            truth = "A" if cf else "B"
            done += 1
            if progress:
                progress("bootstrap", done, total)
            return Trace(
                vote_id=v.id, chosen_first=cf, reasoning=reasoning, predicted=label,
                verified=label == truth, model=llm.model,
            )

        new = await asyncio.gather(*(one(v, cf) for v, cf in pending))
        for t in new:
            traces_by_vote[t.vote_id] = t
        if new and self.memory is not None:
            await self.memory.put_traces(user_id, list(new))
        return [traces_by_vote[v.id] for v in train], reused

    def _usable(self, train: Sequence[Vote], traces: Sequence[Trace]) -> list[Demo]:
        """Trace demos the searches may use (verified ones, or all with reasoning when not verifying)."""
        by_vote = {v.id: v for v in train}
        ok = [t for t in traces if t.vote_id in by_vote and t.reasoning and (t.verified or not self.config.verify)]
        return [self._trace_demo(by_vote[t.vote_id], t) for t in ok]

    def bootstrap_candidates(self, user_id: str, train: Sequence[Vote], traces: Sequence[Trace]) -> list[list[Demo]]:
        """Step 1's few-shot sets, DSPy-style: zero-shot, labels-only, then ``n_trials`` random mixes
        of 1–``max_bootstrapped_demos`` verified traces and label-only demos (duplicates dropped)."""
        cfg = self.config
        trace_demos = self._usable(train, traces)
        candidates: list[list[Demo]] = [[]]
        rng = stable_rng(cfg.seed, user_id, "labels")
        label_pool = list(train)
        rng.shuffle(label_pool)
        candidates.append(
            [demo_from_vote(v, self._order(v, "label"), None) for v in label_pool[: cfg.max_labeled_demos]]
        )
        for k in range(cfg.n_trials):
            if not trace_demos:
                break
            r = stable_rng(cfg.seed, user_id, "trial", k)
            pool = list(trace_demos)
            r.shuffle(pool)
            chosen = pool[: r.randint(1, min(cfg.max_bootstrapped_demos, len(pool)))]
            used = {d.vote_id for d in chosen}
            extra = [v for v in train if v.id not in used]
            r.shuffle(extra)
            n_labels = r.randint(0, min(cfg.max_labeled_demos, len(extra)))
            candidates.append(chosen + [demo_from_vote(v, self._order(v, "label"), None) for v in extra[:n_labels]])
        unique: dict[tuple[tuple[str, bool, bool], ...], list[Demo]] = {}
        for c in candidates:
            unique.setdefault(_demo_key(c), c)
        return list(unique.values())

    async def rank_bootstrap(
        self,
        val: Sequence[Vote],
        candidates: Sequence[Sequence[Demo]],
        *,
        llm: ChatBackend | None = None,
        ledger: JudgmentLedger | None = None,
    ) -> RaceResult[Judge]:
        """Race step 1's candidates with the default judge; ties go to more traces, then the earlier set."""
        n_traces = [_n_traces(c) for c in candidates]
        judge = self._default_scorer(llm or self.llm, ledger)
        return await self._race(judge, val, candidates, priority=lambda i: (n_traces[i], -i))

    async def pick_bootstrap(
        self,
        val: Sequence[Vote],
        candidates: Sequence[Sequence[Demo]],
        traces: Sequence[Trace],
        *,
        llm: ChatBackend | None = None,
        ledger: JudgmentLedger | None = None,
    ) -> tuple[int, float, int]:
        """Step 1's winner by :attr:`FitConfig.step1`: (index, validation accuracy, judgments made).

        "race": :meth:`rank_bootstrap` (the zero-shot candidate's accuracy when it wins). "most_traces": the
        candidate with the most verified traces, then the fewest demos, then the earliest; nothing is judged,
        and the accuracy is the default judge's on the validation votes as their traces recorded it.
        """
        if self.config.step1 == "race":
            result = await self.rank_bootstrap(val, candidates, llm=llm, ledger=ledger)
            return result.best, result.accuracy, result.judgments
        best = max(range(len(candidates)), key=lambda i: (_n_traces(candidates[i]), -len(candidates[i]), -i))
        by_vote = {t.vote_id: t for t in traces}
        judged = [by_vote[v.id].verified for v in val if v.id in by_vote and by_vote[v.id].predicted != "tie"]
        return best, (sum(judged) / len(judged) if judged else 0.0), 0

    def _default_scorer(self, llm: ChatBackend, ledger: JudgmentLedger | None) -> Judge:
        return Judge(llm, call_site="bootstrap_score", mode=self.config.score_mode,
                     ledger=ledger if ledger is not None else JudgmentLedger())  # fmt: skip

    async def _judge_all(
        self, judge: Judge, val: Sequence[Vote], skip: Callable[[Vote, bool], bool] | None = None
    ) -> None:
        """Every validation judgment of ``judge`` at once (fills its ledger), but those ``skip`` names."""

        async def one(v: Vote, cf: bool) -> None:
            first, second = (v.chosen, v.rejected) if cf else (v.rejected, v.chosen)
            await judge.judge_order(v.context, first, second)

        await asyncio.gather(*(one(v, cf) for v, cf in self._val_jobs(val) if skip is None or not skip(v, cf)))

    def _persona_ids(self, train: Sequence[Vote], traces: Sequence[Trace], best: Sequence[Demo]) -> list[str]:
        """Traces the persona is written from: all usable ones in time order ("all": prefix-stable across
        refits), or the best set's ("best", the paper's choice; all when it has none)."""
        usable = [d.vote_id for d in self._usable(train, traces)]
        if self.config.persona_traces == "best":
            best_ids = [d.vote_id for d in best if d.reasoning is not None]
            if best_ids:
                return best_ids
        return usable

    async def bootstrap(
        self,
        user_id: str,
        train: Sequence[Vote],
        val: Sequence[Vote],
        *,
        progress: ProgressFn | None = None,
        llm: ChatBackend | None = None,
        ledger: JudgmentLedger | None = None,
    ) -> BootstrapOutcome:
        """Judge the context votes without user info, verify against the votes, pick the best set of train
        traces. Validation votes are verified too: the persona is written from every context vote (their
        traces never become demos, and cross-validated selection needs them anyway)."""
        traces, reused = await self.verify(user_id, [*train, *val], progress=progress, llm=llm)
        cand_list = self.bootstrap_candidates(user_id, train, traces)
        if progress:
            progress("candidates", 0, len(cand_list))
        if ledger is not None:  # the validation traces are the zero-shot candidate's verdicts in their order
            _seed_default(self._default_scorer(llm or self.llm, ledger), val, traces)
        won, accuracy, judgments = await self.pick_bootstrap(val, cand_list, traces, llm=llm, ledger=ledger)
        if progress:
            progress("candidates", len(cand_list), len(cand_list))
        best = cand_list[won]
        return BootstrapOutcome(
            traces=traces,
            persona_trace_ids=self._persona_ids([*train, *val], traces, best),
            demos=list(best),
            accuracy=accuracy,
            candidates_scored=len(cand_list),
            reused_traces=reused,
            judgments=judgments,
        )

    # ------------------------------------------------------------------ step 2
    async def write_persona(
        self,
        train: Sequence[Vote],
        traces: Sequence[Trace],
        trace_ids: Sequence[str],
        *,
        llm: ChatBackend | None = None,
        rationales: Rationales | None = None,
    ) -> str:
        """One persona-writer call over the chosen traces; trims examples when they overflow.

        ``train``: the context votes the persona is written from (a fit passes train and validation votes;
        cross-validation the other folds'). With ``persona_votes="all"`` every one of them is an example:
        the chosen traces with their reasoning, the rest with a rationale (:meth:`rationales`; ``rationales``:
        those already made, reused and added to).
        """
        llm = llm or self.llm
        cfg = self.config
        by_vote = {v.id: v for v in train}
        by_trace = {t.vote_id: t for t in traces}
        examples: list[prompts.TraceExample] = []
        if cfg.persona_votes in ("all", "choices"):
            chosen = {vid for vid in trace_ids if vid in by_trace}
            votes = list(train)[: cfg.max_persona_examples]  # time order; rationales only for examples kept
            notes: Rationales = {}
            if cfg.persona_votes == "all":
                notes = await self.rationales([v for v in votes if v.id not in chosen], llm=llm, known=rationales)
            for u in votes:
                if u.id in chosen:
                    d, text = self._trace_demo(u, by_trace[u.id]), by_trace[u.id].reasoning
                elif u.id in notes:
                    d, text = notes[u.id]
                else:  # "choices": the choice alone, in its label order (no call)
                    d, text = demo_from_vote(u, self._order(u, "label"), None), NO_NOTE
                examples.append(prompts.TraceExample(d.context, d.first, d.second, text, d.label))
        for vid in trace_ids if cfg.persona_votes == "verified" else ():
            t, v = by_trace.get(vid), by_vote.get(vid)
            if t is None or v is None:
                continue
            d = self._trace_demo(v, t)
            examples.append(prompts.TraceExample(d.context, d.first, d.second, t.reasoning, d.label))
        if not examples:
            # No usable reasoning at all: fall back to the labelled votes themselves.
            for v in train[: cfg.max_persona_examples]:
                cf = self._order(v, "label")
                d = demo_from_vote(v, cf, None)
                examples.append(prompts.TraceExample(d.context, d.first, d.second, "(no reasoning)", d.label))
        examples = examples[: cfg.max_persona_examples]
        wanted = len(examples)
        cap = cfg.persona_max_tokens
        while True:
            msgs = prompts.persona_messages(examples, version=cfg.persona_prompt_version)
            size = sum(len(m["content"]) for m in msgs)
            too_big = size > cfg.max_persona_prompt_chars or not fits(llm, msgs, cap)
            if too_big and len(examples) > 1:
                examples = examples[:-1]
                continue
            if not fits(llm, msgs, cap):
                raise too_long(llm, msgs, cap, call_site="persona", what="persona prompt (one example)")
            try:
                comp = await llm.complete(msgs, call_site="persona", temperature=0.0, max_tokens=cap)
            except ContextOverflowError:  # the endpoint says the prompt is too long: trim and retry
                if len(examples) > 1:
                    examples = examples[: max(1, len(examples) // 2)]
                    continue
                raise
            if len(examples) < wanted:
                note(llm, "persona", "trimmed")
            try:
                return prompts.parse_persona(comp.text)
            except prompts.ParseError:
                note(llm, "persona", "unparseable")
                raise

    async def rationales(
        self, votes: Sequence[Vote], *, llm: ChatBackend | None = None, known: Rationales | None = None
    ) -> Rationales:
        """Per vote id: the vote as shown (label order) and what the choice reveals about the user, from one
        short label-conditioned call each (the insight prompt). For votes the default judge got wrong: its
        reasoning argues for the response the user rejected, but the choice itself is still evidence.

        ``known``: rationales one fit already has (its persona's, shared with the cross-validation folds);
        only the missing ones are asked for, and they are added to it.
        """
        llm = llm or self.llm
        known = known if known is not None else {}

        async def one(v: Vote) -> tuple[str, tuple[Demo, str]]:
            d = demo_from_vote(v, self._order(v, "label"), None)
            msgs = prompts.insight_messages(d.context, d.first, d.second, d.label)
            comp = await llm.complete(msgs, call_site="persona_rationale", temperature=0.0,
                                      max_tokens=RATIONALE_MAX_TOKENS)  # fmt: skip
            return v.id, (d, comp.text.strip() or NO_RATIONALE)

        known.update(await asyncio.gather(*(one(v) for v in votes if v.id not in known)))
        return {v.id: known[v.id] for v in votes}

    # ------------------------------------------------------------------ step 3
    def demo_candidates(
        self, user_id: str, train: Sequence[Vote], traces: Sequence[Trace], seed_demos: Sequence[Demo] = ()
    ) -> list[list[Demo]]:
        """Step 3's candidates: ``seed_demos`` (step 1's winner) first when it has demos, then random
        sets of traces and label-only demos (at least one demo each), ``n_demo_candidates`` in all."""
        cfg = self.config
        if cfg.demo_votes == "context":  # one candidate: the votes themselves, labelled, in time order
            return [[demo_from_vote(v, self._order(v, "label"), None) for v in list(train)[-cfg.max_context_demos :]]]
        trace_demos = self._usable(train, traces)
        candidates: list[list[Demo]] = [list(seed_demos)] if seed_demos else []
        for k in range(cfg.n_demo_candidates * 3):
            if len(candidates) >= cfg.n_demo_candidates:
                break
            r = stable_rng(cfg.seed, user_id, "demos", k)
            pool = list(trace_demos)
            r.shuffle(pool)
            chosen = pool[: r.randint(1, min(cfg.max_bootstrapped_demos, len(pool)))] if pool else []
            used = {d.vote_id for d in chosen}
            extra = [v for v in train if v.id not in used]
            r.shuffle(extra)
            n_labels = r.randint(0 if chosen else 1, min(cfg.max_labeled_demos, len(extra)))
            chosen += [demo_from_vote(v, self._order(v, "label"), None) for v in extra[:n_labels]]
            if _demo_key(chosen) not in {_demo_key(c) for c in candidates}:
                candidates.append(chosen)
        return candidates or [[]]

    def _demo_pool(self, train: Sequence[Vote], val: Sequence[Vote]) -> list[Vote]:
        return [*train, *val] if self.config.demo_votes == "context" else list(train)

    def unraced_demos(self, user_id: str, train: Sequence[Vote], val: Sequence[Vote], traces: Sequence[Trace]) -> list[Demo]:
        """The demos a fit keeps when step 3 does not race (:attr:`FitConfig.race_demos`): the set cross-validation's
        recipe draws (step 3's first random candidate, :meth:`_fold_judges`) from the whole training pool, so an
        incremental refit's persona + demos judgments score the recipe cross-validation scored; with
        ``demo_votes="context"`` the context votes."""
        return self.demo_candidates(user_id, self._demo_pool(train, val), traces)[0]

    def _persona_judge(self, persona: str, llm: ChatBackend, ledger: JudgmentLedger | None) -> Judge:
        return Judge(llm, persona=persona, call_site="demo_select", mode=self.config.score_mode,
                     ledger=ledger if ledger is not None else JudgmentLedger())  # fmt: skip

    async def select_demos(
        self,
        user_id: str,
        persona: str,
        train: Sequence[Vote],
        val: Sequence[Vote],
        traces: Sequence[Trace],
        *,
        seed_demos: Sequence[Demo] | None = None,
        progress: ProgressFn | None = None,
        llm: ChatBackend | None = None,
        ledger: JudgmentLedger | None = None,
    ) -> DemoOutcome:
        """Random search over demo sets for the persona-informed judge, raced on validation.

        Candidates: see :meth:`demo_candidates`; ``seed_demos`` (step 1's winner) wins ties.
        """
        llm = llm or self.llm
        candidates = self.demo_candidates(user_id, self._demo_pool(train, val), traces, seed_demos or ())
        if progress:
            progress("demos", 0, len(candidates))
        result = await self._race(self._persona_judge(persona, llm, ledger), val, candidates)
        if progress:
            progress("demos", len(candidates), len(candidates))
        return DemoOutcome(
            demos=candidates[result.best], accuracy=result.accuracy, candidates_scored=len(candidates),
            judgments=result.judgments,
        )  # fmt: skip

    # ------------------------------------------------------------------ selection and guard
    def cv_folds(self, user_id: str, votes: Sequence[Vote]) -> list[list[Vote]]:
        """The k folds of cross-validated selection: a seeded shuffle of the votes dealt round robin."""
        k = min(self.config.selection.folds, len(votes))
        ids = [v.id for v in votes]
        stable_rng(self.config.seed, user_id, "cv").shuffle(ids)
        fold_of = {vid: i % k for i, vid in enumerate(ids)}
        return [[v for v in votes if fold_of[v.id] == f] for f in range(k)]

    async def select_configuration(
        self,
        user_id: str,
        votes: Sequence[Vote],
        traces: Sequence[Trace] = (),
        *,
        llm: ChatBackend | None = None,
        ledger: JudgmentLedger | None = None,
        prior: dict[str, GainPrior] | None = None,
        rationales: Rationales | None = None,
    ) -> Selection:
        """Cross-validate persona + demos, persona only, demos only and the default judge on ``votes``
        (every context vote, in both orders or one: :attr:`SelectionConfig.orders`) and apply the per-user guard; see :mod:`~synth_agent.engine.selection`.

        Per fold the persona is written from the other folds' verified traces and the demos are drawn from
        the other folds (the fit's own random-candidate recipe), so nothing scored has seen its own label.
        ``traces``: default-judge traces already made (step 1's); the rest are made now and stored.
        ``prior``: the tenant's gain prior (:func:`~synth_agent.engine.selection.tenant_prior`); None: no prior.
        ``rationales``: the persona writer's rationales already made (the fit's); the folds share them.
        """
        llm = llm or self.llm
        ledger = ledger if ledger is not None else JudgmentLedger()
        votes = list(votes)
        known = {t.vote_id for t in traces}
        missing = [v for v in votes if v.id not in known]
        extra, _ = await self.verify(user_id, missing, llm=llm, call_site="select") if missing else ([], 0)
        all_traces = [*traces, *extra]
        folds = self.cv_folds(user_id, votes)
        mode = self.config.score_mode
        default = Judge(llm, call_site="select", mode=mode, ledger=ledger)
        _seed_default(default, votes, all_traces)
        notes: Rationales = rationales if rationales is not None else {}
        if self.config.persona_votes == "all":  # made once here, not once per fold
            verified = {d.vote_id for d in self._usable(votes, all_traces)}
            await self.rationales([v for v in votes if v.id not in verified], llm=llm, known=notes)
        sc = self.config.selection
        scored = [c for c in ("persona_demos", "persona", "demos") if sc.score_all or c in sc.candidates]
        # One order per vote: the bootstrap trace's, so the default judge's verdict is already known (seeded above).
        order = (lambda v: self._order(v, "bootstrap")) if sc.orders == 1 else None

        personas: dict[int, str] = {}

        async def fold_judges(f: int) -> dict[str, Judge]:
            outside = [v for g, fold in enumerate(folds) if g != f for v in fold]
            usable_ids = [d.vote_id for d in self._usable(outside, all_traces)]
            personas[f] = await self.write_persona(outside, all_traces, usable_ids, llm=llm, rationales=notes)
            return self._fold_judges(user_id, folds, f, all_traces, personas[f], scored, llm, ledger, "select")

        async def default_counts() -> dict[str, int]:
            return await _per_vote(default, votes, order)

        # The default judge's counts first (in one order they are the seeded traces: free), with the fold personas.
        judges, base = await asyncio.gather(
            asyncio.gather(*(fold_judges(f) for f in range(len(folds)))), default_counts()
        )
        fold_of = {v.id: f for f, fold in enumerate(folds) for v in fold}
        # Judging order: round robin over the folds, so every wave is a cross-section of them.
        queue = [fold[i] for i in range(max(map(len, folds), default=0)) for fold in folds if i < len(fold)]
        waves = self._cv_waves(len(queue)) if sc.stop_early else [len(queue)]
        got: dict[str, dict[str, int]] = {c: {} for c in scored}
        decided: Configuration | None = None
        done = 0
        for size in waves:
            batch = queue[done : done + size]
            results = await asyncio.gather(*(
                _per_vote(judges[fold_of[v.id]][c], [v], order) for v in batch for c in scored
            ))  # fmt: skip
            for (v, c), r in zip(((v, c) for v in batch for c in scored), results, strict=True):
                got[c][v.id] = r[v.id]
            done += size
            if done < len(queue):
                judged = queue[:done]
                decided = settled(
                    {**{c: [got[c][v.id] for v in judged] for c in scored}, "default": [base[v.id] for v in judged]},
                    [base[v.id] for v in queue[done:]], z=sc.z, prior=prior, candidates=sc.candidates,
                    orders=sc.orders,
                )  # fmt: skip
                if decided is not None:
                    break
        judged_ids = {vid for vid in got[scored[0]]} if scored else set()
        ids = [v.id for fold in folds for v in fold if v.id in judged_ids]
        per_vote = {c: [got[c][vid] for vid in ids] for c in scored}
        per_vote["default"] = [base[vid] for vid in ids]
        skipped = [v.id for fold in folds for v in fold if v.id not in judged_ids]
        out = choose(per_vote, z=sc.z, folds=len(folds), prior=prior, candidates=sc.candidates, vote_ids=ids,
                     orders=sc.orders, skipped=skipped, served=decided)  # fmt: skip
        if not skipped:
            return out
        return replace(out, skipped_default=[base[vid] for vid in skipped], fold_ids=[[v.id for v in f] for f in folds],
                       fold_personas=[personas[f] for f in range(len(folds))])  # fmt: skip

    def _fold_judges(
        self, user_id: str, folds: Sequence[Sequence[Vote]], f: int, traces: Sequence[Trace], persona: str,
        scored: Sequence[str], llm: ChatBackend, ledger: JudgmentLedger, call_site: str,
    ) -> dict[str, Judge]:
        """Fold ``f``'s judges of the ``scored`` configurations: ``persona`` (written from the other folds) and
        demos drawn from the other folds with the fit's recipe (deterministic: a refit rebuilds the same set)."""
        outside = [v for g, fold in enumerate(folds) if g != f for v in fold]
        demos = tuple(self.demo_candidates(f"{user_id}\x1fcv{f}", outside, traces)[0])
        mode = self.config.score_mode
        every = {
            "persona_demos": Judge(llm, persona=persona, demos=demos, call_site=call_site, mode=mode, ledger=ledger),
            "persona": Judge(llm, persona=persona, call_site=call_site, mode=mode, ledger=ledger),
            "demos": Judge(llm, demos=demos, call_site=call_site, mode=mode, ledger=ledger),
        }
        return {c: every[c] for c in scored}

    async def complete_selection(
        self,
        user_id: str,
        sel: Selection,
        votes: Sequence[Vote],
        *,
        llm: ChatBackend | None = None,
        ledger: JudgmentLedger | None = None,
        prior: dict[str, GainPrior] | None = None,
    ) -> Selection:
        """``sel`` with the votes it skipped (:attr:`SelectionConfig.stop_early`) judged by their fold's judges —
        the persona stored with the selection, demos rebuilt from the stored traces — so the evidence is exactly
        what judging every vote would have stored (same votes, same order), and the guard re-applied under
        ``prior``. ``votes``: the user's context votes, train then validation as split (a superset of the selection's,
        whose relative order is the fit's). Unchanged when nothing was skipped.
        """
        if not sel.skipped:
            return sel
        if not sel.fold_ids or len(sel.fold_personas) != len(sel.fold_ids):
            raise ValueError("this selection skipped votes but does not record its folds; a full fit is due")
        llm = llm or self.llm
        ledger = ledger if ledger is not None else JudgmentLedger()
        by_id = {v.id: v for v in votes}
        folds = [[by_id[vid] for vid in fold] for fold in sel.fold_ids]
        fold_of = {vid: f for f, fold in enumerate(sel.fold_ids) for vid in fold}
        # in the caller's order (the fit's, train then validation): the demo recipe reads the traces in order
        traces, _ = await self.verify(user_id, [v for v in votes if v.id in fold_of], llm=llm, call_site="refit")
        scored = [c for c in sel.per_vote if c != "default"]
        judges = {
            f: self._fold_judges(user_id, folds, f, traces, sel.fold_personas[f], scored, llm, ledger, "refit")
            for f in {fold_of[vid] for vid in sel.skipped}
        }  # fmt: skip
        order = (lambda v: self._order(v, "bootstrap")) if sel.orders == 1 else None
        results = await asyncio.gather(*(
            _per_vote(judges[fold_of[vid]][c], [by_id[vid]], order) for vid in sel.skipped for c in scored
        ))  # fmt: skip
        got: dict[str, dict[str, int]] = {c: dict(zip(sel.vote_ids, sel.per_vote[c], strict=True)) for c in sel.per_vote}
        for (vid, c), r in zip(((vid, c) for vid in sel.skipped for c in scored), results, strict=True):
            got[c][vid] = r[vid]
        got["default"].update(zip(sel.skipped, sel.skipped_default, strict=True))
        # the fit's votes in fold order, then those earlier refits appended (as full judging would have stored them)
        ids = [vid for fold in sel.fold_ids for vid in fold] + [vid for vid in sel.vote_ids if vid not in fold_of]
        return choose({c: [got[c][vid] for vid in ids] for c in sel.per_vote}, z=sel.z, folds=sel.folds, prior=prior,
                      candidates=sel.candidates, vote_ids=ids, orders=sel.orders)  # fmt: skip

    @staticmethod
    def _cv_waves(n: int) -> list[int]:
        """Cross-validation's judging waves when it may stop early: half the votes, a quarter, the rest (two
        round trips more than judging at once; on the simulator's 12-vote users they skip about a quarter)."""
        first = (n + 1) // 2
        second = (n - first + 1) // 2
        return [w for w in (first, second, n - first - second) if w > 0]

    async def update(
        self,
        user_id: str,
        plan: FitPlan,
        *,
        llm: ChatBackend | None = None,
        ledger: JudgmentLedger | None = None,
        prior: dict[str, GainPrior] | None = None,
    ) -> Selection | None:
        """An incremental refit's judging: the guard's evidence extended by the ``plan.new`` votes, or None when
        they show the current persona + demos stale (then a full fit is due).

        The new votes are judged, in the cross-validation's presentation order(s), by every configuration the
        current selection holds evidence for — built from the *current* persona and demos, which have never seen
        these votes, so each is an out-of-sample judgment like cross-validation's — and by the default judge,
        whose verdict in the bootstrap order is the new vote's bootstrap trace (made and stored here, so a later
        full fit reuses it). Stale: a candidate's gain on the new votes falls short of its stored gain by more
        than ``selection.z`` standard errors (:meth:`~synth_agent.engine.selection.Selection.drifted`).
        """
        current = plan.current
        if current is None or not plan.new:
            raise ValueError("update() needs a plan with a current profile and new votes (see plan())")
        llm = llm or self.llm
        ledger = ledger if ledger is not None else JudgmentLedger()
        sc, mode = self.config.selection, self.config.score_mode
        sel = Selection.from_meta(current.meta["selection"])
        traces, _ = await self.verify(user_id, plan.new, llm=llm, call_site="refit")
        default = Judge(llm, call_site="refit", mode=mode, ledger=ledger)
        _seed_default(default, plan.new, traces)
        boot = tuple(Demo.model_validate(d) for d in current.meta.get("bootstrap_demos") or [])
        every = {
            "persona_demos": Judge(llm, persona=current.persona, demos=tuple(current.demos), call_site="refit",
                                   mode=mode, ledger=ledger),
            "persona": Judge(llm, persona=current.persona, call_site="refit", mode=mode, ledger=ledger),
            "demos": Judge(llm, demos=boot, call_site="refit", mode=mode, ledger=ledger),
            "default": default,
        }  # fmt: skip
        names = list(sel.per_vote)
        order = (lambda v: self._order(v, "bootstrap")) if sel.orders == 1 else None
        scores = await asyncio.gather(*(_per_vote(every[c], plan.new, order) for c in names))
        new = {c: [sc_[v.id] for v in plan.new] for c, sc_ in zip(names, scores, strict=True)}
        ids = [v.id for v in plan.new]
        if sel.skipped:
            # Cross-validation stopped early: judge the votes it skipped (the fold judges as fitted), so the drift
            # test and the guard below read, and the profile stores, exactly the evidence full judging would have.
            # (Deciding without them where they cannot change the decision was exact for what is served, but left
            # the smaller evidence stored: bench/refit_accuracy.py then served -0.51 points [-1.14, +0.12].)
            votes = [*plan.train, *plan.val]
            sel = await self.complete_selection(user_id, sel, votes, llm=llm, ledger=ledger, prior=prior)
        if sel.drifted(new, sc.z):
            return None
        return sel.extend(ids, new, z=sc.z, prior=prior, candidates=sc.candidates)

    def updated_profile(
        self, plan: FitPlan, selection: Selection, usage: dict[str, int], raced: DemoOutcome | None = None
    ) -> PersonaProfile:
        """The profile an incremental refit saves: the current persona and demos, with the new votes and the
        extended selection (``meta["refit"]`` says what was kept); ``raced``: the demos :meth:`refit_demos` raced
        for it (they replace the unraced ones)."""
        current = plan.current
        assert current is not None
        transient = ("fit_id", "run_id", "synthesis_thread", "usage", "refit")
        meta = {k: v for k, v in current.meta.items() if k not in transient}
        boot = [Demo.model_validate(d) for d in current.meta.get("bootstrap_demos") or []]
        meta.pop("bootstrap_demos", None)
        meta.update(
            train_ids=[v.id for v in plan.train], val_ids=[v.id for v in plan.val], fit_key=plan.key, usage=usage,
            full_fit_votes=int(current.meta.get("full_fit_votes") or len(current.vote_ids)),
            refit={"kind": "incremental", "from_version": current.version, "new_vote_ids": [v.id for v in plan.new]},
            **selection_meta(selection, boot),
        )  # fmt: skip
        update: dict[str, Any] = {"vote_ids": [v.id for v in (*plan.train, *plan.val)], "meta": meta}
        if raced is not None:
            meta["demos_status"] = "selected"
            update.update(demos=raced.demos, val_accuracy=raced.accuracy)
        return current.model_copy(update=update)

    async def refit_demos(
        self,
        user_id: str,
        plan: FitPlan,
        selection: Selection,
        *,
        llm: ChatBackend | None = None,
        ledger: JudgmentLedger | None = None,
    ) -> DemoOutcome | None:
        """Step 3 for an incremental refit whose guard now serves persona + demos while the current profile's demos
        were never raced (``demos_status == "unraced"``): the race a full fit on the refit's split would run — the
        current persona, step 1's pick on that split first (:meth:`pick_bootstrap`). None when nothing is to race."""
        current = plan.current
        if current is None or current.meta.get("demos_status") != "unraced" or not self.races_demos(selection):
            return None
        llm = llm or self.llm
        traces, _ = await self.verify(user_id, [*plan.train, *plan.val], llm=llm, call_site="refit")
        cands = self.bootstrap_candidates(user_id, plan.train, traces)
        won, _, _ = await self.pick_bootstrap(plan.val, cands, traces, llm=llm, ledger=ledger)
        return await self.select_demos(user_id, current.persona, plan.train, plan.val, traces,
                                       seed_demos=cands[won], llm=llm, ledger=ledger)  # fmt: skip

    def races_demos(self, selection: Selection | None) -> bool:
        """Whether a fit with this selection runs step 3's race (:attr:`FitConfig.race_demos`)."""
        return self.config.race_demos == "always" or selection is None or selection.served == "persona_demos"

    # ------------------------------------------------------------------ all steps
    def _result_config(self) -> dict[str, Any]:
        """The configuration a fitted profile depends on (how refits are done is not part of it). A knob added
        later is left out at the value that behaves as before, so upgrading does not make every profile stale."""
        out = {k: v for k, v in asdict(self.config).items() if k not in ("incremental", "full_refit_growth")}
        if out["selection"].get("orders") == 2:
            del out["selection"]["orders"]
        out["selection"].pop("stop_early", None)  # stopping early never changes what is served
        out.pop("race_demos", None)  # nor does racing only where demos are served
        if out["step1"] == "race":  # added with "most_traces" the default: profiles fitted before carry no key
            del out["step1"]
        return out

    async def _save(self, profile: PersonaProfile, *, since: int) -> PersonaProfile:
        """Save ``profile`` unless another run (a background fit racing a manual one) saved the same fit
        after version ``since``: then that version is returned and nothing is written. Checked through the
        store's optional ``current_persona`` just before the save (the synthesis graph, which always has a
        ``PreferenceMemory``, uses ``save_persona(since=...)``, which checks under the user's lock)."""
        assert self.memory is not None
        current_persona = getattr(self.memory, "current_persona", None)
        latest = await current_persona(profile.user_id) if current_persona is not None else None
        if latest is not None and latest.version > since and latest.same_fit(profile):
            return latest
        return await self.memory.save_persona(profile)

    def fit_key(self, train: Sequence[Vote], val: Sequence[Vote]) -> str:
        """What a fit's result depends on: the votes and their split, the budgets, the model."""
        payload = [[v.id for v in train], [v.id for v in val], self._result_config(), self.llm.model]
        return hashlib.sha256(orjson.dumps(payload, default=str)).hexdigest()

    def config_key(self) -> str:
        """The budgets, prompts and model alone (a profile fitted under another key is never updated incrementally)."""
        return hashlib.sha256(orjson.dumps([self._result_config(), self.llm.model], default=str)).hexdigest()

    def _new_votes(self, current: PersonaProfile | None, train: Sequence[Vote], val: Sequence[Vote]) -> list[Vote]:
        """The votes an incremental refit of ``current`` would judge, or [] when it must be a full fit: the
        configuration, model or prompts changed, the current profile has no per-vote evidence, is demoted or
        lacks demos, a vote it used is gone or changed sides, the context grew past ``full_refit_growth``, or its
        cross-validation skipped votes without recording the folds to judge them with (saved before they were)."""
        cfg = self.config
        if current is None or not (cfg.incremental and cfg.selection.enabled):
            return []
        meta = current.meta
        sel = meta.get("selection")
        if (
            current.model != self.llm.model or meta.get("config_key") != self.config_key() or demoted(current)
            or meta.get("demos_status") not in ("selected", "unraced") or not isinstance(sel, dict)
            or not sel.get("per_vote")
            or sorted([*(sel.get("vote_ids") or []), *(sel.get("skipped") or [])]) != sorted(current.vote_ids)
            or (sel.get("skipped") and not sel.get("fold_ids"))  # stopped early before the folds were kept
            or ("demos" in sel["per_vote"] and "bootstrap_demos" not in meta)
        ):  # fmt: skip
            return []
        train_ids, val_ids = {v.id for v in train}, {v.id for v in val}
        if not set(meta.get("train_ids") or ()) <= train_ids or not set(meta.get("val_ids") or ()) <= val_ids:
            return []
        old = set(current.vote_ids)
        new = [v for v in (*train, *val) if v.id not in old]
        base = int(meta.get("full_fit_votes") or len(old))
        if len(train_ids | val_ids) != len(old) + len(new) or len(old) + len(new) > base * (1 + cfg.full_refit_growth):
            return []
        return new

    def plan(self, votes: Sequence[Vote], current: PersonaProfile | None, *, force: bool = False) -> FitPlan:
        """The split and whether a fit has anything to do — the one rule both :meth:`fit` and the synthesis
        graph's ``load_votes`` node follow.

        The split is incremental when ``current`` (the user's saved persona) was fitted by the same model with
        this rule: its train and validation votes keep their side, so stored judgments stay valid. The fit is
        ``"unchanged"`` when ``current`` carries the same :meth:`fit_key` (unless ``force``). A ``"fit"`` lists in
        ``new`` the votes an incremental refit would judge (none with ``force``).
        """
        previous = None
        if current is not None and current.model == self.llm.model and current.meta.get("fit_key"):
            previous = (current.meta.get("train_ids") or [], current.meta.get("val_ids") or [])
        train, val = split_votes(votes, self.config.train_fraction, previous=previous)
        key = self.fit_key(train, val)
        if len(train) + len(val) < self.config.min_votes or not val:
            return FitPlan("not_enough_votes", train, val, key, current)
        if not force and current is not None and current.meta.get("fit_key") == key:
            return FitPlan("unchanged", train, val, key, current)
        return FitPlan("fit", train, val, key, current, [] if force else self._new_votes(current, train, val))

    async def fit(
        self,
        user_id: str,
        votes: Sequence[Vote] | None = None,
        *,
        progress: ProgressFn | None = None,
        save: bool = True,
        force: bool = False,
    ) -> FitResult:
        """Bootstrap → persona → cross-validated selection → demos for one user; saves a new persona version when
        ``save``. With ``race_demos="served"`` step 3 races only where the guard serves persona + demos.

        Votes default to the user's stored votes. Nothing is saved unless every step
        succeeded, so a cancelled or failed fit leaves the current persona untouched.
        When the current persona was fitted on exactly these votes with the same budgets,
        model and prompts, nothing is done (``status="unchanged"``) unless ``force``.

        With ``persona_traces="all"`` the persona does not depend on step 1's winner, so
        step 1's candidate race runs while the persona is written and step 3's random
        candidates are raced; step 1's winner then meets step 3's champion. The result is
        exactly that of running the steps one after the other (the race is exact whatever
        the order), in fewer round trips.
        """
        validate_user_id(user_id)
        cfg = self.config
        if votes is None:
            if self.memory is None:
                raise ValueError("fit() needs votes or a memory to load them from")
            votes = await self.memory.list_votes(user_id)
        foreign = [v.id for v in votes if v.user_id != user_id]
        if foreign:
            raise ValueError(f"{len(foreign)} vote(s) passed to fit({user_id!r}) belong to other users")
        current_persona = getattr(self.memory, "current_persona", None)
        current = await current_persona(user_id) if current_persona is not None else None
        plan = self.plan(votes, current, force=force or not save)
        train, val, key, n_context = plan.train, plan.val, plan.key, plan.n_context
        if plan.status == "not_enough_votes":
            return FitResult(
                user_id, "not_enough_votes",
                f"{user_id!r} has {n_context} context vote(s); a persona needs at least {cfg.min_votes}. "
                "The default judge is used until then.",
                n_context,
            )
        if plan.status == "unchanged":
            assert current is not None
            return FitResult(
                user_id, "unchanged",
                f"persona v{current.version} for {user_id!r} is already fitted on these {n_context} votes "
                "with this configuration; nothing to do (force=True refits)",
                n_context, profile=current, usage=CountingBackend(self.llm).usage(),
            )  # fmt: skip
        ledger = await JudgmentLedger.load(self.memory, user_id, self.llm.model)
        llm = CountingBackend(self.llm)
        if plan.new:
            assert current is not None
            if progress:
                progress("refit", 0, len(plan.new))
            prior = await tenant_prior(self.memory, user_id, cfg.selection) if self.memory is not None else {}
            updated = await self.update(user_id, plan, llm=llm, ledger=ledger, prior=prior)
            raced = await self.refit_demos(user_id, plan, updated, llm=llm, ledger=ledger) if updated else None
            if progress:
                progress("refit", len(plan.new), len(plan.new))
            if updated is not None:
                usage = {**llm.usage(), "judgments_reused": ledger.hits, "judgments_new": ledger.misses}
                profile = self.updated_profile(plan, updated, usage, raced)
                if save and self.memory is not None:
                    await ledger.save(self.memory, user_id, self.llm.model, keep_unused=True)
                    profile = await self._save(profile, since=current.version)
                return FitResult(
                    user_id, "fitted",
                    f"persona v{profile.version} for {user_id!r} from {n_context} votes: v{current.version}'s persona "
                    f"and demos kept, {len(plan.new)} new vote(s) judged (served: {updated.served})",
                    n_context, profile=profile, usage=usage,
                )  # fmt: skip
            # the new votes show the persona stale: a full fit (their traces are stored, its judgments in the ledger)
        notes: Rationales = {}  # the persona writer's rationales, shared with cross-validation
        boot, persona = await self._steps_one_two(user_id, train, val, llm, ledger, progress, notes)
        demo_error: str | None = None

        async def step_three() -> DemoOutcome:
            nonlocal demo_error
            try:
                return await self.select_demos(
                    user_id, persona, train, val, boot.traces, seed_demos=boot.demos, progress=progress, llm=llm,
                    ledger=ledger,
                )  # fmt: skip
            except (LLMError, prompts.ParseError) as e:
                # The persona is written (minutes of work on a slow judge): keep it, without demos, marked
                # as such, instead of losing it with the step that failed. The next fit retries step 3.
                demo_error = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
                return DemoOutcome(demos=[], accuracy=float("nan"), candidates_scored=0)

        async def selecting() -> Selection | None:
            if not cfg.selection.enabled:
                return None
            if progress:
                progress("select", 0, 1)
            prior = await tenant_prior(self.memory, user_id, cfg.selection) if self.memory is not None else {}
            out = await self.select_configuration(
                user_id, [*train, *val], boot.traces, llm=llm, ledger=ledger, prior=prior, rationales=notes
            )
            if progress:
                progress("select", 1, 1)
            return out

        # Cross-validation needs neither step 3's demos nor the fit's persona: both run at once (their prompts
        # share no ledger key, so the judgments and the result are those of running them one after the other).
        unraced = False
        if cfg.race_demos == "served" and cfg.selection.enabled:
            # Step 3 only where its demos are served: cross-validation first (it decides), then the race or not.
            selection = await selecting()
            unraced = not self.races_demos(selection)
            sel = (DemoOutcome(self.unraced_demos(user_id, train, val, boot.traces), float("nan"), 0)
                   if unraced else await step_three())  # fmt: skip
        else:
            try:
                async with asyncio.TaskGroup() as tg:  # one failing cancels the other
                    demos_task = tg.create_task(step_three())
                    select_task = tg.create_task(selecting())
            except BaseExceptionGroup as group:
                raise group.exceptions[0] from None
            sel, selection = demos_task.result(), select_task.result()
        usage = {**llm.usage(), "judgments_reused": ledger.hits, "judgments_new": ledger.misses}
        profile = PersonaProfile(
            user_id=user_id,
            persona=persona,
            demos=sel.demos,
            val_accuracy=None if demo_error or unraced else sel.accuracy,
            model=self.llm.model,
            prompt_version=cfg.persona_prompt_version,
            vote_ids=[v.id for v in (*train, *val)],
            meta={
                "train_ids": [v.id for v in train],
                "val_ids": [v.id for v in val],
                "bootstrap_accuracy": boot.accuracy,
                "n_traces": len(boot.traces),
                "n_verified": sum(t.verified for t in boot.traces),
                "reused_traces": boot.reused_traces,
                "persona_trace_ids": boot.persona_trace_ids,
                "verify": cfg.verify,
                "seed": cfg.seed,
                "usage": usage,
                "fit_key": None if demo_error else key,  # a persona without its demos is not "unchanged"
                "config_key": self.config_key(),
                "full_fit_votes": n_context,
                "demos_status": "failed" if demo_error else "unraced" if unraced else "selected",
                **({"demo_error": demo_error} if demo_error else {}),
                **selection_meta(selection, boot.demos),
            },
        )
        if save and self.memory is not None:
            if progress:
                progress("save", 0, 1)
            await ledger.save(self.memory, user_id, self.llm.model)
            profile = await self._save(profile, since=current.version if current is not None else 0)
            if progress:
                progress("save", 1, 1)
        summary = (
            f"saved WITHOUT demos: the demo step failed ({demo_error}); the next fit retries it"
            if demo_error
            else f"serves {selection.served if selection else 'persona_demos'}; demos not raced"
            if unraced
            else f"validation accuracy {sel.accuracy:.0%}"
        )
        return FitResult(
            user_id, "fitted",
            f"persona v{profile.version} for {user_id!r} from {n_context} votes ({summary})",
            n_context,
            profile=profile,
            bootstrap_demos=boot.demos,
            traces=boot.traces,
            usage=usage,
            demo_error=demo_error,
        )

    async def _steps_one_two(
        self,
        user_id: str,
        train: Sequence[Vote],
        val: Sequence[Vote],
        llm: ChatBackend,
        ledger: JudgmentLedger,
        progress: ProgressFn | None,
        rationales: Rationales | None = None,
    ) -> tuple[BootstrapOutcome, str]:
        """Bootstrap and persona. With ``persona_traces="all"`` the persona does not depend on step 1's
        winner, so it is written while step 1's candidates are raced (one round trip less)."""
        if self.config.persona_traces != "all":
            boot = await self.bootstrap(user_id, train, val, progress=progress, llm=llm, ledger=ledger)
            if progress:
                progress("persona", 0, 1)
            persona = await self.write_persona([*train, *val], boot.traces, boot.persona_trace_ids, llm=llm,
                                               rationales=rationales)  # fmt: skip
            if progress:
                progress("persona", 1, 1)
            return boot, persona
        # Step 1's opener (the zero-shot candidate) needs no traces: judge it while the traces are made. The
        # validation votes' traces are the zero-shot judge's verdicts in the bootstrap order (the same prompt):
        # the opener leaves those orders to them, and they are recorded in the ledger for the race.
        # ("most_traces" judges nothing in step 1: no opener.)
        scorer = self._default_scorer(llm, ledger)
        by_trace = scorer.mode == "cot"
        opener = asyncio.ensure_future(self._judge_all(
            scorer, val if self.config.step1 == "race" else (),
            skip=(lambda v, cf: cf == self._order(v, "bootstrap")) if by_trace else None,
        ))  # fmt: skip
        try:
            traces, reused = await self.verify(user_id, [*train, *val], progress=progress, llm=llm)
            await opener
        except BaseException:
            opener.cancel()
            await asyncio.gather(opener, return_exceptions=True)
            raise
        _seed_default(scorer, val, traces)
        cand_list = self.bootstrap_candidates(user_id, train, traces)
        if progress:
            progress("candidates", 0, len(cand_list))
            progress("persona", 0, 1)
        persona_ids = self._persona_ids([*train, *val], traces, ())
        try:
            async with asyncio.TaskGroup() as tg:  # one failing cancels the other
                ranking = tg.create_task(self.pick_bootstrap(val, cand_list, traces, llm=llm, ledger=ledger))
                writing = tg.create_task(
                    self.write_persona([*train, *val], traces, persona_ids, llm=llm, rationales=rationales)
                )
        except BaseExceptionGroup as group:
            raise group.exceptions[0] from None
        (won, accuracy, judgments), persona = ranking.result(), writing.result()
        if progress:
            progress("candidates", len(cand_list), len(cand_list))
            progress("persona", 1, 1)
        boot = BootstrapOutcome(
            traces=traces, persona_trace_ids=persona_ids, demos=list(cand_list[won]),
            accuracy=accuracy, candidates_scored=len(cand_list), reused_traces=reused,
            judgments=judgments,
        )  # fmt: skip
        return boot, persona
