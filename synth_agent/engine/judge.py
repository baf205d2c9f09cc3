"""Pairwise judges: default (no user info) and personalized (persona + demos).

A judgment is always made in both presentation orders, (A, B) and (B, A), and the
two verdicts are combined: position bias cancels out and disagreement between
orders is reported as a tie with zero confidence instead of a coin flip.

Two modes:

* ``cot`` — the judge reasons, then answers JSON (works on any chat model);
* ``logprob`` — the judge answers a single letter and we read P(A) from the
  endpoint's log-probabilities (one generated token, far cheaper); endpoints that
  return no log-probabilities fall back to ``cot`` for that call.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from synth_agent import prompts
from synth_agent.engine.ledger import JudgmentLedger, pair_digest, prefix_digest
from synth_agent.engine.selection import served_demos, served_persona
from synth_agent.llm.base import ChatBackend, Completion
from synth_agent.models import Demo, Judgment, Message, OrderJudgment, PersonaProfile, Vote, as_messages
from synth_agent.prompts import ParseError

JudgeMode = Literal["cot", "logprob"]

MAX_PARSE_ATTEMPTS = 3


@dataclass(frozen=True)
class Judge:
    """A judge bound to an LLM backend and (optionally) one user's persona and demos.

    Immutable and cheap to build: make one per user per request. ``from_profile``
    is the usual way to get a personalized judge.

    ``ledger``: a :class:`~synth_agent.engine.ledger.JudgmentLedger` to serve repeated
    single-order judgments from (and record new ones in); verdicts from it carry no
    reasoning text.
    """

    llm: ChatBackend
    persona: str | None = None
    demos: Sequence[Demo] = field(default_factory=tuple)
    mode: JudgeMode = "cot"
    call_site: str = "judge"
    max_tokens: int | None = 400
    ledger: JudgmentLedger | None = field(default=None, compare=False)

    @classmethod
    def from_profile(
        cls, llm: ChatBackend, profile: PersonaProfile | None, *, guard: bool = True, **kw: object
    ) -> Judge:
        """The judge a user is served: what the per-user guard allows of ``profile``
        (:func:`~synth_agent.engine.selection.served`: persona + demos, persona only, step 1's demos
        only, or the default judge). ``guard=False`` takes the profile's persona and demos as they are.
        """
        if profile is None:
            return cls(llm, **kw)  # type: ignore[arg-type]
        if not guard:
            return cls(llm, persona=profile.persona, demos=tuple(profile.demos), **kw)  # type: ignore[arg-type]
        return cls(llm, persona=served_persona(profile), demos=tuple(served_demos(profile)), **kw)  # type: ignore[arg-type]

    @property
    def personalized(self) -> bool:
        """True when the judge carries any user information (a persona or demos)."""
        return bool(self.persona) or bool(self.demos)

    def with_demos(self, demos: Sequence[Demo]) -> Judge:
        return replace(self, demos=tuple(demos))

    def _ledger_prefix(self) -> str:
        """Digest of everything before the pair (cached on the instance: demos are hashed once)."""
        cached = self.__dict__.get("_prefix")
        if cached is None:
            version = prompts.LABEL_JUDGE_VERSION if self.mode == "logprob" else prompts.JUDGE_VERSION
            cached = prefix_digest(
                model=self.llm.model, mode=f"{self.mode}:{self.max_tokens}", version=version,
                persona=self.persona, demos=self.demos,
            )  # fmt: skip
            object.__setattr__(self, "_prefix", cached)
        return cached

    # ------------------------------------------------------------ one order
    async def judge_order(
        self, context: Sequence[Message], first: str, second: str, *, extra_demos: Sequence[Demo] = ()
    ) -> tuple[Literal["A", "B"], str, float | None]:
        """Judge ``first`` (shown as A) vs ``second`` (shown as B). Returns (label, reasoning, P(first))."""
        if self.ledger is not None and not extra_demos:
            key = pair_digest(self._ledger_prefix(), context, first, second)
            hit = self.ledger.get(key)
            if hit is not None:
                return hit[0], "", hit[1]
            label, reasoning, p_first = await self._judge_order(context, first, second, ())
            self.ledger.put(key, label, p_first)
            return label, reasoning, p_first
        return await self._judge_order(context, first, second, extra_demos)

    async def _judge_order(
        self, context: Sequence[Message], first: str, second: str, extra_demos: Sequence[Demo]
    ) -> tuple[Literal["A", "B"], str, float | None]:
        demos = [*self.demos, *extra_demos]
        if self.mode == "logprob":
            got = await self._logprob_order(context, first, second, demos)
            if got is not None:
                return got
        msgs = prompts.judge_messages(context, first, second, persona=self.persona, demos=demos)
        last: Exception | None = None
        for attempt in range(MAX_PARSE_ATTEMPTS):
            # A model that ignored the format is asked again with a different seed (the first
            # attempt stays cacheable at temperature 0; retries must not replay the same answer).
            comp = await self.llm.complete(
                msgs,
                call_site=self.call_site,
                temperature=0.0 if attempt == 0 else 0.3,
                max_tokens=self.max_tokens,
                json_mode=True,
                seed=None if attempt == 0 else attempt,
            )
            try:
                parsed = prompts.parse_judgment(comp.text)
            except ParseError as exc:
                last = exc
                continue
            return parsed.preferred, parsed.reasoning, None
        raise ParseError(f"judge gave no readable answer after {MAX_PARSE_ATTEMPTS} attempts: {last}")

    async def _logprob_order(
        self, context: Sequence[Message], first: str, second: str, demos: Sequence[Demo]
    ) -> tuple[Literal["A", "B"], str, float] | None:
        msgs = prompts.label_judge_messages(context, first, second, persona=self.persona, demos=demos)
        comp = await self.llm.complete(msgs, call_site=self.call_site + ":logprob", max_tokens=1, logprobs=5)
        p_first = label_probability(comp)
        if p_first is None:
            return None
        return ("A" if p_first >= 0.5 else "B"), "", p_first

    # ------------------------------------------------------------ both orders
    async def compare(
        self, context: Sequence[Message], a: str, b: str, *, extra_demos: Sequence[Demo] = ()
    ) -> Judgment:
        """Which of ``a`` and ``b`` this judge's user prefers, judged in both orders.

        ``context`` may be Message objects, role/content dicts, or the user's message as a string.
        """
        context = as_messages(context)
        (l1, r1, p1), (l2, r2, p2) = await asyncio.gather(
            self.judge_order(context, a, b, extra_demos=extra_demos),
            self.judge_order(context, b, a, extra_demos=extra_demos),
        )
        o1 = OrderJudgment(swapped=False, preferred=l1, reasoning=r1, p_a=p1 if p1 is not None else None)
        o2 = OrderJudgment(
            swapped=True,
            preferred="A" if l2 == "B" else "B",
            reasoning=r2,
            p_a=(1.0 - p2) if p2 is not None else None,
        )
        return combine_orders(o1, o2)


async def count_correct(
    judge: Judge, votes: Sequence[Vote], orders: Callable[[Vote], Sequence[bool]]
) -> tuple[int, int]:
    """(correct, judged): ``judge`` on each vote in the presentation orders ``orders(vote)`` gives.

    An order is ``chosen_first``; each order is one judgment, so both orders of a vote count twice
    and position bias cannot inflate accuracy. Shared by validation scoring and evaluation.
    """
    jobs = []
    truths: list[str] = []
    for v in votes:
        for chosen_first in orders(v):
            first, second = (v.chosen, v.rejected) if chosen_first else (v.rejected, v.chosen)
            jobs.append(judge.judge_order(v.context, first, second))
            truths.append("A" if chosen_first else "B")
    results = await asyncio.gather(*jobs)
    return sum(1 for (label, _, _), t in zip(results, truths, strict=True) if label == t), len(truths)


def combine_orders(o1: OrderJudgment, o2: OrderJudgment) -> Judgment:
    """Merge the two presentation orders into one verdict on the caller's A/B."""
    pa = [o.p_a if o.p_a is not None else (1.0 if o.preferred == "A" else 0.0) for o in (o1, o2)]
    p_a = sum(pa) / 2
    preferred: Literal["A", "B", "tie"]
    if o1.preferred == o2.preferred:
        preferred = o1.preferred
        confidence = abs(p_a - 0.5) * 2
    else:
        # Orders disagree: position decided it, not content.
        preferred = "tie"
        confidence = 0.0
    reasoning = o1.reasoning or o2.reasoning
    return Judgment(preferred=preferred, confidence=confidence, reasoning=reasoning, p_a=p_a, orders=[o1, o2])


def label_probability(comp: Completion) -> float | None:
    """P(label A) from the first generated token's top log-probabilities, or None if absent."""
    if not comp.top_logprobs:
        return None
    first = comp.top_logprobs[0]
    mass = {"A": 0.0, "B": 0.0}
    for alt in first:
        tok = alt.token.strip().strip('"').upper()
        if tok in mass:
            mass[tok] += math.exp(alt.logprob)
    total = mass["A"] + mass["B"]
    if total <= 0.0:
        return None
    return mass["A"] / total
