"""The proxy in front of the real llama.cpp server: plain and streamed chat completions, persona injected.

aiohttp request tracing on the proxy's upstream session shows exactly what the
real server received; the answers are the real model's.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.store.memory import InMemoryStore
from real_support import PERSONA, USER, RecordingTrace, endpoint

from synth_agent.config import Settings
from synth_agent.judge_server import LocalJudgeServer
from synth_agent.llm.client import LLMClient
from synth_agent.models import PersonaProfile
from synth_agent.proxy import ProxyServer, create_app
from synth_agent.proxy.settings import ProxySettings

KEY = "sk-real-1"
QUESTION = "How do I reverse a list in Python?"


@pytest.fixture(scope="module")
def proxy(real_server: LocalJudgeServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ProxyServer, RecordingTrace]]:
    recorder = RecordingTrace()
    home: Path = tmp_path_factory.mktemp("real-proxy")
    app = create_app(
        Settings(base_url=real_server.base_url, api_key="none", model=real_server.model, home=home),
        ProxySettings(
            api_keys=f"acme:{KEY}", upstream_base_url=real_server.base_url, upstream_api_key="none",
            upstream_timeout=300, model_map={"gpt-4o-mini": real_server.model}, synthesis="off",
        ),
        store=InMemoryStore(), llm=LLMClient(endpoint(real_server)), checkpointer=InMemorySaver(),
        upstream_trace_configs=[recorder.config],
    )  # fmt: skip
    with ProxyServer(app) as srv:
        memories = app.state.proxy.memories
        srv.call(memories("acme").save_persona(PersonaProfile(user_id=USER, persona=PERSONA)))
        yield srv, recorder


def client(srv: ProxyServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.base_url, api_key=KEY, max_retries=0, timeout=300)


def test_plain_chat_completion_reaches_the_real_model_with_the_persona(proxy: tuple[ProxyServer, RecordingTrace]) -> None:
    srv, recorder = proxy
    raw = client(srv).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", user=USER, max_tokens=48, messages=[{"role": "user", "content": QUESTION}]
    )
    reply = raw.parse()
    assert raw.headers["x-synth-persona-version"] == "1"
    text = reply.choices[0].message.content or ""
    assert text.strip(), "the real model answered nothing"
    assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 48
    sent = recorder.chats()[-1]
    assert sent["model"] == "smollm2"  # the model map applied upstream
    assert sent["messages"][0]["role"] == "system" and PERSONA in sent["messages"][0]["content"]
    assert sent["messages"][1:] == [{"role": "user", "content": QUESTION}]

    # no user: forwarded untouched
    raw = client(srv).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", max_tokens=8, messages=[{"role": "user", "content": QUESTION}]
    )
    assert raw.headers["x-synth-persona-version"] == "0" and raw.parse().choices[0].message.content is not None
    assert recorder.chats()[-1]["messages"] == [{"role": "user", "content": QUESTION}]


def test_streamed_chat_completion_is_passed_through_chunk_by_chunk(proxy: tuple[ProxyServer, RecordingTrace]) -> None:
    srv, recorder = proxy
    stream = client(srv).chat.completions.create(
        model="gpt-4o-mini", user=USER, max_tokens=48, stream=True,
        messages=[{"role": "user", "content": QUESTION + " Answer briefly."}],
    )  # fmt: skip
    chunks = list(stream)
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert sum(1 for d in deltas if d) > 1, "a real stream arrives in several chunks"
    assert "".join(deltas).strip()
    assert any(c.choices and c.choices[0].finish_reason in ("stop", "length") for c in chunks)
    sent = recorder.chats()[-1]
    assert sent["stream"] is True and PERSONA in sent["messages"][0]["content"]
