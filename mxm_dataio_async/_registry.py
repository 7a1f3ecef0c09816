"""Which adapter serves which source, with that source's rate gate and retry policy.

A source's rate gate lives here, on its registration, so every session of that source in the
process shares one budget; and the registry keeps one coalescer per Store it is used with, so
every session on the same Registry and Store joins every other's in-flight duplicates. Given a
Redis (``Registry(redis=...)``), both reach across processes: the gates it builds are global and
its coalescers wait for identical requests in flight in other processes. That choice is made
here, in one place; nothing else knows whether Redis is involved.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import anyio

from mxm_dataio_async._breaker import Circuit, CircuitBreaker
from mxm_dataio_async._clock import SYSTEM_CLOCK, Clock
from mxm_dataio_async._coalesce import Coalescer
from mxm_dataio_async._events import Hook
from mxm_dataio_async._exceptions import AdapterNotFound
from mxm_dataio_async._limits import RateGate, RateLimit, SourceLimiter
from mxm_dataio_async._redact import Redaction
from mxm_dataio_async._retry import RetryPolicy
from mxm_dataio_async.adapters.base import Closable, Fetcher, Revalidator, Sender, Streamer

if TYPE_CHECKING:
    from mxm_dataio_async._models import Response
    from mxm_dataio_async._redis import RedisCoordination

__all__ = [
    "Registry",
    "SourceEntry",
    "default_registry",
    "list_registered",
    "register",
    "resolve_adapter",
    "unregister",
]

DEFAULT_RETRY = RetryPolicy()


@dataclass(frozen=True, slots=True)
class SourceEntry:
    """A registered source: its adapter, capabilities (checked once), rate gate and retry policy."""

    name: str
    adapter: Any
    gate: RateGate
    retry: RetryPolicy
    redaction: Redaction
    can_fetch: bool = field(default=False)
    can_send: bool = field(default=False)
    can_stream: bool = field(default=False)
    can_revalidate: bool = field(default=False)
    circuit: Circuit | None = field(default=None)  # the source's breaker, if it has one
    adaptive: bool = field(default=False)  # its gate adapts its rate to 429/503 answers


class Registry:
    """Maps source names to adapters.

    ```python
    registry = Registry()
    registry.register("example", HttpAdapter(base_url="http://127.0.0.1:8080"),
                      rate_limit=RateLimit(10, per=1.0, burst=1), max_concurrency=8,
                      retry=RetryPolicy(max_attempts=5))
    ```
    Used as ``async with Registry() as registry:``, it closes its adapters on exit. ``clock``
    drives the rate gates it builds and the retry waits and TTL decisions of its sessions.

    ``redis`` (a ``redis://`` URL or a :class:`~mxm_dataio_async.redis.RedisCoordination`; the
    ``redis`` extra) shares limits and in-flight requests with every process on that Redis and
    prefix: each source registered with ``rate_limit`` or ``max_concurrency`` gets a
    :class:`~mxm_dataio_async.redis.RedisRateGate` (the rate and cooldowns global, the
    concurrency cap per process), and coalescing reaches across processes. The registry closes
    that Redis client in ``aclose()``.

    ``hooks`` (or ``add_hook``) are called with every event of every session created on this
    registry afterwards (see :mod:`mxm_dataio_async.telemetry`).
    """

    def __init__(
        self,
        *,
        clock: Clock = SYSTEM_CLOCK,
        redis: RedisCoordination | str | None = None,
        hooks: Iterable[Hook] = (),
    ) -> None:
        self.clock = clock
        self.redis = _coordination(redis)
        self.hooks: list[Hook] = []
        for hook in hooks:
            self.add_hook(hook)
        self._entries: dict[str, SourceEntry] = {}
        self._coalescers: weakref.WeakKeyDictionary[
            object, Coalescer[tuple[str, bool, str], Response]
        ]
        self._coalescers = weakref.WeakKeyDictionary()

    def __repr__(self) -> str:
        return f"<Registry {', '.join(self._entries) or '(empty)'}>"

    def add_hook(self, hook: Hook) -> None:
        """Call ``hook`` with every event of the sessions created on this registry from now on."""
        if not callable(hook):
            raise TypeError(f"a hook must be callable with an event, got {type(hook).__name__}")
        self.hooks.append(hook)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def register(
        self,
        name: str,
        adapter: object,
        *,
        rate_limit: RateLimit | None = None,
        max_concurrency: int | None = None,
        retry: RetryPolicy | None = None,
        gate: RateGate | None = None,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        """Register ``adapter`` under ``name``. A taken name raises ``ValueError``.

        ``rate_limit`` and ``max_concurrency`` build the source's gate on the registry's clock:
        in-process (a :class:`SourceLimiter`), or shared by every process
        (a ``RedisRateGate``) when the registry has a Redis; ``gate`` passes one of your own
        instead (any :class:`RateGate`). ``breaker`` (a :class:`CircuitBreaker`) stops calling
        the source while it keeps failing (off by default).
        """
        if not isinstance(name, str) or not name:
            raise TypeError(f"source name must be a non-empty str, got {name!r}")
        if "\x00" in name:
            raise ValueError(f"source name must not contain NUL characters: {name!r}")
        if name in self._entries:
            raise ValueError(f"source {name!r} is already registered; unregister it first")
        if rate_limit is not None and not isinstance(rate_limit, RateLimit):
            raise TypeError(f"rate_limit must be a RateLimit, got {type(rate_limit).__name__}")
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise TypeError(f"retry must be a RetryPolicy, got {type(retry).__name__}")
        if breaker is not None and not isinstance(breaker, CircuitBreaker):
            raise TypeError(f"breaker must be a CircuitBreaker, got {type(breaker).__name__}")
        if rate_limit is not None and rate_limit.adaptive and self.redis is not None:
            raise ValueError(
                f"source {name!r}: an adaptive rate limit is per process and cannot be shared "
                "through Redis; drop adaptive=True or register it on a registry without redis="
            )
        if gate is not None:
            if not isinstance(gate, RateGate):
                raise TypeError(
                    f"gate must have slot(), cooldown() and statistics(), got {type(gate).__name__}"
                )
            if rate_limit is not None or max_concurrency is not None:
                raise ValueError("pass either gate= or rate_limit=/max_concurrency=, not both")
        caps = {
            "can_fetch": isinstance(adapter, Fetcher),
            "can_send": isinstance(adapter, Sender),
            "can_stream": isinstance(adapter, Streamer),
            "can_revalidate": isinstance(adapter, Revalidator),
        }
        if not (caps["can_fetch"] or caps["can_send"] or caps["can_stream"]):
            raise TypeError(
                f"{type(adapter).__name__} is not an adapter: it has none of "
                "fetch(request), send(request, payload) or stream(request)"
            )
        extra = getattr(adapter, "redaction", None)
        redaction = Redaction().merge(extra) if isinstance(extra, Redaction) else Redaction()
        if gate is None:
            gate = self._gate(name, rate_limit, max_concurrency)
        self._entries[name] = SourceEntry(
            name=name,
            adapter=adapter,
            gate=gate,
            retry=retry if retry is not None else DEFAULT_RETRY,
            redaction=redaction,
            **caps,
            circuit=None if breaker is None else Circuit(breaker),
            adaptive=isinstance(gate, SourceLimiter) and gate.adaptive,
        )

    def _gate(
        self, name: str, rate_limit: RateLimit | None, max_concurrency: int | None
    ) -> RateGate:
        if self.redis is not None and (rate_limit is not None or max_concurrency is not None):
            from mxm_dataio_async._redis import RedisRateGate

            return RedisRateGate(self.redis, name, rate_limit, max_concurrency, clock=self.clock)
        return SourceLimiter(
            rate_limit, max_concurrency, clock=self.clock.monotonic, sleep=self.clock.sleep
        )

    def unregister(self, name: str) -> object:
        """Remove a source and return its adapter (the caller closes it if needed)."""
        try:
            return self._entries.pop(name).adapter
        except KeyError:
            raise AdapterNotFound(name, self.list_registered()) from None

    def entry(self, name: str) -> SourceEntry:
        try:
            return self._entries[name]
        except KeyError:
            raise AdapterNotFound(name, self.list_registered()) from None

    def gate(self, name: str) -> RateGate:
        """The rate gate of source ``name`` (``gate(name).statistics()`` for monitoring)."""
        return self.entry(name).gate

    def resolve_adapter(self, name: str) -> object:
        """The adapter registered under ``name``; ``AdapterNotFound`` lists the known names."""
        return self.entry(name).adapter

    def list_registered(self) -> list[str]:
        return sorted(self._entries)

    def coalescer(self, store: object) -> Coalescer[tuple[str, bool, str], Response]:
        """The single-flight of every session using this registry with ``store`` (with a Redis,
        a ``RedisCoalescer``: also across processes)."""
        found = self._coalescers.get(store)
        if found is None:
            redis = self.redis
            if redis is not None and redis.coalesce:
                from mxm_dataio_async._redis import RedisCoalescer, ResponseLookup

                if isinstance(store, ResponseLookup):
                    found = RedisCoalescer(redis, store, clock=self.clock)
            if found is None:
                found = Coalescer()
            self._coalescers[store] = found
        return found

    async def aclose(self) -> None:
        """Close every adapter that has ``aclose()``, and the Redis client, shielded from
        cancellation; one that fails does not keep the others open (the first error is raised
        after all were tried)."""
        errors: list[Exception] = []
        with anyio.CancelScope(shield=True):
            for entry in list(self._entries.values()):
                if isinstance(entry.adapter, Closable):
                    try:
                        await entry.adapter.aclose()
                    except Exception as exc:
                        errors.append(exc)
            if self.redis is not None:
                try:
                    await self.redis.aclose()
                except Exception as exc:
                    errors.append(exc)
        if errors:
            raise errors[0]

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def _coordination(redis: RedisCoordination | str | None) -> RedisCoordination | None:
    if redis is None:
        return None
    from mxm_dataio_async._redis import RedisCoordination  # the redis extra, only when asked

    if isinstance(redis, str):
        return RedisCoordination(redis)
    if not isinstance(redis, RedisCoordination):
        raise TypeError(
            f"redis must be a redis:// URL or a RedisCoordination, got {type(redis).__name__}"
        )
    return redis


#: The module's default registry, used by sessions created without ``registry=``.
default_registry = Registry()


def register(
    name: str,
    adapter: object,
    *,
    rate_limit: RateLimit | None = None,
    max_concurrency: int | None = None,
    retry: RetryPolicy | None = None,
    breaker: CircuitBreaker | None = None,
) -> None:
    """Register ``adapter`` under ``name`` in the default registry."""
    default_registry.register(
        name,
        adapter,
        rate_limit=rate_limit,
        max_concurrency=max_concurrency,
        retry=retry,
        breaker=breaker,
    )


def unregister(name: str) -> object:
    """Remove ``name`` from the default registry and return its adapter."""
    return default_registry.unregister(name)


def resolve_adapter(name: str) -> object:
    """The adapter registered under ``name`` in the default registry."""
    return default_registry.resolve_adapter(name)


def list_registered() -> list[str]:
    """The names registered in the default registry, sorted."""
    return default_registry.list_registered()
