"""Preference memory: votes, versioned personas, traces and cached judgments per user.

Works on any LangGraph ``BaseStore`` (``ChromaStore``, ``InMemoryStore``, Postgres...).
Namespaces::

    ("synth_agent", <tenant>, "users")                    key=<user>  user registry
    ("synth_agent", <tenant>, "user", <user>, "votes")     key=vote.id
    ("synth_agent", <tenant>, "user", <user>, "personas")  key=%010d version
    ("synth_agent", <tenant>, "user", <user>, "traces")    key=hash(vote_id, chosen_first, model)
    ("synth_agent", <tenant>, "user", <user>, "judgments") key=hash(cache key)

Tenant and user ids are opaque strings; LangGraph forbids '.' and empty labels,
so labels are percent-encoded ('%', '.', '/') and decoded back exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from langgraph.store.base import BaseStore, GetOp, PutOp, SearchItem

from synth_agent.models import PersonaProfile, Trace, Vote, validate_user_id

ROOT = "synth_agent"
_KINDS = ("votes", "personas", "traces", "judgments", "pending_votes")
"""Everything kept per user; forget_user deletes each kind (pending_votes: A/B pairs awaiting a vote)."""


def encode_label(text: str) -> str:
    """Reversible namespace label for an arbitrary non-empty string (no '.', keeps the rest readable)."""
    return text.replace("%", "%25").replace(".", "%2E").replace("/", "%2F")


def decode_label(label: str) -> str:
    return label.replace("%2F", "/").replace("%2E", ".").replace("%25", "%")


def user_namespace(tenant: str, user_id: str, kind: str | None = None) -> tuple[str, ...]:
    """The layout of per-user data: ``(ROOT, tenant, "user", user[, kind])``, labels encoded."""
    base = (ROOT, encode_label(tenant), "user", encode_label(validate_user_id(user_id)))
    return (*base, kind) if kind else base


@dataclass(frozen=True)
class AddVotesResult:
    """Outcome of :meth:`PreferenceMemory.add_votes`: how many votes were new vs already stored."""

    added: int
    duplicates: int


def _hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode()).hexdigest()[:32]


def _vote_order(value: dict[str, Any]) -> tuple[float, int]:
    arrival = int(value["arrival_ns"])
    ts = value.get("timestamp")
    return (float(ts) if ts is not None else arrival / 1e9, arrival)


class PreferenceMemory:
    """The preference-memory API of synth-agent on top of a LangGraph ``BaseStore``.

    One instance per tenant; all data is namespaced by tenant then user, so one
    tenant can never read another's users. Writes for one user are serialised by
    an instance-level ``asyncio.Lock`` (idempotent vote ingest, distinct persona
    versions); use a single instance per tenant per process.
    """

    def __init__(self, store: BaseStore, tenant: str = "default", *, page_size: int = 500) -> None:
        if not isinstance(store, BaseStore):
            raise ValueError(f"store must be a LangGraph BaseStore, got {type(store).__name__}")
        try:
            validate_user_id(tenant)
        except ValueError as exc:
            raise ValueError(f"invalid tenant id: {exc}".replace("user_id", "tenant")) from exc
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.store = store
        self.page_size = page_size
        self.tenant = tenant
        self._tenant_label = encode_label(tenant)
        self._locks: dict[str, asyncio.Lock] = {}
        self._pending: dict[str, list[tuple[list[Vote], asyncio.Future[list[bool]]]]] = {}
        self._last_arrival = 0

    # ------------------------------------------------------------------ namespaces

    def _users_ns(self) -> tuple[str, ...]:
        return (ROOT, self._tenant_label, "users")

    def namespace(self, user_id: str, kind: str) -> tuple[str, ...]:
        """The BaseStore namespace holding one kind of this user's data (see ``_KINDS``).

        Public so that layers storing extra per-user data (e.g. pending A/B pairs) put it
        where ``forget_user`` will find it.
        """
        if kind not in _KINDS:
            raise ValueError(f"unknown kind {kind!r}; use one of {', '.join(_KINDS)}")
        return self._user_ns(user_id, kind)

    def _user_ns(self, user_id: str, kind: str | None = None) -> tuple[str, ...]:
        return user_namespace(self.tenant, user_id, kind)

    def _lock(self, user_id: str) -> asyncio.Lock:
        lock = self._locks.get(user_id)
        if lock is None:
            lock = self._locks[user_id] = asyncio.Lock()
        return lock

    def _arrival_ns(self) -> int:
        """Strictly increasing wall-clock nanoseconds, so arrival order is never ambiguous."""
        self._last_arrival = max(time.time_ns(), self._last_arrival + 1)
        return self._last_arrival

    def _register(self, user_id: str) -> PutOp:
        return PutOp(self._users_ns(), encode_label(user_id), {"user_id": user_id}, index=False)

    async def _all(self, namespace: tuple[str, ...], **kwargs: Any) -> list[SearchItem]:
        """Every item under ``namespace``, paging through the store (no silent caps)."""
        out: list[SearchItem] = []
        while True:
            page = await self.store.asearch(namespace, limit=self.page_size, offset=len(out), **kwargs)
            out += page
            if len(page) < self.page_size:
                return out

    # ------------------------------------------------------------------ votes

    async def add_vote(self, vote: Vote) -> bool:
        """Store one vote; True if it was new, False if a vote with that id was already stored."""
        return (await self.add_votes([vote])).added == 1

    async def add_votes(self, votes: Iterable[Vote]) -> AddVotesResult:
        """Store many votes, idempotently by ``vote.id``.

        Everything is validated before anything is written, so one bad item stores nothing.
        """
        checked: list[Vote] = []
        for i, vote in enumerate(list(votes)):
            if not isinstance(vote, Vote):
                raise ValueError(
                    f"item {i} is a {type(vote).__name__}, not a Vote: parse input with "
                    "Vote.model_validate(...) (or the JSONL loader) first; nothing was stored"
                )
            try:
                checked.append(Vote.model_validate(vote.model_dump()))
            except ValueError as exc:
                raise ValueError(
                    f"item {i} (vote {vote.id!r}) is invalid; nothing was stored: {exc}"
                ) from exc

        by_user: dict[str, list[Vote]] = {}
        for vote in checked:
            by_user.setdefault(vote.user_id, []).append(vote)
        flags = await self._enqueue_votes(by_user)
        added = sum(sum(f) for f in flags.values())
        return AddVotesResult(added=added, duplicates=len(checked) - added)

    async def _enqueue_votes(self, by_user: dict[str, list[Vote]]) -> dict[str, list[bool]]:
        """Group commit: callers queue their votes, whoever holds the users' locks writes the queue.

        200 concurrent ``add_vote`` calls thus become a few batched store writes
        instead of 200 serialised round trips, while the per-user locks keep the
        check-then-put (idempotency) atomic within this instance. Locks are taken
        in sorted order, so multi-user callers cannot deadlock.
        """
        loop = asyncio.get_running_loop()
        futs: dict[str, asyncio.Future[list[bool]]] = {}
        for user_id, votes in by_user.items():
            futs[user_id] = loop.create_future()
            self._pending.setdefault(user_id, []).append((votes, futs[user_id]))
        async with contextlib.AsyncExitStack() as stack:
            for user_id in sorted(by_user):
                await stack.enter_async_context(self._lock(user_id))
            batches = {u: b for u in sorted(by_user) if (b := self._pending.pop(u, []))}
            if batches:
                entries = [entry for b in batches.values() for entry in b]
                try:
                    flags = await self._write_votes(
                        {u: [v for vs, _ in b for v in vs] for u, b in batches.items()}
                    )
                except Exception as exc:  # every waiter in this batch sees the failure
                    for _, f in entries:
                        if not f.done():
                            f.set_exception(exc)
                except BaseException:  # cancelled: hand the others' votes to the next lock holder
                    mine = set(map(id, futs.values()))
                    for u, b in batches.items():
                        self._pending.setdefault(u, [])[:0] = [e for e in b if id(e[1]) not in mine]
                    raise
                else:
                    for u, b in batches.items():
                        i = 0
                        for vs, f in b:
                            f.set_result(flags[u][i : i + len(vs)])
                            i += len(vs)
        return {u: await f for u, f in futs.items()}

    async def _write_votes(self, by_user: dict[str, list[Vote]]) -> dict[str, list[bool]]:
        """Write the votes not stored yet (caller holds the users' locks); per vote: was it new."""
        wanted = [(u, k) for u, votes in by_user.items() for k in dict.fromkeys(v.id for v in votes)]
        existing: dict[str, set[str]] = {}
        for start in range(0, len(wanted), self.page_size):
            chunk = wanted[start : start + self.page_size]
            found = await self.store.abatch([GetOp(self._user_ns(u, "votes"), k) for u, k in chunk])
            for (u, k), item in zip(chunk, found, strict=True):
                if item is not None:
                    existing.setdefault(u, set()).add(k)
        ops: list[PutOp] = []
        flags: dict[str, list[bool]] = {}
        for user_id, votes in by_user.items():
            ns = self._user_ns(user_id, "votes")
            seen = set(existing.get(user_id, ()))
            flags[user_id] = []
            for vote in votes:
                flags[user_id].append(vote.id not in seen)
                if vote.id in seen:
                    continue
                seen.add(vote.id)
                value = {
                    "vote": vote.model_dump(mode="json"),
                    "text": vote.query_text,
                    "vote_id": vote.id,
                    "arrival_ns": self._arrival_ns(),
                    "timestamp": vote.timestamp.timestamp() if vote.timestamp else None,
                }
                ops.append(PutOp(ns, vote.id, value, index=["text"]))
            if any(flags[user_id]):
                ops.append(self._register(user_id))
        for start in range(0, len(ops), self.page_size):
            await self.store.abatch(ops[start : start + self.page_size])
        return flags

    async def list_votes(self, user_id: str) -> list[Vote]:
        """All of a user's votes in time order (timestamp if given, else arrival; ties by arrival)."""
        items = await self._all(self._user_ns(user_id, "votes"))
        items.sort(key=lambda it: _vote_order(it.value))
        return [Vote.model_validate(it.value["vote"]) for it in items]

    async def count_votes(self, user_id: str) -> int:
        return len(await self._all(self._user_ns(user_id, "votes")))

    async def relevant_votes(self, user_id: str, query: str, k: int = 5) -> list[Vote]:
        """The user's ``k`` past votes most similar to ``query``, best first.

        Uses the store's semantic search; a store without a vector index (no
        scores) falls back to the ``k`` most recent votes, newest first.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if not isinstance(query, str):
            raise ValueError("query must be a string")
        ns = self._user_ns(user_id, "votes")
        if query.strip():
            hits = await self.store.asearch(ns, query=query, limit=k)
            if any(h.score is not None for h in hits):  # no scores at all: the store has no index
                return [Vote.model_validate(h.value["vote"]) for h in hits]
        items = await self._all(ns)
        items.sort(key=lambda it: _vote_order(it.value), reverse=True)
        return [Vote.model_validate(it.value["vote"]) for it in items[:k]]

    # ------------------------------------------------------------------ personas

    async def _persona_items(self, user_id: str) -> list[SearchItem]:
        items = await self._all(self._user_ns(user_id, "personas"))
        return sorted(items, key=lambda it: int(it.value["version"]))

    async def save_persona(self, profile: PersonaProfile, *, version: int | None = None) -> PersonaProfile:
        """Save ``profile`` as a new version (latest + 1); older versions are kept as history.

        ``version``: a number allocated elsewhere (the scale-out mode's Postgres counter); it must be
        above every stored version, else ValueError and nothing is written.
        """
        if not isinstance(profile, PersonaProfile):
            raise ValueError(f"save_persona takes a PersonaProfile, got {type(profile).__name__}")
        profile = PersonaProfile.model_validate(profile.model_dump())
        async with self._lock(profile.user_id):
            items = await self._persona_items(profile.user_id)
            latest = int(items[-1].value["version"]) if items else 0
            if version is not None and version <= latest:
                raise ValueError(f"persona version {version} is not above the stored v{latest}")
            version = version if version is not None else latest + 1
            saved = profile.model_copy(update={"version": version})
            value = {"version": version, "profile": saved.model_dump(mode="json")}
            await self.store.abatch(
                [
                    PutOp(self._user_ns(profile.user_id, "personas"), f"{version:010d}", value, index=False),
                    self._register(profile.user_id),
                ]
            )
        return saved

    async def current_persona(self, user_id: str) -> PersonaProfile | None:
        items = await self._persona_items(user_id)
        return PersonaProfile.model_validate(items[-1].value["profile"]) if items else None

    async def persona_history(self, user_id: str) -> list[PersonaProfile]:
        """Every saved version, oldest first."""
        return [
            PersonaProfile.model_validate(it.value["profile"]) for it in await self._persona_items(user_id)
        ]

    # ------------------------------------------------------------------ traces

    async def put_traces(self, user_id: str, traces: Sequence[Trace]) -> None:
        """Upsert bootstrap traces, keyed by (vote_id, chosen_first, model)."""
        ns = self._user_ns(user_id, "traces")
        traces = list(traces)
        for i, t in enumerate(traces):
            if not isinstance(t, Trace):
                raise ValueError(f"trace {i} is a {type(t).__name__}, not a Trace; nothing was stored")
        ops = [
            PutOp(
                ns,
                _hash(t.vote_id, t.chosen_first, t.model),
                {"trace": t.model_dump(mode="json")},
                index=False,
            )
            for t in traces
        ]
        for start in range(0, len(ops), self.page_size):
            await self.store.abatch(ops[start : start + self.page_size])
        if ops:
            await self.store.abatch([self._register(user_id)])

    async def get_traces(self, user_id: str) -> list[Trace]:
        items = await self._all(self._user_ns(user_id, "traces"))
        traces = [Trace.model_validate(it.value["trace"]) for it in items]
        return sorted(traces, key=lambda t: (t.vote_id, not t.chosen_first, t.model))

    # ------------------------------------------------------------------ judgment cache

    async def get_cached_judgment(self, user_id: str, key: str) -> dict[str, Any] | None:
        item = await self.store.aget(self._user_ns(user_id, "judgments"), _hash(key))
        if item is None or item.value.get("key") != key:
            return None
        return dict(item.value["value"])

    async def put_cached_judgment(self, user_id: str, key: str, value: dict[str, Any]) -> None:
        if not isinstance(key, str) or not key:
            raise ValueError("judgment cache key must be a non-empty string")
        if not isinstance(value, dict):
            raise ValueError(f"cached judgment must be a dict, got {type(value).__name__}")
        try:
            value = json.loads(json.dumps(value))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"cached judgment must be JSON-serializable: {exc}") from exc
        await self.store.abatch(
            [
                PutOp(
                    self._user_ns(user_id, "judgments"), _hash(key), {"key": key, "value": value}, index=False
                ),
                self._register(user_id),
            ]
        )

    # ------------------------------------------------------------------ users

    async def forget_user(self, user_id: str) -> dict[str, int]:
        """Delete everything stored for ``user_id`` (GDPR-style); returns counts per kind."""
        counts: dict[str, int] = {}
        async with self._lock(user_id):
            for kind in _KINDS:
                ns = self._user_ns(user_id, kind)
                items = await self._all(ns)
                for start in range(0, len(items), self.page_size):
                    await self.store.abatch(
                        [PutOp(ns, it.key, None) for it in items[start : start + self.page_size]]
                    )
                counts[kind] = len(items)
            await self.store.adelete(self._users_ns(), encode_label(user_id))
        return counts

    async def list_users(self) -> list[str]:
        """Every user of this tenant with stored data, sorted."""
        return sorted(str(it.value["user_id"]) for it in await self._all(self._users_ns()))

    async def users_with_counts(self) -> dict[str, int]:
        """Vote count per user of this tenant."""
        users = await self.list_users()
        counts = await asyncio.gather(*(self.count_votes(u) for u in users))
        return dict(zip(users, counts, strict=True))


__all__ = ["ROOT", "AddVotesResult", "PreferenceMemory", "decode_label", "encode_label"]
