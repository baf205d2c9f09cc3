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
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from langgraph.store.base import BaseStore, GetOp, PutOp

from store.memory_view import (  # the layout and the read half live there (no LangGraph import)
    _KINDS,
    FIT_KINDS,
    ROOT,
    PreferenceView,
    _vote_order,
    decode_label,
    encode_label,
    user_namespace,
)
from synth_agent.models import PersonaProfile, Trace, Vote


@dataclass(frozen=True)
class AddVotesResult:
    """Outcome of :meth:`PreferenceMemory.add_votes`: how many votes were new vs already stored."""

    added: int
    duplicates: int


@dataclass
class _Ticket:
    """One ``add_votes`` call waiting for the group commit."""

    by_user: dict[str, list[Vote]]
    future: asyncio.Future[dict[str, list[bool]]]


class _UserGate:
    """Per-user access: vote rounds share a user, a forget or a persona save has it alone.

    Exclusive holders queue one after another; while one holds or waits, new vote rounds leave
    that user's tickets for later (``busy``), and the holder waits for rounds already in flight.
    Entries are dropped when unused, so memory does not grow with the number of users.
    """

    def __init__(self) -> None:
        self._shared: dict[str, int] = {}
        self._exclusive: dict[str, int] = {}  # holders + waiters
        self._owner: dict[str, bool] = {}
        self._cond: asyncio.Condition | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def _cv(self) -> asyncio.Condition:
        """The condition of the running loop (a memory used from one ``asyncio.run`` after another is fine)."""
        loop = asyncio.get_running_loop()
        if self._cond is None or (self._loop is not loop and not self._shared and not self._exclusive):
            self._cond, self._loop = asyncio.Condition(), loop
        return self._cond

    def busy(self, user: str) -> bool:
        return user in self._exclusive

    @contextlib.asynccontextmanager
    async def shared(self, users: Iterable[str]) -> AsyncIterator[None]:
        users = list(users)
        for u in users:
            self._shared[u] = self._shared.get(u, 0) + 1
        try:
            yield
        finally:
            async with self._cv:
                for u in users:
                    if self._shared[u] <= 1:
                        del self._shared[u]
                    else:
                        self._shared[u] -= 1
                self._cv.notify_all()

    @contextlib.asynccontextmanager
    async def exclusive(self, user: str) -> AsyncIterator[None]:
        async with self._cv:
            self._exclusive[user] = self._exclusive.get(user, 0) + 1
            try:
                await self._cv.wait_for(lambda: not self._owner.get(user) and not self._shared.get(user))
            except BaseException:
                self._release(user, owned=False)
                raise
            self._owner[user] = True
        try:
            yield
        finally:
            async with self._cv:
                self._release(user, owned=True)

    def _release(self, user: str, *, owned: bool) -> None:
        if owned:
            del self._owner[user]
        if self._exclusive[user] <= 1:
            del self._exclusive[user]
        else:
            self._exclusive[user] -= 1
        self._cv.notify_all()

    async def idle(self, user: str) -> None:
        """Until nobody holds or waits for ``user`` exclusively."""
        async with self._cv:
            await self._cv.wait_for(lambda: user not in self._exclusive)

    def __len__(self) -> int:
        return len(self._shared) + len(self._exclusive)


def _hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode()).hexdigest()[:32]


class PreferenceMemory(PreferenceView):
    """The preference-memory API of synth-agent on top of a LangGraph ``BaseStore``.

    One instance per tenant; all data is namespaced by tenant then user, so one
    tenant can never read another's users. Votes go through a group commit with
    per-caller atomicity (see :meth:`_enqueue_votes`); a forget or a persona save has
    its user to itself. Both rely on instance state: use a single instance per tenant
    per process.

        >>> import asyncio
        >>> from langgraph.store.memory import InMemoryStore
        >>> from synth_agent.models import Vote
        >>> memory = PreferenceMemory(InMemoryStore(), tenant="acme")
        >>> vote = Vote(user_id="ana@example.com", context=[{"role": "user", "content": "Hi"}],
        ...             chosen="Hello!", rejected="Go away.")
        >>> asyncio.run(memory.add_votes([vote, vote])).added  # the same vote twice is stored once
        1
        >>> [v.chosen for v in asyncio.run(memory.list_votes("ana@example.com"))]
        ['Hello!']
        >>> asyncio.run(PreferenceMemory(memory.store, tenant="other").list_votes("ana@example.com"))
        []
    """

    store: BaseStore

    def __init__(self, store: BaseStore, tenant: str = "default", *, page_size: int = 500) -> None:
        if not isinstance(store, BaseStore):
            raise ValueError(f"store must be a LangGraph BaseStore, got {type(store).__name__}")
        super().__init__(store, tenant, page_size=page_size)
        self._gate = _UserGate()
        self._tickets: list[_Ticket] = []
        self._runner: asyncio.Task[None] | None = None
        self._in_flight: set[tuple[str, str]] = set()  # (user, vote id) of rounds not finished yet
        self._running: set[asyncio.Task[None]] = set()
        self._last_arrival = 0

    # ------------------------------------------------------------------ namespaces

    def _lock(self, user_id: str) -> contextlib.AbstractAsyncContextManager[None]:
        return self._gate.exclusive(user_id)

    def _arrival_ns(self) -> int:
        """Strictly increasing wall-clock nanoseconds, so arrival order is never ambiguous."""
        self._last_arrival = max(time.time_ns(), self._last_arrival + 1)
        return self._last_arrival

    def _register(self, user_id: str) -> PutOp:
        return PutOp(self._users_ns(), encode_label(user_id), {"user_id": user_id}, index=False)

    # ------------------------------------------------------------------ votes

    async def add_vote(self, vote: Vote) -> bool:
        """Store one vote; True if it was new, False if a vote with that id was already stored."""
        return (await self.add_votes([vote])).added == 1

    async def add_votes(self, votes: Iterable[Vote], *, validated: bool = False) -> AddVotesResult:
        """Store many votes, idempotently by ``vote.id``.

        Everything is validated before anything is written, so one bad item stores nothing: each
        vote is validated again here (a ``Vote`` can be changed after it was built, or built with
        ``model_construct``). ``validated=True`` is the caller's word that every vote was just built
        by ``Vote.model_validate`` (e.g. :func:`synth_agent.ingest.parse_vote`), or from input already
        checked as strictly (the proxy's vote route: its body model, then ``Vote``'s own vote-level
        check), and not changed since: the second pass would repeat the same checks on the same
        values (it was a tenth of the event loop's time per vote). The store checks what it stores
        either way (ids, namespaces, storable JSON).
        """
        checked: list[Vote] = []
        for i, vote in enumerate(list(votes)):
            if not isinstance(vote, Vote):
                raise ValueError(
                    f"item {i} is a {type(vote).__name__}, not a Vote: parse input with "
                    "Vote.model_validate(...) (or the JSONL loader) first; nothing was stored"
                )
            if validated:
                checked.append(vote)
                continue
            try:
                checked.append(Vote.model_validate(vote.model_dump()))
            except ValueError as exc:
                raise ValueError(
                    f"item {i} (vote {vote.id!r}) is invalid; nothing was stored: {exc}"
                ) from exc

        by_user: dict[str, list[Vote]] = {}
        for vote in checked:
            by_user.setdefault(vote.user_id, []).append(vote)
        intake = self._intake()
        if intake is not None and intake.accepts:
            flags = await self._journal_votes(intake, by_user)
        else:
            flags = await self._enqueue_votes(by_user)
        added = sum(sum(f) for f in flags.values())
        return AddVotesResult(added=added, duplicates=len(checked) - added)

    def _intake(self) -> Any:
        """The store's intake journal (:mod:`store.intake`), if it has one."""
        return getattr(self.store, "intake", None)

    def _vote_ops(self, by_user: dict[str, list[Vote]]) -> tuple[list[PutOp], list[tuple[str, int | None]]]:
        """One create-only batch for a caller's votes (plus each user's registration); per vote, its user
        and the index of its op (None: a repeat of an id earlier in the call)."""
        ops: list[PutOp] = []
        where: list[tuple[str, int | None]] = []
        for user_id, votes in by_user.items():
            seen: set[str] = set()
            for vote in votes:
                if vote.id in seen:
                    where.append((user_id, None))
                    continue
                seen.add(vote.id)
                where.append((user_id, len(ops)))
                ops.append(self._vote_put(user_id, vote))
            ops.append(self._register(user_id))
        return ops, where

    @staticmethod
    def _flags(by_user: dict[str, list[Vote]], where: list[tuple[str, int | None]], outcome: list[bool]) -> dict[str, list[bool]]:
        flags: dict[str, list[bool]] = {u: [] for u in by_user}
        for user_id, i in where:
            flags[user_id].append(i is not None and bool(outcome[i]))
        return flags

    async def _journal_votes(self, intake: Any, by_user: dict[str, list[Vote]]) -> dict[str, list[bool]]:
        """Acknowledge once durable in the store's intake journal; its drain stores the batch afterwards.

        Idempotent across journal and store (create-only by vote id); raises
        :class:`store.intake.IntakeFull` (nothing written) when the store is too far behind.
        """
        ops, where = self._vote_ops(by_user)
        (outcome,) = await intake.append([ops])
        if isinstance(outcome, BaseException):
            raise outcome
        return self._flags(by_user, where, outcome)

    async def _pending(self, ns: tuple[str, ...]) -> list[Any]:
        intake = self._intake()
        return await asyncio.to_thread(intake.pending, ns) if intake is not None else []

    async def _all_with_pending(self, ns: tuple[str, ...]) -> list[Any]:
        """Stored items plus journaled ones not stored yet (read-your-writes). The journal is read first:
        a row leaves it only after its commit, so an item is never missed in between."""
        pending = await self._pending(ns)
        items: list[Any] = await self._all(ns)
        if pending:
            have = {it.key for it in items}
            items += [p for p in pending if p.key not in have]
        return items

    async def has_vote(self, user_id: str, vote_id: str) -> bool:
        """Whether the vote is stored or journaled."""
        ns = self._user_ns(user_id, "votes")
        if any(p.key == vote_id for p in await self._pending(ns)):
            return True
        return await self.store.aget(ns, vote_id) is not None

    async def _enqueue_votes(self, by_user: dict[str, list[Vote]]) -> dict[str, list[bool]]:
        """Group commit with per-caller atomicity: callers queue tickets, rounds write them.

        A round (run by a background task, so a caller that goes away never strands the others)
        takes every queued ticket: one read batch checks which votes and users already exist,
        then each ticket's puts go to the store as its own batch, all at once. The store
        coalesces them into one commit and, should that commit fail, retries each batch alone,
        so a caller's votes are stored completely or not at all and one caller's failure is
        nobody else's. Two rounds overlap (one prepares while the other commits), so the store's
        writer is never idle between commits. A ticket waits for a later round when it touches a
        user being forgotten (or whose persona is being saved), or a vote id still in flight.
        """
        ticket = _Ticket(by_user, asyncio.get_running_loop().create_future())
        self._tickets.append(ticket)
        if self._runner is None or self._runner.done():
            self._runner = asyncio.get_running_loop().create_task(self._rounds(), name="vote-group-commit")
        return await ticket.future

    _MAX_ROUNDS = 2

    async def _rounds(self) -> None:
        running = self._running
        while self._tickets:
            live = {t for t in running if not t.done()}
            take: list[_Ticket] = []
            later: list[_Ticket] = []
            claimed: set[tuple[str, str]] = set()
            for t in self._tickets:
                ids = {(u, v.id) for u, vs in t.by_user.items() for v in vs}
                if len(live) >= self._MAX_ROUNDS or any(self._gate.busy(u) for u in t.by_user) or ids & (
                    claimed | self._in_flight
                ):
                    later.append(t)
                else:
                    take.append(t)
                    claimed |= ids
            self._tickets = later
            if take:
                self._in_flight |= claimed
                task = asyncio.get_running_loop().create_task(self._round_task(take, claimed))
                running.add(task)
                task.add_done_callback(running.discard)
                continue
            # Nothing can start now: wait for a round to finish, or for a forget/persona save to end.
            waiters: set[asyncio.Future[Any]] = set(live)
            blocked = next((u for t in later for u in t.by_user if self._gate.busy(u)), None)
            idle = asyncio.ensure_future(self._gate.idle(blocked)) if blocked is not None else None
            if idle is not None:
                waiters.add(idle)
            if waiters:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            else:
                await asyncio.sleep(0)  # let finished rounds' callbacks run; never spin without yielding
            if idle is not None and not idle.done():
                idle.cancel()

    async def _round_task(self, take: list[_Ticket], claimed: set[tuple[str, str]]) -> None:
        try:
            async with self._gate.shared({u for t in take for u in t.by_user}):
                await self._round(take)
        except Exception as exc:
            for t in take:
                if not t.future.done():
                    t.future.set_exception(exc)
        finally:
            self._in_flight -= claimed

    def _vote_put(self, user_id: str, vote: Vote) -> PutOp:
        value = {
            "vote": vote.model_dump(mode="json"),
            "text": vote.query_text,
            "vote_id": vote.id,
            "arrival_ns": self._arrival_ns(),
            "timestamp": vote.timestamp.timestamp() if vote.timestamp else None,
        }
        return PutOp(self._user_ns(user_id, "votes"), vote.id, value, index=["text"])

    async def _round(self, tickets: list[_Ticket]) -> None:
        if callable(getattr(self.store, "ainsert_each", None)):
            await self._round_create_only(tickets)
            return
        votes_of = [(t, u, v) for t in tickets for u, vs in t.by_user.items() for v in vs]
        wanted = list(dict.fromkeys((u, v.id) for _, u, v in votes_of))
        users = list(dict.fromkeys(u for _, u, _ in votes_of))
        reads: list[GetOp] = [GetOp(self._user_ns(u, "votes"), k) for u, k in wanted]
        reads += [GetOp(self._users_ns(), encode_label(u)) for u in users]
        found: list[Any] = []
        for start in range(0, len(reads), self.page_size):
            found += await self.store.abatch(reads[start : start + self.page_size])
        existing = {key for key, item in zip(wanted, found, strict=False) if item is not None}
        registered = {u for u, item in zip(users, found[len(wanted) :], strict=True) if item is not None}
        plans: list[tuple[_Ticket, dict[str, list[bool]], list[PutOp]]] = []
        for t in tickets:
            flags: dict[str, list[bool]] = {}
            ops: list[PutOp] = []
            for user_id, votes in t.by_user.items():
                seen: set[str] = set()
                flags[user_id] = []
                for vote in votes:
                    new = (user_id, vote.id) not in existing and vote.id not in seen
                    flags[user_id].append(new)
                    if not new:
                        continue
                    seen.add(vote.id)
                    ops.append(self._vote_put(user_id, vote))
                if any(flags[user_id]) and user_id not in registered:
                    ops.append(self._register(user_id))
            plans.append((t, flags, ops))
        results = await asyncio.gather(
            *(self.store.abatch(ops) for _, _, ops in plans if ops), return_exceptions=True
        )
        it = iter(results)
        for t, flags, ops in plans:
            outcome = next(it) if ops else None
            if isinstance(outcome, BaseException):
                t.future.set_exception(outcome)
            elif not t.future.done():
                t.future.set_result(flags)

    async def _round_create_only(self, tickets: list[_Ticket]) -> None:
        """A round on a store with create-only batches (``ChromaStore.ainsert_each``): no read first.

        Each ticket is one create-only batch (its votes, plus the user's registration); the store
        tells which votes were new, checked inside the commit, so a round costs one commit.
        """
        plans: list[tuple[_Ticket, list[PutOp], list[tuple[str, int | None]]]] = []
        for t in tickets:
            ops, where = self._vote_ops(t.by_user)
            plans.append((t, ops, where))
        futures = await self.store.ainsert_each([ops for _, ops, _ in plans])  # type: ignore[attr-defined]

        def answer(t: _Ticket, where: list[tuple[str, int | None]], done: asyncio.Future[list[bool]]) -> None:
            # each caller is answered as soon as its own batch is stored, not when the round ends
            if t.future.done():
                return
            if done.cancelled():
                t.future.cancel()
                return
            if done.exception() is not None:
                t.future.set_exception(done.exception())  # type: ignore[arg-type]
                return
            t.future.set_result(self._flags(t.by_user, where, done.result()))

        for (t, _, where), fut in zip(plans, futures, strict=True):
            fut.add_done_callback(lambda f, t=t, where=where: answer(t, where, f))  # type: ignore[misc]
        await asyncio.gather(*futures, return_exceptions=True)

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
        intake = self._intake()
        if intake is not None:  # journaled votes are searchable once stored: wait for this user's
            await asyncio.to_thread(intake.settle, ns)
        if query.strip():
            hits = await self.store.asearch(ns, query=query, limit=k)
            if any(h.score is not None for h in hits):  # no scores at all: the store has no index
                return [Vote.model_validate(h.value["vote"]) for h in hits]
        items = await self._all(ns)
        items.sort(key=lambda it: _vote_order(it.value), reverse=True)
        return [Vote.model_validate(it.value["vote"]) for it in items[:k]]

    # ------------------------------------------------------------------ personas

    async def save_persona(
        self, profile: PersonaProfile, *, version: int | None = None, since: int | None = None
    ) -> PersonaProfile:
        """Save ``profile`` as a new version (latest + 1); older versions are kept as history.

        ``version``: a number allocated elsewhere (the scale-out mode's Postgres counter); it must be
        above every stored version, else ValueError and nothing is written.
        ``since``: the version that was current when the caller's fit loaded its votes (0: none). If a
        later version carrying the same ``meta["fit_key"]`` has been saved meanwhile — another run fitted
        the same votes with the same settings concurrently (a background fit and a manual one) — that
        version is returned and nothing is written, so one fit's result is never stored twice.
        """
        if not isinstance(profile, PersonaProfile):
            raise ValueError(f"save_persona takes a PersonaProfile, got {type(profile).__name__}")
        profile = PersonaProfile.model_validate(profile.model_dump())
        async with self._lock(profile.user_id):
            items = await self._persona_items(profile.user_id)
            latest = int(items[-1].value["version"]) if items else 0
            if since is not None and items and latest > since:
                stored = PersonaProfile.model_validate(items[-1].value["profile"])
                if stored.same_fit(profile):
                    return stored
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

    async def update_persona_meta(self, user_id: str, version: int, patch: dict[str, Any]) -> PersonaProfile | None:
        """Merge ``patch`` into the ``meta`` of saved version ``version`` (e.g. a demotion by live A/B votes);
        the version number and everything else stay. None if that version does not exist."""
        async with self._lock(user_id):
            ns = self._user_ns(user_id, "personas")
            item = await self.store.aget(ns, f"{version:010d}")
            if item is None:
                return None
            old = PersonaProfile.model_validate(item.value["profile"])
            new = PersonaProfile.model_validate({**old.model_dump(), "meta": {**old.meta, **patch}})
            value = {"version": version, "profile": new.model_dump(mode="json")}
            await self.store.abatch([PutOp(ns, f"{version:010d}", value, index=False)])
        return new

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
        if ops:
            await self.store.abatch([*ops, self._register(user_id)])  # one batch: all or nothing

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

    async def forget_user(self, user_id: str, *, kinds: Iterable[str] | None = None) -> dict[str, int]:
        """Delete everything stored for ``user_id`` (GDPR-style); returns counts per kind.

        All deletions go to the store as one batch; with :class:`~store.chroma.ChromaStore`
        the call returns once the data is erased for good (keys destroyed, vectors scrubbed).
        ``kinds`` limits the deletion to some of ``_KINDS`` (e.g. only what a fit writes:
        personas, traces, judgments) and then keeps the user's entry in the tenant's user list.
        """
        chosen = tuple(_KINDS if kinds is None else kinds)
        unknown = set(chosen) - set(_KINDS)
        if unknown:
            raise ValueError(f"unknown kinds {sorted(unknown)}; expected some of {list(_KINDS)}")
        counts: dict[str, int] = {}
        ops: list[PutOp] = []
        async with self._lock(user_id):
            intake = self._intake()
            if intake is not None:  # journaled, not stored yet: erased first (and any batch of theirs in flight waited for)
                reg = [(self._users_ns(), encode_label(user_id))] if kinds is None else []
                purged = await asyncio.to_thread(intake.purge, [self._user_ns(user_id, k) for k in chosen], reg)
                counts = dict(zip(chosen, purged, strict=True))
            for kind in chosen:
                ns = self._user_ns(user_id, kind)
                items = await self._all(ns)
                ops += [PutOp(ns, it.key, None) for it in items]
                counts[kind] = counts.get(kind, 0) + len(items)
            if kinds is None:
                ops.append(PutOp(self._users_ns(), encode_label(user_id), None))
            await self.store.abatch(ops)
        return counts

    async def list_users(self) -> list[str]:
        """Every user of this tenant with stored data, sorted."""
        items = await self._all_with_pending(self._users_ns())
        return sorted({str(it.value["user_id"]) for it in items})

    async def users_with_counts(self) -> dict[str, int]:
        """Vote count per user of this tenant."""
        users = await self.list_users()
        counts = await asyncio.gather(*(self.count_votes(u) for u in users))
        return dict(zip(users, counts, strict=True))


__all__ = ["FIT_KINDS", "ROOT", "AddVotesResult", "PreferenceMemory", "decode_label", "encode_label", "user_namespace"]
