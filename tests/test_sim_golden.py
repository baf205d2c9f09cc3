"""The simulator's answers are pinned: a faster simulator must give the same verdicts, word for word.

``data/sim_golden.json.gz`` holds 53 requests taken from real fits (CoT and label judges with and
without persona and demos, with log-probabilities, sampled judgments, persona writing) plus insight
and chat requests, with the replies the simulator of main at 200f950 gave (before its memoised fast
path). ``data/make_sim_golden.py`` regenerates it when a behaviour change is intended.

Texts must match exactly; log-probabilities to 1e-12. The simulator's probabilities go through
numpy's vector arithmetic and libm, which may round the last bit differently on another CPU:
on an AMD EPYC machine the same code (main at f0df7ff, the pinned versions) gave 4 of the 53
replies log-probabilities 2-4e-16 away from the pinned ones (one unit in the last place), every
text identical. A behaviour change moves them by far more than 1e-12.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from synth_agent.sim.brain import SimBrain
from synth_agent.sim.server import create_sim_app

CASES: list[dict[str, Any]] = json.loads(gzip.open(Path(__file__).parent / "data" / "sim_golden.json.gz", "rt").read())


def _reply(brain: SimBrain, case: dict[str, Any]) -> tuple[str, Any]:
    r = brain.respond(**case["request"])
    rows = [[list(t) for t in row] for row in r.top_logprobs] if r.top_logprobs is not None else None
    return r.text, rows


def _pinned(got: tuple[str, Any], case: dict[str, Any]) -> bool:
    """The reply is the pinned one: same text, same tokens, log-probabilities within 1e-12."""
    return got[0] == case["text"] and _same_logprobs(got[1], case["top_logprobs"])


def _same_logprobs(got: Any, want: Any) -> bool:
    if got is None or want is None:
        return got is None and want is None
    return len(got) == len(want) and all(
        len(g) == len(w) and all(gt == wt and abs(gl - wl) <= 1e-12 for (gt, gl), (wt, wl) in zip(g, w, strict=True))
        for g, w in zip(got, want, strict=True)
    )


def test_golden_cases_cover_every_task() -> None:
    systems = [c["request"]["messages"][0]["content"] for c in CASES]
    assert sum(s.startswith("You are a preference judge") and "<persona>" in s for s in systems) >= 5
    assert sum(c["request"]["top_logprobs"] is not None for c in CASES) >= 5
    assert any(s.startswith("You write user personas") for s in systems)
    assert any(s.startswith("You extract insights") for s in systems)
    assert any(c["request"]["temperature"] > 0 and c["request"]["seed"] is not None for c in CASES)


@pytest.mark.parametrize("order", ["forward", "reversed", "twice"])
def test_replies_match_the_pinned_ones_in_any_order(order: str) -> None:
    """One brain answers every case; caches filled by earlier cases must not change a later answer."""
    brain = SimBrain(seed=0)
    cases = {"forward": CASES, "reversed": CASES[::-1], "twice": CASES + CASES}[order]
    for case in cases:
        assert _pinned(_reply(brain, case), case), case["request"]["messages"][-1]["content"][:80]


def test_a_small_cache_gives_the_same_replies() -> None:
    brain = SimBrain(seed=0, cache_size=3)  # caches are cleared again and again
    for case in CASES + CASES[::-1]:
        assert _pinned(_reply(brain, case), case), case["request"]["messages"][-1]["content"][:80]


async def test_the_http_endpoint_serves_the_pinned_replies() -> None:
    app = create_sim_app(seed=0)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sim") as client:
        for case in CASES:
            req = case["request"]
            body: dict[str, Any] = {"model": "sim", "messages": req["messages"], "temperature": req["temperature"]}
            if req["seed"] is not None:
                body["seed"] = req["seed"]
            if req["max_tokens"] is not None:
                body["max_tokens"] = req["max_tokens"]
            if req["json_mode"]:
                body["response_format"] = {"type": "json_object"}
            if req["top_logprobs"] is not None:
                body |= {"logprobs": True, "top_logprobs": req["top_logprobs"]}
            r = await client.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            assert choice["message"]["content"] == case["text"]
            if case["top_logprobs"] is not None:
                got = [[[alt["token"], alt["logprob"]] for alt in tok["top_logprobs"]] for tok in choice["logprobs"]["content"]]
                assert _same_logprobs(got, case["top_logprobs"])
