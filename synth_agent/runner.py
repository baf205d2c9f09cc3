"""How the commands that run fits drive their event loop: uvloop, with the start-up heap frozen.

A fit is thousands of small HTTP requests made by one single-threaded process, and on a
2-core machine that process's CPU per request bounds how many users fit at once
(docs/llm.md, "20 users at once"). Two process-wide costs in it are not the fit's own work:

* **asyncio's pure-Python event loop and socket transports.** uvloop (libuv, in C) runs the same
  coroutines, aiohttp included, with less CPU per callback and per socket read or write.
* **full garbage collections of the start-up heap.** The imports (LangChain, LangGraph,
  pydantic models, aiohttp, Chroma) leave ~100k long-lived objects that every generation-2
  collection walks again: ~0.1 s per 20-user fit on this machine. :func:`freeze_heap` moves
  them to the permanent generation (after one collection), as ``synth-agent serve`` does
  (:func:`synth_agent.serving.freeze_heap_after_startup`).
* **young collections of requests in flight.** CPython starts a generation-0 collection every
  700 net container allocations; a fit with 64 requests in flight allocates that many every
  few requests, and each collection walks the young objects, mostly the state of requests still in
  flight, which reference counting frees moments later anyway: 0.12–0.15 s of collector time per
  20-user fit on this machine, about a tenth of the process's CPU. While fits run,
  :func:`run_fits` raises that threshold to :data:`YOUNG_COLLECTION_THRESHOLD` (cycles are
  still collected, less often) and puts the previous thresholds back afterwards.

Only the process owner should do either: :func:`run_fits` is called by the ``fit``, ``eval``
and ``worker`` commands, never on import, so a program that embeds the library keeps its own
loop and collector settings. ``SYNTH_AGENT_EVENT_LOOP=asyncio`` selects asyncio's loop instead
(where uvloop is not installed, e.g. Windows, asyncio's is used anyway). The simulator keeps
asyncio's loop on purpose (:func:`synth_agent.sim.server.serve_sim`).
"""

from __future__ import annotations

import asyncio
import gc
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["EVENT_LOOPS", "YOUNG_COLLECTION_THRESHOLD", "event_loop_name", "freeze_heap", "loop_factory", "run_fits"]

T = TypeVar("T")

EVENT_LOOPS = ("uvloop", "asyncio")
"""Values of ``SYNTH_AGENT_EVENT_LOOP`` (the first is the default)."""
YOUNG_COLLECTION_THRESHOLD = 50_000
"""Generation-0 threshold of the collector while :func:`run_fits` runs (CPython's default: 700). In-process A/B of
``bench/fit_cost.py``'s 20-user fit (5 alternating rounds, 2026-12-01): collector time 0.14 → 0.03 s at 10,000 and
→ 0 at 50,000 (no young collection left in the fit), client CPU per request 1.10 → 0.94 → 0.90 ms."""


def event_loop_name() -> str:
    """The event loop the fit commands run on: ``SYNTH_AGENT_EVENT_LOOP`` (ValueError naming it if unknown)."""
    raw = os.environ.get("SYNTH_AGENT_EVENT_LOOP", "").strip().lower() or EVENT_LOOPS[0]
    if raw not in EVENT_LOOPS:
        raise ValueError(f"SYNTH_AGENT_EVENT_LOOP must be one of {', '.join(EVENT_LOOPS)}, got {raw!r}")
    return raw


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """A factory for ``asyncio.Runner``: uvloop's for ``"uvloop"`` when installed, else None (asyncio's)."""
    if name == "uvloop":
        try:
            import uvloop
        except ImportError:  # an optional speed-up: platforms without it run on asyncio's loop
            return None
        return uvloop.new_event_loop
    return None


def freeze_heap() -> None:
    """Collect once, then keep everything allocated so far out of later collections (see the module doc)."""
    gc.collect()
    gc.freeze()


def run_fits(coro: Coroutine[Any, Any, T], *, loop: str | None = None) -> T:
    """Run ``coro`` to completion on a new event loop (``loop`` or :func:`event_loop_name`), after freezing
    the heap built so far, with young collections every :data:`YOUNG_COLLECTION_THRESHOLD` allocations
    (the collector's thresholds are put back when it returns). For the owner of the process only (a
    command's entry point)."""
    try:
        factory = loop_factory(loop or event_loop_name())
    except BaseException:
        coro.close()  # never started: no "coroutine was never awaited" warning
        raise
    freeze_heap()
    previous = gc.get_threshold()
    gc.set_threshold(max(previous[0], YOUNG_COLLECTION_THRESHOLD), *previous[1:])
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(coro)
    finally:
        gc.set_threshold(*previous)
