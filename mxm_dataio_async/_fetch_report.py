"""What the pipeline tells the listeners of one source (DESIGN §8): the events of a fetch, built
only when someone listens.

``Pipeline`` decides *when* (it asks ``Telemetry.watching()`` once per fetch and once per producer,
so the fast path builds nothing when nobody listens); this module decides *what*: each method
turns the pipeline's own values into one event. ``AttemptTimes`` is the clock readings of one
attempt, shared by the attempt events and the recorder's rows.
"""

from __future__ import annotations

from mxm_dataio_async._breaker import Change
from mxm_dataio_async._clock import Clock
from mxm_dataio_async._events import (
    AttemptFinished,
    AttemptStarted,
    BreakerStateChanged,
    CacheDecided,
    CooldownStarted,
    FetchFinished,
    FetchStarted,
    RateAdjusted,
    RetryScheduled,
    StaleServed,
    Telemetry,
)
from mxm_dataio_async._models import Request, Response
from mxm_dataio_async._policy import Decision
from mxm_dataio_async._recorder import error_text
from mxm_dataio_async._redact import Redaction

__all__ = ["AttemptTimes", "FetchReport"]


class AttemptTimes:
    """When an attempt started, and when the rate gate let it through: ``wait_ms`` is the time
    in between, ``elapsed_ms`` the adapter's own time after it."""

    __slots__ = ("admitted", "started")

    def __init__(self, started: float) -> None:
        self.started = started
        self.admitted: float | None = None

    def wait_ms(self, now: float) -> float:
        return ((self.admitted if self.admitted is not None else now) - self.started) * 1000.0

    def elapsed_ms(self, now: float) -> float:
        return 0.0 if self.admitted is None else (now - self.admitted) * 1000.0


class FetchReport:
    """The events of one source's fetches, delivered through ``telemetry``."""

    __slots__ = ("_clock", "_redaction", "_source", "telemetry")

    def __init__(
        self, telemetry: Telemetry, clock: Clock, *, source: str, redaction: Redaction
    ) -> None:
        self.telemetry = telemetry
        self._clock = clock
        self._source = source
        self._redaction = redaction

    def fetch_started(self, request: Request) -> float:
        """Emit ``FetchStarted``; the monotonic time it started, for ``fetch_finished``."""
        self.telemetry.emit(
            FetchStarted(
                request.source,
                request.kind,
                request.id,
                request.hash,
                request.method,
                request.endpoint,
            )
        )
        return self._clock.monotonic()

    def cache_decided(self, request: Request, decision: Decision) -> None:
        self.telemetry.emit(
            CacheDecided(
                request.source,
                request.kind,
                request.id,
                request.hash,
                decision.action.value,
                decision.reason,
            )
        )

    def fetch_finished(
        self,
        request: Request,
        started: float,
        response: Response | None,
        exc: BaseException | None,
    ) -> None:
        """The outcome of a fetch: its response, or the exception that ended it."""
        elapsed = (self._clock.monotonic() - started) * 1000.0
        if response is not None:
            event = FetchFinished(
                request.source,
                request.kind,
                request.id,
                request.hash,
                outcome(request, response),
                response.transport_status,
                0 if response.from_cache else response.attempts,
                elapsed,
                response.size_bytes,
            )
        else:
            failed = isinstance(exc, Exception)
            event = FetchFinished(
                request.source,
                request.kind,
                request.id,
                request.hash,
                "failed" if failed else "cancelled",
                getattr(exc, "transport_status", None),
                getattr(exc, "attempts", 0),
                elapsed,
                0,
                error_text(exc) if failed and exc is not None else None,
            )
        self.telemetry.emit(event)

    def attempt_started(self, request: Request, number: int, times: AttemptTimes) -> None:
        assert times.admitted is not None
        wait = (times.admitted - times.started) * 1000.0
        self.telemetry.emit(
            AttemptStarted(request.source, request.kind, request.id, request.hash, number, wait)
        )

    def attempt_finished(
        self,
        request: Request,
        number: int,
        outcome: str,
        answer: object,
        times: AttemptTimes,
        now: float,
        size: int,
        error: str | None,
    ) -> None:
        """``answer`` is the adapter's result or the exception the attempt raised."""
        elapsed = getattr(answer, "elapsed_ms", None)
        self.telemetry.emit(
            AttemptFinished(
                request.source,
                request.kind,
                request.id,
                request.hash,
                number,
                outcome,
                getattr(answer, "transport_status", None),
                elapsed if isinstance(elapsed, float) else times.elapsed_ms(now),
                times.wait_ms(now),
                size,
                error,
                self._redaction.url(getattr(answer, "url", None)),
            )
        )

    def retry_scheduled(self, request: Request, number: int, wait: float, exc: Exception) -> None:
        if self.telemetry.wants(RetryScheduled):
            self.telemetry.emit(
                RetryScheduled(
                    request.source,
                    request.kind,
                    request.id,
                    request.hash,
                    number,
                    wait,
                    error_text(exc),
                    getattr(exc, "transport_status", None),
                )
            )

    def stale_served(
        self, request: Request, cached: Response, age: float, error: Exception
    ) -> None:
        if self.telemetry.wants(StaleServed):
            self.telemetry.emit(
                StaleServed(
                    request.source,
                    request.kind,
                    request.id,
                    request.hash,
                    cached.id,
                    age,
                    error_text(error),
                )
            )

    def breaker_changed(self, change: Change | None) -> None:
        if change is not None and self.telemetry.wants(BreakerStateChanged):
            self.telemetry.emit(
                BreakerStateChanged(
                    self._source,
                    change.old.value,
                    change.new.value,
                    change.failures,
                    change.retry_in,
                )
            )

    def rate_adjusted(self, old: float, new: float, status: int | None) -> None:
        if self.telemetry.wants(RateAdjusted):
            reason = f"{status} from the upstream"
            self.telemetry.emit(RateAdjusted(self._source, old, new, reason))

    def cooldown_started(self, seconds: float, status: int | None) -> None:
        if self.telemetry.wants(CooldownStarted):
            reason = f"Retry-After {seconds:g}s" + (f" with a {status}" if status else "")
            self.telemetry.emit(CooldownStarted(self._source, seconds, status, reason))


def outcome(request: Request, response: Response) -> str:
    """How ``request`` got ``response``: ``stale``, ``cached``, ``joined`` (a duplicate's),
    ``revalidated`` or ``fetched``."""
    if response.stale:
        return "stale"
    if response.from_cache:
        return "cached"
    if response.request_id != request.id:
        return "joined"
    return "revalidated" if response.revalidated_from else "fetched"
