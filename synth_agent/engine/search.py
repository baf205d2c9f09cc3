"""Pick the best candidate demo set by validation accuracy, without judging what cannot change the answer.

SynthesizeMe scores every candidate few-shot set on every validation vote and keeps
the most accurate. Most of those judgments cannot change which candidate wins: once
a candidate has missed more validation votes than the current leader can still
miss, it is out. :func:`race` scores all candidates vote by vote (one round per
validation judgment, the candidates of a round concurrently) and drops every
candidate whose best possible final score can no longer beat the leader's
guaranteed one, ties broken by a fixed priority. This is exact branch and bound: it
returns the same winner and the same accuracy as scoring everything, at a fraction
of the judgments (``bench/fit_cost.py`` prints how many).

    >>> import asyncio
    >>> truth = {"c0": [1, 0, 1, 1], "c1": [1, 1, 1, 1], "c2": [0, 0, 1, 1]}
    >>> async def judge(c, i): return bool(truth[c][i])
    >>> result = asyncio.run(race(["c0", "c1", "c2"], 4, judge))
    >>> result.best, result.correct[result.best], result.judgments   # judging everything: 12
    (1, 4, 8)
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

__all__ = ["RaceResult", "race"]

C = TypeVar("C")


@dataclass
class RaceResult(Generic[C]):
    best: int
    """Index of the winning candidate."""
    correct: list[int]
    """Correct judgments per candidate, over ``judged`` of them (complete only for the winner)."""
    judged: list[int]
    judgments: int = 0
    """Judgments made in all (the exhaustive search makes ``len(candidates) * n``)."""
    dropped_after: dict[int, int] = field(default_factory=dict)
    """candidate index -> judgments it had when it was dropped."""

    @property
    def accuracy(self) -> float:
        n = self.judged[self.best]
        return self.correct[self.best] / n if n else 0.0


async def race(
    candidates: Sequence[C],
    n: int,
    judge: Callable[[C, int], Awaitable[bool]],
    *,
    priority: Callable[[int], tuple[float, ...]] | None = None,
    target: float = 1.0,
    wave: int | None = None,
    order: Sequence[int] | None = None,
) -> RaceResult[C]:
    """The candidate with the most of ``n`` validation judgments right (``judge(candidate, i)``).

    Ties go to the higher ``priority(index)`` (default: the earlier candidate). Candidates are
    taken in ``order`` (default: index order; cheapest first saves the most). The first is judged
    on everything at once and becomes the champion; the rest race against it in waves of ``wave``
    (default: all at once). In a wave the candidates that can still score highest are judged
    (best first; the others wait), each on the validation judgments that others missed most first,
    and a candidate stops as soon as its best possible score can no longer beat what another
    already has (bounds only tighten, so this holds whenever it is checked).
    A candidate that could at best tie a better-ranked champion is never judged at all. With
    ``target`` below 1, a candidate sure to reach that accuracy wins at once (good enough); at 1
    the result is exactly the exhaustive search's, whatever ``order`` and ``wave``.
    """
    m = len(candidates)
    if m == 0:
        raise ValueError("race() needs at least one candidate")
    prio = priority or (lambda i: (-i,))
    queue = list(order) if order is not None else list(range(m))
    if sorted(queue) != list(range(m)):
        raise ValueError("order must list every candidate index once")
    correct = [0] * m
    judged = [0] * m
    misses = [0] * n  # per validation judgment, how many candidates got it wrong so far
    result: RaceResult[C] = RaceResult(0, correct, judged)

    async def one(c: int, i: int) -> None:
        ok = await judge(candidates[c], i)
        correct[c] += int(ok)
        judged[c] += 1
        misses[i] += int(not ok)
        result.judgments += 1

    def rank(c: int) -> tuple[int, tuple[float, ...]]:
        return correct[c], prio(c)

    champion = queue.pop(0)
    await asyncio.gather(*(one(champion, i) for i in range(n)))
    size = max(1, wave or m)
    while queue:
        if target < 1.0 and correct[champion] >= target * n:
            for c in queue:  # the champion is sure to reach the target: nothing else is judged
                result.dropped_after[c] = 0
            break
        batch: list[int] = []
        while queue and len(batch) < size:
            c = queue.pop(0)
            if (n, prio(c)) < rank(champion):
                result.dropped_after[c] = 0  # cannot beat the champion even if right every time
            else:
                batch.append(c)
        rivals = [champion, *batch]

        def beaten(c: int, rivals: list[int] = rivals) -> bool:
            best = (correct[c] + n - judged[c], prio(c))  # c's best possible final rank
            if target < 1.0 and any(correct[d] >= target * n for d in rivals if d != c):
                return True
            return any(rank(d) > best for d in rivals if d != c)

        running = set(batch)
        wake = [asyncio.Event()]

        def notify(wake: list[asyncio.Event] = wake) -> None:
            wake[0].set()
            wake[0] = asyncio.Event()

        def upper(c: int) -> int:
            return correct[c] + n - judged[c]

        async def run(c: int, running: set[int] = running, wake: list[asyncio.Event] = wake) -> None:
            todo = set(range(n))
            try:
                while todo:
                    if beaten(c):
                        result.dropped_after[c] = judged[c]
                        return
                    # best first: only the candidates that can still score highest go on; the others
                    # wait, and are usually dropped without another judgment once a leader finishes
                    if upper(c) < max(upper(d) for d in running if not beaten(d)):
                        await wake[0].wait()
                        continue
                    i = max(todo, key=lambda i: (misses[i], -i))  # the one others missed most: prunes soonest
                    todo.discard(i)
                    await one(c, i)
                    notify()
            finally:
                running.discard(c)
                notify()

        await asyncio.gather(*(run(c) for c in batch))
        champion = max([c for c in rivals if judged[c] == n], key=rank)
    result.best = champion
    return result
