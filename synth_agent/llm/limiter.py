"""Adaptive concurrency per endpoint: send as many requests at once as the server can serve, no more.

A fixed ``max_concurrency`` is wrong in both directions: a single-slot llama.cpp
server on a CPU queues 15 of 16 requests, each waits minutes, hits the client's
timeout, is retried, and the server wastes its one slot on requests nobody waits
for; a GPU server with 256 slots is starved. :class:`AdaptiveLimiter` finds the
server's capacity from what it observes, in the spirit of Netflix's
concurrency-limits (Vegas / Gradient2) and Envoy's adaptive concurrency filter:

* **Latency is the signal.** Per request class (call site, ``max_tokens``, log-probs)
  the limiter keeps a baseline: the lowest latency seen, drifting slowly upwards so
  a server that really got slower is re-learned. ``ratio = latency / baseline``.
  While ``k`` requests are in flight on a server that serves ``c`` at once, requests
  wait ``≈ k/c`` service times, so Little's law gives the capacity estimate
  ``k / ratio`` (``k``: the time-averaged number of requests in flight while it was out).
* **Windows.** A decision is taken every ``min(limit, 8)`` (at least 4) answers of requests granted
  under the current limit (answers of requests sent before the last change are ignored,
  so one congestion episode causes one decision). If the window's median ratio exceeds
  ``tolerance`` and the excess latency is material (``min_excess`` seconds: event-loop
  jitter of a busy client is not server queueing), the limit drops to the capacity
  estimate — once the queue has *stood* (below). Otherwise, if the window actually used
  the whole limit, the limit grows: doubling in slow start, then ``+√limit`` per window. An increase that overshoots doubles
  the number of good windows needed before the next probe upwards (up to 32), so the
  limit settles at the capacity instead of oscillating around it.
* **A standing queue, not a burst** (CoDel's good queue / bad queue). Slow answers shrink the limit
  only once slow windows have lasted ``SUSTAIN`` (2) baseline latencies, counted from the first slow
  answer of the first slow window. A server with fewer slots than requests answers them one service time
  apart, so its first window already spans several baselines (a one-slot server's 8 answers span 7).
  A burst that a wide server serves all at once but reads late — its process starved of CPU by ours on
  the same machine — or answers that *we* read late because our own event loop was busy, arrive
  bunched within a baseline or so: that window is held (no decrease, no growth), and the answers of
  requests sent after it tell whether the queue stands. While slow windows are held the baseline does
  not drift up (the queue being judged must not become the baseline), and a hold right after an increase
  slows later probes upwards as an overshoot does. In fit_cost's 20 users at 64 in flight the
  opening burst reads like this: its answers came back at ~2× the baseline over ~1.3 baselines while
  requests sent meanwhile were answered at 1.0×, and the limit used to be cut to ~30 in some rounds.
* **Overload answers** — timeouts, 429, 502/503/504, refused connections — halve the limit
  at once (requests sent before a change cannot trigger another).
* **Start safe.** The first request goes alone; its latency ``L`` bounds the first burst to
  ``timeout / (2·L)``, the number of requests a *single-slot* server could finish before the
  last one times out. A fast server is at full concurrency after one round trip; a slow one
  is never flooded. Slow start then doubles while latency holds.
* **Stated capacity wins.** Where the server says how many requests it serves at once
  (llama.cpp ``/props`` ``total_slots``, SGLang ``max_running_requests``; see
  :mod:`synth_agent.llm.server_info`) the limit never exceeds it.

Waiting for a slot happens here, in our own FIFO queue, *before* the HTTP attempt
starts: a request's timeout only runs while the server has it.

All state is on the instance (one limiter per endpoint and event loop).

    >>> lim = AdaptiveLimiter(16, timeout=60)
    >>> lim.limit          # until the first answer: one request at a time
    1
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Literal

__all__ = ["AdaptiveLimiter", "LimiterStatus", "Signal", "Ticket"]

Signal = Literal["ok", "overload", "neutral"]
"""How a request ended for the limiter: answered (a latency sample), overload (timeout, 429,
503 ...: shrink), or neutral (cancelled, rejected as invalid: tells nothing about load)."""

DRIFT = 0.005
"""Per sample, a latency baseline may rise by this fraction (re-learns a server that got slower)."""
WINDOW = 8
MIN_WINDOW = 4
"""A decision is taken every ``min(limit, WINDOW)`` (at least ``MIN_WINDOW``) answers of requests
granted under the current limit."""
MAX_PROBE_EVERY = 32
"""After increases that overshot, the limit is probed upwards only every this many good windows at most."""
SUSTAIN = 2.0
"""Slow windows shrink the limit only once they have lasted this many baseline latencies (a standing queue):
a server short of slots spreads its answers one service time apart, a transient bunches them."""


@dataclass(frozen=True)
class LimiterStatus:
    """A snapshot for dashboards, ``/metrics`` and tests."""

    limit: int
    ceiling: int
    in_flight: int
    queued: int
    max_in_flight: int
    phase: Literal["first", "slow_start", "steady", "fixed"]
    capacity: int | None
    """The server's stated capacity, when it told us."""
    increases: int
    decreases: int
    lowest: int
    """The lowest limit since the first answer set it (how far a decrease ever went)."""
    overloads: int
    waited: int
    """Requests that had to wait in our queue for a slot."""


@dataclass
class Ticket:
    """One granted slot; hand it back to :meth:`AdaptiveLimiter.release`."""

    epoch: int
    in_flight: int
    """Requests in flight when this one was granted (itself included)."""
    granted_at: float
    area: float
    """The limiter's in-flight-time integral at the grant (to average the load this request saw)."""


class AdaptiveLimiter:
    """FIFO concurrency limit that adapts to the server (see the module docstring).

    ``max_limit`` is the user's ceiling (``EndpointConfig.max_concurrency``).
    ``adaptive=False`` gives a plain fixed limit of ``max_limit`` (a FIFO semaphore).
    """

    def __init__(
        self,
        max_limit: int,
        *,
        min_limit: int = 1,
        timeout: float | None = None,
        adaptive: bool = True,
        tolerance: float = 1.5,
        min_excess: float = 0.05,
        capacity: int | None = None,
    ) -> None:
        if max_limit < 1 or min_limit < 1:
            raise ValueError("concurrency limits must be at least 1")
        if tolerance <= 1.0:
            raise ValueError("latency tolerance must be above 1")
        self.max_limit = max_limit
        self.min_limit = min(min_limit, max_limit)
        self.timeout = timeout
        self.adaptive = adaptive
        self.tolerance = tolerance
        self.min_excess = min_excess
        self.capacity: int | None = None
        self._limit = float(max_limit if not adaptive else self.min_limit)
        self._phase: Literal["first", "slow_start", "steady", "fixed"] = "first" if adaptive else "fixed"
        self._in_flight = 0
        self._max_in_flight = 0
        self._waiters: deque[asyncio.Future[Ticket]] = deque()
        self._epoch = 0
        self._baseline: dict[Hashable, float] = {}
        # (ratio, excess seconds, mean load while out, baseline seconds, answered at)
        self._window: list[tuple[float, float, float, float, float]] = []
        self._slow_since: float | None = None  # when the current run of slow windows began (first slow answer)
        self._area = 0.0  # integral of requests in flight over time (seconds)
        self._last = time.perf_counter()
        self._good = 0  # good windows since the last change
        self._grew = False  # the last change was an increase not yet confirmed by a good window
        self._probe_every = 1  # good windows needed before the next increase (doubles on overshoot)
        self.increases = self.decreases = self.overloads = self.waited = 0
        self._lowest = self.max_limit  # the lowest limit since settling (status)
        if capacity is not None:
            self.set_capacity(capacity)

    # ------------------------------------------------------------ introspection

    @property
    def ceiling(self) -> int:
        return max(self.min_limit, min(self.max_limit, self.capacity or self.max_limit))

    @property
    def limit(self) -> int:
        """Requests allowed in flight right now."""
        return max(self.min_limit, min(self.ceiling, int(self._limit)))

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def settled(self) -> bool:
        """True once the first answer has set the limit (before that it is 1 for probing)."""
        return self._phase != "first"

    def status(self) -> LimiterStatus:
        return LimiterStatus(
            limit=self.limit, ceiling=self.ceiling, in_flight=self._in_flight, queued=len(self._waiters),
            max_in_flight=self._max_in_flight, phase=self._phase, capacity=self.capacity,
            increases=self.increases, decreases=self.decreases, lowest=min(self._lowest, self.limit) if self.settled else self.limit,
            overloads=self.overloads, waited=self.waited,
        )  # fmt: skip

    def set_capacity(self, capacity: int | None) -> None:
        """Cap the limit at what the server says it serves at once (None: unknown)."""
        self.capacity = capacity if capacity and capacity > 0 else None
        if self._phase == "fixed" and self.capacity:
            self._limit = float(self.ceiling)
        self._wake()

    def carry_over(self, other: AdaptiveLimiter) -> None:
        """Start from what ``other`` (the same endpoint on a previous event loop) learned."""
        self._limit, self._phase, self.capacity = other._limit, other._phase, other.capacity
        self._baseline = dict(other._baseline)

    # ------------------------------------------------------------ acquire / release

    async def acquire(self) -> Ticket:
        """Wait (FIFO, no timeout) until a request may be sent; returns the slot's ticket."""
        if not self._waiters and self._in_flight < self.limit:
            return self._grant()
        self.waited += 1
        fut: asyncio.Future[Ticket] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # granted just as we were cancelled: hand it back
                self.release(fut.result(), "neutral")
            else:
                try:
                    self._waiters.remove(fut)
                except ValueError:
                    pass
            raise

    def _tick(self) -> float:
        """Advance the integral of requests in flight over time; returns now."""
        now = time.perf_counter()
        self._area += self._in_flight * (now - self._last)
        self._last = now
        return now

    def _grant(self) -> Ticket:
        now = self._tick()
        self._in_flight += 1
        self._max_in_flight = max(self._max_in_flight, self._in_flight)
        return Ticket(self._epoch, self._in_flight, now, self._area)

    def _wake(self) -> None:
        while self._waiters and self._in_flight < self.limit:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(self._grant())

    def release(
        self, ticket: Ticket, signal: Signal, *, latency: float | None = None, key: Hashable = None
    ) -> None:
        """Hand a slot back, telling the limiter how the request ended."""
        now = self._tick()
        span = now - ticket.granted_at
        # the average number of requests in flight while this one was out (itself included)
        load = (self._area - ticket.area) / span if span > 0 else float(ticket.in_flight)
        self._in_flight -= 1
        if self.adaptive:
            if signal == "overload":
                self._overload(ticket)
            elif signal == "ok" and latency is not None:
                self._sample(ticket, latency, key, load, now)
        self._wake()

    # ------------------------------------------------------------ adaptation

    def _overload(self, ticket: Ticket) -> None:
        self.overloads += 1
        if ticket.epoch < self._epoch:
            return  # sent before the last change: that change already answered this congestion
        self._decrease(math.floor(self.limit / 2))

    def _decrease(self, new: int) -> None:
        if self._phase in ("first", "slow_start"):
            self._phase = "steady"
        if self._grew:  # the last increase overshot: wait longer before probing upwards again
            self._probe_every = min(MAX_PROBE_EVERY, self._probe_every * 2)
        self._grew = False
        self._good = 0
        new = max(self.min_limit, min(self.limit - 1, new))
        if new < self._limit:
            self._limit = float(new)
            self.decreases += 1
            self._lowest = min(self._lowest, self.limit)
        self._epoch += 1
        self._window.clear()
        self._slow_since = None

    def _sample(self, ticket: Ticket, latency: float, key: Hashable, load: float, now: float) -> None:
        base = self._baseline.get(key)
        # (no drift while slow windows are held: the queue being judged must not become the baseline)
        drift = 1.0 + DRIFT if self._slow_since is None else 1.0
        base = latency if base is None else min(latency, base * drift)
        self._baseline[key] = base
        if self._phase == "first":
            # One answer tells us how long a request takes alone: open up to what even a
            # single-slot server could finish within the timeout, then slow-start from there.
            self._phase = "slow_start"
            worst = max(self._baseline.values())
            safe = self.ceiling if self.timeout is None else math.floor(self.timeout / (2.0 * max(worst, 1e-3)))
            self._limit = float(max(self.min_limit, min(self.ceiling, safe)))
            self._epoch += 1
            self._window.clear()
            return
        if ticket.epoch < self._epoch:
            return  # granted under an earlier limit: says nothing about the current one
        self._window.append((latency / max(base, 1e-9), latency - base, load, base, now))
        if len(self._window) < max(MIN_WINDOW, min(self.limit, WINDOW)):
            return
        ratio = statistics.median(w[0] for w in self._window)
        excess = statistics.median(w[1] for w in self._window)
        used = max(w[2] for w in self._window) + 0.5  # (a mean: "used the limit" within half a request)
        if ratio > self.tolerance and excess > self.min_excess:
            if self._slow_since is None:  # the run begins at this window's first slow answer
                slow = (at for r, e, _, _, at in self._window if r > self.tolerance and e > self.min_excess)
                self._slow_since = next(slow, self._window[0][4])
            if now - self._slow_since >= SUSTAIN * statistics.median(w[3] for w in self._window):
                # A standing queue at the server: k in flight took `ratio` service times, so it serves
                # ~k/ratio at once.
                self._decrease(math.floor(statistics.median(k / r for r, _, k, _, _ in self._window)))
                return
            # Slow answers bunched within a baseline or two: a transient (a burst read late, our own
            # event loop busy) until answers of requests sent after it say otherwise. Hold.
            if self._grew:  # slow right after an increase: probe upwards less often, as after an overshoot
                self._probe_every = min(MAX_PROBE_EVERY, self._probe_every * 2)
                self._grew = False
            self._window.clear()
            self._good = 0
            return
        self._slow_since = None
        self._window.clear()
        self._good += 1
        if self._grew:  # the last increase held: probe freely again
            self._grew = False
            self._probe_every = 1
        if used >= self.limit and self.limit < self.ceiling and self._good >= self._probe_every:
            grow = self.limit if self._phase == "slow_start" else max(1, math.isqrt(self.limit))
            self._limit = float(min(self.ceiling, self.limit + grow))
            self.increases += 1
            self._grew = True
            self._good = 0
            self._epoch += 1
