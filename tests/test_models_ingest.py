"""Vote validation and JSONL ingest: every bad input gets a clear reason and nothing half-read."""

import json

import pytest

from synth_agent.ingest import parse_lines, parse_vote
from synth_agent.models import PersonaProfile, Vote

CTX = [{"role": "user", "content": "How do I boil an egg?"}]


def vote(**kw):
    base = {"user_id": "ana@example.com", "context": CTX, "chosen": "Boil 9 minutes.", "rejected": "No idea."}
    base.update(kw)
    return base


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (vote(chosen="", rejected=""), "both empty"),
        (vote(chosen="  ", rejected="\n"), "both empty"),
        ({k: v for k, v in vote().items() if k != "rejected"}, "rejected"),
        (vote(chosen=None), "chosen is missing"),
        ({k: v for k, v in vote().items() if k != "chosen"}, "chosen"),
        (vote(rejected="Boil 9 minutes."), "identical"),
        (vote(context=[{"role": "robot", "content": "hi"}]), "unknown role 'robot'"),
        (vote(context=[]), "context is empty"),
        (vote(user_id=""), "user_id must not be empty"),
        (vote(user_id=" padded"), "whitespace"),
        (vote(user_id="bad\x00id"), "control characters"),
        (vote(user_id="admin\u200b"), "Cf"),
        (vote(user_id="\u202egnp.exe"), "Cf"),
        (vote(user_id="a\ud800"), "lone surrogates"),
        (vote(chosen="ok\udfff"), "not valid Unicode"),
        (vote(context=[{"role": "user", "content": "\ud83d"}]), "not valid Unicode"),
        (vote(id="x\ud800"), "lone surrogates"),
        (vote(id=" v1"), "whitespace"),
        (vote(id="v\n1"), "control characters"),
        (vote(id="v" * 257), "the limit is 256"),
        (vote(timestamp=1e20), "out of range"),
        (vote(timestamp=-1e20), "out of range"),
        (vote(timestamp=-1), "out of range"),
        (vote(timestamp=float("inf")), "finite"),
        (vote(timestamp="1969-12-31T23:59:59Z"), "out of range"),
        (vote(timestamp="0001-01-01"), "out of range"),
        (vote(timestamp="9999-12-31T23:00:00-05:00"), "out of range"),
        (vote(user_id="x" * 300), "the limit is 256"),
        (vote(chosen="y" * 50), "the limit is 40"),
        (vote(timestamp="yesterday"), "not ISO-8601"),
        (vote(chosen={"role": "user", "content": "hi"}), "assistant/model message"),
        ([1, 2], "JSON object"),
    ],
)
def test_bad_votes_are_rejected_with_reason(data, reason):
    with pytest.raises(ValueError, match=None) as exc:
        parse_vote(data, max_content_chars=40)
    assert reason in str(exc.value)


def test_reference_and_personalrewardbench_shapes_are_accepted():
    ref = parse_vote(vote(chosen={"role": "assistant", "content": "A"}, rejected={"role": "assistant", "content": "B"}))
    assert (ref.chosen, ref.rejected) == ("A", "B")
    prb = parse_vote(
        vote(
            context=[{"role": "user", "content": "hi"}, {"role": "model", "content": "hello"}, {"role": "user", "content": "q"}],
            chosen=[{"role": "model", "content": "yes"}],
            rejected=[{"role": "model", "content": "no"}],
            split="val",
        )
    )
    assert prb.context[1].role == "assistant" and prb.chosen == "yes" and prb.split == "val"


def test_unicode_and_opaque_user_ids_round_trip():
    for uid in ["ana@example.com", "3f2b8c1e-0000-4000-8000-000000000000", "Zoë Ωmega 李", "a.b.c/d"]:
        v = Vote.model_validate(vote(user_id=uid))
        assert Vote.model_validate_json(v.model_dump_json()).user_id == uid


def test_vote_id_is_a_content_address():
    assert parse_vote(vote()).id == parse_vote(vote()).id
    assert parse_vote(vote()).id != parse_vote(vote(chosen="Boil 10 minutes.")).id
    assert parse_vote(vote(id="mine-1")).id == "mine-1"


def test_timestamps_iso_and_epoch():
    assert parse_vote(vote(timestamp="2024-05-01T10:00:00Z")).timestamp.year == 2024
    assert parse_vote(vote(timestamp=1714557600)).timestamp.year == 2024
    assert parse_vote(vote(timestamp=1714557600000)).timestamp.year == 2024  # milliseconds


def test_parse_lines_reports_line_numbers_and_keeps_valid():
    lines = [
        json.dumps(vote()),
        "{not json",
        "",
        json.dumps(vote(chosen="same", rejected="same")),
        json.dumps(vote(chosen="other")),
    ]
    parsed = parse_lines(lines)
    assert len(parsed.votes) == 2
    assert [i.line for i in parsed.issues] == [2, 4]
    assert "not valid JSON" in parsed.issues[0].error
    assert "identical" in parsed.issues[1].error


def test_persona_profile_rejects_empty_persona():
    with pytest.raises(ValueError, match="persona text is empty"):
        PersonaProfile(user_id="u1", persona="  ")


def test_one_empty_answer_is_accepted_and_shown_to_judges_explicitly():
    from synth_agent import prompts
    from synth_agent.models import Message

    for kw in (dict(chosen=""), dict(rejected=""), dict(rejected="  "), dict(chosen={"role": "model", "content": ""})):
        v = parse_vote(vote(**kw))
        assert (v.chosen.strip() == "") != (v.rejected.strip() == "")
    msgs = prompts.judge_messages([Message(role="user", content="q")], "", "A real answer.")
    assert prompts.EMPTY_RESPONSE in msgs[-1]["content"] and "A real answer." in msgs[-1]["content"]
    assert "<response_a>\n\n</response_a>" not in msgs[-1]["content"]


def test_timestamps_at_the_edges_of_the_range():
    assert parse_vote(vote(timestamp=0)).timestamp.year == 1970
    assert parse_vote(vote(timestamp="9999-12-31T23:59:59Z")).timestamp.year == 9999
    assert parse_vote(vote(timestamp=253402300799999)).timestamp.year == 9999  # milliseconds


def test_ids_are_opaque_but_storable():
    assert parse_vote(vote(id=42)).id == "42"
    assert parse_vote(vote(id="")).id.startswith("v_")  # no id: content hash
    for uid in ["ana@example.com", "Zoë Ωmega 李", "a.b/c%2F", "\U0001F600 emoji", "x" * 256]:
        assert parse_vote(vote(user_id=uid)).user_id == uid


def test_persona_profiles_must_be_storable():
    with pytest.raises(ValueError, match="finite"):
        PersonaProfile(user_id="u1", persona="likes lists", meta={"score": float("nan")})
    with pytest.raises(ValueError, match="not valid Unicode"):
        PersonaProfile(user_id="u1", persona="likes \ud800 lists")
    with pytest.raises(ValueError, match="not valid Unicode"):
        PersonaProfile(user_id="u1", persona="ok", meta={"k": ["fine", "bad\udc00"]})
    assert PersonaProfile(user_id="u1", persona="ok", meta={"n": 1, "x": [1.5, None, "é"]}).meta["n"] == 1


def test_jsonl_lines_that_json_allows_but_we_cannot_store_are_reported():
    lines = [
        '{"user_id": "a", "context": "q", "chosen": NaN, "rejected": "b"}',
        '{"user_id": "a", "context": "q", "chosen": "a", "rejected": "b", "timestamp": 1e400}',
        '{"user_id": "a", "user_id": "b", "context": "q", "chosen": "a", "rejected": "b"}',
        "[" * 100_000 + "]" * 100_000,
        '{"user_id": "a", "context": "q", "chosen": "\\ud800", "rejected": "b"}',
        json.dumps(vote()),
    ]
    parsed = parse_lines(lines)
    assert len(parsed.votes) == 1 and [i.line for i in parsed.issues] == [1, 2, 3, 4, 5]
    errors = [i.error for i in parsed.issues]
    assert "NaN" in errors[0] and "finite" in errors[1] and "duplicate key" in errors[2]
    assert "nested deeper" in errors[3] and "not valid Unicode" in errors[4]


def test_read_jsonl_refuses_files_that_are_not_utf8(tmp_path):
    from synth_agent.ingest import UnreadableVoteFile, read_jsonl

    f = tmp_path / "latin1.jsonl"
    f.write_bytes(json.dumps(vote()).encode() + b"\n" + b'{"user_id": "caf\xe9"}\n')
    with pytest.raises(UnreadableVoteFile, match=r"latin1.jsonl:2: not UTF-8 text \(byte 0xe9"):
        read_jsonl(f)
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(vote()).encode() + b"\n")
    assert len(read_jsonl(bom).votes) == 1
    long = tmp_path / "long.jsonl"
    long.write_text("x" * 5000 + "\n" + json.dumps(vote()) + "\n")
    parsed = read_jsonl(long, max_line_bytes=1000)
    assert len(parsed.votes) == 1 and "longer than 1000 bytes" in parsed.issues[0].error
    with pytest.raises(UnreadableVoteFile, match="directory"):
        read_jsonl(tmp_path)


def test_json_depth_skips_strings_and_escapes():
    from synth_agent.safejson import json_depth, loads_strict

    assert json_depth('[[1], {"a": "[[[[", "b": "\\"[["}]') == 2
    assert json_depth("[" * 1000) == 1000
    assert loads_strict('{"a": [1, 2]}') == {"a": [1, 2]}
    with pytest.raises(ValueError, match="nested deeper than 3"):
        loads_strict("[[[[1]]]]", max_depth=3)


@pytest.mark.parametrize("text, problem", [
    ('{"a": 1e400}', "numbers must be finite"),
    ('[1.5, -1e999]', "numbers must be finite"),
    ('{"a": ' + "1" * 320 + '.5}', "numbers must be finite"),
    ('{"a": "\\ud800"}', "lone surrogate"),
    ('{"\\uDFFF": 1}', "lone surrogate"),
    ('["ok", "\\ud83d"]', "lone surrogate"),
    ('{"a": "\\ud83d\\ude00", "b": 1e308, "c": "\\\\ud800", "d": ' + "1" * 320 + '}', None),
])
def test_loads_strict_bytes_and_text_agree(text, problem):
    """Bytes take a fast path that skips the storable-value walk when the text cannot need it;
    they must be refused (with the same message) or accepted exactly like the text."""
    from synth_agent.safejson import loads_strict

    if problem is None:
        assert loads_strict(text.encode()) == loads_strict(text)
        return
    for data in (text, text.encode()):
        with pytest.raises(ValueError, match=problem):
            loads_strict(data)
    with pytest.raises(ValueError) as as_text:
        loads_strict(text)
    with pytest.raises(ValueError) as as_bytes:
        loads_strict(text.encode())
    assert str(as_text.value) == str(as_bytes.value)
