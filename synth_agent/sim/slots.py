"""Server-side decoding slots for the simulator: serve N completions at once, queue the rest (FIFO).

A self-hosted llama.cpp server on a CPU has one slot (``--parallel 1``): a second
request waits in the *server's* queue while the client's timeout runs. The
simulator reproduces that with ``create_sim_app(slots=1, latency_ms=...)`` so the
client's adaptive concurrency can be tested against a server it would otherwise
flood. With ``advertise_slots`` the simulator also states its capacity the way
llama.cpp does (``GET /props`` → ``total_slots``, ``GET /slots``).
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from typing import Any

__all__ = ["SlotQueue"]


class SlotQueue:
    """``slots`` completions at a time; waiters are served first come, first served.

    Counters (``queued``, ``max_queued``, ``busy``, ``max_busy``, ``abandoned``) are
    read by the simulator's ``/stats``. Bound to the event loop of the first waiter.
    """

    def __init__(self, slots: int, *, advertise: bool = True, context_length: int = 4096) -> None:
        if slots < 1:
            raise ValueError("slots must be at least 1")
        self.slots = slots
        self.advertise = advertise
        self.context_length = context_length
        self._free = slots
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._lock = threading.Lock()  # counters are read from other threads
        self.queued = self.max_queued = self.busy = self.max_busy = self.abandoned = 0

    async def take(self, request: Any) -> bool:
        """Wait for a slot; False (no slot held) if the client hung up while queued."""
        if self._free > 0 and not self._waiters:
            self._free -= 1
            self._mark_busy()
            return True
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        with self._lock:
            self.queued += 1
            self.max_queued = max(self.max_queued, self.queued)
        try:
            while True:
                done, _ = await asyncio.wait({fut}, timeout=0.05)
                if done:
                    self._mark_busy()
                    return True
                if await request.is_disconnected():
                    self._abandon(fut)
                    return False
        except asyncio.CancelledError:
            self._abandon(fut)
            raise
        finally:
            with self._lock:
                self.queued -= 1

    def _abandon(self, fut: asyncio.Future[None]) -> None:
        with self._lock:
            self.abandoned += 1
        if fut.done() and not fut.cancelled():
            self._mark_busy()  # granted just as the client left: pass the slot on
            self.give()
        else:
            fut.cancel()
            try:
                self._waiters.remove(fut)
            except ValueError:
                pass

    def _mark_busy(self) -> None:
        with self._lock:
            self.busy += 1
            self.max_busy = max(self.max_busy, self.busy)

    def give(self) -> None:
        """Free one slot (hand it to the next waiter, if any)."""
        with self._lock:
            self.busy -= 1
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self._free += 1

    def props(self, model_name: str) -> dict[str, Any]:
        """llama.cpp's ``/props`` shape (the fields clients read)."""
        return {
            "model_alias": model_name,
            "total_slots": self.slots,
            "default_generation_settings": {"n_ctx": self.context_length},
        }

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {"slots": self.slots, "queued": self.queued, "max_queued": self.max_queued,
                    "busy": self.busy, "max_busy": self.max_busy, "abandoned": self.abandoned}  # fmt: skip

    def reset(self) -> None:
        with self._lock:
            self.max_queued, self.max_busy, self.abandoned = self.queued, self.busy, 0
