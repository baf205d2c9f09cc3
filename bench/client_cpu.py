"""Client CPU per LLM request: the lean backend vs the ChatOpenAI backend, side by side in one run.

Both rows run the whole client layer (limiter, retries, counters, JSON-mode parse check)
with the cache off, so every call is an HTTP request; only the transport differs
(``EndpointConfig.transport``: ``lean`` = our HTTP/1.1 wire client (synth_agent/llm/wire.py) + orjson,
``lean-aiohttp`` = the same over aiohttp (``transport="aiohttp"``, what ``lean`` was before 2026-12-02),
``langchain`` = ChatOpenAI over the openai SDK and httpx). Requests are real judge prompts (persona + 4 demos, ~3.5k tokens)
sent to the simulator in its own process, so the simulator's CPU is not counted: the
figure is this process's CPU time (all threads) divided by requests. Variants are
interleaved over ``--rounds`` and the median is printed. Reference rows show the bare
HTTP stacks with no client layer at all (the openai SDK's ``AsyncOpenAI``, httpx, aiohttp).

    .venv/bin/python bench/client_cpu.py [--requests 1000] [--concurrency 16] [--rounds 3]
    .venv/bin/python bench/client_cpu.py --profile lean      # where the CPU goes (cProfile, top functions)
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import statistics
import time
from collections.abc import Awaitable, Callable

from synth_agent import prompts
from synth_agent.llm.client import EndpointConfig, LLMClient
from synth_agent.models import Demo
from synth_agent.sim.population import Population
from synth_agent.sim.server import SimProcess

PERSONA = "The user strongly prefers bullet lists and worked examples. The user dislikes emoji."


def judge_prompts(n: int) -> list[list[dict[str, str]]]:
    """``n`` distinct judge prompts (persona + 4 demos + a pair), like the fit sends."""
    votes = Population(6, seed=3).all_votes(20)
    demos = tuple(
        Demo(vote_id=v.id, context=v.context, chosen=v.chosen, rejected=v.rejected, chosen_first=i % 2 == 0,
             reasoning="The user chose the response with the clearer structure and fewer emoji.")
        for i, v in enumerate(votes[:4])
    )  # fmt: skip
    out = []
    for i in range(n):
        v = votes[4 + i % (len(votes) - 4)]
        ctx = [v.context[0].model_copy(update={"content": f"{v.context[0].content} (#{i})"})]
        out.append(prompts.judge_messages(ctx, v.chosen, v.rejected, persona=PERSONA, demos=demos))
    return out


Runner = Callable[[str, list[list[dict[str, str]]], int], Awaitable[None]]


async def gather_limited(n: int, concurrency: int, one: Callable[[int], Awaitable[object]]) -> None:
    sem = asyncio.Semaphore(concurrency)

    async def run(i: int) -> None:
        async with sem:
            await one(i)

    await asyncio.gather(*(run(i) for i in range(n)))


def client_runner(transport: str) -> Runner:
    async def run(url: str, msgs: list[list[dict[str, str]]], concurrency: int) -> None:
        cfg = EndpointConfig(base_url=url, max_concurrency=concurrency, transport=transport)  # type: ignore[arg-type]
        async with LLMClient(cfg, cache=False) as llm:
            await gather_limited(len(msgs), concurrency,
                                 lambda i: llm.complete(msgs[i], call_site="bench", json_mode=True, max_tokens=400))
    return run  # fmt: skip


async def sdk_run(url: str, msgs: list[list[dict[str, str]]], concurrency: int) -> None:
    import openai

    async with openai.AsyncOpenAI(base_url=url, api_key="sim", max_retries=0) as c:
        await gather_limited(len(msgs), concurrency, lambda i: c.chat.completions.create(
            model="sim-judge", messages=msgs[i], temperature=0, max_tokens=400,  # type: ignore[arg-type]
            response_format={"type": "json_object"}))  # fmt: skip


async def httpx_run(url: str, msgs: list[list[dict[str, str]]], concurrency: int) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=None)) as c:

        async def one(i: int) -> None:
            r = await c.post("/chat/completions", headers={"Authorization": "Bearer sim"}, json={
                "model": "sim-judge", "messages": msgs[i], "temperature": 0, "max_tokens": 400,
                "response_format": {"type": "json_object"}})  # fmt: skip
            r.json()

        await gather_limited(len(msgs), concurrency, one)


async def aiohttp_run(url: str, msgs: list[list[dict[str, str]]], concurrency: int) -> None:
    import aiohttp
    import orjson

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:

        async def one(i: int) -> None:
            body = orjson.dumps({"model": "sim-judge", "messages": msgs[i], "temperature": 0, "max_tokens": 400,
                                 "response_format": {"type": "json_object"}})  # fmt: skip
            headers = {"Authorization": "Bearer sim", "Content-Type": "application/json"}
            async with s.post(url + "/chat/completions", data=body, headers=headers) as r:
                orjson.loads(await r.read())

        await gather_limited(len(msgs), concurrency, one)


VARIANTS: dict[str, tuple[str, Runner]] = {
    "lean": ("LLMClient, lean backend (wire client + orjson)", client_runner("lean")),
    "lean-aiohttp": ("LLMClient, lean backend over aiohttp", client_runner("aiohttp")),
    "langchain": ("LLMClient, ChatOpenAI backend", client_runner("langchain")),
    "sdk": ("reference: bare openai AsyncOpenAI, no client layer", sdk_run),
    "httpx": ("reference: bare httpx, no client layer", httpx_run),
    "aiohttp": ("reference: bare aiohttp, no client layer", aiohttp_run),
}


def measure(run: Runner, url: str, msgs: list[list[dict[str, str]]], concurrency: int) -> tuple[float, float]:
    """(CPU ms per request, requests per second of wall time) for one pass."""
    asyncio.run(run(url, msgs[:20], concurrency))  # warm-up: imports, connections
    cpu, wall = time.process_time(), time.perf_counter()
    asyncio.run(run(url, msgs, concurrency))
    return (time.process_time() - cpu) / len(msgs) * 1e3, len(msgs) / (time.perf_counter() - wall)


def profile(name: str, url: str, msgs: list[list[dict[str, str]]], concurrency: int, top: int) -> None:
    run = VARIANTS[name][1]
    asyncio.run(run(url, msgs[:20], concurrency))
    prof = cProfile.Profile()
    prof.enable()
    asyncio.run(run(url, msgs, concurrency))
    prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("cumulative").print_stats(top)
    print(f"cProfile of {VARIANTS[name][0]}, {len(msgs)} requests, top {top} by cumulative time:")
    print(out.getvalue())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", default="lean,lean-aiohttp,langchain,sdk,httpx,aiohttp")
    ap.add_argument("--profile", choices=list(VARIANTS), help="print a cProfile of one variant instead")
    ap.add_argument("--top", type=int, default=40)
    args = ap.parse_args()
    msgs = judge_prompts(args.requests)
    tokens = statistics.mean(sum(len(m["content"]) for m in p) for p in msgs) / 4
    with SimProcess(latency_ms=0) as ep:
        if args.profile:
            profile(args.profile, ep.base_url, msgs, args.concurrency, args.top)
            return
        names = [v.strip() for v in args.variants.split(",") if v.strip()]
        cpu: dict[str, list[float]] = {n: [] for n in names}
        rate: dict[str, list[float]] = {n: [] for n in names}
        for _ in range(args.rounds):  # interleaved, so machine noise hits every variant alike
            for n in names:
                c, r = measure(VARIANTS[n][1], ep.base_url, msgs, args.concurrency)
                cpu[n].append(c)
                rate[n].append(r)
    print(f"client CPU per request: {args.requests} judge requests (~{tokens:,.0f} prompt tokens each) per pass, "
          f"{args.concurrency} in flight, simulator in its own process; median of {args.rounds} interleaved passes")  # fmt: skip
    print(f"{'backend':<55} {'CPU ms/request':>15} {'(min-max)':>14} {'requests/s':>11}")
    for n in names:
        c = cpu[n]
        print(f"{VARIANTS[n][0]:<55} {statistics.median(c):>15.2f} {f'{min(c):.2f}-{max(c):.2f}':>14} "
              f"{statistics.median(rate[n]):>11.0f}")  # fmt: skip
    if "lean" in cpu and "langchain" in cpu:
        print(f"lean / ChatOpenAI CPU: {statistics.median(cpu['lean']) / statistics.median(cpu['langchain']):.2f}x")
    print("requests/s is bounded by the simulator process on this machine, not by the client.")


if __name__ == "__main__":
    main()
