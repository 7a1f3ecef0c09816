"""The clock everything that waits is given: ``SystemClock`` and the tests' ``FakeClock``."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta, timezone

import anyio
import anyio.lowlevel
import pytest

from mxm_dataio_async._clock import SYSTEM_CLOCK, Clock, SystemClock
from mxm_dataio_async.testing import FakeClock

pytestmark = pytest.mark.anyio

START = datetime(2026, 1, 1, tzinfo=UTC)


async def _sleep_and_log(clock: FakeClock, seconds: float, log: list[str], name: str) -> None:
    await clock.sleep(seconds)
    log.append(name)


# -- FakeClock: construction ------------------------------------------------------------------


def test_fake_clock_defaults() -> None:
    clock = FakeClock()
    assert clock.now() == START
    assert clock.monotonic() == 0.0
    assert clock.auto_advance is True
    assert clock.sleeps == []
    assert repr(clock) == "FakeClock(now=2026-01-01T00:00:00+00:00, monotonic=0)"


def test_fake_clock_start_and_monotonic_origin() -> None:
    start = datetime(2030, 6, 1, 12, tzinfo=timezone(timedelta(hours=2)))
    clock = FakeClock(start, monotonic=1000.0)
    assert clock.now() == start
    assert clock.monotonic() == 1000.0
    clock.advance(2.5)
    assert clock.now() == start + timedelta(seconds=2.5)
    assert clock.monotonic() == 1002.5


def test_naive_start_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        FakeClock(datetime(2026, 1, 1))


def test_both_clocks_are_clocks() -> None:
    assert isinstance(FakeClock(), Clock)
    assert isinstance(SYSTEM_CLOCK, Clock)


# -- FakeClock: auto-advance ------------------------------------------------------------------


async def test_auto_advance_jumps_time_and_records_the_sleep() -> None:
    clock = FakeClock()
    with anyio.fail_after(10):  # a safety net: the sleeps below must not really wait
        await clock.sleep(30)
        await clock.sleep(3600)
    assert clock.sleeps == [30, 3600]
    assert clock.monotonic() == 3630.0
    assert clock.now() == START + timedelta(seconds=3630)


async def test_zero_and_negative_sleeps_do_not_move_time() -> None:
    clock = FakeClock(monotonic=5.0)
    await clock.sleep(0)
    await clock.sleep(-10)
    assert clock.sleeps == [0, -10]
    assert clock.monotonic() == 5.0
    assert clock.now() == START


async def test_time_never_goes_backwards() -> None:
    clock = FakeClock()
    readings = [(clock.monotonic(), clock.now())]
    for step in [1.0, 0.0, -5.0, 0.25, 100.0, -0.5, 3.0]:
        await clock.sleep(step)
        readings.append((clock.monotonic(), clock.now()))
        if step >= 0:
            clock.advance(step)
            readings.append((clock.monotonic(), clock.now()))
    assert readings == sorted(readings)
    assert readings[-1][0] == 2 * (1.0 + 0.25 + 100.0 + 3.0)


async def test_auto_advance_sleepers_each_advance_from_the_current_time() -> None:
    clock = FakeClock()
    log: list[str] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(_sleep_and_log, clock, 10, log, "ten")
        tg.start_soon(_sleep_and_log, clock, 5, log, "five")
    assert sorted(log) == ["five", "ten"]
    assert sorted(clock.sleeps) == [5, 10]
    assert clock.monotonic() == 15.0  # each sleep is counted from when it started


async def test_an_auto_advancing_sleep_wakes_the_parked_sleepers_it_passes() -> None:
    clock = FakeClock(auto_advance=False)
    log: list[str] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(_sleep_and_log, clock, 5, log, "parked")
        await anyio.wait_all_tasks_blocked()
        assert log == []
        clock.auto_advance = True
        await clock.sleep(10)  # jumps to 10: the sleeper due at 5 is woken on the way
    assert log == ["parked"]
    assert clock.monotonic() == 10.0


# -- FakeClock: manual advance ----------------------------------------------------------------


async def test_manual_sleepers_wait_for_advance_and_wake_in_order() -> None:
    clock = FakeClock(auto_advance=False)
    log: list[str] = []
    async with anyio.create_task_group() as tg:
        for seconds, name in [(3, "three"), (1, "one"), (2, "two"), (2, "two again")]:
            tg.start_soon(_sleep_and_log, clock, seconds, log, name)
        await anyio.wait_all_tasks_blocked()
        assert log == []  # time does not pass on its own
        assert clock.monotonic() == 0.0
        assert sorted(clock.sleeps) == [1, 2, 2, 3]
        clock.advance(1.5)
        await anyio.wait_all_tasks_blocked()
        assert log == ["one"]
        clock.advance(0.5)  # exactly due counts as due
        await anyio.wait_all_tasks_blocked()
        assert log == ["one", "two", "two again"]  # equal wake-up times: first come, first woken
        clock.advance(10)
    assert log == ["one", "two", "two again", "three"]
    assert clock.monotonic() == 12.0


async def test_one_big_advance_wakes_sleepers_in_wake_up_order() -> None:
    clock = FakeClock(auto_advance=False)
    log: list[str] = []
    async with anyio.create_task_group() as tg:
        for seconds in [30, 10, 20]:
            tg.start_soon(_sleep_and_log, clock, seconds, log, str(seconds))
        await anyio.wait_all_tasks_blocked()
        clock.advance(100)
    assert log == ["10", "20", "30"]


async def test_a_sleep_starting_later_is_counted_from_then() -> None:
    clock = FakeClock(auto_advance=False)
    clock.advance(50)
    log: list[str] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(_sleep_and_log, clock, 10, log, "late")
        await anyio.wait_all_tasks_blocked()
        clock.advance(9)
        await anyio.wait_all_tasks_blocked()
        assert log == []  # due at 60, not at 10
        clock.advance(1)
    assert log == ["late"]


async def test_a_parked_sleeper_can_be_cancelled() -> None:
    clock = FakeClock(auto_advance=False)
    log: list[str] = []
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_sleep_and_log, clock, 5, log, "cancelled")
            await anyio.wait_all_tasks_blocked()
            scope.cancel()
    assert scope.cancelled_caught
    clock.advance(10)  # waking a sleeper that is gone is harmless
    await anyio.lowlevel.checkpoint()
    assert log == []


def test_negative_advance_is_refused() -> None:
    clock = FakeClock()
    clock.advance(3)
    with pytest.raises(ValueError, match="only moves forward"):
        clock.advance(-1)
    assert clock.monotonic() == 3.0
    assert clock.now() == START + timedelta(seconds=3)


# -- SystemClock ------------------------------------------------------------------------------


def test_system_clock_now_is_aware_utc_wall_time() -> None:
    before = datetime.now(UTC)
    now = SYSTEM_CLOCK.now()
    after = datetime.now(UTC)
    assert now.tzinfo is UTC
    assert before <= now <= after


def test_system_clock_monotonic_is_time_monotonic() -> None:
    before = time.monotonic()
    reading = SystemClock().monotonic()
    after = time.monotonic()
    assert before <= reading <= after


async def test_system_clock_sleeps_for_real() -> None:
    clock = SystemClock()
    started = clock.monotonic()
    await clock.sleep(0)
    await clock.sleep(0.01)
    assert clock.monotonic() - started >= 0.01  # a lower bound only


def test_system_clock_is_one_stateless_object() -> None:
    assert isinstance(SYSTEM_CLOCK, SystemClock)
    assert repr(SYSTEM_CLOCK) == "SystemClock()"
    with pytest.raises(AttributeError):
        SYSTEM_CLOCK.offset = 5  # type: ignore[attr-defined]
