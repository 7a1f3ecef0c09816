"""Per-source admission control: concurrency, cooldown and rate, in that order.

Design decisions:

- The rate is a GCRA (the virtual-scheduling form of a token bucket). A theoretical arrival time
  (TAT) advances by the emission interval per grant and is computed from the schedule, never from
  the moment a sleeper actually woke up, so sleep overshoot does not accumulate: 1,000 requests/s
  sustained stays at 1,000/s.
- Waiters form one FIFO queue. Only its head looks at the clock (sleeps until its conformance time);
  the others park on an event until they are promoted. A waiter's slot on the schedule is computed
  from when it *arrived*, so a backlog catches up after a late wake-up instead of losing budget.
- Budget is spent only at the instant of a grant, synchronously, right before ``slot()`` enters its
  body. A waiter cancelled while parked or sleeping therefore never holds a token or a concurrency
  slot, and later waiters are not pushed back by it: cancellation cannot leak anything.
- The no-wait fast path allocates nothing and creates no task: a few comparisons, one clock read
  (none at all for a limiter without a rate that was never cooled down).
- An adaptive rate (``RateLimit(..., adaptive=True)``) is AIMD, as TCP's congestion window: the
  pipeline reports each 429/503 (``slow_down``: the rate times 0.9) and each success
  (``speed_up``: plus 1/40 of the ceiling per second's worth of successes, up to the ceiling).
  Only a refusal of a request sent *after* the last decrease lowers it again: the requests
  already on the wire when the first 429 came back say nothing new. The GCRA simply continues
  on the new interval.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Final, Protocol, runtime_checkable

import anyio

__all__ = [
    "LimiterStatistics",
    "RateGate",
    "RateLimit",
    "SourceLimiter",
    "check_max_concurrency",
    "cooldown_seconds",
]

_NEG_INF: Final = float("-inf")
_DECREASE: Final = 0.9  # AIMD: the rate after a 429/503, as a fraction of the rate before
_INCREASE: Final = 1 / 40  # AIMD: of the ceiling, per second's worth of successes
_FLOOR: Final = 1 / 100  # AIMD: never below this fraction of the ceiling


def _finite_number(name: str, value: object) -> float:
    # bool is an int subclass; RateLimit(True) is a mistake, not "one request".
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}: {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return number


def check_max_concurrency(value: int | None) -> int | None:
    """``value`` if it is a valid concurrency cap (an int >= 1, or ``None`` for unlimited)."""
    if value is not None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(
                f"max_concurrency must be an int or None, got {type(value).__name__}: {value!r}"
            )
        if value < 1:
            raise ValueError(f"max_concurrency must be >= 1 (or None for unlimited), got {value}")
    return value


def cooldown_seconds(seconds: float) -> float:
    """``seconds`` as a valid cooldown length (a finite number >= 0)."""
    delay = _finite_number("seconds", seconds)
    if delay < 0:
        raise ValueError(f"cooldown seconds must be >= 0, got {seconds!r}")
    return delay


@dataclass(frozen=True, slots=True)
class RateLimit:
    """Allow ``rate`` requests per ``per`` seconds, with up to ``burst`` at once after idle.

    ``RateLimit(10)`` is 10 requests/s spaced 0.1 s apart; ``RateLimit(100, per=60, burst=5)`` lets
    5 go at once, then one every 0.6 s.
    """

    rate: float
    per: float = 1.0
    burst: int = 1
    adaptive: bool = False
    """Treat ``rate`` as a ceiling: a 429 or 503 lowers the source's rate multiplicatively,
    successes raise it back additively (AIMD), so it settles near what the upstream allows
    instead of pausing the whole source after each refusal (see ``SourceLimiter``)."""

    def __post_init__(self) -> None:
        rate = _finite_number("rate", self.rate)
        if rate <= 0:
            raise ValueError(f"rate must be > 0 requests per {self.per!r}s, got {self.rate!r}")
        per = _finite_number("per", self.per)
        if per <= 0:
            raise ValueError(f"per must be > 0 seconds, got {self.per!r}")
        if isinstance(self.burst, bool) or not isinstance(self.burst, int):
            raise TypeError(
                f"burst must be an int, got {type(self.burst).__name__}: {self.burst!r}"
            )
        if self.burst < 1:
            raise ValueError(f"burst must be >= 1, got {self.burst!r}")
        if not isinstance(self.adaptive, bool):
            raise TypeError(f"adaptive must be True or False, got {self.adaptive!r}")

    @property
    def interval(self) -> float:
        """Seconds between two grants at the sustained rate (the emission interval)."""
        return self.per / self.rate


@dataclass(frozen=True, slots=True)
class LimiterStatistics:
    """A snapshot of a :class:`SourceLimiter`."""

    waiting: int
    """Callers currently waiting for a slot."""
    in_flight: int
    """Slots currently held."""
    tokens: float
    """Rate tokens available now (at most ``burst``); ``inf`` without a rate limit."""
    total_acquired: int
    """Slots granted so far."""
    total_waits: int
    """Grants that had to wait (for concurrency, a cooldown or the rate)."""
    cooldown_remaining: float
    """Seconds until the current cooldown ends (0 if none)."""
    rate: float | None = field(default=None, compare=False)
    """The rate in force (requests per ``per`` seconds; below the configured one while an
    adaptive limit is backing off); ``None`` without a rate limit."""


@runtime_checkable
class RateGate(Protocol):
    """What the pipeline needs of a source's admission control: a slot per real upstream attempt,
    a source-wide pause after a Retry-After, and a snapshot for monitoring.

    :class:`SourceLimiter` is the in-process gate; a gate shared between processes (Redis)
    implements the same three methods and is passed to ``Registry.register(gate=...)``.
    """

    def slot(self) -> AbstractAsyncContextManager[None]: ...

    def cooldown(self, seconds: float) -> None: ...

    def statistics(self) -> LimiterStatistics: ...


class _Waiter:
    __slots__ = ("arrival", "done", "event")

    def __init__(self, arrival: float) -> None:
        self.arrival = arrival
        self.done = False
        self.event: anyio.Event | None = None

    async def park(self) -> None:
        # A fresh event per wait: wake-ups are hints, the caller re-checks its conditions, and a
        # set() on an old event (e.g. while this waiter was sleeping) must not be remembered.
        event = self.event = anyio.Event()
        await event.wait()


class _Slot:
    """The reusable context manager behind ``SourceLimiter.slot()``: it holds no per-use state."""

    __slots__ = ("_limiter",)

    def __init__(self, limiter: SourceLimiter) -> None:
        self._limiter = limiter

    async def __aenter__(self) -> None:
        lim = self._limiter
        # Fast path: nobody queued (FIFO), a free concurrency slot, no cooldown, a rate token.
        if not lim._waiting and (lim._max is None or lim._in_flight < lim._max):
            interval = lim._interval
            if interval is None and lim._cooldown_until == _NEG_INF:
                lim._in_flight += 1
                lim._total_acquired += 1
                return
            now = lim._clock()
            if now >= lim._cooldown_until:
                if interval is None:
                    lim._in_flight += 1
                    lim._total_acquired += 1
                    return
                tat = lim._tat
                if now >= tat - lim._tau:
                    lim._tat = (tat if tat > now else now) + interval
                    lim._in_flight += 1
                    lim._total_acquired += 1
                    return
        await lim._acquire_slow()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._limiter._release()


class SourceLimiter:
    """Admission control for one source: max concurrency, then cooldown, then rate.

    Wrap each real upstream attempt (never a cache hit) in ``slot()``::

        limiter = SourceLimiter(RateLimit(10, burst=2), max_concurrency=8)
        async with limiter.slot():
            result = await adapter.fetch(request)

    Waiters are served first come, first served. ``cooldown(s)`` pauses the whole source (e.g. after
    a 429 with Retry-After). ``clock`` and ``sleep`` are injectable for deterministic tests.
    Cancelling a waiter is always safe: it gives back everything it was waiting for.
    """

    __slots__ = (
        "_capacity_at",
        "_clock",
        "_cooldown_until",
        "_decreased_at",
        "_in_flight",
        "_interval",
        "_max",
        "_queue",
        "_rate",
        "_rate_limit",
        "_sleep",
        "_slot",
        "_tat",
        "_tau",
        "_total_acquired",
        "_total_waits",
        "_waiting",
    )

    def __init__(
        self,
        rate_limit: RateLimit | None = None,
        max_concurrency: int | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    ) -> None:
        if rate_limit is not None and not isinstance(rate_limit, RateLimit):
            raise TypeError(
                f"rate_limit must be a RateLimit or None, got {type(rate_limit).__name__}"
            )
        check_max_concurrency(max_concurrency)
        self._rate_limit = rate_limit
        self._interval: float | None = None if rate_limit is None else rate_limit.interval
        # GCRA burst tolerance: how far ahead of the schedule a grant may be.
        self._tau = 0.0 if rate_limit is None else (rate_limit.burst - 1) * rate_limit.interval
        self._tat = _NEG_INF
        self._max = max_concurrency
        self._in_flight = 0
        self._waiting = 0
        self._queue: deque[_Waiter] = deque()
        self._cooldown_until = _NEG_INF
        # When a full limiter last got a free slot: a waiter that was blocked on concurrency only
        # becomes eligible for the rate then, so it must not claim rate budget from before.
        self._capacity_at = _NEG_INF
        self._total_acquired = 0
        self._total_waits = 0
        self._clock = clock
        self._sleep = sleep
        self._slot = _Slot(self)
        self._rate = None if rate_limit is None else float(rate_limit.rate)  # now (adaptive)
        self._decreased_at = _NEG_INF

    @property
    def rate_limit(self) -> RateLimit | None:
        """The configured rate limit (``None``: unlimited)."""
        return self._rate_limit

    @property
    def max_concurrency(self) -> int | None:
        """The configured concurrency cap (``None``: unlimited)."""
        return self._max

    @property
    def adaptive(self) -> bool:
        """Whether the rate adapts to 429/503 answers (``RateLimit(adaptive=True)``)."""
        return self._rate_limit is not None and self._rate_limit.adaptive

    @property
    def rate(self) -> float | None:
        """The rate in force, requests per ``rate_limit.per`` seconds (``None``: unlimited)."""
        return self._rate

    def slot(self) -> AbstractAsyncContextManager[None]:
        """An async context manager holding one slot for one real upstream attempt."""
        return self._slot

    def slow_down(self, sent_at: float | None = None) -> tuple[float, float] | None:
        """An adaptive limit's answer to a 429/503: the rate times 0.9 (not below 1% of the
        ceiling). ``sent_at`` (on this limiter's clock) is when the refused attempt was let
        through: one sent before the last decrease does not lower the rate again. Returns
        ``(before, after)`` when the rate changed."""
        rl, before = self._rate_limit, self._rate
        if rl is None or before is None or not rl.adaptive:
            return None
        if sent_at is not None and sent_at < self._decreased_at:
            return None
        self._decreased_at = self._clock()
        after = max(before * _DECREASE, rl.rate * _FLOOR)
        if after == before:
            return None
        self._set_rate(rl, after)
        return before, after

    def speed_up(self) -> None:
        """An adaptive limit's answer to a success: additive increase toward the ceiling."""
        rl, rate = self._rate_limit, self._rate
        if rl is None or rate is None or rate >= rl.rate:
            return
        # rl.rate * _INCREASE per second; at `rate` per `per` seconds that is this per success.
        self._set_rate(rl, min(rl.rate, rate + rl.rate * _INCREASE * rl.per / rate))

    def _set_rate(self, rl: RateLimit, rate: float) -> None:
        self._rate = rate
        self._interval = interval = rl.per / rate
        self._tau = (rl.burst - 1) * interval

    def cooldown(self, seconds: float) -> None:
        """Grant no new slot for ``seconds`` from now; extends, never shortens, a current cooldown.

        Slots already held are unaffected. Callers waiting now respect the new cooldown.
        """
        until = self._clock() + cooldown_seconds(seconds)
        if until > self._cooldown_until:
            self._cooldown_until = until

    def statistics(self) -> LimiterStatistics:
        """A snapshot of the limiter's counters."""
        now = self._clock()
        return LimiterStatistics(
            waiting=self._waiting,
            in_flight=self._in_flight,
            tokens=self._tokens(now),
            total_acquired=self._total_acquired,
            total_waits=self._total_waits,
            cooldown_remaining=max(0.0, self._cooldown_until - now),
            rate=self._rate,
        )

    def __repr__(self) -> str:
        rl = self._rate_limit
        rate = "None" if rl is None else f"{rl.rate:g}/{float(rl.per)}s burst={rl.burst}"
        if rl is not None and rl.adaptive:
            rate += f" adaptive (now {self._rate:.3g})"
        now = self._clock()
        cooldown = self._cooldown_until - now
        extra = f" cooldown={cooldown:.2f}s" if cooldown > 0 else ""
        return (
            f"<SourceLimiter rate={rate} max_concurrency={self._max} in_flight={self._in_flight}"
            f" waiting={self._waiting} tokens={self._tokens(now):.2f}{extra}>"
        )

    # -- internals -------------------------------------------------------------------------

    def _tokens(self, now: float) -> float:
        rl = self._rate_limit
        if rl is None or self._interval is None:
            return math.inf
        # Each emission interval the TAT lies ahead of now is one token already spent.
        ahead = self._tat - now
        if ahead <= 0:
            return float(rl.burst)
        return max(0.0, rl.burst - ahead / self._interval)

    def _head(self) -> _Waiter | None:
        # Cancelled waiters are only marked done (O(1)); drop them lazily from the front.
        queue = self._queue
        while queue:
            waiter = queue[0]
            if not waiter.done:
                return waiter
            queue.popleft()
        return None

    def _wake_head(self) -> None:
        if self._max is not None and self._in_flight >= self._max:
            return  # the next _release() wakes it; waking it now would only make it park again
        head = self._head()
        if head is not None and head.event is not None:
            head.event.set()

    def _release(self) -> None:
        self._in_flight -= 1
        if self._waiting and self._max is not None:
            if self._in_flight + 1 == self._max:
                self._capacity_at = self._clock()
            self._wake_head()

    async def _acquire_slow(self) -> None:
        waiter = _Waiter(self._clock())
        self._queue.append(waiter)
        self._waiting += 1
        slept_until: float | None = None
        try:
            while True:
                if self._head() is not waiter or (
                    self._max is not None and self._in_flight >= self._max
                ):
                    await waiter.park()
                    continue
                # The earliest instant this waiter conforms: not before it arrived (or got a free
                # slot), not before the cooldown ends, not before the GCRA schedule allows.
                at = max(
                    waiter.arrival,
                    self._capacity_at,
                    self._tat - self._tau,
                    self._cooldown_until,
                )
                # Having slept until exactly this instant counts as reaching it, even if the clock
                # reads a hair earlier (timer granularity): no second, tiny sleep.
                if at != slept_until:
                    now = self._clock()
                    if now < at:
                        await self._sleep(at - now)
                        slept_until = at
                        continue
                # Grant. Schedule arithmetic uses `at`, not the wake-up time: no drift.
                if self._interval is not None:
                    self._tat = max(self._tat, at) + self._interval
                self._in_flight += 1
                self._total_acquired += 1
                self._total_waits += 1
                return
        finally:
            was_head = self._head() is waiter
            waiter.done = True
            self._waiting -= 1
            if was_head:
                self._wake_head()
