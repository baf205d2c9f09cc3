"""Hostile input against the proxy, served for real (uvicorn, real sockets, embedded Chroma with MiniLM).

One test per row of the hardening table (issue 11), plus the validation rules that keep a
backend from ever seeing what it cannot store (issue 10, item 1). Every rejected request is
checked to leave the stored state as it was: votes, persona versions and pending A/B pairs of
the users involved, counted before and after.
"""

from __future__ import annotations

import http.client
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from graphs.chat import pending_namespace
from store.chroma import ChromaStore
from store.embeddings import LazyMiniLMEmbeddings
from synth_agent.config import Settings
from synth_agent.llm.client import EndpointConfig, LLMClient
from synth_agent.models import PersonaProfile
from synth_agent.proxy import ProxyServer, ProxySettings, ProxyState, create_app
from synth_agent.sim.server import SimEndpoint

KEY = "sk-hard-1"
H = {"Authorization": f"Bearer {KEY}"}
MSGS = [{"role": "user", "content": "How do I start learning Python?"}]
VICTIM, ATTACKER = "victim@example.com", "attacker@example.com"


def vote(user: str | None = "ana@example.com", **kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"context": [{"role": "user", "content": "Name a fruit."}], "chosen": "Apple.",
                            "rejected": "A brick."}
    if user is not None:
        base["user_id"] = user
    return {**base, **kw}


@dataclass
class World:
    sim: SimEndpoint
    srv: ProxyServer
    state: ProxyState
    store: ChromaStore

    @property
    def url(self) -> str:
        return self.srv.base_url

    def snapshot(self, *users: str) -> list[tuple[int, int, int]]:
        """(votes, persona versions, pending A/B pairs) per user: what a rejected request must not change."""
        mem = self.state.memories("acme")  # type: ignore[misc]

        async def go() -> list[tuple[int, int, int]]:
            out = []
            for u in users:
                pending = await mem.store.asearch(pending_namespace("acme", u), limit=1000)
                out.append((await mem.count_votes(u), len(await mem.persona_history(u)), len(pending)))
            return out

        return self.srv.call(go())

    def items(self) -> int:
        return self.store.count()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    home = tmp_path_factory.mktemp("hard-home")
    with SimEndpoint() as sim:
        store = ChromaStore(path=home / "chroma", embedding_function=LazyMiniLMEmbeddings())
        llm = LLMClient(EndpointConfig(base_url=sim.base_url))
        app = create_app(
            Settings(base_url=sim.base_url, home=home),
            ProxySettings(api_keys=f"acme:{KEY}", synthesis="off", default_model="sim", key_rate_limit=0,
                          auth_failure_burst=10_000),
            store=store, llm=llm,
        )
        with ProxyServer(app, close=[llm]) as srv:  # an injected client is the caller's to close
            state: ProxyState = app.state.proxy
            srv.call(state.memories("acme").save_persona(  # type: ignore[misc]
                PersonaProfile(user_id=VICTIM, persona="The user prefers short answers.")))
            yield World(sim, srv, state, store)


def is_error(r: httpx.Response, status: int, code: str | None = None) -> bool:
    body = r.json()
    err = body.get("error")
    ok = (r.status_code == status and isinstance(err, dict) and set(err) == {"message", "type", "param", "code"}
          and bool(err["message"]) and body.get("request_id") == r.headers.get("x-request-id"))
    return ok and (code is None or err["code"] == code)


def post(w: World, path: str, body: Any = None, *, content: bytes | None = None, headers: dict[str, str] | None = None,
         timeout: float = 60) -> httpx.Response:
    hdrs = {**H, **(headers or {})}
    if content is not None:
        return httpx.post(w.url + path, content=content, headers={"Content-Type": "application/json", **hdrs},
                          timeout=timeout)
    return httpx.post(w.url + path, json=body, headers=hdrs, timeout=timeout)


# ------------------------------------------------------------------ the table, row by row


@pytest.mark.parametrize("ts", [1e20, -1e20, -1, 253402300800000, "0001-01-01T00:00:00Z", "1969-12-31T23:59:59Z",
                                "9999-12-31T23:00:00-05:00"])
def test_timestamps_outside_1970_9999_are_400(world: World, ts: Any) -> None:
    before = world.items()
    r = post(world, "/votes", vote(timestamp=ts))
    assert is_error(r, 400), r.text
    assert "timestamp" in r.json()["error"]["message"]
    assert world.items() == before


@pytest.mark.parametrize("shape", ["array", "object"])
def test_json_nested_100000_deep_is_400_before_parsing(world: World, shape: str) -> None:
    depth = 100_000
    if shape == "array":
        body = b'{"model": "sim", "messages": ' + b"[" * depth + b"]" * depth + b"}"
    else:
        body = b'{"model": "sim", "messages": [], "x": ' + b'{"a":' * depth + b"1" + b"}" * depth + b"}"
    for path in ("/chat/completions", "/votes", "/ab"):
        r = post(world, path, content=body)
        assert is_error(r, 400, "invalid_json") and "nested deeper than" in r.json()["error"]["message"], r.text
    assert httpx.get(f"{world.srv.url}/healthz").status_code == 200


def test_lone_surrogates_are_400_everywhere_and_store_nothing(world: World) -> None:
    lone = b'"x\\ud800y"'  # a JSON escape that decodes to a lone surrogate
    msgs = b'[{"role": "user", "content": ' + lone + b"}]"
    user = "surrogate@example.com"
    before = world.snapshot(user)
    cases = [
        ("/chat/completions", b'{"model": "sim", "messages": ' + msgs + b"}"),
        ("/ab", b'{"user": "' + user.encode() + b'", "messages": ' + msgs + b"}"),
        ("/votes", b'{"user_id": "' + user.encode() + b'", "id": ' + lone + b', "context": "q", "chosen": "a", '
                   b'"rejected": "b"}'),
        ("/votes", b'{"user_id": ' + lone + b', "context": "q", "chosen": "a", "rejected": "b"}'),
        ("/judge", b'{"user": "u", "messages": [{"role": "user", "content": "q"}], "a": ' + lone + b', "b": "z"}'),
        ("/chat/completions", b'{"model": "sim", "messages": [{"role": "user", "content": "q"}], '
                              b'"metadata": {' + lone + b': "v"}}'),
    ]
    for path, body in cases:
        r = post(world, path, content=body)
        assert is_error(r, 400, "invalid_json") and "not valid Unicode" in r.json()["error"]["message"], (path, r.text)
    assert world.snapshot(user) == before


def test_one_poison_vote_in_600_stores_nothing(world: World) -> None:
    user = "batch@example.com"
    votes = [vote(user, id=f"b-{i}", chosen=f"Answer {i}.") for i in range(600)]
    body = json.dumps({"votes": votes}).replace('"b-300"', '"b-\\ud800"').encode()
    before = world.items()
    r = post(world, "/votes", content=body)
    assert is_error(r, 400), r.text
    assert world.items() == before and world.snapshot(user) == [(0, 0, 0)]
    r = post(world, "/votes", {"votes": votes[:5]})
    assert r.status_code == 200 and r.json()["added"] == 5  # the same batch without the poison goes through


@pytest.mark.parametrize("seed", ["NaN", "Infinity", "-Infinity", '"abc"', "[1]", "1e400", "1.5", "true",
                                  "99999999999999999999"])
@pytest.mark.parametrize("path", ["/ab", "/rerank"])
def test_bad_seeds_are_400(world: World, path: str, seed: str) -> None:
    user = "seed@example.com"
    before = world.snapshot(user)
    completions = world.sim.stats()["completions"]
    body = f'{{"user": "{user}", "messages": {json.dumps(MSGS)}, "seed": {seed}}}'.encode()
    r = post(world, path, content=body)
    assert is_error(r, 400), r.text
    assert world.snapshot(user) == before
    assert world.sim.stats()["completions"] == completions  # nothing reached the upstream


def test_oversize_answers_and_candidates_are_refused(world: World) -> None:
    big = "x" * 400_000
    r = post(world, "/judge", {"user": "u@x.org", "messages": MSGS, "a": big, "b": "short"})
    assert is_error(r, 400) and "at most 32000 characters" in r.json()["error"]["message"], r.text
    r = post(world, "/rerank", {"user": "u@x.org", "messages": MSGS, "candidates": ["y" * 300_000, "z" * 300_000]})
    assert is_error(r, 400) and "at most 32000 characters" in r.json()["error"]["message"], r.text
    r = post(world, "/rerank", {"user": "u@x.org", "messages": MSGS, "candidates": ["y" * 600_000, "z" * 600_000]})
    assert is_error(r, 413, "body_too_large")
    r = post(world, "/votes", vote(chosen="c" * 32_001))
    assert is_error(r, 400)


def test_x_synth_user_pins_the_user_on_every_route(world: World) -> None:
    pin = {"X-Synth-User": quote(VICTIM, safe="")}
    before = world.snapshot(VICTIM, ATTACKER)
    attempts = [
        ("/votes", vote(ATTACKER)),
        ("/votes", {"votes": [vote(None), vote(ATTACKER)]}),
        ("/chat/completions", {"model": "sim", "messages": MSGS, "user": ATTACKER}),
        ("/ab", {"user": ATTACKER, "messages": MSGS}),
        ("/ab/some-token/vote", {"user": ATTACKER, "choice": "a"}),
        ("/rerank", {"user": ATTACKER, "messages": MSGS, "candidates": ["a", "b"]}),
        ("/judge", {"user": ATTACKER, "messages": MSGS, "a": "a", "b": "b"}),
    ]
    for path, body in attempts:
        r = post(world, path, body, headers=pin)
        assert is_error(r, 403, "user_mismatch"), (path, r.text)
    seg = quote(ATTACKER, safe="")
    for method, path in [("GET", f"/users/{seg}/persona"), ("GET", f"/users/{seg}/persona/history"),
                         ("GET", f"/users/{seg}/prompt"), ("DELETE", f"/users/{seg}")]:
        r = httpx.request(method, world.url + path, headers={**H, **pin})
        assert is_error(r, 403, "user_mismatch"), (path, r.text)
    assert world.snapshot(VICTIM, ATTACKER) == before
    # with the pin, a vote without user_id (or naming the pinned user) is stored under the pinned user
    r = post(world, "/votes", vote(None), headers=pin)
    assert r.status_code == 200 and r.json()["users"] == [VICTIM]
    assert world.snapshot(VICTIM)[0][0] == before[0][0] + 1
    assert httpx.get(f"{world.url}/users/{quote(VICTIM, safe='')}/persona", headers={**H, **pin}).status_code == 200


def test_failed_auth_is_throttled_per_client_address(tmp_path: Path) -> None:
    from langgraph.store.memory import InMemoryStore

    llm = LLMClient(EndpointConfig(base_url="http://127.0.0.1:9/v1"))
    app = create_app(Settings(base_url="http://127.0.0.1:9/v1", home=tmp_path),
                     ProxySettings(api_keys=f"acme:{KEY}", synthesis="off", auth_failure_burst=20,
                                   auth_failure_rate=0.01),  # no refill while the test runs
                     store=InMemoryStore(), llm=llm)
    with ProxyServer(app, close=[llm]) as srv, httpx.Client(base_url=srv.base_url, timeout=10) as c:
        statuses = [c.get("/users/u/persona/history", headers={"Authorization": f"Bearer sk-guess-{i}"}).status_code
                    for i in range(300)]
        assert statuses[:20] == [401] * 20 and set(statuses[20:]) == {429}
        r = c.get("/users/u/persona/history", headers={"Authorization": "Bearer sk-guess-x"})
        assert is_error(r, 429, "auth_throttled") and int(r.headers["retry-after"]) >= 1
        # while throttled, even a right key from this address waits: guessing right earns nothing
        assert c.get("/users/u/persona/history", headers=H).status_code == 429
        assert httpx.get(f"{srv.url}/healthz").status_code == 200  # no key needed, not throttled
        assert "synth_proxy_rate_limited_total" in httpx.get(f"{srv.url}/metrics").text
        # another client address is not affected (the throttle is keyed by address)
        state: ProxyState = app.state.proxy
        assert state.throttle.retry_after("10.1.2.3") is None and state.throttle.retry_after("127.0.0.1")


def test_redeeming_a_used_ab_token_is_409(world: World) -> None:
    user = "ab.once@example.com"
    pair = post(world, "/ab", {"user": user, "messages": MSGS}).json()
    assert pair["token"]
    assert post(world, f"/ab/{pair['token']}/vote", {"user": user, "choice": "a"}).status_code == 200
    before = world.snapshot(user)
    again = post(world, f"/ab/{pair['token']}/vote", {"user": user, "choice": "b"})
    assert is_error(again, 409, "vote_token_used"), again.text
    other = post(world, f"/ab/{pair['token']}/vote", {"user": "someone.else@example.com", "choice": "b"})
    assert is_error(other, 404, "vote_token")  # another user learns nothing about the token
    assert is_error(post(world, "/ab/no-such-token/vote", {"user": user, "choice": "a"}), 404)
    assert world.snapshot(user) == before


@pytest.mark.parametrize("bad", ["admin\u200b", "\u202eadmin", "ad\u2060min", "\ufeffadmin", "a\u2028b", " padded",
                                 "ctl\x07"])
def test_invisible_and_control_characters_in_user_ids_are_400_everywhere(world: World, bad: str) -> None:
    base = "".join(ch for ch in bad if ch.isalnum())  # the look-alike it imitates
    before = world.snapshot(base)
    for path, body in [("/votes", vote(bad)), ("/chat/completions", {"model": "sim", "messages": MSGS, "user": bad}),
                       ("/ab", {"user": bad, "messages": MSGS}),
                       ("/judge", {"user": bad, "messages": MSGS, "a": "a", "b": "b"})]:
        r = post(world, path, body)
        assert is_error(r, 400), (path, r.text)
    r = post(world, "/ab", {"messages": MSGS}, headers={"X-Synth-User": quote(bad, safe="")})
    assert is_error(r, 400, "invalid_user")
    r = httpx.get(f"{world.url}/users/{quote(bad, safe='')}/persona/history", headers=H)
    assert is_error(r, 400, "invalid_user")
    assert world.snapshot(base) == before


def test_invalid_percent_encoding_in_paths_is_400(world: World) -> None:
    for path in ("/users/%FF/persona", "/users/a%C3/persona/history", "/users/%ED%A0%80", "/users/%C0%AF/prompt"):
        r = httpx.request("DELETE" if path.count("/") == 2 else "GET", world.url + path, headers=H)
        assert is_error(r, 400), (path, r.text)
    # a '/' inside an id is one encoded segment, never a sub-resource: DELETE .../x/persona is not "forget x/persona"
    r = httpx.delete(f"{world.url}/users/{quote(VICTIM, safe='')}/persona", headers=H)
    assert r.status_code == 405
    assert world.snapshot(VICTIM)[0][1] == 1


# ------------------------------------------------------------------ a 500 is answered, logged, and survivable


def test_an_unexpected_error_is_a_500_with_a_request_id_and_the_connection_survives(
    world: World, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    memories = world.state.memories
    assert memories is not None

    async def broken(*_: Any, **__: Any) -> Any:
        raise RuntimeError("disk on fire: /secret/path/chroma.sqlite3")

    monkeypatch.setattr(memories("acme"), "add_votes", broken)
    host, port = world.srv.host, world.srv.port
    conn = http.client.HTTPConnection(host, port, timeout=30)
    body = json.dumps(vote("boom@example.com"))
    with caplog.at_level(logging.ERROR, logger="synth_agent.proxy"):
        conn.request("POST", "/v1/votes", body=body, headers={**H, "Content-Type": "application/json",
                                                              "X-Request-ID": "client-req-42"})
        resp = conn.getresponse()
        payload = json.loads(resp.read())
    sock = conn.sock
    assert resp.status == 500 and resp.getheader("connection") != "close"
    assert payload["error"]["code"] == "internal_error" and payload["request_id"] == "client-req-42"
    assert resp.getheader("x-request-id") == "client-req-42" and "client-req-42" in payload["error"]["message"]
    text = json.dumps(payload)
    assert "Traceback" not in text and "disk on fire" not in text and "/secret" not in text
    assert any("client-req-42" in r.getMessage() and r.exc_info for r in caplog.records)
    # the same keep-alive connection answers the next request
    conn.request("GET", "/healthz")
    nxt = conn.getresponse()
    assert nxt.status == 200 and json.loads(nxt.read())["status"] == "ok" and conn.sock is sock
    conn.close()
    # a request id from a client that is not a plain token is replaced, never echoed into a header
    r = httpx.get(f"{world.srv.url}/healthz", headers={"X-Request-ID": "bad id; with=stuff"})
    assert r.headers["x-request-id"].startswith("req_")


# ------------------------------------------------------------------ more attacks beyond the table


def test_nan_infinity_huge_numbers_and_duplicate_keys_anywhere_are_400(world: World) -> None:
    before = world.items()
    cases = [
        ("/chat/completions", b'{"model": "sim", "messages": [{"role": "user", "content": "q"}], "temperature": NaN}'),
        ("/chat/completions", b'{"model": "sim", "messages": [{"role": "user", "content": "q"}], "x": [Infinity]}'),
        ("/chat/completions", b'{"model": "sim", "messages": [{"role": "user", "content": "q"}], "x": 1e999}'),
        ("/votes", b'{"user_id": "a", "context": "q", "chosen": "a", "rejected": "b", "timestamp": 1' + b"0" * 5000
                   + b"}"),
        ("/votes", b'{"user_id": "a", "user_id": "b", "context": "q", "chosen": "a", "rejected": "b"}'),
        ("/judge", b'{"user": "u", "messages": [{"role": "user", "content": "q"}], "a": "x", "b": "y", "a": "z"}'),
        ("/votes", b'\xff\xfe{"user_id": "a"}'),
        ("/votes", b'{"user_id": "a", "context": "q", "chosen": "a", "rejected": "b"} trailing'),
    ]
    for path, body in cases:
        r = post(world, path, content=body)
        assert is_error(r, 400, "invalid_json"), (path, body[:60], r.text)
    assert world.items() == before


def test_wrong_types_and_unknown_fields_are_400_with_the_field_named(world: World) -> None:
    before = world.items()
    cases = [
        ("/votes", vote(chosen=5), "chosen"),
        ("/votes", vote(context=[{"role": "wizard", "content": "q"}]), "role"),
        ("/votes", {**vote(), "choosen": "typo"}, "choosen"),
        ("/votes", vote(split="holdout"), "split"),
        ("/ab", {"user": "u", "messages": "hi"}, "messages"),
        ("/ab", {"user": "u", "messages": MSGS, "temperature": "hot"}, "temperature"),
        ("/ab/t/vote", {"user": "u", "choice": 0}, "choice"),
        ("/rerank", {"user": "u", "messages": MSGS, "candidates": ["only one"]}, "candidates"),
        ("/rerank", {"user": "u", "messages": MSGS, "candidates": ["a", "   "]}, "candidates"),
        ("/rerank", {"user": "u", "messages": MSGS, "n": 99}, "n"),
        ("/chat/completions", {"model": "sim", "messages": MSGS, "stream": "yes"}, "stream"),
        ("/chat/completions", {"model": "sim", "messages": [], "user": "u"}, "messages"),
        ("/judge", {"user": "u", "messages": MSGS, "a": "", "b": "  "}, "both empty"),
        ("/judge", {"user": "u", "messages": [{"role": "assistant", "content": "hi"}], "a": "x", "b": "y"},
         "no user message"),
    ]
    for path, body, needle in cases:
        r = post(world, path, body)
        assert is_error(r, 400), (path, r.text)
        assert needle in r.json()["error"]["message"], (path, r.json()["error"]["message"])
    assert world.items() == before


def test_header_injection_and_oversize_headers_do_not_leak_or_crash(world: World) -> None:
    r = post(world, "/ab", {"messages": MSGS}, headers={"X-Synth-User": quote("a\r\nX-Evil: 1", safe="")})
    assert is_error(r, 400, "invalid_user") and "x-evil" not in r.headers
    r = post(world, "/ab", {"messages": MSGS}, headers={"X-Synth-User": "%E0%A4%A"})
    assert is_error(r, 400, "invalid_user")
    r = post(world, "/ab", {"messages": MSGS}, headers={"X-Synth-User": "u" * 5000})
    assert is_error(r, 400)
    # a raw (not percent-encoded) UTF-8 id would be read as latin-1 mojibake, i.e. another user: refused
    r = httpx.post(world.url + "/ab", json={"messages": MSGS},
                   headers=[("Authorization", f"Bearer {KEY}"), ("X-Synth-User", "zoë@example.com".encode())])
    assert is_error(r, 400, "invalid_user") and "percent-encoded" in r.json()["error"]["message"]
    r = post(world, "/judge", {"user": "u", "messages": MSGS, "a": "x", "b": "y"},
             headers={"X-Synth-Tenant": "t" * 5000})
    assert r.status_code == 400


def test_an_empty_answer_is_accepted_on_one_side_and_judged(world: World) -> None:
    user = "empty.side@example.com"
    r = post(world, "/votes", {"votes": [vote(user, rejected=""), vote(user, chosen="", rejected="Something.")]})
    assert r.status_code == 200 and r.json()["added"] == 2, r.text
    assert is_error(post(world, "/votes", vote(user, chosen="", rejected=" ")), 400)
    assert is_error(post(world, "/votes", vote(user, chosen="Same.", rejected="Same.")), 400)
    assert is_error(post(world, "/votes", {k: v for k, v in vote(user).items() if k != "rejected"}), 400)
    j = post(world, "/judge", {"user": user, "messages": MSGS, "a": "", "b": "Start with the official tutorial."})
    assert j.status_code == 200 and j.json()["preferred"] in ("A", "B", "tie"), j.text


def test_the_openapi_schema_describes_every_body(world: World) -> None:
    spec = httpx.get(f"{world.srv.url}/openapi.json").json()
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            assert "422" not in op["responses"], (method, path)  # validation errors are 400s here
            if method == "post":
                schema = op["requestBody"]["content"]["application/json"]["schema"]
                assert schema.get("$ref") or schema.get("oneOf"), (path, schema)  # a model, not "any object"
            ok = op["responses"]["200"]
            assert ok.get("content"), (method, path)
            if path.startswith("/v1/"):
                assert op["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith(
                    "ErrorResponse")
    comps = spec["components"]["schemas"]
    assert comps["JudgeRequest"]["properties"]["a"]["maxLength"] == 32_000
    assert comps["ChatCompletionRequest"]["properties"]["messages"]["maxItems"] == 256
