"""Export a learned persona for use outside synth-agent.

Three forms, one per consumer:

* ``system`` — a system prompt for any chat model (what the middleware injects);
* ``messages`` — the personalized judge prompt as an OpenAI-style message list,
  persona and demos first (a stable, prefix-cacheable prefix), the pair last;
* ``json`` — the whole profile, for storage or another synth-agent instance.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Literal

from synth_agent import prompts
from synth_agent.models import Message, PersonaProfile

ExportFormat = Literal["system", "messages", "json"]

PLACEHOLDER_CONTEXT = (Message(role="user", content="{conversation}"),)


def system_prompt(profile: PersonaProfile) -> str:
    """The persona as a generation system prompt."""
    return prompts.generation_system_prompt(profile.persona)


def judge_messages(
    profile: PersonaProfile,
    context: Sequence[Message] | None = None,
    a: str = "{response_a}",
    b: str = "{response_b}",
) -> list[dict[str, str]]:
    """The personalized judge prompt; without a pair, the last turn holds ``{placeholders}``."""
    return prompts.judge_messages(
        context if context is not None else PLACEHOLDER_CONTEXT, a, b,
        persona=profile.persona, demos=profile.demos,
    )


def export_profile(profile: PersonaProfile, fmt: ExportFormat = "system") -> str:
    """Render ``profile`` in ``fmt`` as text (JSON for ``messages`` and ``json``)."""
    if fmt == "system":
        return system_prompt(profile)
    if fmt == "messages":
        return json.dumps(judge_messages(profile), ensure_ascii=False, indent=2)
    if fmt == "json":
        return profile.model_dump_json(indent=2)
    raise ValueError(f"unknown export format {fmt!r}; use 'system', 'messages' or 'json'")
