"""The simulator's lean paths answer exactly what the slow paths they bypass would.

``_lean_call`` reads plain chat requests with orjson instead of pydantic: for every body it must
either refuse (None: the request goes through FastAPI and ``ChatRequest``) or read every field the
route uses as ``ChatRequest`` would. ``_blocks`` replaces a lazy regex in the brain: same blocks on any text.
"""

from __future__ import annotations

import json
import random
import re

import httpx
import orjson
import pytest
from pydantic import ValidationError

from synth_agent.sim.brain import _block, _blocks
from synth_agent.sim.server import ChatRequest, SimEndpoint, _brain_messages, _lean_call

PLAIN = {"model": "sim", "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]}

BODIES: list[object] = [
    PLAIN,
    {**PLAIN, "temperature": 0, "max_tokens": 64, "response_format": {"type": "json_object"}, "seed": 3},
    {**PLAIN, "temperature": 0.7, "max_completion_tokens": 5, "max_tokens": 9, "logprobs": True, "top_logprobs": 2},
    {**PLAIN, "logprobs": True},
    {**PLAIN, "logprobs": False, "top_logprobs": 0, "n": 1, "user": "x", "extra_field": [1, 2]},
    {**PLAIN, "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {}}}},
    {**PLAIN, "response_format": {"type": "text"}, "stream": False, "n": None, "seed": None},
    {"model": "m", "messages": [{"role": "developer", "content": None}, {"role": "model"}, {"role": "tool", "content": "", "name": "t"}]},
    # everything below must be refused (pydantic either rejects it or reads it with coercion)
    {**PLAIN, "temperature": "0.5"},
    {**PLAIN, "temperature": 2.5},
    {**PLAIN, "temperature": -0.1},
    {**PLAIN, "temperature": True},
    {**PLAIN, "max_tokens": 0},
    {**PLAIN, "max_tokens": 1.0},
    {**PLAIN, "max_tokens": True},
    {**PLAIN, "top_logprobs": 21},
    {**PLAIN, "n": 2},
    {**PLAIN, "seed": 1.5},
    {**PLAIN, "logprobs": 1},
    {**PLAIN, "stream": True},
    {**PLAIN, "stream_options": {"include_usage": True}},
    {**PLAIN, "response_format": {"type": "grammar"}},
    {**PLAIN, "response_format": {"type": ["json_object"]}},
    {**PLAIN, "response_format": "json_object"},
    {**PLAIN, "model": ""},
    {**PLAIN, "model": 3},
    {**PLAIN, "messages": []},
    {**PLAIN, "messages": "hi"},
    {"model": "sim", "messages": [{"role": "robot", "content": "x"}]},
    {"model": "sim", "messages": [{"role": ["user"], "content": "x"}]},
    {"model": "sim", "messages": [{"role": "user", "content": [{"type": "text", "text": "parts"}]}]},
    {"model": "sim", "messages": [{"role": "user", "content": 5}]},
    {"model": "sim", "messages": ["user: hi"]},
    {"messages": PLAIN["messages"]},
    [PLAIN],
    "not an object",
]


def read(req: ChatRequest, messages: list[dict[str, str]] | None = None) -> tuple[object, ...]:
    """Every field the chat route reads, as it reads them (with their types); the lean path's messages apart."""
    fmt = req.response_format
    messages = _brain_messages(req) if messages is None else messages
    return (
        req.model, [(m["role"], m["content"], type(m["content"]), sorted(m)) for m in messages],
        req.temperature, type(req.temperature),
        req.max_tokens, req.max_completion_tokens, None if fmt is None else fmt.type, req.logprobs,
        req.top_logprobs, req.seed, bool(req.stream), req.stream_options, req.n,
    )  # fmt: skip


def pydantic_call(raw: bytes) -> tuple[object, ...] | None:
    try:
        return read(ChatRequest.model_validate_json(raw))
    except ValidationError:
        return None


@pytest.mark.parametrize("body", BODIES, ids=lambda b: json.dumps(b)[:60])
def test_lean_call_reads_what_pydantic_reads_or_refuses(body: object) -> None:
    raw = orjson.dumps(body)
    lean = _lean_call(raw)
    if lean is not None:
        assert read(*lean) == pydantic_call(raw)


def test_lean_call_takes_the_plain_requests_the_fit_sends() -> None:
    assert _lean_call(orjson.dumps(BODIES[0])) is not None and _lean_call(orjson.dumps(BODIES[2])) is not None
    assert _lean_call(b"{not json") is None and _lean_call(orjson.dumps({**PLAIN, "temperature": 3})) is None


async def test_lean_and_refused_requests_get_the_routes_answers() -> None:
    """Served through the lean path or FastAPI, a request gets the same reply; bad ones the route's 400s;
    both are counted once."""
    with SimEndpoint(seed=0) as ep:
        url = ep.base_url + "/chat/completions"
        judge = {"model": "sim", "temperature": 0, "messages": [
            {"role": "system", "content": "You are a preference judge."},
            {"role": "user", "content": "<conversation>\n[user]: hi\n</conversation>\n<response_a>\n- a\n- b\n"
                                        "</response_a>\n<response_b>\nplain\n</response_b>"}]}  # fmt: skip
        # the same request with its content as a parts list: refused by the lean path, served by the route
        parts = {**judge, "messages": [judge["messages"][0], {"role": "user", "content": [
            {"type": "text", "text": judge["messages"][1]["content"]}]}]}  # fmt: skip
        async with httpx.AsyncClient(timeout=10) as http:
            before = ep.stats()["by_path"].get("/v1/chat/completions", 0)
            lean, slow = (await http.post(url, json=judge)), (await http.post(url, json=parts))
            bad = await http.post(url, json={**judge, "temperature": "hot"})
            broken = await http.post(url, content=b"{", headers={"content-type": "application/json"})
        assert lean.status_code == slow.status_code == 200
        assert lean.json()["choices"] == slow.json()["choices"]
        lean_usage, slow_usage = lean.json()["usage"], slow.json()["usage"]
        # both paths feed the prefix cache model: the second request finds the first one's prefix
        assert lean_usage.pop("prompt_tokens_details") == {"cached_tokens": 0}
        assert slow_usage.pop("prompt_tokens_details")["cached_tokens"] > 0
        assert lean_usage == slow_usage
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "temperature"
        assert broken.status_code == 400 and broken.json()["error"]["type"] == "invalid_request_error"
        assert ep.stats()["by_path"]["/v1/chat/completions"] - before == 4


def test_blocks_match_the_regex_they_replace() -> None:
    rng = random.Random(0)
    alphabet = ["<example>", "</example>", "\n", "a", "b ", "<exam", "ple>", "\n\n"]
    texts = ["", "<example></example>", "<example>\n</example>", "<example>\n\nx\n\n</example><example>y"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 30))) for _ in range(3000)]
    regex = re.compile(r"<example>\n?(.*?)\n?</example>", re.S)
    for text in texts:
        want = [m.group(1) for m in regex.finditer(text)]
        assert list(_blocks("example", text)) == want, text
        assert _block("example", text) == (want[0] if want else None), text


def test_the_judges_trait_order_is_numpys_stable_argsort() -> None:
    """``SimBrain._reasoning`` ranks trait differences with ``sorted`` on plain floats instead of
    ``np.argsort(-np.abs(x), kind="stable")``: same order on ties, zeros (±0.0) and any values."""
    import numpy as np

    rng = random.Random(5)
    for _ in range(3000):
        x = [rng.choice([0.0, -0.0, 0.25, -0.25, 0.1, rng.uniform(-1, 1)]) for _ in range(9)]
        assert sorted(range(9), key=lambda i: -abs(x[i])) == np.argsort(-np.abs(np.array(x)), kind="stable").tolist()
