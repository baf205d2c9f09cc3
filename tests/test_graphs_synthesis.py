"""The synthesis graph: node order, serializable state, resumability (in-process and after SIGKILL)."""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.store.memory import InMemoryStore

from graphs._common import TenantMemories, open_checkpointer
from graphs.synthesis import NODES, SynthesisRunner, build_synthesis_graph, synthesis_thread_id
from synth_agent.engine.synthesize import FitConfig
from synth_agent.llm.client import EndpointConfig, LLMClient
from synth_agent.sim.population import Population
from synth_agent.sim.server import SimEndpoint

ROOT = Path(__file__).resolve().parents[1]
SMALL = FitConfig(n_trials=2, n_demo_candidates=2)
USER = "ana.o'neil+votes@bücher.example"


@pytest.fixture(scope="module")
def sim() -> Iterator[SimEndpoint]:
    with SimEndpoint(seed=3) as ep:
        yield ep


@pytest.fixture
async def llm(sim: SimEndpoint) -> AsyncIterator[LLMClient]:
    client = LLMClient(EndpointConfig(base_url=sim.base_url))
    yield client
    await client.aclose()


def _votes(n: int, user: str = USER) -> list[Any]:
    pop = Population(1, seed=11)
    return [v.model_copy(update={"user_id": user}) for v in pop.votes(pop.user_ids[0], n)]


async def test_full_run_saves_persona_with_json_state(llm: LLMClient) -> None:
    store = InMemoryStore()
    mems = TenantMemories(store)
    await mems("acme").add_votes(_votes(8))
    events: list[str] = []
    g = build_synthesis_graph(
        llm=llm, memory_for=mems, fit_config=SMALL, checkpointer=InMemorySaver(),
        on_event=lambda node, phase, info: events.append(f"{node}:{phase}"),
    )
    state = await SynthesisRunner(g, mems).run_state("acme", USER)
    assert events == [f"{n}:{p}" for n in NODES if n != "refit" for p in ("start", "end")]  # a first fit
    assert state["status"] == "fitted" and state["run_id"] == "v1"
    json.dumps(state)  # everything in the state is plain JSON
    assert set(state["usage"]) == {"bootstrap", "persona", "demos", "select"}
    saved = await mems("acme").current_persona(USER)
    assert saved is not None and saved.version == 1 and saved.persona == state["persona"]
    # one persona call (with persona_votes="all", plus one rationale per vote the default judge got wrong)
    assert saved.meta["n_traces"] == 8
    assert state["usage"]["persona"]["llm_calls"] == 1
    # the select node cross-validated persona + demos against the default on the 8 votes, both orders (the votes
    # left unjudged once the guard's decision was settled are listed as skipped)
    sel = saved.meta["selection"]
    assert set(sel["cv_accuracy"]) == {"persona_demos", "default"} and sel["n_votes"] + len(sel["skipped"]) == 8
    assert sel["n_judgments"] == sel["n_votes"] * 2 * 2 and sel["served"] in ("persona_demos", "default")
    assert saved.meta["synthesis_thread"] == synthesis_thread_id("acme", USER, "v1")
    assert len(saved.vote_ids) == 8 and saved.demos
    assert saved.meta["demos_status"] == "selected"  # step 3 raced (FitConfig.race_demos="always", the default)
    # no new votes: the next run is a no-op that saves nothing
    events.clear()
    again = await SynthesisRunner(g, mems).run_state("acme", USER)
    assert again["status"] == "unchanged" and again["profile"]["version"] == 1 and "nothing saved" in again["message"]
    assert events == ["load_votes:start", "load_votes:end"]
    # new votes: the next run targets the next version, on a new thread
    await mems("acme").add_votes(_votes(10)[8:])
    prof = await SynthesisRunner(g, mems).run("acme", USER)
    assert prof is not None and prof.version == 2 and prof.meta["run_id"] == "v2" and len(prof.vote_ids) == 10
    assert await mems("other").current_persona(USER) is None  # tenants never mix


async def test_not_enough_votes_ends_after_load(llm: LLMClient) -> None:
    mems = TenantMemories(InMemoryStore())
    await mems("t").add_votes(_votes(3))
    events: list[str] = []
    g = build_synthesis_graph(
        llm=llm, memory_for=mems, fit_config=SMALL, checkpointer=InMemorySaver(),
        on_event=lambda node, phase, info: events.append(node),
    )
    runner = SynthesisRunner(g, mems)
    assert await runner.run("t", USER) is None
    assert set(events) == {"load_votes"}
    state = await runner.run_state("t", USER)  # a finished thread is simply run again
    assert state["status"] == "not_enough_votes" and "at least 5" in state["message"]


class FlakyPersona:
    """Delegates to a real client but fails the first persona-writer call, like a crash mid-run."""

    def __init__(self, inner: LLMClient) -> None:
        self.inner = inner
        self.model = inner.model
        self.stats = inner.stats
        self.sites: list[str] = []
        self.fail = True

    async def complete(self, messages: Any, **kw: Any) -> Any:
        self.sites.append(kw.get("call_site", ""))
        if kw.get("call_site") == "persona" and self.fail:
            self.fail = False
            raise ConnectionError("simulated crash in the persona node")
        return await self.inner.complete(messages, **kw)

    async def structured(self, messages: Any, schema: Any, **kw: Any) -> Any:
        return await self.inner.structured(messages, schema, **kw)

    async def aclose(self) -> None:
        return None


async def test_failed_node_resumes_without_redoing_bootstrap(llm: LLMClient, tmp_path: Path) -> None:
    mems = TenantMemories(InMemoryStore())
    await mems("t").add_votes(_votes(8))
    flaky = FlakyPersona(llm)
    events: list[str] = []
    async with open_checkpointer(tmp_path) as cp:
        g = build_synthesis_graph(
            llm=flaky, memory_for=mems, fit_config=SMALL, checkpointer=cp,
            on_event=lambda node, phase, info: events.append(f"{node}:{phase}"),
        )
        runner = SynthesisRunner(g, mems)
        with pytest.raises(ConnectionError):
            await runner.run("t", USER)
        boot_calls = flaky.sites.count("bootstrap") + flaky.sites.count("bootstrap_score")
        assert boot_calls > 0 and (tmp_path / "checkpoints.sqlite").exists()
        flaky.sites.clear()
        prof = await runner.run("t", USER)
    assert prof is not None and prof.version == 1
    assert events.count("bootstrap:start") == 1 and events.count("load_votes:start") == 1
    assert events.count("persona:start") == 2 and events.count("save:start") == 1
    assert "bootstrap" not in flaky.sites and "bootstrap_score" not in flaky.sites
    assert len(await mems("t").persona_history(USER)) == 1


CHILD = r"""
import asyncio, json, sys
import httpx
from store.chroma import ChromaStore
from graphs._common import TenantMemories, open_checkpointer
from graphs.synthesis import SynthesisRunner, build_synthesis_graph
from synth_agent.engine.synthesize import FitConfig
from synth_agent.llm.client import EndpointConfig, LLMClient
from synth_agent.models import Vote

base_url, home, log_path, votes_path = sys.argv[1:5]
sim_url = base_url.removesuffix("/v1")

def on_event(node, phase, info):
    with open(log_path, "a") as fh:
        fh.write(f"{node}:{phase}\n")
    if node == "bootstrap" and phase == "end" and "--slow-after-bootstrap" in sys.argv:
        httpx.post(sim_url + "/admin/config", json={"latency_ms": 30000})  # the persona call now hangs

async def main():
    mems = TenantMemories(ChromaStore(path=home + "/chroma"))
    memory = mems("acme")
    votes = [Vote.model_validate(v) for v in json.load(open(votes_path))]
    await memory.add_votes(votes)  # idempotent: the rerun adds nothing
    llm = LLMClient(EndpointConfig(base_url=base_url, max_concurrency=4), cache=False)
    async with open_checkpointer(home) as cp:
        g = build_synthesis_graph(llm=llm, memory_for=mems, checkpointer=cp, on_event=on_event,
                                  fit_config=FitConfig(n_trials=2, n_demo_candidates=2))
        prof = await SynthesisRunner(g, mems).run("acme", votes[0].user_id)
    history = await memory.persona_history(votes[0].user_id)
    print(json.dumps({"version": prof.version, "history": len(history),
                      "unverified": prof.meta["n_traces"] - prof.meta["n_verified"]}))

asyncio.run(main())
"""


def test_sigkill_during_synthesis_resumes_from_checkpoint(tmp_path: Path) -> None:
    """A process killed in the persona node is rerun: bootstrap is not redone, the persona is saved once."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    votes_path = tmp_path / "votes.json"
    votes_path.write_text(json.dumps([v.model_dump(mode="json") for v in _votes(8)]))
    log = tmp_path / "nodes.log"
    home = tmp_path / "home"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "ANONYMIZED_TELEMETRY": "False"}
    with SimEndpoint(seed=5) as ep:
        args = [sys.executable, str(script), ep.base_url, str(home), str(log), str(votes_path)]
        proc = subprocess.Popen([*args, "--slow-after-bootstrap"], env=env, cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            for _ in range(6000):  # poll the node log (up to ~60 s; no timing is asserted)
                if log.exists() and "persona:start" in log.read_text():
                    break
                if proc.poll() is not None:
                    pytest.fail(f"child ended early: {proc.communicate()[1].decode()[-2000:]}")
                time.sleep(0.01)
            else:
                pytest.fail("the child never reached the persona node")
            while ep.stats()["in_flight"] == 0:  # the persona request is hanging at the endpoint
                time.sleep(0.01)
            first_run = ep.stats()["completions"]
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == -signal.SIGKILL
        assert first_run >= 6  # at least one bootstrap judgment per train vote was paid for
        ep.configure(latency_ms=0)
        ep.reset_stats()
        done = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, timeout=120)
        assert done.returncode == 0, done.stderr.decode()[-3000:]
        second_run = ep.stats()["completions"]
    result = json.loads(done.stdout.decode().strip().splitlines()[-1])
    entries = [line.split(":")[0] for line in log.read_text().split() if line.endswith(":start")]
    assert entries.count("load_votes") == 1 and entries.count("bootstrap") == 1
    assert entries.count("persona") == 2 and entries.count("save") == 1
    r = result.pop("unverified")  # with persona_votes="all" the writer gets a rationale for each (one call)
    assert result == {"version": 1, "history": 1}
    # the rerun paid for the persona node (1, + r rationales with "all"), the demo search (2 candidates x 2 validation
    # votes) and the select node (r rationales again: no cache here; 3 fold personas; 8 votes x 2 orders x
    # 2 judges less the 8 bootstrap traces it reuses), never for bootstrap's 8 judgments again
    assert 1 <= second_run <= 1 + r + 2 * 2 + r + 3 + (8 * 2 * 2 - 8)


async def test_postgres_without_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "langgraph.checkpoint.postgres.aio", None)
    with pytest.raises(RuntimeError, match="synth-agent\\[postgres\\]"):
        async with open_checkpointer(postgres_dsn="postgresql://nobody@localhost/none"):
            pass


def test_langgraph_json_graphs_import() -> None:
    spec = json.loads((ROOT / "langgraph.json").read_text())
    assert set(spec["graphs"]) == {"chat", "synthesis", "rerank"}
    for target in spec["graphs"].values():
        path, attr = target.split(":")
        module = importlib.import_module(path.removeprefix("./").removesuffix(".py").replace("/", "."))
        compiled = getattr(module, attr)
        assert compiled.checkpointer is None  # the platform supplies persistence
        assert compiled.get_graph().nodes


async def test_synthesis_graph_reads_store_from_runtime(llm: LLMClient) -> None:
    """Without memory_for, nodes use the store given at compile time (injected through Runtime)."""
    store = InMemoryStore()
    await TenantMemories(store)("t").add_votes(_votes(6))
    g = build_synthesis_graph(llm=llm, fit_config=SMALL, store=store)
    state = await g.ainvoke({"tenant_id": "t", "user_id": USER, "run_id": "manual"})
    assert state["status"] == "fitted" and state["profile"]["version"] == 1
    with pytest.raises(ValueError, match="needs a user"):
        await g.ainvoke({"tenant_id": "t"})


def test_thread_id_format() -> None:
    assert synthesis_thread_id("acme", "ana", "v3") == "synth:acme:ana:v3"
    assert asyncio.iscoroutinefunction(SynthesisRunner.run)


async def test_same_thread_rerun_fits_all_votes_and_noop_saves_nothing(llm: LLMClient, sim: SimEndpoint) -> None:
    """Studio reuses a thread: a rerun after new votes saves a new version from all votes; without new
    votes it ends after load_votes (no LLM call, nothing saved); ``force`` refits once and is consumed."""
    mems = TenantMemories(InMemoryStore())
    await mems("t").add_votes(_votes(8))
    events: list[str] = []
    g = build_synthesis_graph(
        llm=llm, memory_for=mems, fit_config=SMALL, checkpointer=InMemorySaver(),
        on_event=lambda node, phase, info: events.append(node) if phase == "start" else None,
    )
    cfg = {"configurable": {"thread_id": "studio-thread", "synth_user_id": USER, "tenant_id": "t"}}
    first = await g.ainvoke({}, cfg)
    assert first["status"] == "fitted" and first["profile"]["version"] == 1 and first["n_votes"] == 8

    sim.reset_stats()
    events.clear()
    same = await g.ainvoke({}, cfg)
    assert same["status"] == "unchanged" and same["profile"]["version"] == 1
    assert events == ["load_votes"] and sim.stats()["completions"] == 0
    assert len(await mems("t").persona_history(USER)) == 1

    await mems("t").add_votes(_votes(11)[8:])
    assert await mems("t").count_votes(USER) == 11
    rerun = await g.ainvoke({}, cfg)
    assert rerun["status"] == "fitted" and rerun["profile"]["version"] == 2
    assert len(rerun["profile"]["vote_ids"]) == 11 and rerun["n_votes"] == 11
    v2 = await mems("t").current_persona(USER)
    assert v2 is not None and v2.version == 2 and set(v2.vote_ids) == {v.id for v in await mems("t").list_votes(USER)}
    assert v2.meta["synthesis_thread"] == "studio-thread"  # same thread as v1, yet saved

    forced = await g.ainvoke({"force": True}, cfg)
    assert forced["status"] == "fitted" and forced["profile"]["version"] == 3
    after = await g.ainvoke({}, cfg)  # force was consumed by the forced run
    assert after["status"] == "unchanged" and len(await mems("t").persona_history(USER)) == 3


async def test_two_runs_of_the_same_fit_save_one_version(llm: LLMClient) -> None:
    """A background fit and a manual one of the same votes and settings, running at once on two threads:
    one saves, the other reports it unchanged and saves nothing (it used to save a second, identical-input
    version, which also made a later "nothing new" check see another version than the caller's)."""
    mems = TenantMemories(InMemoryStore())
    await mems("t").add_votes(_votes(8))
    g = build_synthesis_graph(llm=llm, memory_for=mems, fit_config=SMALL, checkpointer=InMemorySaver())
    runs = [{"configurable": {"thread_id": f"thread-{i}", "synth_user_id": USER, "tenant_id": "t"}} for i in (1, 2)]
    outs = await asyncio.gather(*(g.ainvoke({}, cfg) for cfg in runs))
    assert sorted(o["status"] for o in outs) == ["fitted", "unchanged"]
    assert [o["profile"]["version"] for o in outs] == [1, 1]
    assert len(await mems("t").persona_history(USER)) == 1


async def test_due_only_runs_fit_only_when_the_policy_says_so(llm: LLMClient) -> None:
    mems = TenantMemories(InMemoryStore())
    await mems("t").add_votes(_votes(5))
    g = build_synthesis_graph(llm=llm, memory_for=mems, fit_config=SMALL, checkpointer=InMemorySaver())
    cfg = {"configurable": {"thread_id": "bg", "synth_user_id": USER, "tenant_id": "t"}}
    assert (await g.ainvoke({"due_only": True}, cfg))["profile"]["version"] == 1  # first fit at 5 votes
    await mems("t").add_votes(_votes(7)[5:])
    late = await g.ainvoke({"due_only": True}, cfg)  # 7 votes: the next refit is at 10
    assert late["status"] == "not_due" and "next fit at 10" in late["message"] and late["profile"]["version"] == 1
    manual = await g.ainvoke({}, cfg)  # a manual run fits whenever there are new votes
    assert manual["status"] == "fitted" and manual["profile"]["version"] == 2


async def test_crash_after_save_resumes_without_saving_twice(llm: LLMClient) -> None:
    """The guard is keyed on the run (fit_id in the checkpoint), not the thread: a run that saved and then
    died before its checkpoint resumes into the same version."""
    store = InMemoryStore()
    mems = TenantMemories(store)
    memory = mems("t")
    await memory.add_votes(_votes(8))
    real_save = memory.save_persona
    crashes = []

    async def save_then_crash(profile: Any, **kw: Any) -> Any:
        saved = await real_save(profile, **kw)
        if not crashes:
            crashes.append(saved.version)
            raise ConnectionError("process died right after the store write")
        return saved

    memory.save_persona = save_then_crash  # type: ignore[method-assign]
    g = build_synthesis_graph(llm=llm, memory_for=mems, fit_config=SMALL, checkpointer=InMemorySaver())
    runner = SynthesisRunner(g, mems)
    with pytest.raises(ConnectionError):
        await runner.run("t", USER, run_id="v1")
    prof = await runner.run("t", USER, run_id="v1")  # resumes at save
    assert crashes == [1] and prof is not None and prof.version == 1
    assert len(await memory.persona_history(USER)) == 1


async def test_a_few_new_votes_take_the_refit_node_and_keep_the_persona(llm: LLMClient, sim: SimEndpoint) -> None:
    """load_votes → refit: only the new votes are judged (no persona written, no candidate raced); the saved
    version keeps the persona and demos and its guard evidence covers the new votes."""
    mems = TenantMemories(InMemoryStore())
    await mems("t").add_votes(_votes(8))
    events: list[str] = []
    g = build_synthesis_graph(
        llm=llm, memory_for=mems, fit_config=SMALL,
        on_event=lambda node, phase, info: events.append(node) if phase == "start" else None,
    )
    first = await SynthesisRunner(g, mems).run_state("t", USER)
    assert first["status"] == "fitted"
    await mems("t").add_votes(_votes(10)[8:])
    sim.reset_stats()
    events.clear()
    state = await SynthesisRunner(g, mems).run_state("t", USER)
    assert events == ["load_votes", "refit"] and state["status"] == "fitted"
    v1, v2 = (await mems("t").persona_history(USER))[-2:]
    assert v2.version == 2 and v2.persona == v1.persona and v2.demos == v1.demos
    assert v2.meta["refit"]["new_vote_ids"] == [v.id for v in _votes(10)[8:]]
    assert v2.meta["selection"]["n_votes"] == 10 and len(v2.vote_ids) == 10
    sel = v2.meta["selection"]
    assert sim.stats()["completions"] == 2 + 2 * sel["orders"] + 2 * (sel["orders"] - 1)  # traces, p+d, default
    assert set(state["usage"]) == {"refit"}
    again = await SynthesisRunner(g, mems).run_state("t", USER)
    assert again["status"] == "unchanged"


async def test_the_graph_skips_the_demo_race_where_the_guard_serves_no_demos_as_fit_does(llm: LLMClient) -> None:
    """The select node runs before the demos node: with ``race_demos="served"``, for a user the guard serves the
    default the demos node keeps an unraced set and asks nothing; the saved profile matches ``Synthesizer.fit``'s."""
    from dataclasses import replace

    from synth_agent.engine.synthesize import Synthesizer

    pop = Population(8, seed=3)
    store = InMemoryStore()
    mems = TenantMemories(store)
    lazy = replace(SMALL, race_demos="served")
    g = build_synthesis_graph(llm=llm, memory_for=mems, fit_config=lazy, checkpointer=InMemorySaver())
    for uid in pop.user_ids:
        votes = pop.votes(uid, 12)
        await mems("acme").add_votes(votes)
        state = await SynthesisRunner(g, mems).run_state("acme", uid)
        saved = await mems("acme").current_persona(uid)
        assert saved is not None and state["status"] == "fitted"
        if saved.meta["demos_status"] == "unraced":
            break
    else:
        pytest.fail("the guard served persona + demos to every user")
    assert "demos" not in state["usage"] and saved.val_accuracy is None and saved.demos
    direct = await Synthesizer(llm, None, lazy).fit(uid, votes, save=False)
    assert direct.profile is not None and direct.profile.meta["demos_status"] == "unraced"
    assert direct.profile.demos == saved.demos and direct.profile.persona == saved.persona
    assert direct.profile.meta["selection"] == saved.meta["selection"]
