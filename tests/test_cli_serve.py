"""Store commands while ``synth-agent serve`` owns the home: they ask it over its API (no chromadb
import), print what they print without it, and forget erases through it. The per-run token works only
for its owner's user, from loopback, while that server runs (synth_agent.local_service)."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from langgraph.store.memory import InMemoryStore

from synth_agent.config import Settings
from synth_agent.llm.client import EndpointConfig, LLMClient
from synth_agent.local_service import STATE_FILE, configured_home, find, publish, service_url
from synth_agent.models import Vote
from synth_agent.proxy import ProxyServer, ProxySettings, create_app
from synth_agent.sim.population import write_population_jsonl
from synth_agent.sim.server import SimEndpoint

try:
    from tests.store_procs import REPO, ServeProcess
except ImportError:  # run from inside tests/
    from store_procs import REPO, ServeProcess  # type: ignore[no-redef]

# Runs the CLI in a fresh process and reports (on stderr) whether chromadb was imported.
PROBE = (
    "import sys\n"
    "from synth_agent.cli import run\n"
    "rc = run(sys.argv[1:])\n"
    "sys.stdout.flush()\n"
    "print('CHROMADB' if 'chromadb' in sys.modules else 'NO-CHROMADB', file=sys.stderr)\n"
    "sys.exit(rc)\n"
)


def cli(home: Path, sim: SimEndpoint, *args: str, via_serve: bool = True) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SYNTH_AGENT_", "CHROMA_"))}
    env.update({"OPENAI_BASE_URL": sim.base_url, "OPENAI_API_KEY": "sim", "SYNTH_AGENT_HOME": str(home),
                "ANONYMIZED_TELEMETRY": "False", "SYNTH_AGENT_VIA_SERVE": "1" if via_serve else "0"})
    r = subprocess.run([sys.executable, "-c", PROBE, *args], env=env, cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    return r.returncode, r.stdout, r.stderr


@pytest.fixture(scope="module")
def sim():
    with SimEndpoint() as ep:
        yield ep


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, sim: SimEndpoint) -> Any:
    """A home with 3 users' votes and one fitted persona, served by a real `synth-agent serve`."""
    d = tmp_path_factory.mktemp("served")
    home = d / "home"
    pop = write_population_jsonl(d / "votes.jsonl", 3, 12, seed=4)
    assert cli(home, sim, "ingest", str(d / "votes.jsonl"))[0] == 0
    users = pop.user_ids
    rc, _, err = cli(home, sim, "fit", "--user", users[0])
    assert rc == 0, err
    srv = ServeProcess(home, sim.base_url, key="default:sk-store", synthesis="off").start()
    try:
        yield srv, users
    finally:
        srv.stop()


READS = [("votes",), ("votes", "--json"), ("persona",), ("persona", "--history", "--json"), ("export-prompt",),
         ("export-prompt", "--format", "json")]


def test_reads_through_serve_match_the_in_process_reads_without_chromadb(served: Any, sim: SimEndpoint) -> None:
    srv, users = served
    state = srv.home / STATE_FILE
    assert state.stat().st_mode & 0o777 == 0o600  # the token is readable by the owner only
    # every read of a fitted user; the error path (no persona yet) of another
    cases = [(args, users[0]) for args in READS] + [(("persona",), users[1]), (("export-prompt",), users[1])]
    for args, user in cases:
        fast = cli(srv.home, sim, *args, "--user", user)
        slow = cli(srv.home, sim, *args, "--user", user, via_serve=False)
        assert fast[0] == slow[0] and fast[1] == slow[1], (args, user, fast, slow)
        assert fast[2].splitlines()[:-1] == slow[2].splitlines()[:-1], (args, user)  # same error line
        assert fast[2].splitlines()[-1] == "NO-CHROMADB", (args, fast[2])
        assert slow[2].splitlines()[-1] == "CHROMADB"
    assert cli(srv.home, sim, "persona", "--user", users[1])[0] == 1
    rc, out, _ = cli(srv.home, sim, "votes", "--json", "--user", users[0])
    assert rc == 0 and len(out.splitlines()) == 12 and Vote.model_validate_json(out.splitlines()[0]).user_id == users[0]
    # another tenant's namespace is another tenant's: empty, through the server too
    assert cli(srv.home, sim, "--tenant", "other", "votes", "--json", "--user", users[0])[1] == ""


def test_an_idle_keep_alive_connection_is_not_closed_after_uvicorns_default_5_s(served: Any) -> None:
    """A client that reuses a pooled connection idle for 6 s (aiohttp keeps them 15 s, httpx 5 s) finds it open:
    with uvicorn's 5 s the server closed it, and a request sent as it closed failed (the soak's connection errors)."""
    srv, _ = served
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    try:
        conn.request("GET", "/healthz")
        first = conn.getresponse()
        first.read()
        assert first.status == 200
        assert conn.sock is not None
        local = conn.sock.getsockname()
        time.sleep(6)
        conn.request("GET", "/healthz")  # on the same socket: http.client reconnects only once it knows it closed
        again = conn.getresponse()
        again.read()
        assert again.status == 200 and conn.sock.getsockname() == local
    finally:
        conn.close()


def test_forget_through_serve_erases_what_the_server_holds(served: Any, sim: SimEndpoint) -> None:
    srv, users = served
    victim = users[2]
    rc, out, err = cli(srv.home, sim, "forget", "--yes", "--user", victim)
    assert rc == 0 and out.startswith(f"forgot {victim!r}: votes=12"), (out, err)
    assert err.splitlines()[-1] == "NO-CHROMADB"
    # gone for API clients of the server, and for the CLI on either path
    r = httpx.get(f"{srv.url}/v1/users/{quote(victim, safe='')}/votes", headers=srv.headers, timeout=30)
    assert r.status_code == 200 and r.json()["data"] == []
    for via in (True, False):
        assert cli(srv.home, sim, "votes", "--json", "--user", victim, via_serve=via)[:2] == (0, "")
    # still refused without a terminal and without --yes, before anything is asked of the server
    rc, _, err = cli(srv.home, sim, "forget", "--user", users[1])
    assert rc == 1 and "--yes" in err
    assert len(httpx.get(f"{srv.url}/v1/users/{quote(users[1], safe='')}/votes", headers=srv.headers, timeout=30).json()["data"]) == 12


def test_a_killed_server_leaves_a_stale_file_that_is_ignored(tmp_path: Path, sim: SimEndpoint) -> None:
    home = tmp_path / "home"
    path = tmp_path / "votes.jsonl"
    pop = write_population_jsonl(path, 1, 6, seed=2)
    assert cli(home, sim, "ingest", str(path))[0] == 0
    srv = ServeProcess(home, sim.base_url, synthesis="off").start()
    try:
        assert cli(home, sim, "votes", "--json", "--user", pop.user_ids[0])[2].splitlines()[-1] == "NO-CHROMADB"
    finally:
        srv.kill()  # kill -9: serve.json stays behind
    assert (home / STATE_FILE).exists()
    rc, out, err = cli(home, sim, "votes", "--json", "--user", pop.user_ids[0])
    assert rc == 0 and len(out.splitlines()) == 6 and err.splitlines()[-1] == "CHROMADB"


# ------------------------------------------------------------------ the token and its file


def _non_loopback_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent; picks the outgoing interface's address
            addr = str(s.getsockname()[0])
        except OSError:
            return None
    return None if addr.startswith("127.") else addr


def test_the_token_acts_for_any_tenant_from_loopback_only(tmp_path: Path) -> None:
    with SimEndpoint() as sim:
        llm = LLMClient(EndpointConfig(base_url=sim.base_url))
        app = create_app(Settings(base_url=sim.base_url, home=tmp_path),
                         ProxySettings(api_keys="acme:sk-acme", synthesis="off"), store=InMemoryStore(), llm=llm)
        with ProxyServer(app, host="0.0.0.0", close=[llm]) as srv:  # noqa: S104 - to reach it from a non-loopback address
            app.state.proxy.local_token = "tok-" + "x" * 40
            own = {"Authorization": "Bearer tok-" + "x" * 40}
            vote = {"user_id": "u", "context": "hi", "chosen": "a", "rejected": "b"}
            assert httpx.post(f"http://127.0.0.1:{srv.port}/v1/votes", json=vote,
                              headers={**own, "X-Synth-Tenant": "beta"}).status_code == 200
            url = f"http://127.0.0.1:{srv.port}/v1/users/u/votes"
            assert len(httpx.get(url, headers={**own, "X-Synth-Tenant": "beta"}).json()["data"]) == 1
            assert httpx.get(url, headers=own).json()["data"] == []  # default tenant
            assert httpx.get(url, headers={"Authorization": "Bearer sk-acme"}).json()["data"] == []  # acme's own
            r = httpx.get(url, headers={**own, "X-Synth-Tenant": ""})
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_tenant"
            assert httpx.get(url, headers={"Authorization": "Bearer tok-" + "y" * 40}).status_code == 401
            addr = _non_loopback_address()
            if addr is not None:  # the same token from this machine's network address: refused
                r = httpx.get(f"http://{addr}:{srv.port}/v1/users/u/votes", headers=own)
                assert r.status_code == 401, r.text
            app.state.proxy.local_token = None  # no token published: it is just a wrong key
            assert httpx.get(url, headers=own).status_code == 401


def test_the_state_file_is_private_and_trusted_only_when_safe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pub = publish(tmp_path, "0.0.0.0", 4321, erases_checkpoints=False)  # noqa: S104
    assert pub is not None
    path = tmp_path / STATE_FILE
    assert path.stat().st_mode & 0o777 == 0o600
    data = json.loads(path.read_text())
    assert data["url"] == "http://127.0.0.1:4321" and data["pid"] == os.getpid() and len(data["token"]) >= 40
    found = find(tmp_path)
    assert found is not None and found.token == pub.token and found.info["erases_checkpoints"] is False
    monkeypatch.setenv("SYNTH_AGENT_VIA_SERVE", "0")
    assert find(tmp_path) is None
    monkeypatch.delenv("SYNTH_AGENT_VIA_SERVE")
    path.chmod(0o644)  # readable by others: the token may have leaked, never use it
    assert find(tmp_path) is None
    path.chmod(0o600)
    if os.getuid() == 0:  # someone else's file (only root can hand a file to another user)
        os.chown(path, 12345, -1)
        assert find(tmp_path) is None
        os.chown(path, 0, -1)
    link = tmp_path / "other"
    link.mkdir()
    (link / STATE_FILE).symlink_to(path)
    assert find(link) is None  # a symlink is not followed
    path.write_text(json.dumps({**data, "pid": 2**22 + 12345}))  # a dead process
    path.chmod(0o600)
    assert find(tmp_path) is None
    pub2 = publish(tmp_path, "127.0.0.1", 4322)
    assert pub2 is not None
    pub.close()  # an older run's close leaves the newer run's file alone
    assert path.exists()
    pub2.close()
    assert not path.exists()
    assert service_url("10.1.2.3", 80) is None and publish(tmp_path, "10.1.2.3", 80) is None  # not loopback
    assert service_url("::1", 80) == "http://[::1]:80"


@pytest.mark.parametrize("env", [{}, {"SYNTH_AGENT_HOME": "/data/x"}, {"synth_agent_home": "rel/dir"}])
def test_configured_home_is_the_home_settings_uses(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    for k in list(os.environ):
        if k.upper() == "SYNTH_AGENT_HOME":
            monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert configured_home() == Settings().home
    assert configured_home("flag/dir") == Settings(home="flag/dir").home
