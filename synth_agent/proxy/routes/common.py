"""Helpers the routers share: conversations as the judge sees them, persona lookup, upstream bodies."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from fastapi import Response
from pydantic import BaseModel

from synth_agent import prompts
from synth_agent.engine.selection import served_persona
from synth_agent.llm.errors import LLMError, LLMTimeoutError
from synth_agent.models import Message, PersonaProfile
from synth_agent.prompts import ParseError
from synth_agent.proxy.deps import resolve_user
from synth_agent.proxy.errors import ProxyError, error_response
from synth_agent.proxy.state import ProxyState
from synth_agent.proxy.upstream import UpstreamResponse

log = logging.getLogger("synth_agent.proxy")

PERSONA_HEADER = "X-Synth-Persona-Version"


def text_of(content: Any) -> str:
    """A message's text: the string, or its ``text`` parts joined (images, audio... are not text)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(getattr(p, "text", None) or "") for p in content if getattr(p, "type", "text") == "text"
        )
    return ""


def as_context(messages: list[Any]) -> list[Message]:
    """The conversation as the judge and vote store see it (text turns; tool turns dropped).

    The request models have already capped every message's size.
    """
    out: list[Message] = []
    for m in messages:
        role = {"developer": "system"}.get(m.role, m.role)
        if role not in ("system", "user", "assistant"):
            continue
        text = text_of(m.content)
        if text.strip():
            out.append(Message(role=role, content=text))
    if not any(m.role == "user" for m in out):
        raise ProxyError(400, "the conversation has no user message with text", param="messages",
                         code="no_user_message")
    return out


@dataclass(frozen=True)
class Turn:
    """What the A/B, rerank and judge routes start from: whose turn, the conversation, their persona."""

    user: str
    context: list[Message]
    profile: PersonaProfile | None


async def user_turn(st: ProxyState, tenant: str, pinned: str | None, req: BaseModel) -> Turn:
    """The request's user (required; the pinned one wins), its conversation as text turns, and the persona."""
    user = resolve_user(pinned, req.user, required=True)  # type: ignore[attr-defined]
    assert user is not None
    context = as_context(req.messages)  # type: ignore[attr-defined]
    return Turn(user, context, await persona_of(st, tenant, user))


def raw_messages(req: BaseModel) -> list[dict[str, Any]]:
    """The request's messages as the client sent them (unknown fields kept), for the upstream."""
    return [m.model_dump(exclude_unset=True) for m in req.messages]  # type: ignore[attr-defined]


def with_persona(messages: list[dict[str, Any]], profile: PersonaProfile | None) -> list[dict[str, Any]]:
    """``messages`` with the user's persona first as a system message, where the per-user guard serves one."""
    persona = served_persona(profile)
    if persona is None:
        return messages
    return [{"role": "system", "content": prompts.generation_system_prompt(persona)}, *messages]


async def persona_of(st: ProxyState, tenant: str, user: str | None) -> PersonaProfile | None:
    """Cached persona; a store hiccup degrades to an unpersonalized answer instead of an error."""
    if user is None:
        return None
    st.ready()  # 503 while starting or stopping (not swallowed below)
    try:
        return await st.persona(tenant, user)
    except Exception:
        log.exception("could not read the persona of a user of tenant %r; answering without it", tenant)
        return None


def upstream_error(resp: UpstreamResponse, request_id: str | None) -> Response:
    """An upstream 4xx, in our error format with its message (auth failures are the proxy's problem: 502)."""
    from synth_agent.proxy.upstream import upstream_message

    if resp.status_code in (401, 403):
        raise ProxyError(502, "the upstream refused the proxy's credentials; check SYNTH_AGENT_UPSTREAM_API_KEY",
                         code="upstream_auth")
    status = resp.status_code if resp.status_code in (400, 404, 413) else 400
    return error_response(status, f"the upstream model rejected the request: {upstream_message(resp)}",
                          code="upstream_rejected", request_id=request_id)


def generation_body(st: ProxyState, req: BaseModel, messages: list[dict[str, Any]]) -> dict[str, Any]:
    """What to send upstream to generate a candidate: the client's parameters, mapped model, these messages."""
    model = getattr(req, "model", None) or st.proxy.default_model
    if not model:
        raise ProxyError(400, "model is required (or configure SYNTH_AGENT_DEFAULT_MODEL)", param="model")
    params = req.model_dump(exclude_unset=True, exclude={"user", "messages", "model", "candidates", "n",
                                                         "strategy", "seed", "stream"})
    return {**params, "model": st.proxy.upstream_model(model), "messages": messages}


async def judging(coro: Any) -> Any:
    """Judge/rank errors from the LLM become 502/504 in OpenAI format, never a hang or a 500."""
    try:
        return await coro
    except LLMTimeoutError as exc:
        raise ProxyError(504, f"the judge model did not answer in time: {exc}", code="judge_timeout") from None
    except LLMError as exc:
        raise ProxyError(502, f"the judge model failed: {exc}", code="judge_unavailable") from None
    except ParseError as exc:
        raise ProxyError(502, f"the judge model gave no readable verdict: {exc}", code="judge_unreadable") from None
