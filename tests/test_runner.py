"""The event loop of the commands that run fits (synth_agent/runner.py): uvloop by default, asyncio's on request,
the start-up heap frozen, nothing changed by importing the library, and the same fit on either loop."""

from __future__ import annotations

import asyncio
import gc
import inspect
import json
import subprocess
import sys
from typing import Any

import pytest
import uvloop

from synth_agent.engine import FitConfig, Synthesizer
from synth_agent.llm.client import EndpointConfig, LLMClient
from synth_agent.runner import YOUNG_COLLECTION_THRESHOLD, event_loop_name, run_fits
from synth_agent.sim.population import Population
from synth_agent.sim.server import SimEndpoint


@pytest.fixture
def unfreeze():
    """run_fits freezes the heap (meant for a command's process): give this test process its collector back."""
    yield
    gc.unfreeze()


async def _loop_type() -> type:
    return type(asyncio.get_running_loop())


def test_fits_run_on_uvloop_by_default_with_the_start_up_heap_frozen(monkeypatch, unfreeze):
    monkeypatch.delenv("SYNTH_AGENT_EVENT_LOOP", raising=False)
    gc.unfreeze()
    assert event_loop_name() == "uvloop"
    assert issubclass(run_fits(_loop_type()), uvloop.Loop)
    assert gc.get_freeze_count() > 0


async def _thresholds() -> tuple[int, ...]:
    return gc.get_threshold()


def test_young_collections_are_rarer_while_fits_run_and_the_thresholds_come_back(unfreeze):
    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 7, 9)
        during = run_fits(_thresholds())
        assert during == (YOUNG_COLLECTION_THRESHOLD, 7, 9) and YOUNG_COLLECTION_THRESHOLD > 700
        assert gc.get_threshold() == (700, 7, 9)
        with pytest.raises(ZeroDivisionError):  # put back however the fits end
            run_fits(_divide_by_zero())
        assert gc.get_threshold() == (700, 7, 9)
        gc.set_threshold(10 * YOUNG_COLLECTION_THRESHOLD, 10, 10)  # a process that chose a higher one keeps it
        assert run_fits(_thresholds()) == (10 * YOUNG_COLLECTION_THRESHOLD, 10, 10)
    finally:
        gc.set_threshold(*before)


async def _divide_by_zero() -> float:
    return 1 / 0


def test_asyncio_loop_on_request(monkeypatch, unfreeze):
    monkeypatch.setenv("SYNTH_AGENT_EVENT_LOOP", " AsyncIO ")
    loop_type = run_fits(_loop_type())
    assert not issubclass(loop_type, uvloop.Loop) and issubclass(loop_type, asyncio.BaseEventLoop)
    assert issubclass(run_fits(_loop_type(), loop="uvloop"), uvloop.Loop)  # an explicit choice wins


def test_an_unknown_event_loop_is_refused_by_name_before_anything_runs(monkeypatch):
    monkeypatch.setenv("SYNTH_AGENT_EVENT_LOOP", "trio")
    coro = _loop_type()
    gc.unfreeze()
    with pytest.raises(ValueError, match="SYNTH_AGENT_EVENT_LOOP must be one of uvloop, asyncio, got 'trio'"):
        run_fits(coro)
    assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED  # closed, never "never awaited"
    assert gc.get_freeze_count() == 0


def test_the_fit_commands_refuse_an_unknown_event_loop_with_exit_2(tmp_path, monkeypatch, capsys):
    import signal

    from synth_agent.cli import run

    monkeypatch.setenv("SYNTH_AGENT_EVENT_LOOP", "trio")
    handler = signal.getsignal(signal.SIGTERM)
    try:
        for args in (["fit", "--user", "u1"], ["eval", str(tmp_path / "votes.jsonl")], ["worker"]):
            if args[0] == "eval":
                (tmp_path / "votes.jsonl").write_text("")
            code = run(["--home", str(tmp_path / "home"), *args])
            err = capsys.readouterr().err
            lines = [x for x in err.splitlines() if x.strip()]
            assert code == 2, err
            assert len(lines) == 1 and "SYNTH_AGENT_EVENT_LOOP" in lines[0], err
    finally:
        signal.signal(signal.SIGTERM, handler)


def test_importing_the_library_sets_no_loop_policy_and_freezes_nothing():
    code = (
        "import asyncio, gc, json\n"
        "before = [gc.get_freeze_count(), type(asyncio.get_event_loop_policy()).__module__, gc.get_threshold()]\n"
        "import synth_agent, synth_agent.cli, synth_agent.runner, synth_agent.engine, synth_agent.llm.client\n"
        "import synth_agent.proxy.cli\n"
        "after = [gc.get_freeze_count(), type(asyncio.get_event_loop_policy()).__module__, gc.get_threshold()]\n"
        "print(json.dumps([before, after]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    before, after = json.loads(out.stdout.strip().splitlines()[-1])
    assert after == before
    assert after[0] == 0 and after[1].startswith("asyncio")


def _fit_result(base_url: str, loop: str) -> dict[str, Any]:
    pop = Population(2, seed=3)

    async def go() -> dict[str, Any]:
        async with LLMClient(EndpointConfig(base_url=base_url)) as llm:
            out = {}
            for u in pop.user_ids:
                res = await Synthesizer(llm, None, FitConfig(seed=0)).fit(u, pop.votes(u, 12))
                assert res.profile is not None
                out[u] = [res.profile.persona, [d.model_dump() for d in res.profile.demos],
                          res.profile.val_accuracy, res.usage.get("llm_requests")]
            return out

    return run_fits(go(), loop=loop)


def test_a_fit_on_uvloop_equals_the_fit_on_asyncios_loop(unfreeze):
    with SimEndpoint() as ep:
        assert _fit_result(ep.base_url, "uvloop") == _fit_result(ep.base_url, "asyncio")
