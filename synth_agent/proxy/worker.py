"""Background synthesis outside the request path: the store poller, and the ``synth-agent worker`` process.

Votes are the source of truth and they are in the store, so anything that can read
the store can decide who needs a fit. :class:`StorePoller` lists every tenant's
users with their vote counts and hands users whose count changed (all of them on
the first sweep) to a :class:`~synth_agent.scheduler.SynthesisScheduler`, whose
policy decides whether a fit is due. That makes restarts safe: votes stored while
no scheduler ran are picked up by the next sweep, and an interrupted fit resumes
from the synthesis graph's checkpoint (SQLite under the store home).

The proxy runs one sweep at startup (and optionally polls); ``synth-agent worker``
polls forever with the same scheduler, for deployments that keep fits off the
serving process (run ``serve --synthesis off`` then, and share the store: a Chroma
server, since an embedded Chroma directory is not safe across processes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from langgraph.store.base import BaseStore

from graphs.chat import TenantMemories
from store.memory import ROOT, decode_label
from synth_agent.scheduler import SynthesisScheduler

__all__ = ["StorePoller", "SynthesisWorker"]

log = logging.getLogger("synth_agent.proxy.worker")


class StorePoller:
    """Finds users whose vote count changed since the last sweep and notifies the scheduler."""

    def __init__(self, store: BaseStore, memories: TenantMemories, scheduler: SynthesisScheduler) -> None:
        self.store = store
        self.memories = memories
        self.scheduler = scheduler
        self.sweeps = 0
        self._seen: dict[tuple[str, str], int] = {}
        self._task: asyncio.Task[None] | None = None
        self.swept = asyncio.Event()
        """Set after the first sweep (tests and readiness probes wait on it)."""

    async def tenants(self) -> list[str]:
        out: list[str] = []
        offset = 0
        while True:
            page = await self.store.alist_namespaces(prefix=(ROOT,), max_depth=2, limit=100, offset=offset)
            out += [decode_label(ns[1]) for ns in page if len(ns) == 2]
            if len(page) < 100:
                return sorted(set(out))
            offset += len(page)

    async def sweep(self) -> int:
        """One pass over the store; returns how many users were handed to the scheduler."""
        notified = 0
        for tenant in await self.tenants():
            for user, n in (await self.memories(tenant).users_with_counts()).items():
                key = (tenant, user)
                if n and self._seen.get(key) != n:
                    self._seen[key] = n
                    self.scheduler.notify_vote(tenant, user)
                    notified += 1
        self.sweeps += 1
        self.swept.set()
        return notified

    def start(self, interval: float | None) -> None:
        """Sweep once now (in the background), then every ``interval`` seconds if given."""
        self._task = asyncio.get_running_loop().create_task(self._loop(interval), name="synthesis-poller")

    async def _loop(self, interval: float | None) -> None:
        while True:
            try:
                n = await self.sweep()
                if n:
                    log.info("store sweep: %d user(s) to check for synthesis", n)
            except Exception:
                log.exception("store sweep failed; will retry")
                self.swept.set()  # do not block waiters forever on a broken store
            if interval is None:
                return
            await asyncio.sleep(interval)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


class SynthesisWorker:
    """The ``synth-agent worker`` process: store poller + scheduler + resumable synthesis graph."""

    def __init__(
        self,
        store: BaseStore,
        llm: Any,
        checkpointer: Any,
        *,
        fit_config: Any = None,
        policy: Any = None,
        poll_interval: float = 5.0,
    ) -> None:
        from graphs.synthesis import SynthesisRunner, build_synthesis_graph

        self.memories = TenantMemories(store)
        graph = build_synthesis_graph(llm=llm, memory_for=self.memories, fit_config=fit_config, checkpointer=checkpointer)
        self.scheduler = SynthesisScheduler(SynthesisRunner(graph, self.memories), self.memories, policy)
        self.poller = StorePoller(store, self.memories, self.scheduler)
        self.poll_interval = poll_interval

    async def run(self, stop: asyncio.Event) -> None:
        """Poll until ``stop`` is set, then let running fits finish (interrupted ones resume next time)."""
        self.poller.start(self.poll_interval)
        try:
            await stop.wait()
        finally:
            await self.poller.aclose()
            await self.scheduler.aclose(drain=True, drain_timeout=10.0)


@contextlib.asynccontextmanager
async def open_worker(settings: Any, *, poll_interval: float = 5.0, **kw: Any) -> AsyncIterator[SynthesisWorker]:
    """A worker over the configured store, LLM and checkpointer (all closed on exit)."""
    from graphs.synthesis import open_checkpointer
    from synth_agent.services import open_llm, open_store

    store = await asyncio.to_thread(open_store, settings, server=True)
    llm = open_llm(settings)
    try:
        async with open_checkpointer(settings.home) as cp:
            yield SynthesisWorker(store, llm, cp, poll_interval=poll_interval, **kw)
    finally:
        await llm.aclose()
        await asyncio.to_thread(store.close)
