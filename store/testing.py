"""Fault injection for store tests: a Chroma client whose collections fail (or stall) on cue.

Wrap any Chroma client and give it to :class:`~store.chroma.ChromaStore`; every collection
call then goes through :meth:`FaultyClient.hook`, where a :class:`Fault` can raise, stall on
an event, or kill the process (``os._exit``: a crash with no cleanup at all)::

    client = FaultyClient(chromadb.PersistentClient(path, settings=chroma_settings()))  # store.clients
    store = ChromaStore(client=client, ledger=path / "ledger.sqlite3", seal=True)
    client.faults.append(Fault("upsert", collection=".v2", times=1))   # the next items upsert fails
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class InjectedFault(ConnectionError):
    """The error a :class:`Fault` raises (a ``ConnectionError``, like a Chroma server going away)."""


@dataclass
class Fault:
    """Fail matching calls: ``method`` on collections whose name ends with ``collection``.

    ``when`` (optional) sees the call's keyword arguments and decides; ``skip`` lets that
    many matching calls through first; ``times`` is how many to fail (then the fault is
    spent). ``action``: ``"raise"``, ``"exit"`` (``os._exit(exit_code)``), or ``"block"``
    (wait until ``release`` is set, then proceed normally).
    """

    method: str
    collection: str = ""
    when: Callable[[dict[str, Any]], bool] | None = None
    skip: int = 0
    times: int = 1
    action: str = "raise"
    exit_code: int = 137
    release: threading.Event = field(default_factory=threading.Event)
    reached: threading.Event = field(default_factory=threading.Event)
    fired: int = 0

    def matches(self, collection: str, method: str, kwargs: dict[str, Any]) -> bool:
        if method != self.method or not collection.endswith(self.collection) or self.fired >= self.times:
            return False
        if self.when is not None and not self.when(kwargs):
            return False
        if self.skip > 0:
            self.skip -= 1
            return False
        return True


class FaultyCollection:
    def __init__(self, inner: Any, owner: FaultyClient) -> None:
        self._inner = inner
        self._owner = owner

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name not in ("add", "upsert", "update", "delete", "get", "query", "count", "modify"):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            self._owner.hook(self._inner.name, name, kwargs)
            return attr(*args, **kwargs)

        return call


class FaultyClient:
    """A Chroma client proxy that applies :attr:`faults` to every collection call, and counts calls."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.faults: list[Fault] = []
        self.calls: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def hook(self, collection: str, method: str, kwargs: dict[str, Any]) -> None:
        with self._lock:
            self.calls.append((collection, method))
            fault = next((f for f in self.faults if f.matches(collection, method, kwargs)), None)
            if fault is not None:
                fault.fired += 1
        if fault is None:
            return
        fault.reached.set()
        if fault.action == "exit":
            os._exit(fault.exit_code)
        if fault.action == "block":
            fault.release.wait()
            return
        raise InjectedFault(f"injected fault: {method} on {collection}")

    def _wrap(self, col: Any) -> FaultyCollection:
        return FaultyCollection(col, self)

    def get_or_create_collection(self, *args: Any, **kwargs: Any) -> FaultyCollection:
        return self._wrap(self._inner.get_or_create_collection(*args, **kwargs))

    def get_collection(self, *args: Any, **kwargs: Any) -> FaultyCollection:
        return self._wrap(self._inner.get_collection(*args, **kwargs))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


__all__ = ["Fault", "FaultyClient", "FaultyCollection", "InjectedFault"]
