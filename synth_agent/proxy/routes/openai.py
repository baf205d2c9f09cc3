"""OpenAI-compatible routes: ``POST /v1/chat/completions`` (the user's persona injected) and ``GET /v1/models``."""

from typing import Annotated, Any

from fastapi import APIRouter, Body, Request
from fastapi.responses import Response, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import TypeAdapter

from synth_agent.engine.selection import served_persona
from synth_agent.proxy.deps import AuthCaller, JsonCaller, PinnedUser, State, resolve_user
from synth_agent.proxy.errors import request_id_of, responses
from synth_agent.proxy.routes.common import (
    PERSONA_HEADER,
    client_json,
    direct_json_route,
    persona_of,
    upstream_error,
    with_persona,
)
from synth_agent.proxy.schemas import EXAMPLES, ApiModels, ChatCompletion, ModelList

_SSE = {"text/event-stream": {"schema": {  # one server-sent event
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {"type": "string", "description": "a chat.completion.chunk as JSON; `[DONE]` ends the stream; "
                 "an {\"error\": ...} object if the upstream broke off mid-stream"},
        "event": {"type": "string"},
        "id": {"type": "string"},
        "retry": {"type": "integer"},
    },
}}}


def _chat_route(body_type: TypeAdapter[Any]) -> type[APIRoute]:
    """The route class of ``POST /v1/chat/completions``: solved directly (:func:`direct_json_route`)."""
    return direct_json_route(body_type, "req", "ChatRoute")


def router(models: ApiModels) -> APIRouter:
    r = APIRouter(tags=["openai"])
    ChatCompletionRequest = models.ChatCompletionRequest

    async def chat_completions(
        request: Request,
        st: State,
        caller: JsonCaller,
        pinned: PinnedUser,
        req: Annotated[ChatCompletionRequest, Body(openapi_examples=EXAMPLES["chat"])],  # type: ignore[valid-type]
    ) -> Response:
        """Chat Completions with the user's persona prepended as a system message; streaming passes through.

        The user is ``user`` or the ``X-Synth-User`` header; without one the request is forwarded
        untouched. Unknown fields (tools, vendor extras) are forwarded as sent.
        """
        user = resolve_user(pinned, req.user, required=False)  # type: ignore[attr-defined]
        _, _, upstream, _ = st.ready()
        body: dict[str, Any] = await client_json(request)  # the client's JSON as sent (already validated)
        profile = await persona_of(st, caller.tenant, user)
        out = {**body, "model": st.proxy.upstream_model(req.model),  # type: ignore[attr-defined]
               "messages": with_persona(body["messages"], profile)}
        injected = profile is not None and served_persona(profile) is not None  # the per-user guard
        headers = {PERSONA_HEADER: str(profile.version if injected and profile else 0)}
        if injected:
            st.metrics.persona_injections.inc()
        rid = request_id_of(request)
        if req.stream:  # type: ignore[attr-defined]
            resp = await upstream.open_stream("/chat/completions", out)
            if resp.status_code >= 400:
                await resp.aread()
                await resp.aclose()
                return upstream_error(resp, rid)
            return StreamingResponse(
                upstream.relay(resp),
                status_code=resp.status_code,
                media_type=resp.headers.get("content-type", "text/event-stream"),
                headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        resp = await upstream.request_json("POST", "/chat/completions", out)
        if resp.status_code >= 400:
            return upstream_error(resp, rid)
        return Response(resp.content, status_code=resp.status_code,
                        media_type=resp.headers.get("content-type", "application/json"), headers=headers)

    # solved directly (the proxy's hottest route): FastAPI's dependency solver was ~30 % of its CPU per chat
    r.add_api_route(
        "/v1/chat/completions", chat_completions, methods=["POST"], response_model=None,
        responses={
            200: {"model": ChatCompletion, "content": _SSE,
                  "description": "The upstream's completion (or stream, with `stream: true`), passed through; "
                  "`X-Synth-Persona-Version` says which persona was injected (0: none)"},
            **responses(400, 401, 403, 404, 413, 415, 429, 500, 502, 503, 504),
        },
        route_class_override=_chat_route(TypeAdapter(ChatCompletionRequest)),
    )  # fmt: skip

    @r.get(
        "/v1/models",
        response_model=None,
        responses={200: {"model": ModelList, "description": "The upstream's model list, passed through"},
                   **responses(400, 401, 403, 404, 429, 500, 502, 503, 504)},
    )
    async def list_models(request: Request, st: State, caller: AuthCaller) -> Response:
        """The upstream's model list, passed through."""
        _, _, upstream, _ = st.ready()
        resp = await upstream.request_json("GET", "/models")
        if resp.status_code >= 400:
            return upstream_error(resp, request_id_of(request))
        return Response(resp.content, status_code=resp.status_code,
                        media_type=resp.headers.get("content-type", "application/json"))

    return r
