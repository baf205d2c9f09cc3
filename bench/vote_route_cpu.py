"""Event-loop CPU per ``POST /v1/votes`` in process: the proxy's ASGI app called directly, no server.

Why: under a write burst (``bench/vote_write.py``) the event loop's CPU per vote is one of the two
figures that bound the acknowledgement rate, but the burst's figures move ±20 % between rounds on a
shared machine. This isolates the app's own share: each request is a complete ASGI call (request
id, metrics, body guard, routing or the direct path, auth, validation, the JSON answer) with
``PreferenceMemory.add_votes`` replaced by an instant answer, so neither the store, uvicorn nor the
network is measured. Prints the CPU time (``time.process_time``) per request for ``--runs`` runs of
``--requests`` requests after 200 warm-up requests.

    .venv/bin/python bench/vote_route_cpu.py                 # this checkout, as served
    .venv/bin/python bench/vote_route_cpu.py --full-stack    # POST /v1/votes through FastAPI's full stack
    cd /tmp && PYTHONPATH=/work/ref2 /work/ref2/.venv/bin/python /path/to/bench/vote_route_cpu.py   # another tree
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from typing import Any

from langgraph.store.memory import InMemoryStore

from store.memory import AddVotesResult, PreferenceMemory
from synth_agent.config import Settings
from synth_agent.proxy import ProxySettings, create_app

KEY = "sk-bench"


async def _instant(self: PreferenceMemory, votes: Any, *, validated: bool = False) -> AddVotesResult:
    return AddVotesResult(added=len(list(votes)), duplicates=0)


async def run(n: int, full_stack: bool) -> float:
    app = create_app(Settings(home=tempfile.mkdtemp()),
                     ProxySettings(api_keys=f"bench:{KEY}", synthesis="off", key_rate_limit=0),
                     store=InMemoryStore())
    if full_stack and getattr(app, "_direct_route", None) is not None:
        app._direct_route = None  # type: ignore[attr-defined]
    bodies = [json.dumps({"user_id": f"u{i % 20}@bench", "id": f"v{i}", "context": "Name a fruit, with some context.",
                          "chosen": "Apple is a nice fruit.", "rejected": "Stone."}).encode() for i in range(n + 200)]

    async def one(body: bytes) -> None:
        sent: list[dict[str, Any]] = []
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/v1/votes", "raw_path": b"/v1/votes", "query_string": b"",
                 "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
                 "headers": [(b"host", b"bench"), (b"authorization", f"Bearer {KEY}".encode()),
                             (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await app(scope, receive, send)
        if sent[0]["status"] != 200:
            raise SystemExit(f"unexpected answer: {sent}")

    async with app.router.lifespan_context(app):  # type: ignore[attr-defined]
        for body in bodies[:200]:
            await one(body)
        t0 = time.process_time()
        for body in bodies[200:]:
            await one(body)
        return (time.process_time() - t0) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--full-stack", action="store_true", help="send POST /v1/votes through FastAPI's full stack")
    args = ap.parse_args()
    PreferenceMemory.add_votes = _instant  # type: ignore[method-assign]
    per = [asyncio.run(run(args.requests, args.full_stack)) for _ in range(args.runs)]
    print(f"vote_route_cpu: {'full stack' if args.full_stack else 'as served'}: CPU per POST /v1/votes "
          f"{', '.join(f'{x:.0f}' for x in per)} us (median {statistics.median(per):.0f})")


if __name__ == "__main__":
    main()
