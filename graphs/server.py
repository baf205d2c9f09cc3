"""The graphs under the LangGraph API server (``langgraph dev``, LangSmith Deployment): background
synthesis and the shared store.

**Background synthesis** (:class:`ServerSynthesis`, the chat graph's vote hook there). No
:class:`~synth_agent.scheduler.SynthesisScheduler` runs inside the server; instead, when a
vote makes a fit due by the :class:`~synth_agent.scheduler.SynthesisPolicy` (first fit at 5
votes, refits at 10, 20, 40 ... or every 50), the hook asks the server itself, through the
LangGraph SDK in process, to run the ``synthesis`` assistant in the background on that
user's own thread (:func:`user_synthesis_thread`). The run is created with the server's
``enqueue`` multitask strategy, so a fit in flight is never interrupted and the new one
waits behind it; if a run is already pending for the user, no second one is queued (the
pending run reads every vote when it starts). Queued runs are ``due_only``: when one
starts it re-checks the policy against the votes and persona it then finds, so a burst
of votes costs one fit. ``debounce`` seconds of delay (``after_seconds``) gather a burst
before the run starts. The chat run only records the vote and enqueues; the fit runs
in a server worker, never on the request path. Under LangGraph auth the background run
carries the voter's signed-in identity (the server passes the auth context to in-process
SDK calls), so it can only fit that user.

A cron assistant would be the other way: crons fire on a clock, not on a vote, and a cron
would have to scan every user each time; the vote-triggered run does no work for users who
did not vote.

**One store** (:func:`shared_store`, ``langgraph.json`` ``"store": {"path": ...}``): the server
keeps votes and personas in synth-agent's own store, configured like the CLI
(``SYNTH_AGENT_HOME`` / ``CHROMA_HOST``), so ``synth-agent persona``, ``votes``, ``fit``,
``ingest`` and ``serve`` see what the server's graphs wrote and the other way round.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from langgraph.store.base import BaseStore

from graphs._common import KeyedLocks
from store.memory import PreferenceMemory
from synth_agent.scheduler import SynthesisPolicy

__all__ = ["ServerSynthesis", "shared_store", "user_synthesis_thread"]

log = logging.getLogger("synth_agent.graphs.server")

_THREAD_NAMESPACE = uuid.UUID("6f0b3c4e-5a43-4f7e-9d3b-3f1a4a9c2e71")


def user_synthesis_thread(tenant_id: str, user_id: str) -> str:
    """The LangGraph server thread that holds one user's background synthesis runs (a stable UUID)."""
    return str(uuid.uuid5(_THREAD_NAMESPACE, json.dumps(["synth-agent-synthesis", tenant_id, user_id])))


def _in_server() -> bool:
    return "langgraph_api.server" in sys.modules or "langgraph_api" in sys.modules


class ServerSynthesis:
    """Schedules a user's synthesis as a background run on the LangGraph server when a vote makes a fit due.

    ``assistant_id``: the synthesis graph's id in ``langgraph.json`` (or an assistant of it).
    ``policy``: when a fit is due (the synthesis graph re-checks it with its own policy when the
    run starts: keep the two equal). ``client``: a zero-argument factory of a LangGraph SDK client;
    default ``langgraph_sdk.get_client()`` with no URL, i.e. in process, which only works inside the
    server. Implements :class:`graphs.chat.BackgroundSynthesis`.
    """

    def __init__(
        self,
        assistant_id: str = "synthesis",
        *,
        policy: SynthesisPolicy | None = None,
        client: Callable[[], Any] | None = None,
    ) -> None:
        self.assistant_id = assistant_id
        self.policy = policy or SynthesisPolicy()
        self._client = client
        self._locks = KeyedLocks()

    async def vote_recorded(self, tenant_id: str, user_id: str, memory: PreferenceMemory) -> dict[str, Any] | None:
        """Enqueue a synthesis run for the user if a fit is due; returns what was done (for ``vote_result``)."""
        n_votes = await memory.count_votes(user_id)
        current = await memory.current_persona(user_id)
        fitted_on = len(current.vote_ids) if current is not None else None
        if not self.policy.should_fit(n_votes, fitted_on):
            return {"scheduled": False, "votes": n_votes, "next_fit_at": self.policy.next_threshold(fitted_on)}
        if self._client is None and not _in_server():
            return {"scheduled": False, "votes": n_votes, "reason": "not running under the LangGraph server"}
        thread_id = user_synthesis_thread(tenant_id, user_id)
        async with self._locks.hold(thread_id):  # one check-then-enqueue at a time per user in this process
            client = self._client() if self._client is not None else _in_process_client()
            try:
                await client.threads.create(
                    thread_id=thread_id, if_exists="do_nothing", metadata={"synth_agent": "synthesis"}
                )
                pending = await client.runs.list(thread_id, status="pending", limit=1)
                if pending:
                    return {
                        "scheduled": True, "already_queued": True, "votes": n_votes,
                        "thread_id": thread_id, "run_id": pending[0]["run_id"],
                    }
                run = await client.runs.create(
                    thread_id,
                    self.assistant_id,
                    input={"due_only": True},
                    context={"synth_user_id": user_id, "tenant_id": tenant_id},
                    multitask_strategy="enqueue",
                    after_seconds=int(round(self.policy.debounce)) or None,
                    metadata={"synth_agent": "background-synthesis"},
                )
            finally:
                if self._client is None:
                    await client.aclose()
        log.info("scheduled background synthesis run %s for %r/%r (%d votes)", run["run_id"], tenant_id, user_id, n_votes)
        return {"scheduled": True, "votes": n_votes, "thread_id": thread_id, "run_id": run["run_id"]}


def _in_process_client() -> Any:
    from langgraph_sdk import get_client

    return get_client(api_key=None)


@asynccontextmanager
async def shared_store() -> AsyncIterator[BaseStore]:
    """The LangGraph server's store = synth-agent's store (``langgraph.json`` ``"store": {"path": ...}``).

    Opened from the same settings as the CLI: embedded Chroma under ``SYNTH_AGENT_HOME``
    (default ``./.synth-agent``), or a Chroma server when ``CHROMA_HOST`` is set. Like
    ``synth-agent serve``, the server runs the home's Chroma in a child process (writes never
    hold the server's GIL); a CLI command on the same home connects through it.
    """
    from synth_agent.config import Settings
    from synth_agent.services import open_store

    settings = Settings()
    store = await asyncio.to_thread(open_store, settings, server=True)  # starts the home's Chroma child
    where = f"Chroma server {settings.chroma_host}:{settings.chroma_port}" if settings.chroma_host else (
        f"embedded Chroma at {(settings.home / 'chroma').resolve()}"
    )
    log.info("synth-agent store for the LangGraph server: %s", where)
    # Load the embedding model now, beside the server's own startup, not inside the first user's vote.
    warm_up = asyncio.create_task(asyncio.to_thread(_warm_up, store))
    try:
        yield store
    finally:
        warm_up.cancel()
        close = getattr(store, "close", None)
        if callable(close):  # finishes queued writes, then stops the Chroma child
            await asyncio.to_thread(close)


def _warm_up(store: BaseStore) -> None:
    try:
        store.search(("synth_agent", "warm-up"), query="warm up", limit=1)  # a semantic query loads the model
    except Exception as exc:  # only a head start: the first real write would load it anyway
        log.warning("could not warm up the store's embeddings: %s", exc)
