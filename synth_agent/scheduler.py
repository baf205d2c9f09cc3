"""Background synthesis: decide when a user's persona should be (re)fitted and run it off the request path.

A chat turn only calls :meth:`SynthesisScheduler.notify_vote`, which returns at
once. The scheduler keeps at most one worker task per (tenant, user): a vote
that arrives while that user's synthesis runs marks the slot dirty, and the
worker runs exactly one follow-up check when the run ends. Whether a check
actually fits is the :class:`SynthesisPolicy`'s call (first fit at 5 votes,
refits at 10, 20, 40... or after ``refit_every`` new votes), so a burst of votes
costs one fit, not one per vote.

Failures (endpoint down, store hiccup) are logged, counted and retried with
exponential backoff inside the same worker, so single-flight still holds; they
never reach the chat turn. ``aclose(drain=False)`` cancels running fits: the
synthesis graph's checkpointer keeps finished nodes, so the next trigger for that
user resumes instead of paying again.

The scheduler is reused by the HTTP proxy; it only needs a runner (anything
with ``async run(tenant_id, user_id)``) and a way to count a user's votes.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from synth_agent.models import PersonaProfile

__all__ = [
    "PersonaListener",
    "SchedulerStats",
    "SynthesisPolicy",
    "SynthesisRunner",
    "SynthesisScheduler",
    "VoteCounter",
]

log = logging.getLogger("synth_agent.scheduler")


@dataclass(frozen=True)
class SynthesisPolicy:
    """When to fit. All counts are a user's stored context votes.

    * first fit once ``first_fit`` votes exist (the engine's minimum is 5);
    * refit when the count reaches the next threshold of the geometric series
      ``first_fit * growth**k`` (5 → 10, 20, 40 ...), or when ``refit_every`` votes
      arrived since the last fit (``None`` turns that rule off);
    * ``debounce`` seconds after a vote before checking, so a burst is one fit;
    * after a failure, retry after ``backoff_initial * 2**(n-1)`` seconds (capped at
      ``backoff_max``), at most ``max_retries`` times; the next vote re-arms it.
    """

    first_fit: int = 5
    growth: float = 2.0
    refit_every: int | None = 50
    debounce: float = 2.0
    max_retries: int = 5
    backoff_initial: float = 5.0
    backoff_max: float = 300.0

    def __post_init__(self) -> None:
        if self.first_fit < 2:
            raise ValueError("first_fit must be at least 2 (a persona needs train and validation votes)")
        if self.growth <= 1.0:
            raise ValueError("growth must be greater than 1 (thresholds must increase)")
        if self.refit_every is not None and self.refit_every < 1:
            raise ValueError("refit_every must be at least 1, or None to disable it")
        if self.debounce < 0 or self.backoff_initial < 0 or self.backoff_max < 0:
            raise ValueError("debounce and backoff delays must not be negative")
        if self.max_retries < 0:
            raise ValueError("max_retries must not be negative")

    def next_threshold(self, fitted_on: int | None) -> int:
        """The smallest vote count that triggers a fit after a fit on ``fitted_on`` votes."""
        t = self.first_fit
        if fitted_on is None:
            return t
        while t <= fitted_on:
            t = max(t + 1, math.ceil(t * self.growth))
        if self.refit_every is not None:
            t = min(t, fitted_on + self.refit_every)
        return t

    def should_fit(self, n_votes: int, fitted_on: int | None) -> bool:
        """True when a user with ``n_votes`` votes, last fitted on ``fitted_on`` (None: never), needs a fit."""
        if n_votes < self.first_fit:
            return False
        if fitted_on is not None and n_votes <= fitted_on:
            return False
        return n_votes >= self.next_threshold(fitted_on)

    def backoff(self, failures: int) -> float:
        return min(self.backoff_max, self.backoff_initial * 2 ** max(0, failures - 1))


class SynthesisRunner(Protocol):
    """Runs (or resumes) one user's synthesis; returns the saved profile, or None when nothing was fitted."""

    async def run(self, tenant_id: str, user_id: str) -> PersonaProfile | None: ...


class VoteCounter(Protocol):
    """The slice of :class:`store.memory.PreferenceMemory` the policy needs."""

    async def count_votes(self, user_id: str) -> int: ...
    async def current_persona(self, user_id: str) -> PersonaProfile | None: ...


PersonaListener = Callable[[str, str, PersonaProfile], Any]
"""``listener(tenant_id, user_id, profile)`` after a new persona version is saved (sync or async)."""


@dataclass
class SchedulerStats:
    """Counters for metrics. ``max_in_flight_per_user`` > 1 would mean single-flight broke."""

    votes_notified: int = 0
    checks: int = 0
    runs_started: int = 0
    runs_succeeded: int = 0
    runs_skipped: int = 0
    failures: int = 0
    retries_scheduled: int = 0
    gave_up: int = 0
    cancelled: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    max_in_flight_per_user: int = 0
    pending_users: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class _Slot:
    task: asyncio.Task[None] | None = None
    dirty: bool = False
    force: bool = False
    running: bool = False
    failures: int = 0


Key = tuple[str, str]

RUNS_TRACKED_USERS = 10_000
"""How many users' run counts :meth:`SynthesisScheduler.runs_for` remembers (most recently fitted kept)."""


@dataclass
class _Counters:
    stats: SchedulerStats = field(default_factory=SchedulerStats)
    # Per-user run counts are diagnostics: kept for the most recently fitted users only, so a
    # long-running server does not hold one entry per user it ever fitted; forget drops the user's.
    runs_per_user: OrderedDict[Key, int] = field(default_factory=OrderedDict)
    in_flight_per_user: Counter[Key] = field(default_factory=Counter)

    def count_run(self, key: Key, keep: int) -> None:
        self.runs_per_user[key] = self.runs_per_user.get(key, 0) + 1
        self.runs_per_user.move_to_end(key)
        while len(self.runs_per_user) > keep:
            self.runs_per_user.popitem(last=False)


class SynthesisScheduler:
    """Runs persona synthesis in background asyncio tasks, single-flight per (tenant, user).

    ``memory_for(tenant_id)`` returns the tenant's vote store (a ``PreferenceMemory``).
    Create it inside the event loop that serves the chat (tasks are bound to it) and
    close it with ``await scheduler.aclose()``.
    """

    def __init__(
        self,
        runner: SynthesisRunner,
        memory_for: Callable[[str], VoteCounter],
        policy: SynthesisPolicy | None = None,
        *,
        logger: logging.Logger | None = None,
    ) -> None:
        self.runner = runner
        self.memory_for = memory_for
        self.policy = policy or SynthesisPolicy()
        self.log = logger or log
        self._slots: dict[Key, _Slot] = {}
        self._listeners: list[PersonaListener] = []
        self._c = _Counters()
        self._closing = False
        self.runs_tracked_users = RUNS_TRACKED_USERS
        self._idle = asyncio.Event()
        self._idle.set()

    # ------------------------------------------------------------------ public API

    def add_listener(self, listener: PersonaListener) -> None:
        """Call ``listener(tenant, user, profile)`` after every saved persona (e.g. to refresh a cache)."""
        self._listeners.append(listener)

    def notify_vote(self, tenant_id: str, user_id: str) -> None:
        """A vote was stored for this user: schedule a policy check. Returns immediately, never raises."""
        self._c.stats.votes_notified += 1
        self._schedule((tenant_id, user_id), force=False)

    def request_fit(self, tenant_id: str, user_id: str) -> None:
        """Fit (or resume an interrupted fit) regardless of the policy's thresholds, in the background."""
        self._schedule((tenant_id, user_id), force=True)

    @property
    def stats(self) -> SchedulerStats:
        """A snapshot of the counters."""
        s = SchedulerStats(**self._c.stats.as_dict())
        s.pending_users = sum(1 for slot in self._slots.values() if slot.task is not None)
        return s

    def runs_for(self, tenant_id: str, user_id: str) -> int:
        """Fits started for this user (0 once forgotten, or once more than ``runs_tracked_users`` others ran since)."""
        return self._c.runs_per_user.get((tenant_id, user_id), 0)

    def drop_user(self, tenant_id: str, user_id: str) -> None:
        """Drop what the scheduler keeps about a forgotten user (run counts; an idle slot).

        A fit still running keeps its slot until it ends (the caller waits for it with
        :meth:`wait_user_idle` and calls this again); its run count is dropped now and again then.
        """
        key = (tenant_id, user_id)
        self._c.runs_per_user.pop(key, None)
        slot = self._slots.get(key)
        if slot is not None and slot.task is None:
            del self._slots[key]

    @property
    def tracked_users(self) -> int:
        """Users the scheduler holds any state for (slots, run counts, fits in flight): bounded, see docs."""
        return len(self._slots.keys() | self._c.runs_per_user.keys() | self._c.in_flight_per_user.keys())

    def is_busy(self, tenant_id: str, user_id: str) -> bool:
        slot = self._slots.get((tenant_id, user_id))
        return bool(slot and slot.task is not None)

    async def wait_idle(self) -> None:
        """Wait until no worker is pending (debounce, run, follow-up or retry). Mostly for tests and scripts."""
        await self._idle.wait()

    async def wait_user_idle(self, tenant_id: str, user_id: str) -> None:
        """Wait until this user's worker (run, follow-ups, retries) is done; other users may stay busy."""
        slot = self._slots.get((tenant_id, user_id))
        if slot is not None and slot.task is not None:
            await asyncio.wait([slot.task])

    async def aclose(self, *, drain: bool = True, drain_timeout: float | None = None) -> None:
        """Stop. ``drain``: let running fits finish (up to ``drain_timeout`` seconds), drop checks not yet started.

        Without ``drain`` running fits are cancelled; their finished graph nodes stay
        checkpointed, so the next trigger for that user resumes where they stopped.
        """
        self._closing = True
        tasks = [s.task for s in self._slots.values() if s.task is not None]
        for slot in self._slots.values():
            if slot.task is not None and (not drain or not slot.running):
                slot.task.cancel()
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=drain_timeout)
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.wait(pending)

    async def __aenter__(self) -> SynthesisScheduler:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose(drain=True)

    # ------------------------------------------------------------------ internals

    def _schedule(self, key: Key, *, force: bool) -> None:
        try:
            if self._closing:
                self.log.warning("scheduler is closed; synthesis check for %r dropped", key)
                return
            slot = self._slots.setdefault(key, _Slot())
            slot.force = slot.force or force
            if slot.task is not None:
                slot.dirty = True  # the running worker does exactly one follow-up
                return
            slot.task = asyncio.get_running_loop().create_task(self._work(key, slot), name=f"synthesis:{key!r}")
            self._idle.clear()
        except Exception:  # never into the chat turn
            self.log.exception("could not schedule synthesis for %r", key)

    async def _work(self, key: Key, slot: _Slot) -> None:
        try:
            if self.policy.debounce:
                await asyncio.sleep(self.policy.debounce)
            while not self._closing:
                slot.dirty = False
                force, slot.force = slot.force, False
                ok = await self._attempt(key, force)
                if ok:
                    slot.failures = 0
                else:
                    slot.failures += 1
                    if slot.failures > self.policy.max_retries:
                        self._c.stats.gave_up += 1
                        self.log.error(
                            "synthesis for %r failed %d times; giving up until the next vote", key, slot.failures
                        )
                        slot.failures = 0
                    else:
                        delay = self.policy.backoff(slot.failures)
                        self._c.stats.retries_scheduled += 1
                        self.log.warning("synthesis for %r failed; retry %d in %.1fs", key, slot.failures, delay)
                        slot.force = slot.force or force
                        slot.dirty = True
                        await asyncio.sleep(delay)
                if not slot.dirty or self._closing:
                    break
        except asyncio.CancelledError:
            self._c.stats.cancelled += 1
            raise
        finally:
            slot.task = None
            slot.running = False
            if slot.failures == 0 and not slot.dirty:
                self._slots.pop(key, None)
            if all(s.task is None for s in self._slots.values()):
                self._idle.set()

    async def _attempt(self, key: Key, force: bool) -> bool:
        """One policy check and, if due, one run. False on failure (to be retried)."""
        tenant, user = key
        self._c.stats.checks += 1
        try:
            memory = self.memory_for(tenant)
            n_votes, profile = await asyncio.gather(memory.count_votes(user), memory.current_persona(user))
            fitted_on = len(profile.vote_ids) if profile is not None else None
            if not force and not self.policy.should_fit(n_votes, fitted_on):
                self._c.stats.runs_skipped += 1
                return True
        except Exception:
            self._c.stats.failures += 1
            self.log.exception("synthesis check for %r failed", key)
            return False
        slot = self._slots[key]
        st = self._c.stats
        slot.running = True
        st.runs_started += 1
        st.in_flight += 1
        st.max_in_flight = max(st.max_in_flight, st.in_flight)
        self._c.in_flight_per_user[key] += 1
        st.max_in_flight_per_user = max(st.max_in_flight_per_user, self._c.in_flight_per_user[key])
        self._c.count_run(key, self.runs_tracked_users)
        try:
            saved = await self.runner.run(tenant, user)
        except asyncio.CancelledError:
            raise
        except Exception:
            st.failures += 1
            self.log.exception("synthesis run for %r failed", key)
            return False
        finally:
            slot.running = False
            st.in_flight -= 1
            self._c.in_flight_per_user[key] -= 1
            if not self._c.in_flight_per_user[key]:
                del self._c.in_flight_per_user[key]
        st.runs_succeeded += 1
        if saved is not None:
            await self._notify(tenant, user, saved)
        return True

    async def _notify(self, tenant: str, user: str, profile: PersonaProfile) -> None:
        for fn in list(self._listeners):
            try:
                res = fn(tenant, user, profile)
                if inspect.isawaitable(res):
                    await res
            except Exception:
                self.log.exception("persona listener %r failed for %r", fn, (tenant, user))
