"""Tenancy, auth, rate limits and input validation of the proxy: every bad request is a clear 4xx
that changes nothing, and no key of one tenant reaches another tenant's users, on any route."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from langgraph.store.memory import InMemoryStore

from graphs.chat import pending_namespace
from synth_agent.config import Settings
from synth_agent.llm.client import EndpointConfig, LLMClient
from synth_agent.models import PersonaProfile
from synth_agent.proxy import KeyRing, ProxyServer, ProxySettings, ProxyState, create_app, hash_key
from synth_agent.proxy.auth import TokenBucket
from synth_agent.sim.population import Population, vote_to_json
from synth_agent.sim.server import SimEndpoint

KEY_A, KEY_B = "sk-tenant-a", "sk-tenant-b"
BOB = "bob.smith/ops@b.example"  # tenant B's user
MSGS = [{"role": "user", "content": "How do I start learning Python?"}]


def a_vote(user: str, i: int = 0) -> dict[str, Any]:
    pop = Population(1, seed=11)
    return {**vote_to_json(pop.votes(pop.user_ids[0], i + 1)[i]), "user_id": user}


@dataclass
class World:
    sim: SimEndpoint
    srv: ProxyServer
    state: ProxyState
    bob_token: str

    def snapshot(self, tenant: str, user: str) -> tuple[int, int, int]:
        """(votes, persona versions, pending A/B pairs) of a user: what a foreign request must not change."""
        mem = self.state.memories(tenant)  # type: ignore[misc]

        async def go() -> tuple[int, int, int]:
            pending = await mem.store.asearch(pending_namespace(tenant, user), limit=100)
            return await mem.count_votes(user), len(await mem.persona_history(user)), len(pending)

        return self.srv.call(go())


def hdr(key: str | None = KEY_A, **extra: str) -> dict[str, str]:
    return {**({"Authorization": f"Bearer {key}"} if key else {}), **extra}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with SimEndpoint() as sim:
        llm = LLMClient(EndpointConfig(base_url=sim.base_url))
        app = create_app(
            Settings(base_url=sim.base_url, home=tmp_path_factory.mktemp("home")),
            ProxySettings(api_keys=f"tenant-a:{KEY_A},tenant-b:{KEY_B}", synthesis="off", max_body_bytes=64 * 1024,
                          max_messages=8, default_model="sim", auth_failure_burst=10_000),
            store=InMemoryStore(),
            llm=llm,
        )
        with ProxyServer(app, close=[llm]) as srv:
            state: ProxyState = app.state.proxy
            srv.call(state.memories("tenant-b").save_persona(  # type: ignore[misc]
                PersonaProfile(user_id=BOB, persona="The user strongly prefers bullet lists.")))
            assert httpx.post(f"{srv.base_url}/votes", json=a_vote(BOB), headers=hdr(KEY_B)).status_code == 200
            pair = httpx.post(f"{srv.base_url}/ab", json={"user": BOB, "messages": MSGS}, headers=hdr(KEY_B)).json()
            yield World(sim, srv, state, pair["token"])


BOB_SEG = quote(BOB, safe="")
# (name, method, path, json body); "{token}" is tenant B's open A/B token for BOB
ROUTES: list[tuple[str, str, str, Any]] = [
    ("chat", "POST", "/v1/chat/completions", {"model": "sim", "messages": MSGS, "user": BOB}),
    ("chat-stream", "POST", "/v1/chat/completions", {"model": "sim", "messages": MSGS, "user": BOB, "stream": True}),
    ("models", "GET", "/v1/models", None),
    ("votes", "POST", "/v1/votes", a_vote(BOB, 1)),
    ("ab", "POST", "/v1/ab", {"user": BOB, "messages": MSGS}),
    ("ab-vote", "POST", "/v1/ab/{token}/vote", {"user": BOB, "choice": "a"}),
    ("rerank", "POST", "/v1/rerank", {"user": BOB, "messages": MSGS, "candidates": ["- a\n- b", "plain text"]}),
    ("judge", "POST", "/v1/judge", {"user": BOB, "messages": MSGS, "a": "- a\n- b", "b": "plain text"}),
    ("votes-list", "GET", f"/v1/users/{BOB_SEG}/votes", None),
    ("persona", "GET", f"/v1/users/{BOB_SEG}/persona", None),
    ("history", "GET", f"/v1/users/{BOB_SEG}/persona/history", None),
    ("prompt", "GET", f"/v1/users/{BOB_SEG}/prompt?format=json", None),
    ("forget", "DELETE", f"/v1/users/{BOB_SEG}", None),
]
IDS = [r[0] for r in ROUTES]


def call(w: World, method: str, path: str, body: Any, headers: dict[str, str]) -> httpx.Response:
    url = w.srv.url + path.replace("{token}", w.bob_token)
    return httpx.request(method, url, json=body, headers=headers, timeout=60)


def is_openai_error(r: httpx.Response) -> bool:
    err = r.json().get("error")
    return isinstance(err, dict) and set(err) == {"message", "type", "param", "code"} and bool(err["message"])


@pytest.mark.parametrize(("name", "method", "path", "body"), ROUTES, ids=IDS)
def test_every_route_needs_a_valid_key(world: World, name: str, method: str, path: str, body: Any) -> None:
    before = world.snapshot("tenant-b", BOB)
    for headers in ({}, hdr("sk-wrong"), {"Authorization": f"Basic {KEY_B}"}):
        r = call(world, method, path, body, headers)
        assert r.status_code == 401, (name, r.text)
        assert is_openai_error(r) and r.headers["www-authenticate"] == "Bearer"
    assert world.snapshot("tenant-b", BOB) == before


@pytest.mark.parametrize(("name", "method", "path", "body"), ROUTES, ids=IDS)
def test_cross_tenant_access_fails_on_every_route(world: World, name: str, method: str, path: str, body: Any) -> None:
    before = world.snapshot("tenant-b", BOB)
    # naming tenant B explicitly with tenant A's key: refused outright
    r = call(world, method, path, body, hdr(KEY_A, **{"X-Synth-Tenant": "tenant-b"}))
    assert r.status_code == 403 and is_openai_error(r) and r.json()["error"]["code"] == "wrong_tenant"
    # addressing B's user id with A's key reaches only tenant A's namespace: B's data is invisible
    r = call(world, method, path, body, hdr(KEY_A))
    if name in ("persona", "prompt", "ab-vote"):
        assert r.status_code == 404, r.text
    else:
        assert r.status_code == 200, r.text
    if name == "chat":
        assert r.headers["x-synth-persona-version"] == "0"  # B's persona is not injected
    if name == "history":
        assert r.json()["data"] == []
    if name == "votes-list":  # tenant A's namesake only (the vote POSTed above), never B's vote
        assert a_vote(BOB)["chosen"] not in [v["chosen"] for v in r.json()["data"]]
    if name == "forget":
        assert r.json()["deleted"]["personas"] == 0  # only tenant A's namesake (votes/pairs made above) went
    if name in ("rerank", "judge"):
        assert r.json()["persona_version"] == 0
    if name == "ab":
        assert r.json()["personalized"] is None
    assert world.snapshot("tenant-b", BOB) == before, name


def test_tenant_b_still_owns_its_data_after_the_attacks(world: World) -> None:
    base = world.srv.base_url
    assert httpx.get(f"{base}/users/{BOB_SEG}/persona", headers=hdr(KEY_B)).json()["version"] == 1
    ok = httpx.post(f"{base}/ab/{world.bob_token}/vote", json={"user": BOB, "choice": "a"}, headers=hdr(KEY_B))
    assert ok.status_code == 200 and ok.json()["ok"]
    # and tenant A's same-named user is a different person
    assert httpx.get(f"{base}/users/{BOB_SEG}/persona", headers=hdr(KEY_A)).status_code == 404


def test_health_and_metrics_need_no_key(world: World) -> None:
    assert httpx.get(f"{world.srv.url}/healthz").status_code == 200
    assert httpx.get(f"{world.srv.url}/metrics").status_code == 200


# ------------------------------------------------------------------ bad requests change nothing


def _stored(w: World, users: list[str]) -> list[int]:
    return [w.snapshot("tenant-a", u)[0] for u in users]


def test_bad_requests_get_clear_4xx_and_change_nothing(world: World) -> None:
    base = world.srv.base_url
    users = ["val-1@a.example", "val-2@a.example"]
    completions = world.sim.stats()["completions"]
    good, bad = a_vote(users[0]), {**a_vote(users[1]), "chosen": "", "rejected": " "}
    cases: list[tuple[str, int, str, dict[str, Any]]] = [
        ("oversize body", 413, "/chat/completions",
         {"json": {"model": "sim", "messages": [{"role": "user", "content": "x" * 100_000}]}}),
        ("oversize chunked", 413, "/votes", {"content": iter([b"[" + b" " * 40_000] * 3), "headers": {
            "Content-Type": "application/json"}}),
        ("too many messages", 400, "/chat/completions", {"json": {"model": "sim", "messages": MSGS * 9}}),
        ("wrong content type", 415, "/chat/completions", {"content": json.dumps({"model": "sim", "messages": MSGS}),
                                                          "headers": {"Content-Type": "text/plain"}}),
        ("no content type", 415, "/votes", {"content": json.dumps(good)}),
        ("invalid JSON", 400, "/chat/completions", {"content": b"{nope", "headers": {"Content-Type": "application/json"}}),
        ("missing messages", 400, "/chat/completions", {"json": {"model": "sim"}}),
        ("unknown role", 400, "/chat/completions", {"json": {"model": "sim", "messages": [{"role": "wizard", "content": "x"}]}}),
        ("bad user id", 400, "/chat/completions", {"json": {"model": "sim", "messages": MSGS, "user": " padded "}}),
        ("invalid vote in batch", 400, "/votes", {"json": [good, bad]}),
        ("vote not an object", 400, "/votes", {"json": [good, "nope"]}),
        ("empty batch", 400, "/votes", {"json": []}),
        ("bad choice", 400, "/ab/whatever/vote", {"json": {"user": users[0], "choice": "c"}}),
        ("one candidate", 400, "/rerank", {"json": {"user": users[0], "messages": MSGS, "candidates": ["only"]}}),
        ("identical pair", 400, "/judge", {"json": {"user": users[0], "messages": MSGS, "a": "same", "b": "same"}}),
        ("ab without user", 400, "/ab", {"json": {"messages": MSGS}}),
        ("ab too many messages", 400, "/ab", {"json": {"user": users[0], "messages": MSGS * 9}}),
    ]
    for name, status, path, kw in cases:
        headers = {**hdr(), **kw.pop("headers", {})}
        r = httpx.post(base + path, headers=headers, timeout=30, **kw)
        assert r.status_code == status, (name, r.status_code, r.text)
        assert is_openai_error(r), name
    invalid = httpx.post(f"{base}/votes", json=[good, bad], headers=hdr()).json()["error"]
    assert "nothing was stored" in invalid["message"] and "vote 1" in invalid["message"] and "both empty" in invalid["message"]
    assert _stored(world, users) == [0, 0]
    assert world.sim.stats()["completions"] == completions  # not one request reached the upstream


def test_rate_limit_per_key_with_retry_after(tmp_path: Path) -> None:
    with SimEndpoint() as sim:
        llm = LLMClient(EndpointConfig(base_url=sim.base_url))
        app = create_app(
            Settings(base_url=sim.base_url, home=tmp_path),
            ProxySettings(api_keys=f"a:{KEY_A},b:{KEY_B}", synthesis="off", key_rate_limit=0.001, key_burst=2),
            store=InMemoryStore(), llm=llm,
        )
        with ProxyServer(app, close=[llm]) as srv:
            url = f"{srv.base_url}/users/u/persona/history"
            assert [httpx.get(url, headers=hdr(KEY_A)).status_code for _ in range(2)] == [200, 200]
            r = httpx.get(url, headers=hdr(KEY_A))
            assert r.status_code == 429 and is_openai_error(r) and int(r.headers["retry-after"]) >= 1
            assert httpx.get(url, headers=hdr(KEY_B)).status_code == 200  # buckets are per key
            assert "synth_proxy_rate_limited_total 1.0" in httpx.get(f"{srv.url}/metrics").text


def test_no_auth_dev_mode_uses_the_default_tenant(tmp_path: Path) -> None:
    with SimEndpoint() as sim:
        store = InMemoryStore()
        llm = LLMClient(EndpointConfig(base_url=sim.base_url))
        app = create_app(Settings(base_url=sim.base_url, home=tmp_path), ProxySettings(no_auth=True, synthesis="off"),
                         store=store, llm=llm)
        with ProxyServer(app, close=[llm]) as srv:
            r = httpx.post(f"{srv.base_url}/votes", json=a_vote("dev@example.com"))
            assert r.status_code == 200 and r.json()["added"] == 1
            assert srv.call(app.state.proxy.memories("default").count_votes("dev@example.com")) == 1
            assert httpx.get(f"{srv.url}/healthz").json()["auth"] is False


# ------------------------------------------------------------------ key configuration


def test_key_sources_hashing_and_errors(tmp_path: Path) -> None:
    ring = KeyRing.from_env_string("acme:sk-1, beta:sk:with:colons")
    assert ring.lookup("sk-1").tenant == "acme" and ring.lookup("sk:with:colons").tenant == "beta"  # type: ignore[union-attr]
    assert ring.lookup("sk-2") is None and all("sk-1" not in k.digest for k in ring.keys)

    toml = tmp_path / "keys.toml"
    toml.write_text(f'[[keys]]\ntenant = "acme"\nsha256 = "{hash_key("sk-toml")}"\nrate_limit = 5\n\n'
                    '[[keys]]\ntenant = "zeta"\nkey = "sk-plain"\n')
    ring = KeyRing.from_file(toml)
    assert ring.lookup("sk-toml").rate_limit == 5.0 and ring.lookup("sk-plain").tenant == "zeta"  # type: ignore[union-attr]
    js = tmp_path / "keys.json"
    js.write_text(json.dumps({"keys": [{"tenant": "acme", "key": "sk-json"}]}))
    assert KeyRing.load(env_spec="b:sk-env", path=js).tenants() == {"acme", "b"}

    for bad, match in [
        ({"keys": [{"tenant": "a"}]}, "exactly one"),
        ({"keys": [{"tenant": "a", "sha256": "xyz"}]}, "64 hex"),
        ({"keys": [{"tenant": "", "key": "k"}]}, "invalid tenant"),
        ({"nokeys": []}, "'keys' list"),
    ]:
        js.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=match):
            KeyRing.from_file(js)
    with pytest.raises(ValueError, match="twice"):
        KeyRing.from_env_string("a:k,b:k")
    with pytest.raises(ValueError, match="tenant:key"):
        KeyRing.from_env_string("nokey")
    with pytest.raises(ValueError, match="no API keys configured"):
        create_app(Settings(home=tmp_path), ProxySettings(api_keys=None, keys_file=None))


def test_token_bucket_refills() -> None:
    now = [0.0]
    bucket = TokenBucket(rate=2.0, burst=2, clock=lambda: now[0])
    assert [bucket.take() for _ in range(2)] == [0.0, 0.0]
    assert bucket.take() == pytest.approx(0.5)
    now[0] = 0.5
    assert bucket.take() == 0.0


def test_cli_serve_refuses_to_start_without_keys(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from synth_agent.proxy.cli import register

    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """Global options live in synth_agent.cli; here the commands alone."""

    register(app)
    monkeypatch.delenv("SYNTH_AGENT_API_KEYS", raising=False)
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")  # a real endpoint: no simulator is started
    monkeypatch.setenv("SYNTH_AGENT_HOME", str(tmp_path))
    result = CliRunner().invoke(app, ["serve"])
    assert result.exit_code == 2 and "no API keys configured" in result.output
    result = CliRunner().invoke(app, ["serve", "--keys-file", str(tmp_path / "missing.toml")])
    assert result.exit_code == 2 and "no such key file" in result.output
    assert "--upstream-base-url" in CliRunner().invoke(app, ["serve", "--help"]).output
    assert "--poll-interval" in CliRunner().invoke(app, ["worker", "--help"]).output
