"""The vote write path's edge: ``/healthz`` answered before the middleware stack, request ids, the vote answer.

``ProxyApp`` answers ``GET /healthz`` itself so a liveness probe stays fast while writes saturate the
event loop; these tests pin down that it is still the same probe (body, status, request id, metrics)
and that it really does not go through the stack. Served for real (uvicorn, sockets) with an
in-memory store and the offline simulator.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from langgraph.store.memory import InMemoryStore

from synth_agent.config import Settings
from synth_agent.llm.client import EndpointConfig, LLMClient
from synth_agent.proxy import ProxyServer, ProxySettings, create_app
from synth_agent.proxy.guard import new_request_id
from synth_agent.sim.server import SimEndpoint

KEY = "sk-edge-1"
H = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, ProxyServer]]:
    with SimEndpoint() as sim:
        llm = LLMClient(EndpointConfig(base_url=sim.base_url))
        app = create_app(Settings(base_url=sim.base_url, home=tmp_path_factory.mktemp("edge-home")),
                         ProxySettings(api_keys=f"acme:{KEY}", synthesis="off"), store=InMemoryStore(), llm=llm)
        with ProxyServer(app, close=[llm]) as srv:
            yield app, srv


def healthz_count(srv: ProxyServer) -> float:
    text = httpx.get(f"{srv.url}/metrics").text
    m = re.search(r'^synth_proxy_requests_total\{method="GET",route="/healthz",status="200"\} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def test_healthz_answers_with_a_request_id_and_is_counted(served: tuple[Any, ProxyServer]) -> None:
    _, srv = served
    before = healthz_count(srv)
    r = httpx.get(f"{srv.url}/healthz")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.json() == {"status": "ok", "auth": True, "synthesis": "off", "synthesis_in_flight": 0}
    assert re.fullmatch(r"req_[0-9a-f]{16}", r.headers["x-request-id"])
    assert httpx.get(f"{srv.url}/healthz", headers={"X-Request-ID": "probe-7"}).headers["x-request-id"] == "probe-7"
    assert healthz_count(srv) == before + 2
    assert httpx.post(f"{srv.url}/healthz").status_code == 405  # other methods: the declared route, as before


def test_healthz_does_not_go_through_the_middleware_stack(served: tuple[Any, ProxyServer]) -> None:
    """With the whole stack (FastAPI's layers, guards, routing) made to fail, the probe still answers."""
    app, srv = served
    assert httpx.get(f"{srv.url}/metrics").status_code == 200  # builds the stack if it was not yet
    stack = app.middleware_stack
    assert stack is not None

    async def broken(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("the stack was entered")

    app.middleware_stack = broken
    try:
        assert httpx.get(f"{srv.url}/healthz").json()["status"] == "ok"
        with pytest.raises(httpx.HTTPError):  # anything else does enter it (uvicorn drops the connection)
            httpx.get(f"{srv.url}/metrics").raise_for_status()
    finally:
        app.middleware_stack = stack
    assert httpx.get(f"{srv.url}/metrics").status_code == 200


def test_healthz_reports_starting_before_the_store_is_open(tmp_path: Path) -> None:
    app = create_app(Settings(home=tmp_path), ProxySettings(api_keys=f"acme:{KEY}", synthesis="off"),
                     store=InMemoryStore())
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    import asyncio

    scope = {"type": "http", "method": "GET", "path": "/healthz", "raw_path": b"/healthz", "headers": [],
             "query_string": b""}
    asyncio.run(app(scope, receive, send))  # no lifespan: nothing opened yet
    assert sent[0]["status"] == 503 and sent[1]["body"] == b'{"status":"starting"}'


def test_generated_request_ids_differ() -> None:
    ids = {new_request_id() for _ in range(10_000)}
    assert len(ids) == 10_000 and all(re.fullmatch(r"req_[0-9a-f]{16}", i) for i in ids)


def test_a_vote_write_answers_the_documented_shape(served: tuple[Any, ProxyServer]) -> None:
    _, srv = served
    v = {"id": "edge-1", "user_id": "ana@example.com", "context": [{"role": "user", "content": "Name a fruit."}],
         "chosen": "Apple.", "rejected": "A brick."}
    first = httpx.post(f"{srv.base_url}/votes", json=v, headers=H)
    again = httpx.post(f"{srv.base_url}/votes", json=[v], headers=H)
    assert first.status_code == again.status_code == 200
    assert first.json() == {"object": "vote.batch", "added": 1, "duplicates": 0, "users": ["ana@example.com"]}
    assert again.json() == {"object": "vote.batch", "added": 0, "duplicates": 1, "users": ["ana@example.com"]}
    assert first.headers["content-type"] == "application/json"
    schema = httpx.get(f"{srv.url}/openapi.json").json()
    ok = schema["paths"]["/v1/votes"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok == {"$ref": "#/components/schemas/VoteBatchResult"}
