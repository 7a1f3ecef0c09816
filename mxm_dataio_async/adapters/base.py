"""What an adapter is: small protocols, each one capability.

An adapter implements any of them; the session checks which at call time and raises
``CapabilityError`` for a missing one. ``aclose()`` is optional and called by the registry that
owns the adapter.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable

from mxm_dataio_async._models import AdapterResult, Request, Response

__all__ = ["Closable", "Fetcher", "Revalidator", "Sender", "Streamer"]


@runtime_checkable
class Fetcher(Protocol):
    """Fetches one request: returns its payload (bare ``bytes``) or an ``AdapterResult``.

    Raise ``TransientError`` for failures worth retrying (timeouts, 429, 5xx); any other exception
    is final and recorded as an error response.
    """

    async def fetch(self, request: Request) -> AdapterResult | bytes: ...


@runtime_checkable
class Sender(Protocol):
    """Sends ``payload`` (exact bytes) for ``request``; returns the upstream's acknowledgement."""

    async def send(self, request: Request, payload: bytes) -> AdapterResult | bytes: ...


@runtime_checkable
class Streamer(Protocol):
    """Yields one ``AdapterResult`` per message of a stream.

    A streamer that resumes a dropped stream by itself (as ``HttpAdapter`` does for server-sent
    events) yields a *drop* before each reconnect: ``AdapterResult(data=b"", error=<why it
    dropped>, adapter_meta={"reconnect": {"last_event_id": <the id it resumes from, or None>,
    "attempt": <n, from 1>}}, url=<the stream's URL>)``. A result with ``error`` set is never a
    message: the session records it as an error row of the stream and does not hand it to the
    caller. Raising ends the stream.
    """

    def stream(self, request: Request) -> AsyncIterator[AdapterResult]: ...


@runtime_checkable
class Revalidator(Protocol):
    """Conditional fetch for ``cache_mode="revalidate"``.

    Given the stored response (its headers carry ETag / Last-Modified), return either a fresh
    ``AdapterResult`` or one with ``not_modified=True`` when the stored payload is still current.
    Adapters without it are simply fetched again in revalidate mode.
    """

    async def revalidate(self, request: Request, cached: Response) -> AdapterResult | bytes: ...


@runtime_checkable
class Closable(Protocol):
    async def aclose(self) -> None: ...
