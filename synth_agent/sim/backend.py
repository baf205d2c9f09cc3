"""The simulated LLM as an in-process :class:`ChatBackend` (no HTTP).

Same brain as the HTTP endpoint, minus transport: for fast, exact engine tests
and quick experiments. Use :class:`synth_agent.sim.server.SimEndpoint` when the
test is about the wire (retries, faults, streaming, concurrency limits).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

from pydantic import BaseModel

from synth_agent.llm.base import ChatMessage, Completion, LLMStats, TokenLogprob
from synth_agent.sim.brain import SimBrain

T = TypeVar("T", bound=BaseModel)


class SimBackend:
    """Answers like the simulator endpoint; counts calls and (approximate) tokens per call site."""

    def __init__(self, seed: int = 0, model: str = "sim") -> None:
        self.brain = SimBrain(seed)
        self.model = model
        self.stats = LLMStats()

    async def complete(
        self,
        messages: Sequence[ChatMessage],
        *,
        call_site: str = "default",
        temperature: float = 0.0,
        max_tokens: int | None = None,
        json_mode: bool = False,
        logprobs: int | None = None,
        seed: int | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Completion:
        reply = self.brain.respond(
            list(messages), temperature=temperature, max_tokens=max_tokens, seed=seed,
            json_mode=json_mode, top_logprobs=logprobs,
        )
        top = [[TokenLogprob(t, lp) for t, lp in row] for row in reply.top_logprobs] if reply.top_logprobs else None
        prompt_tokens = sum(len(m["content"]) for m in messages) // 4
        completion_tokens = 1 if top else max(1, len(reply.text) // 4)
        site = self.stats.site(call_site)
        site.requests += 1
        site.prompt_tokens += prompt_tokens
        site.completion_tokens += completion_tokens
        return Completion(
            text=reply.text, model=self.model, prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens, top_logprobs=top,
        )

    async def structured(
        self,
        messages: Sequence[ChatMessage],
        schema: type[T],
        *,
        call_site: str = "default",
        temperature: float = 0.0,
        max_tokens: int | None = None,
    ) -> T:
        from synth_agent.llm.client import parse_structured

        comp = await self.complete(messages, call_site=call_site, temperature=temperature,
                                   max_tokens=max_tokens, json_mode=True)
        return parse_structured(comp.text, schema)

    async def aclose(self) -> None:
        return None
