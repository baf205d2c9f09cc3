"""Every example runs offline against the simulator (each ``main()`` starts its own SimEndpoint)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("SYNTH_AGENT_MODEL", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


def test_every_example_is_tested() -> None:
    assert {p.stem for p in EXAMPLES.glob("*.py")} == {"quickstart", "react_agent", "ab_voting", "best_of_n", "export_persona"}


def test_react_agent(capsys: pytest.CaptureFixture[str]) -> None:
    answer = load("react_agent").main()
    assert answer.strip()
    out = capsys.readouterr().out
    assert "persona v1" in out and "personalized answer" in out


def test_ab_voting(capsys: pytest.CaptureFixture[str]) -> None:
    rate = load("ab_voting").main()
    out = capsys.readouterr().out
    assert "turn 24" in out and "persona v" in out
    assert not math.isnan(rate)  # a persona appeared and personalized-vs-plain turns were voted on


def test_best_of_n(capsys: pytest.CaptureFixture[str]) -> None:
    best = load("best_of_n").main()
    out = capsys.readouterr().out
    assert best.strip() and out.count("candidate ") == 4 and "* candidate" in out


def test_export_persona(capsys: pytest.CaptureFixture[str]) -> None:
    prompt = load("export_persona").main()
    assert "<persona>" in prompt
    assert "answer with the exported persona" in capsys.readouterr().out


def test_quickstart(capsys: pytest.CaptureFixture[str]) -> None:
    persona = load("quickstart").main()
    out = capsys.readouterr().out
    assert persona.strip() and "persona v1" in out and "prefers " in out
