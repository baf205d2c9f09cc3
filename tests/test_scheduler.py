"""SynthesisScheduler / SynthesisPolicy: thresholds, single-flight, follow-ups, failures, shutdown."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from synth_agent.models import PersonaProfile
from synth_agent.scheduler import SynthesisPolicy, SynthesisScheduler

FAST = SynthesisPolicy(debounce=0.0, backoff_initial=0.01, backoff_max=0.02, max_retries=2)


def test_policy_thresholds() -> None:
    p = SynthesisPolicy(refit_every=None)
    assert [n for n in range(60) if p.should_fit(n, None)][:1] == [5]
    assert not p.should_fit(4, None)
    assert [p.next_threshold(f) for f in (None, 5, 7, 10, 19, 20, 40)] == [5, 10, 10, 20, 20, 40, 80]
    assert not p.should_fit(9, 5) and p.should_fit(10, 5) and p.should_fit(12, 7)
    assert not p.should_fit(20, 20)
    q = SynthesisPolicy(refit_every=3)
    assert q.next_threshold(40) == 43 and q.should_fit(43, 40) and not q.should_fit(42, 40)
    assert SynthesisPolicy(first_fit=8, growth=1.5).next_threshold(8) == 12
    assert FAST.backoff(1) == 0.01 and FAST.backoff(5) == 0.02


@pytest.mark.parametrize(
    "kwargs", [{"first_fit": 1}, {"growth": 1.0}, {"refit_every": 0}, {"debounce": -1}, {"max_retries": -1}]
)
def test_policy_rejects_bad_config(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        SynthesisPolicy(**kwargs)  # type: ignore[arg-type]


@dataclass
class FakeMemory:
    votes: dict[str, int] = field(default_factory=dict)
    personas: dict[str, PersonaProfile] = field(default_factory=dict)

    async def count_votes(self, user_id: str) -> int:
        return self.votes.get(user_id, 0)

    async def current_persona(self, user_id: str) -> PersonaProfile | None:
        return self.personas.get(user_id)


class FakeRunner:
    """Fits on whatever vote count exists when it starts; can be slowed, gated and made to fail."""

    def __init__(self, memory: FakeMemory, delay: float = 0.0, fail_times: int = 0) -> None:
        self.memory = memory
        self.delay = delay
        self.fail_times = fail_times
        self.calls: list[tuple[str, str]] = []
        self.active: dict[str, int] = {}
        self.max_active = 0
        self.gate: asyncio.Event | None = None
        self.started = asyncio.Event()

    async def run(self, tenant_id: str, user_id: str) -> PersonaProfile | None:
        self.calls.append((tenant_id, user_id))
        self.started.set()
        self.active[user_id] = self.active.get(user_id, 0) + 1
        self.max_active = max(self.max_active, self.active[user_id])
        n = self.memory.votes.get(user_id, 0)  # like load_votes: fit on the votes present at the start
        try:
            if self.gate is not None:
                await self.gate.wait()
            await asyncio.sleep(self.delay)
            if self.fail_times > 0:
                self.fail_times -= 1
                raise RuntimeError("endpoint down")
            old = self.memory.personas.get(user_id)
            prof = PersonaProfile(
                user_id=user_id, persona="likes tests", vote_ids=[f"v{i}" for i in range(n)],
                version=(old.version if old else 0) + 1,
            )
            self.memory.personas[user_id] = prof
            return prof
        finally:
            self.active[user_id] -= 1


async def test_first_fit_at_threshold_and_listener() -> None:
    mem = FakeMemory()
    runner = FakeRunner(mem)
    sched = SynthesisScheduler(runner, lambda t: mem, FAST)
    seen: list[tuple[str, str, int]] = []
    sched.add_listener(lambda t, u, p: seen.append((t, u, p.version)))
    for n in range(1, 11):
        mem.votes["ana"] = n
        sched.notify_vote("acme", "ana")
        await sched.wait_idle()
    assert [len(p.vote_ids) for p in [mem.personas["ana"]]] == [10]
    assert runner.calls == [("acme", "ana")] * 2  # at 5 and at 10
    assert seen == [("acme", "ana", 1), ("acme", "ana", 2)]
    st = sched.stats
    assert st.runs_succeeded == 2 and st.runs_skipped == 8 and st.failures == 0 and st.in_flight == 0
    await sched.aclose()


async def test_votes_during_run_schedule_exactly_one_follow_up() -> None:
    mem = FakeMemory(votes={"ana": 5})
    runner = FakeRunner(mem)
    runner.gate = asyncio.Event()
    sched = SynthesisScheduler(runner, lambda t: mem, FAST)
    sched.notify_vote("t", "ana")
    await runner.started.wait()
    for n in range(6, 16):  # ten votes while the first fit runs
        mem.votes["ana"] = n
        sched.notify_vote("t", "ana")
        assert sched.is_busy("t", "ana")
    runner.gate.set()
    await sched.wait_idle()
    assert len(runner.calls) == 2  # the run (5 votes), then one follow-up (15 votes >= threshold 10)
    assert [len(mem.personas["ana"].vote_ids), mem.personas["ana"].version] == [15, 2]
    assert runner.max_active == 1 and sched.stats.max_in_flight_per_user == 1
    await sched.aclose()


async def test_failures_are_retried_with_backoff_and_never_raised() -> None:
    mem = FakeMemory(votes={"bo": 6})
    runner = FakeRunner(mem, fail_times=2)
    sched = SynthesisScheduler(runner, lambda t: mem, FAST)
    sched.notify_vote("t", "bo")  # returns at once even though the run will fail
    await sched.wait_idle()
    st = sched.stats
    assert st.failures == 2 and st.retries_scheduled == 2 and st.runs_succeeded == 1 and st.gave_up == 0
    assert mem.personas["bo"].version == 1
    await sched.aclose()


async def test_gives_up_after_max_retries_until_next_vote() -> None:
    mem = FakeMemory(votes={"bo": 6})
    runner = FakeRunner(mem, fail_times=10)
    sched = SynthesisScheduler(runner, lambda t: mem, FAST)
    sched.notify_vote("t", "bo")
    await sched.wait_idle()
    assert sched.stats.gave_up == 1 and sched.stats.failures == FAST.max_retries + 1
    runner.fail_times = 0
    sched.notify_vote("t", "bo")
    await sched.wait_idle()
    assert mem.personas["bo"].version == 1
    await sched.aclose()


async def test_broken_memory_is_a_counted_failure() -> None:
    def memory_for(tenant: str) -> FakeMemory:
        raise OSError("store unreachable")

    sched = SynthesisScheduler(FakeRunner(FakeMemory()), memory_for, FAST)  # type: ignore[arg-type]
    sched.notify_vote("t", "x")
    await sched.wait_idle()
    assert sched.stats.failures == FAST.max_retries + 1 and sched.stats.runs_started == 0
    await sched.aclose()


async def test_aclose_drain_waits_and_cancel_cancels() -> None:
    mem = FakeMemory(votes={"a": 5, "b": 5})
    runner = FakeRunner(mem, delay=0.2)
    sched = SynthesisScheduler(runner, lambda t: mem, FAST)
    sched.notify_vote("t", "a")
    await runner.started.wait()
    await sched.aclose(drain=True)
    assert "a" in mem.personas and sched.stats.runs_succeeded == 1
    sched.notify_vote("t", "b")  # closed: dropped, not raised
    assert not sched.is_busy("t", "b")

    sched2 = SynthesisScheduler(runner, lambda t: mem, FAST)
    runner.started.clear()
    sched2.notify_vote("t", "b")
    await runner.started.wait()
    await sched2.aclose(drain=False)
    assert "b" not in mem.personas and sched2.stats.cancelled == 1


async def test_request_fit_ignores_thresholds() -> None:
    mem = FakeMemory(votes={"c": 3})
    runner = FakeRunner(mem)
    sched = SynthesisScheduler(runner, lambda t: mem, FAST)
    sched.notify_vote("t", "c")
    await sched.wait_idle()
    assert runner.calls == []
    sched.request_fit("t", "c")
    await sched.wait_idle()
    assert runner.calls == [("t", "c")]
    await sched.aclose()


async def test_debounce_coalesces_a_burst() -> None:
    mem = FakeMemory()
    runner = FakeRunner(mem)
    sched = SynthesisScheduler(runner, lambda t: mem, SynthesisPolicy(debounce=0.05))
    for n in range(1, 9):
        mem.votes["d"] = n
        sched.notify_vote("t", "d")
    await sched.wait_idle()
    assert len(runner.calls) == 1 and sched.stats.checks == 1
    await sched.aclose()


async def test_many_users_single_flight_each() -> None:
    mem = FakeMemory()
    runner = FakeRunner(mem, delay=0.005)
    sched = SynthesisScheduler(runner, lambda t: mem, FAST)

    async def user(i: int) -> None:
        for n in range(1, 25):
            mem.votes[f"u{i}"] = n
            sched.notify_vote("t", f"u{i}")
            await asyncio.sleep(0.001 * (i % 3))

    await asyncio.gather(*(user(i) for i in range(30)))
    await sched.wait_idle()
    assert runner.max_active == 1 and sched.stats.max_in_flight_per_user == 1
    assert all(len(mem.personas[f"u{i}"].vote_ids) >= 20 for i in range(30))
    await sched.aclose()


async def test_forget_drops_what_the_scheduler_keeps_about_the_user() -> None:
    """A forgotten user leaves nothing in the scheduler: run counts and idle slots go (they used to stay)."""
    mem = FakeMemory(votes={"ana": 5, "bo": 5})
    sched = SynthesisScheduler(FakeRunner(mem), lambda t: mem, FAST)
    for user in ("ana", "bo"):
        sched.notify_vote("t", user)
    await sched.wait_idle()
    assert sched.runs_for("t", "ana") == 1 and sched.tracked_users == 2
    sched.drop_user("t", "ana")
    assert sched.runs_for("t", "ana") == 0 and sched.runs_for("t", "bo") == 1 and sched.tracked_users == 1
    await sched.aclose()


async def test_forget_during_a_run_keeps_the_slot_until_it_ends() -> None:
    mem = FakeMemory(votes={"ana": 5})
    runner = FakeRunner(mem)
    runner.gate = asyncio.Event()
    sched = SynthesisScheduler(runner, lambda t: mem, FAST)
    sched.notify_vote("t", "ana")
    await runner.started.wait()
    sched.drop_user("t", "ana")
    assert sched.is_busy("t", "ana")  # single-flight holds: the running fit keeps its slot
    runner.gate.set()
    await sched.wait_user_idle("t", "ana")
    sched.drop_user("t", "ana")  # what the proxy's forget does once the raced fit ended
    assert sched.tracked_users == 0 and sched.runs_for("t", "ana") == 0
    await sched.aclose()


async def test_run_counts_are_kept_for_a_bounded_number_of_users() -> None:
    mem = FakeMemory(votes={f"u{i}": 5 for i in range(8)})
    sched = SynthesisScheduler(FakeRunner(mem), lambda t: mem, FAST)
    sched.runs_tracked_users = 3
    for i in range(8):
        sched.notify_vote("t", f"u{i}")
        await sched.wait_idle()
    assert sched.stats.runs_succeeded == 8
    assert sched.tracked_users == 3 and [sched.runs_for("t", f"u{i}") for i in range(8)] == [0] * 5 + [1] * 3
    await sched.aclose()
