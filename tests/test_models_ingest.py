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
        (vote(chosen=""), "chosen is empty"),
        (vote(rejected="   "), "rejected is empty"),
        ({k: v for k, v in vote().items() if k != "chosen"}, "chosen"),
        (vote(rejected="Boil 9 minutes."), "identical"),
        (vote(context=[{"role": "robot", "content": "hi"}]), "unknown role 'robot'"),
        (vote(context=[]), "context is empty"),
        (vote(user_id=""), "user_id must not be empty"),
        (vote(user_id=" padded"), "whitespace"),
        (vote(user_id="bad\x00id"), "control characters"),
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
