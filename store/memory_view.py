"""The read half of :class:`store.memory.PreferenceMemory`, and the per-user namespace layout.

Why a module of its own: reading a user's votes or personas needs only a store that can list a
namespace (``asearch``), not LangGraph. :class:`PreferenceView` is that read half;
``PreferenceMemory`` extends it with the writes (and reads the intake journal too), so both read
through the same code. The CLI's read commands run it over a :class:`store.reader.StoreReader`
and so never import LangGraph or LangChain (docs/cli.md#start-up-time).
"""

from __future__ import annotations

from typing import Any, Protocol

from synth_agent.models import PersonaProfile, Vote, validate_user_id

ROOT = "synth_agent"
KINDS = ("votes", "personas", "traces", "judgments", "pending_votes", "lift")
"""Everything kept per user; forget_user deletes each kind (pending_votes: A/B pairs awaiting a vote;
lift: one event per redeemed A/B token, :mod:`synth_agent.lift`)."""
_KINDS = KINDS
FIT_KINDS = ("personas", "traces", "judgments")
"""What a synthesis run writes for a user (and nothing else): erased again when a forget raced a fit."""


def encode_label(text: str) -> str:
    """Reversible namespace label for an arbitrary non-empty string (no '.', keeps the rest readable)."""
    return text.replace("%", "%25").replace(".", "%2E").replace("/", "%2F")


def decode_label(label: str) -> str:
    return label.replace("%2F", "/").replace("%2E", ".").replace("%25", "%")


def user_namespace(tenant: str, user_id: str, kind: str | None = None) -> tuple[str, ...]:
    """The layout of per-user data: ``(ROOT, tenant, "user", user[, kind])``, labels encoded."""
    base = (ROOT, encode_label(tenant), "user", encode_label(validate_user_id(user_id)))
    return (*base, kind) if kind else base


def _vote_order(value: dict[str, Any]) -> tuple[float, int]:
    arrival = int(value["arrival_ns"])
    ts = value.get("timestamp")
    return (float(ts) if ts is not None else arrival / 1e9, arrival)


class ItemReads(Protocol):
    """What the view needs of a store: LangGraph's ``BaseStore.aget``, and ``asearch`` without a query."""

    async def aget(self, namespace: tuple[str, ...], key: str) -> Any: ...

    async def asearch(self, namespace_prefix: tuple[str, ...], /, *, limit: int = 10, offset: int = 0) -> Any: ...


class PreferenceView:
    """A tenant's votes and personas, read-only, over any store that can list a namespace.

        >>> import asyncio
        >>> from langgraph.store.memory import InMemoryStore
        >>> store = InMemoryStore()
        >>> view = PreferenceView(store, tenant="acme")
        >>> store.put(view.namespace("ana@example.com", "votes"), "v1", {"arrival_ns": 1, "vote": {
        ...     "id": "v1", "user_id": "ana@example.com", "context": [{"role": "user", "content": "Hi"}],
        ...     "chosen": "Hello!", "rejected": "Go away."}})
        >>> [v.chosen for v in asyncio.run(view.list_votes("ana@example.com"))]
        ['Hello!']
    """

    def __init__(self, store: ItemReads, tenant: str = "default", *, page_size: int = 500) -> None:
        try:
            validate_user_id(tenant)
        except ValueError as exc:
            raise ValueError(f"invalid tenant id: {exc}".replace("user_id", "tenant")) from exc
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.store: Any = store
        self.page_size = page_size
        self.tenant = tenant
        self._tenant_label = encode_label(tenant)

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

    async def _all(self, namespace: tuple[str, ...], **kwargs: Any) -> list[Any]:
        """Every item under ``namespace``, paging through the store (no silent caps)."""
        out: list[Any] = []
        while True:
            page = await self.store.asearch(namespace, limit=self.page_size, offset=len(out), **kwargs)
            out += page
            if len(page) < self.page_size:
                return out

    async def _all_with_pending(self, ns: tuple[str, ...]) -> list[Any]:
        """Every item of ``ns`` (``PreferenceMemory`` adds those journaled and not stored yet)."""
        return await self._all(ns)

    # ------------------------------------------------------------------ reads

    async def list_votes(self, user_id: str) -> list[Vote]:
        """All of a user's votes in time order (timestamp if given, else arrival; ties by arrival)."""
        items = await self._all_with_pending(self._user_ns(user_id, "votes"))
        items.sort(key=lambda it: _vote_order(it.value))
        return [Vote.model_validate(it.value["vote"]) for it in items]

    async def count_votes(self, user_id: str) -> int:
        """Stored votes plus those acknowledged into the store's intake journal and not stored yet."""
        return len(await self._all_with_pending(self._user_ns(user_id, "votes")))

    async def _persona_items(self, user_id: str) -> list[Any]:
        items = await self._all(self._user_ns(user_id, "personas"))
        return sorted(items, key=lambda it: int(it.value["version"]))

    async def current_persona(self, user_id: str) -> PersonaProfile | None:
        items = await self._persona_items(user_id)
        return PersonaProfile.model_validate(items[-1].value["profile"]) if items else None

    async def persona_history(self, user_id: str) -> list[PersonaProfile]:
        """Every saved version, oldest first."""
        return [
            PersonaProfile.model_validate(it.value["profile"]) for it in await self._persona_items(user_id)
        ]

    async def holds(self, user_id: str) -> bool:
        """Whether anything is stored for ``user_id``: an item of any kind, or its entry in the user list."""
        for kind in _KINDS:
            if await self.store.asearch(self._user_ns(user_id, kind), limit=1):
                return True
        return await self.store.aget(self._users_ns(), encode_label(validate_user_id(user_id))) is not None


__all__ = ["FIT_KINDS", "KINDS", "ROOT", "PreferenceView", "decode_label", "encode_label", "user_namespace"]
