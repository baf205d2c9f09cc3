"""``synth-agent report``: live lift per tenant and user, with a plot of the win rate over time.

Reads what the store holds — each user's persona history (served configuration,
cross-validated accuracy, demotion) and live-lift events (:mod:`synth_agent.lift`) — and
draws the personalized answer's cumulative A/B win rate over time with its 95% interval,
persona versions marked where they change, and even odds as the line to stay above.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from synth_agent.lift import UserLift, WinRate, history_rows, load_user_lift

__all__ = ["LiftReport", "UserReport", "collect", "write_lift_plot"]


@dataclass
class UserReport:
    user_id: str
    lift: UserLift
    rows: list[dict[str, Any]] = field(default_factory=list)
    """Per persona version (oldest first): see :func:`synth_agent.lift.history_rows`."""


@dataclass
class LiftReport:
    users: list[UserReport]

    @property
    def total(self) -> WinRate:
        return WinRate(sum(u.lift.overall.wins for u in self.users), sum(u.lift.overall.n for u in self.users))

    def as_dict(self) -> dict[str, Any]:
        return {
            "total": self.total.as_dict(),
            "users": [
                {"user_id": u.user_id, "live": u.lift.as_dict(), "versions": u.rows} for u in self.users
            ],
        }


async def collect(memory: Any, users: list[str] | None = None, *, concurrency: int = 16) -> LiftReport:
    """Every (or the given) user's persona history and live-lift events from ``memory`` (a PreferenceMemory)."""
    ids = users if users is not None else await memory.list_users()
    sem = asyncio.Semaphore(concurrency)

    async def one(uid: str) -> UserReport | None:
        async with sem:
            history, lift = await asyncio.gather(memory.persona_history(uid), load_user_lift(memory, uid))
        if not history and not lift.events:
            return None
        return UserReport(uid, lift, history_rows(history, lift))

    found = await asyncio.gather(*(one(u) for u in ids))
    return LiftReport([r for r in found if r is not None])


def write_lift_plot(report: LiftReport, path: str | Path, *, title: str = "") -> Path:
    """Cumulative win rate of personalized answers (with 95% Wilson band) over A/B votes in time order,
    a marker where the persona version changes (one user) and a bar chart of the win rate per version."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    events = sorted((e for u in report.users for e in u.lift.events), key=lambda e: (e.at, e.token))
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
    xs, rate, lo, hi = [], [], [], []
    wins = 0
    for i, e in enumerate(events, start=1):
        wins += e.personalized_won
        w = WinRate(wins, i)
        a, b = w.interval()
        xs.append(i)
        rate.append(100 * wins / i)
        lo.append(100 * a)
        hi.append(100 * b)
    ax.fill_between(xs, lo, hi, alpha=0.2, color="#3b82f6", label="95% interval")
    ax.plot(xs, rate, color="#3b82f6", label="personalized win rate (cumulative)")
    ax.axhline(50, color="black", lw=0.8, ls="--", label="even odds")
    if len(report.users) == 1:
        prev = None
        for i, e in enumerate(events, start=1):
            if e.version != prev:
                ax.axvline(i, color="gray", lw=0.6, ls=":")
                ax.text(i, 102, f"v{e.version}", fontsize=8, ha="left", va="bottom")
                prev = e.version
    ax.set_xlabel("A/B votes, personalized vs plain (time order)")
    ax.set_ylabel("won by the personalized answer (%)")
    ax.set_ylim(0, 108)
    ax.set_title(f"Live lift{' — ' + title if title else ''}")
    ax.legend(loc="lower right", fontsize=8)

    per_version: dict[int, list[int]] = {}
    for e in events:
        tally = per_version.setdefault(e.version, [0, 0])
        tally[0] += e.personalized_won
        tally[1] += 1
    versions = sorted(per_version)
    rates = [WinRate(*per_version[v]) for v in versions]
    vals = [100 * (r.rate or 0.0) for r in rates]
    err = [[v - 100 * r.interval()[0] for v, r in zip(vals, rates, strict=True)],
           [100 * r.interval()[1] - v for v, r in zip(vals, rates, strict=True)]]  # fmt: skip
    bx.bar([f"v{v}" for v in versions], vals, yerr=err, capsize=4, color="#3b82f6")
    for i, r in enumerate(rates):
        bx.text(i, 2, f"n={r.n}", ha="center", fontsize=8, color="white")
    bx.axhline(50, color="black", lw=0.8, ls="--")
    bx.set_ylim(0, 105)
    bx.set_title("Win rate per persona version" if len(report.users) == 1 else "Win rate by version number")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
