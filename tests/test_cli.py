"""The `synth-agent` CLI as a user drives it: ingest → fit → persona → judge/rerank/export → eval → forget."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
    assert "--full" in runner.invoke(app, ["fit", "--help"]).output  # refit from scratch, not incrementally


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
    assert bad.exit_code == 2 and "unknown method" in bad.output


def test_sim_population_writes_valid_jsonl(tmp_path):
    out = tmp_path / "p.jsonl"
    res = runner.invoke(app, ["sim-population", "--users", "2", "--votes", "3", "--out", str(out)])
    assert res.exit_code == 0
    assert len(out.read_text().splitlines()) == 6


# ------------------------------------------------------------------ bad input: one line, a documented exit code


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``synth-agent ARGS`` in-process through the real entry point (what ``main()`` runs)."""
    import signal

    from synth_agent.cli import run

    handler = signal.getsignal(signal.SIGTERM)
    try:
        code = run(list(args))
    finally:
        signal.signal(signal.SIGTERM, handler)
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(err: str) -> bool:
    lines = [x for x in err.splitlines() if x.strip()]
    return len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err


def test_ingest_of_a_latin1_or_binary_file_names_file_and_line_and_stores_nothing(tmp_path, capsys):
    home = tmp_path / "home"
    latin = tmp_path / "latin.jsonl"
    good = json.dumps({"user_id": "u1", "context": "q", "chosen": "a", "rejected": "b"})
    latin.write_bytes(good.encode() + b"\n" + '{"user_id": "u1", "context": "caf\u00e9", "chosen": "a", "rejected": "b"}'
                      .encode("latin-1") + b"\n")
    code, _, err = run_cli(capsys, "--home", str(home), "ingest", str(latin))
    assert code == 1 and one_line_error(err) and f"{latin}:2:" in err and "not UTF-8" in err, err
    binary = tmp_path / "blob.jsonl"
    binary.write_bytes(bytes(range(256)) * 4)
    code, _, err = run_cli(capsys, "--home", str(home), "ingest", str(binary))
    assert code == 1 and one_line_error(err) and f"{binary}:" in err and "not UTF-8" in err, err
    code, out, _ = run_cli(capsys, "--home", str(home), "votes", "--user", "u1", "--json")
    assert code == 0 and out.strip() == ""  # the valid first line of the latin-1 file was not stored either


def test_invalid_user_ids_are_exit_2_with_one_line(tmp_path, capsys):
    for args in (["votes", "--user", ""], ["votes", "--user", "a\u200bb"], ["persona", "--user", " pad"],
                 ["forget", "--user", "x\x00", "--yes"], ["--tenant", "", "votes", "--user", "u"]):
        code, _, err = run_cli(capsys, "--home", str(tmp_path), *args)
        assert code == 2 and one_line_error(err) and "--help" in err, (args, err)
    code, _, err = run_cli(capsys, "votes")
    assert code == 2 and one_line_error(err) and "Missing option" in err
    code, _, err = run_cli(capsys, "no-such-command")
    assert code == 2 and one_line_error(err)
    code, _, err = run_cli(capsys, "--home", str(tmp_path), "export-prompt", "--user", "u", "--format", "yaml")
    assert code == 2 and one_line_error(err) and "--format" in err


def test_bad_lines_are_reported_per_line_with_exit_2(tmp_path, capsys):
    f = tmp_path / "mixed.jsonl"
    ok = {"user_id": "mixed@x.org", "context": "q", "chosen": "a", "rejected": "b"}
    f.write_text("\n".join([
        json.dumps(ok),
        json.dumps({**ok, "chosen": "x\ud800"}),                       # lone surrogate (escaped in the file)
        '{"user_id": "mixed@x.org", "context": "q", "chosen": NaN, "rejected": "b"}',
        "[" * 5000 + "]" * 5000,                                       # nested too deeply
        json.dumps({**ok, "timestamp": 1e20}),
        json.dumps({**ok, "user_id": "mixed\u202e@x.org"}),
        json.dumps({**ok, "chosen": "", "rejected": ""}),
        json.dumps({**ok, "chosen": "", "rejected": "kept: one empty answer is fine"}),
    ]) + "\n")
    code, out, err = run_cli(capsys, "--home", str(tmp_path / "h"), "ingest", str(f))
    assert code == 2 and "2 new vote(s)" in out and "6 invalid line(s)" in out, out + err
    for line, needle in [(2, "not valid Unicode"), (3, "NaN"), (4, "nested deeper"), (5, "out of range"),
                         (6, "Cf"), (7, "both empty")]:
        assert f"{f}:{line}:" in err and needle in err, (line, err)
    assert "Traceback" not in err


def test_forget_without_a_terminal_refuses_unless_yes(tmp_path, capsys, monkeypatch):
    home = tmp_path / "home"
    f = tmp_path / "v.jsonl"
    f.write_text(json.dumps({"user_id": "keep@x.org", "context": "q", "chosen": "a", "rejected": "b"}) + "\n")
    assert run_cli(capsys, "--home", str(home), "ingest", str(f))[0] == 0
    # piped "n" (no terminal): refused, nothing deleted -- the real entry point, as a user runs it
    env = {**os.environ, "SYNTH_AGENT_HOME": str(home)}
    res = subprocess.run([sys.executable, "-m", "synth_agent.cli", "forget", "--user", "keep@x.org"],
                         input="n\n", capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 1 and "pass --yes" in res.stderr and "Traceback" not in res.stderr, res.stderr
    res = subprocess.run([sys.executable, "-m", "synth_agent.cli", "forget", "--user", "keep@x.org"],
                         input="y\n", capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 1, "even 'y' on a pipe is not a confirmation"
    code, out, _ = run_cli(capsys, "--home", str(home), "votes", "--user", "keep@x.org", "--json")
    assert code == 0 and len(out.strip().splitlines()) == 1
    # at a terminal, declining says so
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    monkeypatch.setattr("typer.confirm", lambda *a, **k: False)
    code, _, err = run_cli(capsys, "--home", str(home), "forget", "--user", "keep@x.org")
    assert code == 1 and "declined" in err
    code, out, _ = run_cli(capsys, "--home", str(home), "forget", "--user", "keep@x.org", "--yes")
    assert code == 0 and "votes=1" in out


def test_unexpected_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    def broken(*_a, **_k):
        raise RuntimeError("the store exploded")

    monkeypatch.setattr("synth_agent.services.open_memory", broken)
    code, _, err = run_cli(capsys, "--home", str(tmp_path), "votes", "--user", "u")
    assert code == 1 and one_line_error(err) and "RuntimeError: the store exploded" in err and "--debug" in err
    with pytest.raises(RuntimeError, match="the store exploded"):
        run_cli(capsys, "--home", str(tmp_path), "--debug", "votes", "--user", "u")


def test_exit_codes_are_documented():
    from synth_agent.cli import EXIT_CODES

    assert set(EXIT_CODES) == {0, 1, 2, 130, 143}
    help_text = runner.invoke(app, ["--help"]).output
    assert "--debug" in help_text and "Exit codes" in help_text


def test_forget_empties_a_kept_llm_disk_cache(tmp_path, capsys):
    """``SYNTH_AGENT_LLM_DISK_CACHE=1`` keeps prompts quoting votes on disk: forgetting a user drops them all."""
    import asyncio

    from synth_agent.llm.cache import SqliteCache

    home = tmp_path / "home"
    f = tmp_path / "v.jsonl"
    f.write_text(json.dumps({"user_id": "gone@x.org", "context": "q", "chosen": "a", "rejected": "b"}) + "\n")
    assert run_cli(capsys, "--home", str(home), "ingest", str(f))[0] == 0
    cache = SqliteCache(home / "llm-cache.sqlite")
    asyncio.run(cache.set("k", {"text": "zq-cached-prompt-of-gone@x.org"}))
    cache.close()
    code, out, _ = run_cli(capsys, "--home", str(home), "forget", "--user", "gone@x.org", "--yes")
    assert code == 0 and "votes=1" in out
    blob = b"".join(p.read_bytes() for p in home.glob("llm-cache.sqlite*"))
    assert b"zq-cached-prompt" not in blob
    again = SqliteCache(home / "llm-cache.sqlite")
    assert len(again) == 0
    again.close()
