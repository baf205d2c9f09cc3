"""Persona version numbers without collisions across processes.

``PreferenceMemory.save_persona`` numbers a version "latest + 1", read from the store:
two processes saving for one user at once could both write v3 (BaseStore has no
compare-and-set). Here the number comes from Postgres, under a row lock held *while the
persona is written to Chroma*:

1. ``INSERT ... ON CONFLICT DO NOTHING`` makes the user's counter row exist;
2. ``SELECT ... FOR UPDATE`` locks it: a second saver, on any process, waits here;
3. the version is ``max(counter, latest version in Chroma) + 1`` (Chroma stays the system of
   record; the max also adopts personas written before the scale-out mode was on);
4. the persona is written to Chroma with that number, then the counter is updated and the
   transaction commits.

If the Chroma write fails the transaction rolls back: no gap. If the process dies after the
Chroma write but before the commit, the next save reads the Chroma version in step 3: no
duplicate, no gap. So versions are strictly increasing, without gaps or duplicates.
"""

from __future__ import annotations

from typing import Any

from langgraph.store.base import BaseStore
from psycopg_pool import AsyncConnectionPool

from graphs.chat import TenantMemories
from store.memory import PreferenceMemory
from synth_agent.models import PersonaProfile

__all__ = ["PgVersionedMemory", "PgVersionedMemories"]


class PgVersionedMemory(PreferenceMemory):
    """A :class:`PreferenceMemory` whose ``save_persona`` takes its version from Postgres."""

    def __init__(self, store: BaseStore, tenant: str, pool: AsyncConnectionPool, **kw: Any) -> None:
        super().__init__(store, tenant, **kw)
        self.pool = pool

    async def save_persona(
        self, profile: PersonaProfile, *, version: int | None = None, since: int | None = None
    ) -> PersonaProfile:
        if version is not None:
            return await super().save_persona(profile, version=version, since=since)
        async with self.pool.connection() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO synth_persona_versions (tenant_id, user_id, version) VALUES (%s, %s, 0) "
                "ON CONFLICT DO NOTHING", (self.tenant, profile.user_id))
            cur = await conn.execute(
                "SELECT version FROM synth_persona_versions WHERE tenant_id = %s AND user_id = %s FOR UPDATE",
                (self.tenant, profile.user_id))
            row = await cur.fetchone()
            counter = int(row[0]) if row else 0
            current = await self.current_persona(profile.user_id)
            if since is not None and current is not None and current.version > since and current.same_fit(profile):
                return current  # another worker saved this same fit meanwhile: no new version, no number used
            allocated = max(counter, current.version if current else 0) + 1
            saved = await super().save_persona(profile, version=allocated, since=since)
            await conn.execute(
                "UPDATE synth_persona_versions SET version = %s WHERE tenant_id = %s AND user_id = %s",
                (allocated, self.tenant, profile.user_id))
        return saved


class PgVersionedMemories(TenantMemories):
    """One :class:`PgVersionedMemory` per tenant (drop-in for :class:`graphs.chat.TenantMemories`)."""

    def __init__(self, store: BaseStore, pool: AsyncConnectionPool) -> None:
        super().__init__(store)
        self.pool = pool

    def __call__(self, tenant_id: str) -> PreferenceMemory:
        mem = self._by_tenant.get(tenant_id)
        if mem is None:
            mem = self._by_tenant[tenant_id] = PgVersionedMemory(self.store, tenant_id, self.pool)
        return mem
