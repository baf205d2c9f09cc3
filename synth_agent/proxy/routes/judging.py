"""Judging: ``POST /v1/rerank`` (best of n) and ``POST /v1/judge`` (a vs b), with the user's judge."""

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Body

from synth_agent.engine.judge import Judge
from synth_agent.engine.rerank import rank
from synth_agent.proxy.deps import JsonCaller, PinnedUser, State
from synth_agent.proxy.errors import responses
from synth_agent.proxy.routes.common import generation_body, judging, raw_messages, user_turn, with_persona
from synth_agent.proxy.schemas import EXAMPLES, ApiModels, JudgmentResult, RerankResult


def router(models: ApiModels) -> APIRouter:
    r = APIRouter(tags=["judging"])
    RerankRequest, JudgeRequest = models.RerankRequest, models.JudgeRequest

    @r.post("/v1/rerank", response_model=RerankResult,
            responses=responses(400, 401, 403, 404, 413, 415, 429, 500, 502, 503, 504))
    async def rerank(
        st: State,
        caller: JsonCaller,
        pinned: PinnedUser,
        req: Annotated[RerankRequest, Body(openapi_examples=EXAMPLES["rerank"])],  # type: ignore[valid-type]
    ) -> dict[str, Any]:
        """Best of n for this user: candidates given, or generated with the persona; ranked by their judge."""
        _, _, upstream, llm = st.ready()
        turn = await user_turn(st, caller.tenant, pinned, req)
        profile = turn.profile
        if req.candidates is not None:  # type: ignore[attr-defined]
            candidates = list(req.candidates)  # type: ignore[attr-defined]
        else:
            n = req.n or 4  # type: ignore[attr-defined]
            base = generation_body(st, req, with_persona(raw_messages(req), profile))
            seed = req.seed or 0  # type: ignore[attr-defined]
            candidates = list(await asyncio.gather(*(upstream.chat_text({**base, "seed": seed + i}) for i in range(n))))
        judge = Judge.from_profile(llm, profile, call_site="proxy_rerank")
        result = await judging(rank(judge, turn.context, candidates, strategy=req.strategy))  # type: ignore[attr-defined]
        return {
            "object": "rerank",
            "winner": result.winner,
            "best": candidates[result.winner],
            "scores": result.scores,
            "order": result.order,
            "strategy": result.strategy,
            "personalized_judge": judge.personalized,
            "persona_version": profile.version if profile else 0,
            "candidates": candidates,
        }

    @r.post("/v1/judge", response_model=JudgmentResult,
            responses=responses(400, 401, 403, 413, 415, 429, 500, 502, 503, 504))
    async def judge(
        st: State,
        caller: JsonCaller,
        pinned: PinnedUser,
        req: Annotated[JudgeRequest, Body(openapi_examples=EXAMPLES["judge"])],  # type: ignore[valid-type]
    ) -> dict[str, Any]:
        """Which of a and b this user would prefer (both presentation orders; disagreement is a tie).

        One answer may be empty: the judge is shown an explicit empty response.
        """
        _, _, _, llm = st.ready()
        turn = await user_turn(st, caller.tenant, pinned, req)
        profile = turn.profile
        judge = Judge.from_profile(llm, profile, call_site="proxy_judge")
        verdict = await judging(judge.compare(turn.context, req.a, req.b))  # type: ignore[attr-defined]
        return {
            "object": "judgment",
            **verdict.model_dump(mode="json"),
            "personalized": judge.personalized,
            "persona_version": profile.version if profile else 0,
        }

    return r
