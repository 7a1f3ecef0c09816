"""Single-flight: one producer task per key; concurrent callers of that key share its outcome.

Modelled on async-lru's ``_shield_and_handle_cancelled_error``: the producer runs in the owning
session's task group, not in any caller, so a caller that is cancelled (the first one included)
only stops waiting. Waiters are counted; when the last one leaves before the outcome is known the
producer is cancelled, since nobody needs it any more. Outcomes are never remembered: the key is
dropped as soon as its producer finishes, so a failure is seen only by the callers that waited for
it, and the next call starts afresh.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable
from types import TracebackType
from typing import Generic, TypeVar, cast

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup

from mxm_dataio_async._exceptions import DataIOError

__all__ = ["Coalescer"]

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


class _Flight(Generic[T]):
    """One in-flight producer and what its waiters need to see its outcome."""

    __slots__ = ("done", "error", "has_result", "result", "scope", "traceback", "waiters")

    def __init__(self) -> None:
        self.done = anyio.Event()
        # Created here, not in the producer, so it can be cancelled before the task has started.
        self.scope = anyio.CancelScope()
        self.waiters = 0
        self.has_result = False
        self.result: T | None = None
        self.error: Exception | None = None
        self.traceback: TracebackType | None = None


class Coalescer(Generic[K, T]):
    """Run at most one ``factory()`` per key at a time; concurrent callers share its outcome.

    Producers are spawned in ``task_group`` (the owning session's), so they outlive any one
    caller::

        coalescer: Coalescer[str, Response] = Coalescer(task_group)
        response = await coalescer.run(request.hash, lambda: fetch_and_store(request))

    A failure (``Exception``) is raised in every caller that waited for it: the same exception
    object, each time restarting from the producer's traceback so tracebacks do not grow with the
    number of waiters. If the task group cancels the producer (the session is closing), waiters get
    ``DataIOError`` instead of hanging, unless they are being cancelled themselves.
    """

    __slots__ = ("_flights", "_task_group")

    def __init__(self, task_group: TaskGroup) -> None:
        self._task_group = task_group
        self._flights: dict[K, _Flight[T]] = {}

    def in_flight(self) -> int:
        """The number of keys with a running producer."""
        return len(self._flights)

    def waiters(self, key: K) -> int:
        """The number of callers currently waiting for ``key`` (0 if nothing is in flight)."""
        flight = self._flights.get(key)
        return 0 if flight is None else flight.waiters

    async def run(self, key: K, factory: Callable[[], Awaitable[T]]) -> T:
        """Return the outcome of the producer for ``key``, starting ``factory()`` if none runs."""
        flight = self._flights.get(key)
        if flight is None:
            flight = _Flight()
            try:
                self._task_group.start_soon(self._produce, key, flight, factory)
            except RuntimeError as exc:  # anyio: "This task group is not active"
                raise DataIOError("cannot start the request: the session is closed") from exc
            self._flights[key] = flight
        flight.waiters += 1
        try:
            await flight.done.wait()
        finally:
            flight.waiters -= 1
            if not flight.waiters and not flight.done.is_set():
                # The last caller left early (cancelled): nobody needs the outcome any more. Drop
                # the key now, so a new caller starts a new producer instead of joining a dying one.
                flight.scope.cancel()
                if self._flights.get(key) is flight:
                    del self._flights[key]
        if flight.error is not None:
            # Shared by all waiters: restart from the producer's traceback on each raise.
            raise flight.error.with_traceback(flight.traceback)
        if flight.has_result:
            return cast("T", flight.result)
        # The producer was cancelled from outside: the task group is shutting down.
        await anyio.lowlevel.checkpoint_if_cancelled()
        raise DataIOError("in-flight request cancelled: the session is closing")

    async def _produce(
        self, key: K, flight: _Flight[T], factory: Callable[[], Awaitable[T]]
    ) -> None:
        try:
            if flight.scope.cancel_called:
                return  # every caller left before this task even started
            with flight.scope:
                try:
                    flight.result = await factory()
                    flight.has_result = True
                except Exception as exc:
                    # Delivered to the waiters, never to the task group: one failed request
                    # must not tear down the session.
                    flight.error = exc
                    flight.traceback = exc.__traceback__
        finally:
            if self._flights.get(key) is flight:
                del self._flights[key]
            flight.done.set()
