"""The graphs under a real LangGraph API server (``langgraph dev``), driven through ``langgraph_sdk``.

Two servers start from the repository's ``langgraph.json`` (paths made absolute, each in its own
temporary directory so ``.langgraph_api/`` and the store stay there), against the offline simulator:

* ``dev``: no auth, votes and personas in a ``chroma run`` server that the ``synth-agent`` CLI
  uses at the same time (the "one store" configuration of docs/langgraph.md);
* ``secured``: plus the custom auth of ``examples/langgraph_server/auth.py``, embedded Chroma.

What a LangGraph user does: list the assistants and read their schemas, vote through the chat
graph's A/B flow, watch a background synthesis produce a persona with no manual run, rerun
synthesis on one thread, and try to act as someone else.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from langgraph_sdk import get_client
from langgraph_sdk.client import LangGraphClient

from synth_agent.sim.population import Population
from synth_agent.sim.server import SimEndpoint

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STARTUP_TIMEOUT_S = 120.0
RUN_TIMEOUT_S = 180.0
TOKENS = {
    "tok-alice": {"identity": "alice@acme.example", "tenant_id": "acme"},
    "tok-bob": {"identity": "bob@acme.example", "tenant_id": "acme"},
}

pytestmark = pytest.mark.timeout(600)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


class Service:
    """A child process in its own session, stopped (the whole group, by its id) at the end."""

    def __init__(self, name: str, args: list[str], *, cwd: Path, env: dict[str, str], health: str) -> None:
        self.name, self.health, self.log = name, health, cwd / f"{name}.log"
        self.proc = subprocess.Popen(
            args, cwd=cwd, env=env, stdout=self.log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not _get_ok(self.health):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"{self.name} did not start (exit {self.proc.returncode}):\n{self.tail()}")
            time.sleep(0.2)

    def tail(self, n: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


def _server_config(workdir: Path, *, auth: bool) -> Path:
    """The repository's langgraph.json with paths anchored at the repository (langgraph dev reads them from cwd)."""
    cfg = json.loads((ROOT / "langgraph.json").read_text())

    def anchored(path: str) -> str:
        return str(ROOT / path.removeprefix("./")) if path.startswith("./") else path

    cfg["dependencies"] = [str(ROOT)]
    cfg["graphs"] = {k: anchored(v) for k, v in cfg["graphs"].items()}
    cfg["store"]["path"] = anchored(cfg["store"]["path"])
    if auth:
        cfg["auth"] = {"path": anchored("./examples/langgraph_server/auth.py:auth")}
    path = workdir / "langgraph.json"
    path.write_text(json.dumps(cfg, indent=2))
    return path


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LANGSMITH_", "LANGCHAIN_", "CHROMA_", "OPENAI_"))}
    env.update(
        LANGSMITH_TRACING="false", LANGGRAPH_CLI_NO_ANALYTICS="1", HF_HUB_OFFLINE="1",
        ANONYMIZED_TELEMETRY="False", PYTHONUNBUFFERED="1", **extra,
    )
    return env


def _langgraph_dev(name: str, workdir: Path, *, auth: bool, env: dict[str, str]) -> Service:
    port = _free_port()
    svc = Service(
        name,
        [str(BIN / "langgraph"), "dev", "--no-browser", "--no-reload", "--host", "127.0.0.1", "--port", str(port),
         "--config", str(_server_config(workdir, auth=auth)), "--n-jobs-per-worker", "4"],
        cwd=workdir, env=env, health=f"http://127.0.0.1:{port}/ok",
    )
    svc.url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
    return svc


class Servers:
    def __init__(self, sim: SimEndpoint, dev: Service, secured: Service, cli_env: dict[str, str],
                 ingest: subprocess.Popen[str], ingested: list[Any]) -> None:
        self.sim, self.dev, self.secured, self.cli_env = sim, dev, secured, cli_env
        self.ingest, self.ingested = ingest, ingested


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    base = tmp_path_factory.mktemp("langgraph-server")
    started: list[Service] = []
    with SimEndpoint(seed=4) as sim:
        try:
            llm = {"OPENAI_BASE_URL": sim.base_url, "OPENAI_API_KEY": "sim"}
            chroma_port = _free_port()
            (base / "chroma").mkdir()
            chroma = Service(
                "chroma", [str(BIN / "chroma"), "run", "--path", str(base / "chroma" / "db"), "--host", "127.0.0.1",
                           "--port", str(chroma_port)],
                cwd=base / "chroma", env=_env(), health=f"http://127.0.0.1:{chroma_port}/api/v2/heartbeat",
            )
            started.append(chroma)
            (base / "secured").mkdir()
            secured = _langgraph_dev(
                "secured", base / "secured", auth=True,
                env=_env(**llm, SYNTH_AGENT_HOME=str(base / "secured" / "home"),
                         SYNTH_AGENT_LANGGRAPH_TOKENS=json.dumps(TOKENS)),
            )
            started.append(secured)
            chroma.wait_healthy()  # the dev server opens its store at startup
            shared = {"CHROMA_HOST": "127.0.0.1", "CHROMA_PORT": str(chroma_port)}
            (base / "dev").mkdir()
            dev = _langgraph_dev("dev", base / "dev", auth=False,
                                 env=_env(**llm, **shared, SYNTH_AGENT_HOME=str(base / "dev" / "home")))
            started.append(dev)
            # a user ingests votes with the CLI into the same Chroma server (while the servers start: it is slow)
            cli_env = _env(**llm, **shared, SYNTH_AGENT_HOME=str(base / "cli-home"))
            pop = Population(1, seed=9)
            votes = [v.model_copy(update={"user_id": "erin@example.com"}) for v in pop.votes(pop.user_ids[0], 6)]
            (base / "votes.jsonl").write_text("".join(v.model_dump_json() + "\n" for v in votes))
            ingest = subprocess.Popen(
                [str(BIN / "synth-agent"), "--tenant", "acme", "ingest", str(base / "votes.jsonl")],
                env=cli_env, cwd=base, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
            try:
                secured.wait_healthy()
                dev.wait_healthy()
                yield Servers(sim, dev, secured, cli_env, ingest, votes)
            finally:
                if ingest.poll() is None:
                    ingest.kill()
                ingest.wait()
        finally:
            for svc in reversed(started):
                svc.stop()


def client(svc: Service, token: str | None = None) -> LangGraphClient:
    headers = {"Authorization": f"Bearer {token}"} if token else None
    return get_client(url=svc.url, api_key=None, headers=headers)  # type: ignore[attr-defined]


def cli(servers: Servers, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "synth-agent"), *args], env=servers.cli_env, capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


async def ab_vote(c: LangGraphClient, thread_id: str, ctx: dict[str, str], prompt: str, choice: str) -> dict[str, Any]:
    """One A/B turn and the user's vote, on the user's conversation thread; returns ``vote_result``."""
    turn = await c.runs.wait(thread_id, "chat", input={"messages": [{"role": "user", "content": prompt}]},
                             context={**ctx, "mode": "ab"})
    assert turn["ab"]["token"], turn["ab"]
    voted = await c.runs.wait(thread_id, "chat", input={"vote": {"token": turn["ab"]["token"], "choice": choice}},
                              context=ctx)
    assert voted["vote_result"]["ok"], voted["vote_result"]
    assert voted["messages"][-1]["content"] == turn["ab"][choice]  # the pick continues the conversation
    return voted["vote_result"]


async def wait_run(c: LangGraphClient, thread_id: str, run_id: str) -> dict[str, Any]:
    """Poll a run (nobody starts or joins it) until it is done; returns the run."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while True:
        run = await c.runs.get(thread_id, run_id)
        if run["status"] not in ("pending", "running"):
            return run
        assert time.monotonic() < deadline, f"background run {run_id} still {run['status']}"
        await asyncio.sleep(0.5)


def prompts(seed: int, n: int) -> list[str]:
    pop = Population(1, seed=seed)
    return [v.context[-1].content for v in pop.votes(pop.user_ids[0], n)]


# ------------------------------------------------------------------ schemas


async def test_three_assistants_with_input_output_and_context_schemas(servers: Servers) -> None:
    c = client(servers.dev)
    assistants = {a["graph_id"]: a for a in await c.assistants.search()}
    assert set(assistants) == {"chat", "synthesis", "rerank"}
    knobs = {"chat": {"mode", "n", "strategy"}, "rerank": {"n", "strategy"}, "synthesis": {"fit_config"}}
    for graph_id, assistant in assistants.items():
        schemas = await c.assistants.get_schemas(assistant["assistant_id"])
        for kind in ("input_schema", "output_schema", "config_schema", "context_schema"):
            assert schemas[kind] and schemas[kind]["properties"], (graph_id, kind, schemas[kind])
        assert {"synth_user_id", "tenant_id"} | knobs[graph_id] <= set(schemas["config_schema"]["properties"])
        assert schemas["config_schema"]["properties"]["synth_user_id"]["description"]
    chat = await c.assistants.get_schemas(assistants["chat"]["assistant_id"])
    assert set(chat["input_schema"]["properties"]) == {"messages", "vote"}
    assert chat["config_schema"]["properties"]["mode"]["enum"] == ["plain", "ab", "rerank"]
    assert not {"index", "variant", "personalized", "system_prompt"} & set(chat["state_schema"]["properties"])
    synthesis = await c.assistants.get_schemas(assistants["synthesis"]["assistant_id"])
    assert "votes" not in synthesis["output_schema"]["properties"]  # work in progress stays private
    assert "Failed to get" not in servers.dev.tail(10**7)


async def test_a_run_without_a_user_says_what_to_pass(servers: Servers) -> None:
    """Without auth the server's own configurable user_id is empty; the error names our key."""
    c = client(servers.dev)
    with pytest.raises(Exception, match="synth_user_id") as err:
        await c.runs.wait(None, "chat", input={"messages": [{"role": "user", "content": "hi"}]})
    assert "IdentityMissing" in str(err.value)


# ------------------------------------------------------------------ votes → background synthesis → one store


async def test_votes_schedule_a_background_synthesis_that_the_cli_sees(servers: Servers) -> None:
    c = client(servers.dev)
    ctx = {"synth_user_id": "dana@example.com", "tenant_id": "acme"}
    thread = await c.threads.create()
    results = [await ab_vote(c, thread["thread_id"], ctx, p, "ab"[i % 2]) for i, p in enumerate(prompts(1, 5))]
    assert [r["synthesis"]["scheduled"] for r in results] == [False] * 4 + [True]
    assert results[0]["synthesis"] == {"scheduled": False, "votes": 1, "next_fit_at": 5}
    bg = results[-1]["synthesis"]
    run = await wait_run(c, bg["thread_id"], bg["run_id"])
    assert run["status"] == "success" and run["metadata"]["synth_agent"] == "background-synthesis"
    state = await c.threads.get_state(bg["thread_id"])
    assert state["values"]["status"] == "fitted" and state["values"]["profile"]["version"] == 1

    # the next chat turn speaks to the new persona
    turn = await c.runs.wait(thread["thread_id"], "chat", input={"messages": [{"role": "user", "content": "Thanks!"}]},
                             context={**ctx, "mode": "plain"})
    assert turn["persona_version"] == 1
    # one store: the CLI, on the same Chroma server, sees the votes and the persona the server made
    shown = cli(servers, "--tenant", "acme", "persona", "--user", "dana@example.com", "--json")
    assert shown.returncode == 0, shown.stderr
    profile = json.loads(shown.stdout)
    assert profile["version"] == 1 and len(profile["vote_ids"]) == 5 and profile["persona"] == state["values"]["persona"]


async def test_rerunning_synthesis_on_one_thread_fits_all_votes(servers: Servers) -> None:
    c = client(servers.dev)
    ctx = {"synth_user_id": "eve@example.com", "tenant_id": "acme"}
    chat = await c.threads.create()
    for i, p in enumerate(prompts(2, 4)):
        await ab_vote(c, chat["thread_id"], ctx, p, "ab"[i % 2])  # 4 votes: no fit is due yet
    studio = (await c.threads.create())["thread_id"]  # the thread Studio keeps reusing
    small = {**ctx, "fit_config": {"n_trials": 4, "n_demo_candidates": 4}}
    early = await c.runs.wait(studio, "synthesis", input={}, context=small)
    assert early["status"] == "not_enough_votes"

    await ab_vote(c, chat["thread_id"], ctx, "What should I cook tonight?", "a")  # 5th vote
    first = await c.runs.wait(studio, "synthesis", input={}, context=small)
    assert first["status"] in ("fitted", "unchanged")  # the background run may have fitted v1 already
    version = first["profile"]["version"]
    again = await c.runs.wait(studio, "synthesis", input={}, context=small)
    assert again["status"] == "unchanged" and again["profile"]["version"] == version  # no new votes: nothing saved

    for i, p in enumerate(prompts(3, 3)):
        await ab_vote(c, chat["thread_id"], ctx, p, "ba"[i % 2])  # 8 votes: the next background fit is at 10
    rerun = await c.runs.wait(studio, "synthesis", input={}, context=small)
    assert rerun["status"] == "fitted" and rerun["profile"]["version"] == version + 1
    assert rerun["n_votes"] == 8 and len(rerun["profile"]["vote_ids"]) == 8
    history = cli(servers, "--tenant", "acme", "persona", "--user", "eve@example.com", "--history", "--json")
    assert history.returncode == 0, history.stderr
    assert [len(p["vote_ids"]) for p in json.loads(history.stdout)][-1] == 8
    assert len(json.loads(history.stdout)) == version + 1


async def test_votes_ingested_with_the_cli_reach_the_server(servers: Servers) -> None:
    _, stderr = servers.ingest.communicate(timeout=300)
    assert servers.ingest.returncode == 0, stderr
    votes = servers.ingested
    c = client(servers.dev)
    out = await c.runs.wait(None, "synthesis", input={"user_id": "erin@example.com", "tenant_id": "acme"},
                            context={"fit_config": {"n_trials": 4, "n_demo_candidates": 4}})
    assert out["status"] == "fitted" and set(out["profile"]["vote_ids"]) == {v.id for v in votes}


# ------------------------------------------------------------------ LangGraph auth


async def test_auth_decides_who_the_user_is(servers: Servers) -> None:
    alice, bob = client(servers.secured, "tok-alice"), client(servers.secured, "tok-bob")
    with pytest.raises(Exception, match="401|bearer token"):
        await client(servers.secured).assistants.search()
    thread = (await alice.threads.create())["thread_id"]
    turn = await alice.runs.wait(thread, "chat", input={"messages": [{"role": "user", "content": "Plan my week"}]},
                                 context={"mode": "ab"})  # no user named: it is the signed-in one
    token = turn["ab"]["token"]
    vote = {"vote": {"token": token, "choice": "a"}}
    # alice cannot act as bob, nor move to another tenant, by any key
    for kwargs in ({"context": {"synth_user_id": "bob@acme.example"}},
                   {"config": {"configurable": {"user_id": "bob@acme.example"}}},
                   {"context": {"tenant_id": "other"}}):
        with pytest.raises(Exception, match="IdentityForbidden.*signed in"):
            await alice.runs.wait(thread, "chat", input=vote, **kwargs)
    with pytest.raises(Exception, match="IdentityForbidden.*cannot act as"):
        await bob.runs.wait(None, "synthesis", input={"user_id": "alice@acme.example"})
    # bob's own runs are bob's: alice's token is unknown to him, her thread invisible
    theirs = await bob.runs.wait(None, "chat", input=vote)
    assert theirs["vote_result"]["ok"] is False and "unknown vote token" in theirs["vote_result"]["error"]
    with pytest.raises(Exception, match="404|not found"):
        await bob.threads.get(thread)
    mine = await alice.runs.wait(thread, "chat", input=vote)
    assert mine["vote_result"]["ok"] is True


async def test_background_synthesis_runs_as_the_signed_in_voter(servers: Servers) -> None:
    alice, bob = client(servers.secured, "tok-alice"), client(servers.secured, "tok-bob")
    thread = (await alice.threads.create())["thread_id"]
    synthesis: dict[str, Any] = {}
    for i, p in enumerate(prompts(5, 6)):
        synthesis = (await ab_vote(alice, thread, {}, p, "ba"[i % 2]))["synthesis"]
        if synthesis["scheduled"]:
            break
    assert synthesis["scheduled"], synthesis
    run = await wait_run(alice, synthesis["thread_id"], synthesis["run_id"])
    assert run["status"] == "success"
    values = (await alice.threads.get_state(synthesis["thread_id"]))["values"]
    assert (values["tenant_id"], values["user_id"], values["status"]) == ("acme", "alice@acme.example", "fitted")
    with pytest.raises(Exception, match="404|not found"):
        await bob.threads.get(synthesis["thread_id"])
    ns = ["synth_agent", "acme", "user", "alice@acme%2Eexample", "personas"]
    assert len((await alice.store.search_items(ns))["items"]) == 1
    with pytest.raises(Exception, match="403|outside your own"):
        await bob.store.search_items(ns)
