"""What a new user meets first: quiet output, a demo that states its cost before spending money."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from synth_agent.cli import quiet_third_party


def test_third_party_warnings_hidden_unless_verbose(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY"):
        monkeypatch.delenv(var, raising=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_third_party()
        warnings.warn_explicit("noise from a library", UserWarning, "x.py", 1, module="chromadb.api")
        warnings.warn_explicit("ours", UserWarning, "y.py", 1, module="synth_agent.store")
        warnings.warn_explicit("ours too", UserWarning, "z.py", 1, module="store")
        warnings.warn_explicit("look-alike", UserWarning, "w.py", 1, module="storex")
    assert [str(w.message) for w in seen] == ["ours", "ours too"]
    assert os.environ["TQDM_DISABLE"] == "1" and os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_third_party(verbose=True)
        warnings.warn_explicit("noise from a library", UserWarning, "x.py", 1, module="chromadb.api")
    assert len(seen) == 1


NOISE = re.compile(r"Warning|warn\(|Loading weights|\d+%\|| it/s|Traceback", re.IGNORECASE)


def test_ingest_and_fit_print_no_library_noise(tmp_path: Path) -> None:
    from synth_agent.sim.server import SimProcess

    env = {k: v for k, v in os.environ.items() if not k.startswith(("SYNTH_AGENT_", "OPENAI_", "CHROMA_"))}
    env["SYNTH_AGENT_HOME"] = str(tmp_path / "home")
    exe = [sys.executable, "-m", "synth_agent.cli"]
    with SimProcess() as sim:
        env["OPENAI_BASE_URL"] = sim.base_url
        for argv in (["sim-population", "--users", "2", "--votes", "8", "--out", "v.jsonl"], ["ingest", "v.jsonl"],
                     ["fit", "--all"]):
            r = subprocess.run([*exe, *argv], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, r.stderr
            assert not NOISE.search(r.stdout + r.stderr), (argv, r.stdout, r.stderr)


def test_demo_states_its_cost_and_waits_for_consent_before_a_real_endpoint(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "keep").write_text("an earlier run's store")
    env = {**os.environ, "OPENAI_BASE_URL": "http://127.0.0.1:9/v1", "OPENAI_API_KEY": "sk-not-the-simulator",
           "COLUMNS": "200"}
    r = subprocess.run([sys.executable, "-m", "synth_agent.demo", "--home", str(home), "--out", str(tmp_path / "out")],
                       cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert re.search(r"about [\d,]+ LLM requests with about [\d.]+M prompt", r.stdout), r.stdout
    assert "--yes" in r.stdout
    assert (home / "keep").exists() and not (tmp_path / "out").exists()  # nothing touched, nothing spent
