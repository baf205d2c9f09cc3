"""synth_agent.proxy.turns: vote handlers share each event-loop iteration within a time budget."""

from __future__ import annotations

import asyncio

from synth_agent.proxy.turns import TurnBudget


class Clock:
    """A clock the handlers below advance by the work they stand for (no real time is measured)."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def run_burst(budget: float) -> list[str]:
    """Ten handlers of 4 ms each start in one iteration; a probe arrives in the next one. The order they ran in."""
    clock = Clock()
    turns = TurnBudget(budget, clock=clock)
    order: list[str] = []

    async def handler(i: int) -> None:
        await turns.share()
        order.append(f"h{i}")
        clock.t += 0.004  # its work

    async def main() -> None:
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(handler(i)) for i in range(10)]
        loop.call_soon(lambda: loop.call_soon(order.append, "probe"))  # the next iteration's I/O, say
        await asyncio.gather(*tasks)

    asyncio.run(main())
    return order


def test_handlers_past_the_budget_continue_in_later_iterations_and_a_probe_runs_in_between() -> None:
    order = run_burst(0.010)
    # 0, 4 and 8 ms into the first iteration: within 10 ms; the rest wait for later iterations, and the
    # probe of the next iteration runs before them, not after all ten handlers
    assert order[:4] == ["h0", "h1", "h2", "probe"]
    assert [o for o in order if o != "probe"] == [f"h{i}" for i in range(10)]  # in the order they came


def test_without_a_budget_every_handler_runs_in_its_iteration() -> None:
    order = run_burst(0)
    assert order == [f"h{i}" for i in range(10)] + ["probe"]


def test_waiting_handlers_are_woken_in_batches_not_all_every_iteration() -> None:
    """200 handlers of 4 ms: each waits, and is woken, a few times at most (waking every waiting handler
    every iteration to check the budget again cost ~10 % of the loop's CPU under a burst)."""
    clock = Clock()
    turns = TurnBudget(0.010, clock=clock)
    order: list[int] = []

    async def handler(i: int) -> None:
        await turns.share()
        order.append(i)
        clock.t += 0.004

    async def main() -> None:
        await asyncio.gather(*(handler(i) for i in range(200)))

    asyncio.run(main())
    assert order == list(range(200))
    assert turns.yields < 2 * 200  # with every waiter woken each iteration: ~200 * 70 / 2
    assert not turns._waiting and not turns._back
