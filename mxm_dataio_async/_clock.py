"""Time as a parameter: one clock (wall time, monotonic time, sleep) for everything that waits.

The rate gate, retry waits, the cache policy's TTL decisions and leases all read the clock they
were given, never the time module directly, so a test can hand them a :class:`FakeClock` and run
an hour of Retry-After and lease expiry in no time at all. (aiolimiter's tests patch
``loop.time``; stamina has ``set_testing()``; here the clock is an argument.)
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Protocol, runtime_checkable

import anyio
import anyio.lowlevel

__all__ = ["SYSTEM_CLOCK", "Clock", "FakeClock", "SystemClock"]


@runtime_checkable
class Clock(Protocol):
    """Where time comes from: ``now()`` (aware UTC), ``monotonic()`` (seconds), ``sleep(s)``, and
    ``cancel_after(s)``: a cancel scope whose deadline is ``s`` seconds away on this clock (it
    bounds an attempt by the retry deadline)."""

    def now(self) -> datetime: ...

    def monotonic(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...

    def cancel_after(self, seconds: float) -> anyio.CancelScope: ...


class SystemClock:
    """The real clock: ``datetime.now(UTC)``, ``time.monotonic()`` and ``anyio.sleep``."""

    __slots__ = ()

    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(seconds)

    def cancel_after(self, seconds: float) -> anyio.CancelScope:
        return anyio.move_on_after(seconds)

    def __repr__(self) -> str:
        return "SystemClock()"


SYSTEM_CLOCK = SystemClock()
"""The process's real clock, the default everywhere a clock is taken."""


class FakeClock:
    """A clock for tests: time moves only when a sleeper needs it to, or when told to.

    With ``auto_advance=True`` (the default) a ``sleep(s)`` does not wait: the clock jumps ahead to
    the sleeper's wake-up time (never backwards), so a 30-second Retry-After or a lease's TTL pass
    in one loop iteration while every timestamp still shows them. With ``auto_advance=False``
    sleepers wait until :meth:`advance` moves the clock past their wake-up time. A scope from
    ``cancel_after(s)`` is cancelled when the clock passes its deadline, by either way::

        clock = FakeClock()
        registry = Registry(clock=clock)
        ...                                  # a 429 with Retry-After: 30 is retried at once
        assert clock.monotonic() >= 30       # ...and 30 fake seconds have passed

    Auto-advance suits one thing waiting at a time. Where several tasks sleep while others wait
    for real I/O (concurrent cooldowns, a lease heartbeat beside a job), each sleep moves time for
    all of them: use ``auto_advance=False`` and move time with :meth:`advance`.
    """

    def __init__(
        self, start: datetime | None = None, *, monotonic: float = 0.0, auto_advance: bool = True
    ) -> None:
        if start is not None and start.tzinfo is None:
            raise ValueError("start must be timezone-aware (e.g. datetime(2026, 1, 1, tzinfo=UTC))")
        self._start = start if start is not None else datetime(2026, 1, 1, tzinfo=UTC)
        self._origin = monotonic
        self._elapsed = 0.0
        self.auto_advance = auto_advance
        self._due: list[tuple[float, int, Callable[[], object]]] = []  # wake-ups, by time
        self._order = itertools.count()
        self.sleeps: list[float] = []
        """Every sleep requested, in order (seconds): what a test asserts on."""

    def __repr__(self) -> str:
        return f"FakeClock(now={self.now().isoformat()}, monotonic={self.monotonic():g})"

    def now(self) -> datetime:
        return self._start + timedelta(seconds=self._elapsed)

    def monotonic(self) -> float:
        return self._origin + self._elapsed

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds`` and wake every sleeper whose time has come."""
        if seconds < 0:
            raise ValueError(f"time only moves forward; got {seconds!r} seconds")
        self._elapsed += seconds
        self._wake()

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        if seconds <= 0:
            await anyio.lowlevel.checkpoint()
            return
        until = self._elapsed + seconds
        if self.auto_advance:
            self._elapsed = max(self._elapsed, until)
            self._wake()
            await anyio.lowlevel.checkpoint()
            return
        event = anyio.Event()
        heapq.heappush(self._due, (until, next(self._order), event.set))
        await event.wait()

    def cancel_after(self, seconds: float) -> anyio.CancelScope:
        scope = anyio.CancelScope()
        if seconds <= 0:
            scope.cancel()
        else:
            heapq.heappush(self._due, (self._elapsed + seconds, next(self._order), scope.cancel))
        return scope

    def _wake(self) -> None:
        while self._due and self._due[0][0] <= self._elapsed:
            heapq.heappop(self._due)[2]()
