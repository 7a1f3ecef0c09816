"""Coalescing across processes: one upstream call for identical requests in flight anywhere.

Design decisions:

- In-process first: this is the local :class:`Coalescer`, whose producer (one per key in this
  process) is wrapped in the cross-process claim. Duplicates within a process never touch Redis.
- A claim is a key set only if absent (in a script: one round trip that also names the holder)
  with a lifetime, ``flight_ttl``, that bounds one fetch: a producer that dies leaves a claim that
  expires by itself. The producer fetches and records, then in one script deletes the claim if it
  is still its own (a slow producer whose claim expired must not delete its successor's), stores
  its outcome (the recorded response's id, or nothing for a failure) and publishes it.
- A process that lost the claim subscribes to the flight's channel, and only once Redis confirms
  the subscription checks whether the outcome is already there: anything published after that
  check is delivered, so no wake-up is lost between the two. It waits while the holder's claim
  lives (and at most ``wait`` in all), then reads the response by its id from the store and
  returns it: the pipeline records this caller as having joined it. If the holder failed, the
  response is not in this store, or nothing came in time, it fetches itself; if the claim expired
  without an outcome (the holder died), it claims again, so one waiter takes over, not all.
- Only persisted fetches coalesce across processes: a ``never``-mode answer is not in the store
  for another process to read.
"""

from __future__ import annotations

import hashlib
import math
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Final, Protocol, runtime_checkable

import anyio

from mxm_dataio_async._clock import SYSTEM_CLOCK, Clock
from mxm_dataio_async._coalesce import Coalescer
from mxm_dataio_async._exceptions import DataIOError
from mxm_dataio_async._models import ResponseStatus
from mxm_dataio_async._redis._client import RedisCoordination, RedisUnavailable, log

if TYPE_CHECKING:
    from mxm_dataio_async._models import Response

__all__ = ["RedisCoalescer", "ResponseLookup"]

FlightKey = tuple[str, bool, str]

CLAIM: Final = """
-- KEYS[1] the flight; ARGV[1] this producer's token, ARGV[2] the claim's lifetime (ms).
-- Returns the holder's token, or nothing when the caller now holds the flight.
local holder = redis.call('GET', KEYS[1])
if holder then return holder end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
"""

FINISH: Final = """
-- KEYS[1] the flight, KEYS[2] this producer's outcome; ARGV[1] its token, ARGV[2] the outcome
-- ('' failed, else the recorded response's id), ARGV[3] the outcome's lifetime (ms), ARGV[4] the
-- channel. Deletes the claim only if it is still this producer's.
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
redis.call('PUBLISH', ARGV[4], ARGV[1] .. ' ' .. ARGV[2])
return 1
"""

PEEK: Final = """
-- KEYS[1] the flight, KEYS[2] the holder's outcome; ARGV[1] the holder's token.
-- {1, outcome}: the holder finished; {0, ms}: it still holds the flight for ms;
-- {0, -2}: it is gone without an outcome (its claim expired).
local outcome = redis.call('GET', KEYS[2])
if outcome then return {1, outcome} end
if redis.call('GET', KEYS[1]) == ARGV[1] then return {0, redis.call('PTTL', KEYS[1])} end
return {0, -2}
"""

_GRACE: Final = 0.05  # seconds past the holder's claim before looking again


@runtime_checkable
class ResponseLookup(Protocol):
    """Where a waiter reads the response another process recorded (a ``Store``)."""

    async def get_response(self, response_id: str) -> Response | None: ...


class RedisCoalescer(Coalescer[FlightKey, "Response"]):
    """Single-flight across processes: concurrent identical requests on different workers make
    one upstream call; the others wait for it and return the recorded response.

    ``Registry(redis=...)`` makes one per store (``registry.coalescer(store)``); every process
    on the same Redis prefix and the same store coalesces with the others::

        redis = RedisCoordination("redis://127.0.0.1:6379/0", prefix="prices", wait=30)
        async with dio.Store("postgresql://...") as store, dio.Registry(redis=redis) as registry:
            ...  # sessions on store and registry: one upstream call per request in flight

    A waiter gives up after ``wait`` seconds, or when the producer's claim (``flight_ttl``)
    expires without an outcome, and then fetches itself. Redis unreachable: ``CoordinationError``
    by default, in-process coalescing only with ``on_unavailable="local"``.
    """

    __slots__ = ("_clock", "_coordination", "_responses")

    def __init__(
        self,
        coordination: RedisCoordination,
        responses: ResponseLookup,
        *,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        super().__init__()
        self._coordination = coordination
        self._responses = responses
        self._clock = clock

    async def run(
        self,
        key: FlightKey,
        factory: Callable[[], Awaitable[Response]],
        *,
        owner: object = None,
    ) -> Response:
        """The outcome of the one producer of ``key`` in this process, which in turn waits for
        the one in any other process (persisted fetches only)."""
        if not key[1]:
            return await super().run(key, factory, owner=owner)
        return await super().run(key, lambda: self._across(key, factory), owner=owner)

    def flight(self, key: FlightKey) -> str:
        """The Redis key (and channel) of a flight: the request's hash, and a digest of the
        headers it is sent with when it has any (their values never go to Redis)."""
        request_hash, _, headers = key
        if not headers:
            return self._coordination.key("flight", request_hash)
        digest = hashlib.sha256(headers.encode()).hexdigest()[:32]
        return self._coordination.key("flight", request_hash, digest)

    async def _across(self, key: FlightKey, factory: Callable[[], Awaitable[Response]]) -> Response:
        coordination, clock = self._coordination, self._clock
        name = self.flight(key)
        token = uuid.uuid4().hex
        deadline = clock.monotonic() + coordination.wait
        while True:
            try:
                holder = await coordination.run(CLAIM, (name,), (token, self._ttl_ms()))
                if holder is None or holder == token:  # (a retried claim finds its own token)
                    return await self._hold(name, token, factory)
                outcome = await self._outcome(name, holder, deadline)
            except RedisUnavailable:
                if coordination.on_unavailable == "fail":
                    raise
                return await factory()  # coalesced within this process only
            if outcome is None and clock.monotonic() < deadline:
                continue  # the holder's claim ran out without an outcome: claim again
            if outcome:
                found = await self._responses.get_response(outcome)
                if found is not None and found.status is ResponseStatus.OK:
                    return found
            # The holder failed, recorded into another store, or took longer than `wait`.
            return await factory()

    async def _hold(
        self, name: str, token: str, factory: Callable[[], Awaitable[Response]]
    ) -> Response:
        coordination = self._coordination
        outcome = ""
        try:
            response = await factory()
            outcome = response.id
            return response
        finally:
            with anyio.CancelScope(shield=True):  # bounded by the client's timeouts
                try:
                    await coordination.run(
                        FINISH,
                        (name, coordination.key("done", token)),
                        (token, outcome, self._ttl_ms(), name),
                    )
                except DataIOError as exc:  # its waiters time out or see the claim expire
                    log.warning("could not publish the outcome of %s: %s", name, exc)

    async def _outcome(self, name: str, holder: str, deadline: float) -> str | None:
        """The holder's outcome ('' if it failed), or ``None`` if it is gone without one or
        none came before ``deadline`` (or the end of the holder's claim)."""
        coordination, clock = self._coordination, self._clock
        with clock.cancel_after(deadline - clock.monotonic()):
            async with coordination.hub.listen(name) as channel:
                # Subscribed (confirmed) before looking: an outcome published from now on is seen.
                done, value = await coordination.run(
                    PEEK, (name, coordination.key("done", holder)), (holder,)
                )
                if done:
                    return str(value)
                if value == -2:
                    return None
                prefix = holder + " "
                with clock.cancel_after(value / 1000 + _GRACE if value >= 0 else math.inf):
                    message = await channel.message(lambda text: text.startswith(prefix))
                    return message[len(prefix) :]
        return None

    def _ttl_ms(self) -> str:
        return str(math.ceil(self._coordination.flight_ttl * 1000))
