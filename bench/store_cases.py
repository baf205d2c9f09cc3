"""The issue's three store cases, measured on any checkout: poison batch, erasure byte scan, search sorting.

Each case runs the measured checkout's own code (``--repo``, its ``.venv``) in a temporary home:

* ``poison``: ``synth-agent serve``; one 600-vote ``POST /v1/votes`` whose vote 417 (with an
  explicit id) carries a lone surrogate, sent together with 20 single-vote requests for the same
  user. Prints the status of each, and how many of the 600 and of the 20 are stored.
* ``erasure``: ``synth-agent serve`` (inline synthesis); a user's 8 votes carry a marker string,
  a persona is fitted, an A/B pair is left pending; ``DELETE /v1/users/{u}``; then every file under
  the home is read as bytes, while the server runs, after it stops and after a restart. Prints the
  files that still hold the marker or the user id.
* ``sorting``: LangGraph's ``test_search_sorting`` at the issue's size: ``{"key1": "mmm"}`` in
  ``("test", "M")``, 100 ``{"key1": "no"}`` in ``("test", "A")`` and 100 in ``("test", "Z")`` (one
  embedding for all 200); ``search(("test",), query="mmm", limit=10)``. Prints where the match ranks.

    .venv/bin/python bench/store_cases.py                              # this checkout, all cases
    .venv/bin/python bench/store_cases.py --repo /work/baseline poison # another checkout, one case
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from urllib.parse import quote

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from vote_write import KEY, count_stored, start_server, stop_server  # noqa: E402

from synth_agent.sim.server import SimProcess  # noqa: E402

H = {"Authorization": f"Bearer {KEY}"}
MARKER = "ZQ7BENCHMARK41"
USER = "erase-bench-5e1a@example.com"


def _vote(user: str, i: int, tag: str) -> dict[str, object]:
    return {"id": f"{tag}-{i}", "user_id": user,
            "context": [{"role": "user", "content": f"{tag} question {i}: how should I plan week {i}?"}],
            "chosen": f"{tag} a short answer with a list for week {i}", "rejected": f"a long answer for week {i}"}


def poison(repo: Path, python: str, home: Path, sim: SimProcess) -> dict[str, object]:
    proc, url, _ = start_server(repo, python, home, sim.base_url, "off")
    try:
        batch = [_vote("ana@bench", i, "batch") for i in range(600)]
        batch[417]["chosen"] = "broken \ud800 text"
        body = json.dumps(batch)

        async def run() -> tuple[httpx.Response, list[httpx.Response]]:
            async with httpx.AsyncClient(base_url=url, headers={**H, "Content-Type": "application/json"},
                                         timeout=600) as client:
                rs = await asyncio.gather(client.post("/v1/votes", content=body),
                                          *(client.post("/v1/votes", json=_vote("ana@bench", i, "valid"))
                                            for i in range(20)))
                return rs[0], list(rs[1:])

        bad, good = asyncio.run(run())
    finally:
        stop_server(proc)
    stored = count_stored(repo, python, home).get("ana@bench", [0, 0, []])[2]
    return {
        "poison_status": bad.status_code, "poison_message": bad.text[:160],
        "batch_votes_stored_of_600": sum(1 for i in stored if str(i).startswith("batch-")),
        "valid_requests_ok_of_20": sum(r.status_code == 200 for r in good),
        "valid_statuses": sorted({r.status_code for r in good}),
        "valid_votes_stored_of_20": sum(1 for i in stored if str(i).startswith("valid-")),
    }


def scan(root: Path, needles: list[str]) -> dict[str, list[str]]:
    hits: dict[str, list[str]] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        for n in needles:
            if n.encode() in data:
                hits.setdefault(n, []).append(str(path.relative_to(root)))
    return hits


def erasure(repo: Path, python: str, home: Path, sim: SimProcess) -> dict[str, object]:
    seg = quote(USER, safe="")
    proc, url, _ = start_server(repo, python, home, sim.base_url, "inline")
    out: dict[str, object] = {}
    try:
        r = httpx.post(f"{url}/v1/votes", json=[_vote(USER, i, MARKER) for i in range(8)], headers=H, timeout=300)
        out["votes_status"] = r.status_code
        httpx.post(f"{url}/v1/votes", json=[_vote(f"other{i % 3}@bench", i, "OTHER") for i in range(9)], headers=H,
                   timeout=300)
        ab = httpx.post(f"{url}/v1/ab", headers=H, timeout=300, json={
            "user": USER, "model": "sim", "messages": [{"role": "user", "content": f"{MARKER} pending pair"}]})
        out["ab_status"] = ab.status_code
        deadline = time.monotonic() + 300
        while httpx.get(f"{url}/v1/users/{seg}/persona", headers=H, timeout=60).status_code != 200:
            if time.monotonic() > deadline:
                out["persona"] = "not fitted in 300 s"
                break
            time.sleep(0.5)
        out["files_with_marker_before_delete"] = len(scan(home, [MARKER]).get(MARKER, []))
        d = httpx.delete(f"{url}/v1/users/{seg}", headers=H, timeout=300)
        out["delete"] = d.json().get("deleted", d.text[:200])
        out["left_while_running"] = scan(home, [MARKER, USER])
    finally:
        stop_server(proc)
    out["left_after_stop"] = scan(home, [MARKER, USER])
    proc, url, _ = start_server(repo, python, home, sim.base_url, "inline")
    try:
        for i in range(30):  # some more writes, as the tester did
            httpx.post(f"{url}/v1/votes", json=_vote(f"later{i % 5}@bench", i, "LATER"), headers=H, timeout=300)
        out["left_after_restart_and_30_writes"] = scan(home, [MARKER, USER])
    finally:
        stop_server(proc)
    return out


SORTING = textwrap.dedent(
    """
    import json, math, sys, time
    from store.chroma import ChromaStore

    def embed(texts):  # LangGraph's CharacterEmbeddings in spirit: a vector from the characters
        out = []
        for t in texts:
            v = [0.0] * 256
            for i, ch in enumerate(t):
                v[(ord(ch) * 31 + i * 7) % 256] += 1.0
            n = math.sqrt(sum(x * x for x in v)) or 1.0
            out.append([x / n for x in v])
        return out

    store = ChromaStore(sys.argv[1], embedding_function=embed, index_fields=["key1"])
    store.put(("test", "M"), "M", {"key1": "mmm"})
    for i in range(100):
        store.put(("test", "A"), f"A{i}", {"key1": "no"})
    for i in range(100):
        store.put(("test", "Z"), f"Z{i}", {"key1": "no"})
    t = time.perf_counter()
    hits = store.search(("test",), query="mmm", limit=10)
    ms = (time.perf_counter() - t) * 1000
    keys = [h.key for h in hits]
    print(json.dumps({"rank_of_match": keys.index("M") + 1 if "M" in keys else None, "hits": len(hits),
                      "distinct_keys": len(set(keys)), "top_key": keys[0] if keys else None,
                      "top_score": round(hits[0].score, 3) if hits else None, "search_ms": round(ms, 1)}))
    close = getattr(store, "close", None)
    if close: close()
    """
)


def sorting(repo: Path, python: str, home: Path, sim: SimProcess | None) -> dict[str, object]:
    env = {**os.environ, "PYTHONPATH": str(repo), "ANONYMIZED_TELEMETRY": "False", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([python, "-c", SORTING, str(home / "chroma")], cwd=home, env=env, capture_output=True,
                         text=True, timeout=600)
    if res.returncode != 0:
        return {"error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else res.returncode}
    return json.loads(res.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


CASES = {"poison": poison, "erasure": erasure, "sorting": sorting}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cases", nargs="*", help=f"some of {', '.join(CASES)} (default: all)")
    ap.add_argument("--repo", type=Path, default=HERE.parent, help="checkout to measure")
    ap.add_argument("--python", help="its interpreter (default: <repo>/.venv/bin/python)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: stop the servers and simulator we started
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        ap.error(f"unknown case {unknown[0]!r}: choose from {', '.join(CASES)}")
    repo = args.repo.resolve()
    python = args.python or str(repo / ".venv" / "bin" / "python")
    results: dict[str, object] = {"repo": str(repo)}
    with SimProcess(seed=3) as sim:
        for name in args.cases or list(CASES):
            tmp = Path(tempfile.mkdtemp(prefix=f"synth-case-{name}-"))
            home = tmp / "home"
            home.mkdir()
            try:
                t = time.perf_counter()
                results[name] = CASES[name](repo, python, home, sim)
                print(f"{name} ({time.perf_counter() - t:.0f} s, repo={repo}):")
                for k, v in results[name].items():  # type: ignore[union-attr]
                    print(f"  {k:34} {v}")
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
