"""One convention for configuration: Settings, EndpointConfig and FitConfig are validated when built
(a bad value fails at load time, naming the field) and frozen (a changed copy is a new object)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
from pydantic import ValidationError

from synth_agent.config import Settings
from synth_agent.engine import FitConfig
from synth_agent.llm import EndpointConfig


@pytest.mark.parametrize(("var", "value"), [
    ("SYNTH_AGENT_MAX_CONCURRENCY", "0"), ("SYNTH_AGENT_MAX_CONCURRENCY", "many"), ("SYNTH_AGENT_REQUEST_TIMEOUT", "0"),
    ("SYNTH_AGENT_MAX_RETRIES", "-1"), ("SYNTH_AGENT_RATE_LIMIT", "-2"), ("CHROMA_PORT", "70000"),
    ("SYNTH_AGENT_CONTEXT_LENGTH", "0"),
])
def test_settings_reject_bad_environment_at_load(monkeypatch: pytest.MonkeyPatch, var: str, value: str) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ValidationError):
        Settings()


def test_settings_are_frozen_and_copies_are_new_objects() -> None:
    s = Settings(max_concurrency=4)
    with pytest.raises(ValidationError):
        s.max_concurrency = 8  # type: ignore[misc]
    t = s.model_copy(update={"max_concurrency": 8})
    assert (s.max_concurrency, t.max_concurrency) == (4, 8)


def test_endpoint_config_validated_and_frozen() -> None:
    with pytest.raises(ValidationError):
        EndpointConfig(base_url="http://x/v1", max_concurrency=0)
    cfg = EndpointConfig(base_url="http://x/v1")
    with pytest.raises(ValidationError):
        cfg.timeout = 1.0  # type: ignore[misc]
    assert EndpointConfig.from_settings(Settings(max_concurrency=3)).max_concurrency == 3


def test_fit_config_validated_when_built_and_frozen() -> None:
    assert FitConfig(n_trials="3").n_trials == 3  # type: ignore[arg-type]  # numeric strings are read as numbers
    with pytest.raises(ValidationError, match="n_trials"):
        FitConfig(n_trials="three")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="score_mode"):
        FitConfig(score_mode="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_trials must be at least 1"):
        FitConfig(n_trials=0)
    with pytest.raises(ValidationError):
        FitConfig(trials=3)  # type: ignore[call-arg]  # unknown field: a typo is not silently ignored
    cfg = FitConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1  # type: ignore[misc]
    assert dataclasses.replace(cfg, seed=2).seed == 2
    with pytest.raises(ValidationError):
        dataclasses.replace(cfg, seed="two")


def test_cli_reports_a_bad_environment_variable_in_one_line_before_anything_runs(tmp_path) -> None:
    env = {**os.environ, "SYNTH_AGENT_MAX_CONCURRENCY": "0", "SYNTH_AGENT_HOME": str(tmp_path / "home")}
    r = subprocess.run([sys.executable, "-m", "synth_agent.cli", "votes", "--user", "ana"], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "max_concurrency" in lines[0] and "Traceback" not in r.stderr
    assert not (tmp_path / "home").exists()  # nothing was opened or created
