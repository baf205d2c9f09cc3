"""A store closes the chromadb client it made, and only that one.

chromadb 1.5.9 keeps one System per persistent directory in a class-level registry shared by the
clients of a process, counted: ``Client.close()`` stops it (SQLite connections, the Rust segment
manager and its in-memory indexes) when the last client of that directory closes. Before, neither
``ChromaStore.close()`` nor ``StoreReader`` (also when ``open`` returns None) closed theirs, so a
process that opened and closed stores kept every directory's System for its lifetime.
"""

from __future__ import annotations

from pathlib import Path

import chromadb
from chromadb.api.shared_system_client import SharedSystemClient

from store.chroma import ChromaStore
from store.clients import chroma_settings
from store.ledger import LEDGER_FILE, Ledger
from store.reader import StoreReader


def _system_open(path: Path) -> bool:
    """chromadb 1.5.9's registry of Systems, keyed by a persistent client's directory."""
    return str(path) in SharedSystemClient._identifier_to_system


def test_close_releases_the_directorys_system_and_the_store_reopens(tmp_path: Path) -> None:
    db = tmp_path / "db"
    store = ChromaStore(path=db)
    store.put(("a",), "k", {"x": 1})
    assert _system_open(db)
    store.close()
    assert not _system_open(db)
    again = ChromaStore(path=db)
    try:
        item = again.get(("a",), "k")
        assert item is not None and item.value == {"x": 1}
    finally:
        again.close()


def test_two_stores_of_one_directory_closing_one_leaves_the_other_working(tmp_path: Path) -> None:
    db = tmp_path / "db"
    first, second = ChromaStore(path=db), ChromaStore(path=db)
    try:
        first.put(("a",), "k", {"x": 1})
        first.close()
        assert _system_open(db)
        item = second.get(("a",), "k")
        assert item is not None and item.value == {"x": 1}
    finally:
        first.close()
        second.close()
    assert not _system_open(db)


def test_a_client_given_to_the_store_stays_open(tmp_path: Path) -> None:
    client = chromadb.PersistentClient(path=str(tmp_path / "db"), settings=chroma_settings())
    try:
        ChromaStore(client=client).close()
        assert _system_open(tmp_path / "db")
        assert client.heartbeat() > 0
    finally:
        client.close()


def test_a_reader_that_steps_aside_closes_its_client(tmp_path: Path) -> None:
    db = tmp_path / "db"
    db.mkdir()
    Ledger(db / LEDGER_FILE).close()  # a ledger but no collections: only the full store may open it
    assert StoreReader.open(db) is None
    assert not _system_open(db)


def test_a_closed_reader_releases_its_client(tmp_path: Path) -> None:
    db = tmp_path / "db"
    store = ChromaStore(path=db)
    store.put(("a",), "k", {"x": 1})
    store.close()
    reader = StoreReader.open(db)
    assert reader is not None
    with reader:
        assert [it.key for it in reader.search(("a",))] == ["k"]
    assert not _system_open(db)
