"""Soak test: ``synth-agent serve`` under ~15 mixed requests/s for 10 minutes; memory over time.

Starts the offline simulator (``--sim-latency-ms`` per request) and ``synth-agent serve``
(inline synthesis, embedded store) as separate processes, then sends an open-loop mix at
``--rate`` requests/s: chat completions, votes, A/B pairs (half of them redeemed), reranks,
judgments, persona reads and ``--delete-share`` user deletions. Every 5 s it records the
resident memory of the server process and of its children (the store's Chroma process).
At the end it stops the server and checks that every acknowledged vote of a user not deleted
afterwards is stored. Prints per-kind counts, errors and latency, RSS at start/end, and the
RSS slope after ``--warmup`` seconds (least squares, MB/min); writes a plot of RSS over time.

    .venv/bin/python bench/soak.py                               # 10 minutes, this checkout
    .venv/bin/python bench/soak.py --repo /work/baseline         # the same load on another checkout
    .venv/bin/python bench/soak.py --duration 120 --warmup 30    # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from urllib.parse import quote

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from vote_write import KEY, measure, pct  # noqa: E402

KINDS = {"chat": 0.38, "vote": 0.25, "ab": 0.10, "rerank": 0.05, "judge": 0.05, "persona": 0.15}


def parse_mix(text: str) -> dict[str, float]:
    """``chat=1,persona=2`` -> normalised weights (argparse type)."""
    out: dict[str, float] = {}
    for part in text.split(","):
        kind, _, w = part.partition("=")
        if kind.strip() not in KINDS:
            raise argparse.ArgumentTypeError(f"unknown kind {kind.strip()!r}; use {', '.join(KINDS)}")
        out[kind.strip()] = float(w or 1)
    total = sum(out.values())
    if total <= 0:
        raise argparse.ArgumentTypeError("the mix needs a positive weight")
    return {k: v / total for k, v in out.items()}


def rss_mb(root: int) -> dict[str, float]:
    """Resident memory (MB) of ``root`` and of each descendant, by ``name[pid]``."""
    parents: dict[int, int] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            raw = Path(f"/proc/{pid}/stat").read_bytes()
            parents[int(pid)] = int(raw[raw.rindex(b")") + 2 :].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    out: dict[str, float] = {}
    todo = [root]
    while todo:
        pid = todo.pop()
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        name = next(line.split()[1] for line in status.splitlines() if line.startswith("Name:"))
        kb = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
        out[f"{name}[{pid}]"] = kb / 1024
        todo += [p for p, pp in parents.items() if pp == pid]
    return out


def slope_mb_per_min(points: list[tuple[float, float]]) -> float:
    if len(points) < 2:
        return float("nan")
    xs, ys = [p[0] / 60 for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else float("nan")


class Mix:
    """The traffic: users, what was acknowledged, latency and errors per kind."""

    def __init__(self, url: str, users: int, seed: int) -> None:
        self.url = url
        self.rng = random.Random(seed)
        self.users = [f"soak{u:03d}@example.com" for u in range(users)]
        self.acked: list[tuple[str, str, float]] = []  # (user, vote id, sent at)
        self.deletes: dict[str, list[tuple[float, float]]] = defaultdict(list)  # user -> (sent, answered)
        self.lat: dict[str, list[float]] = defaultdict(list)
        self.errors: dict[str, list[str]] = defaultdict(list)
        self.n = 0
        self.t0 = time.perf_counter()

    def expected(self) -> dict[str, set[str]]:
        """Acknowledged votes that must be stored: sent after every delete of their user had answered."""
        out: dict[str, set[str]] = defaultdict(set)
        for user, vid, sent in self.acked:
            if all(done < sent for _, done in self.deletes.get(user, [])):
                out[user].add(vid)
        return out

    def convo(self) -> list[dict[str, str]]:
        topic = self.rng.choice(["a trip to Lisbon", "a Python bug", "tomato plants", "a job interview", "my budget"])
        return [{"role": "user", "content": f"Help me with {topic}, request {self.n}."}]

    async def one(self, session, kind: str) -> None:  # type: ignore[no-untyped-def]
        self.n += 1
        user = self.rng.choice(self.users)
        seg = quote(user, safe="")
        t = time.perf_counter()
        try:
            if kind == "chat":
                body = {"model": "sim", "user": user, "messages": self.convo()}
                ok = await self._post(session, "/v1/chat/completions", body)
            elif kind == "vote":
                vid = f"soak-{self.n}"
                body = {"id": vid, "user_id": user, "context": self.convo(), "chosen": f"short {self.n}",
                        "rejected": f"long rambling {self.n}"}
                ok = await self._post(session, "/v1/votes", body)
                if ok:
                    self.acked.append((user, vid, t))
            elif kind == "ab":
                res = await self._post(session, "/v1/ab", {"model": "sim", "user": user, "messages": self.convo()})
                if res and isinstance(res, dict) and res.get("token") and self.rng.random() < 0.5:
                    receipt = await self._post(session, f"/v1/ab/{res['token']}/vote", {"user": user, "choice": "a"})
                    if receipt and isinstance(receipt, dict) and receipt.get("vote_id"):
                        self.acked.append((user, receipt["vote_id"], t))
                ok = bool(res)
            elif kind == "rerank":
                body = {"model": "sim", "user": user, "messages": self.convo(),
                        "candidates": ["A short answer.", "A long answer with a list:\n- one\n- two", "Maybe."]}
                ok = await self._post(session, "/v1/rerank", body)
            elif kind == "judge":
                body = {"user": user, "messages": self.convo(), "a": "Short.", "b": "Long and detailed."}
                ok = await self._post(session, "/v1/judge", body)
            elif kind == "persona":
                async with session.get(f"/v1/users/{seg}/persona") as r:
                    await r.read()
                    ok = r.status in (200, 404)
                    if not ok:
                        self.errors[kind].append(str(r.status))
            else:  # delete
                async with session.delete(f"/v1/users/{seg}") as r:
                    await r.read()
                    ok = r.status == 200
                    self.deletes[user].append((t, time.perf_counter()))
                    if not ok:
                        self.errors[kind].append(str(r.status))
        except Exception as exc:  # noqa: BLE001 - a soak counts failures, it does not stop on them
            self.errors[kind].append(type(exc).__name__)
            return
        if ok:
            self.lat[kind].append((time.perf_counter() - t) * 1000)

    async def _post(self, session, path: str, body: dict[str, object]):  # type: ignore[no-untyped-def]
        async with session.post(path, json=body) as r:
            data = await r.read()
            if r.status != 200:
                self.errors[path.split("/")[2]].append(f"{r.status} {data[:100]!r}")
                return None
            return json.loads(data) or True


async def drive(args: argparse.Namespace, url: str, pid: int) -> tuple[Mix, list[tuple[float, dict[str, float]]]]:
    import aiohttp

    mix = Mix(url, args.users, args.seed)
    def table(mix_w: dict[str, float], delete_share: float) -> tuple[list[str], list[float]]:
        return list(mix_w) + ["delete"], [w * (1 - delete_share) for w in mix_w.values()] + [delete_share]

    kinds, weights = table(args.mix or KINDS, args.delete_share)
    samples: list[tuple[float, dict[str, float]]] = []
    tasks: set[asyncio.Task[None]] = set()
    timeout = aiohttp.ClientTimeout(total=300)
    headers = {"Authorization": f"Bearer {KEY}"}
    async with aiohttp.ClientSession(base_url=url, headers=headers, timeout=timeout) as session:
        t0 = time.monotonic()
        next_sample = 0.0
        i = 0
        while (now := time.monotonic() - t0) < args.duration:
            if now >= next_sample:
                samples.append((now, rss_mb(pid)))
                next_sample += 5.0
                done = sum(len(v) for v in mix.lat.values())
                errs = sum(len(v) for v in mix.errors.values())
                total = sum(samples[-1][1].values())
                print(f"  t={now:5.0f}s  requests ok {done:6d}  errors {errs:4d}  RSS {total:7.1f} MB", flush=True)
            if args.then_mix and now >= args.then_at:
                kinds, weights = table(args.then_mix, 0.0)
            task = asyncio.create_task(mix.one(session, mix.rng.choices(kinds, weights)[0]))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
            await asyncio.sleep(max(0.0, t0 + i / args.rate - time.monotonic()))
        await asyncio.gather(*tasks)
        samples.append((time.monotonic() - t0, rss_mb(pid)))
    return mix, samples


def halves(samples: list[tuple[float, dict[str, float]]], warmup: float) -> dict[str, list[float]]:
    """RSS slope (MB/min) in the first and the second half of the time after ``warmup``, total and per process."""
    after = [(t, s) for t, s in samples if t >= warmup]
    if len(after) < 4:
        return {}
    mid = (after[0][0] + after[-1][0]) / 2
    parts = [[p for p in after if p[0] <= mid], [p for p in after if p[0] >= mid]]
    names = sorted({k.split("[")[0] for _, s in after for k in s})
    out = {"total": [round(slope_mb_per_min([(t, sum(s.values())) for t, s in part]), 3) for part in parts]}
    for name in names:
        out[name] = [round(slope_mb_per_min([(t, sum(v for k, v in s.items() if k.split("[")[0] == name))
                                             for t, s in part]), 3) for part in parts]
    return out


def plot(samples: list[tuple[float, dict[str, float]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({k.split("[")[0] for _, s in samples for k in s})
    fig, ax = plt.subplots(figsize=(8, 4))
    for name in names:
        ax.plot([t / 60 for t, _ in samples], [sum(v for k, v in s.items() if k.split("[")[0] == name) for _, s in samples],
                label=name)
    ax.plot([t / 60 for t, _ in samples], [sum(s.values()) for _, s in samples], label="total", linewidth=2)
    ax.set_xlabel("minutes")
    ax.set_ylabel("RSS (MB)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", type=Path, default=HERE.parent, help="checkout whose `synth-agent serve` is measured")
    ap.add_argument("--python", help="its interpreter (default: <repo>/.venv/bin/python)")
    ap.add_argument("--duration", type=float, default=600.0, help="seconds of traffic (default 600)")
    ap.add_argument("--rate", type=float, default=15.0, help="requests per second (default 15)")
    ap.add_argument("--users", type=int, default=60)
    ap.add_argument("--delete-share", type=float, default=0.02)
    ap.add_argument("--mix", type=parse_mix, default=None,
                    help="request mix as kind=weight,... (kinds: " + ", ".join(KINDS) + "); default: the issue's mix. "
                         "E.g. --mix persona=1 --delete-share 0 for reads only (does RSS grow without new data?)")
    ap.add_argument("--then-mix", type=parse_mix, default=None,
                    help="switch to this mix (no deletes) after --then-at seconds, e.g. persona=1,chat=1: "
                         "write data first, then see whether memory grows on reads alone")
    ap.add_argument("--then-at", type=float, default=180.0)
    ap.add_argument("--warmup", type=float, default=120.0, help="seconds left out of the RSS slope (default 120)")
    ap.add_argument("--sim-latency-ms", type=float, default=20.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("."), help="where to write soak.png and soak.json")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: stop the server and simulator we started
    repo = args.repo.resolve()
    python = args.python or str(repo / ".venv" / "bin" / "python")
    (mix, samples), stored = measure(repo, python, "inline", lambda url, pid: asyncio.run(drive(args, url, pid)),
                                     seed=args.seed, sim_latency_ms=args.sim_latency_ms)
    totals = [(t, sum(s.values())) for t, s in samples]
    after = [p for p in totals if p[0] >= args.warmup]
    expected = mix.expected()
    lost = {u: sorted(ids - set(stored.get(u, [0, 0, []])[2])) for u, ids in expected.items()}
    lost = {u: ids for u, ids in lost.items() if ids}
    acked = sum(len(v) for v in expected.values())
    report = {
        "repo": str(repo), "duration_s": args.duration, "rate": args.rate,
        "requests_ok": {k: len(v) for k, v in mix.lat.items()},
        "errors": {k: len(v) for k, v in mix.errors.items()},
        "first_errors": {k: v[:3] for k, v in mix.errors.items()},
        "latency_p50_ms": {k: round(statistics.median(v), 1) for k, v in mix.lat.items() if v},
        "latency_p99_ms": {k: round(pct(v, 0.99), 1) for k, v in mix.lat.items() if v},
        "acknowledged_votes_checked": acked, "acknowledged_votes_missing": sum(len(v) for v in lost.values()),
        "missing_examples": {u: ids[:3] for u, ids in list(lost.items())[:3]},
        # when each missing vote was sent, and that user's deletes (sent, answered), seconds into the run
        "missing_timeline": {
            u: {"votes_sent": [round(t - mix.t0, 2) for uu, vid, t in mix.acked if uu == u and vid in ids],
                "deletes": [(round(a - mix.t0, 2), round(b - mix.t0, 2)) for a, b in mix.deletes.get(u, [])]}
            for u, ids in list(lost.items())[:3]
        },
        "rss_start_mb": round(totals[0][1], 1), "rss_end_mb": round(totals[-1][1], 1),
        "rss_by_process_end_mb": {k.split("[")[0]: round(v, 1) for k, v in samples[-1][1].items()},
        "rss_slope_after_warmup_mb_per_min": round(slope_mb_per_min(after), 3),
        "rss_slope_whole_run_mb_per_min": round(slope_mb_per_min(totals), 3),
        # Levelling off shows as a smaller slope in the second half of the measured window than in the first.
        "rss_slope_after_warmup_halves_mb_per_min": halves(samples, args.warmup),
        "rss_slope_after_warmup_by_process_mb_per_min": {
            name: round(slope_mb_per_min([(t, sum(v for k, v in s.items() if k.split("[")[0] == name))
                                          for t, s in samples if t >= args.warmup]), 3)
            for name in sorted({k.split("[")[0] for _, s in samples for k in s})},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps({**report, "rss_samples": totals, "rss_samples_by_process": [
        (t, {k.split("[")[0]: round(v, 1) for k, v in s.items()}) for t, s in samples]}, indent=2))
    plot(samples, args.out / "soak.png", f"soak: {args.rate:g} req/s, {repo.name}")
    for k, v in report.items():
        print(f"  {k:36} {v}")
    print(f"  plot: {args.out / 'soak.png'}")


if __name__ == "__main__":
    main()
