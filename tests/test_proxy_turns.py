"""synth_agent.proxy.turns: vote handlers share each event-loop iteration within a time budget."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

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


async def test_a_burst_of_vote_writes_lets_a_health_probe_through_within_the_budget(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the app: 30 vote writes start in one loop iteration, each standing for 4 ms of the loop (a
    clock they advance); ``GET /healthz`` comes in the next iteration. It is answered after the few votes
    that fit the 10 ms budget, not after all 30 have been parsed and handed on."""
    import httpx
    from langgraph.store.memory import InMemoryStore

    from synth_agent.config import Settings
    from synth_agent.proxy import ProxySettings, create_app, guard

    app = create_app(Settings(home=tmp_path), ProxySettings(api_keys="acme:sk-acme-1", synthesis="off"),
                     store=InMemoryStore())
    clock = Clock()
    app.state.proxy.turns = TurnBudget(0.010, clock=clock)
    order: list[str] = []
    parse = guard.loads_strict

    def parsed(*args: Any, **kwargs: Any) -> Any:  # a vote's body read: its handler is running
        order.append("vote")
        clock.t += 0.004
        return parse(*args, **kwargs)

    monkeypatch.setattr(guard, "loads_strict", parsed)
    headers = {"Authorization": "Bearer sk-acme-1", "Content-Type": "application/json"}
    async with app.router.lifespan_context(app):  # type: ignore[attr-defined]
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as client:

            async def post(i: int) -> int:
                body = {"user_id": f"u{i % 3}", "id": f"v-{i}", "context": "Name a fruit.", "chosen": "Apple.",
                        "rejected": "Stone."}
                return (await client.post("/v1/votes", headers=headers, json=body)).status_code

            async def probe() -> int:
                await asyncio.sleep(0)  # the next iteration
                status = (await client.get("/healthz")).status_code
                order.append("healthz")
                return status

            statuses = await asyncio.gather(*(post(i) for i in range(30)), probe())
    assert statuses == [200] * 31
    assert order.count("vote") == 30
    assert order.index("healthz") <= 6, order  # without the budget: after all 30
