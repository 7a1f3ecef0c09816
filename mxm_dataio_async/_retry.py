"""Retrying one upstream request: the policy decides, the pipeline drives the loop.

:class:`RetryPolicy` is configuration; :meth:`RetryPolicy.schedule` starts a :class:`Retrying`, a
small pure object the pipeline asks after each failed attempt: "how long until the next one, or
give up?" (stamina's ``_core.py`` over tenacity is the model; tenacity's own ``AsyncRetrying``
iterator was measured at ~19.5 us per fetch here, ~6% of a recorded miss, for a loop whose common
case is one successful attempt). Nothing here sleeps, records or raises: the pipeline does, in the
order it reads.

Only :class:`TransientError` is retried (adapters raise it for timeouts, 429, 5xx, resets). Every
other ``Exception`` is final at once. ``BaseException``s that are not ``Exception`` (cancellation,
``KeyboardInterrupt``) never reach the schedule.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from mxm_dataio_async._exceptions import FetchError, TransientError

if TYPE_CHECKING:
    from mxm_dataio_async._models import Request

__all__ = [
    "NO_RETRY",
    "DeadlineExceeded",
    "RetryPolicy",
    "Retrying",
    "disable_retry_waits",
    "retry_waits_disabled",
]


def _non_negative(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return number


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how patiently to retry a request that failed with a ``TransientError``.

    The wait before retry ``n`` is ``min(base_delay * multiplier**(n-1), max_delay)`` plus up to
    ``jitter`` seconds of uniform noise (added after the cap, so capped retries stay spread out),
    and never less than the error's ``retry_after``. ``deadline`` bounds the whole run: a wait that
    would end past it is not started. ``RetryPolicy(max_attempts=5, base_delay=0.2)``.

    Requests that are not safe to repeat (POST, PATCH, or any request with a body) are retried
    only when the failure proves the upstream never got them (the connection could not be made),
    or when it answered 429 or 503 *with* a ``Retry-After`` (it refused, and said when to come
    back). A timeout after the request was sent, a reset, or a 500 are final for them: the
    upstream may have acted on the request already. ``retry_unsafe=True`` (here, for a whole
    source, or ``session.request(..., retry_unsafe=True)`` for one request) retries them like any
    other request: say so for endpoints that are idempotent in fact.
    """

    max_attempts: int = 3
    base_delay: float = 0.1
    max_delay: float = 10.0
    multiplier: float = 2.0
    jitter: float = 0.1
    deadline: float | None = None
    retry_unsafe: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int):
            raise TypeError(
                f"max_attempts must be an int, got {type(self.max_attempts).__name__}: "
                f"{self.max_attempts!r}"
            )
        if self.max_attempts < 1:
            raise ValueError(
                f"max_attempts must be >= 1 (1 means no retry), got {self.max_attempts}"
            )
        if not isinstance(self.retry_unsafe, bool):
            raise TypeError(f"retry_unsafe must be True or False, got {self.retry_unsafe!r}")
        _non_negative("base_delay", self.base_delay)
        _non_negative("max_delay", self.max_delay)
        _non_negative("jitter", self.jitter)
        if isinstance(self.multiplier, bool) or not isinstance(self.multiplier, int | float):
            raise TypeError(f"multiplier must be a number, got {type(self.multiplier).__name__}")
        if not (math.isfinite(self.multiplier) and self.multiplier >= 1):
            raise ValueError(
                f"multiplier must be a finite number >= 1 (1 = constant delay), "
                f"got {self.multiplier!r}"
            )
        if self.deadline is not None:
            deadline = _non_negative("deadline", self.deadline)
            if deadline == 0:
                raise ValueError("deadline must be > 0 seconds (or None for no deadline)")

    def backoff(self, retry_number: int) -> float:
        """The wait before retry ``retry_number`` (1-based), without jitter, capped at max_delay."""
        if retry_number < 1:
            raise ValueError(f"retry_number is 1-based, got {retry_number}")
        if self.base_delay == 0:
            return 0.0
        try:
            delay = self.base_delay * self.multiplier ** (retry_number - 1)
        except OverflowError:  # a huge retry number: far beyond any cap
            return float(self.max_delay)
        return float(min(delay, self.max_delay))

    def schedule(self, started: float, *, unsafe: bool = False) -> Retrying:
        """A fresh retry state for one request whose first attempt starts at ``started``
        (monotonic seconds); ``unsafe``: the request is not safe to repeat (see above) and
        neither it nor this policy says to retry it anyway."""
        return Retrying(self, started, unsafe=unsafe and not self.retry_unsafe)


NO_RETRY: Final = RetryPolicy(max_attempts=1)
"""One attempt, no retry."""

_waits_disabled = 0


@contextmanager
def disable_retry_waits() -> Iterator[None]:
    """Within this block, retry waits are zero (attempts still happen). For tests; nestable.

    Process-wide, like ``stamina.set_testing``::

        with disable_retry_waits():
            await session.fetch(request)  # a flaky mock retries instantly

    Read only when an attempt has failed, never on the path of a successful fetch. Tests of this
    library itself pass a ``FakeClock`` instead, which keeps the waits' lengths observable.
    """
    global _waits_disabled
    _waits_disabled += 1
    try:
        yield
    finally:
        _waits_disabled -= 1


def retry_waits_disabled() -> bool:
    """Whether ``disable_retry_waits()`` is active (the pipeline then skips Retry-After cooldowns
    of the source's rate gate too, so tests never sleep)."""
    return _waits_disabled > 0


class DeadlineExceeded(TransientError):
    """The retry deadline passed while an attempt was still running (it was cancelled)."""


class Retrying:
    """The retry state of one request: attempts made, and the decision after each failure.

    ```python
    retrying = policy.schedule(clock.monotonic())
    while True:
        try:
            return await attempt()
        except Exception as exc:
            wait = retrying.next_wait(exc, clock.monotonic())
            if wait is None:
                raise retrying.failure(exc, request) from exc
            await clock.sleep(wait)
    ```
    """

    __slots__ = ("_gave_up_wait", "_held_back", "attempts", "policy", "started", "unsafe")

    def __init__(self, policy: RetryPolicy, started: float, *, unsafe: bool = False) -> None:
        self.policy = policy
        self.started = started
        self.unsafe = unsafe
        self.attempts = 0
        self._gave_up_wait: float | None = None
        self._held_back = False  # an unsafe request not retried after a possible delivery

    def begin(self) -> int:
        """Count an attempt about to start; returns its number (1-based)."""
        self.attempts += 1
        return self.attempts

    def time_left(self, now: float) -> float | None:
        """Seconds until the deadline (for bounding the attempt in progress), or None."""
        deadline = self.policy.deadline
        return None if deadline is None else max(self.started + deadline - now, 0.0)

    def next_wait(self, error: BaseException, now: float) -> float | None:
        """After the current attempt failed with ``error``: the seconds to wait before the next
        one, or None to give up (not transient, attempts spent, or the wait would pass the
        deadline). Never less than the error's ``retry_after``."""
        policy = self.policy
        if not isinstance(error, TransientError) or self.attempts >= policy.max_attempts:
            return None
        if self.unsafe and not _never_acted_on(error):
            self._held_back = True
            return None
        if _waits_disabled:
            return 0.0
        delay = policy.backoff(self.attempts)
        if policy.jitter:
            delay += random.uniform(0.0, policy.jitter)
        # The upstream's own hint wins over our schedule, even beyond max_delay.
        if error.retry_after is not None:
            delay = max(delay, error.retry_after)
        if policy.deadline is not None and now + delay > self.started + policy.deadline:
            self._gave_up_wait = delay
            return None
        return delay

    def failure(
        self, error: BaseException, request: Request | None, *, response_id: str | None = None
    ) -> FetchError:
        """The final error of the request, complete: message, attempts, request, the upstream
        status and the recorded error row (raise it ``from error``)."""
        attempts = self.attempts
        status = getattr(error, "transport_status", None)
        if isinstance(error, FetchError):
            message = str(error)
            status = error.transport_status
            response_id = error.response_id or response_id
        elif not isinstance(error, TransientError):
            after = "" if attempts == 1 else f" after {attempts} attempts"
            kind = type(error).__name__
            message = f"fetch failed{after}: {_describe(error)} (not retried: {kind})"
        else:
            message = f"fetch failed after {attempts} attempt{'s' if attempts != 1 else ''}: "
            message += _describe(error)
            if self._held_back:
                message += (
                    " (not retried: the request is not safe to repeat and may have reached the "
                    "upstream; pass retry_unsafe=True to retry it anyway)"
                )
            if self._gave_up_wait is not None:
                message += (
                    f" (gave up: waiting {self._gave_up_wait:.3g}s more would pass the "
                    f"{self.policy.deadline:g}s retry deadline)"
                )
        return FetchError(
            message,
            request=request,
            attempts=attempts,
            transport_status=status,
            response_id=response_id,
        )


def _never_acted_on(error: TransientError) -> bool:
    """The upstream provably did not act on the request: it never got it, or it refused it with
    a 429/503 and said when to retry."""
    return error.not_sent or (
        error.transport_status in (429, 503) and error.retry_after is not None
    )


def _describe(error: BaseException) -> str:
    return str(error) or type(error).__name__
