"""AsyncSession: one logical run against one source, recording everything it does.

The session is the facade and the lifecycle: it opens (an owned store, the session's row, a task
group for bulk work), builds the :class:`Pipeline` every request goes through, and on exit waits
for the fetches it started before it records its end. What a request does is in ``_pipeline.py``;
what is written, in ``_recorder.py``.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import AsyncGenerator, AsyncIterable, Iterable, Mapping
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any, Self

import anyio
import anyio.abc

from mxm_dataio_async._bulk import FetchOutcome, fetch_many
from mxm_dataio_async._clock import Clock
from mxm_dataio_async._events import Hook, Telemetry
from mxm_dataio_async._exceptions import CapabilityError, StoreClosedError, UsageError
from mxm_dataio_async._lifecycle import State
from mxm_dataio_async._malloc import settle_malloc
from mxm_dataio_async._models import (
    USE_SESSION_DEFAULT,
    CacheMode,
    Request,
    Response,
    Session,
    UseSessionDefault,
    new_session_id,
)
from mxm_dataio_async._pipeline import Pipeline
from mxm_dataio_async._recorder import Recorder
from mxm_dataio_async._registry import Registry, SourceEntry, default_registry
from mxm_dataio_async._request import (
    build_request,
    check_cache_mode,
    check_stale_if_error,
    check_ttl,
)
from mxm_dataio_async._statistics import SourceStatistics, statistics_of
from mxm_dataio_async._store import Store
from mxm_dataio_async._store._work import Fence

__all__ = ["AsyncSession"]


class AsyncSession:
    """One run against one source: fetch, send and stream, every interaction recorded.

    ```python
    async with AsyncSession("example", root="./data") as s:
        resp = await s.fetch(s.request("quote", endpoint="/quote", params={"symbol": "CSPX.L"}))
        body = await s.read(resp)
    ```
    ``cache_mode``, ``ttl`` (seconds), ``as_of_bucket`` and ``cache_tag`` are the defaults for the
    session's requests; ``request(...)`` overrides them per request. Pass ``store=`` to share an
    open Store, or ``root=`` to have the session open and close its own. Sessions sharing a
    Registry and a Store share the source's rate gate and coalesce duplicate fetches with each
    other; ``clock`` defaults to the registry's.

    ``stale_if_error`` (seconds, or ``True`` for any age): when the upstream fails after its
    retries, or the source's circuit breaker is open, answer with the newest stored OK response
    no older than that, flagged ``Response.stale`` and recorded as a ``stale`` row;
    ``request(..., stale_if_error=...)`` overrides it. ``hooks`` are called with every event
    of this session, after the registry's (see :mod:`mxm_dataio_async.telemetry`).
    ``http_freshness=True``: a request without a TTL treats a stored response as fresh for as
    long as its own ``Cache-Control`` (``max-age``; ``no-cache``, ``no-store``: never) or
    ``Expires`` says, as an HTTP cache would (no such header: forever, as without it).
    """

    def __init__(
        self,
        source: str,
        *,
        store: Store | None = None,
        root: str | None = None,
        registry: Registry | None = None,
        cache_mode: CacheMode | str = CacheMode.DEFAULT,
        ttl: float | None = None,
        as_of_bucket: str | None = None,
        cache_tag: str | None = None,
        as_of: str | None = None,
        clock: Clock | None = None,
        stale_if_error: float | bool | None = None,
        hooks: Iterable[Hook] = (),
        http_freshness: bool = False,
    ) -> None:
        if not isinstance(source, str) or not source:
            raise TypeError(f"source must be a non-empty str, got {source!r}")
        if (store is None) == (root is None):
            raise TypeError("pass exactly one of store= (an open Store) or root= (a directory)")
        self.source = source
        self._registry = registry if registry is not None else default_registry
        self._entry: SourceEntry = self._registry.entry(source)  # AdapterNotFound early
        self._store = store if store is not None else Store(root)
        self._owns_store = store is None
        if self._store.stand_in is not None:  # a store answering for the upstream (replay)
            self._entry = self._store.stand_in(self._entry)
        self._clock = clock if clock is not None else self._registry.clock
        self.cache_mode = check_cache_mode(cache_mode)
        self.ttl = check_ttl(ttl)
        self.as_of_bucket = as_of_bucket
        self.cache_tag = cache_tag
        self.stale_if_error = check_stale_if_error(stale_if_error)
        self.http_freshness = http_freshness
        hooks = (*self._registry.hooks, *hooks)
        if not all(callable(hook) for hook in hooks):
            raise TypeError("hooks must be callables taking an event")
        telemetry = Telemetry(hooks)
        self._state = State.UNOPENED
        self.id = new_session_id()
        """The session's id (``session.id``): every request it builds carries it."""
        record = Session(
            id=self.id,
            source=source,
            as_of=as_of,
            started_at=self._clock.now(),
            cache_mode=self.cache_mode,
            host=socket.gethostname(),
            pid=os.getpid(),
        )
        # Validates as_of_bucket and cache_tag the way every request will.
        build_request(
            session_id=self.id,
            source=source,
            kind="_check",
            as_of_bucket=as_of_bucket,
            cache_tag=cache_tag,
        )
        self._recorder = Recorder(
            self._store.metadata, record, self._entry.redaction, self._clock, telemetry
        )
        self._pipeline = Pipeline(
            entry=self._entry,
            store=self._store,
            recorder=self._recorder,
            coalescer=self._registry.coalescer(self._store),
            clock=self._clock,
            owner=self,
            telemetry=telemetry,
        )
        self._started = self._clock.monotonic()
        self._stack: AsyncExitStack | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._bulk_scopes: set[anyio.CancelScope] = set()
        self.interrupted: str | None = None
        """Why the session is being stopped, e.g. ``"interrupted (SIGINT)"``: set it before
        cancelling the session's work and its row ends ``cancelled`` with this reason."""

    def __repr__(self) -> str:
        return (
            f"<AsyncSession source={self.source!r} id={self.id} "
            f"state={self._state} cache_mode={self.cache_mode.value}>"
        )

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def session(self) -> Session:
        """The persisted Session record (with the live counts while open)."""
        return self._recorder.session

    def statistics(self) -> SourceStatistics:
        """Live counts of this session and the state of its source: requests, fetched, cache
        hits, retries, failures, stale answers, bytes, the achieved rate of upstream fetches,
        time spent waiting for the rate gate, the gate's snapshot and the breaker's state."""
        return statistics_of(self._recorder, self._entry, self._clock.monotonic() - self._started)

    @property
    def store(self) -> Store:
        return self._store

    @property
    def state(self) -> State:
        return self._state

    async def __aenter__(self) -> Self:
        if self._state is not State.UNOPENED:
            raise UsageError("an AsyncSession can be entered once; create a new one")
        self._state = State.CLOSED  # until fully open: a failed enter leaves a closed session
        settle_malloc()  # the loop's socket reads from malloc's heap, not an mmap each (_malloc.py)
        async with AsyncExitStack() as stack:
            if self._owns_store:
                await self._store.open()
                stack.push_async_callback(self._store.aclose)
            elif not self._store.is_open:
                raise StoreClosedError(
                    "the store passed to AsyncSession is not open; use `async with Store(...)`"
                )
            await self._recorder.start()
            # The task group of bulk work is exited by _close() itself (not by the stack): it
            # waits for the fetches this session started first.
            tg = anyio.create_task_group()
            await tg.__aenter__()
            self._tg = tg
            self._stack = stack.pop_all()  # fully open: aclose() unwinds it from here on
        self._state = State.OPEN
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._close(exc)

    async def aclose(self) -> None:
        """Wait for in-flight work, record the session's end, close an owned store.

        Must be called from the task that entered the session (anyio's task-group rule).
        """
        await self._close(None)

    async def _close(self, exc: BaseException | None) -> None:
        if self._state is not State.OPEN:
            self._state = State.CLOSED
            return
        self._state = State.CLOSED
        stack, self._stack = self._stack, None
        tg, self._tg = self._tg, None
        assert stack is not None and tg is not None
        for scope in self._bulk_scopes:
            scope.cancel()  # fetch_many loops whose consumer has gone: nobody reads their results
        try:
            if exc is not None:
                tg.cancel_scope.cancel()
            # The fetches this session started finish (on error: are cancelled, unless another
            # session still waits for them) before the session's end is recorded.
            await self._registry.coalescer(self._store).join(self, cancel=exc is not None)
            # The body's own exception is not handed to the group: it propagates unchanged from
            # __aexit__ instead of being wrapped in an ExceptionGroup.
            await tg.__aexit__(None, None, None)
        finally:
            try:
                await self._recorder.end(exc, interrupted=self.interrupted)
            finally:
                await stack.aclose()  # closes an owned store

    def _require_open(self) -> None:
        if self._state is not State.OPEN:
            raise UsageError(
                f"session {self.id} ({self.source}) {self._state.describe()}; "
                "use `async with AsyncSession(...)`"
            )

    # -- requests -------------------------------------------------------------------------------

    def request(
        self,
        kind: str,
        *,
        endpoint: str | None = None,
        params: Mapping[str, Any] | None = None,
        method: str = "GET",
        body: Any = None,
        headers: Mapping[str, str] | None = None,
        as_of_bucket: str | UseSessionDefault | None = USE_SESSION_DEFAULT,
        cache_tag: str | UseSessionDefault | None = USE_SESSION_DEFAULT,
        ttl: float | UseSessionDefault | None = USE_SESSION_DEFAULT,
        cache_mode: CacheMode | str | UseSessionDefault = USE_SESSION_DEFAULT,
        retry_unsafe: bool = False,
        stale_if_error: float | bool | UseSessionDefault | None = USE_SESSION_DEFAULT,
        http_freshness: bool | UseSessionDefault = USE_SESSION_DEFAULT,
    ) -> Request:
        """Build a request (validated, identity computed; no I/O).

        ``as_of_bucket``, ``cache_tag``, ``ttl`` and ``cache_mode`` default to the session's; pass
        ``None`` explicitly to clear one. Non-JSON params or body raise ``TypeError`` or
        ``ValueError``. ``retry_unsafe=True``: retry this POST/PATCH (or request with a body)
        after any transient failure, as if it were safe to repeat (see ``RetryPolicy``).
        ``stale_if_error`` (seconds, ``True``, or ``None``) and ``http_freshness`` override
        the session's.
        """
        if self._state is State.CLOSED:
            self._require_open()
        return build_request(
            session_id=self.id,
            source=self.source,
            kind=kind,
            endpoint=endpoint,
            params=params,
            method=method,
            body=body,
            headers=headers,
            as_of_bucket=self.as_of_bucket
            if isinstance(as_of_bucket, UseSessionDefault)
            else as_of_bucket,
            cache_tag=self.cache_tag if isinstance(cache_tag, UseSessionDefault) else cache_tag,
            ttl=self.ttl if isinstance(ttl, UseSessionDefault) else ttl,
            cache_mode=self.cache_mode if isinstance(cache_mode, UseSessionDefault) else cache_mode,
            redaction=self._entry.redaction,
            retry_unsafe=retry_unsafe,
            stale_if_error=self.stale_if_error
            if isinstance(stale_if_error, UseSessionDefault)
            else check_stale_if_error(stale_if_error),
            http_freshness=self.http_freshness
            if isinstance(http_freshness, UseSessionDefault)
            else http_freshness,
        )

    def _check_request(self, request: Request) -> None:
        if not isinstance(request, Request):
            raise TypeError(
                f"expected a Request from session.request(...), got {type(request).__name__}"
            )
        if request.session_id != self.id:
            raise ValueError(
                f"{request!r} was built by another session ({request.session_id}); "
                "build it with this session's request()"
            )

    # -- fetch, read, send, stream --------------------------------------------------------------

    async def fetch(self, request: Request, *, fence: Fence | None = None) -> Response:
        """Fetch ``request`` under its cache mode; returns once the response is durable.

        Raises ``CacheMiss`` (only_if_cached, nothing stored), ``FetchError`` (the adapter failed
        for good; every attempt is recorded), ``CapabilityError`` (the adapter cannot fetch).
        ``fence`` is for workers sharing a run (``Claim.fence(index)``): what this fetch records
        commits only while the claim holds, else ``ClaimLost`` and nothing is written; a
        recorded answer marks the plan index done in the same transaction.
        """
        self._require_open()
        self._check_request(request)
        if not self._entry.can_fetch:
            raise CapabilityError(f"the adapter for {self.source!r} cannot fetch (no fetch())")
        return await self._pipeline.fetch(request, fence=fence)

    async def read(self, response: Response) -> bytes:
        """The exact payload bytes of ``response``, verified (``IntegrityError`` if corrupt)."""
        if response.payload is not None:
            return response.payload
        self._require_open()
        return await self._store.read(response)

    async def send(self, request: Request, payload: bytes) -> Response:
        """Send ``payload`` for ``request``; the acknowledgement is recorded, never cached.

        A send is attempted once: a non-idempotent upload is never repeated behind your back.
        The sent bytes are recorded too (``requests.sent_checksum``).
        """
        self._require_open()
        self._check_request(request)
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise TypeError(f"payload must be bytes, not {type(payload).__name__}")
        if not self._entry.can_send:
            raise CapabilityError(f"the adapter for {self.source!r} cannot send (no send())")
        return await self._pipeline.send(request, bytes(payload))

    async def stream(self, request: Request) -> AsyncGenerator[Response, None]:
        """Yield one recorded Response per message, with ``sequence`` 0, 1, 2, ...

        Each message is durable before it is yielded. The stream holds one of the source's
        concurrency slots while open. An adapter error is recorded and raised as ``FetchError``.
        """
        self._require_open()
        self._check_request(request)
        if not self._entry.can_stream:
            raise CapabilityError(f"the adapter for {self.source!r} cannot stream (no stream())")
        async with contextlib.aclosing(self._pipeline.stream(request)) as messages:
            async for message in messages:
                yield message

    # -- bulk -----------------------------------------------------------------------------------

    async def fetch_many(
        self,
        requests: Iterable[Request] | AsyncIterable[Request],
        *,
        concurrency: int = 64,
        return_exceptions: bool = True,
    ) -> AsyncGenerator[FetchOutcome, None]:
        """Fetch many requests, at most ``concurrency`` at once, yielding outcomes as they finish.

        The input (sync or async iterable) is pulled lazily, so memory stays flat for any number of
        requests. With ``return_exceptions=False`` the first failure is raised (and the rest are
        cancelled); otherwise failures arrive as outcomes with ``error`` set. Leaving the loop early
        cancels the in-flight work cleanly.

        ```python
        async for outcome in s.fetch_many(s.request("bar", params={"d": d}) for d in days):
            if outcome.ok:
                rows.append(await s.read(outcome.response))
        ```
        """
        self._require_open()
        assert self._tg is not None
        async with contextlib.aclosing(
            fetch_many(
                self.fetch,
                requests,
                concurrency=concurrency,
                return_exceptions=return_exceptions,
                task_group=self._tg,
                scopes=self._bulk_scopes,
            )
        ) as outcomes:
            async for outcome in outcomes:
                yield outcome
