"""Read vote JSONL files: validate every line, report bad ones by line number, keep the rest.

Accepted shapes per line (the README's "Data format" section): the reference
implementation's dicts, PersonalRewardBench exports (``model`` role, responses as
message lists), plain strings. A line is either fully valid or reported; nothing
is half-read.

Two kinds of problems, kept apart:

* a **line** that is not a valid vote (bad JSON, NaN, nesting too deep, a missing
  answer, a lone surrogate...) is reported as a :class:`~synth_agent.models.ValidationIssue`
  and skipped;
* a **file** that cannot be read as UTF-8 text (latin-1, binary) raises
  :class:`UnreadableVoteFile` naming the file, line and byte, before anything is stored.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from pydantic import ValidationError

from synth_agent.models import DEFAULT_MAX_CONTENT_CHARS, ValidationIssue, Vote
from synth_agent.safejson import loads_strict

MAX_LINE_BYTES = 16 << 20
"""A longer line is reported as invalid (and skipped) without being held in memory."""


class UnreadableVoteFile(ValueError):
    """The file is not UTF-8 text (or cannot be read at all); nothing of it was stored."""


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


def _parse_line(line: str, lineno: int, out: ParsedVotes, max_content_chars: int) -> None:
    try:
        data = loads_strict(line)
    except ValueError as exc:
        out.issues.append(ValidationIssue(line=lineno, error=f"not valid JSON ({str(exc).removeprefix('not valid JSON: ')})"))
        return
    try:
        out.votes.append(parse_vote(data, max_content_chars=max_content_chars))
    except ValueError as exc:
        out.issues.append(ValidationIssue(line=lineno, error=str(exc)))


def parse_lines(
    lines: Iterable[str], *, max_content_chars: int = DEFAULT_MAX_CONTENT_CHARS
) -> ParsedVotes:
    """Validate JSONL lines already decoded to text (blank lines are skipped)."""
    out = ParsedVotes()
    for lineno, raw in enumerate(lines, start=1):
        out.lines = lineno
        line = raw.strip()
        if line:
            _parse_line(line, lineno, out, max_content_chars)
    return out


def _raw_lines(fh: IO[bytes], limit: int) -> Iterator[bytes | None]:
    """The file's lines as bytes; ``None`` for a line longer than ``limit`` (skipped, not kept)."""
    while True:
        chunk = fh.readline(limit + 1)
        if not chunk:
            return
        if len(chunk) > limit and not chunk.endswith(b"\n"):
            while chunk and not chunk.endswith(b"\n"):  # drop the rest of the oversize line
                chunk = fh.readline(1 << 20)
            yield None
        else:
            yield chunk


def read_jsonl(
    path: str | Path,
    *,
    max_content_chars: int = DEFAULT_MAX_CONTENT_CHARS,
    max_line_bytes: int = MAX_LINE_BYTES,
) -> ParsedVotes:
    """Parse a vote file (UTF-8 JSONL, a BOM is tolerated).

    Raises ``FileNotFoundError`` for a missing file and :class:`UnreadableVoteFile` for one
    that is not UTF-8 text or cannot be read, naming the file, line and offending byte.
    """
    p = Path(path)
    if p.is_dir():
        raise UnreadableVoteFile(f"{p} is a directory, not a vote file (JSONL, one vote per line)")
    if not p.is_file():
        raise FileNotFoundError(f"no such vote file: {p} (expected JSONL, one vote per line)")
    out = ParsedVotes()
    try:
        with p.open("rb") as fh:
            for lineno, raw in enumerate(_raw_lines(fh, max_line_bytes), start=1):
                out.lines = lineno
                if raw is None:
                    out.issues.append(ValidationIssue(
                        line=lineno, error=f"the line is longer than {max_line_bytes} bytes; skipped"))
                    continue
                if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
                try:
                    line = raw.decode("utf-8").strip()
                except UnicodeDecodeError as exc:
                    raise UnreadableVoteFile(
                        f"{p}:{lineno}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
                        "vote files must be UTF-8 JSONL — convert it first, e.g. `iconv -f latin1 -t utf-8`"
                    ) from None
                if line:
                    _parse_line(line, lineno, out, max_content_chars)
    except OSError as exc:
        raise UnreadableVoteFile(f"cannot read {p}: {exc.strerror or exc}") from None
    return out
