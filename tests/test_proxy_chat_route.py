"""``POST /v1/chat/completions`` solves its dependencies directly: it must answer exactly as FastAPI's own solver would.

The route's class (:func:`synth_agent.proxy.routes.common.direct_json_route`, ``ChatRoute``) skips FastAPI's
generic per-request machinery, and the app answers it past FastAPI's and Starlette's own layers
(``ProxyApp.serve_directly``). Here the same requests go to two apps, one with that route and one where
it is a plain ``APIRoute`` (FastAPI solving the same declaration through the full stack), and every
answer — status, headers that matter, body (request ids aside), what was forwarded upstream — must be
the same: auth, tenant and user pinning, media type, header limits, body validation and the error order.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from fastapi.routing import APIRoute
from langgraph.store.memory import InMemoryStore
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

try:
    from tests.direct_client import direct_only_client
except ImportError:  # run from inside tests/
    from direct_client import direct_only_client  # type: ignore[no-redef]
from synth_agent.config import Settings
from synth_agent.models import PersonaProfile
from synth_agent.proxy import ProxySettings, create_app
from synth_agent.proxy.routes import openai as openai_routes
from synth_agent.proxy.schemas import api_models
from synth_agent.serving import ThreadedServer

KEY, OTHER = "sk-acme-1", "sk-beta-1"
H = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
ANA = "ana@example.com"


def chat(user: str | None = ANA, **kw: Any) -> bytes:
    body = {"model": "m", "user": user, "messages": [{"role": "user", "content": "Name a fruit."}], **kw}
    return json.dumps({k: v for k, v in body.items() if v is not None}).encode()


CASES: list[tuple[str, dict[str, Any], bytes | None]] = [
    ("a chat, persona injected", H, chat()),
    ("no user", H, chat(None)),
    ("a user without a persona", H, chat("bob@example.com")),
    ("streamed", H, chat(stream=True)),
    ("vendor fields and a big integer", H, chat(seed=2**70, tools=[], extra={"a": [1, 2.5, None]})),
    ("no key", {"Content-Type": "application/json"}, chat()),
    ("a wrong key", {**H, "Authorization": "Bearer nope"}, chat()),
    ("x-api-key", {"X-API-Key": KEY, "Content-Type": "application/json"}, chat()),
    ("basic auth scheme", {**H, "Authorization": "Basic abc"}, chat()),
    ("another tenant's key named", {**H, "X-Synth-Tenant": "beta"}, chat()),
    ("its own tenant named", {**H, "X-Synth-Tenant": "acme"}, chat()),
    ("tenant header too long", {**H, "X-Synth-Tenant": "t" * 257}, chat()),
    ("tenant header too long, bad body", {**H, "X-Synth-Tenant": "t" * 257}, b'{"messages": 5}'),
    ("user header too long", {**H, "X-Synth-User": "u" * 2049}, chat(None)),
    ("pinned user", {**H, "X-Synth-User": quote(ANA, safe="")}, chat(None)),
    ("pinned, body names another", {**H, "X-Synth-User": "bob"}, chat("eve")),
    ("pin not ASCII", {**H, "X-Synth-User": "zoë".encode()}, chat(None)),
    ("pin not UTF-8", {**H, "X-Synth-User": "%FF"}, chat(None)),
    ("an invisible user id", H, chat("a\u200b")),
    ("text/plain", {**H, "Content-Type": "text/plain"}, chat()),
    ("no content type", {"Authorization": f"Bearer {KEY}"}, chat()),
    ("+json content type", {**H, "Content-Type": "application/vnd.x+json"}, chat()),
    ("empty body", H, None),
    ("null body", H, b"null"),
    ("a string", H, b'"hi"'),
    ("a list", H, b"[]"),
    ("no messages", H, b'{"model": "m"}'),
    ("no model", H, b'{"messages": [{"role": "user", "content": "hi"}]}'),
    ("empty messages", H, chat(messages=[])),
    ("a bad role", H, chat(messages=[{"role": "wizard", "content": "hi"}])),
    ("a wrong type", H, chat(messages="hi")),
    ("a wrong stream type", H, chat(stream="yes")),
    ("too many messages", H, chat(messages=[{"role": "user", "content": "x"}] * 257)),
    ("not JSON", H, b"{"),
    ("a lone surrogate", H, b'{"model": "m", "messages": [{"role": "user", "content": "x\\ud800"}]}'),
]


async def echo(request: Request) -> Any:
    """The upstream: answers with what it was sent (so the forwarded bodies are compared too)."""
    raw = await request.body()
    return JSONResponse({"id": "c1", "object": "chat.completion", "created": 0, "model": "m", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": raw.decode()}, "finish_reason": "stop"}]})


async def healthz(request: Request) -> Any:
    return JSONResponse({"ok": True})


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    app = Starlette(routes=[Route("/v1/chat/completions", echo, methods=["POST"]), Route("/healthz", healthz)])
    with ThreadedServer(app, name="echo-upstream") as up:
        yield up.base_url


async def _answers(route_class: Any, tmp: Any, url: str, monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    if route_class is not None:
        monkeypatch.setattr(openai_routes, "_chat_route", lambda _adapter: route_class)
    app = create_app(Settings(base_url=url, home=tmp),
                     ProxySettings(api_keys=f"acme:{KEY},beta:{OTHER}", synthesis="off", key_rate_limit=0),
                     store=InMemoryStore())
    monkeypatch.undo()
    out: list[tuple[Any, ...]] = []
    async with app.router.lifespan_context(app):  # type: ignore[attr-defined]
        await app.state.proxy.memories("acme").save_persona(PersonaProfile(user_id=ANA, persona="Likes short answers."))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            for _, headers, body in CASES:
                r = await client.post("/v1/chat/completions", headers=headers, content=body)
                payload = r.json()
                payload.pop("request_id", None)
                if isinstance(payload.get("error"), dict):
                    payload["error"].pop("request_id", None)
                out.append((r.status_code, r.headers.get("www-authenticate"), r.headers.get("x-synth-persona-version"),
                            payload, sorted(r.headers.keys()), r.headers.get("content-type"),
                            r.headers.get("x-request-id", "").startswith("req_")))
            metrics = (await client.get("/metrics", headers=H)).text
            out.append(tuple(line for line in metrics.splitlines()
                             if line.startswith("synth_proxy_requests_total") and "/v1/chat/completions" in line))
    return out


async def test_the_chat_route_answers_as_fastapis_solver_would(
    upstream: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    direct = await _answers(None, tmp_path / "direct", upstream, monkeypatch)
    generic = await _answers(APIRoute, tmp_path / "generic", upstream, monkeypatch)
    for (name, _, _), mine, theirs in zip(CASES, direct[:-1], generic[:-1], strict=True):
        assert mine == theirs, name
        assert mine[-1], name  # a request id on every answer
        assert mine[0] < 500, name  # bad input is a clear 4xx, never a 500
    assert direct[-1] == generic[-1] and len(direct[-1]) >= 5  # /metrics: the same counts under the route's label
    statuses = {name: a[0] for (name, _, _), a in zip(CASES, direct[:-1], strict=True)}
    assert statuses["a chat, persona injected"] == 200 and direct[0][2] == "1"
    assert statuses["no key"] == 401 and statuses["text/plain"] == 415 and statuses["pinned, body names another"] == 403
    assert statuses["tenant header too long"] == 400 and statuses["a bad role"] == 400
    sent = json.loads(direct[0][3]["choices"][0]["message"]["content"])
    assert sent["messages"][0]["role"] == "system" and "short answers" in sent["messages"][0]["content"]


def test_the_chat_route_is_the_direct_one() -> None:
    routes = [r for r in openai_routes.router(api_models()).routes if getattr(r, "path", None) == "/v1/chat/completions"]
    assert len(routes) == 1 and type(routes[0]).__name__ == "ChatRoute"


async def test_a_chat_skips_fastapis_own_layers_and_votes_still_do(upstream: str, tmp_path: Any) -> None:
    """Both hot routes are answered past FastAPI's and Starlette's layers (``ProxyApp.serve_directly``): with
    those layers broken a chat and a vote are still answered, with request ids and metrics; anything else
    goes through them (and fails here)."""
    app = create_app(Settings(base_url=upstream, home=tmp_path),
                     ProxySettings(api_keys=f"acme:{KEY}", synthesis="off"), store=InMemoryStore())
    async with direct_only_client(app) as client:
        r = await client.post("/v1/chat/completions", headers=H, content=chat())
        assert r.status_code == 200 and r.headers["x-request-id"].startswith("req_")
        bad = await client.post("/v1/chat/completions", headers=H, content=chat(messages="hi"))
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_request"  # its handler
        assert (await client.post("/v1/chat/completions", headers={"Content-Type": "application/json"},
                                  content=chat())).status_code == 401
        vote = {"user_id": ANA, "context": "q", "chosen": "a", "rejected": "b"}
        assert (await client.post("/v1/votes", headers=H, content=json.dumps(vote).encode())).status_code == 200
        assert (await client.get("/v1/models", headers=H)).status_code == 500  # not served directly
        label = 'route="/v1/chat/completions"'
        counted = [ln for ln in app.state.proxy.metrics.render().decode().splitlines()
                   if ln.startswith("synth_proxy_requests_total") and label in ln]
        assert any('status="200"' in ln and ln.endswith(" 1.0") for ln in counted), counted
