"""EndpointPool against several simulated endpoints: balancing, failover, breaker, health, shared cache."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator

import pytest

from synth_agent.engine.judge import Judge
from synth_agent.engine.rerank import rank
from synth_agent.llm import ChatBackend
from synth_agent.llm.client import EndpointConfig, LLMClient, LLMError
from synth_agent.llm.pool import EndpointPool, PoolConfig
from synth_agent.models import Judgment, Vote
from synth_agent.sim.population import Population
from synth_agent.sim.server import SimEndpoint


@pytest.fixture(scope="module")
def fleet() -> Iterator[tuple[SimEndpoint, SimEndpoint, SimEndpoint]]:
    """(healthy, slow, failing) simulators sharing one brain seed, so any of them gives the same answers."""
    with (
        SimEndpoint() as healthy,
        SimEndpoint(latency_ms=60) as slow,
        SimEndpoint(fault_rate=1.0, fault_kinds=["500"]) as failing,
    ):
        yield healthy, slow, failing


@pytest.fixture(scope="module")
def votes() -> list[Vote]:
    return Population(4, seed=3).all_votes(24)


def free_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}/v1"


def pool_config(*urls: str, **kw: object) -> PoolConfig:
    base: dict[str, object] = {
        "endpoints": [{"base_url": u, "max_concurrency": 8} for u in urls],
        "member_max_retries": 0,
        "failure_threshold": 2,
        "cooldown": 0.3,
        "health_interval": 0.1,
        "health_timeout": 1.0,
    }
    base.update(kw)
    return PoolConfig.model_validate(base)


async def reference(url: str, votes: list[Vote]) -> list[Judgment]:
    async with LLMClient(EndpointConfig(base_url=url), cache=False) as direct:
        judge = Judge(direct)
        return list(await asyncio.gather(*(judge.compare(v.context, v.chosen, v.rejected) for v in votes)))


async def judge_with_workers(pool: EndpointPool, votes: list[Vote], workers: int = 6) -> list[Judgment | None]:
    """Judge every vote with a few concurrent workers, so requests arrive over time (like live traffic)."""
    judge = Judge(pool)
    out: list[Judgment | None] = [None] * len(votes)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(votes)):
        queue.put_nowait(i)

    async def worker() -> None:
        while not queue.empty():
            i = queue.get_nowait()
            v = votes[i]
            out[i] = await judge.compare(v.context, v.chosen, v.rejected)

    await asyncio.gather(*(worker() for _ in range(workers)))
    return out


def by_url(pool: EndpointPool) -> dict[str, object]:
    return {s.base_url: s for s in pool.status()}


async def test_pool_spreads_ejects_readmits_and_never_loses_a_judgment(fleet, votes) -> None:
    healthy, slow, failing = fleet
    for ep in fleet:
        ep.reset_stats()
    failing.configure(fault_rate=1.0)
    expected = await reference(healthy.base_url, votes)
    healthy.reset_stats()

    pool = EndpointPool.from_config(pool_config(healthy.base_url, slow.base_url, failing.base_url), cache=False)
    assert isinstance(pool, ChatBackend)
    async with pool:
        first = votes[:48]
        got = await judge_with_workers(pool, first)
        assert got == expected[:48]  # every judgment answered, and answered right

        st = by_url(pool)
        h, s, f = st[healthy.base_url], st[slow.base_url], st[failing.base_url]
        assert f.ejections >= 1 and f.served == 0 and f.failures >= 2  # ejected by the breaker
        assert h.served > s.served > 0  # least-outstanding: the slow replica gets less, but some, work
        c = pool.counters
        assert c.failovers >= f.failures  # each failed attempt was re-sent elsewhere

        # it recovers: the health check / half-open probe brings it back
        failing.configure(fault_rate=0)
        rest = votes[48:]
        got_rest: list[Judgment | None] = []
        chunk = 0
        while by_url(pool)[failing.base_url].state != "closed" or chunk == 0:
            await asyncio.sleep(0.1)
            part = rest[chunk * 8 : (chunk + 1) * 8]
            assert part, "the recovered endpoint was never re-admitted"
            got_rest += await judge_with_workers(pool, part, workers=4)
            chunk += 1
        got_rest += await judge_with_workers(pool, rest[len(got_rest) :])
        assert got_rest == expected[48:]
        f = by_url(pool)[failing.base_url]
        assert f.state == "closed" and f.readmissions >= 1 and f.served > 0

        # accounting: answered == issued, and the fleet produced exactly one completion per answer
        c = pool.counters
        assert c.issued == c.answered == 2 * len(votes)
        assert c.failed == c.cancelled == 0
        assert sum(s.served for s in pool.status()) == c.answered
        completions = sum(ep.stats()["completions"] for ep in fleet)
        assert completions == c.answered
        assert all(s.in_flight == 0 for s in pool.status())
        total = pool.stats.total()
        assert total.requests == c.answered + sum(s.failures for s in pool.status())


async def test_health_check_ejects_a_dead_endpoint_without_spending_requests(fleet) -> None:
    healthy = fleet[0]
    dead = free_url()
    pool = EndpointPool.from_config(pool_config(healthy.base_url, dead, health_interval=0), cache=False)
    async with pool:
        assert await pool.check_health() == {healthy.base_url: True, dead: False}
        st = by_url(pool)
        assert st[dead].state == "open" and st[dead].healthy is False and st[dead].served == 0
        assert "health check" in st[dead].last_error
        msgs = [{"role": "user", "content": f"hello {i}"} for i in range(6)]
        answers = await asyncio.gather(*(pool.complete([m]) for m in msgs))
        assert all(a.text for a in answers)
        assert by_url(pool)[dead].failures == 0 and pool.counters.failovers == 0


async def test_shared_cache_keeps_answers_stable_across_failover(fleet) -> None:
    healthy, slow, failing = fleet
    failing.configure(fault_rate=0)
    pool = EndpointPool.from_config(pool_config(failing.base_url, healthy.base_url, health_interval=0))
    async with pool:
        msgs = [{"role": "user", "content": "Explain recursion briefly."}]
        first = await pool.complete(msgs, call_site="t")
        assert not first.cached
        failing.configure(fault_rate=1.0)  # whichever member answered may now be broken
        again = await asyncio.gather(*(pool.complete(msgs, call_site="t") for _ in range(5)))
        assert all(a.cached and a.text == first.text for a in again)
        assert pool.counters.cache_hits == 5 and pool.counters.issued == 1
        assert pool.stats.site("t").cache_hits == 5
    failing.configure(fault_rate=0)


async def test_bad_requests_are_not_failed_over(fleet) -> None:
    healthy, slow, _ = fleet
    pool = EndpointPool.from_config(pool_config(healthy.base_url, slow.base_url, health_interval=0), cache=False)
    async with pool:
        with pytest.raises(LLMError, match="refused"):
            await pool.complete([{"role": "user", "content": "x"}], logprobs=50)  # top_logprobs > 20: HTTP 400
        assert pool.counters.failovers == 0 and pool.counters.failed == 1
        assert all(s.failures == 0 and s.state == "closed" for s in pool.status())


async def test_no_usable_endpoint_is_a_clear_error() -> None:
    pool = EndpointPool.from_config(
        pool_config(free_url(), free_url(), health_interval=0, cooldown=60, unavailable_timeout=0.2, failure_threshold=3)
    )
    async with pool:
        with pytest.raises(LLMError, match="failed on 2 endpoint"):  # 4 attempts, alternating members
            await pool.complete([{"role": "user", "content": "x"}])
        with pytest.raises(LLMError, match="no usable endpoint"):  # both breakers open, cooldown 60 s
            await pool.complete([{"role": "user", "content": "y"}])
        assert all(s.state == "open" for s in pool.status())
        assert pool.counters.failed == 2 and pool.counters.answered == 0


async def test_judge_and_reranker_use_a_pool_transparently(fleet, votes) -> None:
    healthy, slow, _ = fleet
    pool = EndpointPool.from_config(pool_config(healthy.base_url, slow.base_url, health_interval=0))
    async with pool:
        v = votes[0]
        candidates = [v.chosen, v.rejected, *(w.chosen for w in votes[1:4] if w.context == v.context)]
        for mode in ("cot", "logprob"):
            res = await rank(Judge(pool, mode=mode), v.context, candidates, strategy="round_robin")
            assert sorted(res.order) == list(range(len(candidates)))
        usage = pool.stats.as_dict()
        assert usage["judge"]["requests"] > 0 and usage["judge:logprob"]["requests"] > 0


def test_config_from_env_file_and_errors(tmp_path) -> None:
    cfg = PoolConfig.from_env({"SYNTH_AGENT_JUDGE_ENDPOINTS": "http://a:8000/v1, http://b:8000/v1", "SYNTH_AGENT_MODEL": "m"})
    assert [e.base_url for e in cfg.endpoints] == ["http://a:8000/v1", "http://b:8000/v1"] and cfg.model == "m"
    cfg = PoolConfig.from_env(
        {"SYNTH_AGENT_JUDGE_ENDPOINTS": json.dumps(["http://a/v1", {"base_url": "http://b/v1", "weight": 3}])}
    )
    assert cfg.endpoints[1].weight == 3
    with pytest.raises(ValueError, match="SYNTH_AGENT_JUDGE_ENDPOINTS is not set"):
        PoolConfig.from_env({})
    with pytest.raises(ValueError, match="does not parse"):
        PoolConfig.from_env({"SYNTH_AGENT_JUDGE_ENDPOINTS": "[oops"})

    toml = tmp_path / "pool.toml"
    toml.write_text(
        'model = "Qwen/Qwen2.5-7B-Instruct"\nfailure_threshold = 5\n'
        '[[endpoints]]\nbase_url = "http://gpu1:8000/v1"\nmax_concurrency = 64\n'
        '[[endpoints]]\nbase_url = "http://gpu2:8000/v1"\nweight = 2\nmax_retries = 3\n'
    )
    cfg = PoolConfig.from_file(toml)
    eps = cfg.endpoint_configs()
    assert [e.model for e in eps] == ["Qwen/Qwen2.5-7B-Instruct"] * 2
    assert [e.max_retries for e in eps] == [1, 3] and cfg.failure_threshold == 5
    pool = EndpointPool.from_config(cfg)
    assert [s.weight for s in pool.status()] == [64.0, 2.0] and pool.model == "Qwen/Qwen2.5-7B-Instruct"

    js = tmp_path / "pool.json"
    js.write_text(json.dumps({"endpoints": ["http://gpu1:8000/v1"], "cooldown": 2}))
    assert PoolConfig.from_file(js).cooldown == 2
    (tmp_path / "pool.yaml").write_text("endpoints: []")
    with pytest.raises(ValueError, match="use JSON or TOML"):
        PoolConfig.from_file(tmp_path / "pool.yaml")
    (tmp_path / "bad.json").write_text(json.dumps({"endpoints": [], "bogus": 1}))
    with pytest.raises(ValueError, match="invalid pool config"):
        PoolConfig.from_file(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="distinct"):
        EndpointPool([LLMClient(EndpointConfig(base_url="http://a/v1"))] * 2)


async def test_member_weight_is_its_adaptive_concurrency() -> None:
    """A one-slot server (which says so, like llama.cpp) next to a wide one: it gets weight 1 and
    correspondingly little work, and the pool never queues more on it than it can serve."""
    with SimEndpoint(slots=1, latency_ms=40) as narrow, SimEndpoint(latency_ms=40) as wide:
        pool = EndpointPool.from_config(pool_config(narrow.base_url, wide.base_url, health_interval=0), cache=False)
        async with pool:
            assert [s.weight for s in pool.status()] == [8.0, 8.0]  # max_concurrency until they answer
            msgs = [[{"role": "user", "content": f"question {i}"}] for i in range(60)]
            await asyncio.gather(*(pool.complete(m) for m in msgs[:2]))
            await asyncio.gather(*(pool.complete(m) for m in msgs[2:]))
            st = by_url(pool)
            assert st[narrow.base_url].concurrency == 1 and st[narrow.base_url].weight == 1.0
            assert st[wide.base_url].concurrency == 8
            assert st[wide.base_url].served > 3 * st[narrow.base_url].served > 0
            assert narrow.stats()["max_in_flight"] == 1 and pool.counters.answered == 60
