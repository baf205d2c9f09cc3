"""Pieces shared by the graphs: per-tenant memories, persona messages, checkpointers, caches.

Who a run is for lives in :mod:`graphs.identity`.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, SystemMessage
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.store.base import BaseStore

from store.memory import PreferenceMemory
from synth_agent.models import Message, PersonaProfile

PERSONA_MESSAGE_ID = "synth-agent-persona"
"""Message id of the injected persona system message: a re-injection replaces it (add_messages is id-based)."""
PERSONA_MARKER = "synth_agent_persona"
"""``additional_kwargs`` key marking the injected message, so it is never stacked or judged."""

MemoryFactory = Callable[[str], PreferenceMemory]


class TenantMemories:
    """One :class:`PreferenceMemory` per tenant over one store.

    PreferenceMemory serialises a user's writes with instance locks, so a process
    must use a single instance per tenant; this is the factory that guarantees it.
    """

    def __init__(self, store: BaseStore) -> None:
        self.store = store
        self._by_tenant: dict[str, PreferenceMemory] = {}

    def __call__(self, tenant_id: str) -> PreferenceMemory:
        mem = self._by_tenant.get(tenant_id)
        if mem is None:
            mem = self._by_tenant[tenant_id] = PreferenceMemory(self.store, tenant_id)
        return mem


def is_persona_message(m: BaseMessage) -> bool:
    return bool(m.additional_kwargs.get(PERSONA_MARKER)) or (
        m.id == PERSONA_MESSAGE_ID and isinstance(m, SystemMessage)
    )


def persona_message(system_prompt: str, version: int) -> SystemMessage:
    return SystemMessage(
        content=system_prompt,
        id=PERSONA_MESSAGE_ID,
        additional_kwargs={PERSONA_MARKER: True, "persona_version": version},
    )


def with_persona(messages: Sequence[BaseMessage], persona: SystemMessage | None) -> list[BaseMessage]:
    """``messages`` without any earlier injected persona, with ``persona`` (if any) first.

    The user's own system messages are kept, after ours.
    """
    rest = [m for m in messages if not is_persona_message(m)]
    return [persona, *rest] if persona is not None else rest


def text_of(message: BaseMessage) -> str:
    c = message.content
    if isinstance(c, str):
        return c
    return message.text if hasattr(message, "text") else str(c)


def to_context(messages: Sequence[BaseMessage]) -> list[Message]:
    """The conversation as the judge sees it: user/assistant/system text turns, injected persona removed."""
    out: list[Message] = []
    for m in messages:
        if is_persona_message(m):
            continue
        role = {"human": "user", "ai": "assistant", "system": "system"}.get(m.type)
        if role is None:
            continue  # tool messages: not part of what the user saw
        text = text_of(m)
        if role == "assistant" and not text.strip():
            continue  # a bare tool call
        out.append(Message(role=role, content=text))  # type: ignore[arg-type]
    if not any(m.role == "user" for m in out):
        raise ValueError("the conversation has no user message to answer")
    return out


def final_answer(messages: Sequence[BaseMessage]) -> AIMessage:
    for m in reversed(messages):
        if isinstance(m, AIMessage) and text_of(m).strip():
            return m
    raise ValueError("the wrapped agent returned no assistant message with text")


# ------------------------------------------------------------------ checkpointers


def default_home() -> Path:
    return Path(os.environ.get("SYNTH_AGENT_HOME") or ".synth-agent")


@asynccontextmanager
async def open_checkpointer(
    home: str | Path | None = None, *, postgres_dsn: str | None = None
) -> AsyncIterator[BaseCheckpointSaver[Any]]:
    """The synthesis checkpointer, opened in the running event loop.

    SQLite (``<home>/checkpoints.sqlite``, home = ``SYNTH_AGENT_HOME`` or ``.synth-agent``)
    by default; Postgres when ``postgres_dsn`` (or ``SYNTH_AGENT_POSTGRES_DSN``) is set,
    which needs the ``postgres`` extra (``pip install 'synth-agent[postgres]'``).
    """
    dsn = postgres_dsn or os.environ.get("SYNTH_AGENT_POSTGRES_DSN")
    if dsn:
        try:
            from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
        except ImportError as exc:
            raise RuntimeError(
                "a Postgres DSN is configured but langgraph-checkpoint-postgres is not installed: "
                "pip install 'synth-agent[postgres]' (or unset SYNTH_AGENT_POSTGRES_DSN to use SQLite)"
            ) from exc
        async with AsyncPostgresSaver.from_conn_string(dsn) as saver:
            await saver.setup()
            yield saver
        return
    from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

    base = Path(home) if home is not None else default_home()
    base.mkdir(parents=True, exist_ok=True)
    async with AsyncSqliteSaver.from_conn_string(str(base / "checkpoints.sqlite")) as saver:
        # Deleted checkpoints (a forgotten user's votes) are zeroed, never left in free pages.
        await saver.conn.execute("PRAGMA secure_delete = ON")
        await saver.setup()
        yield saver


async def erase_threads(checkpointer: BaseCheckpointSaver[Any], thread_ids: Sequence[str]) -> None:
    """Delete checkpoint threads for good: rows deleted, and for SQLite the WAL checkpointed and truncated.

    With :func:`open_checkpointer`'s ``secure_delete`` the deleted rows are zeroed in the database
    file; truncating the WAL removes the older copies of their pages. Returns once that is on disk.
    """
    for thread_id in thread_ids:
        await checkpointer.adelete_thread(thread_id)
    conn = getattr(checkpointer, "conn", None)
    if conn is None or not hasattr(conn, "execute") or not hasattr(checkpointer, "lock"):
        return  # Postgres: deleted rows go at the next VACUUM (docs/store.md)
    async with checkpointer.lock:
        for _attempt in range(50):
            async with conn.execute("PRAGMA wal_checkpoint(TRUNCATE)") as cur:
                busy, _, _ = await cur.fetchone()
            if not busy:
                return
            await asyncio.sleep(0.02)
    raise RuntimeError("could not truncate the checkpoint WAL: a reader keeps it open")


# ------------------------------------------------------------------ persona cache


class PersonaCache:
    """Current persona per (tenant, user), so a chat turn costs no store read once warm.

    Invalidated (or refreshed) by the scheduler's listener when a new version is saved;
    ``ttl`` bounds staleness when another process saves personas. ``ttl=0`` disables
    caching (every turn reads the store), which is what module-level graphs use.

    Bounded: entries are kept in the order they were written (which, with one ``ttl``, is the
    order they expire in); each write drops expired entries from the front and, past
    ``max_entries``, the oldest. Without that a server kept one profile per user it ever
    served, expired or not, for as long as it ran.
    """

    def __init__(self, ttl: float | None = 300.0, *, max_entries: int = 10_000) -> None:
        if ttl is not None and ttl < 0:
            raise ValueError("persona cache ttl must be >= 0 (0 disables the cache, None never expires)")
        if max_entries < 1:
            raise ValueError("persona cache max_entries must be >= 1")
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, str], tuple[float, PersonaProfile | None]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def cached(self, tenant: str, user: str) -> tuple[bool, PersonaProfile | None]:
        """``(True, profile)`` when a fresh entry is cached (counted as a hit), else ``(False, None)``.

        Lets a server answer a warm read without creating a task for it (:meth:`get` would not wait).
        """
        hit = self._entries.get((tenant, user))
        if hit is not None and (self.ttl is None or time.monotonic() < hit[0]):
            self.hits += 1
            return True, hit[1]
        return False, None

    async def get(self, memory: PreferenceMemory, tenant: str, user: str) -> PersonaProfile | None:
        now = time.monotonic()
        hit = self._entries.get((tenant, user))
        if hit is not None and (self.ttl is None or now < hit[0]):
            self.hits += 1
            return hit[1]
        self.misses += 1
        profile = await memory.current_persona(user)
        if self.ttl != 0:
            self._store((tenant, user), now, profile)
        return profile

    def put(self, tenant: str, user: str, profile: PersonaProfile | None) -> None:
        """Record a just-saved version (newer versions only) so the next turn uses it without a read."""
        if self.ttl == 0:
            return
        old = self._entries.get((tenant, user))
        if old is not None and old[1] is not None and profile is not None and old[1].version > profile.version:
            return
        self._store((tenant, user), time.monotonic(), profile)

    def _store(self, key: tuple[str, str], now: float, profile: PersonaProfile | None) -> None:
        self._entries[key] = (now + self.ttl if self.ttl is not None else 0.0, profile)
        self._entries.move_to_end(key)
        while self._entries:
            oldest, (expires, _) = next(iter(self._entries.items()))
            if len(self._entries) <= self.max_entries and (self.ttl is None or expires > now):
                break
            del self._entries[oldest]

    def invalidate(self, tenant: str, user: str | None = None) -> None:
        if user is not None:
            self._entries.pop((tenant, user), None)
        else:
            for key in [k for k in self._entries if k[0] == tenant]:
                del self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)


class KeyedLocks:
    """One asyncio lock per key, dropped when nobody holds or waits for it (no per-user growth)."""

    def __init__(self) -> None:
        self._locks: dict[Any, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, key: Any) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (None, 0))
        if lock is None:
            lock = asyncio.Lock()
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users <= 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)


def append_or_reset(old: list[dict[str, Any]] | None, new: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """State reducer for fanned-out candidates: parallel ``Send`` tasks append; ``None`` resets (new turn)."""
    if new is None:
        return []
    return [*(old or []), *new]
