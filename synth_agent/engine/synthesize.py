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

Cost control: presentation orders are a pure function of (seed, vote id), so a
refit re-uses stored traces for votes already judged; candidate sets that repeat
are scored once; the LLM layer caches temperature-0 calls.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from synth_agent import prompts
from synth_agent.engine.judge import Judge, count_correct
from synth_agent.llm.base import ChatBackend, ChatMessage, Completion, LLMStats
from synth_agent.models import Demo, PersonaProfile, Trace, Vote, validate_user_id

ProgressFn = Callable[[str, int, int], None]
"""``progress(stage, done, total)``; stages: bootstrap, candidates, persona, demos, save."""


@dataclass(frozen=True)
class FitConfig:
    """Budgets and knobs of one fit. Defaults follow the paper (10 trials, 10 demo candidates)."""

    train_fraction: float = 0.7
    min_votes: int = 5
    n_trials: int = 10
    n_demo_candidates: int = 10
    max_bootstrapped_demos: int = 4
    max_labeled_demos: int = 4
    target_accuracy: float = 1.0
    candidate_wave: int = 5
    val_both_orders: bool = False
    verify: bool = True
    seed: int = 0
    persona_prompt_version: str = prompts.PERSONA_WRITER_VERSION
    max_persona_examples: int = 16
    max_persona_prompt_chars: int = 60_000
    persona_traces: Literal["all", "best"] = "all"
    """Traces the persona is written from: every verified trace (best trial's first), or only the
    best trial's (the paper's choice). "all" grounds the persona in more evidence; with small
    trials (1–4 traces) "best" under-informs it — measured in the README's eval table."""

    def __post_init__(self) -> None:
        if not 0.0 < self.train_fraction < 1.0:
            raise ValueError("train_fraction must be between 0 and 1")
        if self.min_votes < 2:
            raise ValueError("min_votes must be at least 2 (one train and one validation vote)")
        if self.persona_traces not in ("all", "best"):
            raise ValueError("persona_traces must be 'all' or 'best'")
        for name in ("n_trials", "n_demo_candidates", "candidate_wave", "max_persona_examples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")


class VoteStore(Protocol):
    """The slice of :class:`store.memory.PreferenceMemory` the engine uses."""

    async def list_votes(self, user_id: str) -> list[Vote]: ...
    async def get_traces(self, user_id: str) -> list[Trace]: ...
    async def put_traces(self, user_id: str, traces: list[Trace]) -> None: ...
    async def save_persona(self, profile: PersonaProfile) -> PersonaProfile: ...


@dataclass
class FitResult:
    """Outcome of :meth:`Synthesizer.fit`. ``status='not_enough_votes'`` is a normal result, not an error."""

    user_id: str
    status: Literal["fitted", "not_enough_votes"]
    message: str
    n_votes: int
    profile: PersonaProfile | None = None
    bootstrap_demos: list[Demo] = field(default_factory=list)
    traces: list[Trace] = field(default_factory=list)
    usage: dict[str, int] = field(default_factory=dict)


@dataclass
class BootstrapOutcome:
    traces: list[Trace]
    persona_trace_ids: list[str]
    demos: list[Demo]
    accuracy: float
    candidates_scored: int
    reused_traces: int


@dataclass
class DemoOutcome:
    demos: list[Demo]
    accuracy: float
    candidates_scored: int


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

    async def complete(self, messages: Sequence[ChatMessage], **kw: Any) -> Completion:
        comp = await self.inner.complete(messages, **kw)
        self.calls += 1
        if comp.cached:
            self.cached += 1
        else:
            self.prompt_tokens += comp.prompt_tokens
            self.completion_tokens += comp.completion_tokens
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
        }


def stable_coin(*parts: object) -> bool:
    """A deterministic fair coin from its arguments (presentation order of a vote)."""
    h = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return h[0] & 1 == 1


def stable_rng(*parts: object) -> random.Random:
    h = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(h[:8], "big"))


def split_votes(votes: Sequence[Vote], train_fraction: float = 0.7) -> tuple[list[Vote], list[Vote]]:
    """Temporal train/validation split of a user's context votes (time order kept).

    Votes that carry ``split`` labels are honoured (``train``/``val``; ``test`` votes are
    never context). Otherwise the first ``train_fraction`` are train, the rest validation,
    with at least one of each.
    """
    ordered = [v for v in votes if v.split != "test"]
    if any(v.split for v in ordered):
        train = [v for v in ordered if v.split == "train"]
        val = [v for v in ordered if v.split == "val"]
        if train and val:
            return train, val
    n = len(ordered)
    if n < 2:
        return list(ordered), []
    n_train = min(n - 1, max(1, round(n * train_fraction)))
    return list(ordered[:n_train]), list(ordered[n_train:])


def demo_from_vote(vote: Vote, chosen_first: bool, reasoning: str | None) -> Demo:
    return Demo(
        vote_id=vote.id,
        context=vote.context,
        chosen=vote.chosen,
        rejected=vote.rejected,
        chosen_first=chosen_first,
        reasoning=reasoning,
    )


def _demo_key(demos: Sequence[Demo]) -> tuple[tuple[str, bool, bool], ...]:
    return tuple((d.vote_id, d.chosen_first, d.reasoning is not None) for d in demos)


class Synthesizer:
    """Fits personas for users of one tenant on one LLM backend.

    Holds no per-user state: many fits (different users, even different
    backends via separate instances) run concurrently in one process.

        >>> Synthesizer  # doctest: +ELLIPSIS
        <class '...Synthesizer'>
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

    async def _accuracy(
        self, judge: Judge, val: Sequence[Vote], demos: Sequence[Demo], purpose: str
    ) -> float:
        """Share of validation judgments the judge gets right with ``demos`` as few-shot examples."""

        def orders(v: Vote) -> list[bool]:
            return [True, False] if self.config.val_both_orders else [self._order(v, purpose)]

        correct, judged = await count_correct(judge.with_demos(demos), val, orders)
        return correct / max(1, judged)

    # ------------------------------------------------------------------ step 1
    async def bootstrap(
        self,
        user_id: str,
        train: Sequence[Vote],
        val: Sequence[Vote],
        *,
        progress: ProgressFn | None = None,
        llm: ChatBackend | None = None,
    ) -> BootstrapOutcome:
        """Judge train votes without user info, verify against the votes, pick the best trace set."""
        llm = llm or self.llm
        cfg = self.config
        stored: dict[tuple[str, bool, str], Trace] = {}
        if self.memory is not None:
            stored = {(t.vote_id, t.chosen_first, t.model): t for t in await self.memory.get_traces(user_id)}
        judge = Judge(llm, call_site="bootstrap")
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
        traces = [traces_by_vote[v.id] for v in train]

        by_id = {v.id: v for v in train}
        usable = [t for t in traces if t.verified] if cfg.verify else [t for t in traces if t.reasoning]
        trace_demos = [self._trace_demo(by_id[t.vote_id], t) for t in usable]

        # Candidate few-shot sets, DSPy-style: zero-shot, labels-only, then random subsets.
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
            size = r.randint(1, min(cfg.max_bootstrapped_demos, len(pool)))
            chosen = pool[:size]
            used = {d.vote_id for d in chosen}
            extra = [v for v in train if v.id not in used]
            r.shuffle(extra)
            n_labels = r.randint(0, min(cfg.max_labeled_demos, len(extra)))
            chosen += [demo_from_vote(v, self._order(v, "label"), None) for v in extra[:n_labels]]
            candidates.append(chosen)
        unique: dict[tuple[tuple[str, bool, bool], ...], list[Demo]] = {}
        for c in candidates:
            unique.setdefault(_demo_key(c), c)
        cand_list = list(unique.values())
        if progress:
            progress("candidates", 0, len(cand_list))
        scorer = Judge(llm, call_site="bootstrap_score")
        scores = await asyncio.gather(*(self._accuracy(scorer, val, c, "val") for c in cand_list))
        if progress:
            progress("candidates", len(cand_list), len(cand_list))

        def rank(i: int) -> tuple[float, int, int]:
            n_traces = sum(1 for d in cand_list[i] if d.reasoning is not None)
            return (scores[i], n_traces, -i)

        best = max(range(len(cand_list)), key=rank)
        best_ids = [d.vote_id for d in cand_list[best] if d.reasoning is not None]
        if cfg.persona_traces == "all" or not best_ids:
            best_ids += [t.vote_id for t in usable if t.vote_id not in best_ids]
        return BootstrapOutcome(
            traces=traces,
            persona_trace_ids=best_ids,
            demos=cand_list[best],
            accuracy=scores[best],
            candidates_scored=len(cand_list),
            reused_traces=reused,
        )

    # ------------------------------------------------------------------ step 2
    async def write_persona(
        self,
        train: Sequence[Vote],
        traces: Sequence[Trace],
        trace_ids: Sequence[str],
        *,
        llm: ChatBackend | None = None,
    ) -> str:
        """One persona-writer call over the chosen traces; trims examples when they overflow."""
        llm = llm or self.llm
        cfg = self.config
        by_vote = {v.id: v for v in train}
        by_trace = {t.vote_id: t for t in traces}
        examples: list[prompts.TraceExample] = []
        for vid in trace_ids:
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
        while True:
            msgs = prompts.persona_messages(examples, version=cfg.persona_prompt_version)
            size = sum(len(m["content"]) for m in msgs)
            if size > cfg.max_persona_prompt_chars and len(examples) > 1:
                examples = examples[:-1]
                continue
            try:
                comp = await llm.complete(msgs, call_site="persona", temperature=0.0, max_tokens=400)
            except Exception as exc:  # context overflow reported by the endpoint: trim and retry
                if _is_context_overflow(exc) and len(examples) > 1:
                    examples = examples[: max(1, len(examples) // 2)]
                    continue
                raise
            return prompts.parse_persona(comp.text)

    # ------------------------------------------------------------------ step 3
    async def select_demos(
        self,
        user_id: str,
        persona: str,
        train: Sequence[Vote],
        val: Sequence[Vote],
        traces: Sequence[Trace],
        *,
        seed_demos: Sequence[Demo] = (),
        progress: ProgressFn | None = None,
        llm: ChatBackend | None = None,
    ) -> DemoOutcome:
        """Random search over demo sets for the persona-informed judge, scored on validation."""
        llm = llm or self.llm
        cfg = self.config
        by_vote = {v.id: v for v in train}
        usable = [t for t in traces if (t.verified or not cfg.verify) and t.reasoning and t.vote_id in by_vote]
        trace_demos = [self._trace_demo(by_vote[t.vote_id], t) for t in usable]
        candidates: list[list[Demo]] = []
        if seed_demos:
            candidates.append(list(seed_demos))
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
        judge = Judge(llm, persona=persona, call_site="demo_select")
        best: list[Demo] = candidates[0] if candidates else []
        best_acc = -1.0
        scored = 0
        if progress:
            progress("demos", 0, len(candidates))
        for start in range(0, len(candidates), cfg.candidate_wave):
            wave = candidates[start : start + cfg.candidate_wave]
            accs = await asyncio.gather(*(self._accuracy(judge, val, c, "val") for c in wave))
            scored += len(wave)
            for c, a in zip(wave, accs, strict=True):
                if a > best_acc:
                    best, best_acc = c, a
            if progress:
                progress("demos", scored, len(candidates))
            if best_acc >= cfg.target_accuracy:
                break
        if not candidates:
            best_acc = await self._accuracy(judge, val, [], "val")
        return DemoOutcome(demos=best, accuracy=max(best_acc, 0.0), candidates_scored=scored)

    # ------------------------------------------------------------------ all steps
    async def fit(
        self,
        user_id: str,
        votes: Sequence[Vote] | None = None,
        *,
        progress: ProgressFn | None = None,
        save: bool = True,
    ) -> FitResult:
        """Bootstrap → persona → demos for one user; saves a new persona version when ``save``.

        Votes default to the user's stored votes. Nothing is saved unless every step
        succeeded, so a cancelled or failed fit leaves the current persona untouched.
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
        train, val = split_votes(votes, cfg.train_fraction)
        n_context = len(train) + len(val)
        if n_context < cfg.min_votes or not val:
            return FitResult(
                user_id, "not_enough_votes",
                f"{user_id!r} has {n_context} context vote(s); a persona needs at least {cfg.min_votes}. "
                "The default judge is used until then.",
                n_context,
            )
        llm = CountingBackend(self.llm)
        boot = await self.bootstrap(user_id, train, val, progress=progress, llm=llm)
        if progress:
            progress("persona", 0, 1)
        persona = await self.write_persona(train, boot.traces, boot.persona_trace_ids, llm=llm)
        if progress:
            progress("persona", 1, 1)
        sel = await self.select_demos(
            user_id, persona, train, val, boot.traces, seed_demos=boot.demos, progress=progress, llm=llm
        )
        profile = PersonaProfile(
            user_id=user_id,
            persona=persona,
            demos=sel.demos,
            val_accuracy=sel.accuracy,
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
                "usage": llm.usage(),
            },
        )
        if save and self.memory is not None:
            if progress:
                progress("save", 0, 1)
            profile = await self.memory.save_persona(profile)
            if progress:
                progress("save", 1, 1)
        return FitResult(
            user_id, "fitted",
            f"persona v{profile.version} for {user_id!r} from {n_context} votes "
            f"(validation accuracy {sel.accuracy:.0%})",
            n_context,
            profile=profile,
            bootstrap_demos=boot.demos,
            traces=boot.traces,
            usage=llm.usage(),
        )



def _is_context_overflow(exc: Exception) -> bool:
    text = str(exc).lower()
    return any(s in text for s in ("context length", "context_length", "maximum context", "too many tokens"))
