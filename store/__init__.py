"""Persistence for synth-agent: a Chroma-backed LangGraph ``BaseStore`` and the preference memory.

Imports are lazy so that ``import store`` stays cheap (chromadb and torch load on first use)::

    from store import ChromaStore, MiniLMEmbeddings, PreferenceMemory
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the lazy exports, typed for checkers (nothing is imported at run time)
    from store.chroma import ChromaStore
    from store.embeddings import MINILM_DIMS, MiniLMEmbeddings, chroma_embedding_function, minilm_path
    from store.memory import AddVotesResult, PreferenceMemory

_EXPORTS = {
    "ChromaStore": "store.chroma",
    "MiniLMEmbeddings": "store.embeddings",
    "chroma_embedding_function": "store.embeddings",
    "minilm_path": "store.embeddings",
    "MINILM_DIMS": "store.embeddings",
    "PreferenceMemory": "store.memory",
    "AddVotesResult": "store.memory",
}

__all__ = [
    "MINILM_DIMS", "AddVotesResult", "ChromaStore", "MiniLMEmbeddings", "PreferenceMemory",
    "chroma_embedding_function", "minilm_path",
]
assert sorted(__all__) == sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'store' has no attribute {name!r}")
