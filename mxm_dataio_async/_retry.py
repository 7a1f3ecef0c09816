"""Retrying one upstream request: tenacity underneath, our policy and error contract on top.

Only :class:`TransientError` is retried (adapters raise it for timeouts, 429, 5xx, resets). Every
other ``Exception`` is final at once. ``BaseException``s that are not ``Exception`` (cancellation,
``KeyboardInterrupt``) pass through untouched: never retried, wrapped or reported to hooks.

The first attempt runs outside tenacity: the common case (it succeeds) costs one clock read and one
await. On its failure the loop continues inside ``AsyncRetrying``, whose first "attempt" replays
that failure, so the semantics are the same as if tenacity had run from the start.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, TypeVar, cast

import anyio
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt
from tenacity.stop import stop_base

from mxm_dataio_async._exceptions import FetchError, TransientError

if TYPE_CHECKING:
    from mxm_dataio_async._models import Request

__all__ = [
    "NO_RETRY",
    "DeadlineExceeded",
    "RetryPolicy",
    "disable_retry_waits",
    "retry_waits_disabled",
    "run_with_retries",
]

T = TypeVar("T")

OnFailure = Callable[[int, BaseException, float], Awaitable[None]]
"""``(attempt_number, error, elapsed_seconds_of_that_attempt)``, awaited after a failed attempt."""


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
    """

    max_attempts: int = 3
    base_delay: float = 0.1
    max_delay: float = 10.0
    multiplier: float = 2.0
    jitter: float = 0.1
    deadline: float | None = None

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


NO_RETRY: Final = RetryPolicy(max_attempts=1)
"""One attempt, no retry."""

_waits_disabled = 0


@contextmanager
def disable_retry_waits() -> Iterator[None]:
    """Within this block, retry waits are zero (attempts still happen). For tests; nestable.

    Process-wide, like ``stamina.set_testing``::

        with disable_retry_waits():
            await session.fetch(request)  # a flaky mock retries instantly
    """
    global _waits_disabled
    _waits_disabled += 1
    try:
        yield
    finally:
        _waits_disabled -= 1


def retry_waits_disabled() -> bool:
    """Whether ``disable_retry_waits()`` is active (the session then skips Retry-After cooldowns
    of the source limiter too, so tests never sleep)."""
    return _waits_disabled > 0


async def run_with_retries(
    policy: RetryPolicy,
    attempt: Callable[[int], Awaitable[T]],
    *,
    request: Request | None = None,
    on_failure: OnFailure | None = None,
    sleep: Callable[[float], Awaitable[None]] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """Await ``attempt(n)`` for n = 1, 2, ... until it succeeds or ``policy`` gives up.

    Returns the first successful result. On final failure raises :class:`FetchError` (``attempts``
    set, ``__cause__`` the last error); a ``FetchError`` raised by ``attempt`` is re-raised with its
    ``attempts`` updated. ``on_failure`` is awaited after every failed attempt, before the decision
    to retry; if it raises, that error propagates as is and nothing more is attempted.
    """
    started = clock()
    if policy.deadline is not None:
        attempt = _bounded_by_deadline(attempt, policy.deadline, started, clock)
    try:
        return await attempt(1)
    except Exception as exc:
        first_error: Exception = exc
        first_elapsed = clock() - started
    return await _retry(
        policy,
        attempt,
        first_error,
        first_elapsed,
        started=started,
        request=request,
        on_failure=on_failure,
        sleep=anyio.sleep if sleep is None else sleep,
        clock=clock,
    )


class DeadlineExceeded(TransientError):
    """The retry deadline passed while an attempt was still running (it was cancelled)."""


def _bounded_by_deadline(
    attempt: Callable[[int], Awaitable[T]],
    deadline: float,
    started: float,
    clock: Callable[[], float],
) -> Callable[[int], Awaitable[T]]:
    """``attempt`` cancelled when the overall deadline passes: a body trickling forever below
    the per-read timeout must not hold a fetch past its deadline."""

    async def bounded(number: int) -> T:
        remaining = started + deadline - clock()
        with anyio.move_on_after(max(remaining, 0.0)):
            return await attempt(number)
        raise DeadlineExceeded(
            f"the {deadline:g}s retry deadline passed during attempt {number}; it was cancelled"
        )

    return bounded


class _HookFailed(BaseException):
    """Carries an ``on_failure`` error out of tenacity, which must neither retry nor wrap it."""

    def __init__(self, error: Exception) -> None:
        super().__init__(error)
        self.error = error


class _Run:
    __slots__ = ("attempts", "gave_up_wait")

    def __init__(self) -> None:
        self.attempts = 0
        self.gave_up_wait: float | None = None  # set when the deadline stopped the retries


class _StopAtDeadline(stop_base):
    """Stop when the upcoming wait would end past the deadline (tenacity computes wait first)."""

    def __init__(self, run: _Run, deadline_at: float, clock: Callable[[], float]) -> None:
        self._run = run
        self._deadline_at = deadline_at
        self._clock = clock

    def __call__(self, retry_state: RetryCallState) -> bool:
        wait = retry_state.upcoming_sleep
        if self._clock() + wait > self._deadline_at:
            self._run.gave_up_wait = wait
            return True
        return False


def _wait_for(policy: RetryPolicy) -> Callable[[RetryCallState], float]:
    def wait(retry_state: RetryCallState) -> float:
        if _waits_disabled:
            return 0.0
        delay = policy.backoff(retry_state.attempt_number)
        if policy.jitter:
            delay += random.uniform(0.0, policy.jitter)
        outcome = retry_state.outcome
        error = None if outcome is None else outcome.exception()
        # The upstream's own hint wins over our schedule, even beyond max_delay.
        if isinstance(error, TransientError) and error.retry_after is not None:
            delay = max(delay, error.retry_after)
        return delay

    return wait


async def _retry(
    policy: RetryPolicy,
    attempt: Callable[[int], Awaitable[T]],
    first_error: Exception,
    first_elapsed: float,
    *,
    started: float,
    request: Request | None,
    on_failure: OnFailure | None,
    sleep: Callable[[float], Awaitable[None]],
    clock: Callable[[], float],
) -> T:
    run = _Run()

    async def one_attempt() -> T:
        run.attempts = number = run.attempts + 1
        if number == 1:
            error, elapsed = first_error, first_elapsed  # replay the failure seen outside
        else:
            began = clock()
            try:
                return await attempt(number)
            except Exception as exc:
                error, elapsed = exc, clock() - began
        if on_failure is not None:
            try:
                await on_failure(number, error, elapsed)
            except Exception as hook_exc:
                raise _HookFailed(hook_exc) from None
        raise error

    async def do_sleep(seconds: float) -> None:
        await sleep(float(seconds))  # tenacity passes a float subclass; hand over a plain float

    stop: stop_base = stop_after_attempt(policy.max_attempts)
    if policy.deadline is not None:
        stop = stop | _StopAtDeadline(run, started + policy.deadline, clock)
    # A fresh AsyncRetrying per call: tenacity keeps its iteration state on the object.
    retrying = AsyncRetrying(
        sleep=do_sleep,
        stop=stop,
        wait=_wait_for(policy),
        retry=retry_if_exception_type(TransientError),
        reraise=True,
    )
    try:
        return cast("T", await retrying(one_attempt))
    except _HookFailed as failed:
        hook_error = failed.error
    except Exception as exc:
        final = _final_error(policy, exc, run, request)
        if final is exc:
            raise
        raise final from exc
    raise hook_error  # outside the handler: its context is not rewritten to _HookFailed


def _describe(error: BaseException) -> str:
    return str(error) or type(error).__name__


def _final_error(
    policy: RetryPolicy, error: Exception, run: _Run, request: Request | None
) -> FetchError:
    attempts = run.attempts
    if isinstance(error, FetchError):
        error.attempts = attempts
        if error.request is None:
            error.request = request
        return error
    after = "" if attempts == 1 else f" after {attempts} attempts"
    if not isinstance(error, TransientError):
        message = f"fetch failed{after}: {_describe(error)} (not retried: {type(error).__name__})"
        return FetchError(message, request=request, attempts=attempts)
    after = f" after {attempts} attempt{'s' if attempts != 1 else ''}"
    message = f"fetch failed{after}: {_describe(error)}"
    if run.gave_up_wait is not None:
        message += (
            f" (gave up: waiting {run.gave_up_wait:.3g}s more would pass the "
            f"{policy.deadline:g}s retry deadline)"
        )
    return FetchError(
        message, request=request, attempts=attempts, transport_status=error.transport_status
    )
