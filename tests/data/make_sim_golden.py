"""Regenerate ``sim_golden.json.gz``: simulator requests from real fits and the replies the simulator gave.

The file pins the simulator's answers so that making it faster cannot change a verdict
(``tests/test_sim_golden.py``). It was written by the simulator of main at 200f950, before the
simulator's memoised fast path; regenerate it only when a change to the simulator's behaviour
is intended::

    python tests/data/make_sim_golden.py tests/data/sim_golden.json.gz
"""

from __future__ import annotations

import asyncio
import gzip
import json
import sys
from typing import Any

from synth_agent.engine import FitConfig, Synthesizer
from synth_agent.llm.client import EndpointConfig, LLMClient
from synth_agent.prompts import insight_messages
from synth_agent.sim.brain import SimBrain
from synth_agent.sim.population import Population
from synth_agent.sim.server import SimEndpoint


class _Recorder:
    """Wraps the endpoint's brain and keeps every request it answers."""

    def __init__(self, brain: SimBrain) -> None:
        self.brain = brain
        self.calls: list[dict[str, Any]] = []

    def respond(self, messages: list[dict[str, str]], **kw: Any) -> Any:
        self.calls.append({"messages": messages, **kw})
        return self.brain.respond(messages, **kw)


async def _fits(rec: _Recorder, score_mode: str, users: list[str], pop: Population) -> None:
    with SimEndpoint(brain=rec) as ep:
        async with LLMClient(EndpointConfig(base_url=ep.base_url, max_concurrency=8)) as llm:
            for uid in users:
                await Synthesizer(llm, None, FitConfig(seed=0, score_mode=score_mode)).fit(uid, pop.votes(uid, 12))


def main(out: str) -> None:
    pop = Population(4, seed=3)
    rec = _Recorder(SimBrain(seed=0))
    asyncio.run(_fits(rec, "cot", pop.user_ids[:1], pop))
    asyncio.run(_fits(rec, "logprob", pop.user_ids[1:2], pop))
    calls = rec.calls[::4]  # a spread over bootstrap, scoring, persona writing, demo search and selection
    judged = [c for c in calls if c["messages"][0]["content"].startswith("You are a preference judge")]
    for i, c in enumerate(judged[:: max(1, len(judged) // 4)][:4]):  # sampled judgments (noise per seed)
        calls.append({**c, "temperature": 0.9, "seed": i})
    votes = pop.votes(pop.user_ids[2], 3)
    for v in votes:  # insight extraction and chat (sampled and greedy), which fits do not send
        ctx = [m.model_dump() if hasattr(m, "model_dump") else m for m in v.context]
        calls.append({"messages": insight_messages(v.context, v.chosen, v.rejected, "A"), "temperature": 0.0,
                      "max_tokens": None, "seed": None, "json_mode": False, "top_logprobs": None})
        calls.append({"messages": ctx, "temperature": 0.7, "max_tokens": 200, "seed": 5, "json_mode": False,
                      "top_logprobs": None})
        calls.append({"messages": [{"role": "system", "content": "Be brief and casual."}, *ctx],
                      "temperature": 0.0, "max_tokens": None, "seed": None, "json_mode": True, "top_logprobs": None})
    brain = SimBrain(seed=0)
    cases = []
    for c in calls:
        r = brain.respond(**c)
        cases.append({"request": c, "text": r.text, "top_logprobs": r.top_logprobs})
    with gzip.open(out, "wt", encoding="utf-8") as f:
        json.dump(cases, f, ensure_ascii=False)
    print(f"{len(cases)} cases written to {out}")


if __name__ == "__main__":
    main(sys.argv[1])
