"""The read-only store view (store.reader, store.memory_view) that the CLI's read commands use without a server.

It must read exactly what ``ChromaStore`` reads, step aside (None) whenever only the full store may
open the directory, and keep LangGraph and LangChain out of the read commands' processes.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from store.chroma import ChromaStore
from store.intake import INTAKE_FILE
from store.ledger import LEDGER_FILE
from store.memory import PreferenceMemory
from store.memory_view import KINDS, PreferenceView
from store.reader import INTAKE_FILE as READER_INTAKE_FILE
from store.reader import StoreReader
from synth_agent.models import PersonaProfile, Vote

try:
    from tests.store_procs import REPO
except ImportError:  # run from inside tests/
    from store_procs import REPO  # type: ignore[no-redef]

USER = "ana.b@example.com"


def _vote(i: int, user: str = USER) -> Vote:
    return Vote(user_id=user, context=[{"role": "user", "content": f"question {i}"}], chosen=f"yes {i}",
                rejected=f"no {i}", timestamp=1_700_000_000 + (7 * i) % 5)


def _fill(path: Path) -> None:
    """A store with votes and personas of two users in two tenants, nested namespaces and a deleted item."""
    store = ChromaStore(path=path)
    try:
        for tenant in ("default", "other"):
            mem = PreferenceMemory(store, tenant=tenant)
            asyncio.run(mem.add_votes([_vote(i) for i in range(6)] + [_vote(i, "bo@example.com") for i in range(3)]))
            for n in range(2):
                asyncio.run(mem.save_persona(PersonaProfile(user_id=USER, persona=f"likes lists {tenant} {n}")))
        store.put(("a", "b"), "k1", {"x": 1})
        store.put(("a", "b", "c"), "k2", {"x": 2})
        store.put(("a", "b"), "gone", {"x": 3})
        store.delete(("a", "b"), "gone")
    finally:
        store.close()


def _same(reader_items: list[Any], store_items: list[Any]) -> None:
    def as_tuple(it: Any) -> tuple[Any, ...]:
        return (tuple(it.namespace), it.key, it.value, it.created_at, it.updated_at)

    assert [as_tuple(i) for i in reader_items] == [as_tuple(i) for i in store_items]


@pytest.mark.parametrize("exact_limit", [1000, 2])  # 2: the namespace index gives up, Chroma's filter is used
def test_the_reader_reads_what_chroma_store_reads(tmp_path: Path, exact_limit: int) -> None:
    path = tmp_path / "chroma"
    _fill(path)
    view_ns = PreferenceView(object(), "default").namespace  # type: ignore[arg-type]
    prefixes = [view_ns(USER, "votes"), view_ns(USER, "personas"), view_ns("bo@example.com", "votes"),
                view_ns("nobody@example.com", "votes"), ("a", "b"), ("a",), ("synth_agent", "default", "users")]
    pages = [(10, 0), (3, 0), (3, 2), (100, 5), (0, 0)]
    expected: dict[Any, Any] = {}
    with ChromaStore(path=path, exact_search_limit=exact_limit) as store:
        for p in prefixes:
            for limit, offset in pages:
                expected[p, limit, offset] = store.search(p, limit=limit, offset=offset)
        gets = [store.get(("a", "b"), "k1"), store.get(("a", "b"), "gone"), store.get(("a", "b", "c"), "k2")]
    reader = StoreReader.open(path, exact_search_limit=exact_limit)
    assert reader is not None
    with reader:
        for (p, limit, offset), items in expected.items():
            _same(reader.search(p, limit=limit, offset=offset), items)
        got = [reader.get(("a", "b"), "k1"), reader.get(("a", "b"), "gone"), reader.get(("a", "b", "c"), "k2")]
        assert got[1] is None and gets[1] is None
        _same([got[0], got[2]], [gets[0], gets[2]])


def test_the_view_answers_as_preference_memory(tmp_path: Path) -> None:
    path = tmp_path / "chroma"
    _fill(path)

    async def reads(mem: Any, user: str) -> tuple[Any, ...]:
        return (await mem.list_votes(user), await mem.count_votes(user), await mem.current_persona(user),
                await mem.persona_history(user))

    with ChromaStore(path=path) as store:
        want = {(t, u): asyncio.run(reads(PreferenceMemory(store, t), u))
                for t in ("default", "other") for u in (USER, "bo@example.com", "nobody@example.com")}
    with StoreReader.open(path) as reader:  # type: ignore[union-attr]
        for (tenant, user), expected in want.items():
            assert asyncio.run(reads(PreferenceView(reader, tenant), user)) == expected
        view = PreferenceView(reader, "default")
        assert asyncio.run(view.holds(USER)) and asyncio.run(view.holds("bo@example.com"))
        assert not asyncio.run(view.holds("nobody@example.com"))
    assert want["default", USER][1] == 6 and want["default", USER][2].version == 2


def test_holds_sees_a_user_known_only_to_the_user_list(tmp_path: Path) -> None:
    """A user whose data is gone but whose entry in the tenant's user list remains must still be forgotten."""
    path = tmp_path / "chroma"
    with ChromaStore(path=path) as store:
        mem = PreferenceMemory(store)
        asyncio.run(mem.add_votes([_vote(1)]))
        assert asyncio.run(mem.forget_user(USER, kinds=["votes"])) == {"votes": 1}
    with StoreReader.open(path) as reader:  # type: ignore[union-attr]
        view = PreferenceView(reader)
        assert asyncio.run(view.list_votes(USER)) == [] and asyncio.run(view.holds(USER))


def test_the_reader_steps_aside_when_only_the_full_store_may_open_the_directory(tmp_path: Path) -> None:
    assert READER_INTAKE_FILE == INTAKE_FILE
    assert StoreReader.open(tmp_path / "never-made") is None  # no store yet: the full store creates it
    path = tmp_path / "chroma"
    _fill(path)
    # votes journaled into the intake and not stored yet: the full store reads them (and drains the journal)
    intake = sqlite3.connect(path / INTAKE_FILE)
    intake.execute("CREATE TABLE rows (seq INTEGER PRIMARY KEY, body TEXT)")
    intake.execute("INSERT INTO rows (body) VALUES ('x')")
    intake.commit()
    assert StoreReader.open(path) is None
    intake.execute("DELETE FROM rows")
    intake.commit()
    intake.close()
    reader = StoreReader.open(path)  # an empty journal (as every served store has) is no reason to step aside
    assert reader is not None
    reader.close()
    (path / INTAKE_FILE).unlink()
    # a batch a crashed process left in the journal: the full store finishes or rolls it back first
    ledger = sqlite3.connect(path / LEDGER_FILE)
    ledger.execute("INSERT INTO journal (txn, owner, state, created, body) VALUES ('t', ?, 'open', 0, '{}')",
                   (f"{os.uname().nodename}:999999999:0",))  # a pid that is not running
    ledger.commit()
    assert StoreReader.open(path) is None
    ledger.execute("DELETE FROM journal")
    # a ledger older than the namespace index: the full store backfills it
    ledger.execute("DELETE FROM meta WHERE k LIKE 'members:%'")
    ledger.commit()
    ledger.close()
    assert StoreReader.open(path) is None
    with ChromaStore(path=path):  # backfills
        pass
    reader = StoreReader.open(path)
    assert reader is not None
    reader.close()


# Runs the CLI in a fresh process and reports (on stderr) which heavy packages it imported.
PROBE = (
    "import sys\n"
    "from synth_agent.cli import run\n"
    "rc = run(sys.argv[1:])\n"
    "sys.stdout.flush()\n"
    "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'langgraph', 'langchain_core', 'chromadb'})\n"
    "print('IMPORTED ' + ','.join(heavy), file=sys.stderr)\n"
    "sys.exit(rc)\n"
)


def test_read_commands_without_a_server_import_neither_langgraph_nor_langchain(tmp_path: Path) -> None:
    home = tmp_path / "home"
    _fill(home / "chroma")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SYNTH_AGENT_", "CHROMA_", "OPENAI_"))}
    env.update({"SYNTH_AGENT_HOME": str(home), "SYNTH_AGENT_VIA_SERVE": "0", "ANONYMIZED_TELEMETRY": "False"})

    def cli(*args: str) -> tuple[int, str, str]:
        r = subprocess.run([sys.executable, "-c", PROBE, *args], env=env, cwd=REPO, capture_output=True, text=True,
                           timeout=300)
        return r.returncode, r.stdout, r.stderr

    for args in (["votes", "--json"], ["votes"], ["persona"], ["persona", "--history", "--json"], ["export-prompt"],
                 ["export-prompt", "--format", "json"]):
        rc, out, err = cli(*args, "--user", USER)
        assert rc == 0 and out, (args, err)
        assert err.splitlines()[-1] == "IMPORTED chromadb", (args, err)  # the store is read, without LangGraph
    rc, out, _ = cli("votes", "--json", "--user", USER)
    assert [Vote.model_validate_json(line).chosen for line in out.splitlines()] == [
        v.chosen for v in sorted((_vote(i) for i in range(6)), key=lambda v: (v.timestamp, int(v.chosen[4:])))]
    # forgetting a user the store holds nothing of needs no store write: zero counts, no LangGraph
    rc, out, err = cli("forget", "--yes", "--user", "nobody@example.com")
    assert rc == 0 and out.strip() == "forgot 'nobody@example.com': " + ", ".join(f"{k}=0" for k in KINDS)
    assert err.splitlines()[-1] == "IMPORTED chromadb"
    # a user it holds goes through the full store, and is gone for every reader afterwards
    rc, out, err = cli("forget", "--yes", "--user", USER)
    assert rc == 0 and out.startswith(f"forgot {USER!r}: votes=6, personas=2"), err
    assert "langgraph" in err.splitlines()[-1]
    assert cli("votes", "--json", "--user", USER)[:2] == (0, "")
    assert cli("persona", "--user", USER)[0] == 1
    assert cli("--tenant", "other", "votes", "--json", "--user", USER)[1].count("\n") == 6  # other tenant kept
