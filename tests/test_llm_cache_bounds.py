"""The in-memory LLM response cache is bounded in bytes and entries, and ``serve`` sets both from the environment."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from synth_agent.config import Settings
from synth_agent.llm.cache import MemoryCache, SqliteCache, value_bytes
from synth_agent.services import open_llm


def test_byte_bound_evicts_least_recently_used() -> None:
    one = value_bytes({"text": "x" * 1000})
    cache = MemoryCache(max_entries=1000, max_bytes=5 * (one + 200))

    async def run() -> None:
        for i in range(20):
            await cache.set(f"k{i:02d}", {"text": "x" * 1000})
            if i == 2:
                assert await cache.get("k00") is not None  # used: k01 is now the oldest
        assert cache.nbytes <= cache.max_bytes
        assert 3 <= len(cache) <= 5
        assert await cache.get("k19") is not None and await cache.get("k01") is None

    asyncio.run(run())


def test_nbytes_tracks_replacements_and_refuses_oversized_values() -> None:
    cache = MemoryCache(max_entries=10, max_bytes=10_000)

    async def run() -> None:
        await cache.set("a", {"text": "short"})
        small = cache.nbytes
        await cache.set("a", {"text": "y" * 2000})  # replaced, not added twice
        assert len(cache) == 1 and cache.nbytes > small
        await cache.set("a", {"text": "short"})
        assert cache.nbytes == small
        await cache.set("huge", {"text": "z" * 20_000})  # larger than the whole budget: not cached, nothing evicted
        assert await cache.get("huge") is None and await cache.get("a") == {"text": "short"}
        assert cache.nbytes == small

    asyncio.run(run())


def test_value_bytes_counts_nested_content() -> None:
    small, big = value_bytes({"choices": [{"text": "a"}]}), value_bytes({"choices": [{"text": "a" * 5000}]})
    assert big - small >= 4999
    assert value_bytes({"logprobs": [{"t": "a", "p": -0.1}] * 100}) < value_bytes({"logprobs": [{"t": "a", "p": -0.1}
                                                                                              for _ in range(100)]})


def test_entry_bound_still_holds() -> None:
    cache = MemoryCache(max_entries=3, max_bytes=10**9)

    async def run() -> None:
        for i in range(10):
            await cache.set(str(i), {"i": i})

    asyncio.run(run())
    assert len(cache) == 3


def test_bad_bounds_are_errors() -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        MemoryCache(max_bytes=0)
    with pytest.raises(ValueError, match="max_entries"):
        MemoryCache(max_entries=0)


def test_serve_cache_bounds_come_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("SYNTH_AGENT_JUDGE_ENDPOINTS", raising=False)
    monkeypatch.setenv("SYNTH_AGENT_LLM_CACHE_MB", "1.5")
    monkeypatch.setenv("SYNTH_AGENT_LLM_CACHE_ENTRIES", "123")
    settings = Settings(home=tmp_path)
    assert (settings.llm_cache_mb, settings.llm_cache_entries) == (1.5, 123)
    llm = open_llm(settings)
    assert isinstance(llm.cache, MemoryCache)
    assert (llm.cache.max_bytes, llm.cache.max_entries) == (int(1.5 * 2**20), 123)

    default = open_llm(Settings(home=tmp_path, llm_cache_mb=64.0, llm_cache_entries=10_000))
    assert isinstance(default.cache, MemoryCache) and default.cache.max_bytes == 64 * 2**20

    monkeypatch.setenv("SYNTH_AGENT_LLM_CACHE_MB", "0")
    assert open_llm(Settings(home=tmp_path)).cache is None  # 0 turns the memory cache off


def test_negative_cache_budget_is_rejected_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYNTH_AGENT_LLM_CACHE_MB", "-1")
    with pytest.raises(ValueError, match="llm_cache_mb"):
        Settings()


def test_judge_pool_gets_the_same_bounded_cache(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("SYNTH_AGENT_JUDGE_ENDPOINTS", "http://127.0.0.1:9/v1,http://127.0.0.1:10/v1")
    monkeypatch.setenv("SYNTH_AGENT_LLM_CACHE_ENTRIES", "7")
    pool = open_llm(Settings(home=tmp_path))
    assert isinstance(pool.cache, MemoryCache) and pool.cache.max_entries == 7


def test_malloc_trim_interval_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SYNTH_AGENT_MALLOC_TRIM_S", raising=False)
    assert Settings().malloc_trim_s == 0.0
    monkeypatch.setenv("SYNTH_AGENT_MALLOC_TRIM_S", "60")
    assert Settings().malloc_trim_s == 60.0
    monkeypatch.setenv("SYNTH_AGENT_MALLOC_TRIM_S", "-1")
    with pytest.raises(ValueError, match="malloc_trim_s"):
        Settings()


def test_clear_empties_both_caches_and_leaves_no_bytes_on_disk(tmp_path: Path) -> None:
    """``forget`` clears the answer cache; the on-disk one overwrites the rows' bytes (secure_delete, WAL truncated)."""
    marker = "zq-forgotten-marker-7731"
    mem = MemoryCache()
    disk = SqliteCache(tmp_path / "llm-cache.sqlite")

    async def run() -> None:
        for cache in (mem, disk):
            for i in range(50):
                await cache.set(f"k{i}", {"text": f"{marker} answer {i} " + "x" * 200})
            assert len(cache) == 50
            await cache.clear()
            assert len(cache) == 0 and await cache.get("k1") is None

    asyncio.run(run())
    assert mem.nbytes == 0
    blob = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    disk.close()
    blob += b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    assert marker.encode() not in blob


class _KeyValueOnly:
    """A user's cache written against the old protocol: get and set, no clear."""

    async def get(self, key: str) -> dict | None:
        return None

    async def set(self, key: str, value: dict) -> None:
        return None


def test_a_cache_that_cannot_be_cleared_is_refused_at_construction() -> None:
    """Forget must be able to empty any cache a client uses, so ``clear`` is part of ``ResponseCache``."""
    from synth_agent.llm.cache import resolve_cache
    from synth_agent.llm.client import EndpointConfig, LLMClient
    from synth_agent.llm.pool import EndpointPool

    with pytest.raises(TypeError, match="get, set and clear"):
        resolve_cache(_KeyValueOnly())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="ResponseCache"):
        LLMClient(EndpointConfig(base_url="http://127.0.0.1:9/v1", model="m"), cache=_KeyValueOnly())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="ResponseCache"):
        EndpointPool([LLMClient(EndpointConfig(base_url="http://127.0.0.1:9/v1", model="m"))], cache=_KeyValueOnly())  # type: ignore[arg-type]
    assert isinstance(resolve_cache(True), MemoryCache) and resolve_cache(False) is None
