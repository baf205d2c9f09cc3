"""The intake journal (store/intake.py): votes acknowledged once durable, stored by a background drain.

Each case holds the drain back (so the votes are really only in the journal when the guarantee
is checked), then lets it run: durability across ``kill -9`` of a real process, idempotency
across journal and store, read-your-writes, forget erasing journaled bytes, backpressure, and a
Chroma failure that leaves the batch journaled until it is stored.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from store.chroma import ChromaStore
from store.intake import INTAKE_FILE, IntakeFull
from store.memory import PreferenceMemory
from synth_agent.models import Message, Vote

try:
    from tests.store_conformance import shared_minilm
    from tests.test_store_erasure import ledger_keys, scan
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    from store_conformance import shared_minilm  # type: ignore[no-redef]
    from test_store_erasure import ledger_keys, scan  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[1]
MARKER = "JRNLMARK5T2Q"
USER = "journal-only-8e2a@example.com"


def vote(i: int, user: str = "ana@x.io", text: str = "question") -> Vote:
    return Vote(id=f"v{i}", user_id=user, context=[Message(role="user", content=f"{text} {i}")], chosen=f"a{i}",
                rejected=f"b{i}")


def hold(store: ChromaStore) -> None:
    """Stop the drain from handing journaled batches to the store (the journal keeps them)."""
    assert store.intake is not None
    store.intake._fill = lambda: False  # type: ignore[method-assign]


def release(store: ChromaStore) -> None:
    assert store.intake is not None
    del store.intake._fill  # back to the class's method
    with store.intake._cv:
        store.intake._cv.notify_all()


def stored_ids(store: ChromaStore, tenant: str, user: str) -> list[str]:
    """Vote ids in Chroma itself (not the journal)."""
    mem = PreferenceMemory(store, tenant)
    return [it.key for it in asyncio.run(mem._all(mem._user_ns(user, "votes")))]


def open_store(path: Path, **kw: Any) -> ChromaStore:
    return ChromaStore(path, embedding_function=shared_minilm(), index_fields=["text"], intake=kw.pop("intake", True), **kw)


KILLED = textwrap.dedent(
    """
    import asyncio, sys, time
    from store.chroma import ChromaStore
    from store.memory import PreferenceMemory
    from synth_agent.models import Message, Vote
    store = ChromaStore(sys.argv[1], intake=True)  # no embedding function needed to journal
    store.intake._fill = lambda: False  # nothing reaches Chroma: the votes live only in the journal
    mem = PreferenceMemory(store, "acme")
    async def main():
        votes = [Vote(id=f"k{i}", user_id=f"u{i % 3}@x.io", context=[Message(role="user", content=f"q {i}")],
                      chosen="a", rejected="b") for i in range(40)]
        res = await asyncio.gather(*(mem.add_votes([v]) for v in votes))
        print("ACKED", sum(r.added for r in res), flush=True)
    asyncio.run(main())
    time.sleep(600)
    """
)


def test_acknowledged_journaled_votes_survive_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "chroma"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ANONYMIZED_TELEMETRY": "False"}
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(path)], stdout=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "ACKED 40", line
        os.killpg(proc.pid, signal.SIGKILL)  # kill -9 right after the acknowledgements
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    store = open_store(path, intake=False)  # the next owner opens the journal it finds and replays it
    try:
        assert store.intake is not None and not store.intake.accepts
        assert stored_ids(store, "acme", "u0@x.io") == []  # nothing had reached Chroma before the kill
        mem = PreferenceMemory(store, "acme")
        assert asyncio.run(mem.count_votes("u0@x.io")) == 14  # read-your-writes from the journal
        assert store.intake.wait_drained(120)
        for u in range(3):
            ids = sorted(stored_ids(store, "acme", f"u{u}@x.io"))
            assert ids == sorted(f"k{i}" for i in range(40) if i % 3 == u)
        assert asyncio.run(mem.add_votes([Vote(id="k0", user_id="u0@x.io", context=[Message(role="user", content="q 0")],
                                               chosen="a", rejected="b")])).added == 0
    finally:
        store.close()


def test_idempotent_across_journal_and_store_and_read_your_writes(tmp_path: Path) -> None:
    store = open_store(tmp_path / "chroma")
    mem = PreferenceMemory(store, "acme")
    try:
        hold(store)

        async def journaled() -> None:
            res = await asyncio.gather(*(mem.add_votes([vote(i), vote(i)]) for i in range(10)))
            assert [(r.added, r.duplicates) for r in res] == [(1, 1)] * 10
            again = await asyncio.gather(*(mem.add_votes([vote(i)]) for i in range(10)))
            assert sum(r.added for r in again) == 0  # already journaled
            assert await mem.count_votes("ana@x.io") == 10
            assert [v.id for v in await mem.list_votes("ana@x.io")] == [f"v{i}" for i in range(10)]
            assert await mem.list_users() == ["ana@x.io"]
            assert await mem.has_vote("ana@x.io", "v3")

        asyncio.run(journaled())
        assert stored_ids(store, "acme", "ana@x.io") == []
        release(store)

        async def searched() -> None:  # relevant_votes waits for the user's journaled votes to be stored
            hits = await mem.relevant_votes("ana@x.io", "question 7", k=1)
            assert [v.id for v in hits] == ["v7"]

        asyncio.run(searched())
        assert store.intake is not None and store.intake.wait_drained(60)
        assert sorted(stored_ids(store, "acme", "ana@x.io")) == sorted(f"v{i}" for i in range(10))
        res = asyncio.run(mem.add_votes([vote(i) for i in range(12)]))  # stored ones are duplicates too
        assert (res.added, res.duplicates) == (2, 10)
        assert store.intake.wait_drained(60)
        assert asyncio.run(mem.count_votes("ana@x.io")) == 12
        assert len(stored_ids(store, "acme", "ana@x.io")) == 12
    finally:
        store.close()


def test_forget_erases_a_vote_still_in_the_journal(tmp_path: Path) -> None:
    path = tmp_path / "chroma"
    store = open_store(path)
    mem = PreferenceMemory(store, "acme")
    try:
        asyncio.run(mem.add_votes([vote(i, user=f"keep{i}@x.io") for i in range(5)]))
        assert store.intake is not None and store.intake.wait_drained(60)
        hold(store)
        asyncio.run(mem.add_votes([vote(i, user=USER, text=MARKER) for i in range(6)]))
        asyncio.run(mem.add_votes([vote(9, user="late@x.io")]))
        # control: the journal holds the votes, sealed (neither the marker nor the user id in the clear)
        assert scan(path, [MARKER, USER]) == {}
        assert asyncio.run(mem.count_votes(USER)) == 6 and stored_ids(store, "acme", USER) == []
        counts = asyncio.run(mem.forget_user(USER))
        assert counts["votes"] == 6
        assert asyncio.run(mem.count_votes(USER)) == 0 and USER not in asyncio.run(mem.list_users())
        assert scan(path, [MARKER, USER]) == {}
        assert (path / INTAKE_FILE).exists() and not (path / f"{INTAKE_FILE}-wal").stat().st_size
        release(store)
        assert store.intake.wait_drained(60)
        assert stored_ids(store, "acme", USER) == []  # nothing of it was stored afterwards either
        assert stored_ids(store, "acme", "late@x.io") == ["v9"]  # another user's journaled vote was
    finally:
        store.close()


def test_forget_without_seal_keys_leaves_no_plaintext_in_the_journal(tmp_path: Path) -> None:
    """Before the forget, the scan does find the journal's rows when given their sealed form's key id."""
    path = tmp_path / "chroma"
    store = open_store(path)
    try:
        hold(store)
        mem = PreferenceMemory(store, "acme")
        asyncio.run(mem.add_votes([vote(1, user=USER, text=MARKER)]))
        assert store.intake is not None
        assert store.intake.count(mem._user_ns(USER, "votes")) == 1
        assert scan(path, [store._iid(mem._user_ns(USER, "votes"), "v1")])  # the row is there (keyed id)
        asyncio.run(mem.forget_user(USER))
        assert scan(path, [store._iid(mem._user_ns(USER, "votes"), "v1")]) == {}
    finally:
        store.close()


def test_backlog_limit_refuses_with_nothing_written(tmp_path: Path) -> None:
    store = open_store(tmp_path / "chroma", intake=5)
    mem = PreferenceMemory(store, "acme")
    try:
        hold(store)
        assert asyncio.run(mem.add_votes([vote(0), vote(1)])).added == 2  # 2 votes + the user's registration
        with pytest.raises(IntakeFull) as err:
            asyncio.run(mem.add_votes([vote(2), vote(3)]))
        assert err.value.retry_after >= 1 and "nothing was stored" in str(err.value)
        assert asyncio.run(mem.count_votes("ana@x.io")) == 2
        release(store)
        assert store.intake is not None and store.intake.wait_drained(60)
        assert asyncio.run(mem.add_votes([vote(2), vote(3)])).added == 2  # room again once drained
        assert store.intake.wait_drained(60)
        assert asyncio.run(mem.add_votes([vote(i) for i in range(10, 19)])).added == 9  # > limit: taken when empty
    finally:
        store.close()


def test_a_failed_store_commit_keeps_the_batch_journaled_until_stored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = open_store(tmp_path / "chroma")
    mem = PreferenceMemory(store, "acme")
    real = store._commit_inner
    fails = {"n": 2}

    def flaky(writes: Any) -> None:
        if fails["n"]:
            fails["n"] -= 1
            raise ConnectionError("injected: Chroma is unreachable")
        real(writes)

    monkeypatch.setattr(store, "_commit_inner", flaky)
    try:
        assert asyncio.run(mem.add_votes([vote(i) for i in range(8)])).added == 8  # acknowledged: durable
        assert store.intake is not None and store.intake.wait_drained(60)
        assert fails["n"] == 0 and store.stats.failed_commits >= 2
        assert sorted(stored_ids(store, "acme", "ana@x.io")) == sorted(f"v{i}" for i in range(8))
    finally:
        store.close()


def test_proxy_answers_503_with_retry_after_when_the_backlog_is_full(tmp_path: Path) -> None:
    import httpx

    from synth_agent.config import Settings
    from synth_agent.llm.client import EndpointConfig, LLMClient
    from synth_agent.proxy import ProxyServer, ProxySettings, create_app

    key = "sk-intake"
    h = {"Authorization": f"Bearer {key}"}
    store = open_store(tmp_path / "chroma", intake=4)
    hold(store)
    llm = LLMClient(EndpointConfig(base_url="http://127.0.0.1:9/v1", max_retries=0))
    app = create_app(Settings(base_url="http://127.0.0.1:9/v1", home=tmp_path / "home"),
                     ProxySettings(api_keys=f"acme:{key}", synthesis="off", key_rate_limit=0), store=store, llm=llm)

    def post(i: int) -> httpx.Response:
        body = {"id": f"p{i}", "user_id": "ana@x.io", "context": [{"role": "user", "content": f"q{i}"}],
                "chosen": "a", "rejected": "b"}
        return httpx.post(f"{srv.url}/v1/votes", headers=h, json=body, timeout=30)

    try:
        with ProxyServer(app, close=[llm]) as srv:
            assert post(0).json()["added"] == 1 and post(1).json()["added"] == 1  # 2 votes + registration (+1)
            full = post(2)
            assert full.status_code == 503 and int(full.headers["Retry-After"]) >= 1
            assert full.json()["error"]["code"] == "store_backlog" and "nothing was stored" in full.json()["error"]["message"]
            assert httpx.get(f"{srv.url}/healthz").json()["pending_votes"] == 3
            release(store)
            assert store.intake is not None and store.intake.wait_drained(60)
            assert httpx.get(f"{srv.url}/healthz").json()["pending_votes"] == 0
            assert post(2).json()["added"] == 1 and post(1).json()["duplicates"] == 1
    finally:
        store.close()


def test_an_invalid_batch_fails_alone_and_journals_nothing(tmp_path: Path) -> None:
    from langgraph.store.base import PutOp

    store = open_store(tmp_path / "chroma")
    try:
        hold(store)
        assert store.intake is not None
        good = [PutOp(("n", "a"), "k1", {"text": "fine"}), PutOp(("n", "a"), "k2", {"text": "also fine"})]
        bad = [PutOp(("n", "b"), "k3", {"text": "fine"}), PutOp(("n", "b"), "k4", {"text": "lone \ud800 surrogate"})]
        out = asyncio.run(store.intake.append([good, bad]))
        assert out[0] == [True, True]
        assert isinstance(out[1], ValueError) and "UTF-8" in str(out[1])
        assert [it.key for it in store.intake.pending(("n", "a"))] == ["k1", "k2"]
        assert store.intake.pending(("n", "b")) == [] and store.intake.backlog == 2
        release(store)
        assert store.intake.wait_drained(60)
        assert store.get(("n", "a"), "k2") is not None and store.get(("n", "b"), "k3") is None
    finally:
        store.close()


def test_journal_keys_are_destroyed_once_their_rows_are_stored(tmp_path: Path) -> None:
    path = tmp_path / "chroma"
    store = open_store(path)
    try:
        mem = PreferenceMemory(store, "acme")
        asyncio.run(mem.add_votes([vote(i) for i in range(5)]))
        assert [k for k in ledger_keys(path) if k.startswith("intake:")]  # a sealing key while rows exist
        assert store.intake is not None and store.intake.wait_drained(60)
    finally:
        store.close()
    assert [k for k in ledger_keys(path) if k.startswith("intake:")] == []


def test_a_caller_that_gives_up_does_not_stop_the_journal(tmp_path: Path) -> None:
    """A request cancelled while its batch is being journaled (a client timeout) loses only its answer:
    the batch is still journaled once, and the appender keeps answering later requests."""
    from langgraph.store.base import PutOp

    store = open_store(tmp_path / "chroma")
    try:
        hold(store)
        intake = store.intake
        assert intake is not None
        prepare = store._prepare_each
        started = __import__("threading").Event()

        def slow_prepare(batches: Any, *rest: Any) -> Any:
            started.set()
            __import__("time").sleep(0.3)  # the caller gives up while its batch is being prepared
            return prepare(batches, *rest)

        store._prepare_each = slow_prepare  # type: ignore[method-assign]

        async def main() -> list[list[bool] | BaseException]:
            first = asyncio.ensure_future(intake.append([[PutOp(("n", "a"), "k1", {"text": "one"})]]))
            assert await asyncio.to_thread(started.wait, 30)
            first.cancel()
            with pytest.raises(asyncio.CancelledError):
                await first
            return await asyncio.wait_for(intake.append([[PutOp(("n", "a"), "k2", {"text": "two"})]]), 30)

        assert asyncio.run(main()) == [[True]]
        assert [it.key for it in intake.pending(("n", "a"))] == ["k1", "k2"]
        assert intake.backlog == 2
        store._prepare_each = prepare  # type: ignore[method-assign]
        release(store)
        assert intake.wait_drained(60)
        assert store.get(("n", "a"), "k1") is not None
    finally:
        store.close()


def test_the_drain_waits_out_a_burst_of_acknowledgements_but_not_longer_than_defer(tmp_path: Path) -> None:
    """While appends stream in, the drain defers (the CPU goes to acknowledging); it stores the burst
    once appends pause, as soon as a reader waits for a namespace (settle), and never later than
    ``defer`` seconds after a write was journaled."""
    import threading
    import time

    from langgraph.store.base import PutOp

    store = open_store(tmp_path / "chroma")
    intake = store.intake
    assert intake is not None
    stop = threading.Event()

    def stream(prefix: str) -> threading.Thread:
        async def appends() -> None:
            i = 0
            while not stop.is_set():
                await intake.append([[PutOp(("n", prefix), f"{prefix}{i}", {"text": f"burst {i}"})]])
                i += 1
                await asyncio.sleep(0.02)

        t = threading.Thread(target=asyncio.run, args=(appends(),), daemon=True)
        t.start()
        return t

    def stored(ns: str, key: str) -> bool:
        return store.get(("n", ns), key) is not None

    try:
        intake.QUIET = 5.0  # a loaded test machine may pause the appender longer than the default 0.2 s
        intake.defer = 60.0
        t = stream("a")
        time.sleep(1.5)
        assert not stored("a", "a0") and intake.pending(("n", "a"))  # deferred while the burst goes on
        assert intake.settle(("n", "a"), timeout=60)  # a reader waiting: stored now, appends still streaming
        assert stored("a", "a0") and t.is_alive()
        stop.set()
        t.join()
        deadline = time.monotonic() + 60
        while intake.backlog and time.monotonic() < deadline:  # the burst is over: the rest is stored
            time.sleep(0.05)
        assert intake.backlog == 0

        stop.clear()
        intake.defer = 0.5
        t = stream("b")
        deadline = time.monotonic() + 60
        while not stored("b", "b0") and time.monotonic() < deadline:  # bounded: stored during the burst
            time.sleep(0.05)
        assert stored("b", "b0") and t.is_alive()
    finally:
        stop.set()
        store.close()


def test_the_drain_stores_the_writes_the_appender_prepared_without_reopening_rows(tmp_path: Path) -> None:
    """Batches journaled by this process are drained from the appender's prepared writes (no row is
    opened and validated a second time); once stored, they leave memory."""
    store = open_store(tmp_path / "chroma")
    intake = store.intake
    assert intake is not None
    mem = PreferenceMemory(store, "acme")
    opened: list[str] = []
    real_open = store.codec.open

    def counting_open(rid: str, blob: str, key: bytes | None) -> dict[str, Any]:
        if rid.startswith("intake:"):
            opened.append(rid)
        return real_open(rid, blob, key)

    try:
        hold(store)
        asyncio.run(mem.add_votes([vote(i) for i in range(12)]))
        assert sum(len(ws) for ws in intake._prepared.values()) == intake._cached == 13  # 12 votes + the user
        store.codec.open = counting_open  # type: ignore[method-assign]
        release(store)
        assert intake.wait_drained(60)
        assert sorted(stored_ids(store, "acme", "ana@x.io")) == sorted(f"v{i}" for i in range(12))
        assert opened == []
        assert not intake._prepared and intake._cached == 0
    finally:
        store.close()


def test_a_batch_partly_forgotten_stores_the_rest_read_back_from_the_journal(tmp_path: Path) -> None:
    """One add_votes call for two users is one journaled batch; forgetting one user drops the batch's
    prepared writes from memory (the forgotten values with them), and the drain reads the other
    user's rows back from the file and stores them."""
    store = open_store(tmp_path / "chroma")
    intake = store.intake
    assert intake is not None
    mem = PreferenceMemory(store, "acme")
    try:
        hold(store)
        res = asyncio.run(mem.add_votes([vote(1, user=USER, text=MARKER), vote(2, user="keep@x.io")]))
        assert res.added == 2
        assert any(MARKER in json_text(w.value) for ws in intake._prepared.values() for w in ws)
        asyncio.run(mem.forget_user(USER))
        assert not any(MARKER in json_text(w.value) or USER in json_text(w.value)
                       for ws in intake._prepared.values() for w in ws)
        release(store)
        assert intake.wait_drained(60)
        assert stored_ids(store, "acme", USER) == []
        assert stored_ids(store, "acme", "keep@x.io") == ["v2"]
        assert asyncio.run(mem.list_users()) == ["keep@x.io"]
    finally:
        store.close()


async def ten_requests_in_one_group(intake: Any, mem: PreferenceMemory, users: list[str]) -> list[Any]:
    """Ten one-vote requests, alternating between ``users``, journaled as one group: the appender takes
    nothing until all ten are queued."""
    with intake._cv:
        tasks = [asyncio.ensure_future(mem.add_votes([vote(i, user=users[i % 2])])) for i in range(10)]
        for _ in range(100):
            if len(intake._appends) == 10:
                break
            await asyncio.sleep(0)
        assert len(intake._appends) == 10
    return await asyncio.wait_for(asyncio.gather(*tasks), 60)


def json_text(value: Any) -> str:
    import json

    return json.dumps(value, ensure_ascii=False)


def test_a_put_repeated_across_a_group_is_prepared_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every single-vote request carries its user's registration put: the appender prepares (validates,
    copies, derives the item id of) each distinct put once per group, and journals the rest as before —
    each vote once, each registration once, every request acknowledged."""
    store = open_store(tmp_path / "chroma")
    try:
        hold(store)
        intake = store.intake
        assert intake is not None
        prepared: list[tuple[tuple[str, ...], str]] = []
        prepare = store._prepare

        def counting(op: Any) -> Any:
            prepared.append((tuple(op.namespace), str(op.key)))
            return prepare(op)

        monkeypatch.setattr(store, "_prepare", counting)
        mem = PreferenceMemory(store, "acme")
        users = ["u0@x.io", "u1@x.io"]

        results = asyncio.run(ten_requests_in_one_group(intake, mem, users))
        assert [(r.added, r.duplicates) for r in results] == [(1, 0)] * 10
        assert len(prepared) == 12  # 10 votes + one registration per user (not one per request)
        assert sorted(set(prepared)) == sorted(prepared)
        assert sorted(asyncio.run(mem.list_users())) == users
        assert intake.backlog == 12
        release(store)
        assert intake.wait_drained(60)
        assert sorted(asyncio.run(mem.list_users())) == users
        for u in users:
            assert sorted(stored_ids(store, "acme", u)) == sorted(f"v{i}" for i in range(10) if users[i % 2] == u)
    finally:
        store.close()


def test_only_identical_flat_string_puts_share_their_preparation() -> None:
    """Two puts share a prepared write only if preparing them gives the same result: ``1`` and ``True``
    are equal in Python, not in JSON; nested values and list namespaces are prepared one by one."""
    from langgraph.store.base import PutOp

    from store.chroma import _repeat_key

    reg = PutOp(("t", "users"), "ana", {"user_id": "ana"}, index=False)
    assert _repeat_key(reg) == _repeat_key(PutOp(("t", "users"), "ana", {"user_id": "ana"}, index=False))
    assert _repeat_key(reg) != _repeat_key(PutOp(("t", "users"), "ana", {"user_id": "ana"}))  # other index
    assert _repeat_key(reg) != _repeat_key(PutOp(("t", "users"), "ana", {"user_id": "bob"}, index=False))
    for value in ({"a": 1}, {"a": True}, {"a": 1.0}, {"a": ["x"]}, {"a": {"b": "c"}}, {1: "x"}):
        assert _repeat_key(PutOp(("t",), "k", value, index=False)) is None
    assert _repeat_key(PutOp(["t"], "k", {"a": "x"}, index=False)) is None  # type: ignore[arg-type]
    assert _repeat_key(PutOp(("t",), "k", {"a": "x"}, index=["a"])) is None


def test_a_group_is_sealed_with_one_urandom_and_inserted_with_few_statements(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The appender seals a group's rows with one read of the OS's randomness and inserts them with one
    ``INSERT`` per ``_INSERT_ROWS`` rows (each ``os.urandom`` and each ``sqlite3_step`` releases the GIL,
    and under a burst the appender then waited for the event loop to hand it back); every row is
    journaled, opens with its key, and is stored once drained."""
    from types import SimpleNamespace

    from store import sealing

    store = open_store(tmp_path / "chroma")
    try:
        hold(store)
        intake = store.intake
        assert intake is not None
        monkeypatch.setattr(intake, "_INSERT_ROWS", 5, raising=False)
        inserts: list[str] = []
        intake._conn.set_trace_callback(lambda sql: inserts.append(sql) if sql.startswith("INSERT") else None)
        reads: list[int] = []
        urandom = os.urandom

        def counting(n: int) -> bytes:
            reads.append(n)
            return urandom(n)

        monkeypatch.setattr(sealing, "os", SimpleNamespace(urandom=counting))  # the nonces' reads only
        mem = PreferenceMemory(store, "acme")
        users = ["u0@x.io", "u1@x.io"]

        results = asyncio.run(ten_requests_in_one_group(intake, mem, users))
        intake._conn.set_trace_callback(None)
        assert [(r.added, r.duplicates) for r in results] == [(1, 0)] * 10
        assert reads == [12 * 12]  # 12 rows (10 votes, 2 registrations): one 12-byte nonce each, one read
        assert len(inserts) == 3  # 12 rows, 5 per statement (executemany: one step per row)
        assert intake.backlog == 12
        for u in users:  # read back from the journal: every row opens
            assert sorted(v.id for v in asyncio.run(mem.list_votes(u))) == sorted(
                f"v{i}" for i in range(10) if users[i % 2] == u)
        release(store)
        assert intake.wait_drained(60)
        for u in users:
            assert sorted(stored_ids(store, "acme", u)) == sorted(f"v{i}" for i in range(10) if users[i % 2] == u)
    finally:
        store.close()


def test_the_appender_asks_chroma_only_about_ids_the_ledger_cannot_rule_out(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """"Already stored?" is answered by the ledger where it can: an id without a data key is not stored
    (new votes), an id whose key is the one it had when Chroma last said "stored" still is (the users'
    registration puts); Chroma is asked about the rest. The answers stay the same: new votes added,
    stored and journaled ones duplicates, every vote stored once."""
    store = open_store(tmp_path / "chroma")
    try:
        intake = store.intake
        assert intake is not None
        asked: list[str] = []
        lookup = store._stored_ids

        def counting(ids: Any) -> set[str]:
            asked.extend(ids)
            return lookup(ids)

        monkeypatch.setattr(store, "_stored_ids", counting)
        mem = PreferenceMemory(store, "acme")
        res = asyncio.run(mem.add_votes([vote(i) for i in range(5)]))
        assert (res.added, res.duplicates) == (5, 0)
        assert asked == []  # nothing had a key: the user's registration and the votes are all new
        assert intake.wait_drained(60)

        res = asyncio.run(mem.add_votes([vote(5)]))
        assert (res.added, res.duplicates) == (1, 0)
        assert len(asked) == 1  # the registration (stored, keyed): Chroma confirms it once
        res = asyncio.run(mem.add_votes([vote(6)]))
        assert (res.added, res.duplicates) == (1, 0)
        assert len(asked) == 1  # same key as when confirmed: not asked again
        res = asyncio.run(mem.add_votes([vote(2), vote(3)]))  # stored votes: keyed, asked, duplicates
        assert (res.added, res.duplicates) == (0, 2)
        assert len(asked) == 3
        assert intake.wait_drained(60)
        assert sorted(stored_ids(store, "acme", "ana@x.io")) == sorted(f"v{i}" for i in range(7))
    finally:
        store.close()


def test_a_vote_deleted_by_another_process_is_stored_again(tmp_path: Path) -> None:
    """Another process deletes a stored vote (item, then its key, in the shared ledger file): this process's
    memory of confirmed ids still holds the old key, but the appender reads the file, so the vote sent again
    is new and journaled again (not answered "already stored" and lost); and the ledger's key cache notices the
    other process's commit, so the drain seals the re-created vote under a new key the file holds: it reads back."""
    from store.ledger import LEDGER_FILE, Ledger

    path = tmp_path / "chroma"
    store = open_store(path)
    try:
        intake = store.intake
        assert intake is not None
        mem = PreferenceMemory(store, "acme")
        assert asyncio.run(mem.add_votes([vote(1)])).added == 1
        assert intake.wait_drained(60)
        assert asyncio.run(mem.add_votes([vote(1)])).duplicates == 1  # confirmed by Chroma, remembered
        iid = store._iid(mem._user_ns("ana@x.io", "votes"), "v1")
        assert iid in intake._confirmed and store.ledger is not None and store.ledger.keys([iid])
        store._items.delete(ids=[iid])  # "another process": its writer deletes the item, then the key
        other = Ledger(path / LEDGER_FILE)
        try:
            assert other.destroy([iid]) == 1
        finally:
            other.close()
        assert not store.ledger.keys([iid])  # the cache saw the other connection's commit
        hold(store)
        res = asyncio.run(mem.add_votes([vote(1)]))
        assert (res.added, res.duplicates) == (1, 0)
        assert [it.key for it in intake.pending(mem._user_ns("ana@x.io", "votes"))] == ["v1"]  # journaled
        release(store)
        assert intake.wait_drained(60)
        assert store.ledger.keys([iid]) and other_key_rows(path / LEDGER_FILE, iid) == 1  # a key the file holds
        got = store.get(mem._user_ns("ana@x.io", "votes"), "v1")
        assert got is not None and "question 1" in str(got.value)  # readable, not sealed under a destroyed key
    finally:
        store.close()


def other_key_rows(ledger_file: Path, kid: str) -> int:
    """Rows for ``kid`` in the ledger file, as another process reading it would see them."""
    import sqlite3

    conn = sqlite3.connect(ledger_file)
    try:
        return int(conn.execute("SELECT count(*) FROM keys WHERE kid = ?", (kid,)).fetchone()[0])
    finally:
        conn.close()


def test_under_a_burst_the_appender_waits_for_a_fuller_group(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Right after a group (a burst is on) the appender waits, up to ``GATHER`` seconds, for ``GATHER_MIN``
    requests and journals them as one group; after a quiet spell a lone request is taken at once."""
    store = open_store(tmp_path / "chroma")
    try:
        hold(store)
        intake = store.intake
        assert intake is not None
        groups: list[int] = []
        journal = intake._journal

        def counting(reqs: Any) -> Any:
            groups.append(len(reqs))
            return journal(reqs)

        monkeypatch.setattr(intake, "_journal", counting)
        monkeypatch.setattr(intake, "GATHER", 3600.0)
        monkeypatch.setattr(intake, "GATHER_MIN", 3)
        mem = PreferenceMemory(store, "acme")
        intake._group_end = -1e9  # quiet since forever: taken at once, though GATHER is an hour
        assert asyncio.run(asyncio.wait_for(mem.add_votes([vote(0)]), 60)).added == 1
        assert groups == [1]

        async def burst() -> list[Any]:  # the previous group just ended: one request, a pause, two more
            first = asyncio.ensure_future(mem.add_votes([vote(1)]))
            await asyncio.sleep(0.3)
            rest = [asyncio.ensure_future(mem.add_votes([vote(i)])) for i in (2, 3)]
            return await asyncio.wait_for(asyncio.gather(first, *rest), 60)

        assert [r.added for r in asyncio.run(burst())] == [1, 1, 1]
        assert groups == [1, 3]
        release(store)
        assert intake.wait_drained(60)
        assert sorted(stored_ids(store, "acme", "ana@x.io")) == [f"v{i}" for i in range(4)]
    finally:
        store.close()
