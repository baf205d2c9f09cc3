"""Prompt prefixes a caching server would not compute again: the simulator's model of one, and the client's gate.

* :class:`~synth_agent.sim.prefix_cache.PrefixCache` and the simulator's usage: a request reuses only blocks of
  requests that *finished* before it arrived, within capacity, least recently used evicted first.
* :class:`~synth_agent.llm.prefix_gate.PrefixGate`: the first request with a new prefix goes alone, the others
  with it follow when it returns; a fit through it gets the same profile and more cached tokens.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from synth_agent.engine import FitConfig, Synthesizer
from synth_agent.llm.client import EndpointConfig, LLMClient
from synth_agent.llm.prefix_gate import PrefixGate
from synth_agent.sim.population import Population
from synth_agent.sim.prefix_cache import DEFAULT_CAPACITY_TOKENS, PrefixCache
from synth_agent.sim.server import SimEndpoint, create_sim_app

SYSTEM = {"role": "system", "content": "You judge answers. " * 40}  # 760 chars: 11 full blocks of 64
DEMO = [{"role": "user", "content": "an example pair " * 20}, {"role": "assistant", "content": '{"preferred": "A"}'}]


def prompt(question: str, *prefix: dict[str, str]) -> list[dict[str, str]]:
    return [*prefix, {"role": "user", "content": question}]


def tokens(messages: list[dict[str, str]]) -> int:
    return -(-sum(len(m["content"]) for m in messages) // 4)


# ------------------------------------------------------------------ the cache model


def test_a_prompt_hits_the_full_blocks_of_a_finished_prompt_with_the_same_prefix() -> None:
    cache = PrefixCache(10_000)
    first = prompt("which is better?", SYSTEM, *DEMO)
    again = prompt("and this one, which is better?", SYSTEM, *DEMO)
    assert cache.lookup(cache.blocks(first), tokens(first)) == 0  # nothing finished yet
    cache.add(cache.blocks(first))
    shared_chars = sum(len(m["content"]) for m in first[:-1])
    hit = cache.lookup(cache.blocks(again), tokens(again))
    assert hit == shared_chars // 64 * 16  # the shared prefix's full blocks, in tokens
    # the same prompt again: everything but its last token, in whole blocks
    assert cache.lookup(cache.blocks(first), tokens(first)) == (tokens(first) - 1) // 16 * 16


def test_a_different_role_layout_or_model_is_another_prefix() -> None:
    cache = PrefixCache(10_000)
    base = prompt("q", SYSTEM, *DEMO)
    cache.add(cache.blocks(base, "m"))
    as_user = [{"role": "user", "content": SYSTEM["content"]}, *base[1:]]
    assert cache.lookup(cache.blocks(as_user, "m"), tokens(as_user)) == 0
    assert cache.lookup(cache.blocks(base, "other-model"), tokens(base)) == 0
    assert cache.lookup(cache.blocks(base, "m"), tokens(base)) > 0


def test_capacity_evicts_least_recently_used_blocks_tails_first() -> None:
    one, two = prompt("q", SYSTEM), prompt("q", {"role": "system", "content": "Another judge. " * 55})
    cache = PrefixCache(16 * 16)  # 16 blocks: room for one prompt of 11 and part of another
    cache.add(cache.blocks(one))
    assert cache.snapshot()["cached_blocks"] == 11
    cache.add(cache.blocks(two))  # 12 blocks: 7 of the first prompt's go, its tail first
    snap = cache.snapshot()
    assert snap["cached_blocks"] == 16 and snap["evicted_blocks"] == 7
    assert cache.lookup(cache.blocks(one), tokens(one)) == 4 * 16  # its head is still there
    assert cache.lookup(cache.blocks(two), tokens(two)) == (tokens(two) - 1) // 16 * 16
    cache.clear()
    assert cache.lookup(cache.blocks(two), tokens(two)) == 0


def test_capacity_zero_is_no_cache() -> None:
    cache = PrefixCache(0)
    p = prompt("q", SYSTEM)
    cache.add(cache.blocks(p))
    assert not cache.enabled and cache.lookup(cache.blocks(p), tokens(p)) == 0
    with pytest.raises(ValueError):
        PrefixCache(-1)


def test_the_cli_default_is_the_simulators() -> None:
    from synth_agent.cli import SIM_PREFIX_CACHE_TOKENS

    assert SIM_PREFIX_CACHE_TOKENS == DEFAULT_CAPACITY_TOKENS


# ------------------------------------------------------------------ the simulator's usage


async def _post(client: httpx.AsyncClient, messages: list[dict[str, str]], **extra: Any) -> dict[str, Any]:
    r = await client.post("/v1/chat/completions", json={"model": "sim", "messages": messages, **extra})
    assert r.status_code == 200, r.text
    return r.json()["usage"]  # type: ignore[no-any-return]


async def test_the_simulator_reports_cached_tokens_of_finished_requests_only() -> None:
    app = create_sim_app(latency_ms=100)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sim") as client:
        # three at once with one prefix: none has finished when the others arrive, so all compute it
        together = await asyncio.gather(*(_post(client, prompt(f"question {i}", SYSTEM, *DEMO)) for i in range(3)))
        assert [u["prompt_tokens_details"]["cached_tokens"] for u in together] == [0, 0, 0]
        later = await _post(client, prompt("question 4", SYSTEM, *DEMO))
        shared = sum(len(m["content"]) for m in (SYSTEM, *DEMO)) // 64 * 16
        assert later["prompt_tokens_details"]["cached_tokens"] == shared
        other = await _post(client, prompt("question 5", {"role": "system", "content": "Be brief. " * 40}))
        assert other["prompt_tokens_details"]["cached_tokens"] == 0
        stats = (await client.get("/stats")).json()
        assert stats["cached_prompt_tokens"] == shared and stats["prefix_cache"]["capacity_tokens"] == DEFAULT_CAPACITY_TOKENS
        assert (await client.post("/reset_prefix_cache")).status_code == 200
        cold = await _post(client, prompt("question 4", SYSTEM, *DEMO))
        assert cold["prompt_tokens_details"]["cached_tokens"] == 0
        # streamed answers report it too, and their prefix counts once the stream has ended
        stream = await client.post("/v1/chat/completions", json={
            "model": "sim", "messages": prompt("question 6", SYSTEM, *DEMO), "stream": True,
            "stream_options": {"include_usage": True}})  # fmt: skip
        assert f'"cached_tokens": {shared}' in stream.text
        await client.post("/stats/reset")
        assert (await client.get("/stats")).json()["cached_prompt_tokens"] == 0


async def test_a_failed_request_leaves_nothing_to_reuse() -> None:
    app = create_sim_app()
    app.state.sim.configure(fail_next=["500"])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sim") as client:
        r = await client.post("/v1/chat/completions", json={"model": "sim", "messages": prompt("q", SYSTEM)})
        assert r.status_code == 500
        usage = await _post(client, prompt("q", SYSTEM))
        assert usage["prompt_tokens_details"]["cached_tokens"] == 0


async def test_without_the_cache_usage_has_no_details_and_answers_do_not_change() -> None:
    on, off = create_sim_app(seed=3), create_sim_app(seed=3, prefix_cache_tokens=0)
    bodies = []
    for app in (on, off):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sim") as client:
            got = []
            for q in ("a", "b", "a"):
                r = await client.post("/v1/chat/completions", json={"model": "sim", "messages": prompt(q, SYSTEM)})
                got.append(r.json())
            bodies.append(got)
    assert all("prompt_tokens_details" not in b["usage"] for b in bodies[1])
    assert [b["choices"] for b in bodies[0]] == [b["choices"] for b in bodies[1]]


# ------------------------------------------------------------------ the client's gate


async def test_the_gate_sends_a_new_prefix_alone_then_the_rest_together() -> None:
    gate = PrefixGate(min_tokens=50)
    started: list[str] = []
    release = asyncio.Event()

    async def call(name: str) -> str:
        started.append(name)
        if name == "first":
            await release.wait()
        return name

    shared = (SYSTEM, *DEMO)
    tasks = [asyncio.create_task(gate.run(prompt(n, *shared), lambda n=n: call(n)))
             for n in ("first", "second", "third")]  # fmt: skip
    other = asyncio.create_task(gate.run(prompt("x", {"role": "system", "content": "Other. " * 40}),
                                         lambda: call("other prefix")))  # fmt: skip
    short = asyncio.create_task(gate.run(prompt("y", {"role": "system", "content": "tiny"}), lambda: call("short")))
    await asyncio.sleep(0.05)
    assert sorted(started) == ["first", "other prefix", "short"]  # followers wait; other prefixes do not
    release.set()
    assert await asyncio.gather(*tasks, other, short) == ["first", "second", "third", "other prefix", "short"]
    assert sorted(started[3:]) == ["second", "third"] and gate.held == 2
    # a prefix already sent is not held again
    assert await gate.run(prompt("fourth", *shared), lambda: call("fourth")) == "fourth"
    assert gate.held == 2


async def test_a_failed_or_cancelled_leader_releases_its_followers() -> None:
    gate = PrefixGate(min_tokens=50)
    release = asyncio.Event()

    async def failing() -> str:
        await release.wait()
        raise RuntimeError("server down")

    async def ok() -> str:
        return "ok"

    leader = asyncio.create_task(gate.run(prompt("a", SYSTEM), failing))
    follower = asyncio.create_task(gate.run(prompt("b", SYSTEM), ok))
    await asyncio.sleep(0.01)
    assert not follower.done()
    release.set()
    with pytest.raises(RuntimeError):
        await leader
    assert await follower == "ok"

    hang = asyncio.Event()

    async def hanging() -> str:
        await hang.wait()
        return "never"

    other = {"role": "system", "content": "Different. " * 40}
    leader = asyncio.create_task(gate.run(prompt("a", other), hanging))
    follower = asyncio.create_task(gate.run(prompt("b", other), ok))
    await asyncio.sleep(0.01)
    leader.cancel()
    assert await follower == "ok"


async def test_a_fit_through_the_gate_gets_the_same_profile_and_more_cached_tokens() -> None:
    population = Population(6, seed=11)
    uid = population.user_ids[5]
    votes = population.votes(uid, 12)
    runs = []
    for warmup in (0, 256):
        with SimEndpoint(latency_ms=20) as ep:
            cfg = EndpointConfig(base_url=ep.base_url, prefix_warmup_tokens=warmup, max_concurrency=64)
            async with LLMClient(cfg) as llm:
                res = await Synthesizer(llm, None, FitConfig(seed=5)).fit(uid, votes)
                total = llm.stats.total()
            served = ep.stats()
        assert res.profile is not None
        # the client counts what the server reported, per call site
        assert total.cached_prompt_tokens == served["cached_prompt_tokens"] == res.usage["cached_prompt_tokens"]
        assert total.prompt_tokens == served["prompt_tokens"]
        runs.append((res.profile, served))
    (off, off_served), (on, on_served) = runs
    assert (on.persona, on.demos, on.val_accuracy) == (off.persona, off.demos, off.val_accuracy)
    assert on.meta.get("selection") == off.meta.get("selection")
    assert on_served["prompt_tokens"] == off_served["prompt_tokens"]  # the same prompts, sent in another order
    assert on_served["cached_prompt_tokens"] > off_served["cached_prompt_tokens"]


async def test_the_gate_holds_a_fits_judgments_never_a_live_one() -> None:
    """``prefix_warmup_sites`` (default: a fit's call sites): live judgments and chat never wait for a leader."""
    with SimEndpoint(latency_ms=50) as ep:
        cfg = EndpointConfig(base_url=ep.base_url, prefix_warmup_tokens=50, adaptive_concurrency=False,
                             max_concurrency=8)  # fmt: skip
        assert "select" in cfg.prefix_warmup_sites and "proxy_judge" not in cfg.prefix_warmup_sites
        async with LLMClient(cfg) as llm:

            async def two_at_once(site: str, system: dict[str, str]) -> list[int]:
                done = await asyncio.gather(*(llm.complete(prompt(f"pair {i}", system, *DEMO), call_site=site)
                                              for i in range(2)))  # fmt: skip
                return sorted(c.cached_prompt_tokens for c in done)

            live = await two_at_once("proxy_judge", SYSTEM)
            fit = await two_at_once("select", {"role": "system", "content": "Judge as this user would. " * 30})
            logprob = await two_at_once("select:logprob", {"role": "system", "content": "Label the pair. " * 40})
    assert live == [0, 0]  # sent together: neither found the other's prefix
    assert fit[0] == 0 and fit[1] > 0  # the follower waited for its leader and found the prefix cached
    assert logprob[0] == 0 and logprob[1] > 0


def _blocks_from_scratch(messages: list[dict[str, str]], model: str, size: int) -> list[int]:
    """The hash chain over the whole prompt, with no memo (what ``PrefixCache.blocks`` must equal)."""
    starts, pos = [], 0
    for m in messages:
        starts.append((pos, m["role"]))
        pos += len(m["content"])
    text, names, name, k = "".join(m["content"] for m in messages), [], hash(model), 0
    for end in range(size, len(text) + 1, size):
        first = k
        while k < len(starts) and starts[k][0] < end:
            k += 1
        name = hash((name, text[end - size : end], tuple(starts[first:k]) if k > first else None))
        names.append(name)
    return names


def test_remembered_prefixes_give_the_same_block_names_as_hashing_from_scratch() -> None:
    import random

    rng = random.Random(7)
    cache = PrefixCache(block_tokens=4)  # 16-character blocks: many boundaries inside and between messages
    prefixes = [[{"role": rng.choice(["system", "user", "assistant"]), "content": "x" * rng.randrange(0, 70)
                  + str(i)} for i in range(rng.randrange(0, 5))] for _ in range(40)]  # fmt: skip
    for _ in range(600):
        prefix = rng.choice(prefixes)
        messages = [*prefix, {"role": "user", "content": "vote " * rng.randrange(0, 12)}]
        model = rng.choice(["sim", "other"])
        assert cache.blocks(messages, model) == _blocks_from_scratch(messages, model, 16)


class _MoveToEndLRU:
    """The LRU as it was written before 2026-12-01 (session 27): an ``OrderedDict`` and a ``move_to_end`` per block."""

    def __init__(self, capacity_blocks: int) -> None:
        from collections import OrderedDict

        self.capacity_blocks, self.evicted_blocks = capacity_blocks, 0
        self.present: OrderedDict[int, None] = OrderedDict()

    def add(self, blocks: list[int]) -> None:
        for name in reversed(blocks[: self.capacity_blocks]):
            self.present[name] = None
            self.present.move_to_end(name)
        while len(self.present) > self.capacity_blocks:
            self.present.popitem(last=False)
            self.evicted_blocks += 1

    def lookup(self, blocks: list[int], usable: int) -> int:
        hit = 0
        for name in blocks[:usable]:
            if name not in self.present:
                break
            hit += 1
        return hit


@pytest.mark.parametrize("capacity_blocks", [1, 7, 40, 300])
def test_the_lru_keeps_and_evicts_exactly_what_a_move_to_end_lru_does(capacity_blocks: int) -> None:
    """Random prompts as hash chains (shared heads, shared middles, fresh tails, some prompts a prefix of
    others), added and looked up with now and then a clear: after every step the cached blocks, in LRU order,
    the evictions and every lookup's hit are the reference's."""
    import random

    rng = random.Random(capacity_blocks)
    heads = [[rng.getrandbits(8) for _ in range(rng.randrange(1, 60))] for _ in range(12)]
    middles = [[rng.getrandbits(8) for _ in range(rng.randrange(0, 20))] for _ in range(8)]
    cache, ref = PrefixCache(capacity_blocks * 16), _MoveToEndLRU(capacity_blocks)
    for step in range(3000):
        texts = [*rng.choice(heads), *rng.choice(middles), *(rng.getrandbits(8) for _ in range(rng.randrange(0, 8)))]
        blocks, name = [], 0
        for text in texts:  # each block named by its whole prefix, as PrefixCache.blocks names them
            name = hash((name, text))
            blocks.append(name)
        if rng.random() < 0.002:
            cache.clear()
            ref.present.clear()
        usable = rng.randrange(0, len(blocks) + 2)
        assert cache.lookup(blocks, usable * 16 + 1) == ref.lookup(blocks, usable) * 16, step
        cache.add(blocks)
        ref.add(blocks)
        assert cache._order() == list(ref.present), step  # the same blocks in the same LRU order
        assert cache.snapshot()["evicted_blocks"] == ref.evicted_blocks, step
