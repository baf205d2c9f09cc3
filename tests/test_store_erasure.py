"""Forget erases the bytes: after DELETE /v1/users/{u}, no file under the home holds the user's text or id.

The scan reads every file under ``SYNTH_AGENT_HOME`` as bytes (Chroma's SQLite and HNSW files,
the ledger, the checkpoint database and its WAL), while the server still runs (WALs present),
after it stops, and after it starts again. Before the delete the same scan must find the marker
(in the synthesis checkpoints, which hold the votes in the clear), so the check cannot pass by
looking in the wrong place.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from store.chroma import ChromaStore
from store.embeddings import MiniLMEmbeddings
from store.ledger import LEDGER_FILE
from store.memory import PreferenceMemory
from synth_agent.models import Message, PersonaProfile, Trace, Vote
from synth_agent.sim.server import SimProcess

try:
    from tests.store_conformance import shared_minilm
    from tests.store_procs import ServeProcess, chroma_children_gone
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    from store_conformance import shared_minilm  # type: ignore[no-redef]
    from store_procs import ServeProcess, chroma_children_gone  # type: ignore[no-redef]

MARKER = "ZQ7MARKERX41"
USER = "erase-me-3c9f@example.com"
CLI_MARKER = "KV2CLIMARKQ8"
CLI_USER = "cli-erase-7d1e@example.com"


def scan(root: Path, needles: list[str | bytes]) -> dict[str | bytes, list[str]]:
    """``{needle: [files containing it]}`` over every file under ``root``, read as raw bytes."""
    hits: dict[str | bytes, list[str]] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        for needle in needles:
            if (needle.encode() if isinstance(needle, str) else needle) in data:
                hits.setdefault(needle, []).append(str(path.relative_to(root)))
    return hits


def ledger_keys(chroma_dir: Path) -> dict[str, bytes]:
    """Every data key in the store's ledger (read-only snapshot)."""
    con = sqlite3.connect(f"file:{chroma_dir / LEDGER_FILE}?mode=ro", uri=True)
    try:
        return {kid: bytes(key) for kid, key in con.execute("SELECT kid, key FROM keys")}
    finally:
        con.close()


@pytest.fixture(scope="module")
def sim() -> Iterator[SimProcess]:
    with SimProcess(seed=3) as ep:
        yield ep


def _vote(i: int, user: str = USER, tag: str = MARKER) -> dict[str, object]:
    return {
        "user_id": user,
        "context": [{"role": "user", "content": f"{tag} question {i}: how should I plan week {i}?"}],
        "chosen": f"{tag} a short answer with a list for week {i}",
        "rejected": f"a long rambling answer for week {i}",
    }


def test_forget_leaves_no_bytes_under_home(tmp_path: Path, sim: SimProcess) -> None:
    home = tmp_path / "home"
    srv = ServeProcess(home, sim.base_url).start()
    try:
        h = srv.headers
        seg = quote(USER, safe="")
        r = httpx.post(f"{srv.url}/v1/votes", json=[_vote(i) for i in range(8)], headers=h, timeout=120)
        assert r.status_code == 200 and r.json()["added"] == 8, r.text
        others = [_vote(i, f"other{i % 3}@example.com", "OTHERTEXT") for i in range(9)]
        assert httpx.post(f"{srv.url}/v1/votes", json=others, headers=h, timeout=120).status_code == 200
        cli_votes = [_vote(i, CLI_USER, CLI_MARKER) for i in range(6)]  # forgotten with the CLI below
        assert httpx.post(f"{srv.url}/v1/votes", json=cli_votes, headers=h, timeout=120).status_code == 200
        ab = httpx.post(f"{srv.url}/v1/ab", headers=h, timeout=120, json={
            "user": USER, "model": "sim", "messages": [{"role": "user", "content": f"{MARKER} pending pair"}]})
        assert ab.status_code == 200, ab.text  # a pending A/B pair, never redeemed
        deadline = time.monotonic() + 240
        for u in (seg, quote(CLI_USER, safe="")):
            while httpx.get(f"{srv.url}/v1/users/{u}/persona", headers=h, timeout=30).status_code != 200:
                assert time.monotonic() < deadline, "no persona was fitted for the user"
                time.sleep(0.5)
        before = scan(home, [MARKER, USER, CLI_MARKER])
        assert before.get(MARKER) and any("checkpoints" in f for f in before[MARKER]), before  # the scan sees it
        assert any("checkpoints" in f for f in before[CLI_MARKER]), before
        keys_before = ledger_keys(home / "chroma")

        d = httpx.delete(f"{srv.url}/v1/users/{seg}", headers=h, timeout=120)
        assert d.status_code == 200, d.text
        deleted = d.json()["deleted"]
        assert deleted["votes"] == 8 and deleted["personas"] >= 1 and deleted["pending_votes"] == 1
        assert scan(home, [MARKER, USER]) == {}, "user bytes left while the server runs"
        destroyed = [k for kid, k in keys_before.items() if kid not in ledger_keys(home / "chroma")]
        assert len(destroyed) >= 8 + 1 + 1  # every vote, the persona, the pending pair (and more) had a key...
        assert scan(home, destroyed) == {}  # ...and no copy of those keys is left: Chroma's copies are noise
        assert any(p.name.endswith("-wal") and p.stat().st_size >= 0 for p in home.rglob("*"))  # WAL files exist
        still = httpx.get(f"{srv.url}/v1/users/{quote('other0@example.com', safe='')}/persona", headers=h)
        assert "(3 vote(s) stored" in still.text  # other users untouched
        assert scan(home, [CLI_MARKER]), "the other fitted user was erased too"

        # `synth-agent forget` while the server runs: goes through the server's Chroma, erases checkpoints too
        cli = subprocess.run([sys.executable, "-m", "synth_agent.cli", "--home", str(home), "--tenant", srv.tenant,
                              "forget", "--user", CLI_USER, "--yes"], capture_output=True, text=True, timeout=300,
                             env={**os.environ, "HF_HUB_OFFLINE": "1", "ANONYMIZED_TELEMETRY": "False"})
        assert cli.returncode == 0, cli.stderr
        assert "votes=6" in cli.stdout, cli.stdout
        assert scan(home, [CLI_MARKER, CLI_USER]) == {}, "CLI forget left user bytes"
        assert httpx.get(f"{srv.url}/v1/users/{quote(CLI_USER, safe='')}/persona", headers=h).status_code == 404
    finally:
        srv.stop()
    assert chroma_children_gone(home)
    assert scan(home, [MARKER, USER, CLI_MARKER, CLI_USER]) == {}, "user bytes left after shutdown"
    srv = ServeProcess(home, sim.base_url).start()
    try:
        assert scan(home, [MARKER, USER, CLI_MARKER, CLI_USER]) == {}, "user bytes back after a restart"
        assert httpx.get(f"{srv.url}/v1/users/{seg}/persona", headers=srv.headers, timeout=30).status_code == 404
    finally:
        srv.stop()
    assert scan(home, [MARKER, USER]) == {}


async def test_forget_in_process_store_erases_bytes(tmp_path: Path) -> None:
    """The library store (in-process Chroma) gives the same guarantee, across reopening."""
    minilm: MiniLMEmbeddings = shared_minilm()
    path = tmp_path / "chroma"
    store = ChromaStore(path, embedding_function=minilm, index_fields=["text"])
    mem = PreferenceMemory(store, "acme")
    votes = [Vote(user_id=USER, context=[Message(role="user", content=f"{MARKER} q{i}")], chosen=f"{MARKER} a{i}",
                  rejected=f"b{i}") for i in range(30)]
    await mem.add_votes(votes)
    await mem.add_votes([Vote(user_id=f"u{i}", context=[Message(role="user", content=f"keep {i}")], chosen="x",
                              rejected="y") for i in range(40)])
    await mem.save_persona(PersonaProfile(user_id=USER, persona=f"{MARKER} likes lists"))
    await mem.put_traces(USER, [Trace(vote_id=votes[0].id, chosen_first=True, reasoning=f"{MARKER} why",
                                      predicted="A", verified=True, model="m")])
    await mem.put_cached_judgment(USER, f"{MARKER}-key", {"verdict": MARKER})
    keys_before = ledger_keys(path)
    counts = await mem.forget_user(USER)
    assert counts["votes"] == 30 and counts["personas"] == 1 and counts["traces"] == 1 and counts["judgments"] == 1
    assert scan(path, [MARKER, USER]) == {}
    destroyed = [k for kid, k in keys_before.items() if kid not in ledger_keys(path)]
    assert len(destroyed) >= 30 + 1 + 1 + 1 + 1  # votes, persona, trace, judgment, registry entry (+ namespaces)
    assert scan(path, destroyed) == {}
    store.close()
    reopened = PreferenceMemory(ChromaStore(path, embedding_function=minilm, index_fields=["text"]), "acme")
    assert await reopened.list_users() == sorted(f"u{i}" for i in range(40))
    assert await reopened.count_votes("u7") == 1
    assert scan(path, [MARKER, USER]) == {}
    await asyncio.to_thread(reopened.store.close)  # type: ignore[attr-defined]
