"""Ids and text the way every entry point checks them: the CLI, the HTTP API and the models.

Plain standard library on purpose: the CLI validates ``--user`` and free-text options
before it imports anything heavy (pydantic, the store), and :mod:`synth_agent.models`
uses the same functions inside its validators, so there is one rule.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

__all__ = ["MAX_USER_ID_CHARS", "check_text", "validate_opaque_id", "validate_user_id"]

MAX_USER_ID_CHARS = 256

_SURROGATE = re.compile("[\ud800-\udfff]")

# Unicode categories an id must not contain, and why (Cc: control; Cs: lone surrogates, not
# encodable; Cf: invisible formatting such as zero-width spaces and right-to-left overrides,
# which make look-alike ids; Zl/Zp: line and paragraph separators).
_BAD_ID_CATEGORIES = {
    "Cc": "control characters",
    "Cs": "lone surrogates (text that is not valid Unicode)",
    "Cf": "invisible formatting characters (Unicode category Cf, e.g. zero-width spaces or "
    "right-to-left overrides)",
    "Zl": "line separators",
    "Zp": "paragraph separators",
}


def check_text(text: str, what: str = "text") -> str:
    """Return ``text`` if it can be encoded as UTF-8, else raise ``ValueError`` naming the position.

    Python strings (and JSON, through ``\\uXXXX`` escapes) can hold lone surrogates; no
    store, tokenizer or HTTP peer can: they are refused at the door.
    """
    m = _SURROGATE.search(text)
    if m is not None:
        raise ValueError(
            f"{what} is not valid Unicode: a lone surrogate U+{ord(m.group()):04X} at character "
            f"{m.start()} (text must be encodable as UTF-8)"
        )
    return text


def validate_opaque_id(value: Any, what: str = "user_id", *, max_chars: int = MAX_USER_ID_CHARS) -> str:
    """Return ``value`` unchanged if it is usable as an opaque id, else raise ``ValueError`` saying why.

    Ids are opaque (emails, UUIDs, unicode names are all fine). We only refuse ids that
    cannot be stored faithfully or displayed unambiguously: empty, surrounding whitespace,
    over ``max_chars`` characters, or holding control characters, lone surrogates,
    invisible formatting characters (category Cf: zero-width spaces, bidi overrides...)
    or line/paragraph separators. Ids are never normalised: what is stored is what was sent.
    """
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__}")
    if not value:
        raise ValueError(f"{what} must not be empty")
    if len(value) > max_chars:
        raise ValueError(f"{what} is {len(value)} characters; the limit is {max_chars}")
    # str.isprintable() is False for every character of the refused categories (and for some
    # harmless ones, such as non-ASCII spaces): a printable id skips the per-character scan
    if not value.isprintable():
        for ch in value:
            why = _BAD_ID_CATEGORIES.get(unicodedata.category(ch))
            if why is not None:
                raise ValueError(f"{what} must not contain {why}; found U+{ord(ch):04X}")
    if value.strip() != value:
        raise ValueError(f"{what} must not start or end with whitespace")
    return value


def validate_user_id(user_id: Any) -> str:
    """Return ``user_id`` unchanged if usable, else raise ``ValueError`` saying why.

    User ids are opaque (emails, UUIDs, unicode names are all fine). Refused: empty,
    surrounding whitespace, longer than 256 characters, control characters, lone
    surrogates, invisible formatting characters (Unicode category Cf — zero-width
    spaces, right-to-left overrides — which make look-alike ids) and line/paragraph
    separators. See :func:`validate_opaque_id`.

        >>> validate_user_id("zoë@example.com")
        'zoë@example.com'
        >>> validate_user_id("admin\u200b")
        Traceback (most recent call last):
        ...
        ValueError: user_id must not contain invisible formatting characters (Unicode category Cf, e.g. zero-width spaces or right-to-left overrides); found U+200B
    """
    return validate_opaque_id(user_id, "user_id")
