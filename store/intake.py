"""The intake journal: create-only batches acknowledged once durable in SQLite, stored in Chroma after.

Why: storing a vote costs ~4 ms of embedding CPU, so a request that waits for the
Chroma commit waits for every embedding queued before it. The journal acknowledges a
batch once it is *durable* (fsynced here), and a background drain embeds and commits
journaled batches to Chroma through the store's normal writer (embedding stage, group
commit, create-only), then deletes them from the journal. What an acknowledgement
still guarantees:

* **Durable.** A batch is one SQLite transaction (``synchronous = FULL``, WAL): once
  ``append`` returns it survives ``kill -9``; the drain of the next process that opens
  the store (the one that owns its directory) replays it. A batch already committed to
  Chroma but not yet removed here is replayed harmlessly (create-only).
* **All or nothing.** A batch's rows are written in one transaction and drained as one
  store submission (one atomic commit).
* **Idempotent.** Create-only by item id: ``append`` says ``False`` for an id that is
  already journaled or already stored in Chroma (checked in that order, and rows leave
  the journal only after their Chroma commit, so no id is ever missed in between). "Stored
  in Chroma" is answered by the ledger's file where it can (no data key: not stored; the key
  Chroma last confirmed: stored) and by Chroma otherwise (:meth:`IntakeJournal._stored`).
* **Sealed and erasable** like the ledger: rows hold keyed tokens (item id, namespace
  token) and a blob sealed under a data key kept in the ledger (one per 2,048 rows or 5 s);
  ``secure_delete`` zeroes deleted rows; :meth:`IntakeJournal.purge` (forget) deletes a
  user's rows and truncates the WAL; a key is destroyed once none of its rows is left.
* **Readable.** :meth:`IntakeJournal.pending` returns the journaled items of a
  namespace, so :class:`~store.memory.PreferenceMemory` lists and counts them with the
  stored ones (read-your-writes); semantic search sees a vote only once drained.
* **Stored promptly, after a burst.** While requests are being acknowledged the drain waits
  (its embedding and commits would take the cores and the GIL from the acknowledgements), at most
  ``defer`` seconds (2 s) for any write, never past half the backlog limit, and not at all while a
  reader waits for its namespace (:meth:`IntakeJournal.settle`: ``relevant_votes``). Under
  sustained load it runs as before, ``defer`` behind.
* **Bounded.** ``limit`` writes may wait at most; beyond it ``append`` raises
  :class:`IntakeFull` (the proxy answers 503 with ``Retry-After``), so a sustained
  overload cannot grow the journal without bound.

Only for a store whose directory this process owns (``ChromaStore(path, intake=True)`` or
``ChromaStore.local_server(..., intake=True)``, as ``synth-agent serve`` opens it). Other
processes that open the directory while it is served read and purge the journal but do
not drain it. Not used with a shared Chroma server (the scale-out mode): there an
acknowledgement still waits for the Chroma commit.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from langgraph.store.base import Item, PutOp

from store.ledger import close_erasable, connect_erasable, truncate_wal

if TYPE_CHECKING:
    from store.chroma import ChromaStore, _Write

log = logging.getLogger("synth_agent.store")

INTAKE_FILE = "synth_agent_intake.sqlite3"
"""File name of the intake journal inside a store directory."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rows (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    batch INTEGER NOT NULL, grp TEXT NOT NULL, iid TEXT NOT NULL UNIQUE, n TEXT NOT NULL,
    created REAL NOT NULL, body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS rows_n ON rows (n);
CREATE INDEX IF NOT EXISTS rows_batch ON rows (batch);
"""


class IntakeFull(RuntimeError):
    """The journal holds ``limit`` writes not yet stored: try again after ``retry_after`` seconds."""

    def __init__(self, backlog: int, limit: int, retry_after: float) -> None:
        super().__init__(
            f"the store is {backlog} writes behind (limit {limit}); nothing was stored, retry in {retry_after:.0f} s"
        )
        self.backlog, self.limit, self.retry_after = backlog, limit, retry_after


@dataclass
class _Append:
    ops: list[list[PutOp]]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[list[list[bool] | BaseException]]  # on ``loop``, answered by the appender
    batches: list[list[_Write]] = field(default_factory=list)  # the valid batches, prepared by the appender
    outcome: list[list[_Write] | BaseException] = field(default_factory=list)


_WAVE = 256
"""Callers answered per event-loop iteration: a whole group (``IntakeJournal.GROUP``). With 32, a group of
~100 was answered over 3-4 iterations of a loop busy with new requests (10-25 ms each): its callers waited
46 ms on average between the group's commit and their answer (17 ms with the whole group at once), and the
last wave's made the write p99 (``bench/vote_write.py --trace``, docs/store.md, 2026-12-01 session 27)."""


def _settle(answers: list[tuple[_Append, Any, bool]]) -> None:
    """On the caller's event loop: answers a group (a caller that gave up is skipped), ``_WAVE`` callers per
    loop iteration (the rest in the next ones)."""
    for req, value, failed in answers[:_WAVE]:
        if not req.future.done():
            if failed:
                req.future.set_exception(value)
            else:
                req.future.set_result(value)
    if len(answers) > _WAVE:  # after the callers just woken, and a look at the sockets in between
        asyncio.get_running_loop().call_soon(_settle, answers[_WAVE:])


def _digest(key: bytes) -> bytes:
    """Tells two data keys apart without keeping either (see :meth:`IntakeJournal._stored`)."""
    return hashlib.blake2b(key, digest_size=16).digest()


@dataclass
class _Flight:
    seqs: list[int]
    grps: set[str]
    writes: list[_Write]
    future: concurrent.futures.Future[None]
    forgotten: set[int] = field(default_factory=set)  # rows purged by a forget of this process, which erases them


class IntakeJournal:
    """One store's intake journal (``<store dir>/synth_agent_intake.sqlite3``); see the module docstring.

    ``drain=False``: read and purge only (another process owns the directory and drains it).
    """

    def __init__(self, store: ChromaStore, path: str | Path, *, limit: int = 20_000, window: int = 512,
                 drain: bool = True, accept: bool = True, defer: float = 2.0) -> None:
        if store.ledger is None or not store.sealed:
            raise ValueError("the intake journal needs a sealed store with a ledger (a local store directory)")
        if limit < 1 or window < 1:
            raise ValueError("intake limit and window must be >= 1")
        self.store = store
        self.path = Path(path)
        self.limit = limit
        self.window = window
        self.defer = defer
        """At most this many seconds a journaled write waits for a burst of acknowledgements to end
        before the drain stores it (0: never wait); see :meth:`_deferral`."""
        self._urgent = 0  # readers waiting for the drain (settle, wait_drained): no deferral meanwhile
        self.accepts = accept and drain
        """Whether writes are acknowledged here (else this process only replays, reads and purges it)."""
        self._lock = threading.Lock()
        self._conn = connect_erasable(self.path)
        self._conn.executescript(_SCHEMA)
        self._next_batch = int(self._conn.execute("SELECT COALESCE(MAX(batch), 0) + 1 FROM rows").fetchone()[0])
        self.backlog = int(self._conn.execute("SELECT COUNT(*) FROM rows").fetchone()[0])
        """Writes journaled and not yet stored in Chroma (this process's view)."""
        self.appended = 0
        self.drained = 0
        self.last_error: str | None = None
        self._cv = threading.Condition()
        # The appender waits on its own condition (same lock): a request wakes it alone, not the drain
        # too (the drain is woken once rows are committed, by ``_journal``).
        self._acv = threading.Condition(self._cv._lock)  # type: ignore[attr-defined]
        self._appends: list[_Append] = []
        self._gathering = False  # the appender waits for a group to fill (see _gather): wake it only when full
        self._group_end = 0.0
        self._flights: dict[int, _Flight] = {}
        # The writes of batches journaled by this process, as the appender prepared them (the drain
        # then neither opens the rows nor validates them again), at most ``cache_limit`` writes;
        # dropped when stored or purged. Under ``_cv``.
        self._prepared: dict[int, list[_Write]] = {}
        self._cached = 0
        self.cache_limit = 4 * window
        self._confirmed: OrderedDict[str, bytes] = OrderedDict()  # item id -> key digest, see _stored
        self.lookups = 0
        """Item ids the appender asked Chroma about (the rest the ledger answered; see :meth:`_stored`)."""
        self._retry_at: dict[int, float] = {}
        self._attempts: dict[int, int] = {}
        self._key: tuple[str, bytes] | None = None
        self._key_rows = 0
        self._key_born = 0.0
        self._t0 = time.monotonic()
        self._last_append = 0.0
        self._closing = False
        self._threads: list[threading.Thread] = []
        if drain:
            self._threads = [
                threading.Thread(target=self._append_loop, name="intake-append", daemon=True),
                threading.Thread(target=self._drain_loop, name="intake-drain", daemon=True),
            ]
            for t in self._threads:
                t.start()

    # ------------------------------------------------------------------ append (the acknowledged part)

    async def append(self, batches: Sequence[Sequence[PutOp]]) -> list[list[bool] | BaseException]:
        """Journal create-only batches durably; per batch, which of its puts were new (or that batch's error).

        Raises :class:`IntakeFull` (nothing journaled) when the backlog would pass ``limit`` (a batch
        larger than ``limit`` is taken when the journal is empty, so it is never refused for good).
        """
        if not self.accepts:
            raise RuntimeError("this intake journal does not take writes here (another process drains it)")
        ops = [list(b) for b in batches]
        n = sum(len(b) for b in ops)
        loop = asyncio.get_running_loop()
        req = _Append(ops, loop, loop.create_future())
        with self._cv:
            if self._closing:
                raise RuntimeError("this store is closed")
            if self.backlog + n > self.limit and self.backlog:  # an empty journal takes any one batch
                behind = self.backlog
                raise IntakeFull(behind, self.limit, self._retry_after(behind + n - self.limit))
            self.backlog += n  # reserved now, so concurrent appends cannot overshoot the limit
            self._last_append = time.monotonic()
            self._appends.append(req)
            if not self._gathering or len(self._appends) >= self.GATHER_MIN:
                self._acv.notify()
        # A cancelled caller does not cancel the journaling (the batch may be durable already): its
        # answer is dropped, like a reply to a client that hung up.
        return await req.future

    def _retry_after(self, excess: int) -> float:
        """Seconds until ``excess`` more writes have drained, at the rate seen so far (at least 1, at most 60)."""
        elapsed = time.monotonic() - self._t0
        rate = self.drained / elapsed if self.drained and elapsed > 1 else 100.0
        return max(1.0, min(60.0, excess / max(rate, 1.0) + 1))

    GROUP = 256
    """Requests journaled per transaction at most. A group pays one journal lookup, one Chroma lookup (which
    ids are stored: an HTTP call to a local Chroma server) and one fsync whatever its size, so under a
    burst larger groups acknowledge more per second (with 32, a 2-core machine under load spent ~55 ms
    per group, half of it in the Chroma lookup, and requests queued for the appender); a group's callers
    are answered in one loop iteration (``_WAVE``, :func:`_settle`)."""

    GATHER = 0.010
    """Seconds after its previous group within which the appender waits for ``GATHER_MIN`` requests."""
    GATHER_MIN = 64

    def _gather(self) -> None:
        """Under ``_acv``, while a burst is on: wait until ``GATHER_MIN`` requests are queued, at most until
        ``GATHER`` seconds after the previous group ended.

        Why: once the appender no longer asked Chroma per group (:meth:`_stored`), a group took ~8 ms and
        the appender took whatever had come in meanwhile, ~9 requests; its fixed cost per group
        (transaction, lookups, fsync, one wake-up of the event loop) then came back every 9 votes, and
        its CPU per vote did not fall. Waiting for more keeps groups at ~30-50 under a burst:
        0.15 instead of 0.32-0.36 ms of appender CPU per vote, and the event loop's own CPU per vote
        fell too (fewer wake-ups); docs/store.md, 2026-12-02 session 30. A request that comes in
        after a quiet spell (the previous group ended ``GATHER`` ago) is taken at once, so only a
        request arriving while others are being acknowledged waits, at most ``GATHER``.
        """
        deadline = self._group_end + self.GATHER
        self._gathering = True
        try:
            while len(self._appends) < self.GATHER_MIN and not self._closing:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._acv.wait(left)
        finally:
            self._gathering = False

    def _append_loop(self) -> None:
        while True:
            with self._acv:
                while not self._appends and not self._closing:
                    self._acv.wait()
                if not self._appends:
                    return
                self._gather()
                # At most GROUP requests per transaction (answered together, see _settle)
                reqs, self._appends = self._appends[: self.GROUP], self._appends[self.GROUP :]
            answers: list[tuple[_Append, Any, bool]] = []
            try:
                self._append_group(reqs, answers)
            except Exception as exc:  # noqa: BLE001 - a bug, not bad input: fail these requests, keep serving
                self.last_error = f"{type(exc).__name__}: {exc}"[:300]
                log.exception("intake append failed")
                answered = {id(a[0]) for a in answers}
                answers += [(r, exc, True) for r in reqs if id(r) not in answered]
            finally:
                self._reply(answers)
                self._group_end = time.monotonic()

    @staticmethod
    def _reply(answers: list[tuple[_Append, Any, bool]]) -> None:
        """One wake-up of each caller's event loop per group (not one per request)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Append, Any, bool]]] = {}
        for a in answers:
            by_loop.setdefault(a[0].loop, []).append(a)
        for loop, group in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle, group)
            except RuntimeError:  # that loop is closed: nobody is waiting for these answers any more
                pass

    def _append_group(self, reqs: list[_Append], answers: list[tuple[_Append, Any, bool]]) -> None:
        """Validate and journal one group of requests; each one's answer goes to ``answers``."""
        refused = 0
        repeats: dict[tuple[Any, ...], Any] = {}  # a put repeated across the group is prepared once
        for req in reqs:  # validation off the event loop: an invalid batch fails alone, journals nothing
            req.outcome = self.store._prepare_each(req.ops, repeats)
            req.batches = [b for b in req.outcome if not isinstance(b, BaseException)]
            refused += sum(len(o) for o, b in zip(req.ops, req.outcome, strict=True) if isinstance(b, BaseException))
        self._unreserve(refused)
        try:
            results = self._journal(reqs)
        except BaseException as exc:  # noqa: BLE001 - a merged group failed: each request on its own
            self.last_error = f"{type(exc).__name__}: {exc}"[:300]
            for req in reqs:
                try:
                    answers.append(self._answer(req, self._journal([req])[0]))
                except BaseException as own:  # noqa: BLE001
                    self._unreserve(sum(len(b) for b in req.batches))
                    answers.append((req, own, True))
            return
        answers.extend(self._answer(req, flags) for req, flags in zip(reqs, results, strict=True))

    @staticmethod
    def _answer(req: _Append, flags: list[list[bool]]) -> tuple[_Append, Any, bool]:
        it = iter(flags)
        return req, [b if isinstance(b, BaseException) else next(it) for b in req.outcome], False

    def _unreserve(self, n: int) -> None:
        with self._cv:
            self.backlog -= n

    def _journal(self, reqs: list[_Append]) -> list[list[list[bool]]]:
        """One transaction (one fsync) for a group of requests: skip ids journaled or stored, insert the rest."""
        store = self.store
        if not any(r.batches for r in reqs):
            return [[] for _ in reqs]
        grp, key = self._group_key()
        now = time.time()
        out: list[list[list[bool]]] = []
        inserted = 0
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                iids = list(dict.fromkeys(w.iid for r in reqs for b in r.batches for w in b))
                journaled: set[str] = set()
                for start in range(0, len(iids), 500):
                    chunk = iids[start : start + 500]
                    journaled.update(r[0] for r in self._conn.execute(
                        f"SELECT iid FROM rows WHERE iid IN ({','.join('?' * len(chunk))})", chunk))
                # Not journaled: either new, or already drained (its row leaves only after its commit).
                stored = self._stored([i for i in iids if i not in journaled])
                taken = journaled | stored
                rows: list[tuple[int, str, str, str, float]] = []
                docs: list[tuple[str, dict[str, Any]]] = []
                fresh: dict[int, list[_Write]] = {}
                ntoks: dict[tuple[str, ...], str] = {}  # one HMAC per namespace of the group
                for r in reqs:
                    flags_r = []
                    for b in r.batches:
                        batch = self._next_batch
                        self._next_batch += 1
                        flags = []
                        for w in b:
                            new = w.iid not in taken
                            flags.append(new)
                            if new:
                                taken.add(w.iid)
                                fresh.setdefault(batch, []).append(w)
                                ix = w.index if w.index is not None else (None if w.texts else False)
                                doc = {"ns": list(w.ns), "k": w.key, "v": w.value, "ix": ix}
                                ntok = ntoks.get(w.ns) or ntoks.setdefault(w.ns, store._ntok(w.ns))
                                rows.append((batch, grp, w.iid, ntok, now))
                                docs.append((f"intake:{w.iid}", doc))
                        flags_r.append(flags)
                    out.append(flags_r)
                self._insert(rows, store.codec.seal_many(docs, key))
                self._conn.execute("COMMIT")
                inserted = len(rows)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        reserved = sum(len(b) for r in reqs for b in r.batches)
        with self._cv:
            for batch, ws in fresh.items():
                if self._cached + len(ws) > self.cache_limit:
                    break  # the drain reads the rest back from the file (as after a restart)
                self._prepared[batch] = ws
                self._cached += len(ws)
            self.backlog -= reserved - inserted
            self.appended += inserted
            self._cv.notify_all()
        self._key_rows += inserted
        return out

    CONFIRMED = 16_384
    """Item ids remembered as stored (with a digest of their data key), see :meth:`_stored`."""

    def _stored(self, iids: list[str]) -> set[str]:
        """Which of ``iids`` (none journaled) are stored in Chroma, asking Chroma only what the ledger cannot tell.

        Why: that question cost an HTTP call to the Chroma child per group, about half of the appender's
        time per group under a burst (py-spy, docs/store.md, 2026-12-02 session 30). The ledger answers
        most of it (:meth:`~store.ledger.Ledger.keys` drops its cache once another process has written the
        file, so a key another process destroyed is absent):

        * **No data key: not stored.** A sealed store makes an item's key (durably) before the item
          reaches Chroma, and destroys it only after the item left Chroma (delete: ``_erase``; a failed
          commit: ``_rollback``); a crash in between is rolled back the same way when the store opens.
          So an item in Chroma always has its key (every sealed layout has had one key per item id).
          New votes, nearly every id of a burst, end here.
        * **The same key as when Chroma last said "stored": stored.** Keys are random: an item deleted
          (key destroyed) and made again has another key, so an unchanged key means the item was not
          deleted since (or is being deleted right now: then this create-only put is answered as
          coming just before that delete, as a Chroma lookup a moment earlier would have). The key is
          read before Chroma is asked, so an item whose key was made after that look is never
          remembered with it. The users' registration puts, repeated by every vote request, end here.
        * Anything else (a key, nothing remembered, or another key): Chroma is asked, as before.

        Only ids and key digests are remembered (in memory, under ``_lock``), at most :attr:`CONFIRMED`
        and dropped on any forget (:meth:`purge`).
        """
        if not iids:
            return set()
        ledger = self.store.ledger
        if ledger is None:  # an unsealed store keeps no keys: Chroma answers everything
            return self.store._stored_ids(iids)
        keys = {i: _digest(k) for i, k in ledger.keys(iids).items()}
        known = {i for i, d in keys.items() if self._confirmed.get(i) == d}
        ask = [i for i in keys if i not in known]
        found = self.store._stored_ids(ask) if ask else set()
        self.lookups += len(ask)
        for i in found:
            self._confirmed[i] = keys[i]
            self._confirmed.move_to_end(i)
        for i in known:
            self._confirmed.move_to_end(i)
        while len(self._confirmed) > self.CONFIRMED:
            self._confirmed.popitem(last=False)
        return known | found

    _INSERT_ROWS = 128
    """Rows per ``INSERT`` statement of :meth:`_insert` (6 parameters each: well under SQLite's 999)."""

    def _insert(self, rows: Sequence[tuple[int, str, str, str, float]], bodies: Sequence[str]) -> None:
        """Insert a group's rows (inside the caller's transaction) with one statement per ``_INSERT_ROWS``.

        Why not ``executemany``: Python's sqlite3 releases the GIL around every ``sqlite3_step``, one
        per row, and under a write burst the appender then waited for the event loop to hand the GIL
        back (up to the switch interval) once per row of its group; a multi-row ``VALUES`` list is
        one step for up to ``_INSERT_ROWS`` rows. Same rows, same transaction.
        """
        values = [(*r, b) for r, b in zip(rows, bodies, strict=True)]
        for start in range(0, len(values), self._INSERT_ROWS):
            chunk = values[start : start + self._INSERT_ROWS]
            marks = ",".join(["(?, ?, ?, ?, ?, ?)"] * len(chunk))
            self._conn.execute(f"INSERT INTO rows (batch, grp, iid, n, created, body) VALUES {marks}",
                               [v for row in chunk for v in row])

    _KEY_ROWS = 2048
    _KEY_SECONDS = 5.0

    def _group_key(self) -> tuple[str, bytes]:
        """The data key that seals new rows, and its id: one key for up to ``_KEY_ROWS`` rows or
        ``_KEY_SECONDS`` (a new key costs an fsync of the ledger); destroyed once its rows are gone."""
        if self._key is None or self._key_rows >= self._KEY_ROWS or time.monotonic() - self._key_born > self._KEY_SECONDS:
            grp = uuid.uuid4().hex
            key = self.store.ledger.ensure_keys([f"intake:{grp}"])[f"intake:{grp}"]  # type: ignore[union-attr]
            old, self._key = self._key, (grp, key)
            self._key_rows, self._key_born = 0, time.monotonic()
            if old is not None:
                self._retire(old[0])
        return self._key

    def _retire(self, grp: str) -> None:
        """Destroy a key no longer used for new rows if none of its rows is left (else the drain will)."""
        with self._lock:
            left = self._conn.execute("SELECT 1 FROM rows WHERE grp = ? LIMIT 1", (grp,)).fetchone()
        if left is None:
            self.store.ledger.destroy([f"intake:{grp}"])  # type: ignore[union-attr]

    # ------------------------------------------------------------------ drain (the background part)

    def _drain_loop(self) -> None:
        while True:
            with self._cv:
                while not self._closing and not self._room():
                    self._cv.wait(timeout=0.5)
                if self._closing:
                    return
            try:
                self._settle_done()
                wait = self._deferral()
                if wait > 0:  # acknowledgements are streaming in: let them have the CPU a while longer
                    with self._cv:
                        self._cv.wait(timeout=wait)
                    continue
                if not self._fill():
                    with self._cv:
                        self._cv.wait(timeout=0.05 if self._flights else 0.5)
            except Exception as exc:  # noqa: BLE001 - keep draining; the rows stay journaled
                self.last_error = f"{type(exc).__name__}: {exc}"[:300]
                log.exception("intake drain failed; retrying")
                time.sleep(0.5)

    QUIET = 0.2
    """Seconds without a new append after which a burst of acknowledgements counts as over."""

    def _deferral(self) -> float:
        """Seconds the drain should wait before handing more journaled writes to the store (0: go now).

        While requests are being acknowledged (an append within ``QUIET`` s), the drain's embedding
        and commits compete with them for the same cores and the GIL: it waits, so a burst is
        acknowledged at the event loop's pace, and stores it right after. Bounded: never once the
        oldest write not yet handed over has waited ``defer`` seconds (so under sustained load the
        drain runs as before, ``defer`` behind), nor past half the backlog limit, nor while a reader
        waits for a namespace to be stored (:meth:`settle`, :meth:`wait_drained`, close).
        """
        if self.defer <= 0 or self._urgent or self._closing:
            return 0.0
        quiet_left = self._last_append + self.QUIET - time.monotonic()
        if quiet_left <= 0 or self.backlog > self.limit // 2:
            return 0.0
        skip = list(self._flights)
        with self._lock:
            row = self._conn.execute(
                f"SELECT created FROM rows WHERE batch NOT IN ({','.join('?' * len(skip))}) ORDER BY seq LIMIT 1",
                skip).fetchone()
        if row is None:
            return 0.0  # nothing to hand over: the regular wait
        age_left = float(row[0]) + self.defer - time.time()
        return 0.0 if age_left <= 0 else max(0.005, min(quiet_left, age_left))

    def _room(self) -> bool:
        busy = sum(len(f.writes) for f in self._flights.values())
        return busy < self.window or any(f.future.done() for f in self._flights.values())

    def _fill(self) -> bool:
        """Submit the oldest journaled batches not in flight (up to ``window`` writes in flight)."""
        busy = sum(len(f.writes) for f in self._flights.values())
        room = self.window - busy
        if room <= 0:
            return False
        now = time.monotonic()
        skip = list(set(self._flights) | {b for b, t in self._retry_at.items() if t > now})
        with self._lock:
            rows = self._conn.execute(
                f"SELECT seq, batch, grp, iid, body FROM rows WHERE batch NOT IN ({','.join('?' * len(skip))}) "
                "ORDER BY seq LIMIT ?", (*skip, room),
            ).fetchall()
        by_batch: dict[int, list[tuple[int, str, str, str]]] = {}
        for seq, batch, grp, iid, body in rows:
            by_batch.setdefault(batch, []).append((seq, grp, iid, body))
        if not by_batch:
            return False
        last = max(by_batch)
        if len(rows) >= room:
            by_batch.pop(last, None)  # maybe cut short by the LIMIT: take it whole next time
            if not by_batch:  # one batch larger than the window: take it whole anyway
                with self._lock:
                    rs = self._conn.execute("SELECT seq, grp, iid, body FROM rows WHERE batch = ? ORDER BY seq",
                                            (last,)).fetchall()
                by_batch = {last: [tuple(r) for r in rs]}  # type: ignore[misc]
        with self._cv:
            cached = {b: self._prepared.get(b) for b in by_batch}
        # Prepared by this process's appender, and every row still there (a forget may have purged some).
        ready = {b: ws for b, ws in cached.items() if ws is not None and [w.iid for w in ws] == [r[2] for r in by_batch[b]]}
        opened = {g for b, rs in by_batch.items() if b not in ready for _, g, _, _ in rs}
        keys = self.store.ledger.keys({f"intake:{g}" for g in opened}) if opened else {}  # type: ignore[union-attr]
        take: list[tuple[int, list[int], set[str], list[_Write]]] = []
        for batch, rs in by_batch.items():
            if batch in ready:
                take.append((batch, [r[0] for r in rs], {r[1] for r in rs}, ready[batch]))
                room -= len(rs)
                if room <= 0:
                    break
                continue
            try:
                ops = []
                for _seq, grp, iid, body in rs:
                    doc = self.store.codec.open(f"intake:{iid}", body, keys.get(f"intake:{grp}"))
                    ops.append(PutOp(tuple(doc["ns"]), doc["k"], doc["v"], index=doc["ix"]))
                writes = self.store._prepare_inserts(ops)
            except Exception as exc:  # noqa: BLE001 - cannot happen for rows we wrote; never drop them silently
                self.last_error = f"{type(exc).__name__}: {exc}"[:300]
                log.error("journaled batch %s cannot be prepared (%s); it stays in the journal", batch, exc)
                self._retry_at[batch] = now + 30
                continue
            take.append((batch, [r[0] for r in rs], {r[1] for r in rs}, writes))
            room -= len(writes)
            if room <= 0:
                break
        if not take:
            return False
        # Nobody waits for these unless a reader asks the drain to hurry: the writer may gather them into
        # larger commits (ChromaStore._gather_wait).
        futures = self.store._submit_many([w for *_, w in take], gather=self._may_gather)
        with self._cv:  # a forget in another thread looks through the flights
            for (batch, seqs, grps, writes), fut in zip(take, futures, strict=True):
                self._flights[batch] = _Flight(seqs, grps, writes, fut)
        for fut in futures:
            fut.add_done_callback(self._wake)
        return True

    def _may_gather(self) -> bool:
        """Whether the store's writer may hold drained batches to commit them with more (nobody waits)."""
        return not self._urgent and not self._closing

    def _wake(self, _: object) -> None:
        with self._cv:
            self._cv.notify_all()

    def _settle_done(self) -> None:
        """Remove committed batches from the journal; schedule failed ones for a retry."""
        done = {b: f for b, f in self._flights.items() if f.future.done()}
        if not done:
            return
        ok = {b: f for b, f in done.items() if f.future.exception() is None}
        now = time.monotonic()
        for b, f in done.items():
            if b not in ok:
                exc = f.future.exception()
                self.last_error = f"{type(exc).__name__}: {exc}"[:300]
                log.warning("storing a journaled batch failed (%s); retrying", self.last_error)
                self._attempts[b] = self._attempts.get(b, 0) + 1
                self._retry_at[b] = now + min(5.0, 0.1 * 2 ** min(self._attempts[b], 6))
        seqs = [s for f in ok.values() for s in f.seqs]
        grps = {g for f in ok.values() for g in f.grps}
        removed: set[int] = set()
        emptied: list[str] = []
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                for start in range(0, len(seqs), 500):
                    chunk = seqs[start : start + 500]
                    marks = ",".join("?" * len(chunk))
                    removed.update(r[0] for r in self._conn.execute(f"SELECT seq FROM rows WHERE seq IN ({marks})", chunk))
                    self._conn.execute(f"DELETE FROM rows WHERE seq IN ({marks})", chunk)
                current = self._key[0] if self._key is not None else None
                for g in grps - {current}:  # the key still sealing new rows is retired by the appender
                    if self._conn.execute("SELECT 1 FROM rows WHERE grp = ? LIMIT 1", (g,)).fetchone() is None:
                        emptied.append(g)
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            with self._cv:  # with the rows: whoever sees them gone sees the backlog without them
                self.backlog -= len(removed)
                self.drained += len(removed)
        # Rows purged while their batch was in flight (a forget from another process): erase what it stored.
        purged = [w for f in ok.values() for s, w in zip(f.seqs, f.writes, strict=True)
                  if s not in removed and s not in f.forgotten and w.inserted]
        if purged:
            from store.chroma import _Write

            self.store._submit([_Write(w.iid, w.ns, w.key, None) for w in purged]).result()
        if emptied:
            self.store.ledger.destroy([f"intake:{g}" for g in emptied])  # type: ignore[union-attr]
        with self._cv:
            for b in done:
                self._flights.pop(b, None)
            for b in ok:
                self._retry_at.pop(b, None)
                self._attempts.pop(b, None)
                self._forget_prepared(b)
            self._cv.notify_all()

    def _forget_prepared(self, batch: int) -> None:
        """Under ``_cv``: drop a batch's prepared writes."""
        ws = self._prepared.pop(batch, None)
        if ws is not None:
            self._cached -= len(ws)

    # ------------------------------------------------------------------ reads, forget, status

    def pending(self, namespace: Sequence[str]) -> list[Item]:
        """Journaled (not yet stored) items of exactly ``namespace``, oldest first."""
        store = self.store
        with self._lock:
            rows = self._conn.execute(
                "SELECT grp, iid, created, body FROM rows WHERE n = ? ORDER BY seq", (store._ntok(namespace),)
            ).fetchall()
        if not rows:
            return []
        keys = store.ledger.keys({f"intake:{g}" for g, _, _, _ in rows})  # type: ignore[union-attr]
        out = []
        for grp, iid, created, body in rows:
            try:
                doc = store.codec.open(f"intake:{iid}", body, keys.get(f"intake:{grp}"))
            except ValueError:
                continue
            at = datetime.fromtimestamp(created, UTC)
            out.append(Item(namespace=tuple(doc["ns"]), key=doc["k"], value=doc["v"], created_at=at, updated_at=at))
        return out

    def count(self, namespace: Sequence[str]) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM rows WHERE n = ?", (self.store._ntok(namespace),)).fetchone()[0])

    def settle(self, namespace: Sequence[str], timeout: float = 60.0) -> bool:
        """Until every write of ``namespace`` journaled before this call is stored (or purged); False on timeout.

        Writes journaled meanwhile are not waited for: under a steady stream of appends into the namespace there
        may never be a moment with none journaled (each drained batch takes longer than the gap between appends),
        and a reader needs only what was acknowledged before it asked.
        """
        ntok = self.store._ntok(namespace)
        with self._lock:
            last = self._conn.execute("SELECT MAX(seq) FROM rows WHERE n = ?", (ntok,)).fetchone()[0]
        if last is None:
            return True
        deadline = time.monotonic() + timeout
        with self._hurry():
            while True:
                with self._lock:
                    left = self._conn.execute(
                        "SELECT 1 FROM rows WHERE n = ? AND seq <= ? LIMIT 1", (ntok, last)).fetchone()
                if left is None:
                    return True
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.01)

    @contextlib.contextmanager
    def _hurry(self) -> Iterator[None]:
        """While a caller waits for the drain, it does not defer (see :meth:`_deferral`)."""
        with self._cv:
            self._urgent += 1
            self._cv.notify_all()
        with self.store._cv:  # a writer holding drained batches (_may_gather) commits them now
            self.store._cv.notify_all()
        try:
            yield
        finally:
            with self._cv:
                self._urgent -= 1

    def purge(self, namespaces: Sequence[Sequence[str]], items: Sequence[tuple[Sequence[str], str]] = ()) -> list[int]:
        """Erase the journaled rows of ``namespaces`` and of the ``(namespace, key)`` items (forget).

        Rows are zeroed in the file (``secure_delete``) and the WAL is truncated before this returns;
        a batch of theirs already handed to the store is waited for, so the caller's deletion of
        stored items that follows also finds what it wrote. Returns the rows erased per namespace.
        """
        store = self.store
        ntoks = [store._ntok(ns) for ns in namespaces]
        iids = [store._iid(tuple(ns), key) for ns, key in items]
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                sel = []
                if ntoks:
                    sel += self._conn.execute(
                        f"SELECT seq, batch, n FROM rows WHERE n IN ({','.join('?' * len(ntoks))})", ntoks).fetchall()
                if iids:
                    sel += self._conn.execute(
                        f"SELECT seq, batch, n FROM rows WHERE iid IN ({','.join('?' * len(iids))})", iids).fetchall()
                found = {s: n for s, _, n in sel}
                self._confirmed.clear()  # nothing of a forgotten user stays remembered (see _stored)
                seqs = list(found)
                for start in range(0, len(seqs), 500):
                    chunk = seqs[start : start + 500]
                    self._conn.execute(f"DELETE FROM rows WHERE seq IN ({','.join('?' * len(chunk))})", chunk)
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            batches = {b for _, b, _ in sel}
            with self._cv:  # still under the file lock: the drain's settling cannot see the rows gone unmarked
                for b in batches:  # the forgotten values leave memory too (the rest of a batch is read back)
                    self._forget_prepared(b)
                waits = []
                for b, f in self._flights.items():
                    if b in batches:  # handed to the store already: the caller's deletion that follows erases it
                        f.forgotten.update(seqs)
                        waits.append(f.future)
                if self._threads:
                    self.backlog -= len(seqs)
            truncate_wal(self._conn, self.path)
        if waits:
            with self._hurry():  # the writer does not hold them back to gather more (_may_gather)
                concurrent.futures.wait(waits)
        return [sum(1 for n in found.values() if n == t) for t in ntoks]

    def status(self) -> dict[str, Any]:
        return {"intake_pending": self.backlog, "intake_limit": self.limit}

    def wait_drained(self, timeout: float | None = None) -> bool:
        """Until every journaled write is stored (tests, benchmarks, shutdown)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._hurry():
            while True:
                with self._lock:
                    left = self._conn.execute("SELECT COUNT(*) FROM rows").fetchone()[0]
                if not left:
                    return True
                if deadline is not None and time.monotonic() > deadline:
                    return False
                time.sleep(0.02)

    def close(self, *, drain: bool = True, timeout: float = 60.0) -> None:
        """Stop; with ``drain`` first store what is journaled (what is left is replayed at the next open)."""
        if self._threads and drain:
            self.wait_drained(timeout)
        with self._cv:
            self._closing = True
            self._cv.notify_all()
            self._acv.notify_all()
        for t in self._threads:
            if t.is_alive() and threading.current_thread() is not t:
                t.join()
        if self._key is not None:
            self._retire(self._key[0])
        with self._lock:
            close_erasable(self._conn)


__all__ = ["INTAKE_FILE", "IntakeFull", "IntakeJournal"]
