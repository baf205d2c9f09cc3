"""A time budget per turn of the event loop for starting vote writes, so a burst of them cannot hold ``/healthz``.

Why: under a write burst a whole journal group's callers (~100) are answered in one loop iteration
(``store.intake._settle``), and their writers' next requests then arrive together (and the first wave's
~200 at once); each handler runs 0.3-0.6 ms of Python before it waits for the journal, so one iteration
of the loop ran 20-140 ms of vote handlers back to back, and a ``/healthz`` request read meanwhile waited
for all of them (a probe in the server, docs/store.md, session 28). :class:`TurnBudget` lets vote
handlers *start* for at most about ``budget`` seconds of an iteration: past it, a request waits in a FIFO
queue and starts in a later iteration, so the loop polls its sockets in between and a probe is answered
after about one budget. The work and its order are the same, spread over more, shorter iterations.

Only the start is budgeted (:class:`synth_agent.proxy.app.ProxyApp` before the vote route), not the
answers: holding a group's answers back as well cost about a quarter of the acknowledgements (session
28); the start alone met ``/healthz`` p99 <= 50 ms in all 14 runs of session 29 (main: 4 of 14) with the
acknowledgement rate unchanged within the noise (medians 905 vs 928 votes/s; docs/store.md).
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

TURN_BUDGET = 0.010
"""Seconds of vote handling per event-loop iteration (:class:`TurnBudget`)."""


class TurnBudget:
    """One event loop's budget of handler time per iteration (one per app, on its state).

    Waiting handlers queue in arrival order and are woken once each iteration in a batch about the
    size that fit in the last iteration (not all at once: a handler that finds the budget spent again
    costs a wake-up, and hundreds of them re-checking every iteration cost ~10 % of the loop's CPU);
    one woken past the budget goes back to the front of the queue.
    """

    def __init__(self, budget: float = TURN_BUDGET, clock: Callable[[], float] = time.perf_counter) -> None:
        self.budget = budget
        self.clock = clock
        self._start: float | None = None  # when this iteration's first handler passed
        self._passed = 0  # handlers that passed in this iteration
        self._batch = 8  # handlers woken per iteration
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._back: list[asyncio.Future[None]] = []  # woken past the budget: first in the next batch
        self._ticking = False
        self.yields = 0
        """How many times a handler waited for a later iteration (tests, profiling)."""

    def _within(self, loop: asyncio.AbstractEventLoop) -> bool:
        now = self.clock()
        if self._start is None:
            self._start = now
            self._schedule(loop)
        elif now - self._start >= self.budget:
            return False
        self._passed += 1
        return True

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._ticking:
            self._ticking = True
            loop.call_soon(self._tick, loop)  # at the next iteration (after the callbacks ready now)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        """A new iteration: a new budget, and the next batch of waiting handlers woken (they run in the next one)."""
        self._ticking = False
        fit = self._passed
        self._start, self._passed = None, 0
        if self._back:
            self._batch = max(1, fit)  # what fitted last time
            self._waiting.extendleft(reversed(self._back))
            self._back.clear()
        else:
            self._batch = max(1, fit) + 4
        woken = 0
        while self._waiting and woken < self._batch:
            fut = self._waiting.popleft()
            if not fut.done():  # (a cancelled handler's)
                fut.set_result(None)
                woken += 1
        if self._waiting:
            self._schedule(loop)

    async def share(self) -> None:
        """Return at once while this iteration's budget lasts (or with no budget) and nobody waits; else
        wait for a later iteration, in arrival order."""
        if self.budget <= 0:
            return
        loop = asyncio.get_running_loop()
        if not self._waiting and not self._back and self._within(loop):
            return
        fut = loop.create_future()
        self._waiting.append(fut)
        self._schedule(loop)
        while True:
            self.yields += 1
            await fut
            if self._within(loop):
                return
            fut = loop.create_future()
            self._back.append(fut)
            self._schedule(loop)


__all__ = ["TURN_BUDGET", "TurnBudget"]
