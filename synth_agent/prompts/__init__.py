"""Prompt templates and their parsers: the one place that decides what the LLM sees.

Templates are versioned files next to this module (``<name>.v<N>.md``), so a
profile can record which persona-writing instruction produced it, and a tuned
instruction can be shipped as a new version without touching code.

Prompt layout is prefix-cache friendly: the stable part (instruction, persona,
demos) comes first and the variable pair last, so a self-hosted server with
prefix caching re-uses the per-user prefix across every judgment for that user.

Message layout (also what the offline simulator reads):

* judge: ``system`` = judge instruction [+ persona addendum with ``<persona>``];
  then one ``user``/``assistant`` turn pair per demo; then the ``user`` turn with
  the pair to judge. A pair is rendered as ``<conversation>``, ``<response_a>``,
  ``<response_b>`` blocks. Demo answers are the JSON the judge is asked to give.
* persona writer: ``system`` = instruction; ``user`` = ``<example>`` blocks each
  with ``<conversation>``, ``<response_a>``, ``<response_b>``, ``<reasoning>``,
  ``<preferred>``.
* insight: ``system`` = instruction; ``user`` = the pair and ``<preferred>``.
* generation: ``system`` = generation template with ``<persona>``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Literal

import orjson

from synth_agent.models import Demo, Message

ChatMessage = dict[str, str]

JUDGE_VERSION = "judge.v1"
PERSONA_WRITER_VERSION = "persona_writer.v2"
INSIGHT_VERSION = "insight.v1"
GENERATION_VERSION = "generation.v1"
LABEL_JUDGE_VERSION = "judge_label.v1"


@cache
def load(name: str) -> str:
    """Return the text of prompt file ``<name>.md`` shipped with the package."""
    path = resources.files(__package__).joinpath(f"{name}.md")
    if not path.is_file():
        raise FileNotFoundError(f"no prompt template {name!r} in synth_agent/prompts")
    return path.read_text(encoding="utf-8").strip()


def render_context(context: Sequence[Message]) -> str:
    return "\n".join(f"[{m.role}]: {m.content}" for m in context)


EMPTY_RESPONSE = "(empty response: the assistant returned no text)"
"""How an empty answer is shown to judges and the persona writer: explicitly, never as a blank block."""


def shown_response(text: str) -> str:
    """A response as the judge sees it (an empty one is named as such)."""
    return text if text.strip() else EMPTY_RESPONSE


def render_pair(context: Sequence[Message], a: str, b: str) -> str:
    return (
        f"<conversation>\n{render_context(context)}\n</conversation>\n"
        f"<response_a>\n{shown_response(a)}\n</response_a>\n"
        f"<response_b>\n{shown_response(b)}\n</response_b>"
    )


QUESTION = "Which response would this user prefer?"


def judge_answer_json(preferred: Literal["A", "B"], reasoning: str | None) -> str:
    """The assistant turn of a demo: what we ask the judge to produce."""
    if reasoning is None:
        return json.dumps({"preferred": preferred})
    return json.dumps({"reasoning": reasoning, "preferred": preferred}, ensure_ascii=False)


def judge_system_message(persona: str | None, *, version: str = JUDGE_VERSION) -> ChatMessage:
    """The system turn of a judge prompt: the instruction ``version`` [+ the persona addendum]."""
    system = load(version)
    if persona:
        system += "\n\n" + load("judge_persona_addendum.v1").replace("{persona}", persona.strip())
    return {"role": "system", "content": system}


def demo_turns(demo: Demo, *, label_only: bool = False) -> tuple[ChatMessage, ChatMessage]:
    """One demo as its (user, assistant) turns; ``label_only``: the answer is the bare letter (log-prob judge)."""
    answer = demo.label if label_only else judge_answer_json(demo.label, demo.reasoning)
    return pair_turn(demo.context, demo.first, demo.second), {"role": "assistant", "content": answer}


def pair_turn(context: Sequence[Message], a: str, b: str) -> ChatMessage:
    """The last turn of a judge prompt: the pair to judge, in this order."""
    return {"role": "user", "content": render_pair(context, a, b) + "\n\n" + QUESTION}


def judge_messages(
    context: Sequence[Message],
    a: str,
    b: str,
    *,
    persona: str | None = None,
    demos: Sequence[Demo] = (),
    version: str = JUDGE_VERSION,
) -> list[ChatMessage]:
    """Messages for one chain-of-thought judgment of (a, b) in this order."""
    msgs: list[ChatMessage] = [judge_system_message(persona, version=version)]
    for d in demos:
        msgs.extend(demo_turns(d))
    msgs.append(pair_turn(context, a, b))
    return msgs


def label_judge_messages(
    context: Sequence[Message],
    a: str,
    b: str,
    *,
    persona: str | None = None,
    demos: Sequence[Demo] = (),
) -> list[ChatMessage]:
    """Messages for a single-token (log-probability) judgment: answers are bare letters."""
    msgs: list[ChatMessage] = [judge_system_message(persona, version=LABEL_JUDGE_VERSION)]
    for d in demos:
        msgs.extend(demo_turns(d, label_only=True))
    msgs.append(pair_turn(context, a, b))
    return msgs


@dataclass(frozen=True)
class TraceExample:
    """One example shown to the persona writer."""

    context: Sequence[Message]
    first: str
    second: str
    reasoning: str
    preferred: Literal["A", "B"]


def render_example(ex: TraceExample) -> str:
    return (
        "<example>\n"
        + render_pair(ex.context, ex.first, ex.second)
        + f"\n<reasoning>\n{ex.reasoning}\n</reasoning>\n<preferred>{ex.preferred}</preferred>\n</example>"
    )


def persona_messages(examples: Sequence[TraceExample], *, version: str = PERSONA_WRITER_VERSION) -> list[ChatMessage]:
    body = "\n\n".join(render_example(e) for e in examples)
    return [
        {"role": "system", "content": load(version)},
        {"role": "user", "content": body + "\n\nWrite the persona of this user."},
    ]


def insight_messages(
    context: Sequence[Message], first: str, second: str, preferred: Literal["A", "B"]
) -> list[ChatMessage]:
    return [
        {"role": "system", "content": load(INSIGHT_VERSION)},
        {
            "role": "user",
            "content": render_pair(context, first, second) + f"\n<preferred>{preferred}</preferred>",
        },
    ]


def generation_system_prompt(persona: str, *, version: str = GENERATION_VERSION) -> str:
    """The persona as a system prompt for a chat model (what the middleware injects)."""
    return load(version).replace("{persona}", persona.strip())


# ---------------------------------------------------------------- parsing

_TAG_RE = {name: re.compile(rf"<{name}>\s*(.*?)\s*</{name}>", re.S) for name in ("persona",)}
_PREF_FIELD = re.compile(r'"?preferred"?\s*[:=]\s*"?\s*(?:response[ _])?([AB])\b', re.I)
_PREF_TEXT = re.compile(r"\b(?:prefer(?:s|red)?|choose|choice|pick|answer|winner)\W{0,20}(?:response\s*)?([AB])\b", re.I)


class ParseError(ValueError):
    """The model's answer could not be read; the caller may retry."""


@dataclass(frozen=True)
class ParsedJudgment:
    preferred: Literal["A", "B"]
    reasoning: str


def _first_json_object(text: str) -> dict[str, object] | None:
    stripped = text.strip()
    if stripped.startswith("{") and stripped.endswith("}"):
        # The common case, an answer that is exactly one JSON object (JSON mode): the scan below would
        # find this same object, so parse it at once (the scan costs ~0.1 ms per judgment in Python).
        try:
            obj = orjson.loads(stripped)
        except orjson.JSONDecodeError:
            pass
        else:
            if isinstance(obj, dict):
                return obj
    start = text.find("{")
    while start != -1:
        depth = 0
        in_str = False
        esc = False
        for i in range(start, len(text)):
            ch = text[i]
            if in_str:
                if esc:
                    esc = False
                elif ch == "\\":
                    esc = True
                elif ch == '"':
                    in_str = False
            elif ch == '"':
                in_str = True
            elif ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    try:
                        obj = json.loads(text[start : i + 1])
                    except json.JSONDecodeError:
                        break
                    return obj if isinstance(obj, dict) else None
        start = text.find("{", start + 1)
    return None


def parse_judgment(text: str) -> ParsedJudgment:
    """Read a judge answer: strict JSON first, then tolerant fallbacks for models that ignore the format."""
    obj = _first_json_object(text)
    if obj is not None:
        pref = str(obj.get("preferred", "")).strip().upper().removeprefix("RESPONSE").strip(" _")
        if pref in ("A", "B"):
            return ParsedJudgment(pref, str(obj.get("reasoning", "")).strip())  # type: ignore[arg-type]
    m = _PREF_FIELD.search(text) or _PREF_TEXT.search(text)
    if m:
        return ParsedJudgment(m.group(1).upper(), text.strip())  # type: ignore[arg-type]
    stripped = text.strip().strip(".").upper()
    if stripped in ("A", "B"):
        return ParsedJudgment(stripped, "")  # type: ignore[arg-type]
    raise ParseError(f"could not find a preferred response (A or B) in the judge's answer: {text[:200]!r}")


def parse_persona(text: str) -> str:
    """Read the persona writer's answer (inside ``<persona>`` tags, or the whole text)."""
    m = _TAG_RE["persona"].search(text)
    persona = (m.group(1) if m else text).strip()
    if not persona:
        raise ParseError("the persona writer returned an empty persona")
    return persona
