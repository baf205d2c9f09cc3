"""A time budget per turn of the event loop for vote writes, so a burst of them cannot hold ``/healthz``.

Why: under a write burst a whole journal group's callers (~100) are answered in one loop iteration
(``store.intake._settle``), and their writers' next requests then arrive together; each handler runs
0.3-0.6 ms of Python before it waits for the journal, so one iteration of the loop could run 30-60 ms
of vote handlers back to back, and a ``/healthz`` read in the meantime waited for all of them
(docs/store.md, session 28). :class:`TurnBudget` lets vote handlers use at most ``budget`` seconds of
an iteration: one that finds the budget spent yields (``asyncio.sleep(0)``: it continues in the next
iteration, in the order it yielded), so the loop polls its sockets in between and a probe's request
is answered after at most about one budget. The work and its order are the same; it is spread over
more, shorter iterations.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

TURN_BUDGET = 0.010
"""Seconds of vote handling per event-loop iteration (:class:`TurnBudget`)."""


class TurnBudget:
    """One event loop's budget of handler time per iteration (one per app, on its state)."""

    def __init__(self, budget: float = TURN_BUDGET, clock: Callable[[], float] = time.perf_counter) -> None:
        self.budget = budget
        self.clock = clock
        self._start: float | None = None
        self.yields = 0
        """How many times a handler waited for the next iteration (tests, profiling)."""

    def _next_turn(self) -> None:
        self._start = None

    async def share(self) -> None:
        """Return at once while this iteration's budget lasts (or with no budget); else continue in a
        later iteration.

        The first caller of an iteration starts its clock and schedules the reset (``call_soon``: it
        runs at the start of the next iteration, before the callers that yield after it)."""
        if self.budget <= 0:
            return
        while True:
            now = self.clock()
            if self._start is None:
                self._start = now
                asyncio.get_running_loop().call_soon(self._next_turn)
                return
            if now - self._start < self.budget:
                return
            self.yields += 1
            await asyncio.sleep(0)


__all__ = ["TURN_BUDGET", "TurnBudget"]
