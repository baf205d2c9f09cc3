"""Stored judgments: a single-order verdict is paid for once per user, across fits and processes.

Fitting and selecting a configuration judge the same (judge, pair) combinations
again and again: a refit re-scores the candidate demo sets of the previous fit on
the validation votes it already judged; cross-validated configuration selection
(issue 16) judges every vote under persona+demos, persona only, demos only and
the default judge. A :class:`JudgmentLedger` remembers each verdict under a key
that names everything that decides the prompt — judge mode and prompt version,
model, persona text, every demo (vote, presentation order, reasoning, content),
and the pair in its presentation order — so a repeated judgment costs nothing,
not even rendering the prompt.

Where it lives: one ledger per user and model in the user's preference memory
(``PreferenceMemory.get_cached_judgment`` / ``put_cached_judgment``, namespace
``judgments``), so ``forget`` erases it with the user's other data. A fit loads it
at the start and saves only the entries it used or added, so it stays the size of
one fit. Anything with a :class:`Judge` can use one: pass ``Judge(..., ledger=...)``.

    >>> ledger = JudgmentLedger()
    >>> ledger.put("k1", "A", 0.9)
    >>> ledger.get("k1"), ledger.get("k2"), ledger.hits, ledger.misses
    (('A', 0.9), None, 1, 1)
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, Literal, Protocol, runtime_checkable

import orjson

from synth_agent.models import Demo, Message

__all__ = ["JudgmentLedger", "LedgerStore", "ledger_store_key", "pair_digest", "prefix_digest"]

LEDGER_FORMAT = 1

Verdict = tuple[Literal["A", "B"], float | None]
"""(label shown first wins = "A", P(first) when the judge read log-probabilities)."""


@runtime_checkable
class LedgerStore(Protocol):
    """Where ledgers persist: the two judgment-cache methods of ``store.memory.PreferenceMemory``."""

    async def get_cached_judgment(self, user_id: str, key: str) -> dict[str, Any] | None: ...
    async def put_cached_judgment(self, user_id: str, key: str, value: dict[str, Any]) -> None: ...


def _digest(payload: Any) -> str:
    return hashlib.blake2b(orjson.dumps(payload), digest_size=16).hexdigest()


def prefix_digest(
    *, model: str, mode: str, version: str, persona: str | None, demos: Sequence[Demo]
) -> str:
    """Everything about a judge that shapes its prompt before the pair (computed once per judge)."""
    return _digest([
        LEDGER_FORMAT, model, mode, version, persona or "",
        [[d.vote_id, d.chosen_first, d.reasoning, [[m.role, m.content] for m in d.context], d.chosen, d.rejected]
         for d in demos],
    ])  # fmt: skip


def pair_digest(prefix: str, context: Sequence[Message], first: str, second: str) -> str:
    """The ledger key of judging (first, second) in this order after the judge's ``prefix``."""
    return _digest([prefix, [[m.role, m.content] for m in context], first, second])


def ledger_store_key(model: str) -> str:
    return f"ledger:v{LEDGER_FORMAT}:{model}"


class JudgmentLedger:
    """Verdicts by key, with hit/miss counters; only entries used since loading are saved back."""

    def __init__(self, entries: dict[str, Any] | None = None) -> None:
        self._stored: dict[str, Any] = dict(entries or {})
        self._used: dict[str, Any] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._stored.keys() | self._used.keys())

    def get(self, key: str) -> Verdict | None:
        v = self._used.get(key)
        if v is None:
            v = self._stored.get(key)
            if v is not None:
                self._used[key] = v
        if v is None:
            self.misses += 1
            return None
        self.hits += 1
        return v[0], v[1]

    def put(self, key: str, label: Literal["A", "B"], p_first: float | None) -> None:
        self._used[key] = [label, p_first]

    def seed(self, key: str, label: Literal["A", "B"], p_first: float | None) -> None:
        """Record a verdict known from elsewhere (e.g. a bootstrap trace) unless one is stored; not a hit or miss."""
        if key not in self._used and key not in self._stored:
            self._used[key] = [label, p_first]

    @property
    def new_entries(self) -> int:
        return len(self._used.keys() - self._stored.keys())

    # ------------------------------------------------------------ persistence

    @classmethod
    async def load(cls, store: Any, user_id: str, model: str) -> JudgmentLedger:
        """The user's ledger for ``model`` from ``store`` (empty if none, or if the store keeps no ledgers)."""
        if not isinstance(store, LedgerStore):
            return cls()
        value = await store.get_cached_judgment(user_id, ledger_store_key(model))
        entries = value.get("entries") if isinstance(value, dict) else None
        return cls(entries if isinstance(entries, dict) else None)

    async def save(self, store: Any, user_id: str, model: str, *, keep_unused: bool = False) -> bool:
        """Persist the entries this fit used or added (older unused ones are dropped, unless ``keep_unused``:
        a fit split over several processes or graph nodes prunes in its first step only). False if nothing
        to do."""
        if not isinstance(store, LedgerStore) or (not self.new_entries and self._used.keys() == self._stored.keys()):
            return False
        entries = {**self._stored, **self._used} if keep_unused else dict(self._used)
        await store.put_cached_judgment(user_id, ledger_store_key(model), {"entries": entries})
        return True
