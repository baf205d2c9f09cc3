"""A user's data: votes, persona, history, prompt export, and forgetting everything (``/v1/users/{user}``).

User ids are opaque and travel as one percent-encoded path segment (``quote(user_id, safe="")``);
a path that is not percent-encoded UTF-8 (``%FF``) is refused before it gets here.
"""

import asyncio
import logging
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from fastapi.responses import Response

from graphs.synthesis import erase_synthesis_checkpoints
from store.memory import FIT_KINDS
from synth_agent.export import export_profile
from synth_agent.lift import load_user_lift, with_live
from synth_agent.llm.base import ChatBackend
from synth_agent.models import PersonaProfile
from synth_agent.proxy.deps import AuthCaller, PathUser, State
from synth_agent.proxy.errors import ProxyError, responses
from synth_agent.proxy.routes.common import PERSONA_HEADER
from synth_agent.proxy.schemas import ApiModels, PersonaHistory, UserDeleted, VoteList
from synth_agent.proxy.state import ProxyState
from synth_agent.scheduler import SynthesisScheduler

log = logging.getLogger("synth_agent.proxy")

_READ_ERRORS = responses(400, 401, 403, 404, 429, 500, 503)


async def _profile(st: ProxyState, tenant: str, user: str) -> PersonaProfile:
    memories, _, _, _ = st.ready()
    profile = await memories(tenant).current_persona(user)
    if profile is None:
        n = await memories(tenant).count_votes(user)
        first = st.scheduler.policy.first_fit if st.scheduler else 5
        raise ProxyError(404, f"no persona for this user yet ({n} vote(s) stored; the first is learned at {first})",
                         code="no_persona")
    return profile


async def _forget_checkpoints(st: ProxyState, tenant: str, user: str, versions: int) -> None:
    """Synthesis checkpoints hold the user's votes too: erase them (a failure is a 500: DELETE again)."""
    if st.checkpointer is not None:
        await erase_synthesis_checkpoints(st.checkpointer, tenant, user, versions)


async def _forget_cached_answers(llm: ChatBackend) -> None:
    """Empty this server's LLM answer cache: cached prompts and answers quote users' votes.

    The cache is content-addressed (a hash of the whole prompt), so one user's entries cannot be
    picked out; a forget drops all of them, which costs only re-judging (forgets are rare); ``clear`` is
    part of :class:`~synth_agent.llm.cache.ResponseCache`, so a user's own cache is emptied too. Scale-out workers keep their own in-memory caches until they restart or evict them.
    """
    cache = getattr(llm, "cache", None)  # a ChatBackend need not cache at all
    if cache is not None:
        await cache.clear()


def router(models: ApiModels) -> APIRouter:
    r = APIRouter(tags=["users"])

    @r.get("/v1/users/{user}/votes", response_model=VoteList, responses=_READ_ERRORS)
    async def list_votes(st: State, caller: AuthCaller, user: PathUser) -> dict[str, Any]:
        """The user's stored votes in time order (empty for unknown users), acknowledged ones not yet in
        Chroma included."""
        memories, _, _, _ = st.ready()
        return {"object": "list", "data": await memories(caller.tenant).list_votes(user)}

    @r.get("/v1/users/{user}/persona/history", response_model=PersonaHistory, responses=_READ_ERRORS)
    async def persona_history(st: State, caller: AuthCaller, user: PathUser) -> dict[str, Any]:
        """Every persona version, oldest first (empty for unknown users); each version's ``meta.live`` holds
        its live A/B win rate and ``meta.selection`` its cross-validated accuracy per configuration."""
        memories, _, _, _ = st.ready()
        memory = memories(caller.tenant)
        history, lift = await asyncio.gather(memory.persona_history(user), load_user_lift(memory, user))
        return {"object": "list", "data": [with_live(p, lift) for p in history]}

    @r.get("/v1/users/{user}/persona", response_model=PersonaProfile, responses=_READ_ERRORS)
    async def persona(st: State, caller: AuthCaller, user: PathUser) -> PersonaProfile:
        """The current persona (404 until one was learned), with the user's own figures: ``meta.served`` (what
        the per-user guard serves: persona_demos, persona, demos or default), ``meta.selection`` (cross-validated
        accuracy per configuration) and ``meta.live`` (A/B win rate of personalized vs plain answers, overall
        and for this version, with 95% intervals)."""
        memories, _, _, _ = st.ready()
        profile = await _profile(st, caller.tenant, user)
        return with_live(profile, await load_user_lift(memories(caller.tenant), user))

    @r.get(
        "/v1/users/{user}/prompt",
        response_model=None,
        responses={
            200: {"description": "`system`: the persona as a system prompt (text); `messages`: the judge prompt "
                  "as OpenAI messages; `json`: the whole profile",
                  "content": {"text/plain": {"schema": {"type": "string"}},
                              "application/json": {"schema": {}}}},
            **_READ_ERRORS,
        },
    )
    async def prompt(
        st: State,
        caller: AuthCaller,
        user: PathUser,
        format: Annotated[Literal["system", "messages", "json"], Query()] = "system",
    ) -> Response:
        """Export the persona: ``system`` prompt text, judge ``messages`` (JSON), or the whole profile (``json``)."""
        profile = await _profile(st, caller.tenant, user)
        text = export_profile(profile, format)
        media = "text/plain; charset=utf-8" if format == "system" else "application/json"
        return Response(text, media_type=media, headers={PERSONA_HEADER: str(profile.version)})

    @r.delete("/v1/users/{user}", response_model=UserDeleted, responses=responses(400, 401, 403, 429, 500, 503))
    async def forget(st: State, caller: AuthCaller, user: PathUser) -> dict[str, Any]:
        """Forget everything stored for this user in the caller's tenant (votes, personas, pending pairs)."""
        memories, personalizer, _, llm = st.ready()
        tenant = caller.tenant
        sched = st.scheduler
        if getattr(sched, "distributed", False):
            # Scale-out mode: queued jobs cancelled, a running one aborted, then Chroma and Postgres erased.
            try:
                counts = await sched.forget(memories(tenant), user)  # type: ignore[union-attr]
            except TimeoutError as exc:
                raise ProxyError(503, f"{exc}; nothing was deleted, retry shortly", code="fit_running",
                                 headers={"Retry-After": "5"}) from None
            personalizer.invalidate(tenant, user)
            await _forget_cached_answers(llm)
            return {"object": "user.deleted", "deleted": counts}
        versions = len(await memories(tenant).persona_history(user))
        counts = await memories(tenant).forget_user(user)
        personalizer.invalidate(tenant, user)
        await _forget_cached_answers(llm)
        await _forget_checkpoints(st, tenant, user, versions)
        if isinstance(sched, SynthesisScheduler):
            sched.drop_user(tenant, user)  # its per-user run counts (and an idle slot) go with the user
        if isinstance(sched, SynthesisScheduler) and sched.is_busy(tenant, user):
            # A fit already running would save a persona after this delete: once it ends, erase what a
            # fit writes (personas, traces, judgments, checkpoints) — never votes, which the user may
            # have cast (and had acknowledged) after this DELETE answered.
            async def again() -> None:
                try:
                    await sched.wait_user_idle(tenant, user)
                    await memories(tenant).forget_user(user, kinds=FIT_KINDS)
                    personalizer.invalidate(tenant, user)
                    await _forget_cached_answers(llm)  # what that fit cached after the first clear
                    await _forget_checkpoints(st, tenant, user, versions + 1)
                    sched.drop_user(tenant, user)  # the run count that fit added
                except Exception:
                    log.exception("could not repeat the forget of a user whose fit was running")

            task = asyncio.get_running_loop().create_task(again())
            st.background.add(task)
            task.add_done_callback(st.background.discard)
        return {"object": "user.deleted", "deleted": counts}

    return r
