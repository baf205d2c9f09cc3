"""``bench/vote_write.py --load wrk`` posts exactly the bodies the Python check expects.

The benchmark's check (every acknowledged vote stored exactly once, nothing stored that was not
sent) reconstructs the vote ids in Python, so wrk's Lua script must send each prepared body once
and only those. Two wrk details make that easy to get wrong: wrk calls ``request()`` once before
the run to check the request's shape (that call must not use up a body), and it has no
per-connection stop (after the last body a connection must send nothing). A small HTTP server
records what arrives. Skipped where wrk is not installed (``apt-get install -y wrk``).
"""

from __future__ import annotations

import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

try:
    from tests.scripts import load_script
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    from scripts import load_script  # type: ignore[no-redef]

pytestmark = pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")

BENCH = Path(__file__).resolve().parents[1] / "bench" / "vote_write.py"


def _bench() -> Any:
    return load_script(BENCH, "vote_write_bench")


class _Recorder(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as uvicorn: wrk reuses its connections
    received: list[tuple[str, str, bytes]] = []
    lock = threading.Lock()

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with self.lock:
            self.received.append((self.path, self.headers.get("Authorization", ""), body))
        status = 400 if json.loads(body)["id"] == "w3-1" else 200  # one refusal: counted as not acknowledged
        payload = b'{"object":"vote.batch"}'
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        if self.headers.get("X-Request-ID"):  # echoed, as the proxy's RequestGuard does
            self.send_header("X-Request-ID", self.headers["X-Request-ID"])
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: Any) -> None:
        pass


def test_wrk_posts_every_prepared_body_once_and_nothing_else() -> None:
    bench = _bench()
    writers, per_writer, users = 12, 3, 5
    sends = bench.bodies(writers, per_writer, users)
    lines = [sends[w][i] for i in range(per_writer) for w in range(writers)]
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        burst = bench.WrkBurst(f"http://127.0.0.1:{server.server_address[1]}", lines, writers, limit_s=30)
        burst.start()
        burst.finished()
        res = burst.result()
    finally:
        server.shutdown()
        server.server_close()
    got = _Recorder.received
    assert sorted(b for _, _, b in got) == sorted(lines)  # each body once: none skipped, none repeated
    assert {p for p, _, _ in got} == {"/v1/votes"}
    assert {a for _, a, _ in got} == {f"Bearer {bench.KEY}"}
    assert res["answered"] == len(lines) and res["ok"] == len(lines) - 1 and res["non2xx"] == 1
    assert res["requests"] == len(lines)
    # The ids the Python check expects are exactly the ids in what was sent, per user.
    sent: dict[str, set[str]] = {}
    for _, _, b in got:
        v = json.loads(b)
        sent.setdefault(v["user_id"], set()).add(v["id"])
    assert sent == bench.expected_ids(writers, per_writer, users)


def test_wrk_trace_times_every_request_by_its_place_in_the_send_order(tmp_path: Path) -> None:
    bench = _bench()
    writers, per_writer, users = 8, 3, 4
    sends = bench.bodies(writers, per_writer, users)
    lines = [sends[w][i] for i in range(per_writer) for w in range(writers)]
    _Recorder.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    trace = tmp_path / "trace.txt"
    try:
        burst = bench.WrkBurst(f"http://127.0.0.1:{server.server_address[1]}", lines, writers, limit_s=30, trace=trace)
        burst.start()
        burst.finished()
        burst.result()
    finally:
        server.shutdown()
        server.server_close()
    rows = bench.read_trace(trace)
    assert [k for k, _, _, _ in rows] == list(range(1, len(lines) + 1))
    assert all(d >= 0 and s >= 0 for _, s, d, _ in rows)  # every request was sent and its answer matched
    assert min(s for _, s, _, _ in rows) == 0
    assert {k: c for k, _, _, c in rows} == {k + 1: (400 if json.loads(b)["id"] == "w3-1" else 200)
                                            for k, b in enumerate(lines)}
    summary = bench.trace_summary(rows, writers)
    assert summary[0].startswith("latency by send time") and any(s.startswith("first wave") for s in summary)
