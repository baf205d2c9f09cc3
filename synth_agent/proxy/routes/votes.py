"""Votes and A/B pairs: ``POST /v1/votes``, ``POST /v1/ab``, ``POST /v1/ab/{token}/vote``."""

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Body, Path
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import TypeAdapter

from graphs.chat import VoteError
from store.intake import IntakeFull
from synth_agent.engine.selection import served_persona
from synth_agent.ingest import parse_vote
from synth_agent.models import Message, Vote, parse_timestamp, vote_checks
from synth_agent.proxy.deps import JsonCaller, PinnedUser, State, resolve_user
from synth_agent.proxy.errors import ProxyError, responses
from synth_agent.proxy.routes.common import (
    direct_json_route,
    generation_body,
    raw_messages,
    user_turn,
    with_persona,
)
from synth_agent.proxy.schemas import EXAMPLES, ABPair, ABVoteReceipt, ApiModels, VoteBatchResult


def _votes_route(votes_body: TypeAdapter[Any]) -> type[APIRoute]:
    """The route class of ``POST /v1/votes``: solved directly (:func:`~synth_agent.proxy.routes.common.direct_json_route`),
    its requests started within the loop turn's budget."""
    return direct_json_route(votes_body, "payload", "VotesRoute", share_turns=True)


def _checked_vote(item: Any, user_id: str) -> Vote | None:
    """The :class:`~synth_agent.models.Vote` of one body vote that ``VoteIn`` has just validated, built
    without validating its fields a second time; None when :func:`~synth_agent.ingest.parse_vote` must.

    Why: a vote write was validated twice on the event loop, by the body type ``VoteIn`` (strict:
    FastAPI's 422 errors) and again by ``Vote`` (a dump, then every field validator). For the common
    shape (context, chosen and rejected as text, an id that is text or absent) ``VoteIn`` has already
    made every check ``Vote``'s field validators make, with the same limits: text within
    ``max_content_chars`` (the models are built from the same settings) and encodable as UTF-8, the id
    and user id by the same functions (a pinned user id by ``pinned_user``). Only the conversion is
    left: the text context becomes one user message, and the timestamp a datetime (by the same
    ``parse_timestamp``). The vote-level checks (answers empty or identical, a context with no text)
    and the content-hash id run as in ``Vote``'s own validator (:func:`~synth_agent.models.vote_checks`); when it refuses, None, so
    ``parse_vote`` refuses the vote in its usual words. Any other shape (messages, an integer id)
    needs ``Vote``'s normalisation and goes through ``parse_vote``.
    """
    context, chosen, rejected, vid = item.context, item.chosen, item.rejected, item.id
    if type(context) is not str or type(chosen) is not str or type(rejected) is not str:
        return None
    if vid is not None and type(vid) is not str:
        return None
    ts = item.timestamp
    vote = Vote.model_construct(
        id=vid or "", user_id=user_id, context=[Message.model_construct(role="user", content=context)],
        chosen=chosen, rejected=rejected, timestamp=None if ts is None else parse_timestamp(ts), split=item.split,
    )
    try:
        return vote_checks(vote)
    except ValueError:
        return None


def router(models: ApiModels) -> APIRouter:
    r = APIRouter(tags=["votes"])
    VotesBody, ABRequest, ABVoteRequest = models.VotesBody, models.ABRequest, models.ABVoteRequest

    async def post_votes(
        st: State,
        caller: JsonCaller,
        pinned: PinnedUser,
        payload: Annotated[VotesBody, Body(  # type: ignore[valid-type]
            openapi_examples=EXAMPLES["votes"],
            description="One vote, a list of votes, or {\"votes\": [...]}. All or nothing: one invalid vote "
            "stores none. `user_id` may come from X-Synth-User (which then pins it: a vote naming another "
            "user is refused with 403).")],
    ) -> JSONResponse:
        """Store votes (all or nothing: one invalid vote stores none); schedules background synthesis."""
        memories, _, _, _ = st.ready()
        items: list[Any] = payload if isinstance(payload, list) else getattr(payload, "votes", None) or [payload]
        votes, errors = [], []
        for i, item in enumerate(items):
            user_id = resolve_user(pinned, item.user_id, required=True, where=f"votes[{i}].user_id")
            checked = _checked_vote(item, user_id)  # type: ignore[arg-type]  # required=True: a str
            if checked is not None:
                votes.append(checked)
                continue
            data = item.model_dump(exclude_none=True)
            data["user_id"] = user_id
            try:
                votes.append(parse_vote(data, max_content_chars=st.settings.max_content_chars))
            except ValueError as exc:
                errors.append(f"vote {i}: {exc}")
        if errors:
            shown = "; ".join(errors[:5]) + (f"; and {len(errors) - 5} more" if len(errors) > 5 else "")
            raise ProxyError(400, f"{len(errors)} of {len(items)} votes are invalid; nothing was stored: {shown}",
                             param="votes", code="invalid_vote")
        try:
            result = await memories(caller.tenant).add_votes(votes, validated=True)  # just now, once
        except IntakeFull as exc:  # the store is too far behind: push back instead of queueing without bound
            raise ProxyError(503, str(exc), code="store_backlog",
                             headers={"Retry-After": str(max(1, round(exc.retry_after)))}) from None
        except ValueError as exc:  # refused by the store before anything was written (e.g. text not UTF-8)
            raise ProxyError(400, f"invalid votes; nothing was stored: {exc}", param="votes",
                             code="invalid_vote") from None
        st.metrics.votes.inc(result.added)
        users = sorted({v.user_id for v in votes})
        for u in users:
            st.notify_vote(caller.tenant, u)
        # Built here, not by FastAPI's response-model pass (a validation and a serialization per vote
        # write): the shape is VoteBatchResult's, which documents it.
        return JSONResponse({"object": "vote.batch", "added": result.added, "duplicates": result.duplicates,
                             "users": users})

    r.add_api_route("/v1/votes", post_votes, methods=["POST"], response_model=VoteBatchResult,
                    responses=responses(400, 401, 403, 413, 415, 429, 500, 503),
                    route_class_override=_votes_route(TypeAdapter(VotesBody)))

    @r.post("/v1/ab", response_model=ABPair,
            responses=responses(400, 401, 403, 404, 413, 415, 429, 500, 502, 503, 504))
    async def ab(
        st: State,
        caller: JsonCaller,
        pinned: PinnedUser,
        req: Annotated[ABRequest, Body(openapi_examples=EXAMPLES["ab"])],  # type: ignore[valid-type]
    ) -> dict[str, Any]:
        """Two candidate answers and a vote token: with vs without the persona once one is served (the per-user
        guard may serve none); the vote then counts toward the user's live lift."""
        _, personalizer, upstream, _ = st.ready()
        turn = await user_turn(st, caller.tenant, pinned, req)
        profile = turn.profile
        messages = raw_messages(req)
        base = generation_body(st, req, messages)
        seed = req.seed or 0  # type: ignore[attr-defined]
        if served_persona(profile) is not None:  # the guard serves a persona: personalized vs plain
            bodies = [{**base, "messages": with_persona(messages, profile)}, base]
            if req.seed is not None:  # type: ignore[attr-defined]
                bodies = [{**b, "seed": seed} for b in bodies]
            flags = [True, False]
        else:  # no persona yet: two variants of the plain model, so early votes still carry signal
            bodies = [{**base, "seed": seed}, {**base, "seed": seed + 1}]
            flags = [False, False]
        texts = await asyncio.gather(*(upstream.chat_text(b) for b in bodies))
        cands = [{"index": i, "text": t, "personalized": f} for i, (t, f) in enumerate(zip(texts, flags, strict=True))]
        opened = await personalizer.open_vote(
            caller.tenant, turn.user, turn.context, cands, profile.version if profile and flags[0] else None, None
        )
        return {"object": "ab.pair", **opened}

    @r.post("/v1/ab/{token}/vote", response_model=ABVoteReceipt,
            responses=responses(400, 401, 403, 404, 409, 413, 415, 429, 500, 503))
    async def ab_vote(
        st: State,
        caller: JsonCaller,
        pinned: PinnedUser,
        token: Annotated[str, Path(max_length=128, description="the token from POST /v1/ab")],
        req: Annotated[ABVoteRequest, Body(openapi_examples=EXAMPLES["ab_vote"])],  # type: ignore[valid-type]
    ) -> dict[str, Any]:
        """Redeem an A/B token once, for its own user only (another user: 404; a second time: 409)."""
        memories, personalizer, _, _ = st.ready()
        user = resolve_user(pinned, req.user, required=True)  # type: ignore[attr-defined]
        assert user is not None
        try:
            receipt = await personalizer.submit_vote(token, req.choice.lower(), tenant_id=caller.tenant, user_id=user)  # type: ignore[attr-defined]
        except VoteError as exc:
            memory = memories(caller.tenant)
            # the pair is gone once used: the vote it became (id ab-<token>, under this user only) tells a
            # replay (409) from a token that is unknown, expired or another user's (404)
            used = await memory.has_vote(user, f"ab-{token}")
            if used or "already recorded" in str(exc):
                raise ProxyError(409, "this A/B token was already redeemed; each pair takes one vote",
                                 param="token", code="vote_token_used") from None
            raise ProxyError(404, str(exc), param="token", code="vote_token") from None
        st.metrics.votes.inc()
        return {"object": "ab.vote", **receipt.as_dict()}

    return r
