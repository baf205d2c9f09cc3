"""How often the A/B example's personalized answer wins, over repeated runs.

``examples/ab_voting.py`` pits the personalized answer against the plain one on every turn once
a persona exists; the simulated user's pick measures personalization directly. Background fits
start when enough votes arrived, so which persona version serves which turn depends on timing
and the rate varies from run to run: this prints each run's tally and the spread, for the
example's own user and for a user with strong preferences.

    python bench/ab_example.py [--runs 5] [--turns 24,48]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import inspect
import io
import re
import statistics
from pathlib import Path

from synth_agent.sim.population import Population, SimUser
from synth_agent.sim.server import llm_endpoint
from synth_agent.sim.traits import TRAITS

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ab_voting.py"
DEFAULT_USER = Population(1, seed=0).users[0]
USERS = {
    "example's user (Population(1, seed=0))": DEFAULT_USER,
    "strong (headings +2.5, code +2, hedging -2.5)": SimUser(
        "ines@example.org", {**dict.fromkeys(TRAITS, 0.0), "headings": 2.5, "code": 2.0, "hedging": -2.5}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--turns", default="24,48", help="comma-separated turn counts")
    ap.add_argument("--example", type=Path, default=EXAMPLE, help="the example file (e.g. an older checkout's)")
    args = ap.parse_args()
    spec = importlib.util.spec_from_file_location("ab_voting", args.example)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    print("personalized answer chosen / A/B turns with a persona, per run")
    for turns in (int(t) for t in args.turns.split(",")):
        for name, user in USERS.items():
            takes_user = "user" in inspect.signature(example.run).parameters
            if not takes_user and user is not DEFAULT_USER:
                continue  # an older example only runs its own user
            tallies = []
            for _ in range(args.runs):
                kw = {"user": user} if takes_user else {}
                with llm_endpoint() as url, contextlib.redirect_stdout(io.StringIO()) as out:
                    asyncio.run(example.run(url, turns=turns, **kw))
                m = re.search(r"chosen in (\d+)/(\d+)", out.getvalue())
                assert m, "the example no longer prints its tally"
                tallies.append((int(m.group(1)), int(m.group(2))))
            rates = [w / n for w, n in tallies]
            print(f"{turns:3d} turns, {name}: " + ", ".join(f"{w}/{n}" for w, n in tallies)
                  + f"  -> median {statistics.median(rates):.0%}, min {min(rates):.0%}, max {max(rates):.0%}")


if __name__ == "__main__":
    main()
