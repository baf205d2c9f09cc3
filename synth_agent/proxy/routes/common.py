"""Helpers the routers share: conversations as the judge sees them, persona lookup, upstream bodies."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, TypeAdapter, ValidationError

from synth_agent import prompts
from synth_agent.engine.selection import served_persona
from synth_agent.llm.errors import LLMError, LLMTimeoutError
from synth_agent.models import Message, PersonaProfile
from synth_agent.prompts import ParseError
from synth_agent.proxy.deps import resolve_user, solve_json_write
from synth_agent.proxy.errors import ProxyError, error_response
from synth_agent.proxy.guard import PARSED_BODY
from synth_agent.proxy.state import ProxyState
from synth_agent.proxy.upstream import UpstreamResponse

log = logging.getLogger("synth_agent.proxy")

PERSONA_HEADER = "X-Synth-Persona-Version"
_MISSING = object()


def direct_json_route(body_type: TypeAdapter[Any], param: str, name: str, *, share_turns: bool = False) -> type[APIRoute]:
    """A route class for a hot JSON write route: declared as usual (the OpenAPI schema is FastAPI's), solved directly.

    FastAPI's generic per-request machinery (walking the dependency tree, extracting every
    parameter kind of every dependency, a second JSON parse of a body
    :class:`~synth_agent.proxy.guard.BodyGuard` already parsed) took about a third of the event
    loop's time per vote write, and ~30 % of the proxy's CPU per chat completion (py-spy,
    2026-12-01/02). The handler runs the same dependencies
    (:func:`~synth_agent.proxy.deps.solve_json_write`: ``State``, ``JsonCaller``, ``PinnedUser``)
    and validates the body once, with ``body_type`` (a ``TypeAdapter`` of the declared body type)
    applied to the value ``BodyGuard`` parsed, raising the same errors in the same order as FastAPI
    would, then calls the declared endpoint with ``st``, ``caller``, ``pinned``, the body as
    ``param`` and, if it takes one, ``request``. The endpoint must declare exactly those.

    ``serve_directly``: :meth:`synth_agent.proxy.app.ProxyApp.serve_directly` may answer the route past
    FastAPI's own layers; ``share_turns``: its requests start within the loop turn's budget
    (:mod:`synth_agent.proxy.turns`, for vote writes).
    """

    class DirectRoute(APIRoute):
        serve_directly = True
        turn_budget = share_turns

        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            endpoint = self.endpoint
            wants_request = "request" in inspect.signature(endpoint).parameters

            async def handler(request: Request) -> Response:
                st, caller, pinned, errors = await solve_json_write(request)
                value = _parsed_body(request)
                if value is _MISSING:  # no body, or not parsed as JSON (another media type): as FastAPI would
                    value = await request.body() or _MISSING
                payload = None
                if value is _MISSING:
                    errors.append({"type": "missing", "loc": ("body",), "msg": "Field required", "input": None})
                else:
                    try:
                        payload = body_type.validate_python(value, from_attributes=True)  # as FastAPI
                    except ValidationError as exc:
                        errors += [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
                if errors:
                    raise RequestValidationError(errors, body=None if value is _MISSING else value)
                kwargs: dict[str, Any] = {"st": st, "caller": caller, "pinned": pinned, param: payload}
                if wants_request:
                    kwargs["request"] = request
                response = await endpoint(**kwargs)
                assert isinstance(response, Response)
                return response

            return handler

    DirectRoute.__name__ = DirectRoute.__qualname__ = name
    return DirectRoute


def _parsed_body(request: Request) -> Any:
    """The JSON body :class:`~synth_agent.proxy.guard.BodyGuard` parsed (strictly, once), or ``_MISSING``."""
    return request.scope.get("state", {}).get(PARSED_BODY, _MISSING)


async def client_json(request: Request) -> Any:
    """The request's JSON body as the client sent it: as :class:`~synth_agent.proxy.guard.BodyGuard` parsed it,
    else parsed here."""
    value = _parsed_body(request)
    return await request.json() if value is _MISSING else value


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
