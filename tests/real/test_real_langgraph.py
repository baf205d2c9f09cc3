"""The LangGraph middleware wrapping a ``ChatOpenAI`` that points at the real llama.cpp server."""

from __future__ import annotations

import httpx
from langchain_core.messages import AIMessage
from langchain_openai import ChatOpenAI
from langgraph.store.memory import InMemoryStore
from real_support import PERSONA, USER, RecordingTransport, endpoint

from graphs._common import PERSONA_MARKER, TenantMemories
from graphs.chat import Personalizer
from synth_agent.judge_server import LocalJudgeServer
from synth_agent.llm.client import LLMClient
from synth_agent.models import PersonaProfile

QUESTION = "How do I read a CSV file in Python?"
CONFIG = {"configurable": {"user_id": USER, "tenant_id": "acme"}}


def chat_model(server: LocalJudgeServer, http: httpx.AsyncClient, **kw: object) -> ChatOpenAI:
    return ChatOpenAI(
        model=server.model, base_url=server.base_url, api_key="none", max_retries=0,  # type: ignore[arg-type]
        timeout=300, http_async_client=http, **kw,
    )  # fmt: skip


async def test_plain_and_rerank_turns_on_the_real_model(real_server: LocalJudgeServer) -> None:
    recorder = RecordingTransport()
    store = InMemoryStore()
    memories = TenantMemories(store)
    await memories("acme").save_persona(PersonaProfile(user_id=USER, persona=PERSONA))
    judge_llm = LLMClient(endpoint(real_server))
    http = httpx.AsyncClient(transport=recorder, timeout=300)
    # langchain-openai sends max_tokens as max_completion_tokens, which llama-cpp-python ignores:
    # the cap goes in the body under the name the server reads (docs/judges.md).
    model = chat_model(real_server, http, temperature=0.8, extra_body={"max_tokens": 48})
    bot = Personalizer(model, llm=judge_llm, store=store, memory_for=memories, n_candidates=2)
    try:
        out = await bot.graph.ainvoke({"messages": [("user", QUESTION)]}, CONFIG)
        answer = out["messages"][-1]
        assert isinstance(answer, AIMessage) and str(answer.content).strip()
        assert not any(m.additional_kwargs.get(PERSONA_MARKER) for m in out["messages"])  # never stored
        sent = recorder.chats()[-1]["messages"]
        assert sent[0]["role"] == "system" and PERSONA in sent[0]["content"]
        assert sent[-1] == {"role": "user", "content": QUESTION}

        # rerank: two sampled candidates from the real model, the real model as personalized judge
        before = len(recorder.chats())
        cfg = {"configurable": {**CONFIG["configurable"], "mode": "rerank"}}
        out = await bot.graph.ainvoke({"messages": [("user", QUESTION)]}, cfg)
        info = out["rerank"]
        assert info["personalized_judge"] is True and info["winner"] in (0, 1) and len(info["scores"]) == 2
        assert out["messages"][-1].content == info["candidates"][info["winner"]]["text"]
        generated = recorder.chats()[before:]
        assert len(generated) == 2 and {b.get("seed") for b in generated} == {None, 1}  # distinct samples
        assert judge_llm.stats.site("rerank").requests >= 2 and judge_llm.stats.total().errors == 0
    finally:
        await judge_llm.aclose()
        await http.aclose()
