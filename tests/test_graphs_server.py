"""ServerSynthesis: when a vote makes a fit due, one background run per user through the LangGraph SDK.

A recording stand-in for the SDK client checks the calls (thread per user, ``enqueue``, a pending
run reused, the identity passed); ``tests/test_langgraph_server.py`` runs the real thing.
"""

from __future__ import annotations

import random
import uuid
from typing import Any

import pytest
from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langgraph.store.memory import InMemoryStore

from graphs._common import TenantMemories
from graphs.chat import Personalizer
from graphs.server import ServerSynthesis, user_synthesis_thread
from synth_agent.models import PersonaProfile
from synth_agent.scheduler import SynthesisPolicy
from synth_agent.sim.population import Population


class FakeRuns:
    def __init__(self) -> None:
        self.created: list[dict[str, Any]] = []
        self.pending: dict[str, list[dict[str, Any]]] = {}

    async def list(self, thread_id: str, *, status: str | None = None, limit: int = 10) -> list[dict[str, Any]]:
        assert status == "pending"
        return self.pending.get(thread_id, [])[:limit]

    async def create(self, thread_id: str, assistant_id: str, **kw: Any) -> dict[str, Any]:
        run = {"run_id": f"run-{len(self.created)}", "thread_id": thread_id, "assistant_id": assistant_id, **kw}
        self.created.append(run)
        self.pending.setdefault(thread_id, []).append(run)
        return run


class FakeThreads:
    def __init__(self) -> None:
        self.created: list[str] = []

    async def create(self, *, thread_id: str, if_exists: str, metadata: dict[str, Any]) -> dict[str, Any]:
        assert if_exists == "do_nothing"
        self.created.append(thread_id)
        return {"thread_id": thread_id}


class FakeClient:
    def __init__(self) -> None:
        self.runs, self.threads = FakeRuns(), FakeThreads()


async def test_due_vote_enqueues_one_run_per_user() -> None:
    mems = TenantMemories(InMemoryStore())
    client = FakeClient()
    hook = ServerSynthesis(policy=SynthesisPolicy(debounce=2.0), client=lambda: client)
    memory = mems("acme")
    pop = Population(1, seed=1)
    votes = [v.model_copy(update={"user_id": "ana"}) for v in pop.votes(pop.user_ids[0], 7)]
    await memory.add_votes(votes[:4])
    assert await hook.vote_recorded("acme", "ana", memory) == {"scheduled": False, "votes": 4, "next_fit_at": 5}
    assert client.runs.created == []

    await memory.add_votes(votes[4:5])
    done = await hook.vote_recorded("acme", "ana", memory)
    thread = user_synthesis_thread("acme", "ana")
    assert done == {"scheduled": True, "votes": 5, "thread_id": thread, "run_id": "run-0"}
    (run,) = client.runs.created
    assert run["assistant_id"] == "synthesis" and run["multitask_strategy"] == "enqueue"
    assert run["input"] == {"due_only": True} and run["after_seconds"] == 2
    assert run["context"] == {"synth_user_id": "ana", "tenant_id": "acme"}

    await memory.add_votes(votes[5:6])  # while that run still waits: it will read this vote too
    again = await hook.vote_recorded("acme", "ana", memory)
    assert again is not None and again["already_queued"] and again["run_id"] == "run-0"
    assert len(client.runs.created) == 1

    client.runs.pending.clear()  # it ran and fitted on 6 votes
    await memory.save_persona(PersonaProfile(user_id="ana", persona="p", vote_ids=[v.id for v in votes[:6]]))
    await memory.add_votes(votes[6:7])
    assert (await hook.vote_recorded("acme", "ana", memory))["next_fit_at"] == 10  # type: ignore[index]
    # users and tenants get their own threads
    assert len({thread, user_synthesis_thread("acme", "bo"), user_synthesis_thread("other", "ana")}) == 3


async def test_outside_the_server_nothing_is_scheduled() -> None:
    mems = TenantMemories(InMemoryStore())
    memory = mems("t")
    pop = Population(1, seed=2)
    await memory.add_votes([v.model_copy(update={"user_id": "u"}) for v in pop.votes(pop.user_ids[0], 5)])
    out = await ServerSynthesis().vote_recorded("t", "u", memory)
    assert out == {"scheduled": False, "votes": 5, "reason": "not running under the LangGraph server"}


class Broken:
    async def vote_recorded(self, tenant_id: str, user_id: str, memory: Any) -> dict[str, Any]:
        raise ConnectionError("server unreachable")


async def test_a_failing_hook_never_loses_or_fails_the_vote() -> None:
    store = InMemoryStore()
    mems = TenantMemories(store)
    p = Personalizer(FakeListChatModel(responses=["one", "two"]), store=store, memory_for=mems, default_mode="ab",
                     background=Broken(), rng=random.Random(0))
    cfg = {"configurable": {"synth_user_id": "ana", "tenant_id": "acme"}}
    out = await p.graph.ainvoke({"messages": [("user", "hi")]}, cfg)
    res = await p.graph.ainvoke({"vote": {"token": out["ab"]["token"], "choice": "a"}}, cfg)
    assert res["vote_result"]["ok"] is True
    assert res["vote_result"]["synthesis"] == {"scheduled": False, "error": "server unreachable"}
    assert await mems("acme").count_votes("ana") == 1


@pytest.mark.parametrize("user", ["a:b", "a", "ä/ö.x"])
def test_thread_ids_are_stable_uuids(user: str) -> None:
    tid = user_synthesis_thread("acme", user)
    assert uuid.UUID(tid) and tid == user_synthesis_thread("acme", user)
