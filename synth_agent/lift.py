"""Live lift: how often users pick the personalized answer over the plain one in A/B votes.

Every A/B pair whose one side carried the persona (``graphs.chat`` A/B mode, the proxy's
``/v1/ab``) measures personalization directly when the user votes. Each redeemed token
becomes one :class:`LiftEvent`, stored in the user's namespace under the token itself
(kind ``lift``), so a token counts **exactly once** however often it is replayed, and
``forget`` erases the events with the user's other data.

From the events: per user and per persona version, the win rate of the personalized answer
with a 95% Wilson interval (:class:`WinRate`). A version whose interval lies entirely below
even odds after at least :attr:`DemotionPolicy.min_votes` votes is **demoted**: its profile is
marked ``meta["demoted"]``, the guard (:mod:`synth_agent.engine.selection`) then serves the
default judge and no persona, and a refit is requested.

Tenant aggregates for ``/metrics`` are kept in memory by :class:`TenantLift` (counts since the
process started, no user ids anywhere).

    >>> [round(x, 3) for x in WinRate(wins=30, n=40).interval()]
    [0.598, 0.858]
    >>> DemotionPolicy(min_votes=10).should_demote(WinRate(wins=2, n=12))
    True
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from synth_agent.engine.selection import served
from synth_agent.models import PersonaProfile

__all__ = [
    "DemotionPolicy",
    "LiftEvent",
    "TenantLift",
    "UserLift",
    "WinRate",
    "load_user_lift",
    "history_rows",
    "record_ab_vote",
    "with_live",
]

LIFT_KIND = "lift"
Z95 = 1.959963984540054


@dataclass(frozen=True)
class WinRate:
    """``wins`` of ``n`` A/B votes went to the personalized answer."""

    wins: int
    n: int

    @property
    def rate(self) -> float | None:
        return self.wins / self.n if self.n else None

    def interval(self, z: float = Z95) -> tuple[float, float]:
        """Wilson score interval (95% by default); (0, 1) with no votes."""
        if self.n == 0:
            return 0.0, 1.0
        p, n = self.wins / self.n, self.n
        denom = 1 + z * z / n
        centre = (p + z * z / (2 * n)) / denom
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
        return max(0.0, centre - half), min(1.0, centre + half)

    def as_dict(self) -> dict[str, Any]:
        lo, hi = self.interval()
        return {"wins": self.wins, "votes": self.n, "win_rate": self.rate, "ci_low": lo, "ci_high": hi}


@dataclass(frozen=True)
class LiftEvent:
    """One redeemed A/B token whose pair had a personalized side."""

    token: str
    version: int
    personalized_won: bool
    at: datetime

    def as_value(self) -> dict[str, Any]:
        return {"version": self.version, "won": self.personalized_won, "at": self.at.isoformat()}

    @classmethod
    def from_item(cls, key: str, value: dict[str, Any]) -> LiftEvent:
        return cls(key, int(value["version"]), bool(value["won"]), datetime.fromisoformat(value["at"]))


@dataclass
class UserLift:
    """A user's live lift: every event in time order, overall and per persona version."""

    events: list[LiftEvent] = field(default_factory=list)

    @property
    def overall(self) -> WinRate:
        return WinRate(sum(e.personalized_won for e in self.events), len(self.events))

    def by_version(self) -> dict[int, WinRate]:
        out: dict[int, list[int]] = {}
        for e in self.events:
            w = out.setdefault(e.version, [0, 0])
            w[0] += e.personalized_won
            w[1] += 1
        return {v: WinRate(w, n) for v, (w, n) in sorted(out.items())}

    def version(self, version: int) -> WinRate:
        return self.by_version().get(version, WinRate(0, 0))

    def as_dict(self) -> dict[str, Any]:
        return {
            "overall": self.overall.as_dict(),
            "by_version": {str(v): w.as_dict() for v, w in self.by_version().items()},
        }


@dataclass(frozen=True)
class DemotionPolicy:
    """When live votes demote a persona version: at least ``min_votes`` A/B votes on it and the
    upper end of the win rate's Wilson interval (at ``z``; 1.96 = 95%) below even odds."""

    min_votes: int = 10
    z: float = Z95

    def __post_init__(self) -> None:
        if self.min_votes < 1:
            raise ValueError("demotion min_votes must be at least 1")
        if not (math.isfinite(self.z) and self.z > 0):
            raise ValueError("demotion z must be a positive number")

    def should_demote(self, win: WinRate) -> bool:
        return win.n >= self.min_votes and win.interval(self.z)[1] < 0.5


class TenantLift:
    """Per-tenant counts of personalized-vs-plain A/B votes in this process (for ``/metrics``).

    Thread-safe; holds tenant names and counts only, never user ids.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, list[int]] = {}
        self.demotions: dict[str, int] = {}

    def add(self, tenant: str, personalized_won: bool) -> None:
        with self._lock:
            c = self._counts.setdefault(tenant, [0, 0])
            c[0] += personalized_won
            c[1] += 1

    def demoted(self, tenant: str) -> None:
        with self._lock:
            self.demotions[tenant] = self.demotions.get(tenant, 0) + 1

    def snapshot(self) -> dict[str, WinRate]:
        with self._lock:
            return {t: WinRate(w, n) for t, (w, n) in sorted(self._counts.items())}


async def record_ab_vote(memory: Any, user_id: str, token: str, version: int, personalized_won: bool) -> bool:
    """Store one lift event under its token; False (nothing changed) if the token was already counted."""
    ns = memory.namespace(user_id, LIFT_KIND)
    if await memory.store.aget(ns, token) is not None:
        return False
    event = LiftEvent(token, version, personalized_won, datetime.now(UTC))
    await memory.store.aput(ns, token, event.as_value(), index=False)
    return True


async def load_user_lift(memory: Any, user_id: str) -> UserLift:
    """Every lift event of ``user_id``, oldest first."""
    ns = memory.namespace(user_id, LIFT_KIND)
    items: list[Any] = []
    while True:
        page = await memory.store.asearch(ns, limit=500, offset=len(items))
        items += page
        if len(page) < 500:
            break
    events = [LiftEvent.from_item(it.key, it.value) for it in items]
    return UserLift(sorted(events, key=lambda e: (e.at, e.token)))


def with_live(profile: PersonaProfile, lift: UserLift) -> PersonaProfile:
    """``profile`` as shown to people: its stored meta plus what the guard serves now (``meta.served``)
    and its live lift (``meta.live``: overall and for this version)."""
    live = {"overall": lift.overall.as_dict(), "version": lift.version(profile.version).as_dict()}
    return profile.model_copy(update={"meta": {**profile.meta, "served": served(profile), "live": live}})


def history_rows(history: Sequence[PersonaProfile], lift: UserLift | None = None) -> list[dict[str, Any]]:
    """Per persona version: served configuration, cross-validated accuracy, live win rate, demotion.

    Without ``lift``, each version's live win rate is the one :func:`with_live` put in its ``meta.live``
    (profiles as the server's persona routes return them)."""
    by_version = lift.by_version() if lift is not None else {}
    rows = []
    for p in history:
        sel = p.meta.get("selection") or {}
        served = sel.get("served", "persona_demos" if not sel else "default")
        cv = sel.get("cv_accuracy") or {}
        rows.append({
            "version": p.version,
            "created_at": p.created_at.isoformat(),
            "n_votes": len(p.vote_ids),
            "served": "default" if p.meta.get("demoted") else served,
            "selected": served,
            "cv_accuracy": cv.get(served),
            "cv_default": cv.get("default"),
            "live": by_version.get(p.version, WinRate(0, 0)).as_dict() if lift is not None
            else dict(p.meta["live"]["version"]),
            "demoted": p.meta.get("demoted"),
        })  # fmt: skip
    return rows
