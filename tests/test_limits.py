from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import Callable

import anyio
import anyio.lowlevel
import pytest

from mxm_dataio_async._limits import LimiterStatistics, RateLimit, SourceLimiter

pytestmark = pytest.mark.anyio


class AutoClock:
    """Fake time: ``sleep`` advances the clock at once (plus an optional overshoot) and yields."""

    def __init__(self, overshoot: float = 0.0) -> None:
        self.now = 0.0
        self.overshoot = overshoot
        self.sleeps: list[float] = []
        self.calls = 0

    def __call__(self) -> float:
        self.calls += 1
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds + self.overshoot
        await anyio.lowlevel.checkpoint()


class ManualClock:
    """Fake time the test moves with ``advance``; sleepers wake once it reaches their target."""

    def __init__(self) -> None:
        self.now = 0.0
        self._sleepers: list[tuple[float, anyio.Event]] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        event = anyio.Event()
        self._sleepers.append((self.now + seconds, event))
        await event.wait()

    @property
    def sleeping(self) -> int:
        return sum(not event.is_set() for _, event in self._sleepers)

    def advance(self, seconds: float) -> None:
        self.now += seconds
        for target, event in self._sleepers:
            if target <= self.now + 1e-9:
                event.set()


async def until(predicate: Callable[[], bool], *, limit: int = 10_000) -> None:
    """Yield to the scheduler until ``predicate()`` holds (deterministic: no wall-clock time)."""
    for _ in range(limit):
        if predicate():
            return
        await anyio.lowlevel.checkpoint()
    raise AssertionError("condition not reached")


async def settle(rounds: int = 20) -> None:
    for _ in range(rounds):
        await anyio.lowlevel.checkpoint()


# -- configuration ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rate": 0}, "rate must be > 0"),
        ({"rate": -1}, "rate must be > 0"),
        ({"rate": math.nan}, "rate must be a finite number"),
        ({"rate": math.inf}, "rate must be a finite number"),
        ({"rate": 1, "per": 0}, "per must be > 0"),
        ({"rate": 1, "per": -2.5}, "per must be > 0"),
        ({"rate": 1, "per": math.inf}, "per must be a finite number"),
        ({"rate": 1, "burst": 0}, "burst must be >= 1"),
    ],
)
def test_rate_limit_rejects_impossible_values(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RateLimit(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rate": "10"}, "rate must be a number"),
        ({"rate": True}, "rate must be a number"),
        ({"rate": None}, "rate must be a number"),
        ({"rate": 1, "per": "1s"}, "per must be a number"),
        ({"rate": 1, "burst": 1.5}, "burst must be an int"),
        ({"rate": 1, "burst": True}, "burst must be an int"),
    ],
)
def test_rate_limit_rejects_non_numbers(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(TypeError, match=match):
        RateLimit(**kwargs)  # type: ignore[arg-type]


def test_rate_limit_interval() -> None:
    assert RateLimit(10).interval == pytest.approx(0.1)
    assert RateLimit(100, per=60, burst=5).interval == pytest.approx(0.6)


def test_limiter_rejects_bad_configuration() -> None:
    with pytest.raises(ValueError, match="max_concurrency must be >= 1"):
        SourceLimiter(max_concurrency=0)
    with pytest.raises(TypeError, match="max_concurrency must be an int"):
        SourceLimiter(max_concurrency=2.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="max_concurrency must be an int"):
        SourceLimiter(max_concurrency=True)
    with pytest.raises(TypeError, match="rate_limit must be a RateLimit"):
        SourceLimiter(10)  # type: ignore[arg-type]


def test_cooldown_rejects_bad_values() -> None:
    limiter = SourceLimiter()
    with pytest.raises(ValueError, match="must be >= 0"):
        limiter.cooldown(-1)
    with pytest.raises(ValueError, match="finite"):
        limiter.cooldown(math.nan)
    with pytest.raises(TypeError, match="must be a number"):
        limiter.cooldown("5")  # type: ignore[arg-type]


# -- rate -----------------------------------------------------------------------------------


async def test_burst_then_steady_rate_sequential() -> None:
    clock = AutoClock()
    limiter = SourceLimiter(RateLimit(10, burst=3), clock=clock, sleep=clock.sleep)
    grants = []
    for _ in range(8):
        async with limiter.slot():
            grants.append(clock.now)
    assert grants == pytest.approx([0, 0, 0, 0.1, 0.2, 0.3, 0.4, 0.5])
    stats = limiter.statistics()
    assert stats.total_acquired == 8
    assert stats.total_waits == 5


async def test_burst_then_steady_rate_concurrent_fifo() -> None:
    clock = AutoClock()
    limiter = SourceLimiter(RateLimit(10, burst=3), clock=clock, sleep=clock.sleep)
    grants: list[tuple[int, float]] = []

    async def worker(i: int) -> None:
        async with limiter.slot():
            grants.append((i, clock.now))

    async with anyio.create_task_group() as tg:
        for i in range(8):
            tg.start_soon(worker, i)
    assert [i for i, _ in grants] == list(range(8))  # first come, first served
    assert [t for _, t in grants] == pytest.approx([0, 0, 0, 0.1, 0.2, 0.3, 0.4, 0.5])


async def test_grants_spaced_exactly_at_the_emission_interval() -> None:
    clock = AutoClock()
    limiter = SourceLimiter(RateLimit(4, per=2.0), clock=clock, sleep=clock.sleep)
    grants = []
    for _ in range(6):
        async with limiter.slot():
            grants.append(clock.now)
    gaps = [b - a for a, b in itertools.pairwise(grants)]
    assert gaps == pytest.approx([0.5] * 5)
    assert clock.sleeps == pytest.approx([0.5] * 5)  # one sleep per wait, never a tiny re-sleep


async def test_sustained_rate_is_precise_over_ten_seconds() -> None:
    clock = AutoClock()
    limiter = SourceLimiter(RateLimit(1000), clock=clock, sleep=clock.sleep)
    grants = []
    for _ in range(10_001):
        async with limiter.slot():
            grants.append(clock.now)
    achieved = (len(grants) - 1) / (grants[-1] - grants[0])
    assert achieved == pytest.approx(1000, rel=0.02)
    assert grants[-1] == pytest.approx(10.0)


@pytest.mark.parametrize("overshoot", [0.0003, 0.0009])
async def test_sleep_overshoot_does_not_accumulate(overshoot: float) -> None:
    # Each sleep wakes late; the schedule (TAT) must not drift with it.
    clock = AutoClock(overshoot=overshoot)
    limiter = SourceLimiter(RateLimit(1000), clock=clock, sleep=clock.sleep)
    grants = []
    for _ in range(10_001):
        async with limiter.slot():
            grants.append(clock.now)
    achieved = (len(grants) - 1) / (grants[-1] - grants[0])
    assert achieved == pytest.approx(1000, rel=0.02)


async def test_backlog_catches_up_after_late_wakeups() -> None:
    # Wake-ups later than a whole interval: queued callers (arrived long ago) are granted back to
    # back until the schedule is met again, so the achieved rate still matches.
    clock = AutoClock(overshoot=0.0025)
    limiter = SourceLimiter(RateLimit(1000), clock=clock, sleep=clock.sleep)
    grants: list[float] = []

    async def worker() -> None:
        async with limiter.slot():
            grants.append(clock.now)

    async with anyio.create_task_group() as tg:
        for _ in range(2001):
            tg.start_soon(worker)
    achieved = (len(grants) - 1) / (grants[-1] - grants[0])
    assert achieved == pytest.approx(1000, rel=0.02)


async def test_rate_budget_recovers_after_idle_up_to_burst() -> None:
    clock = AutoClock()
    limiter = SourceLimiter(RateLimit(10, burst=2), clock=clock, sleep=clock.sleep)
    for _ in range(2):
        async with limiter.slot():
            pass
    assert limiter.statistics().tokens == pytest.approx(0)
    clock.now += 0.05
    assert limiter.statistics().tokens == pytest.approx(0.5)
    clock.now += 60  # idle for long: the bucket holds at most `burst` tokens
    assert limiter.statistics().tokens == pytest.approx(2)
    start = clock.now
    grants = []
    for _ in range(3):
        async with limiter.slot():
            grants.append(clock.now - start)
    assert grants == pytest.approx([0, 0, 0.1])


# -- concurrency ----------------------------------------------------------------------------


async def test_max_concurrency_is_enforced() -> None:
    limiter = SourceLimiter(max_concurrency=3)
    gate = anyio.Event()
    inside = 0
    max_inside = 0
    order: list[int] = []

    async def worker(i: int) -> None:
        nonlocal inside, max_inside
        async with limiter.slot():
            order.append(i)
            inside += 1
            max_inside = max(max_inside, inside)
            await gate.wait()
            for _ in range(3):
                await anyio.lowlevel.checkpoint()
            inside -= 1

    async with anyio.create_task_group() as tg:
        for i in range(40):
            tg.start_soon(worker, i)
        await until(lambda: limiter.statistics().waiting == 37)
        stats = limiter.statistics()
        assert (stats.in_flight, stats.waiting) == (3, 37)
        gate.set()
    assert max_inside == 3
    assert order == list(range(40))
    stats = limiter.statistics()
    assert (stats.in_flight, stats.waiting, stats.total_acquired) == (0, 0, 40)
    assert stats.total_waits == 37


async def test_concurrency_and_rate_together() -> None:
    clock = AutoClock()
    limiter = SourceLimiter(RateLimit(100), max_concurrency=2, clock=clock, sleep=clock.sleep)
    inside = 0
    max_inside = 0
    grants: list[float] = []

    async def worker() -> None:
        nonlocal inside, max_inside
        async with limiter.slot():
            grants.append(clock.now)
            inside += 1
            max_inside = max(max_inside, inside)
            await settle(3)
            inside -= 1

    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(worker)
    assert max_inside <= 2
    gaps = [b - a for a, b in itertools.pairwise(grants)]
    assert min(gaps) >= 0.01 - 1e-9
    assert limiter.statistics().in_flight == 0


async def test_unlimited_limiter_is_a_near_no_op() -> None:
    clock = AutoClock()
    limiter = SourceLimiter(clock=clock, sleep=clock.sleep)
    async with limiter.slot(), limiter.slot(), limiter.slot():
        assert limiter.statistics().in_flight == 3
    clock.calls = 0
    for _ in range(100):
        async with limiter.slot():
            pass
    assert clock.calls == 0  # the fast path does not even read the clock
    assert clock.sleeps == []
    stats = limiter.statistics()
    assert stats == LimiterStatistics(
        waiting=0,
        in_flight=0,
        tokens=math.inf,
        total_acquired=103,
        total_waits=0,
        cooldown_remaining=0.0,
    )


async def test_slot_released_when_body_raises() -> None:
    limiter = SourceLimiter(max_concurrency=1)
    with pytest.raises(RuntimeError):
        async with limiter.slot():
            raise RuntimeError("boom")
    assert limiter.statistics().in_flight == 0
    async with limiter.slot():
        pass


# -- cooldown -------------------------------------------------------------------------------


async def test_cooldown_pauses_everyone() -> None:
    clock = AutoClock()
    limiter = SourceLimiter(RateLimit(100, burst=10), clock=clock, sleep=clock.sleep)
    limiter.cooldown(5)
    assert limiter.statistics().cooldown_remaining == pytest.approx(5)
    grants: list[float] = []

    async def worker() -> None:
        async with limiter.slot():
            grants.append(clock.now)

    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(worker)
    assert grants == pytest.approx([5.0] * 4)  # burst budget is still there after the pause
    assert limiter.statistics().cooldown_remaining == 0


async def test_cooldown_without_rate_limit() -> None:
    clock = AutoClock()
    limiter = SourceLimiter(clock=clock, sleep=clock.sleep)
    limiter.cooldown(2)
    async with limiter.slot():
        assert clock.now == pytest.approx(2)
    async with limiter.slot():
        assert clock.now == pytest.approx(2)


async def test_cooldown_extends_but_never_shortens() -> None:
    clock = ManualClock()
    limiter = SourceLimiter(clock=clock, sleep=clock.sleep)
    limiter.cooldown(5)
    limiter.cooldown(2)
    assert limiter.statistics().cooldown_remaining == pytest.approx(5)
    clock.advance(1)
    limiter.cooldown(3)  # ends at 4 < 5: ignored
    assert limiter.statistics().cooldown_remaining == pytest.approx(4)
    limiter.cooldown(7)  # ends at 8: extends
    assert limiter.statistics().cooldown_remaining == pytest.approx(7)
    assert "cooldown=7.00s" in repr(limiter)


async def test_cooldown_set_while_waiting_is_respected() -> None:
    clock = ManualClock()
    limiter = SourceLimiter(RateLimit(1), clock=clock, sleep=clock.sleep)
    granted: list[float] = []

    async def worker() -> None:
        async with limiter.slot():
            granted.append(clock.now)

    async with anyio.create_task_group() as tg:
        tg.start_soon(worker)  # takes the only token at t=0
        tg.start_soon(worker)  # waits for t=1
        tg.start_soon(worker)  # queued behind it
        await until(lambda: clock.sleeping == 1 and len(granted) == 1)
        limiter.cooldown(10)  # e.g. a 429 arrived: pause until t=10
        clock.advance(1)
        await settle()
        assert granted == [0.0]  # the sleeper woke at t=1 but respects the cooldown
        assert limiter.statistics().waiting == 2
        clock.advance(9)
        await until(lambda: len(granted) == 2 and clock.sleeping == 1)
        assert granted[1] == pytest.approx(10)
        clock.advance(1)
    assert granted == pytest.approx([0, 10, 11])


# -- cancellation ---------------------------------------------------------------------------


async def test_cancelled_concurrency_waiter_releases_its_place() -> None:
    limiter = SourceLimiter(max_concurrency=1)
    release = anyio.Event()
    entered: list[str] = []

    async def holder() -> None:
        async with limiter.slot():
            entered.append("holder")
            await release.wait()

    async def waiter(name: str, scope: anyio.CancelScope | None = None) -> None:
        with scope or anyio.CancelScope():
            async with limiter.slot():
                entered.append(name)

    doomed = anyio.CancelScope()
    async with anyio.create_task_group() as tg:
        tg.start_soon(holder)
        await until(lambda: entered == ["holder"])
        tg.start_soon(waiter, "doomed", doomed)
        tg.start_soon(waiter, "next")
        await until(lambda: limiter.statistics().waiting == 2)
        doomed.cancel()
        await until(lambda: limiter.statistics().waiting == 1)
        release.set()
    assert entered == ["holder", "next"]
    stats = limiter.statistics()
    assert (stats.in_flight, stats.waiting, stats.total_acquired) == (0, 0, 2)


async def test_woken_head_cancelled_before_it_runs_passes_the_turn_on() -> None:
    # anyio defers a cancel scope's delivery while the task's wake-up is pending, so use a raw
    # asyncio cancel (the backend we run on) to hit the window: handed the slot, cancelled before
    # resuming. The slot must go to the next waiter, not be lost.
    limiter = SourceLimiter(max_concurrency=1)
    release = anyio.Event()
    entered: list[str] = []
    tasks: dict[str, asyncio.Task[None]] = {}

    async def holder() -> None:
        async with limiter.slot():
            entered.append("holder")
            await release.wait()
        assert limiter.statistics().waiting == 3
        tasks["a"].cancel()  # same step as the release: "a" was handed the turn, has not run

    async def waiter(name: str) -> None:
        async with limiter.slot():
            entered.append(name)

    async with anyio.create_task_group() as tg:
        tg.start_soon(holder)
        await until(lambda: entered == ["holder"])
        for name in "abc":
            tasks[name] = asyncio.ensure_future(waiter(name))
        await until(lambda: limiter.statistics().waiting == 3)
        release.set()
    results = await asyncio.gather(*tasks.values(), return_exceptions=True)
    assert isinstance(results[0], asyncio.CancelledError)
    assert entered == ["holder", "b", "c"]
    stats = limiter.statistics()
    assert (stats.in_flight, stats.waiting, stats.total_acquired) == (0, 0, 3)


async def test_cancelled_rate_waiter_gives_back_its_reservation() -> None:
    clock = ManualClock()
    limiter = SourceLimiter(RateLimit(1), clock=clock, sleep=clock.sleep)
    granted: list[tuple[str, float]] = []
    doomed = anyio.CancelScope()

    async def worker(name: str, scope: anyio.CancelScope | None = None) -> None:
        with scope or anyio.CancelScope():
            async with limiter.slot():
                granted.append((name, clock.now))

    async with anyio.create_task_group() as tg:
        tg.start_soon(worker, "first")
        await until(lambda: len(granted) == 1)
        tg.start_soon(worker, "doomed", doomed)  # sleeps until t=1
        tg.start_soon(worker, "next")  # queued behind it
        await until(lambda: clock.sleeping == 1 and limiter.statistics().waiting == 2)
        doomed.cancel()
        await until(lambda: limiter.statistics().waiting == 1 and clock.sleeping == 1)
        clock.advance(1)
    # "next" takes the t=1 slot the cancelled waiter never used, not t=2.
    assert granted == [("first", 0.0), ("next", 1.0)]
    stats = limiter.statistics()
    assert (stats.in_flight, stats.waiting, stats.total_acquired) == (0, 0, 2)
    clock.advance(1)
    assert limiter.statistics().tokens == pytest.approx(1)


async def test_mass_cancellation_leaks_nothing() -> None:
    clock = ManualClock()
    limiter = SourceLimiter(RateLimit(1), max_concurrency=2, clock=clock, sleep=clock.sleep)
    async with anyio.create_task_group() as tg:
        for _ in range(50):
            tg.start_soon(_enter_once, limiter)
        await until(lambda: limiter.statistics().waiting == 49)
        tg.cancel_scope.cancel()
    stats = limiter.statistics()
    assert (stats.in_flight, stats.waiting, stats.total_acquired) == (0, 0, 1)
    # The limiter still works, on schedule: the next token is due at t=1.
    clock.advance(1)
    async with limiter.slot():
        assert clock.now == 1.0


async def _enter_once(limiter: SourceLimiter) -> None:
    async with limiter.slot():
        await anyio.sleep_forever()


# -- statistics and repr --------------------------------------------------------------------


async def test_statistics_and_repr() -> None:
    clock = ManualClock()
    limiter = SourceLimiter(
        RateLimit(10, burst=2), max_concurrency=8, clock=clock, sleep=clock.sleep
    )
    assert repr(limiter) == (
        "<SourceLimiter rate=10/1.0s burst=2 max_concurrency=8 in_flight=0 waiting=0 tokens=2.00>"
    )
    assert limiter.rate_limit == RateLimit(10, burst=2)
    assert limiter.max_concurrency == 8
    release = anyio.Event()

    async def worker() -> None:
        async with limiter.slot():
            await release.wait()

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(worker)
        await until(lambda: limiter.statistics().waiting == 1 and clock.sleeping == 1)
        stats = limiter.statistics()
        assert stats == LimiterStatistics(
            waiting=1,
            in_flight=2,
            tokens=0.0,
            total_acquired=2,
            total_waits=0,
            cooldown_remaining=0.0,
        )
        assert "in_flight=2 waiting=1 tokens=0.00" in repr(limiter)
        clock.advance(0.1)
        await until(lambda: limiter.statistics().in_flight == 3)
        release.set()
    stats = limiter.statistics()
    assert (stats.total_acquired, stats.total_waits, stats.in_flight) == (3, 1, 0)


def test_repr_unlimited() -> None:
    assert repr(SourceLimiter()) == (
        "<SourceLimiter rate=None max_concurrency=None in_flight=0 waiting=0 tokens=inf>"
    )


async def test_default_clock_and_sleep() -> None:
    # Real time, but no assertion on durations: only that the default wiring works.
    limiter = SourceLimiter(RateLimit(1000, burst=2), max_concurrency=2)
    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(_enter_and_leave, limiter)
    assert limiter.statistics().total_acquired == 5


async def _enter_and_leave(limiter: SourceLimiter) -> None:
    async with limiter.slot():
        await anyio.lowlevel.checkpoint()


async def test_waiter_blocked_on_concurrency_gets_no_stale_rate_budget() -> None:
    # While every slot was busy the rate budget was not usable; once a slot frees, the waiters
    # must still be spaced by the emission interval (burst=1), not released back to back.
    clock = ManualClock()
    limiter = SourceLimiter(RateLimit(10), max_concurrency=1, clock=clock, sleep=clock.sleep)
    release = anyio.Event()
    granted: list[tuple[str, float]] = []

    async def worker(name: str) -> None:
        async with limiter.slot():
            granted.append((name, clock.now))
            if name == "holder":
                await release.wait()

    async with anyio.create_task_group() as tg:
        tg.start_soon(worker, "holder")
        await until(lambda: len(granted) == 1)
        tg.start_soon(worker, "a")
        tg.start_soon(worker, "b")
        await until(lambda: limiter.statistics().waiting == 2)
        clock.advance(5)
        release.set()
        await until(lambda: len(granted) == 2 and clock.sleeping == 1)
        clock.advance(0.1)
    assert granted == [("holder", 0.0), ("a", 5.0), ("b", pytest.approx(5.1))]


async def test_cooldown_holds_back_callers_queued_for_concurrency() -> None:
    clock = ManualClock()
    limiter = SourceLimiter(max_concurrency=1, clock=clock, sleep=clock.sleep)
    release = anyio.Event()
    granted: list[tuple[str, float]] = []

    async def worker(name: str) -> None:
        async with limiter.slot():
            granted.append((name, clock.now))
            if name == "holder":
                await release.wait()

    async with anyio.create_task_group() as tg:
        tg.start_soon(worker, "holder")
        await until(lambda: len(granted) == 1)
        tg.start_soon(worker, "a")
        await until(lambda: limiter.statistics().waiting == 1)
        limiter.cooldown(3)  # e.g. the holder just saw a 429 with Retry-After: 3
        release.set()
        await until(lambda: clock.sleeping == 1)
        assert granted == [("holder", 0.0)]
        clock.advance(3)
    assert granted == [("holder", 0.0), ("a", 3.0)]
