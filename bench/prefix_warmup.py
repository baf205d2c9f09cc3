"""What ``EndpointConfig.prefix_warmup_tokens`` costs in wall time and saves in computed prompt tokens.

Alternating rounds against one simulator in its own process (its prefix cache model emptied before
each round): one user, then ``--users`` users fitted concurrently through one client, each with the
gate off (0) and at ``--warmup`` tokens, the order of the two flipped every round so a burst of load
elsewhere hits both. Prints per arm the median wall, the prompt tokens computed per user (sent minus
what the simulator's prefix cache served), and client / simulator CPU. Reuses ``fit_cost.fit_many``.

    python bench/prefix_warmup.py [--rounds 6] [--users 20] [--warmup 512] [--latency-ms 50] [--per-token-latency-ms 0]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
from typing import Any

from fit_cost import fit_many  # bench/ is on sys.path when a bench script runs

from synth_agent.engine import FitConfig
from synth_agent.sim.population import Population
from synth_agent.sim.server import SimProcess


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--users", type=int, default=20)
    ap.add_argument("--votes", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=512, help="prefix_warmup_tokens of the gated arm")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--latency-ms", type=float, default=50.0)
    ap.add_argument("--per-token-latency-ms", type=float, default=0.0)
    args = ap.parse_args()
    cfg = FitConfig(seed=0)
    arms = (0, args.warmup)
    rows: dict[tuple[int, int], list[dict[str, Any]]] = {(n, w): [] for n in (1, args.users) for w in arms}
    with SimProcess(latency_ms=args.latency_ms, per_token_latency_ms=args.per_token_latency_ms) as ep:
        for r in range(args.rounds):
            for n in (1, args.users):
                for w in arms if r % 2 == 0 else arms[::-1]:
                    endpoint = {"max_concurrency": args.concurrency, "prefix_warmup_tokens": w}
                    rows[(n, w)].append(asyncio.run(fit_many(ep, Population(n, seed=0), args.votes, cfg, endpoint)))
    print(f"{args.rounds} alternating rounds, simulator at {args.latency_ms:g} ms/request"
          f" + {args.per_token_latency_ms:g} ms/token, {args.votes}-vote users")  # fmt: skip
    for (n, w), got in rows.items():
        walls = ", ".join(f"{x['wall_s']:.2f}" for x in got)
        print(f"{n:>3} user(s), prefix_warmup_tokens={w:>4}: wall median {statistics.median(x['wall_s'] for x in got):.2f} s "
              f"({walls}); prompt tokens per user sent {statistics.median(x['prompt_tokens'] for x in got):,.0f}, "
              f"computed {statistics.median(x['computed_tokens'] for x in got):,.0f}; CPU client "
              f"{statistics.median(x['client_cpu_s'] for x in got):.2f} s, simulator "
              f"{statistics.median(x['sim_cpu_s'] for x in got):.2f} s")  # fmt: skip
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
