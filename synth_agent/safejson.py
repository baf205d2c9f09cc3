"""JSON that is safe to parse and to store: bounded nesting, finite numbers, valid Unicode, no duplicate keys.

Python's ``json`` accepts things no store or peer can take: ``NaN``/``Infinity``
(and ``1e400``, which becomes ``inf``), lone surrogates through ``\\ud800`` escapes,
and nesting deep enough to raise ``RecursionError``. Duplicate keys are silently
resolved (the last wins), so a gateway and this service could read different
users out of one body. The HTTP proxy and the JSONL reader both go through
:func:`loads_strict`, so a value that passed it can be re-encoded and stored.

    >>> loads_strict('{"a": [1, 2.5, "x"]}')
    {'a': [1, 2.5, 'x']}
    >>> loads_strict('{"a": NaN}')
    Traceback (most recent call last):
    ...
    ValueError: NaN is not allowed: numbers must be finite
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

__all__ = ["MAX_JSON_DEPTH", "json_depth", "loads_strict", "storable_problem", "unsafe_value"]

MAX_JSON_DEPTH = 64
"""Default nesting limit: a vote needs about 5 levels, an OpenAI tool schema a dozen or two."""

_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def json_depth(data: str | bytes) -> int:
    """Deepest ``[``/``{`` nesting of a JSON text, without parsing it (brackets inside strings skipped).

    Vectorised with numpy over the positions of structural bytes only, so it costs about as much
    as one ``json.loads`` and can run before it on any body.
    """
    import numpy as np  # here, not at module level: the CLI validates ids through this module's users

    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    arr = np.frombuffer(raw, dtype=np.uint8)
    opens = np.flatnonzero((arr == 0x5B) | (arr == 0x7B))
    if opens.size == 0:
        return 0
    closes = np.flatnonzero((arr == 0x5D) | (arr == 0x7D))
    quotes = np.flatnonzero(arr == 0x22)
    after_backslash = quotes[(quotes > 0) & (arr[np.maximum(quotes - 1, 0)] == 0x5C)]
    if after_backslash.size:
        # a quote after an odd run of backslashes is escaped: the run ends at the last other byte before it
        plain = np.flatnonzero(arr != 0x5C)
        prev = plain[np.searchsorted(plain, after_backslash) - 1]
        prev = np.where(prev < after_backslash, prev, -1)  # only backslashes before it, from the start
        escaped = after_backslash[(after_backslash - 1 - prev) % 2 == 1]
        quotes = np.setdiff1d(quotes, escaped, assume_unique=True)
    # a bracket is inside a string when an odd number of real quotes come before it
    opens = opens[np.searchsorted(quotes, opens) % 2 == 0]
    closes = closes[np.searchsorted(quotes, closes) % 2 == 0]
    if opens.size == 0:
        return 0
    events = np.concatenate([opens, closes])
    steps = np.concatenate([np.ones(opens.size, np.int64), -np.ones(closes.size, np.int64)])
    return int(np.cumsum(steps[np.argsort(events, kind="stable")]).max(initial=0))


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed: numbers must be finite")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise ValueError(f"duplicate key {k!r} in one object")
            seen.add(k)
    return out


def loads_strict(data: str | bytes, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse JSON, refusing (``ValueError`` with a readable reason) what cannot be handled safely.

    Nesting deeper than ``max_depth`` is refused before parsing; ``NaN``, ``Infinity`` and
    numbers beyond a float's range, text that is not valid UTF-8 or holds lone surrogates,
    and objects with a repeated key are refused after.
    """
    raw: bytes | None = None
    if isinstance(data, bytes | bytearray):
        raw = bytes(data)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"the text is not UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start})") from None
        brackets = raw.count(b"[") + raw.count(b"{")  # on the bytes: a str with non-ASCII text is wide
    else:
        text = data
        brackets = text.count("[") + text.count("{")
    if brackets > max_depth and json_depth(text) > max_depth:
        raise ValueError(f"nested deeper than {max_depth} levels")
    overflowed = False

    def finite(literal: str) -> float:
        nonlocal overflowed
        number = float(literal)
        overflowed = overflowed or not math.isfinite(number)
        return number

    try:
        value = json.loads(text, parse_constant=_constant, object_pairs_hook=_unique_keys, parse_float=finite)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from None
    except RecursionError:  # pragma: no cover - the depth check comes first
        raise ValueError(f"nested deeper than {max_depth} levels") from None
    # Parsed with these hooks, a value can still hold a float that overflowed to inf or a lone
    # surrogate. Text decoded here from strict UTF-8 holds no raw surrogate, so one can only come
    # from a \uD800-\uDFFF escape: without that and without an overflow the value is storable, and
    # the full walk (as costly as the parse itself) is skipped. A str argument is always walked.
    if raw is None or overflowed or (b"\\u" in raw and _SURROGATE_ESCAPE.search(raw) is not None):
        problem = storable_problem(value)
        if problem is not None:
            raise ValueError(problem)
    return value


def storable_problem(value: Any) -> str | None:
    """:func:`unsafe_value`, with a C-speed pass first (re-encoding) so large clean values cost little."""
    try:
        json.dumps(value, allow_nan=False, ensure_ascii=False).encode("utf-8")
    except (ValueError, TypeError, UnicodeEncodeError):
        return unsafe_value(value) or "the value cannot be encoded as JSON"
    return None


def unsafe_value(value: Any, path: str = "") -> str | None:
    """Where ``value`` (JSON-like data) holds something no backend can store, else None.

    Refused: lone surrogates in strings or keys, non-finite floats (NaN, Infinity, or a
    literal like ``1e400`` that overflowed), keys that are not strings, and anything that
    is not JSON data.
    """
    stack: list[tuple[str, Any]] = [(path, value)]
    while stack:
        where, v = stack.pop()
        label = where or "the value"
        if v is None or isinstance(v, bool | int):
            continue
        if isinstance(v, str):
            if _SURROGATE.search(v):
                return f"{label}: text is not valid Unicode (a lone surrogate; it must be encodable as UTF-8)"
        elif isinstance(v, float):
            if not math.isfinite(v):
                return f"{label}: numbers must be finite, got {v}"
        elif isinstance(v, dict):
            for k, item in v.items():
                if not isinstance(k, str):
                    return f"{label}: object keys must be strings, got {type(k).__name__}"
                if _SURROGATE.search(k):
                    return f"{label}: a key is not valid Unicode (a lone surrogate)"
                stack.append((f"{where}.{k}" if where else k, item))
        elif isinstance(v, list | tuple):
            stack.extend((f"{where}[{i}]", item) for i, item in enumerate(v))
        else:
            return f"{label}: {type(v).__name__} is not JSON data"
    return None
