"""Pairwise judges: default (no user info) and personalized (persona + demos).

A judgment is always made in both presentation orders, (A, B) and (B, A), and the
two verdicts are combined: position bias cancels out and disagreement between
orders is reported as a tie with zero confidence instead of a coin flip.

Two modes:

* ``cot`` — the judge reasons, then answers JSON (works on any chat model);
* ``logprob`` — the judge answers a single letter and we read P(A) from the
  endpoint's log-probabilities (one generated token, far cheaper); endpoints that
  return no log-probabilities fall back to ``cot`` for that call.

What a weak model cannot break: the chain-of-thought answer is asked for with its JSON
schema (:data:`JUDGMENT_SCHEMA`; endpoints configured for constrained decoding only
generate answers that follow it, with bounded reasoning so the JSON closes within
``max_tokens``); an order whose answer stays unreadable after :data:`MAX_PARSE_ATTEMPTS`
is a **tie** (P = 0.5, counted in the client's ``unparseable`` counter), never an
exception and never a default letter; and a prompt over the model's context window loses
demos from the end until it fits (:mod:`synth_agent.llm.budget`).
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
from synth_agent.llm.base import ChatBackend, ChatMessage, Completion
from synth_agent.llm.budget import fits, note, too_long
from synth_agent.llm.errors import ContextOverflowError
from synth_agent.models import Demo, Judgment, Message, OrderJudgment, PersonaProfile, Vote, as_messages
from synth_agent.prompts import ParseError

JudgeMode = Literal["cot", "logprob"]
OrderLabel = Literal["A", "B", "tie"]
"""One order's verdict: the response shown first ("A") or second ("B") wins, or "tie" (no readable answer)."""

MAX_PARSE_ATTEMPTS = 3
REASONING_CHARS = 600
"""Longest reasoning a constrained answer may have: ~150–200 tokens, so the JSON closes within the
default ``max_tokens`` of 400 instead of being cut off mid-string."""
RENDERED_DEMOS_MAX = 1024
"""Most demos a family of judges keeps rendered (a fit uses a few dozen); past it the memo starts over."""
JUDGMENT_SCHEMA: dict[str, object] = {
    "type": "object",
    "properties": {
        "reasoning": {"type": "string", "maxLength": REASONING_CHARS},
        "preferred": {"type": "string", "enum": ["A", "B"]},
    },
    "required": ["reasoning", "preferred"],
}
"""The chain-of-thought judge's answer, as sent for constrained decoding (reasoning first, then the letter)."""


@dataclass
class _Rendered:
    """A family of judges' rendered prompt pieces: the system turn (by ``label_only``) and each demo's turns
    (by ``(id(demo), label_only)``, with the demo itself, so its id cannot be reused while it is here)."""

    system: dict[bool, ChatMessage] = field(default_factory=dict)
    demos: dict[tuple[int, bool], tuple[Demo, tuple[ChatMessage, ChatMessage]]] = field(default_factory=dict)


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
        judge = replace(self, demos=tuple(demos))
        object.__setattr__(judge, "_rendered", self._turns())  # same persona: the rendered turns still hold
        return judge

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

    def _turns(self) -> _Rendered:
        """Rendered prompt pieces of this judge and the judges made from it by :meth:`with_demos` (shared)."""
        memo = self.__dict__.get("_rendered")
        if memo is None:
            memo = _Rendered()
            object.__setattr__(self, "_rendered", memo)
        return memo

    def _prompt(
        self, context: Sequence[Message], first: str, second: str, *, label_only: bool
    ) -> Callable[[Sequence[Demo]], list[ChatMessage]]:
        """``build(demos)``: the judge prompt of (first, second) with ``demos``, equal to
        :func:`prompts.judge_messages` (``label_only``: :func:`prompts.label_judge_messages`).

        The system turn and each demo's turns are rendered once per family of judges (this judge and
        those :meth:`with_demos` made from it: a fit's candidate demo sets draw on the same demos) instead
        of once per judgment: rendering the same demos again for every validation vote was ~5% of the
        client's CPU in a 20-user ``bench/fit_cost.py`` run (py-spy). The memo holds each demo it renders
        (keyed by identity, so an id is never reused while it is there) and lives as long as the judges.
        The cached message dicts are shared by the prompts built from them and must not be mutated.
        """
        memo = self._turns()
        system = memo.system.get(label_only)
        if system is None:
            version = prompts.LABEL_JUDGE_VERSION if label_only else prompts.JUDGE_VERSION
            system = memo.system[label_only] = prompts.judge_system_message(self.persona, version=version)
        last = prompts.pair_turn(context, first, second)
        demo_memo = memo.demos

        def turns(d: Demo) -> tuple[ChatMessage, ChatMessage]:
            hit = demo_memo.get((id(d), label_only))
            if hit is None or hit[0] is not d:
                if len(demo_memo) >= RENDERED_DEMOS_MAX:  # a long-lived judge family (extra demos per call)
                    demo_memo.clear()
                hit = demo_memo[(id(d), label_only)] = (d, prompts.demo_turns(d, label_only=label_only))
            return hit[1]

        def build(demos: Sequence[Demo]) -> list[ChatMessage]:
            msgs = [system]
            for d in demos:
                msgs.extend(turns(d))
            msgs.append(last)
            return msgs

        return build

    # ------------------------------------------------------------ one order
    async def judge_order(
        self, context: Sequence[Message], first: str, second: str, *, extra_demos: Sequence[Demo] = ()
    ) -> tuple[OrderLabel, str, float | None]:
        """Judge ``first`` (shown as A) vs ``second`` (shown as B). Returns (label, reasoning, P(first)).

        ``"tie"`` (with P(first) 0.5) when the model gave no readable answer; ties are not kept in the ledger.
        """
        if self.ledger is not None and not extra_demos:
            key = pair_digest(self._ledger_prefix(), context, first, second)
            hit = self.ledger.get(key)
            if hit is not None:
                return hit[0], "", hit[1]
            label, reasoning, p_first = await self._judge_order(context, first, second, ())
            if label != "tie":
                self.ledger.put(key, label, p_first)
            return label, reasoning, p_first
        return await self._judge_order(context, first, second, extra_demos)

    def _fitted(
        self, build: Callable[[Sequence[Demo]], list[ChatMessage]], demos: Sequence[Demo], max_tokens: int | None,
        call_site: str,
    ) -> list[ChatMessage]:
        """The prompt with as many demos (kept from the front: the prefix stays stable) as fit the window."""
        kept = list(demos)
        msgs = build(kept)
        while not fits(self.llm, msgs, max_tokens):
            if not kept:
                raise too_long(self.llm, msgs, max_tokens, call_site=call_site, what="judge prompt (no demos left)")
            kept.pop()
            msgs = build(kept)
        if len(kept) < len(demos):
            note(self.llm, call_site, "trimmed")
        return msgs

    async def _judge_order(
        self, context: Sequence[Message], first: str, second: str, extra_demos: Sequence[Demo]
    ) -> tuple[OrderLabel, str, float | None]:
        demos = [*self.demos, *extra_demos]
        if self.mode == "logprob":
            got = await self._logprob_order(context, first, second, demos)
            if got is not None:
                return got
        build = self._prompt(context, first, second, label_only=False)
        msgs = self._fitted(build, demos, self.max_tokens, self.call_site)
        for attempt in range(MAX_PARSE_ATTEMPTS):
            # A model that ignored the format is asked again with a different seed (the first
            # attempt stays cacheable at temperature 0; retries must not replay the same answer).
            try:
                comp = await self.llm.complete(
                    msgs,
                    call_site=self.call_site,
                    temperature=0.0 if attempt == 0 else 0.3,
                    max_tokens=self.max_tokens,
                    json_mode=True,
                    seed=None if attempt == 0 else attempt,
                    schema=JUDGMENT_SCHEMA,
                )
            except ContextOverflowError:
                # The server counts more tokens than the estimate did (text far from English prose):
                # keep half the demos that were sent, and ask again.
                sent = (len(msgs) - 2) // 2
                if sent == 0:
                    raise
                msgs = build(demos[: sent // 2])
                note(self.llm, self.call_site, "trimmed")
                continue
            try:
                parsed = prompts.parse_judgment(comp.text)
            except ParseError:
                note(self.llm, self.call_site, "unparseable")
                continue
            return parsed.preferred, parsed.reasoning, None
        # Still unreadable: neither response wins. Never an exception in a chat turn, never a
        # default letter (that would bias every unreadable judgment towards one position).
        return "tie", "", 0.5

    async def _logprob_order(
        self, context: Sequence[Message], first: str, second: str, demos: Sequence[Demo]
    ) -> tuple[OrderLabel, str, float] | None:
        site = self.call_site + ":logprob"
        msgs = self._fitted(self._prompt(context, first, second, label_only=True), demos, 1, site)
        comp = await self.llm.complete(msgs, call_site=site, max_tokens=1, logprobs=5)
        p_first = label_probability(comp)
        if p_first is None:
            if comp.top_logprobs:  # log-probabilities came, but neither letter among the top 5
                note(self.llm, site, "unparseable")
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
            preferred={"A": "B", "B": "A"}.get(l2, "tie"),  # type: ignore[arg-type]
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
    """Merge the two presentation orders into one verdict on the caller's A/B (a tied order makes a tie)."""
    pa = [o.p_a if o.p_a is not None else {"A": 1.0, "B": 0.0}.get(o.preferred, 0.5) for o in (o1, o2)]
    p_a = sum(pa) / 2
    preferred: Literal["A", "B", "tie"]
    if o1.preferred == o2.preferred == "tie":
        preferred, confidence = "tie", 0.0
    elif o1.preferred == o2.preferred:
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
