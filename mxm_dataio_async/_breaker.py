"""A circuit breaker per source: configuration, and the state machine the pipeline drives.

The state machine is pure (no clock of its own, no I/O, no logging): the pipeline passes the
time, asks before each attempt, reports each attempt's outcome, and reports any state change it
is handed back (logs, hooks). So every rule is testable without a loop.

```
closed --(failures consecutive transient failures)--> open
open --(reset_after seconds)--> half_open: one probe attempt goes through
half_open --probe succeeds--> closed        half_open --probe fails--> open (again reset_after)
```
An open circuit refuses attempts at once with ``CircuitOpen``: no adapter call, no rate budget.
Only transient failures count (timeouts, resets, 429, 5xx): a 404 is an answer, and resets the
count like any answer does. The state is per process (a Redis-shared registry still keeps one
breaker per process and source).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

__all__ = ["BreakerState", "Change", "Circuit", "CircuitBreaker"]


class BreakerState(StrEnum):
    CLOSED = "closed"
    """Attempts go through; consecutive transient failures are counted."""
    OPEN = "open"
    """Attempts fail fast with ``CircuitOpen`` until ``reset_after`` has passed."""
    HALF_OPEN = "half_open"
    """One probe attempt is in flight; others fail fast until it answers."""


@dataclass(frozen=True, slots=True)
class CircuitBreaker:
    """Stop calling a source that keeps failing: after ``failures`` consecutive transient
    failures the source's circuit opens and its requests fail at once with ``CircuitOpen``
    (no adapter call, no rate budget); ``reset_after`` seconds later one probe goes through,
    and its success closes the circuit again.

    ``Registry.register("example", adapter, breaker=CircuitBreaker(failures=5, reset_after=30.0))``
    """

    failures: int = 5
    reset_after: float = 30.0

    def __post_init__(self) -> None:
        if isinstance(self.failures, bool) or not isinstance(self.failures, int):
            raise TypeError(f"failures must be an int, got {type(self.failures).__name__}")
        if self.failures < 1:
            raise ValueError(f"failures must be >= 1, got {self.failures}")
        if isinstance(self.reset_after, bool) or not isinstance(self.reset_after, int | float):
            raise TypeError(
                f"reset_after must be a number of seconds, got {type(self.reset_after).__name__}"
            )
        if not (math.isfinite(self.reset_after) and self.reset_after > 0):
            raise ValueError(f"reset_after must be a finite number > 0, got {self.reset_after!r}")


@dataclass(frozen=True, slots=True)
class Change:
    """A state change, for the caller to report."""

    old: BreakerState
    new: BreakerState
    failures: int
    retry_in: float


class Circuit:
    """One source's breaker state. Times are monotonic seconds passed in by the caller."""

    __slots__ = ("_opened_at", "_probing", "config", "failures", "opened", "state")

    def __init__(self, config: CircuitBreaker) -> None:
        self.config = config
        self.state = BreakerState.CLOSED
        self.failures = 0  # consecutive transient failures
        self.opened = 0  # how often it opened (for statistics)
        self._opened_at = -math.inf
        self._probing = False

    def __repr__(self) -> str:
        return f"<Circuit {self.state.value} failures={self.failures}>"

    def retry_in(self, now: float) -> float:
        """Seconds until an open circuit lets a probe through (0 when it would now)."""
        if self.state is BreakerState.CLOSED:
            return 0.0
        return max(0.0, self._opened_at + self.config.reset_after - now)

    def admit(self, now: float) -> tuple[bool, Change | None]:
        """Before an attempt: whether it may go, and the change that admitting it made (an open
        circuit past ``reset_after`` turns half-open and this attempt is its probe)."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True, None
        if state is BreakerState.OPEN and now >= self._opened_at + self.config.reset_after:
            self.state = BreakerState.HALF_OPEN
            self._probing = True
            return True, Change(BreakerState.OPEN, BreakerState.HALF_OPEN, self.failures, 0.0)
        return False, None  # open, or half-open with its probe in flight

    def succeeded(self) -> Change | None:
        """An attempt got an answer (any answer the upstream gave, a 404 included)."""
        self.failures = 0
        self._probing = False
        if self.state is BreakerState.CLOSED:
            return None
        old, self.state = self.state, BreakerState.CLOSED
        return Change(old, BreakerState.CLOSED, 0, 0.0)

    def failed(self, now: float) -> Change | None:
        """An attempt failed with a transient error."""
        self.failures += 1
        state = self.state
        if state is BreakerState.HALF_OPEN or (
            state is BreakerState.CLOSED and self.failures >= self.config.failures
        ):
            self.state = BreakerState.OPEN
            self._opened_at = now
            self._probing = False
            self.opened += 1
            return Change(state, BreakerState.OPEN, self.failures, self.config.reset_after)
        return None

    def released(self) -> None:
        """An admitted attempt ended with neither an answer nor a transient failure (cancelled,
        or an error of ours): a half-open circuit lets the next attempt probe instead."""
        if self.state is BreakerState.HALF_OPEN and self._probing:
            self._probing = False
            self._opened_at = -math.inf  # the next admit() probes at once
            self.state = BreakerState.OPEN
