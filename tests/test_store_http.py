"""The vote write path through the proxy: all-or-nothing batches, isolation, and 200 concurrent writers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from store.chroma import ChromaStore
from store.memory import PreferenceMemory
from synth_agent.config import Settings
from synth_agent.llm.client import EndpointConfig, LLMClient
from synth_agent.proxy import ProxyServer, ProxySettings, create_app

try:
    from tests.store_conformance import shared_minilm
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    from store_conformance import shared_minilm  # type: ignore[no-redef]

KEY = "sk-writes"
H = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[tuple[ProxyServer, ChromaStore]]:
    store = ChromaStore(tmp_path / "chroma", embedding_function=shared_minilm())
    app = create_app(
        Settings(base_url="http://127.0.0.1:9/v1", home=tmp_path),
        ProxySettings(api_keys=f"acme:{KEY}", synthesis="off", key_rate_limit=0),  # type: ignore[arg-type]
        store=store, llm=LLMClient(EndpointConfig(base_url="http://127.0.0.1:9/v1")),
    )
    with ProxyServer(app) as srv:
        yield srv, store
    store.close()


def _vote(user: str, i: int, tag: str = "q") -> dict[str, Any]:
    return {"id": f"{tag}-{user}-{i}", "user_id": user, "context": [{"role": "user", "content": f"{tag} question {i}"}],
            "chosen": f"answer {i}", "rejected": f"other {i}"}


def test_poison_vote_among_600_stores_nothing_and_fails_nobody_else(proxy: tuple[ProxyServer, ChromaStore]) -> None:
    srv, store = proxy
    batch = [_vote("ana@x.io", i, "batch") for i in range(600)]
    batch[417]["chosen"] = "broken \ud800 text"  # a lone surrogate: JSON can carry it, UTF-8 cannot
    body = json.dumps(batch)  # ASCII-escaped, so the request itself is valid JSON

    async def run() -> tuple[httpx.Response, list[httpx.Response]]:
        async with httpx.AsyncClient(base_url=srv.base_url, headers=H, timeout=120) as client:
            poison = client.post("/votes", content=body)
            valid = [client.post("/votes", json=_vote("ana@x.io", i, "valid")) for i in range(20)]
            responses = await asyncio.gather(poison, *valid)
            return responses[0], list(responses[1:])

    bad, good = asyncio.run(run())
    assert bad.status_code == 400, bad.text
    assert "lone surrogate" in bad.json()["error"]["message"]  # refused at the door, before any write
    assert [r.status_code for r in good] == [200] * 20 and all(r.json()["added"] == 1 for r in good)
    ids = {v.id for v in srv.call(PreferenceMemory(store, "acme").list_votes("ana@x.io"))}
    assert ids == {f"valid-ana@x.io-{i}" for i in range(20)}  # none of the 600, all of the 20


def test_200_concurrent_writers_lose_nothing_and_duplicate_nothing(proxy: tuple[ProxyServer, ChromaStore]) -> None:
    srv, store = proxy
    users = [f"user{u:02d}@x.io" for u in range(20)]

    async def post(client: httpx.AsyncClient, vote: dict[str, Any]) -> httpx.Response:
        # A keep-alive connection the server closes as the client reuses it is a transport error, not
        # an answer: a client resends (votes carry ids, so a resend may never store a second copy).
        for _attempt in range(3):
            try:
                return await client.post("/votes", json=vote)
            except httpx.TransportError:
                continue
        return await client.post("/votes", json=vote)

    async def writer(client: httpx.AsyncClient, w: int) -> list[int]:
        out = []
        for i in range(5):
            r = await post(client, _vote(users[w % 20], w * 5 + i, "c"))
            out.append(r.status_code)
        return out

    async def run() -> list[list[int]]:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        async with httpx.AsyncClient(base_url=srv.base_url, headers=H, timeout=300, limits=limits) as client:
            first = await asyncio.gather(*(writer(client, w) for w in range(200)))
            again = await asyncio.gather(*(writer(client, w) for w in range(0, 200, 10)))  # resend some
            return [*first, *again]

    codes = asyncio.run(run())
    assert all(c == 200 for batch in codes for c in batch)
    counts = srv.call(PreferenceMemory(store, "acme").users_with_counts())
    assert counts == {u: 50 for u in users}  # 1,000 votes, each stored exactly once
    assert store.stats.commits < 1000 and store.stats.largest_commit > 1  # coalesced by group commit
