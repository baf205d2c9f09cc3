"""``POST /v1/votes`` solves its dependencies directly: it must answer exactly as FastAPI's own solver would.

The route's handler (:class:`synth_agent.proxy.routes.votes` ``VotesRoute``) skips FastAPI's
generic per-request machinery for speed. Here the same requests go to two apps, one with that
route and one where the route is a plain ``APIRoute`` (FastAPI solving the same declaration),
and every answer — status, headers that matter, body (request ids aside) — must be the same:
auth, tenant and user pinning, media type, header limits, body validation and the error order.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from fastapi.routing import APIRoute
from langgraph.store.memory import InMemoryStore

try:
    from tests.direct_client import direct_only_client
except ImportError:  # run from inside tests/
    from direct_client import direct_only_client  # type: ignore[no-redef]
from synth_agent.config import Settings
from synth_agent.proxy import ProxySettings, create_app
from synth_agent.proxy.routes import votes as votes_routes
from synth_agent.proxy.schemas import api_models

KEY, OTHER = "sk-acme-1", "sk-beta-1"
H = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}


def vote(user: str | None = "ana@example.com", **kw: Any) -> dict[str, Any]:
    v = {"user_id": user, "context": "Name a fruit.", "chosen": "Apple.", "rejected": "Stone.", **kw}
    return {k: x for k, x in v.items() if x is not None}


CASES: list[tuple[str, dict[str, Any], bytes | None]] = [
    ("one vote", H, json.dumps(vote()).encode()),
    ("a list", H, json.dumps([vote(id="l-1"), vote(id="l-2", chosen="Pear.")]).encode()),
    ("a batch", H, json.dumps({"votes": [vote(id="b-1")]}).encode()),
    ("again: duplicates", H, json.dumps({"votes": [vote(id="b-1")]}).encode()),
    ("no key", {"Content-Type": "application/json"}, json.dumps(vote()).encode()),
    ("a wrong key", {**H, "Authorization": "Bearer nope"}, json.dumps(vote()).encode()),
    ("x-api-key", {"X-API-Key": KEY, "Content-Type": "application/json"}, json.dumps(vote(id="k")).encode()),
    ("basic auth scheme", {**H, "Authorization": "Basic abc"}, json.dumps(vote()).encode()),
    ("another tenant's key named", {**H, "X-Synth-Tenant": "beta"}, json.dumps(vote()).encode()),
    ("its own tenant named", {**H, "X-Synth-Tenant": "acme"}, json.dumps(vote(id="t")).encode()),
    ("tenant header too long", {**H, "X-Synth-Tenant": "t" * 257}, json.dumps(vote()).encode()),
    ("tenant header too long, bad body", {**H, "X-Synth-Tenant": "t" * 257}, b'{"votes": []}'),
    ("tenant header too long, no key", {"X-Synth-Tenant": "t" * 257, "Content-Type": "application/json"},
     json.dumps(vote()).encode()),
    ("user header too long", {**H, "X-Synth-User": "u" * 2049}, json.dumps(vote(None)).encode()),
    ("both headers too long", {**H, "X-Synth-Tenant": "t" * 300, "X-Synth-User": "u" * 3000}, b"[]"),
    ("pinned user", {**H, "X-Synth-User": quote("zoë@example.com", safe="")}, json.dumps(vote(None)).encode()),
    ("pinned, body names another", {**H, "X-Synth-User": "bob"}, json.dumps(vote("eve")).encode()),
    ("pin not ASCII", {**H, "X-Synth-User": "zoë".encode()}, json.dumps(vote(None)).encode()),
    ("pin not UTF-8", {**H, "X-Synth-User": "%FF"}, json.dumps(vote(None)).encode()),
    ("pin invisible", {**H, "X-Synth-User": "a%E2%80%8B"}, json.dumps(vote(None)).encode()),
    ("no user at all", H, json.dumps(vote(None)).encode()),
    ("text/plain", {**H, "Content-Type": "text/plain"}, json.dumps(vote()).encode()),
    ("no content type", {"Authorization": f"Bearer {KEY}"}, json.dumps(vote()).encode()),
    ("+json content type", {**H, "Content-Type": "application/vnd.x+json"}, json.dumps(vote()).encode()),
    ("empty body", H, None),
    ("null body", H, b"null"),
    ("a string", H, b'"vote"'),
    ("a number", H, b"5"),
    ("an empty list", H, b"[]"),
    ("an empty batch", H, b'{"votes": []}'),
    ("an unknown field", H, json.dumps({**vote(), "choosen": "x"}).encode()),
    ("a wrong type", H, json.dumps(vote(chosen=5)).encode()),
    ("identical answers", H, json.dumps(vote(chosen="Same.", rejected="Same.")).encode()),
    ("a bad timestamp", H, json.dumps(vote(timestamp="10000-01-01T00:00:00Z")).encode()),
    ("a negative timestamp", H, json.dumps(vote(timestamp=-1)).encode()),
    ("a lone surrogate in an id", H, b'{"user_id": "a", "id": "x\\ud800", "context": "q", "chosen": "a", '
     b'"rejected": "b"}'),
    ("an invisible user id", H, json.dumps(vote("a\u200b")).encode()),
    ("one bad vote in a batch", H, json.dumps({"votes": [vote(id="ok-1"), vote(chosen="")]}).encode()),
    ("too many votes", H, json.dumps([vote(id=f"m-{i}") for i in range(1001)]).encode()),
    ("not JSON", H, b"{"),
]


async def _answers(route_class: Any, tmp: Any, monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    if route_class is not None:
        monkeypatch.setattr(votes_routes, "_votes_route", lambda _adapter: route_class)
    app = create_app(Settings(home=tmp), ProxySettings(api_keys=f"acme:{KEY},beta:{OTHER}", synthesis="off"),
                     store=InMemoryStore())
    monkeypatch.undo()
    out: list[tuple[Any, ...]] = []
    async with app.router.lifespan_context(app):  # type: ignore[attr-defined]
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            for _, headers, body in CASES:
                r = await client.post("/v1/votes", headers=headers, content=body)
                payload = r.json()
                payload.pop("request_id", None)
                out.append((r.status_code, r.headers.get("www-authenticate"), r.headers.get("retry-after"), payload,
                            sorted(r.headers.keys()), r.headers.get("content-type"),
                            r.headers.get("x-request-id", "").startswith("req_")))
            metrics = (await client.get("/metrics", headers=H)).text
            out.append(tuple(line for line in metrics.splitlines()
                             if line.startswith("synth_proxy_requests_total") and "/v1/votes" in line))
    return out


@pytest.fixture
async def answers(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[list[Any], list[Any]]]:
    direct = await _answers(None, tmp_path / "direct", monkeypatch)
    generic = await _answers(APIRoute, tmp_path / "generic", monkeypatch)
    yield direct, generic


async def test_the_vote_route_answers_as_fastapis_solver_would(answers: tuple[list[Any], list[Any]]) -> None:
    direct, generic = answers
    for (name, _, _), mine, theirs in zip(CASES, direct[:-1], generic[:-1], strict=True):
        assert mine == theirs, name
        assert mine[-1], name  # a request id on every answer
    assert direct[-1] == generic[-1] and len(direct[-1]) >= 5  # /metrics: the same counts under the route's label
    statuses = {name: a[0] for (name, _, _), a in zip(CASES, direct[:-1], strict=True)}
    assert statuses["one vote"] == 200 and statuses["no key"] == 401 and statuses["text/plain"] == 415
    assert statuses["tenant header too long"] == 400 and statuses["pinned, body names another"] == 403
    assert direct[3][3]["duplicates"] == 1  # the second batch stored nothing new


def test_the_vote_route_is_the_direct_one() -> None:
    routes = [r for r in votes_routes.router(api_models()).routes if getattr(r, "path", None) == "/v1/votes"]
    assert len(routes) == 1 and type(routes[0]).__name__ == "VotesRoute"


async def test_a_vote_write_skips_fastapis_own_layers(tmp_path: Any) -> None:
    """The app answers ``POST /v1/votes`` past FastAPI's and Starlette's layers (``ProxyApp.serve_directly``):
    with those layers broken, a vote is still stored and answered with its request id and metrics; any
    other request goes through them (and fails here)."""
    app = create_app(Settings(home=tmp_path), ProxySettings(api_keys=f"acme:{KEY}", synthesis="off"),
                     store=InMemoryStore())
    async with direct_only_client(app) as client:
        r = await client.post("/v1/votes", headers=H, content=json.dumps(vote(id="d-1")).encode())
        assert r.status_code == 200 and r.json()["added"] == 1
        assert r.headers["x-request-id"].startswith("req_")
        bad = await client.post("/v1/votes", headers=H, content=json.dumps(vote(chosen=5)).encode())
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_request"  # its handler
        assert (await client.post("/v1/votes", headers=H, content=b"{")).status_code == 400
        assert (await client.post("/v1/votes", headers={"Content-Type": "application/json"},
                                  content=json.dumps(vote()).encode())).status_code == 401
        assert (await client.get("/v1/votes", headers=H)).status_code == 500  # not served directly
        label = 'route="/v1/votes"'
        counted = [ln for ln in app.state.proxy.metrics.render().decode().splitlines()
                   if ln.startswith("synth_proxy_requests_total") and label in ln]
        assert any('status="200"' in ln and ln.endswith(" 1.0") for ln in counted), counted
        assert any('status="400"' in ln and ln.endswith(" 1.0") for ln in counted), counted  # "{": before routing, unmatched

# A body vote that ``VoteIn`` checked is not validated again (``_checked_vote``): the same ``Vote``
# as ``parse_vote`` gives, or the ``parse_vote`` path (its refusals, in its words) for the rest.
SHAPES: list[dict[str, Any]] = [
    vote(id="s-1"),
    vote(),  # no id: the content hash
    vote(id="s-2", rejected=""),  # one answer may be empty
    vote(id="s-3", timestamp="2025-01-01T10:00:00+02:00", split="val"),
    vote(id="s-4", timestamp=1735725600),
    vote(id="s-5", timestamp=1735725600123.5),  # milliseconds
    vote(id="s-6", context="zoë \u00e9\u4e2d \U0001F600", chosen="  Apple.  ", rejected="\tStone."),
    vote("zoë@example.com", id="s-7"),
]
REFUSED: list[dict[str, Any]] = [
    vote(chosen="Same.", rejected=" Same. "),  # identical once stripped
    vote(chosen=" ", rejected=""),  # both empty
    vote(context="   "),  # no text in the context
]
OTHER_SHAPES: list[dict[str, Any]] = [
    vote(id=7),
    vote(context=[{"role": "human", "content": "Name a fruit."}]),
    vote(chosen={"role": "model", "content": "Apple."}),
    vote(chosen=[{"role": "user", "content": "?"}, {"role": "bot", "content": "Apple."}]),
    vote(chosen={"role": "user", "content": "Apple."}),  # refused by Vote: not an assistant answer
]


@pytest.mark.parametrize("body", SHAPES)
def test_a_checked_text_vote_is_the_vote_parse_vote_builds(body: dict[str, Any]) -> None:
    item = votes_routes_adapter().validate_python(body)
    fast = votes_routes._checked_vote(item, item.user_id)
    slow = votes_routes.parse_vote(item.model_dump(exclude_none=True))
    assert fast is not None
    assert fast.model_dump() == slow.model_dump() and fast.model_dump_json() == slow.model_dump_json()
    assert fast.query_text == slow.query_text


@pytest.mark.parametrize("body", REFUSED + OTHER_SHAPES)
def test_refused_votes_and_other_shapes_go_through_parse_vote(body: dict[str, Any]) -> None:
    item = votes_routes_adapter().validate_python(body)
    assert votes_routes._checked_vote(item, item.user_id) is None


def votes_routes_adapter() -> Any:
    from pydantic import TypeAdapter

    return TypeAdapter(api_models().VoteIn)


async def test_a_text_vote_is_validated_once_and_the_others_as_before(tmp_path: Any, monkeypatch: Any) -> None:
    """The route stores a text vote without a second validation (``parse_vote`` is not called) and still
    refuses a bad one with parse_vote's 400; a vote of messages goes through ``parse_vote``."""
    calls: list[Any] = []
    real = votes_routes.parse_vote

    def counting(data: Any, **kw: Any) -> Any:
        calls.append(data)
        return real(data, **kw)

    monkeypatch.setattr(votes_routes, "parse_vote", counting)
    app = create_app(Settings(home=tmp_path), ProxySettings(api_keys=f"acme:{KEY}", synthesis="off"),
                     store=InMemoryStore())
    async with app.router.lifespan_context(app):  # type: ignore[attr-defined]
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            r = await client.post("/v1/votes", headers=H, content=json.dumps([vote(id="o-1"), vote()]).encode())
            assert r.status_code == 200 and r.json()["added"] == 2 and calls == []
            bad = await client.post("/v1/votes", headers=H, content=json.dumps(
                vote(id="o-2", chosen="Same.", rejected="Same.")).encode())
            assert bad.status_code == 400 and "identical" in bad.json()["error"]["message"] and len(calls) == 1
            msgs = await client.post("/v1/votes", headers=H, content=json.dumps(
                vote(id="o-3", chosen={"role": "model", "content": "Apple."})).encode())
            assert msgs.status_code == 200 and msgs.json()["added"] == 1 and len(calls) == 2
            memory = app.state.proxy.memories("acme")
            stored = {v.id: v for v in await memory.list_votes("ana@example.com")}
            assert set(stored) >= {"o-1", "o-3"} and "o-2" not in stored
            assert stored["o-1"].context[0].content == "Name a fruit." and stored["o-3"].chosen == "Apple."
