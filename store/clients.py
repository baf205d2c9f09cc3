"""The Chroma clients a store directory is opened with — one place for the full store and the reader.

chromadb refuses a second client of one place with other settings, so every client the store
makes (:class:`~store.chroma.ChromaStore`, its served child after a restart, and the LangGraph-free
:class:`~store.reader.StoreReader`) comes from here. This module imports neither LangGraph nor
chromadb at import time (``chromadb`` alone takes 1.4–1.8 s to import on a 2-core machine).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from store.server import DirectoryLock, attach_or_lock


def chroma_settings() -> Any:
    """The one Chroma client configuration the store uses: no telemetry."""
    from chromadb.config import Settings as ChromaSettings

    return ChromaSettings(anonymized_telemetry=False)


def http_client(host: str, port: int) -> Any:
    """A client of the Chroma server at ``host:port`` (``chroma run``: ours, another process's, or the user's)."""
    import chromadb

    return chromadb.HttpClient(host=host, port=port, settings=chroma_settings())


def directory_client(path: Path) -> tuple[Any, DirectoryLock | None, bool]:
    """A client of the store directory ``path``: ``(client, lock, attached)``.

    Through the Chroma server of the synth-agent process that owns the directory (``attached``,
    no lock), or in this process with the directory's lock held (the caller releases it).
    """
    import chromadb

    running, lock = attach_or_lock(path)
    if running is not None:
        return http_client(running[0], running[1]), None, True
    try:
        return chromadb.PersistentClient(path=str(path), settings=chroma_settings()), lock, False
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def close_client(client: Any) -> None:
    """Close a chromadb client this package made (its HTTP session, or its share of a local System).

    chromadb 1.5.9 shares one System per persistent directory between the clients of a process and
    counts them: ``close()`` stops it only when the last client of that directory closes, so another
    store of this process on the same directory keeps working. An HTTP client has a System of its own.
    """
    with contextlib.suppress(Exception):  # closing must not hide what the caller is doing (or raise twice)
        client.close()
