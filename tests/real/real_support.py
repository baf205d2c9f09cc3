"""Shared by the real-model tier: vote data (one hand-written user, long variants that overflow a
4096-token window) and a recording HTTP transport that shows what really reached the server."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from functools import cache
from pathlib import Path
from typing import Any

import aiohttp
import httpx

from synth_agent.ingest import read_jsonl
from synth_agent.judge_server import LocalJudgeServer
from synth_agent.llm.base import ChatBackend, ChatMessage, Completion, LLMStats, TokenLogprob
from synth_agent.llm.client import EndpointConfig
from synth_agent.models import Vote

DATA = Path(__file__).parent / "data"
USER = "ana@example.com"
"""Prefers short, direct answers with a small code example; dislikes long hedged prose and emoji."""
PERSONA = (
    "Ana is a programmer who strongly prefers short, direct answers that show a small code example. "
    "She dislikes long, vague, hedging prose and emoji."
)
"""A hand-written persona for tests that need one without fitting first."""


def endpoint(server: LocalJudgeServer, **overrides: object) -> EndpointConfig:
    """The settings ``judge-server llamacpp`` prints (one request at a time, the server's context window,
    which it does not report, and its JSON-schema dialect) plus a generous timeout for CPU decoding."""
    return server.endpoint(**{"timeout": 300.0, "max_retries": 1, **overrides})


@cache
def ana_votes() -> tuple[Vote, ...]:
    """Eight votes in time order, read through the real JSONL ingest path."""
    parsed = read_jsonl(DATA / "ana_votes.jsonl")
    assert not parsed.issues, parsed.issues
    return tuple(parsed.votes)


def long_votes(n: int = 5, user: str = "long@example.com") -> list[Vote]:
    """``n`` of Ana's votes with both answers padded to roughly 250 tokens each (a long technical answer
    and a long rambling one), so four label-only demos plus the pair exceed a 2048-token window
    whatever the model answers, while one pair fits with room for the answer."""
    out = []
    for i, v in enumerate(ana_votes()[:n]):
        steps = "\n".join(
            f"{k}. Check the result of step {k - 1}, print the intermediate value, and compare it with the "
            f"documented behaviour before you continue with the next step of the procedure."
            for k in range(1, 6)
        )
        ramble = " ".join(
            "It is worth remembering that every situation is different and that there are many opinions "
            "about the best approach, so you may want to consider your own needs carefully."
            for _ in range(5)
        )
        out.append(
            v.model_copy(
                update={
                    "id": f"long-{i + 1}",
                    "user_id": user,
                    "chosen": v.chosen + "\n\nIn detail:\n" + steps,
                    "rejected": v.rejected + " " + ramble,
                }
            )
        )
    return out


class RecordingTransport(httpx.AsyncBaseTransport):
    """Forwards every request to the real server unchanged and keeps the JSON bodies it sent."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.bodies: list[dict[str, Any]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        if body:
            self.bodies.append(json.loads(body))
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()

    def chats(self) -> list[dict[str, Any]]:
        """Bodies of the chat completions sent, in order."""
        return [b for b in self.bodies if "messages" in b]


class RecordingTrace:
    """aiohttp request tracing for the proxy's upstream session: keeps the JSON bodies it sent."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.config = aiohttp.TraceConfig()
        self.config.on_request_start.append(self._start)
        self.config.on_request_chunk_sent.append(self._chunk)
        self.config.on_request_end.append(self._end)

    async def _start(self, _session: Any, ctx: Any, _params: Any) -> None:
        ctx.body = bytearray()

    async def _chunk(self, _session: Any, ctx: Any, params: aiohttp.TraceRequestChunkSentParams) -> None:
        ctx.body.extend(params.chunk)

    async def _end(self, _session: Any, ctx: Any, _params: Any) -> None:
        if ctx.body:
            self.bodies.append(json.loads(bytes(ctx.body)))

    def chats(self) -> list[dict[str, Any]]:
        """Bodies of the chat completions sent, in order."""
        return [b for b in self.bodies if "messages" in b]


class Wiretap:
    """A ChatBackend in front of the real client: records every answer per call site, and can cut answers short.

    ``truncate={"demo_select": 1}`` makes that call site's answers one token long — a guaranteed
    unreadable answer from the real model (``{`` under constrained decoding), to test what the engine
    does with one.
    """

    def __init__(
        self, inner: ChatBackend, *, truncate: dict[str, int] | None = None, no_letters: Sequence[str] = ()
    ) -> None:
        self.inner = inner
        self.model = inner.model
        self.stats: LLMStats = inner.stats
        self.truncate = dict(truncate or {})
        self.no_letters = set(no_letters)
        self.answers: list[tuple[str, str]] = []

    async def complete(self, messages: Sequence[ChatMessage], **kw: Any) -> Completion:
        site = kw.get("call_site", "default")
        if site in self.truncate:
            kw["max_tokens"] = self.truncate[site]
        comp = await self.inner.complete(messages, **kw)
        if site in self.no_letters and comp.top_logprobs:
            # The model's real first-token alternatives without A and B: what a log-probability judgment
            # looks like when the model starts its answer with "The ..." (the judge falls back to CoT).
            kept = [t for t in comp.top_logprobs[0] if t.token.strip().strip('"').upper() not in ("A", "B")]
            comp = replace(comp, top_logprobs=[kept or [TokenLogprob("The", -0.1)]])
        self.answers.append((site, comp.text))
        return comp

    async def structured(self, messages: Sequence[ChatMessage], schema: Any, **kw: Any) -> Any:
        return await self.inner.structured(messages, schema, **kw)

    async def aclose(self) -> None:
        return None

    def texts(self, call_site: str) -> list[str]:
        return [text for site, text in self.answers if site == call_site]
