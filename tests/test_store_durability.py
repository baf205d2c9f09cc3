"""An acknowledged vote survives ``kill -9`` of the server (and of its Chroma child), mid-write."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from store.chroma import ChromaStore
from store.memory import PreferenceMemory
from synth_agent.sim.server import SimProcess

try:
    from tests.store_procs import ServeProcess, chroma_children_gone
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    from store_procs import ServeProcess, chroma_children_gone  # type: ignore[no-redef]


@pytest.fixture(scope="module")
def sim() -> Iterator[SimProcess]:
    with SimProcess(seed=5) as ep:
        yield ep


def test_acknowledged_votes_survive_kill_9(tmp_path: Path, sim: SimProcess) -> None:
    home = tmp_path / "home"
    srv = ServeProcess(home, sim.base_url, synthesis="off").start()
    acked: list[tuple[str, str]] = []
    enough = asyncio.Event()

    async def writer(client: httpx.AsyncClient, w: int) -> None:
        user = f"user{w % 8}@x.io"
        for i in range(1000):
            vote = {"id": f"k-{w}-{i}", "user_id": user, "context": [{"role": "user", "content": f"q {w} {i}"}],
                    "chosen": "a", "rejected": "b"}
            try:
                r = await client.post("/v1/votes", json=vote)
            except httpx.HTTPError:
                return  # the server is gone
            if r.status_code == 200:
                acked.append((user, vote["id"]))
                if len(acked) >= 150:
                    enough.set()

    async def run() -> None:
        async with httpx.AsyncClient(base_url=srv.url, headers=srv.headers, timeout=60) as client:
            tasks = [asyncio.create_task(writer(client, w)) for w in range(24)]
            await asyncio.wait_for(enough.wait(), timeout=300)
            srv.kill()  # SIGKILL while 24 writers are mid-request
            await asyncio.gather(*tasks)

    try:
        asyncio.run(run())
    finally:
        srv.kill()
    assert len(acked) >= 150
    assert chroma_children_gone(home), "the server's Chroma child outlived it"
    store = ChromaStore(home / "chroma")  # the next owner: repairs any batch the kill interrupted
    try:
        mem = PreferenceMemory(store, "acme")
        stored = {u: [v.id for v in asyncio.run(mem.list_votes(u))] for u in {u for u, _ in acked}}
        for user, vote_id in acked:
            assert vote_id in stored[user], f"acknowledged vote {vote_id} was lost"
        assert all(len(ids) == len(set(ids)) for ids in stored.values())
    finally:
        store.close()
