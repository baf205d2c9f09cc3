"""Latency the OpenAI-compatible proxy adds over calling the upstream directly.

The simulator (zero latency) and the proxy each run in their own process, like in
production; this process is the client. Every user has a persona, so the proxy
authenticates, reads the (cached) persona, injects it and forwards. The direct
calls send the same persona-injected messages, so the upstream does identical
work either way; requests alternate between the two paths. Figures: p50/p99 of
the full non-streaming request and of streaming time-to-first-token (first SSE
data line), at concurrency 1 and 64.

    .venv/bin/python bench/proxy_overhead.py [--requests 400]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import time
from typing import Any

import httpx

KEY = "sk-bench"
PERSONA = "The user strongly prefers bullet lists and short, concise answers. The user dislikes emoji."
QUESTION = "How do I start learning Python?"


class FixedBrain:
    """A constant ~1 kB answer: keeps the upstream's own CPU out of the figures (``--brain sim`` for the real one)."""

    text = "\n".join(f"- point {i}: keep practising a little every day." for i in range(24))

    def respond(self, messages: Any, **kw: Any) -> Any:
        from synth_agent.sim.brain import BrainReply

        return BrainReply(self.text)


def run_sim(q: Any, brain: str) -> None:
    from synth_agent.sim.server import SimEndpoint

    ep = SimEndpoint(seed=0, brain=FixedBrain() if brain == "fixed" else None).start()
    q.put(ep.base_url)
    while True:
        time.sleep(3600)


def run_proxy(sim_url: str, users: list[str], q: Any) -> None:
    import tempfile

    from langgraph.store.memory import InMemoryStore

    from synth_agent.config import Settings
    from synth_agent.llm.client import EndpointConfig, LLMClient
    from synth_agent.models import PersonaProfile
    from synth_agent.proxy import ProxyServer, ProxySettings, create_app

    app = create_app(
        Settings(base_url=sim_url, home=tempfile.mkdtemp()),
        ProxySettings(api_keys=f"bench:{KEY}", synthesis="off", key_rate_limit=0, persona_ttl=3600),
        store=InMemoryStore(),
        llm=LLMClient(EndpointConfig(base_url=sim_url)),
    )
    srv = ProxyServer(app).start()
    mem = app.state.proxy.memories("bench")
    for u in users:
        srv.call(mem.save_persona(PersonaProfile(user_id=u, persona=PERSONA)))
    q.put(srv.base_url)
    while True:
        time.sleep(3600)


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


async def one(client: httpx.AsyncClient, url: str, body: dict[str, Any], headers: dict[str, str]) -> float:
    """Seconds to the full answer (non-streaming) or to the first SSE data line (streaming)."""
    start = time.perf_counter()
    if not body.get("stream"):
        r = await client.post(url, json=body, headers=headers)
        r.raise_for_status()
        return time.perf_counter() - start
    async with client.stream("POST", url, json=body, headers=headers) as r:
        r.raise_for_status()
        first = None
        async for line in r.aiter_lines():
            if first is None and line.startswith("data:"):
                first = time.perf_counter() - start
        assert first is not None
        return first


async def measure(sim_url: str, proxy_url: str, users: list[str], requests: int, concurrency: int,
                  stream: bool) -> tuple[list[float], list[float]]:
    from synth_agent import prompts

    system = prompts.generation_system_prompt(PERSONA)
    limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency * 2)
    direct: list[float] = []
    proxied: list[float] = []
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        async def worker(w: int) -> None:
            user = users[w % len(users)]
            for i in range(requests // concurrency):
                q = f"{QUESTION} ({w}-{i})"
                d_body = {"model": "sim", "stream": stream,
                          "messages": [{"role": "system", "content": system}, {"role": "user", "content": q}]}
                p_body = {"model": "sim", "stream": stream, "user": user, "messages": [{"role": "user", "content": q}]}
                pairs = [(direct, sim_url, d_body, {"Authorization": "Bearer sim"}),
                         (proxied, proxy_url, p_body, {"Authorization": f"Bearer {KEY}"})]
                if (w + i) % 2:
                    pairs.reverse()
                for sink, base, body, headers in pairs:
                    sink.append(await one(client, base + "/chat/completions", body, headers))

        # warm up connections and caches on both paths
        await asyncio.gather(*(worker(w) for w in range(min(concurrency, 8))))
        direct.clear()
        proxied.clear()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return direct, proxied


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=384, help="requests per path per configuration")
    ap.add_argument("--brain", choices=("fixed", "sim"), default="fixed",
                    help="upstream answers: constant text (isolates the proxy) or the simulator's brain")
    args = ap.parse_args()
    users = [f"bench-user-{i}@example.com" for i in range(64)]
    ctx = mp.get_context("spawn")
    q: Any = ctx.Queue()
    sim = ctx.Process(target=run_sim, args=(q, args.brain), daemon=True)
    sim.start()
    sim_url = q.get(timeout=60)
    proxy = ctx.Process(target=run_proxy, args=(sim_url, users, q), daemon=True)
    proxy.start()
    proxy_url = q.get(timeout=120)
    try:
        ms = 1000.0
        print(f"{'mode':<22}{'conc':>5}{'n':>6}  {'direct p50':>10}{'p99':>8}  {'proxy p50':>10}{'p99':>8}"
              f"  {'added p50':>10}{'p99':>8}   (ms)")
        for stream in (False, True):
            for conc in (1, 64):
                d, p = asyncio.run(measure(sim_url, proxy_url, users, args.requests, conc, stream))
                mode = "streaming TTFT" if stream else "non-streaming total"
                dp50, dp99, pp50, pp99 = pct(d, .5) * ms, pct(d, .99) * ms, pct(p, .5) * ms, pct(p, .99) * ms
                print(f"{mode:<22}{conc:>5}{len(p):>6}  {dp50:>10.2f}{dp99:>8.2f}  {pp50:>10.2f}{pp99:>8.2f}"
                      f"  {pp50 - dp50:>10.2f}{pp99 - dp99:>8.2f}")
    finally:
        proxy.kill()
        sim.kill()


if __name__ == "__main__":
    main()
