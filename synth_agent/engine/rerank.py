"""Best-of-n: rank n candidate responses for one user with a (personalized) judge.

Strategies:

* ``knockout`` — single-elimination tournament, n−1 comparisons, rounds run
  concurrently. Cheapest; good when only the winner matters.
* ``round_robin`` — every pair once (n(n−1)/2 comparisons, all concurrent), then
  Bradley–Terry strengths fitted to the outcomes (ties count half). Gives a full
  ranking with scores.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from synth_agent.engine.judge import Judge
from synth_agent.models import Judgment, Message, as_messages

Strategy = Literal["knockout", "round_robin"]


@dataclass
class RankResult:
    """``scores[i]`` is candidate i's strength (higher is better); ``winner`` its index."""

    winner: int
    scores: list[float]
    strategy: Strategy
    comparisons: list[tuple[int, int, Judgment]] = field(default_factory=list)

    @property
    def order(self) -> list[int]:
        return sorted(range(len(self.scores)), key=lambda i: (-self.scores[i], i))


def _a_wins(j: Judgment) -> float:
    """Share of the win credited to A: the judge's P(A) over both orders.

    Chain-of-thought verdicts give 1, 0 or ½ (orders disagree); log-probability
    verdicts give a calibrated probability, so close calls count as close.
    """
    return j.p_a


def bradley_terry(n: int, outcomes: Sequence[tuple[int, int, float]], iters: int = 200) -> list[float]:
    """Bradley–Terry strengths by the MM algorithm (Hunter 2004), with a weak prior against zeros.

    ``outcomes`` holds (i, j, w): i beat j with weight w in [0, 1] (j gets 1 − w).
    Returns strengths summing to 1.
    """
    if n == 1:
        return [1.0]
    wins = [0.1] * n  # prior: every candidate won a tenth of a game, keeps MLE finite
    pair_games: dict[tuple[int, int], float] = {}
    for i, j, w in outcomes:
        wins[i] += w
        wins[j] += 1.0 - w
        key = (min(i, j), max(i, j))
        pair_games[key] = pair_games.get(key, 0.0) + 1.0
    for i, j in itertools.combinations(range(n), 2):
        pair_games[(i, j)] = pair_games.get((i, j), 0.0) + 0.2 / (n - 1)
    p = [1.0 / n] * n
    for _ in range(iters):
        new = []
        for i in range(n):
            denom = 0.0
            for (a, b), games in pair_games.items():
                if i in (a, b):
                    other = b if a == i else a
                    denom += games / (p[i] + p[other])
            new.append(wins[i] / denom if denom > 0 else p[i])
        s = sum(new)
        new = [x / s for x in new]
        if max(abs(x - y) for x, y in zip(new, p, strict=True)) < 1e-9:
            p = new
            break
        p = new
    return p


async def rank(
    judge: Judge,
    context: Sequence[Message],
    candidates: Sequence[str],
    *,
    strategy: Strategy = "knockout",
) -> RankResult:
    """Rank ``candidates`` (answers to ``context``) for the judge's user."""
    context = as_messages(context)
    n = len(candidates)
    if n == 0:
        raise ValueError("rank() needs at least one candidate")
    if any(not isinstance(c, str) or not c.strip() for c in candidates):
        raise ValueError("every candidate must be a non-empty string")
    if n == 1:
        return RankResult(0, [1.0], strategy)
    if strategy == "round_robin":
        pairs = list(itertools.combinations(range(n), 2))
        judgments = await asyncio.gather(
            *(judge.compare(context, candidates[i], candidates[j]) for i, j in pairs)
        )
        comps = [(i, j, jd) for (i, j), jd in zip(pairs, judgments, strict=True)]
        scores = bradley_terry(n, [(i, j, _a_wins(jd)) for i, j, jd in comps])
        winner = max(range(n), key=lambda k: (scores[k], -k))
        return RankResult(winner, scores, strategy, comps)
    if strategy != "knockout":
        raise ValueError(f"unknown strategy {strategy!r}; use 'knockout' or 'round_robin'")
    alive = list(range(n))
    rounds_won = [0.0] * n
    comps = []
    while len(alive) > 1:
        pairs = [(alive[k], alive[k + 1]) for k in range(0, len(alive) - 1, 2)]
        bye = [alive[-1]] if len(alive) % 2 else []
        judgments = await asyncio.gather(
            *(judge.compare(context, candidates[i], candidates[j]) for i, j in pairs)
        )
        nxt = []
        for (i, j), jd in zip(pairs, judgments, strict=True):
            comps.append((i, j, jd))
            w = _a_wins(jd)
            # A tie goes to the side the judge leaned to; an exact tie to the earlier candidate.
            win = i if w >= 0.5 else j
            rounds_won[win] += 1.0
            rounds_won[i] += w * 0.01
            rounds_won[j] += (1.0 - w) * 0.01
            nxt.append(win)
        for b in bye:
            rounds_won[b] += 1.0
        alive = nxt + bye
    winner = alive[0]
    total = sum(rounds_won) or 1.0
    scores = [r / total for r in rounds_won]
    return RankResult(winner, scores, strategy, comps)
