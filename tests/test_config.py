"""One convention for configuration: Settings, EndpointConfig and FitConfig are validated when built
(a bad value fails at load time, naming the field), frozen (a changed copy is a new object), and strict
in Python (a value of the wrong type is refused) while text from outside (environment variables, CLI
flags) is parsed."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
from pydantic import ValidationError

from synth_agent.config import Settings
from synth_agent.engine import FitConfig
from synth_agent.engine.selection import SelectionConfig
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
    with pytest.raises(ValidationError, match="n_trials"):
        FitConfig(n_trials="3")  # type: ignore[arg-type]  # strict: a string is not silently read as a number
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


@pytest.mark.parametrize(("build", "field"), [
    (lambda: Settings(max_concurrency="4"), "max_concurrency"),
    (lambda: Settings(adaptive_concurrency=0), "adaptive_concurrency"),
    (lambda: Settings(llm_disk_cache="yes"), "llm_disk_cache"),
    (lambda: Settings(chroma_port=8000.0), "chroma_port"),
    (lambda: EndpointConfig(base_url="http://x/v1", max_concurrency="4"), "max_concurrency"),
    (lambda: EndpointConfig(base_url="http://x/v1", probe_server="no"), "probe_server"),
    (lambda: FitConfig(seed=1.5), "seed"),
    (lambda: FitConfig(verify=1), "verify"),
    (lambda: SelectionConfig(folds="3"), "folds"),
])
def test_python_values_of_the_wrong_type_are_refused(build, field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        build()


def test_the_two_conversions_that_are_not_errors(tmp_path) -> None:
    assert Settings(home=str(tmp_path)).home == tmp_path  # a str path
    assert EndpointConfig(base_url="http://x/v1", timeout=5).timeout == 5.0  # an int for a float
    assert FitConfig(train_fraction=1 / 2, target_accuracy=1).target_accuracy == 1.0
    assert SelectionConfig(candidates=["persona"]).candidates == ("persona",)  # a list for a tuple


def test_environment_strings_are_parsed(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    for var, value in {"SYNTH_AGENT_MAX_CONCURRENCY": "3", "SYNTH_AGENT_ADAPTIVE_CONCURRENCY": "0",
                       "SYNTH_AGENT_REQUEST_TIMEOUT": "2.5", "SYNTH_AGENT_CONTEXT_LENGTH": "4096", "CHROMA_PORT": "8001",
                       "SYNTH_AGENT_LLM_DISK_CACHE": "true", "SYNTH_AGENT_HOME": str(tmp_path),
                       "SYNTH_AGENT_STRUCTURED_OUTPUT": "json_schema"}.items():
        monkeypatch.setenv(var, value)
    s = Settings()
    assert (s.max_concurrency, s.adaptive_concurrency, s.request_timeout, s.context_length, s.chroma_port,
            s.llm_disk_cache, s.home, s.structured_output) == (3, False, 2.5, 4096, 8001, True, tmp_path, "json_schema")
    cfg = EndpointConfig.from_settings(s)  # the environment reaches EndpointConfig through Settings, typed
    assert (cfg.max_concurrency, cfg.adaptive_concurrency, cfg.timeout, cfg.context_length) == (3, False, 2.5, 4096)


def test_cli_flags_are_parsed_into_the_same_configs(tmp_path) -> None:
    from typer.testing import CliRunner

    from synth_agent.cli import app

    r = CliRunner().invoke(app, ["--home", str(tmp_path / "h"), "fit", "--user", "u", "--trials", "x"])
    assert r.exit_code == 2 and "--trials" in r.output  # a bad number is a usage error...
    r = CliRunner().invoke(app, ["--home", str(tmp_path / "h"), "fit", "--user", "u", "--trials", "0"])
    assert r.exit_code == 2 and "n_trials must be at least 1" in r.output  # ...and a parsed one is validated
