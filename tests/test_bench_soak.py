"""``bench/soak.py`` tells the Chroma child from the spare started during a compaction's copy.

Both are named ``chroma`` (the spare sets its name so ``ps`` shows what it stands for); keyed by
name alone, one hid the other in the per-process split, and the child's RSS series jumped between
the two processes across a restart. The soak keys each process by role: ``server`` (the process it
started), ``chroma`` (the child the server's state file names), ``chroma-spare`` (another Chroma
process while that child lives). A small process tree stands in for ``serve`` and its children.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

try:
    from tests.scripts import load_script
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    from scripts import load_script  # type: ignore[no-redef]

BENCH = Path(__file__).resolve().parents[1] / "bench" / "soak.py"

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _soak() -> Any:
    return load_script(BENCH, "soak_bench", siblings=True)


_CHROMA_LIKE = """\
import ctypes, sys, time
ctypes.CDLL(None).prctl(15, b"chroma", 0, 0, 0)  # PR_SET_NAME, as the spare does
sys.stdin.read()
"""

_TREE = f"""\
import subprocess, sys
kids = [subprocess.Popen([sys.executable, "-c", {_CHROMA_LIKE!r}], stdin=subprocess.PIPE) for _ in range(2)]
print(" ".join(str(k.pid) for k in kids), flush=True)
sys.stdin.read()
for k in kids:
    k.stdin.close()
    k.wait()
"""


@pytest.fixture
def tree() -> Any:
    """A process with two children named ``chroma``: (root pid, child pid, other child pid)."""
    proc = subprocess.Popen([sys.executable, "-c", _TREE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        kids = [int(p) for p in proc.stdout.readline().split()]
        yield proc.pid, kids[0], kids[1]
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=30)


def test_the_child_and_the_spare_are_told_apart_by_the_servers_state_file(tree: Any, tmp_path: Path) -> None:
    soak = _soak()
    root, child, spare = tree
    (tmp_path / "chroma").mkdir()
    (tmp_path / "chroma" / "synth_agent_server.json").write_text(json.dumps({"host": "127.0.0.1", "port": 1, "pid": child}))
    chroma_pid = soak.serving_chroma_pid(tmp_path)
    assert chroma_pid == child

    keys = set(soak.rss_mb(root, chroma_pid))
    assert keys == {f"server[{root}]", f"chroma[{child}]", f"chroma-spare[{spare}]"}
    roles = soak.by_role(soak.rss_mb(root, chroma_pid))
    assert set(roles) == {"server", "chroma", "chroma-spare"} and all(mb > 0 for mb in roles.values())
    assert {k.split("[")[0] for k in soak.smaps_mb(root, chroma_pid)} == {"server", "chroma", "chroma-spare"}

    # The state file names the other one (after a restart): the roles follow it.
    assert set(soak.rss_mb(root, spare)) == {f"server[{root}]", f"chroma[{spare}]", f"chroma-spare[{child}]"}


def test_restarts_are_read_from_the_change_of_child() -> None:
    soak = _soak()
    samples = [
        (0.0, {"server[1]": 300.0, "chroma[10]": 140.0}),
        (5.0, {"server[1]": 310.0, "chroma[10]": 150.0}),
        (10.0, {"server[1]": 350.0, "chroma[10]": 150.0, "chroma-spare[11]": 80.0}),  # the copy
        (15.0, {"server[1]": 320.0, "chroma[11]": 120.0}),  # restarted on the spare
        (20.0, {"server[1]": 321.0, "chroma[11]": 121.0}),
    ]
    (restart,) = soak.chroma_restarts(samples)
    assert restart["copy_from_s"] == 10.0 and restart["at_s"] == 15.0
    assert (restart["server_before_mb"], restart["server_max_during_mb"], restart["server_after_mb"]) == (310.0, 350.0, 320.0)
    assert (restart["chroma_before_mb"], restart["chroma_after_mb"], restart["spare_max_mb"]) == (150.0, 120.0, 80.0)
    assert soak.chroma_restarts(samples[:3]) == []


def test_requests_in_flight_around_a_restart_are_reported_apart() -> None:
    soak = _soak()
    mix = soak.Mix("http://x", 1, 0)
    mix.done = [(1.0, 1.1, "persona"), (9.0, 11.5, "persona"), (12.0, 12.2, "vote"), (30.0, 30.1, "persona")]
    mix.error_log = [(10.5, "chat", "ServerDisconnectedError: Server disconnected", True), (40.0, "vote", "500 b''", False)]
    out = soak.around_restarts(mix, [{"copy_from_s": 10.0, "at_s": 15.0}])
    assert out["windows_s"] == [[8.0, 15.0]]
    assert out["latency_near_n_p50_max_ms"] == {"persona": [1, 2500.0, 2500.0], "vote": [1, 200.0, 200.0]}
    assert set(out["latency_elsewhere_p99_max_ms"]) == {"persona"}
    assert out["errors_near"] == 1
