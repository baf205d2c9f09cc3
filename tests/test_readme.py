"""Every Python and shell snippet of the README runs as written, offline, against the simulator.

The runner is a small extraction of fenced blocks (``python``, ``bash``/``sh``/``shell``) rather
than a plugin: the README's shell snippets matter as much as its Python ones, and they need a
shared working directory (a file written by one command is read by the next) and background
servers (``synth-agent serve ... &``) that live until their section ends.

How a section runs, as a new user would type it:

* a fresh temporary directory is the working directory, holding a ``.venv`` link to this
  checkout's virtualenv (so ``. .venv/bin/activate`` works) and nothing else; ``SYNTH_AGENT_HOME``
  and every ``SYNTH_AGENT_*``/``OPENAI_*``/``CHROMA_*`` variable of the test process are cleared;
* ``OPENAI_BASE_URL`` points at an offline simulator started for the session (the README tells
  the reader what to export for a real model instead), and the proxy's port ``8080`` is
  replaced by a free ephemeral port (other engineers run tests on this machine);
* blocks run in order: shell blocks with ``bash -e -o pipefail``, Python blocks with this
  virtualenv's interpreter; each must exit 0; processes a shell block left in the background
  are ended (their whole process group) when the section ends.

A block that cannot run offline says so on the line before its fence:
``<!-- readme-test: skip REASON -->``. :func:`test_every_runnable_block_is_executed` lists them and
fails on a skip without a reason or on an unknown fence language that looks executable.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RUNNABLE = {"python": "python", "py": "python", "bash": "bash", "sh": "bash", "shell": "bash"}
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\b\s*(?P<reason>.*?)\s*-->")
FENCE = re.compile(r"^```(?P<lang>[\w+-]*)\s*$")
BLOCK_TIMEOUT = 300


@dataclass
class Block:
    section: str
    line: int
    lang: str
    code: str
    skip: str | None


def blocks(text: str) -> list[Block]:
    """Fenced code blocks with their section (``##`` heading), first line number and skip marker."""
    out: list[Block] = []
    section = "(top)"
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            section = line[3:].strip()
        m = FENCE.match(line)
        if m is None:
            i += 1
            continue
        start = i
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        prev = next((lines[k] for k in range(start - 1, -1, -1) if lines[k].strip()), "")
        sm = SKIP.search(prev)
        out.append(Block(section, start + 1, m.group("lang").lower(), "\n".join(lines[start + 1: j]) + "\n",
                         sm.group("reason") if sm else None))
        i = j + 1
    return out


ALL = blocks(README.read_text(encoding="utf-8"))
SECTIONS = list(dict.fromkeys(b.section for b in ALL if b.lang in RUNNABLE and b.skip is None))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def simulator():
    from synth_agent.sim.server import SimProcess

    with SimProcess() as sim:
        yield sim.base_url


def test_every_runnable_block_is_executed() -> None:
    runnable = [b for b in ALL if b.lang in RUNNABLE]
    assert len(runnable) >= 5, "the README lost its snippets?"
    for b in ALL:
        assert b.lang, f"README.md:{b.line}: a fence without a language (say python, bash, json, toml, text...)"
        assert b.skip is None or b.skip.strip(), f"README.md:{b.line}: a skip marker needs a reason"
    skipped = [f"README.md:{b.line} ({b.section}): {b.skip}" for b in runnable if b.skip is not None]
    print("not executed:\n  " + "\n  ".join(skipped) if skipped else "every runnable block is executed")
    # a handful at most (`make test` itself, paid keys, GPUs): the README is meant to run offline
    assert len(skipped) <= 5, skipped


@pytest.mark.parametrize("section", SECTIONS)
def test_readme_section_runs(section: str, simulator: str, tmp_path: Path) -> None:
    (tmp_path / ".venv").symlink_to(Path(sys.prefix))  # the virtualenv running the tests (`make test`: .venv)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SYNTH_AGENT_", "OPENAI_", "CHROMA_", "VIRTUAL_ENV", "PYTHONPATH"))}
    env.update(OPENAI_BASE_URL=simulator, OPENAI_API_KEY="sim", PYTHONUNBUFFERED="1", TERM="dumb")
    port = str(free_port())
    groups: list[int] = []
    try:
        for n, b in enumerate(b for b in ALL if b.section == section and b.lang in RUNNABLE and b.skip is None):
            code = b.code.replace("8080", port)
            if RUNNABLE[b.lang] == "python":
                path = tmp_path / f"snippet_{n}.py"
                path.write_text(code)
                argv = [sys.executable, str(path)]
            else:
                path = tmp_path / f"snippet_{n}.sh"
                path.write_text(code)
                argv = ["bash", "-e", "-o", "pipefail", str(path)]
            # output to files, not pipes: a server left running with `&` keeps a pipe open for ever
            out_path, err_path = path.with_suffix(".out"), path.with_suffix(".err")
            with out_path.open("w") as out, err_path.open("w") as err:
                proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                        stderr=err, text=True, start_new_session=True)
            groups.append(proc.pid)
            try:
                proc.wait(timeout=BLOCK_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            stdout, stderr = out_path.read_text(errors="replace"), err_path.read_text(errors="replace")
            assert proc.returncode is not None and proc.returncode >= 0, (
                f"README.md:{b.line} did not finish within {BLOCK_TIMEOUT}s\n{stdout[-3000:]}\n{stderr[-3000:]}")
            assert proc.returncode == 0, (
                f"README.md:{b.line} ({section}) exited {proc.returncode}\n--- block\n{textwrap.indent(code, '  ')}"
                f"--- stdout\n{stdout[-4000:]}\n--- stderr\n{stderr[-4000:]}"
            )
    finally:
        # servers a block started with `&` share its process group: end them like Ctrl-C would
        for pgid in groups:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(pgid, sig)
                except ProcessLookupError:
                    break
                if sig == signal.SIGTERM:
                    deadline = time.monotonic() + 15
                    while time.monotonic() < deadline:
                        try:
                            os.killpg(pgid, 0)
                        except ProcessLookupError:
                            break
                        time.sleep(0.1)
