"""What a running pipeline reports: frozen, slotted event values, the hook protocol, and the one
place that hands an event to the hooks and the logs.

Events are facts the pipeline (and the recorder's callers) already know at the point they happen;
nothing is computed for them unless someone listens: the pipeline asks :meth:`Telemetry.wants`
first, which is one truth test of a tuple and one ``Logger.isEnabledFor`` (a cached dict lookup).
Hooks observe; they never record, decide or raise into the pipeline (an exception in a hook is
logged and dropped). (stamina's ``RetryDetails`` and its instrumentation hooks are the model.)

Each event class names its logger and level: ``mxm_dataio_async.fetch`` (cache decisions,
attempts, retries, stale answers), ``mxm_dataio_async.recorder`` (recorded responses),
``mxm_dataio_async.limits`` (cooldowns, adaptive rate changes) and ``mxm_dataio_async.breaker``
(circuit state changes). A log record carries the event's fields as ``extra`` attributes, and
``event`` (the class name), so a JSON formatter can write them as they are.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Final, Protocol, TypeAlias

__all__ = [
    "AttemptFinished",
    "AttemptStarted",
    "BreakerStateChanged",
    "CacheDecided",
    "CooldownStarted",
    "Event",
    "FetchFinished",
    "FetchStarted",
    "Hook",
    "RateAdjusted",
    "ResponseRecorded",
    "RetryScheduled",
    "StaleServed",
    "Telemetry",
]

_FETCH: Final = logging.getLogger("mxm_dataio_async.fetch")
_RECORDER: Final = logging.getLogger("mxm_dataio_async.recorder")
_LIMITS: Final = logging.getLogger("mxm_dataio_async.limits")
_BREAKER: Final = logging.getLogger("mxm_dataio_async.breaker")
_HOOKS: Final = logging.getLogger("mxm_dataio_async.hooks")


@dataclass(frozen=True, slots=True)
class _RequestEvent:
    """Fields every per-request event carries."""

    logger: ClassVar[logging.Logger] = _FETCH
    level: ClassVar[int] = logging.DEBUG

    source: str
    kind: str
    request_id: str
    request_hash: str

    def message(self) -> str:  # pragma: no cover - every event overrides it
        raise NotImplementedError

    @property
    def _short(self) -> str:
        return f"{self.source}/{self.kind} {self.request_hash[:12]}"


@dataclass(frozen=True, slots=True)
class FetchStarted(_RequestEvent):
    """``session.fetch(request)`` began (before the cache was looked at)."""

    method: str
    endpoint: str | None

    def message(self) -> str:
        return f"fetch {self._short}: {self.method} {self.endpoint or ''}".rstrip()


@dataclass(frozen=True, slots=True)
class FetchFinished(_RequestEvent):
    """A fetch ended. ``outcome``: ``fetched``, ``revalidated``, ``cached`` (served from the
    store), ``joined`` (answered by an identical fetch in flight), ``stale`` (stale-if-error) or
    ``failed`` (``error`` says why)."""

    level: ClassVar[int] = logging.DEBUG

    outcome: str
    status: int | None
    attempts: int
    elapsed_ms: float
    size_bytes: int
    error: str | None = None

    def message(self) -> str:
        why = f": {self.error}" if self.error else ""
        return f"fetch {self._short} {self.outcome} in {self.elapsed_ms:.1f} ms{why}"


@dataclass(frozen=True, slots=True)
class CacheDecided(_RequestEvent):
    """The pure cache decision: ``decision`` is ``serve``, ``fetch``, ``revalidate`` or ``miss``."""

    decision: str
    reason: str

    def message(self) -> str:
        return f"cache {self._short}: {self.decision} ({self.reason})"


@dataclass(frozen=True, slots=True)
class AttemptStarted(_RequestEvent):
    """Attempt ``attempt`` (1-based) was admitted by the source's rate gate."""

    attempt: int
    wait_ms: float

    def message(self) -> str:
        return f"attempt {self.attempt} {self._short} (waited {self.wait_ms:.1f} ms)"


@dataclass(frozen=True, slots=True)
class AttemptFinished(_RequestEvent):
    """An attempt ended. ``outcome``: ``ok``, ``not_modified``, ``refused`` (a final upstream
    answer such as 404) or ``error`` (it raised; ``error`` says what)."""

    attempt: int
    outcome: str
    status: int | None
    elapsed_ms: float
    wait_ms: float
    size_bytes: int
    error: str | None = None
    url: str | None = None
    """The URL that answered, when the adapter says (secret parameters and userinfo out)."""

    def message(self) -> str:
        status = "" if self.status is None else f" {self.status}"
        why = f": {self.error}" if self.error else ""
        return (
            f"attempt {self.attempt} {self._short} {self.outcome}{status} "
            f"in {self.elapsed_ms:.1f} ms{why}"
        )


@dataclass(frozen=True, slots=True)
class RetryScheduled(_RequestEvent):
    """Attempt ``attempt`` failed with a transient error; the next starts in ``wait`` seconds."""

    level: ClassVar[int] = logging.INFO

    attempt: int
    wait: float
    reason: str
    status: int | None

    def message(self) -> str:
        return (
            f"retry {self._short} in {self.wait:.3g}s after attempt {self.attempt}: {self.reason}"
        )


@dataclass(frozen=True, slots=True)
class ResponseRecorded(_RequestEvent):
    """The recorder committed a response row (``status``: ``ok``, ``error``, ``stale``...)."""

    logger: ClassVar[logging.Logger] = _RECORDER

    response_id: str
    status: str
    attempt: int
    size_bytes: int

    def message(self) -> str:
        return f"recorded {self._short}: {self.status} {self.response_id} ({self.size_bytes} B)"


@dataclass(frozen=True, slots=True)
class StaleServed(_RequestEvent):
    """The upstream failed (or the source's circuit is open) and a stored response no older than
    the ``stale_if_error`` allowance answered instead."""

    level: ClassVar[int] = logging.WARNING

    response_id: str
    age_seconds: float
    error: str

    def message(self) -> str:
        return (
            f"served stale {self._short}: {self.response_id} ({self.age_seconds:.0f}s old) "
            f"after: {self.error}"
        )


@dataclass(frozen=True, slots=True)
class CooldownStarted:
    """The whole source pauses for ``seconds`` (an upstream's Retry-After)."""

    logger: ClassVar[logging.Logger] = _LIMITS
    level: ClassVar[int] = logging.WARNING

    source: str
    seconds: float
    status: int | None
    reason: str

    def message(self) -> str:
        return f"cooldown {self.source}: paused {self.seconds:.3g}s ({self.reason})"


@dataclass(frozen=True, slots=True)
class RateAdjusted:
    """An adaptive rate limit moved: down after a 429/503, back up after successes."""

    logger: ClassVar[logging.Logger] = _LIMITS
    level: ClassVar[int] = logging.INFO

    source: str
    rate_before: float
    rate_after: float
    reason: str

    def message(self) -> str:
        return (
            f"rate {self.source}: {self.rate_before:.3g} -> {self.rate_after:.3g} per period "
            f"({self.reason})"
        )


@dataclass(frozen=True, slots=True)
class BreakerStateChanged:
    """A source's circuit breaker changed state (``closed``, ``open``, ``half_open``)."""

    logger: ClassVar[logging.Logger] = _BREAKER
    level: ClassVar[int] = logging.WARNING

    source: str
    old: str
    new: str
    failures: int
    """Consecutive transient failures counted when it changed."""
    retry_in: float
    """Seconds until an open circuit lets a probe through (0 unless ``new`` is ``open``)."""

    def message(self) -> str:
        extra = f", probe in {self.retry_in:.3g}s" if self.new == "open" else ""
        return (
            f"breaker {self.source}: {self.old} -> {self.new} "
            f"({self.failures} consecutive failures{extra})"
        )


Event: TypeAlias = (
    FetchStarted
    | FetchFinished
    | CacheDecided
    | AttemptStarted
    | AttemptFinished
    | RetryScheduled
    | ResponseRecorded
    | StaleServed
    | CooldownStarted
    | RateAdjusted
    | BreakerStateChanged
)
"""Every event a hook may receive (match on the class)."""


class Hook(Protocol):
    """Something called with every :data:`Event`, synchronously, where it happens.

    ```python
    def on_event(event: telemetry.Event) -> None:
        if isinstance(event, telemetry.RetryScheduled):
            print(event.source, event.wait, event.reason)

    registry.add_hook(on_event)            # every session of this registry
    AsyncSession("example", ..., hooks=[on_event])   # or one session
    ```
    Keep it quick and non-blocking (it runs on the event loop, in the fetch's task); an
    exception it raises is logged (``mxm_dataio_async.hooks``) and otherwise ignored.
    """

    def __call__(self, event: Event, /) -> None: ...


_EXTRA_CACHE: dict[type[Any], tuple[str, ...]] = {}


def _fields_of(event: Any) -> tuple[str, ...]:
    names = _EXTRA_CACHE.get(type(event))
    if names is None:
        names = _EXTRA_CACHE[type(event)] = tuple(f.name for f in fields(event))
    return names


class Telemetry:
    """The hooks of one session (its registry's, then its own) and the logs: ``wants(cls)``
    before building an event, ``emit(event)`` to deliver it."""

    __slots__ = ("hooks",)

    def __init__(self, hooks: tuple[Hook, ...] = ()) -> None:
        self.hooks = hooks

    def watching(self) -> bool:
        """Whether anyone listens for the per-request events (``FetchStarted``,
        ``CacheDecided``, ``AttemptStarted``, ``AttemptFinished``, ``FetchFinished``: all DEBUG
        on ``mxm_dataio_async.fetch``): the pipeline asks once per fetch and once per producer."""
        return bool(self.hooks) or _FETCH.isEnabledFor(logging.DEBUG)

    def wants(self, cls: type[Event]) -> bool:
        """Whether anyone listens for events of ``cls`` (a hook, or its logger at its level)."""
        return bool(self.hooks) or cls.logger.isEnabledFor(cls.level)

    def emit(self, event: Event) -> None:
        logger = event.logger
        if logger.isEnabledFor(event.level):
            extra = {name: getattr(event, name) for name in _fields_of(event)}
            extra["event"] = type(event).__name__
            logger.log(event.level, event.message(), extra=extra)
        for hook in self.hooks:
            try:
                hook(event)
            except Exception:
                _HOOKS.exception("hook %r failed on %s", hook, type(event).__name__)
