"""The one exception tree of mxm-dataio-async.

```
DataIOError
├── AdapterNotFound      (also KeyError)     unknown source name
├── CapabilityError      (also TypeError)    adapter lacks fetch / send / stream
├── CoordinationError                        Redis (shared by worker processes) did not answer
├── CacheMiss            (also LookupError)  only_if_cached and nothing stored
├── TransientError                           raised by adapters: "try again", optional retry_after
├── FetchError                               final failure of one request (request, attempts, cause)
│   └── CircuitOpen                          the source's circuit breaker is open: not attempted
├── IntegrityError                           stored bytes do not match their checksum
├── LeaseHeld                                another run holds the job's lease
├── ClaimLost                                a worker's claim on a chunk expired: nothing recorded
├── RunMismatch          (also ValueError)   a worker's job file differs from its run's
├── UsageError           (also RuntimeError) misuse: a session entered twice, used when closed
│   └── StoreClosedError (also StoreError)   the store is not open (never opened, or closed)
└── StoreError                               the store cannot be opened, read or written
```

Dependency exceptions (aiohttp, sqlite3/aiosqlite, OSError from payload files) are translated at
the boundary that calls the dependency and chained with ``raise ... from exc``; they never escape
raw through the public API.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping
    from datetime import datetime

    from mxm_dataio_async._models import Request

__all__ = [
    "AdapterNotFound",
    "CacheMiss",
    "CapabilityError",
    "CircuitOpen",
    "ClaimLost",
    "CoordinationError",
    "DataIOError",
    "FetchError",
    "IntegrityError",
    "LeaseHeld",
    "RunMismatch",
    "StoreClosedError",
    "StoreError",
    "TransientError",
    "UsageError",
]


class DataIOError(Exception):
    """Root of every error raised by mxm-dataio-async."""


class AdapterNotFound(DataIOError, KeyError):
    """No adapter is registered under the requested source name."""

    def __init__(self, name: str, registered: list[str]) -> None:
        self.name = name
        self.registered = registered
        names = ", ".join(registered) if registered else "(none)"
        super().__init__(f"unknown source {name!r}; registered: {names}")

    def __str__(self) -> str:  # KeyError would repr() the message otherwise
        return str(self.args[0])


class CapabilityError(DataIOError, TypeError):
    """The adapter registered for a source does not implement the requested capability."""


class CoordinationError(DataIOError):
    """The Redis that worker processes share (global rate gates, cross-process coalescing) did
    not answer, or refused a command. A gate fails closed on it (no grant without Redis) unless it
    was told to fall back to a local share of the rate; the message names the server."""


class CacheMiss(DataIOError, LookupError):
    """``only_if_cached`` was requested and the store holds no usable response."""

    def __init__(self, message: str, *, request: Request | None = None) -> None:
        super().__init__(message)
        self.request = request


class TransientError(DataIOError):
    """Raised by an adapter for a failure worth retrying (timeouts, 429, 5xx, resets).

    ``retry_after`` (seconds) is the upstream's own hint, e.g. from a ``Retry-After`` header; the
    retry loop never waits less than it, and the source's limiter pauses the whole source until
    then.
    ``transport_status`` is the upstream status code when there was one. What the upstream
    answered goes on the attempt's error row: ``url`` (the URL that answered), ``headers`` (its
    response headers, e.g. the ``Retry-After`` value) and ``body`` (the start of its body, e.g. an
    API's JSON error detail; the adapter caps it). The recorder redacts them before they are
    stored. ``not_sent`` says the request provably never reached the upstream (the connection
    could not be made): even a request that is not safe to repeat (a POST) may be retried then.
    """

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        transport_status: int | None = None,
        url: str | None = None,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
        not_sent: bool = False,
    ) -> None:
        super().__init__(message)
        if retry_after is not None and retry_after < 0:
            retry_after = 0.0
        self.retry_after = retry_after
        self.transport_status = transport_status
        self.url = url
        self.headers = headers
        self.body = body
        self.not_sent = not_sent


class FetchError(DataIOError):
    """A request failed for good: the adapter raised, or every retry was spent.

    ``request`` is the request that failed, ``attempts`` how many attempts reached the adapter, and
    ``__cause__`` the last underlying error. ``transport_status`` is the upstream status when known.
    """

    def __init__(
        self,
        message: str,
        *,
        request: Request | None = None,
        attempts: int = 0,
        transport_status: int | None = None,
        response_id: str | None = None,
        url: str | None = None,
    ) -> None:
        super().__init__(message)
        self.request = request
        self.attempts = attempts
        self.transport_status = transport_status
        self.response_id = response_id
        self.url = url  # the URL that failed, when an adapter knows it (recorded on the error row)


class CircuitOpen(FetchError):
    """The source's circuit breaker is open (its upstream kept failing): the request failed at
    once, without calling the adapter or spending rate budget. ``retry_in``: seconds until the
    breaker lets a probe through. A ``FetchError`` (and so a ``DataIOError``)."""

    def __init__(
        self,
        message: str,
        *,
        source: str,
        retry_in: float,
        request: Request | None = None,
        attempts: int = 0,
    ) -> None:
        super().__init__(message, request=request, attempts=attempts)
        self.source = source
        self.retry_in = retry_in


class IntegrityError(DataIOError):
    """Stored payload bytes do not match their recorded sha256 (or are missing)."""


class LeaseHeld(DataIOError):
    """A job's lease is held by another live run (``holder``) until ``expires_at`` (UTC)."""

    def __init__(self, name: str, holder: str, expires_at: datetime) -> None:
        self.name = name
        self.holder = holder
        self.expires_at = expires_at
        super().__init__(
            f"{name!r} is already running: its lease is held by {holder} until "
            f"{expires_at:%Y-%m-%d %H:%M:%S} UTC (renewed while that run lives); wait for it "
            "to finish, or let this run wait for the lease"
        )


class StoreError(DataIOError):
    """The store could not be opened, read or written (permissions, disk full, not SQLite...)."""


class UsageError(DataIOError, RuntimeError):
    """The API was used out of order: a session entered twice, a closed session or store used,
    a request built by another session. The message says what to do instead."""


class StoreClosedError(UsageError, StoreError):
    """An operation was attempted on a store that is not open (never opened, or closed)."""


class ClaimLost(DataIOError):
    """A worker's claim on a chunk of a run expired or was taken over by another worker, so what
    it tried to record under that claim was not written (nothing of it is in the store)."""


class RunMismatch(DataIOError, ValueError):
    """A worker joined a run whose recorded configuration differs from its own job file."""
