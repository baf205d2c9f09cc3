"""deploy/compose.yaml and docs/deploy.md stay true to the code: every variable the compose file
sets for our processes is one they read, and every command and flag it runs exists."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

from synth_agent.config import Settings
from synth_agent.proxy.settings import ProxySettings
from synth_agent.scale.settings import ScaleSettings

ROOT = Path(__file__).resolve().parents[1]


def _read_vars() -> set[str]:
    names: set[str] = set()
    for cls in (Settings, ProxySettings, ScaleSettings):
        prefix = cls.model_config.get("env_prefix", "")
        for name, f in cls.model_fields.items():
            alias = f.validation_alias
            names.add(alias.upper() if isinstance(alias, str) else (prefix + name).upper())
    return names


def _compose() -> dict:
    return yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())


def test_compose_sets_only_variables_our_processes_read() -> None:
    read = _read_vars()
    services = _compose()["services"]
    for name in ("proxy", "worker"):
        env = services[name]["environment"]
        unknown = sorted(k for k in env if k not in read)
        assert not unknown, f"{name} sets variables nothing reads: {unknown}"
        assert "SYNTH_AGENT_QUEUE" in env and "CHROMA_HOST" in env


def _help(*cmd: str) -> str:
    out = subprocess.run([sys.executable, "-m", "synth_agent.cli", *cmd, "--help"], capture_output=True,
                         text=True, timeout=120, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_compose_and_docs_commands_exist() -> None:
    services = _compose()["services"]
    for name in ("proxy", "worker"):
        cmd = services[name]["command"]
        assert cmd[0] == "synth-agent"
        text = _help(cmd[1])
        for flag in (a for a in cmd[2:] if a.startswith("--")):
            assert flag in text, f"{name}: {cmd[1]} has no {flag}"
    doc = (ROOT / "docs" / "deploy.md").read_text()
    worker_help = _help("worker")
    for flag in set(re.findall(r"`(--[a-z-]+)", doc)):
        if flag in ("--queue", "--concurrency", "--max-attempts", "--heartbeat", "--stall-timeout"):
            assert flag in worker_help, flag
    assert "--data" in _help("postgres")


def _run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "synth_agent.cli", *args], capture_output=True, text=True,
                          timeout=120, env={"PATH": "/usr/bin:/bin", **(env or {})})


def test_scale_out_processes_refuse_a_broken_setup_in_one_line() -> None:
    cases = [
        (("worker", "--queue", "postgresql://u@127.0.0.1:1/x"), {}, "needs the shared Chroma server"),
        (("worker", "--queue", "postgresql://u:s3cret@127.0.0.1:1/x", "--chroma-host", "127.0.0.1"), {},
         "cannot connect to the queue's Postgres"),
        (("worker", "--queue", "notadsn", "--chroma-host", "127.0.0.1"), {}, "cannot connect"),
        (("worker", "--chroma-host", "127.0.0.1"), {"SYNTH_AGENT_QUEUE": "x", "SYNTH_AGENT_FIRST_FIT": "1"},
         "SYNTH_AGENT_FIRST_FIT"),
        (("serve", "--no-auth", "--queue", "postgresql://u:s3cret@127.0.0.1:1/x", "--chroma-host", "127.0.0.1"), {},
         "cannot connect to the queue's Postgres"),
    ]
    for args, env, expected in cases:
        out = _run_cli(*args, env=env)
        assert out.returncode == 2, (args, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], (args, out.stderr)
        assert "s3cret" not in out.stderr  # the password is never echoed
