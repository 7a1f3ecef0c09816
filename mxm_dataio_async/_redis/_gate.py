"""A source's rate gate shared by every process: a GCRA in Redis, on Redis' clock.

Design decisions:

- One Lua script, one round trip per grant: it reads ``TIME`` (never a client's clock, so hosts
  whose clocks disagree still share one schedule), checks the source's cooldown, and *reserves*
  the next slot on the schedule: the theoretical arrival time (TAT) advances by the emission
  interval and the caller learns how long to wait for its slot. Nobody polls (``limits`` polls:
  8-23 commands per grant, measured).
- A cooldown (after a ``Retry-After``) is a key holding when it ends, which the script checks
  first: during one, nothing is reserved. A slot reserved before a cooldown was set would
  otherwise be used in the middle of it (measured: 32 grants within 0.32 s), so a waiter that
  slept for its slot asks Redis again after waking; a cooldown found then voids the slot.
- That second call is not extra: the same script confirms the slot held and reserves the next
  one, for the next waiter in this process. Under load every grant is one round trip, and the
  schedule always holds a reservation of every busy process, so no slot goes unused while a
  process moves from one grant to the next. The slot held for the next waiter is dropped when no
  waiter is left to use it (budget lost, never a grant too many).
- In a process, waiters queue first come, first served, and only the head of the queue talks to
  Redis: many local tasks never stampede Redis, and each process takes its turn on the shared
  schedule. ``max_concurrency`` is per process, applied before the queue.
- Keys expire: the TAT when it no longer constrains anything, the cooldown when it ends (each plus
  a minute of slack), so a source that goes quiet leaves nothing in Redis.
- Redis unreachable: fail closed (``CoordinationError``) by default; with
  ``on_unavailable="local"`` the gate grants from an in-process :class:`SourceLimiter` at
  ``local_share`` of the rate and asks Redis again every ``probe_interval`` seconds.
"""

from __future__ import annotations

import asyncio
import math
from types import TracebackType
from typing import Final

import anyio

from mxm_dataio_async._clock import SYSTEM_CLOCK, Clock, FakeClock
from mxm_dataio_async._limits import (
    LimiterStatistics,
    RateLimit,
    SourceLimiter,
    check_max_concurrency,
    cooldown_seconds,
)
from mxm_dataio_async._redis._client import RedisCoordination, RedisUnavailable, log

__all__ = ["RedisRateGate"]

_NEG_INF: Final = float("-inf")

# Times are integer microseconds. ARGV "now" is '' for Redis' own clock (always, in production);
# a number only for a gate on a FakeClock in one process's tests.
_NOW: Final = """
local now
if ARGV[1] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
else
  now = tonumber(ARGV[1])
end
"""

TAKE: Final = (
    _NOW
    + """
-- KEYS[1] the TAT, KEYS[2] the cooldown's end; ARGV[2] the emission interval (0: no rate),
-- ARGV[3] the burst tolerance, ARGV[4] '1' to reserve a slot, '0' to check the cooldown only.
-- Returns {cooling, wait, ahead}: cooling = 1: a cooldown runs for `wait` more, nothing
-- reserved; else (when asked) a slot reserved `wait` from now, the TAT now `ahead` of now.
local cool = tonumber(redis.call('GET', KEYS[2]) or '0')
if cool > now then return {1, cool - now, 0} end
local interval = tonumber(ARGV[2])
if interval <= 0 or ARGV[4] == '0' then return {0, 0, 0} end
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local wait = tat - tonumber(ARGV[3]) - now
if wait < 0 then wait = 0 end
tat = tat + interval
redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX',
  math.floor((tat - now) / 1000) + 60000)
return {0, wait, tat - now}
"""
)

COOL: Final = (
    _NOW
    + """
-- KEYS[1] the cooldown's end; ARGV[2] its length. Extends a cooldown, never shortens one.
local ends = now + tonumber(ARGV[2])
if ends > tonumber(redis.call('GET', KEYS[1]) or '0') then
  redis.call('SET', KEYS[1], string.format('%.0f', ends), 'PX',
    math.floor(tonumber(ARGV[2]) / 1000) + 60000)
end
return 1
"""
)


class _Slot:
    """The reusable context manager behind ``RedisRateGate.slot()``."""

    __slots__ = ("_gate",)

    def __init__(self, gate: RedisRateGate) -> None:
        self._gate = gate

    async def __aenter__(self) -> None:
        await self._gate._acquire()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._gate._release()


class RedisRateGate:
    """A source's rate gate shared by every process on the same Redis and prefix.

    A :class:`~mxm_dataio_async.store.RateGate`: ``Registry(redis=...)`` builds one for every
    source registered with a ``rate_limit`` or ``max_concurrency``; or pass one as
    ``register(..., gate=...)``::

        redis = RedisCoordination("redis://127.0.0.1:6379/0", prefix="prices")
        gate = RedisRateGate(redis, "yahoo", RateLimit(100, burst=5), max_concurrency=8)
        async with gate.slot():  # at most 100/s across every process, 8 at once in this one
            ...

    The rate and its cooldowns are global (on Redis' clock); ``max_concurrency`` is per process.
    ``cooldown(s)`` pauses the source in every process. Waits use ``clock``; on a
    :class:`~mxm_dataio_async.testing.FakeClock` the schedule runs on that clock instead of
    Redis' (``server_time=False``; for one process's tests only).
    """

    __slots__ = (
        "_clock",
        "_cooldown_until",
        "_coordination",
        "_down_until",
        "_fallback",
        "_head",
        "_held",
        "_in_flight",
        "_interval",
        "_keys",
        "_local",
        "_max",
        "_queued",
        "_rate_limit",
        "_reserved",
        "_seen_ahead",
        "_seen_at",
        "_server_time",
        "_slot",
        "_source",
        "_take_args",
        "_total_acquired",
        "_total_waits",
        "_waiting",
    )

    def __init__(
        self,
        coordination: RedisCoordination,
        source: str,
        rate_limit: RateLimit | None = None,
        max_concurrency: int | None = None,
        *,
        clock: Clock = SYSTEM_CLOCK,
        server_time: bool | None = None,
    ) -> None:
        if not isinstance(coordination, RedisCoordination):
            raise TypeError(
                f"coordination must be a RedisCoordination, got {type(coordination).__name__}"
            )
        if not isinstance(source, str) or not source:
            raise TypeError(f"source must be a non-empty str, got {source!r}")
        if rate_limit is not None and not isinstance(rate_limit, RateLimit):
            raise TypeError(
                f"rate_limit must be a RateLimit or None, got {type(rate_limit).__name__}"
            )
        self._max = check_max_concurrency(max_concurrency)
        self._local = (  # FIFO for the concurrency cap, which is per process
            None
            if max_concurrency is None
            else SourceLimiter(None, max_concurrency, clock=clock.monotonic, sleep=clock.sleep)
        )
        self._coordination = coordination
        self._source = source
        self._rate_limit = rate_limit
        self._clock = clock
        self._server_time = not isinstance(clock, FakeClock) if server_time is None else server_time
        self._interval = None if rate_limit is None else rate_limit.interval
        interval_us = 0.0 if rate_limit is None else rate_limit.interval * 1e6
        tau_us = 0.0 if rate_limit is None else (rate_limit.burst - 1) * interval_us
        self._take_args = (repr(interval_us), repr(tau_us))
        self._keys = (coordination.key("rate", source), coordination.key("cooldown", source))
        share = coordination.local_share
        self._fallback = (
            None
            if share is None
            else SourceLimiter(
                None
                if rate_limit is None
                else RateLimit(
                    rate_limit.rate * share,
                    per=rate_limit.per,
                    burst=max(1, math.floor(rate_limit.burst * share)),
                ),
                clock=clock.monotonic,
                sleep=clock.sleep,
            )
        )
        self._head = anyio.Lock()  # the one local waiter that talks to Redis
        self._queued = 0  # waiters past the concurrency cap: at the head, or queued for it
        self._reserved: float | None = None  # when the slot this process holds is due (local)
        self._cooldown_until = _NEG_INF  # this process's view: set here, or seen in Redis
        self._down_until = _NEG_INF  # Redis unreachable: the local fallback until then
        self._seen_ahead = 0.0  # how far the TAT lay ahead at the last grant, and when
        self._seen_at = _NEG_INF
        self._held = 0  # local concurrency slots held (granted or waiting on the rate)
        self._in_flight = 0
        self._waiting = 0
        self._total_acquired = 0
        self._total_waits = 0
        self._slot = _Slot(self)

    @property
    def source(self) -> str:
        return self._source

    @property
    def rate_limit(self) -> RateLimit | None:
        """The global rate limit (``None``: none, only cooldowns and the concurrency cap)."""
        return self._rate_limit

    @property
    def max_concurrency(self) -> int | None:
        """The concurrency cap of this process (``None``: unlimited)."""
        return self._max

    @property
    def degraded(self) -> bool:
        """Whether Redis was unreachable at the last try and grants come from the local share."""
        return self._down_until > self._clock.monotonic()

    def slot(self) -> _Slot:
        """An async context manager holding one slot for one real upstream attempt."""
        return self._slot

    def cooldown(self, seconds: float) -> None:
        """Grant no new slot for ``seconds`` from now, in this process at once and in every
        other one as soon as Redis has it (written in the background); extends, never shortens."""
        delay = cooldown_seconds(seconds)
        until = self._clock.monotonic() + delay
        if until > self._cooldown_until:
            self._cooldown_until = until
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # no loop: nothing can be waiting here, nor sent to Redis
            return
        self._coordination.spawn(self._share_cooldown(delay))

    def statistics(self) -> LimiterStatistics:
        """A snapshot: this process's waiters, slots and counters; ``tokens`` as Redis last
        reported them (the local share's while degraded); ``cooldown_remaining`` as known here."""
        now = self._clock.monotonic()
        return LimiterStatistics(
            waiting=self._waiting,
            in_flight=self._in_flight,
            tokens=self._tokens(now),
            total_acquired=self._total_acquired,
            total_waits=self._total_waits,
            cooldown_remaining=max(0.0, self._cooldown_until - now),
        )

    def __repr__(self) -> str:
        rl = self._rate_limit
        rate = "None" if rl is None else f"{rl.rate:g}/{float(rl.per)}s burst={rl.burst}"
        now = self._clock.monotonic()
        cooldown = self._cooldown_until - now
        extra = f" cooldown={cooldown:.2f}s" if cooldown > 0 else ""
        extra += " degraded" if self.degraded else ""
        return (
            f"<RedisRateGate {self._source!r} rate={rate} max_concurrency={self.max_concurrency}"
            f" in_flight={self._in_flight} waiting={self._waiting} on {self._coordination.server}"
            f"{extra}>"
        )

    # -- internals -------------------------------------------------------------------------

    async def _acquire(self) -> None:
        local, limit = self._local, self._max
        self._waiting += 1
        waited = False
        entered = False
        try:
            if local is not None and limit is not None:
                waited = self._held >= limit
                await local.slot().__aenter__()
                entered = True
                self._held += 1
            self._queued += 1
            try:
                async with self._head:
                    waited = await self._take() or waited
            finally:
                self._queued -= 1
                if not self._queued:
                    self._reserved = None  # nobody left to use the slot held for the next one
        except BaseException:
            if entered:
                await self._give_back()
            raise
        finally:
            self._waiting -= 1
        self._in_flight += 1
        self._total_acquired += 1
        self._total_waits += waited

    async def _release(self) -> None:
        self._in_flight -= 1
        if self._local is not None:
            await self._give_back()

    async def _give_back(self) -> None:
        assert self._local is not None
        self._held -= 1
        await self._local.slot().__aexit__(None, None, None)

    def _now(self) -> str:
        return "" if self._server_time else f"{self._clock.monotonic() * 1e6:.0f}"

    async def _take(self) -> bool:
        """Wait for a slot on the global schedule (the head of the local queue only); whether
        it had to wait."""
        clock = self._clock
        slept = False
        while True:
            now = clock.monotonic()
            if self._cooldown_until > now:
                self._reserved = None  # a cooldown voids the slot held
                await clock.sleep(self._cooldown_until - now)
                slept = True
                continue
            if self._down_until > now:
                return await self._take_local() or slept
            held = self._reserved
            if held is not None and held > now:
                await clock.sleep(held - now)
                slept = True
                continue
            # One round trip: no cooldown began (for a slot held), and a slot reserved: this
            # waiter's if it holds none, else the next local waiter's if one is queued.
            reserve = held is None or self._queued > 1
            try:
                cooling, wait_us, ahead_us = await self._coordination.run(
                    TAKE, self._keys, (self._now(), *self._take_args, "1" if reserve else "0")
                )
            except RedisUnavailable as exc:
                self._unavailable(exc)  # fail closed raises; with the fallback a slot held stands
                self._reserved = None
                if held is not None:
                    return slept
                continue
            self._available()
            now = clock.monotonic()
            wait = wait_us / 1e6
            if cooling:  # a cooldown set by some process: any slot held is void
                self._reserved = None
                self._cooldown_until = max(self._cooldown_until, now + wait)
                continue
            if reserve and self._interval is not None:
                self._seen_ahead, self._seen_at = ahead_us / 1e6, now
                self._reserved = now + wait
            else:
                self._reserved = None
            if held is None and self._reserved is not None and wait > 0:
                continue  # this waiter's slot, ahead: sleep until it, then confirm it
            if held is None:
                self._reserved = None  # this waiter's slot, due now: taken
            return slept

    async def _take_local(self) -> bool:
        fallback = self._fallback
        assert fallback is not None  # degraded only with a local share
        waits = fallback.statistics().total_waits
        async with fallback.slot():  # one token of the local share of the rate
            pass
        return fallback.statistics().total_waits > waits

    def _unavailable(self, exc: RedisUnavailable) -> None:
        if self._fallback is None:
            raise exc
        if self._down_until == _NEG_INF:
            log.warning(
                "source %r: %s; granting %g of its rate locally until Redis answers",
                self._source,
                exc,
                self._coordination.local_share,
            )
        self._down_until = self._clock.monotonic() + self._coordination.probe_interval

    def _available(self) -> None:
        if self._down_until != _NEG_INF:
            log.warning("source %r: %s answers again", self._source, self._coordination.server)
            self._down_until = _NEG_INF

    async def _share_cooldown(self, delay: float) -> None:
        try:
            await self._coordination.run(COOL, self._keys[1:], (self._now(), repr(delay * 1e6)))
        except Exception as exc:  # nobody awaits this: say so, and pause only this process
            log.warning(
                "source %r: a %gs cooldown could not reach Redis (%s); only this process pauses",
                self._source,
                delay,
                exc,
            )

    def _tokens(self, now: float) -> float:
        rl, interval = self._rate_limit, self._interval
        if rl is None or interval is None:
            return math.inf
        if self.degraded and self._fallback is not None:
            return self._fallback.statistics().tokens
        ahead = self._seen_ahead - (now - self._seen_at)
        if ahead <= 0:
            return float(rl.burst)
        return max(0.0, rl.burst - ahead / interval)
