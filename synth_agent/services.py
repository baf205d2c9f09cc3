"""Wiring: settings → store, preference memory and LLM client, for the CLI, demo and server.

Library users can build these pieces themselves; this module is the one place
that decides the defaults (embedded Chroma under ``SYNTH_AGENT_HOME``, a Chroma
server when ``CHROMA_HOST`` is set, the offline simulator when no real endpoint
is configured).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from synth_agent.config import DEFAULT_SIM_URL, Settings

if TYPE_CHECKING:
    from synth_agent.llm.base import ChatBackend

# The LLM layer (aiohttp, tenacity...), httpx and the store are imported where they are used:
# store commands (`votes`, `persona`...) never load an HTTP client, and key-only commands no store.


def open_store(settings: Settings, *, reindex: bool = False, server: bool = False, warm: bool = False,
               queue: str | None = None) -> Any:
    """The configured LangGraph BaseStore: the local store under ``<home>/chroma``, or a Chroma server.

    ``server=True`` (long-running services: ``serve``, ``worker``) runs the local directory's
    Chroma in a child process, so that Chroma never holds this process's GIL; one-shot commands
    open it in-process, or connect through the server of a synth-agent process that already
    serves it. With ``CHROMA_HOST`` the shared server is used; in the scale-out mode (``queue``: the
    Postgres DSN) values are sealed with data keys kept in that Postgres
    (:class:`synth_agent.scale.ledger.PgLedger`), without it they are stored unsealed. The batch
    journal is kept in ``<home>/store-journal.sqlite3``. ``reindex`` re-embeds every item with the
    current embedding model first (after a model change, or to migrate an older layout).
    ``warm`` loads the embedding model now (a server: its first vote write would otherwise pay the
    model load, seconds); by default it loads on first use, so read-only commands never load it.
    """
    from store.chroma import ChromaStore
    from store.embeddings import LazyMiniLMEmbeddings

    # One intra-op thread per call: the store's embedding stage runs one call per core at once
    # (more threads per call would oversubscribe the cores).
    ef = LazyMiniLMEmbeddings(threads=1)
    settings.home.mkdir(parents=True, exist_ok=True)
    if warm:
        ef.embed_query("warm-up")
    if settings.chroma_host and queue:
        from synth_agent.scale.ledger import PgLedger

        return ChromaStore(
            host=settings.chroma_host,
            port=settings.chroma_port,
            embedding_function=ef,
            reindex=reindex,
            ledger=PgLedger(queue, journal=settings.home / "store-journal.sqlite3"),
            seal=True,
        )
    if settings.chroma_host:
        return ChromaStore(
            host=settings.chroma_host,
            port=settings.chroma_port,
            embedding_function=ef,
            reindex=reindex,
            ledger=settings.home / "store-journal.sqlite3",
            seal=False,
        )
    if server:
        # Embedding threads at a lower priority: requests, reads and /healthz pre-empt them.
        # Votes are acknowledged once durable in the intake journal and stored in the background
        # (store.intake); SYNTH_AGENT_INTAKE=0 makes them wait for the Chroma commit, N bounds the backlog.
        return ChromaStore.local_server(settings.home / "chroma", embedding_function=ef, reindex=reindex, embed_nice=10,
                                        intake=_intake_setting(), compact_ratio=_compact_setting())
    return ChromaStore(path=str(settings.home / "chroma"), embedding_function=ef, reindex=reindex)


DEFAULT_COMPACT_RATIO = 1.0
"""``SYNTH_AGENT_COMPACT_RATIO`` when unset: ``serve`` and ``worker`` compact their store once the records
deleted since the last compaction equal the live ones (and are at least 2,000), then restart their
Chroma child. Chroma's HNSW index never reuses a deleted record's slot, so without compaction its
memory follows every record ever written; with 1 it holds at most about twice the live records'.
Measured in a 25-minute soak with a compaction every ~3 minutes: server and Chroma flat after
warm-up, 0 errors, no acknowledged vote missing; in an 18-minute one Chroma flat, the server
+0.6 MB/min (docs/store.md, "Compaction on by default").
The price: writes wait for the copy (~2-3 s for a few thousand records), reads for the restart
(~1-2 s), and the next Chroma child (~60-90 MB) runs alongside the old one during the copy."""


def _compact_setting() -> float:
    """``SYNTH_AGENT_COMPACT_RATIO``: a server compacts its store once records deleted since the last
    compaction reach this share of the live ones, then restarts its Chroma process (docs/store.md,
    "Compaction"). Unset or empty: :data:`DEFAULT_COMPACT_RATIO`; 0: never."""
    raw = os.environ.get("SYNTH_AGENT_COMPACT_RATIO", "").strip() or str(DEFAULT_COMPACT_RATIO)
    try:
        ratio = float(raw)
    except ValueError:
        raise ValueError(f"SYNTH_AGENT_COMPACT_RATIO must be a number >= 0, got {raw!r}") from None
    if not ratio >= 0:
        raise ValueError(f"SYNTH_AGENT_COMPACT_RATIO must be a number >= 0, got {raw!r}")
    return ratio


def _intake_setting() -> bool | int:
    raw = os.environ.get("SYNTH_AGENT_INTAKE", "1").strip().lower()
    if raw in ("0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on", ""):
        return True
    try:
        limit = int(raw)
    except ValueError:
        raise ValueError(f"SYNTH_AGENT_INTAKE must be 0, 1 or a backlog limit (an integer), got {raw!r}") from None
    if limit < 2:
        raise ValueError(f"SYNTH_AGENT_INTAKE as a backlog limit must be >= 2, got {limit}")
    return limit


def open_memory(settings: Settings, tenant: str = "default", *, queue: str | None = None) -> Any:
    from store.memory import PreferenceMemory

    return PreferenceMemory(open_store(settings, queue=queue), tenant=tenant)


@contextlib.contextmanager
def open_view(settings: Settings, tenant: str = "default", *, full: bool = True) -> Iterator[Any]:
    """Read-only preference memory for one-shot read commands: a :class:`store.memory_view.PreferenceView`
    over a :class:`store.reader.StoreReader` when the local store can be read that way (it then imports
    neither LangGraph nor LangChain: docs/cli.md#start-up-time), else the full :func:`open_memory`
    (``full=False``: None instead).

    The reader holds the store directory until the block ends; the full memory is left open, as
    :func:`open_memory` leaves it.
    """
    if not settings.chroma_host:
        from store.reader import StoreReader

        reader = StoreReader.open(settings.home / "chroma")
        if reader is not None:
            from store.memory_view import PreferenceView

            with reader:
                yield PreferenceView(reader, tenant)
            return
    yield open_memory(settings, tenant) if full else None


def open_llm(settings: Settings, *, disk_cache: bool | None = None) -> ChatBackend:
    """An LLM backend for the configured endpoint(s).

    Temperature-0 answers are cached in memory (an LRU bounded by ``SYNTH_AGENT_LLM_CACHE_MB``
    and ``SYNTH_AGENT_LLM_CACHE_ENTRIES``; either ``0`` turns it off); on disk
    (``<home>/llm-cache.sqlite``) only with ``SYNTH_AGENT_LLM_DISK_CACHE=1``: cached prompts
    contain users' votes and cannot be picked out by user, so ``forget`` empties the cache.

    ``SYNTH_AGENT_JUDGE_ENDPOINTS`` (several self-hosted servers) gives an :class:`EndpointPool`;
    otherwise one :class:`LLMClient` for ``OPENAI_BASE_URL``.
    """
    from synth_agent.llm.cache import MemoryCache, SqliteCache
    from synth_agent.llm.client import EndpointConfig, LLMClient

    cache: Any = False
    if settings.llm_cache_mb > 0 and settings.llm_cache_entries > 0:
        cache = MemoryCache(max_entries=settings.llm_cache_entries, max_bytes=max(1, int(settings.llm_cache_mb * 2**20)))
    if os.environ.get("SYNTH_AGENT_JUDGE_ENDPOINTS"):
        from synth_agent.llm.pool import EndpointPool

        return EndpointPool.from_env(cache=cache)
    if settings.llm_disk_cache if disk_cache is None else disk_cache:
        settings.home.mkdir(parents=True, exist_ok=True)
        cache = SqliteCache(settings.home / "llm-cache.sqlite")
    return LLMClient(EndpointConfig.from_settings(settings), cache=cache)


def endpoint_alive(base_url: str, timeout: float = 0.5) -> bool:
    import httpx

    try:
        r = httpx.get(base_url.rstrip("/") + "/models", timeout=timeout)
        return r.status_code < 500
    except httpx.HTTPError:
        return False


@contextlib.contextmanager
def simulator_if_needed(
    settings: Settings, *, quiet: bool = False, force: bool = False, **sim_kw: Any
) -> Iterator[Settings]:
    """Yield settings that point at a live endpoint.

    When the configured endpoint is the default simulator URL and nothing listens
    there (or ``force``), start the simulator in a child process on a free port for
    the duration (its own process, so it does not compete with this one for the GIL).
    The child ends with this process, even if it is killed (:mod:`synth_agent.lifecycle`).
    Without ``force`` a real endpoint is never replaced.
    """
    if not force and (
        settings.base_url.rstrip("/") != DEFAULT_SIM_URL.rstrip("/") or endpoint_alive(settings.base_url)
    ):
        yield settings
        return
    from synth_agent.sim.server import SimProcess

    with SimProcess(**sim_kw) as ep:
        if not quiet and force:
            print(f"[synth-agent] using the offline simulator at {ep.base_url} (pid {ep.pid}).", file=sys.stderr)
        elif not quiet:
            print(
                f"[synth-agent] no LLM endpoint configured: using the offline simulator at {ep.base_url}. "
                "Set OPENAI_BASE_URL / OPENAI_API_KEY / SYNTH_AGENT_MODEL (or --base-url/--api-key/--model) "
                "for a real model.",
                file=sys.stderr,
            )
        yield settings.model_copy(update={"base_url": ep.base_url})


@dataclass
class Services:
    settings: Settings
    memory: Any
    llm: ChatBackend


@contextlib.asynccontextmanager
async def open_services(settings: Settings, tenant: str = "default") -> AsyncIterator[Services]:
    llm = open_llm(settings)
    try:
        yield Services(settings, open_memory(settings, tenant), llm)
    finally:
        await llm.aclose()
