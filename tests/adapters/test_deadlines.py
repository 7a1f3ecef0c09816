"""One timer for the deadlines of every attempt in flight (``adapters/_deadlines.py``)."""

from __future__ import annotations

import asyncio
import time

import pytest

from mxm_dataio_async.adapters._deadlines import Deadlines

pytestmark = pytest.mark.anyio


async def _wait(deadlines: Deadlines, deadline: float, out: list[str], name: str) -> None:
    watch = deadlines.watch(deadline)
    try:
        await asyncio.sleep(10)
    except asyncio.CancelledError as exc:
        if watch.timed_out(exc):
            out.append(f"{name} timed out")
            return
        out.append(f"{name} cancelled")
        raise
    finally:
        deadlines.forget(watch)


async def test_each_attempt_times_out_at_its_own_deadline_in_any_order() -> None:
    deadlines = Deadlines(asyncio.get_running_loop())
    now = time.monotonic()
    out: list[str] = []
    # Added latest first: the timer is armed again for each earlier deadline.
    late = asyncio.create_task(_wait(deadlines, now + 0.12, out, "late"))
    await asyncio.sleep(0)
    early = asyncio.create_task(_wait(deadlines, now + 0.04, out, "early"))
    await asyncio.sleep(0)
    assert len(deadlines) == 2
    await early
    assert out == ["early timed out"] and time.monotonic() - now >= 0.04
    assert not late.done()
    await late
    assert out == ["early timed out", "late timed out"] and time.monotonic() - now >= 0.12
    assert len(deadlines) == 0


async def test_a_cancellation_from_elsewhere_is_not_a_timeout() -> None:
    deadlines = Deadlines(asyncio.get_running_loop())
    out: list[str] = []
    task = asyncio.create_task(_wait(deadlines, time.monotonic() + 5, out, "a"))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert out == ["a cancelled"] and len(deadlines) == 0


async def test_a_watch_forgotten_in_time_is_never_cancelled() -> None:
    deadlines = Deadlines(asyncio.get_running_loop())
    watch = deadlines.watch(time.monotonic() + 0.02)
    deadlines.forget(watch)
    await asyncio.sleep(0.05)  # past the deadline: the timer fires and finds nothing to do
    assert not watch.expired
    await asyncio.sleep(0)  # no cancellation is pending for this task


async def test_watch_needs_a_task() -> None:
    loop = asyncio.get_running_loop()
    deadlines = Deadlines(loop)
    failures: list[BaseException] = []

    def outside() -> None:
        try:
            deadlines.watch(time.monotonic() + 1)
        except RuntimeError as exc:
            failures.append(exc)

    loop.call_soon(outside)
    await asyncio.sleep(0.01)
    assert len(failures) == 1 and "from a task" in str(failures[0])
