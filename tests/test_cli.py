"""The `synth-agent` CLI as a user drives it: ingest → fit → persona → judge/rerank/export → eval → forget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from synth_agent.cli import app
from synth_agent.sim.population import write_population_jsonl
from synth_agent.sim.server import SimEndpoint

runner = CliRunner()


@pytest.fixture(scope="module")
def sim():
    with SimEndpoint() as ep:
        yield ep


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, list[str]]:
    d = tmp_path_factory.mktemp("cli")
    path = d / "votes.jsonl"
    pop = write_population_jsonl(path, 3, 12, seed=4)
    return path, pop.user_ids


def cli(home: Path, sim, *args: str):
    res = runner.invoke(app, ["--home", str(home), "--base-url", sim.base_url, *args])
    return res


def test_help_reads_well():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in ("ingest", "fit", "persona", "judge", "rerank", "export-prompt", "eval", "forget",
                "sim-endpoint", "sim-population", "judge-server"):
        assert cmd in res.output
    for cmd in ("ingest", "fit", "eval", "export-prompt"):
        sub = runner.invoke(app, [cmd, "--help"])
        assert sub.exit_code == 0 and "Usage" in sub.output


def test_full_user_journey(tmp_path, sim, data):
    path, users = data
    home = tmp_path / "home"
    u = users[0]

    res = cli(home, sim, "ingest", str(path))
    assert res.exit_code == 0, res.output
    assert "36 new vote(s)" in res.output

    again = cli(home, sim, "ingest", str(path))
    assert again.exit_code == 0 and "0 new vote(s), 36 already stored" in again.output

    listed = cli(home, sim, "votes", "--user", u, "--json")
    lines = [json.loads(x) for x in listed.output.strip().splitlines()]
    assert len(lines) == 12 and all(x["user_id"] == u for x in lines)
    stamps = [x["timestamp"] for x in lines]
    assert stamps == sorted(stamps)

    fit = cli(home, sim, "fit", "--user", u)
    assert fit.exit_code == 0, fit.output
    assert "persona v1" in fit.output

    shown = cli(home, sim, "persona", "--user", u, "--json")
    profile = json.loads(shown.output)
    assert profile["user_id"] == u and profile["version"] == 1 and profile["persona"]

    judged = cli(home, sim, "judge", "--user", u, "--prompt", "How do I sort a list in Python?",
                 "--a", "Use sorted(xs).", "--b", "- Use `sorted(xs)`\n- or `xs.sort()` in place")
    assert judged.exit_code == 0, judged.output
    assert "persona v1" in judged.output

    ranked = cli(home, sim, "rerank", "--user", u, "--prompt", "Tips for a trip to Rome?",
                 "-c", "Visit the Colosseum.", "-c", "## Rome\n- Colosseum\n- Vatican", "-c", "Go in spring 😊")
    assert ranked.exit_code == 0, ranked.output
    assert "winner: candidate" in ranked.output

    system = cli(home, sim, "export-prompt", "--user", u, "--format", "system")
    assert profile["persona"] in system.output
    messages = json.loads(cli(home, sim, "export-prompt", "--user", u, "--format", "messages").output)
    assert messages[0]["role"] == "system" and "{response_a}" in messages[-1]["content"]
    exported = json.loads(cli(home, sim, "export-prompt", "--user", u, "--format", "json").output)
    assert exported["persona"] == profile["persona"]

    bad_fmt = cli(home, sim, "export-prompt", "--user", u, "--format", "yaml")
    assert bad_fmt.exit_code != 0 and "must be one of" in bad_fmt.output

    gone = cli(home, sim, "forget", "--user", u, "--yes")
    assert gone.exit_code == 0 and "votes=12" in gone.output
    after = cli(home, sim, "persona", "--user", u)
    assert after.exit_code == 1 and "no persona" in after.output
    other = cli(home, sim, "votes", "--user", users[1], "--json")
    assert len(other.output.strip().splitlines()) == 12  # other users untouched


def test_ingest_reports_bad_lines_and_keeps_good_ones(tmp_path, sim, data):
    path, users = data
    good = path.read_text().splitlines()[:2]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([good[0], "{oops", json.dumps({"user_id": "x", "context": [], "chosen": "a",
                                                           "rejected": "b"}), good[1]]) + "\n")
    res = cli(tmp_path / "h", sim, "ingest", str(bad))
    assert res.exit_code == 2
    assert ":2:" in res.output and "not valid JSON" in res.output
    assert ":3:" in res.output and "context is empty" in res.output
    assert "2 new vote(s)" in res.output
    missing = cli(tmp_path / "h", sim, "ingest", str(tmp_path / "nope.jsonl"))
    assert missing.exit_code == 1 and "no such vote file" in missing.output


def test_eval_writes_report_and_plots(tmp_path, sim, data):
    path, _ = data
    out = tmp_path / "eval"
    res = cli(tmp_path / "h", sim, "eval", str(path), "--methods", "default,persona_demos",
              "--out", str(out), "--curve", "5,7")
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert set(report["methods"]) == {"default", "persona_demos"}
    assert len(report["users"]) == 3
    assert (out / "accuracy_per_method.png").stat().st_size > 1000
    assert (out / "accuracy_vs_votes.png").stat().st_size > 1000
    bad = cli(tmp_path / "h", sim, "eval", str(path), "--methods", "default,magic")
    assert bad.exit_code == 1 and "unknown method" in bad.output


def test_sim_population_writes_valid_jsonl(tmp_path):
    out = tmp_path / "p.jsonl"
    res = runner.invoke(app, ["sim-population", "--users", "2", "--votes", "3", "--out", str(out)])
    assert res.exit_code == 0
    assert len(out.read_text().splitlines()) == 6
