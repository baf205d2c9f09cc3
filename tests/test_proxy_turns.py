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
    # 0, 4 and 8 ms into the first iteration: within 10 ms; the rest wait. In the next one the same
    # again, then the probe, not after all ten handlers
    assert order[:7] == ["h0", "h1", "h2", "h3", "h4", "h5", "probe"]
    assert [o for o in order if o != "probe"] == [f"h{i}" for i in range(10)]  # in the order they came


def test_without_a_budget_every_handler_runs_in_its_iteration() -> None:
    order = run_burst(0)
    assert order == [f"h{i}" for i in range(10)] + ["probe"]
