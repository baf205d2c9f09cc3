"""Read vote JSONL files: validate every line, report bad ones by line number, keep the rest.

Accepted shapes per line (see DESIGN.md "Data format"): the reference
implementation's dicts, PersonalRewardBench exports (``model`` role, responses as
message lists), plain strings. A line is either fully valid or reported; nothing
is half-read.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from synth_agent.models import DEFAULT_MAX_CONTENT_CHARS, ValidationIssue, Vote


@dataclass
class ParsedVotes:
    votes: list[Vote] = field(default_factory=list)
    issues: list[ValidationIssue] = field(default_factory=list)
    lines: int = 0


def describe_validation_error(exc: ValidationError) -> str:
    """One readable line per pydantic error: ``field.path: message``."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "vote"
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


def parse_vote(data: object, *, max_content_chars: int = DEFAULT_MAX_CONTENT_CHARS) -> Vote:
    """Validate one vote object; raises ``ValueError`` with a readable reason."""
    if not isinstance(data, dict):
        raise ValueError(f"a vote must be a JSON object, got {type(data).__name__}")
    try:
        return Vote.model_validate(data, context={"max_content_chars": max_content_chars})
    except ValidationError as exc:
        raise ValueError(describe_validation_error(exc)) from None


def parse_lines(
    lines: Iterable[str], *, max_content_chars: int = DEFAULT_MAX_CONTENT_CHARS
) -> ParsedVotes:
    out = ParsedVotes()
    for lineno, raw in enumerate(lines, start=1):
        out.lines = lineno
        line = raw.strip()
        if not line:
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            out.issues.append(ValidationIssue(line=lineno, error=f"not valid JSON ({exc.msg} at column {exc.colno})"))
            continue
        try:
            out.votes.append(parse_vote(data, max_content_chars=max_content_chars))
        except ValueError as exc:
            out.issues.append(ValidationIssue(line=lineno, error=str(exc)))
    return out


def read_jsonl(path: str | Path, *, max_content_chars: int = DEFAULT_MAX_CONTENT_CHARS) -> ParsedVotes:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such vote file: {p} (expected JSONL, one vote per line)")
    with p.open(encoding="utf-8") as fh:
        return parse_lines(fh, max_content_chars=max_content_chars)

