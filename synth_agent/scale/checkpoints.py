"""Synthesis checkpoints in Postgres: finding and erasing one user's threads.

Threads are named ``synth:{tenant}:{user}:v<N>`` (:func:`graphs.synthesis.synthesis_thread_id`).
Ids may contain ``:``, so a prefix match alone could catch another user's threads
(user ``bob`` vs ``bob:x``); candidates are matched exactly against the pattern before
LangGraph's own ``AsyncPostgresSaver.adelete_thread`` deletes them.
"""

from __future__ import annotations

import re
from typing import Any

from graphs.synthesis import synthesis_thread_id

__all__ = ["erase_user_threads", "user_threads"]


def _pattern(tenant_id: str, user_id: str) -> re.Pattern[str]:
    prefix = synthesis_thread_id(tenant_id, user_id, "")
    return re.compile(re.escape(prefix) + r"v[0-9]+")


async def user_threads(conn: Any, tenant_id: str, user_id: str) -> list[str]:
    """Every checkpoint thread of this user (any table of the Postgres checkpointer)."""
    from psycopg.rows import tuple_row

    like = synthesis_thread_id(tenant_id, user_id, "").replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    async with conn.cursor(row_factory=tuple_row) as cur:
        await cur.execute("SELECT to_regclass('checkpoints') IS NOT NULL")
        row = await cur.fetchone()
        if not (row and row[0]):
            return []
        await cur.execute(
            "SELECT thread_id FROM checkpoints WHERE thread_id LIKE %(p)s UNION "
            "SELECT thread_id FROM checkpoint_writes WHERE thread_id LIKE %(p)s UNION "
            "SELECT thread_id FROM checkpoint_blobs WHERE thread_id LIKE %(p)s",
            {"p": like + "%"},
        )
        found = [t for (t,) in await cur.fetchall()]
    pat = _pattern(tenant_id, user_id)
    return sorted(t for t in found if pat.fullmatch(t))


async def erase_user_threads(conn: Any, tenant_id: str, user_id: str) -> int:
    """Delete every checkpoint thread of this user; returns how many threads."""
    from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver

    threads = await user_threads(conn, tenant_id, user_id)
    saver = AsyncPostgresSaver(conn)
    for t in threads:
        await saver.adelete_thread(t)
    return len(threads)
