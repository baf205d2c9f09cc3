"""Cost of SynthesizeMe fits: LLM requests, prompt tokens and wall time per 12-vote user, refits, and scale.

Against the simulator endpoint in its own process with a fixed per-request latency
(default 50 ms), with the default ``FitConfig`` (``--config KEY=VALUE`` overrides it,
e.g. ``--config n_trials=10 --config n_demo_candidates=10`` for the paper's budgets).
Token figures are the simulator's own ``usage`` counts (what a server would bill): prompt tokens
*sent*, the part of them its prefix cache model served (*cached*: ``usage.prompt_tokens_details.
cached_tokens``, as vLLM and SGLang report it; see ``synth_agent/sim/prefix_cache.py``) and the rest,
which the server *computed*. The cache is emptied before each fit of parts 1 and 2 and before each
round of part 3 (the 20 users of a round share it, as on one server); a simulator without the model
(an older checkout) reports no cached tokens, so there computed = sent.

1. one fit per user, ``--solo`` users one after the other, each with a fresh client (nothing
   cached across users): median requests, prompt tokens, wall time, and where the prompt
   tokens went per step (bootstrap, candidate scoring, persona, demo search);
2. refits through a preference memory: the same user again with no new votes, then after
   ``--new-votes`` more votes (a fresh client each time, so only what the memory keeps counts);
3. ``--users`` users fitted concurrently through one client (``--concurrency`` in flight at most),
   against one user alone through the same kind of client: wall-clock ratio (median of ``--rounds``
   alternating rounds), with client and simulator CPU per request and the floors of the N-user wall.

The fits run as the commands that run them in production do (``synth-agent fit``/``eval``/``worker``,
see ``synth_agent/runner.py``): on uvloop, with the heap built at start-up frozen out of the garbage
collector and young collections every 50,000 allocations instead of 700. ``--loop asyncio --no-freeze
--gc-young 700`` runs them as this script did before 2026-12-01 (session 26); ``--gc-young 700`` as
it did before session 27.

It uses only APIs that exist since the first release, so the same file measures an older
checkout (run it with that checkout's interpreter from a directory outside both trees).

    python bench/fit_cost.py [--latency-ms 50] [--users 20] [--votes 12] [--solo 5] [--concurrency 64] [--rounds 3]
    python bench/fit_cost.py --endpoint prefix_warmup_tokens=512   # EndpointConfig overrides (see prefix_warmup.py)
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import time
from typing import Any

import httpx
from fit_accuracy import parse_overrides  # bench/ is on sys.path when a bench script runs
from langgraph.store.memory import InMemoryStore
from rich.console import Console
from rich.table import Table

from store.memory import PreferenceMemory
from synth_agent import prompts
from synth_agent.engine import FitConfig, Synthesizer
from synth_agent.llm.client import EndpointConfig, LLMClient
from synth_agent.sim.population import Population
from synth_agent.sim.server import SimProcess

STEPS = ("bootstrap", "bootstrap_score", "persona", "demo_select", "select", "refit")


PARTS = ("instructions", "persona", "demos", "vote judged", "other prompts")


class PartsBackend:
    """Wraps the client to split each prompt into its parts (tokens as the simulator counts them: chars / 4).

    Judge prompts: the judge's instructions (system prompt template), the persona addendum, the few-shot demos
    (every message between the system prompt and the last), the vote judged (the last message). Everything else
    (persona writer, rationales) is "other prompts". ``repeated_prefix``: tokens of judge prompts' prefixes (all
    but the last message) already sent earlier in the same fit, what a server with prefix caching could reuse;
    ``repeated_prompt``: requests whose whole prompt was sent before in the fit (a judgment asked twice).
    """

    def __init__(self, inner: Any) -> None:
        self.inner, self.model = inner, inner.model
        self.parts = dict.fromkeys(PARTS, 0)
        self.prefixes: set[int] = set()
        self.prompts: set[int] = set()
        self.repeated_prefix = self.repeated_prompt = self.requests = 0
        self.bases = [prompts.load(prompts.JUDGE_VERSION), prompts.load(prompts.LABEL_JUDGE_VERSION)]

    @property
    def stats(self) -> Any:
        return self.inner.stats

    def _count(self, messages: Any) -> None:
        tok = lambda text: len(text) // 4  # noqa: E731
        self.requests += 1
        whole = hash(tuple((m["role"], m["content"]) for m in messages))
        self.repeated_prompt += whole in self.prompts
        self.prompts.add(whole)
        system = messages[0]["content"] if messages and messages[0]["role"] == "system" else ""
        base = next((b for b in self.bases if system.startswith(b)), None)
        if base is None:
            self.parts["other prompts"] += sum(tok(m["content"]) for m in messages)
            return
        self.parts["instructions"] += tok(base)
        self.parts["persona"] += tok(system[len(base):])
        self.parts["demos"] += sum(tok(m["content"]) for m in messages[1:-1])
        self.parts["vote judged"] += tok(messages[-1]["content"])
        prefix = hash(tuple((m["role"], m["content"]) for m in messages[:-1]))
        if prefix in self.prefixes:
            self.repeated_prefix += sum(tok(m["content"]) for m in messages[:-1])
        self.prefixes.add(prefix)

    async def complete(self, messages: Any, **kw: Any) -> Any:
        self._count(messages)
        return await self.inner.complete(messages, **kw)

    async def structured(self, messages: Any, schema: Any, **kw: Any) -> Any:
        self._count(messages)
        return await self.inner.structured(messages, schema, **kw)

    async def aclose(self) -> None:
        return None


def served(ep: SimProcess) -> dict[str, Any]:
    s = ep.stats()  # outside every timed region and CPU reading (an older SimProcess builds a client per call)
    return {"requests": s["by_path"].get("/v1/chat/completions", 0), "prompt_tokens": s["prompt_tokens"],
            "completion_tokens": s["completion_tokens"], "cached_tokens": s.get("cached_prompt_tokens", 0)}  # fmt: skip


def cold_cache(ep: SimProcess) -> None:
    """Empty the simulator's prefix cache (vLLM's route); a simulator without one has nothing to empty."""
    httpx.post(ep.base_url.removesuffix("/v1") + "/reset_prefix_cache", timeout=5)


def delta(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    return {k: after[k] - before[k] for k in after}


async def fit_once(ep: SimProcess, uid: str, votes: list | None, cfg: FitConfig, endpoint: dict[str, Any],
                   memory: PreferenceMemory | None = None) -> dict[str, Any]:  # fmt: skip
    """One fit with a fresh client and a cold prefix cache; the simulator's counts for it, wall time, per-step tokens."""
    cold_cache(ep)
    before = served(ep)
    async with LLMClient(EndpointConfig(base_url=ep.base_url, **endpoint)) as llm:
        parts = PartsBackend(llm)
        t0 = time.perf_counter()
        res = await Synthesizer(parts, memory, cfg).fit(uid, votes)  # type: ignore[arg-type]
        wall = time.perf_counter() - t0
        by_site = llm.stats.as_dict()
    out = delta(served(ep), before)
    out["parts"] = {**parts.parts, "repeated prefix": parts.repeated_prefix}
    out["repeated_prompt"] = parts.repeated_prompt
    out["wall_s"] = wall
    out["version"] = res.profile.version if res.profile else None
    out["status"] = res.status
    out["served_config"] = (res.profile.meta.get("selection") or {}).get("served", "-") if res.profile else "-"
    out["steps"] = {s: by_site.get(s, {}).get("prompt_tokens", 0) for s in STEPS}
    out["steps"]["(logprob scoring)"] = sum(v["prompt_tokens"] for k, v in by_site.items() if k.endswith(":logprob"))
    out["step_requests"] = {s: by_site.get(s, {}).get("requests", 0) for s in STEPS}
    out["step_requests"]["(logprob scoring)"] = sum(v["requests"] for k, v in by_site.items() if k.endswith(":logprob"))
    out["step_computed"] = {s: by_site.get(s, {}).get("prompt_tokens", 0) - by_site.get(s, {}).get("cached_prompt_tokens", 0)
                            for s in STEPS}  # fmt: skip
    out["step_computed"]["(logprob scoring)"] = sum(v["prompt_tokens"] - v.get("cached_prompt_tokens", 0)
                                                    for k, v in by_site.items() if k.endswith(":logprob"))  # fmt: skip
    return out


def process_cpu(pid: int | None) -> float:
    """CPU seconds used so far by process ``pid`` (Linux /proc), NaN where unavailable."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, TypeError):
        return float("nan")


async def fit_many(ep: SimProcess, pop: Population, n_votes: int, cfg: FitConfig, endpoint: dict[str, Any]) -> dict[str, float]:
    cold_cache(ep)
    # The users' votes are simulated before the clock and the CPU counters start: generating them is the
    # bench's work, not the fits' (it used to run inside the gather, ~0.19 s for 20 users on this machine).
    votes = {u: pop.votes(u, n_votes) for u in pop.user_ids}
    before = served(ep)
    sim_pid = getattr(getattr(ep, "_proc", None), "pid", None)
    sim0, cpu0 = process_cpu(sim_pid), time.process_time()
    async with LLMClient(EndpointConfig(base_url=ep.base_url, **endpoint)) as llm:
        t0 = time.perf_counter()
        await asyncio.gather(*(Synthesizer(llm, None, cfg).fit(u, votes[u]) for u in pop.user_ids))
        wall = time.perf_counter() - t0
        client_cpu, sim_cpu = time.process_time() - cpu0, process_cpu(sim_pid) - sim0
        # How far the adaptive limit fell during the fits (an older checkout's status has no `lowest`: NaN).
        status = llm.limiter_status() if hasattr(llm, "limiter_status") else None
        lowest = float(getattr(status, "lowest", float("nan")))
        decreases = float(getattr(status, "decreases", float("nan")))
    d = delta(served(ep), before)
    n = len(pop.user_ids)
    return {"wall_s": wall, "requests": d["requests"] / n, "prompt_tokens": d["prompt_tokens"] / n,
            "computed_tokens": (d["prompt_tokens"] - d["cached_tokens"]) / n,
            "client_cpu_s": client_cpu, "sim_cpu_s": sim_cpu, "limit_lowest": lowest,
            "limit_decreases": decreases}  # fmt: skip


async def refits(ep: SimProcess, uid: str, votes: list, n_first: int, cfg: FitConfig, endpoint: dict[str, Any]) -> list[dict[str, Any]]:
    memory = PreferenceMemory(InMemoryStore(), tenant="bench")
    await memory.add_votes(votes[:n_first])
    rows = [await fit_once(ep, uid, None, cfg, endpoint, memory)]
    rows.append(await fit_once(ep, uid, None, cfg, endpoint, memory))
    await memory.add_votes(votes[n_first:])
    rows.append(await fit_once(ep, uid, None, cfg, endpoint, memory))
    return rows


def loop_factory(name: str) -> Any:
    """``asyncio.Runner``'s loop factory: uvloop's for "uvloop" (when installed), else asyncio's (None).
    Written out here rather than imported from synth_agent.runner, which an older checkout lacks."""
    if name == "uvloop":
        try:
            import uvloop
        except ImportError:
            return None
        return uvloop.new_event_loop
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latency-ms", type=float, default=50.0)
    ap.add_argument("--per-token-latency-ms", type=float, default=0.0,
                    help="simulator latency per generated token on top (a decode-bound server)")  # fmt: skip
    ap.add_argument("--prefix-cache-tokens", type=int, default=None,
                    help="capacity of the simulator's prefix cache model (default: the simulator's; 0: none)")  # fmt: skip
    ap.add_argument("--users", type=int, default=20)
    ap.add_argument("--votes", type=int, default=12)
    ap.add_argument("--new-votes", type=int, default=4, help="votes added before the last refit")
    ap.add_argument("--solo", type=int, default=5, help="users fitted one at a time for the per-fit figures")
    ap.add_argument("--concurrency", type=int, default=64, help="max requests in flight per client")
    ap.add_argument("--config", action="append", default=[], metavar="KEY=VALUE", help="FitConfig override")
    ap.add_argument("--endpoint", action="append", default=[], metavar="KEY=VALUE",
                    help="EndpointConfig override, e.g. prefix_warmup_tokens=512")  # fmt: skip
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds of (1 user, N users concurrently), alternating; medians reported")  # fmt: skip
    ap.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop",
                    help="event loop of the fits (uvloop, as synth-agent fit/eval/worker run them)")  # fmt: skip
    ap.add_argument("--no-freeze", action="store_true",
                    help="leave the start-up heap in the garbage collector's generations (as before 2026-12-01)")  # fmt: skip
    ap.add_argument("--gc-young", type=int, default=50_000,
                    help="generation-0 threshold of the collector while the fits run (synth_agent.runner."
                         "YOUNG_COLLECTION_THRESHOLD; 700: CPython's default, as before session 27)")  # fmt: skip
    args = ap.parse_args()
    factory = loop_factory(args.loop)

    def run(coro: Any) -> Any:
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(coro)

    if not args.no_freeze:  # as synth_agent.runner.run_fits does in the commands that run fits
        gc.collect()
        gc.freeze()
    gc.set_threshold(args.gc_young, *gc.get_threshold()[1:])  # as run_fits does while fits run
    cfg = FitConfig(seed=0, **parse_overrides(args.config))
    endpoint = {"max_concurrency": args.concurrency, **parse_overrides(args.endpoint)}
    pop = Population(args.users, seed=0)
    console = Console(width=150)
    console.print(f"fits on {'uvloop' if factory else 'asyncio'}'s event loop, start-up heap "
                  f"{'left to the collector' if args.no_freeze else 'frozen'}, young collections every "
                  f"{args.gc_young:,} allocations")  # fmt: skip
    budgets = f"{cfg.n_trials} trials, {cfg.n_demo_candidates} demo candidates"
    sim_options: dict[str, Any] = {"latency_ms": args.latency_ms}
    if args.per_token_latency_ms:  # only when asked: an older checkout's SimProcess may not take it
        sim_options["per_token_latency_ms"] = args.per_token_latency_ms
    if args.prefix_cache_tokens is not None:
        sim_options["prefix_cache_tokens"] = args.prefix_cache_tokens
    with SimProcess(**sim_options) as ep:
        solo = [run(fit_once(ep, u, pop.votes(u, args.votes), cfg, endpoint))
                for u in pop.user_ids[: args.solo]]  # fmt: skip
        uid = pop.user_ids[0]
        refit_rows = run(refits(ep, uid, pop.votes(uid, args.votes + args.new_votes), args.votes, cfg,
                                        endpoint))  # fmt: skip
        ones, manys = [], []
        for _ in range(max(1, args.rounds)):  # alternating, so a burst of load elsewhere hits both sides
            ones.append(run(fit_many(ep, Population(1, seed=0), args.votes, cfg, endpoint)))
            manys.append(run(fit_many(ep, pop, args.votes, cfg, endpoint)))
    one = {k: statistics.median(r[k] for r in ones) for k in ones[0]}
    many = {k: statistics.median(r[k] for r in manys) for k in manys[0]}
    ratios = [m["wall_s"] / o["wall_s"] for o, m in zip(ones, manys, strict=True)]

    def med(key: str) -> float:
        return statistics.median(s[key] for s in solo)

    t = Table(title=f"One fit of a {args.votes}-vote user, simulator at {args.latency_ms:g} ms/request"
                    f"{f' + {args.per_token_latency_ms:g} ms/token' if args.per_token_latency_ms else ''} in its own "
                    f"process (median of {len(solo)} users, max in brackets; {budgets})")  # fmt: skip
    for s in solo:
        s["computed_tokens"] = s["prompt_tokens"] - s["cached_tokens"]
    for col in ("LLM requests", "prompt tokens sent", "cached (server prefix cache)", "computed", "completion tokens",
                "wall time (s)"):  # fmt: skip
        t.add_column(col, justify="right")
    t.add_row(f"{med('requests'):.0f} ({max(s['requests'] for s in solo)})",
              f"{med('prompt_tokens'):,.0f} ({max(s['prompt_tokens'] for s in solo):,})",
              f"{med('cached_tokens'):,.0f} ({max(s['cached_tokens'] for s in solo):,})",
              f"{med('computed_tokens'):,.0f} ({max(s['computed_tokens'] for s in solo):,})",
              f"{med('completion_tokens'):,.0f}",
              f"{med('wall_s'):.2f} ({max(s['wall_s'] for s in solo):.2f})")  # fmt: skip
    console.print(t)
    # what the guard serves can decide what a fit costs (FitConfig(race_demos="served"): step 3 only for p+d)
    console.print("per user (served: requests, prompt tokens, wall): " + "; ".join(
        f"{s['served_config']}: {s['requests']}, {s['prompt_tokens']:,}, {s['wall_s']:.2f} s" for s in solo))
    steps = Table(title="Where the requests and prompt tokens went, per step (call site), median per fit; the "
                        "refits of the next table in the last rows. persona: the fit's persona and one per "
                        "cross-validation fold; select: cross-validated selection's judgments and traces")  # fmt: skip
    steps.add_column("fit")
    for step in solo[0]["steps"]:
        steps.add_column(step, justify="right")
    steps.add_row("requests", *(f"{statistics.median(s['step_requests'][k] for s in solo):,.0f}" for k in solo[0]["steps"]))
    steps.add_row("prompt tokens", *(f"{statistics.median(s['steps'][k] for s in solo):,.0f}" for k in solo[0]["steps"]))
    steps.add_row("computed (not cached)",
                  *(f"{statistics.median(s['step_computed'][k] for s in solo):,.0f}" for k in solo[0]["steps"]))  # fmt: skip
    for label, row in (("refit after new votes: requests", "step_requests"), ("refit after new votes: tokens", "steps")):
        steps.add_row(label, *(f"{refit_rows[2][row][k]:,}" for k in solo[0]["steps"]))
    console.print(steps)
    pt = Table(title="Where the prompt tokens went, per prompt part (chars / 4, as the simulator counts), median per "
                     "fit; 'repeated prefix': judge prompts' prefixes (all but the vote judged) sent earlier in the "
                     "same fit, what a prefix-caching server could reuse")  # fmt: skip
    for col in ("fit", *solo[0]["parts"], "requests asking a prompt already asked"):
        pt.add_column(col, justify="right")
    pt.add_row("first fit", *(f"{statistics.median(s['parts'][k] for s in solo):,.0f}" for k in solo[0]["parts"]),
               f"{statistics.median(s['repeated_prompt'] for s in solo):.0f}")  # fmt: skip
    pt.add_row("refit after new votes", *(f"{refit_rows[2]['parts'][k]:,}" for k in solo[0]["parts"]),
               str(refit_rows[2]["repeated_prompt"]))  # fmt: skip
    console.print(pt)
    r = Table(title="Refits of one user through a preference memory (fresh client each time)")
    for col in ("fit", "LLM requests", "prompt tokens", "computed", "wall (s)", "persona version after", "status"):
        r.add_column(col, justify="right")
    labels = [f"first fit, {args.votes} votes", "again, no new votes", f"after {args.new_votes} more votes"]
    for label, row in zip(labels, refit_rows, strict=True):
        r.add_row(label, str(row["requests"]), f"{row['prompt_tokens']:,}",
                  f"{row['prompt_tokens'] - row['cached_tokens']:,}", f"{row['wall_s']:.2f}",
                  str(row["version"]), row["status"])  # fmt: skip
    console.print(r)
    c = Table(title=f"{args.users} users fitted concurrently vs one, one client ({args.concurrency} in flight at "
                    f"most; median of {len(ratios)} alternating rounds)")  # fmt: skip
    for col in ("wall, 1 user (s)", f"wall, {args.users} users (s)", "ratio (per round)", "requests / user",
                "prompt tokens / user", "computed / user", "client CPU (s)", "simulator CPU (s)",
                "lowest limit (decreases) per round"):  # fmt: skip
        c.add_column(col, justify="right")
    c.add_row(f"{one['wall_s']:.2f}", f"{many['wall_s']:.2f}",
              f"{statistics.median(ratios):.2f}x ({', '.join(f'{r:.2f}' for r in ratios)})",
              f"{many['requests']:.1f}", f"{many['prompt_tokens']:,.0f}", f"{many['computed_tokens']:,.0f}",
              f"{many['client_cpu_s']:.2f}",
              f"{many['sim_cpu_s']:.2f}",
              ", ".join(f"{m['limit_lowest']:.0f} ({m['limit_decreases']:.0f})" for m in manys))  # fmt: skip
    console.print(c)
    # Where the N-user wall goes: CPU per request on each side, and the floors the run cannot go below.
    n_req = many["requests"] * args.users
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    a = Table(title=f"CPU per request in the {args.users}-user run, and the floors of its wall time")
    for col in ("requests", "client CPU ms / request", "simulator CPU ms / request",
                f"CPU floor on {cores} cores (s)", f"in-flight floor: requests x latency / {args.concurrency} (s)",
                "critical path: 1 user's wall (s)", "load average (1 min)"):  # fmt: skip
        a.add_column(col, justify="right")
    a.add_row(f"{n_req:,.0f}", f"{1000 * many['client_cpu_s'] / n_req:.2f}", f"{1000 * many['sim_cpu_s'] / n_req:.2f}",
              f"{(many['client_cpu_s'] + many['sim_cpu_s']) / cores:.2f}",
              f"{n_req * args.latency_ms / 1000 / args.concurrency:.2f}", f"{one['wall_s']:.2f}", f"{load:.2f}")  # fmt: skip
    console.print(a)
    # Per round: the first 20-user round is the slowest in every run; these say which process paid for it.
    console.print("per round, 1 user wall / N users wall (s), client / simulator CPU ms per request of the N users: "
                  + "; ".join(f"{o['wall_s']:.2f} / {m['wall_s']:.2f}, "
                              f"{1000 * m['client_cpu_s'] / (m['requests'] * args.users):.2f} / "
                              f"{1000 * m['sim_cpu_s'] / (m['requests'] * args.users):.2f}"
                              for o, m in zip(ones, manys, strict=True)))  # fmt: skip
    console.print("Client CPU is this bench process's (the fits, the LLM client and the bench's own bookkeeping); "
                  "the CPU floor assumes both processes spread perfectly over every core and nothing else runs.")  # fmt: skip


if __name__ == "__main__":
    main()
