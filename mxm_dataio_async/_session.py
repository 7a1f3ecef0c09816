"""AsyncSession: one logical run against one source, recording everything it does."""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import AsyncGenerator, AsyncIterable, Iterable, Mapping
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any, Final, Self

import anyio
import anyio.abc

from mxm_dataio_async._bulk import FetchOutcome, fetch_many
from mxm_dataio_async._coalesce import Coalescer
from mxm_dataio_async._exceptions import (
    CacheMiss,
    CapabilityError,
    DataIOError,
    FetchError,
    StoreClosedError,
    StoreError,
    TransientError,
)
from mxm_dataio_async._models import (
    USE_SESSION_DEFAULT,
    AdapterResult,
    Body,
    CacheMode,
    Request,
    Response,
    ResponseStatus,
    Session,
    SessionStatus,
    UseSessionDefault,
    new_id,
    new_session_id,
    served_from_cache,
    utcnow,
)
from mxm_dataio_async._policy import Action, Decision, decide, needs_lookup, persists
from mxm_dataio_async._recent import Recent
from mxm_dataio_async._registry import Registry, SourceEntry, default_registry
from mxm_dataio_async._request import build_request, check_cache_mode, check_ttl
from mxm_dataio_async._retry import retry_waits_disabled, run_with_retries
from mxm_dataio_async._store import Recording, StagedPayload, Store

__all__ = ["AsyncSession"]

_UNOPENED, _OPEN, _CLOSED = "unopened", "open", "closed"
_MAX_ERROR_TEXT: Final = 2000
# Recently recorded responses kept per session: the lookup/commit race window is one lookup long,
# so a few thousand entries cover it under any load (between 4,096 and 8,192 are kept).
_RECENT_MAX: Final = 4096
# Inline payloads this session recorded, kept so that read() right after fetch() needs no trip to
# SQLite's thread: up to 2 x 4 MiB of the most recent ones (the bytes the store hashed).
_RECENT_PAYLOAD_BYTES: Final = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class _Fetched:
    """An adapter attempt that produced a payload (staged, not yet recorded)."""

    result: AdapterResult
    staged: StagedPayload | None
    data: bytes | None  # kept in memory only for ephemeral (never) fetches
    attempt: int
    elapsed_ms: float


def _error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text[:_MAX_ERROR_TEXT]


async def _in_memory(data: Body) -> bytes:
    if isinstance(data, bytes | bytearray | memoryview):
        return bytes(data)
    parts = [bytes(chunk) async for chunk in data]
    return b"".join(parts)


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0


def _identity_of(staged: StagedPayload | None, data: bytes | None) -> tuple[str, int]:
    """``(checksum, size)`` of a payload, staged in the store or held in memory."""
    if staged is not None:
        return staged.checksum, staged.size
    assert data is not None
    return hashlib.sha256(data).hexdigest(), len(data)


def _as_result(value: object, what: str) -> AdapterResult:
    if isinstance(value, AdapterResult):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return AdapterResult(data=bytes(value))
    raise TypeError(
        f"adapter {what}() must return bytes or AdapterResult, got {type(value).__name__}"
    )


class AsyncSession:
    """One run against one source: fetch, send and stream, every interaction recorded.

    ```python
    async with AsyncSession("example", root="./data") as s:
        resp = await s.fetch(s.request("quote", endpoint="/quote", params={"symbol": "CSPX.L"}))
        body = await s.read(resp)
    ```
    ``cache_mode``, ``ttl`` (seconds), ``as_of_bucket`` and ``cache_tag`` are the defaults for the
    session's requests; ``request(...)`` overrides them per request. Pass ``store=`` to share an
    open Store, or ``root=`` to have the session open and close its own.
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
        self.cache_mode = check_cache_mode(cache_mode)
        self.ttl = check_ttl(ttl)
        # Validated by building a throwaway request below.
        self.as_of_bucket = as_of_bucket
        self.cache_tag = cache_tag
        self._state = _UNOPENED
        self._bulk_scopes: set[anyio.CancelScope] = set()
        self._recent: Recent[str, Response] = Recent(_RECENT_MAX)  # by request hash
        self._recent_payloads: Recent[str, bytes] = Recent(
            _RECENT_MAX, max_weight=_RECENT_PAYLOAD_BYTES, weigh=len
        )  # by checksum
        self._tg: anyio.abc.TaskGroup | None = None
        self._coalescer: Coalescer[tuple[str, bool], Response] | None = None
        self._record = Session(
            id=new_session_id(),
            source=source,
            as_of=as_of,
            started_at=utcnow(),
            cache_mode=self.cache_mode,
        )
        build_request(
            session_id=self._record.id,
            source=source,
            kind="_check",
            as_of_bucket=as_of_bucket,
            cache_tag=cache_tag,
        )
        self._counts = {"requests": 0, "responses": 0, "cache_hits": 0, "errors": 0, "bytes": 0}

    def __repr__(self) -> str:
        return (
            f"<AsyncSession source={self.source!r} id={self._record.id} state={self._state} "
            f"cache_mode={self.cache_mode.value}>"
        )

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def session(self) -> Session:
        """The persisted Session record (with the live counts while open)."""
        c = self._counts
        return replace(
            self._record,
            requests=c["requests"],
            responses=c["responses"],
            cache_hits=c["cache_hits"],
            errors=c["errors"],
            bytes_fetched=c["bytes"],
        )

    @property
    def store(self) -> Store:
        return self._store

    async def __aenter__(self) -> Self:
        if self._state != _UNOPENED:
            raise StoreClosedError("an AsyncSession can be entered once; create a new one")
        self._state = _CLOSED  # until fully open: a failed enter leaves a closed session
        if self._owns_store:
            await self._store.open()
        elif not self._store.is_open:
            raise StoreClosedError(
                "the store passed to AsyncSession is not open; use `async with Store(...)`"
            )
        try:
            await self._store.metadata.save_session(self._record)
            tg = anyio.create_task_group()
            await tg.__aenter__()
        except BaseException:
            if self._owns_store:
                await self._store.aclose()
            raise
        self._tg = tg
        self._coalescer = Coalescer()
        self._state = _OPEN
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._close(exc_type, exc, tb)

    async def aclose(self) -> None:
        """Wait for in-flight work, record the session's end, close an owned store.

        Must be called from the task that entered the session (anyio's task-group rule).
        """
        await self._close(None, None, None)

    async def _close(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._state != _OPEN:
            self._state = _CLOSED
            return
        self._state = _CLOSED
        tg, self._tg = self._tg, None
        assert tg is not None
        for scope in self._bulk_scopes:
            scope.cancel()  # fetch_many loops whose consumer has gone: nobody reads their results
        try:
            if exc is not None:
                tg.cancel_scope.cancel()
            # In-flight producers finish (or, on error, are cancelled) before the session ends.
            if self._coalescer is not None:
                await self._coalescer.aclose(cancel=exc is not None)
            # The body's own exception is not handed to the group: it propagates unchanged from
            # __aexit__ instead of being wrapped in an ExceptionGroup.
            await tg.__aexit__(None, None, None)
        finally:
            self._recent.clear()
            self._recent_payloads.clear()
            try:
                await self._write_end(exc)
            finally:
                if self._owns_store:
                    await self._store.aclose()

    async def _write_end(self, exc: BaseException | None) -> None:
        end = replace(
            self.session,
            ended_at=utcnow(),
            status=SessionStatus.ERROR if exc is not None else SessionStatus.OK,
            error=_error_text(exc) if exc is not None else None,
        )
        self._record = end
        with anyio.CancelScope(shield=True):
            await self._store.metadata.save_session(end)

    def _require_open(self) -> None:
        if self._state != _OPEN:
            what = "was closed" if self._state == _CLOSED else "is not open yet"
            raise StoreClosedError(
                f"session {self._record.id} ({self.source}) {what}; "
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
    ) -> Request:
        """Build a request (validated, identity computed; no I/O).

        ``as_of_bucket``, ``cache_tag``, ``ttl`` and ``cache_mode`` default to the session's; pass
        ``None`` explicitly to clear one. Non-JSON params or body raise ``TypeError`` or
        ``ValueError``.
        """
        if self._state == _CLOSED:
            self._require_open()
        return build_request(
            session_id=self._record.id,
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
        )

    def _check_request(self, request: Request) -> None:
        if not isinstance(request, Request):
            raise TypeError(
                f"expected a Request from session.request(...), got {type(request).__name__}"
            )
        if request.session_id != self._record.id:
            raise ValueError(
                f"{request!r} was built by another session ({request.session_id}); "
                "build it with this session's request()"
            )

    def _persistable(self, request: Request) -> Request:
        """The request as it may be written: secret headers, params and URL credentials redacted."""
        red = self._entry.redaction
        changes: dict[str, Any] = {}
        if request.headers:
            changes["headers"] = red.headers_of(request.headers)
        if any(red.is_secret_param(k) for k in request.params):
            changes["params"] = {
                k: ("[REDACTED]" if red.is_secret_param(k) else v)
                for k, v in request.params.items()
            }
        if request.endpoint and "://" in request.endpoint:
            changes["endpoint"] = red.url(request.endpoint)
        return replace(request, **changes) if changes else request

    # -- fetch ----------------------------------------------------------------------------------

    async def fetch(self, request: Request) -> Response:
        """Fetch ``request`` under its cache mode; returns once the response is durable.

        Raises ``CacheMiss`` (only_if_cached, nothing stored), ``FetchError`` (the adapter failed
        for good; every attempt is recorded), ``CapabilityError`` (the adapter cannot fetch).
        """
        self._require_open()
        self._check_request(request)
        if not self._entry.can_fetch:
            raise CapabilityError(f"the adapter for {self.source!r} cannot fetch (no fetch())")
        self._counts["requests"] += 1
        mode = request.cache_mode
        assert self._coalescer is not None
        key = (request.hash, persists(mode))
        if mode is CacheMode.DEFAULT and self._coalescer.waiters(key):
            # A duplicate of a fetch in flight: join it without a lookup of its own.
            decision = Decision(Action.FETCH, None, "joining an in-flight fetch")
        else:
            cached = None
            if needs_lookup(mode):
                cached = await self._store.latest_response(request.hash)
                # A fetch of the same request may have completed while the lookup ran (it was
                # committed, but possibly after the lookup's snapshot): prefer the newer one.
                recent = self._recent.get(request.hash)
                if recent is not None and (cached is None or recent.fetched_at > cached.fetched_at):
                    cached = recent
            decision = decide(mode, cached, ttl=request.ttl_seconds, now=utcnow())
        if decision.action is Action.SERVE:
            assert decision.cached is not None
            self._counts["cache_hits"] += 1
            await self._store.metadata.record(
                Recording(self._persistable(request), served_from=decision.cached.id), wait=False
            )
            return served_from_cache(decision.cached)
        if decision.action is Action.MISS:
            self._counts["errors"] += 1
            raise CacheMiss(
                f"{request!r}: cache_mode=only_if_cached and no stored response", request=request
            )
        try:
            response = await self._coalescer.run(key, lambda: self._produce(request, decision))
        except DataIOError:
            self._counts["errors"] += 1
            raise
        if response.request_id != request.id and persists(mode):
            # A coalesced duplicate: record that this request was answered by the leader's response.
            await self._store.metadata.record(
                Recording(self._persistable(request), served_from=response.id), wait=False
            )
        return response

    def _remember(self, response: Response, staged: StagedPayload | None = None) -> None:
        """Keep the newest recorded OK responses by hash, to close the lookup/commit race, and
        their inline payload (committed, so ``read()`` may serve it without asking the store)."""
        self._recent.put(response.request_hash, response)
        if staged is not None and staged.data is not None:
            self._recent_payloads.put(staged.checksum, staged.data)

    async def _produce(self, request: Request, decision: Decision) -> Response:
        entry = self._entry
        persist = persists(request.cache_mode)
        stored_request = self._persistable(request) if persist else request
        revalidating = decision.action is Action.REVALIDATE and entry.can_revalidate
        adapter: Any = entry.adapter

        async def attempt(n: int) -> _Fetched:
            started = time.perf_counter()
            async with entry.limiter.slot():
                if revalidating:
                    assert decision.cached is not None
                    raw = await adapter.revalidate(request, decision.cached)
                else:
                    raw = await adapter.fetch(request)
                result = _as_result(raw, "fetch")
                if result.not_modified:
                    if not revalidating:
                        raise FetchError(
                            "adapter answered not_modified to a request that was not conditional",
                            request=request,
                        )
                    staged, data = None, None
                elif persist:
                    staged, data = await self._store.stage(result.data), None
                else:
                    data = await _in_memory(result.data)
                    staged = None
            elapsed = result.elapsed_ms
            if elapsed is None:
                elapsed = _ms_since(started)
            fetched = _Fetched(result, staged, data, n, elapsed)
            if result.error is not None:
                await self._record_upstream_error(stored_request, fetched, persist)
            return fetched

        async def on_failure(n: int, exc: BaseException, elapsed_s: float) -> None:
            if isinstance(exc, TransientError) and exc.retry_after and not retry_waits_disabled():
                entry.limiter.cooldown(exc.retry_after)
            if not persist or isinstance(exc, StoreError):
                return  # ephemeral, or the store itself is failing
            if isinstance(exc, FetchError) and exc.response_id is not None:
                return  # already recorded with its payload
            failed = self._failure(request, exc, attempt=n, elapsed_ms=elapsed_s * 1000.0)
            self._counts["responses"] += 1
            await self._store.metadata.record(Recording(stored_request, [failed]))

        try:
            fetched = await run_with_retries(
                entry.retry, attempt, request=request, on_failure=on_failure
            )
        except FetchError as exc:
            if isinstance(exc.__cause__, StoreError):
                raise exc.__cause__ from None  # the store failed, not the upstream: say so
            raise
        result = fetched.result
        if result.not_modified:
            cached = decision.cached
            assert cached is not None
            headers = dict(cached.headers or {})
            headers.update(entry.redaction.headers_of(result.headers) or {})
            response = self._new_response(
                request,
                status=ResponseStatus.OK,
                checksum=cached.checksum,
                size=cached.size_bytes,
                result=result,
                attempts=fetched.attempt,
                attempt=fetched.attempt,
                elapsed_ms=fetched.elapsed_ms,
                headers=headers,
                revalidated_from=cached.id,
                content_type=result.content_type or cached.content_type,
                encoding=result.encoding or cached.encoding,
            )
            self._counts["responses"] += 1
            await self._store.metadata.record(Recording(stored_request, [response]))
            self._remember(response)
            return response
        checksum, size = _identity_of(fetched.staged, fetched.data)
        response = self._new_response(
            request,
            status=ResponseStatus.OK,
            checksum=checksum,
            size=size,
            result=result,
            attempts=fetched.attempt,
            attempt=fetched.attempt,
            elapsed_ms=fetched.elapsed_ms,
            payload=fetched.data,
        )
        self._counts["bytes"] += size
        if persist:
            assert fetched.staged is not None
            self._counts["responses"] += 1
            await self._store.metadata.record(Recording(stored_request, [response], [fetched.staged]))
            self._remember(response, fetched.staged)
        return response

    async def _record_upstream_error(
        self, stored: Request, fetched: _Fetched, persist: bool
    ) -> None:
        """A final upstream refusal (``AdapterResult.error``): record it with its body, then raise
        FetchError."""
        result = fetched.result
        response_id: str | None = None
        if persist and fetched.staged is not None:
            failed = self._new_response(
                stored,
                status=ResponseStatus.ERROR,
                checksum=fetched.staged.checksum,
                size=fetched.staged.size,
                result=result,
                attempts=fetched.attempt,
                attempt=fetched.attempt,
                elapsed_ms=fetched.elapsed_ms,
                error=result.error,
            )
            self._counts["responses"] += 1
            await self._store.metadata.record(Recording(stored, [failed], [fetched.staged]))
            response_id = failed.id
        raise FetchError(
            f"{stored!r}: {result.error}",
            request=stored,
            attempts=fetched.attempt,
            transport_status=result.transport_status,
            response_id=response_id,
        )

    def _failure(
        self,
        request: Request,
        exc: BaseException,
        *,
        attempt: int,
        elapsed_ms: float,
        sequence: int | None = None,
    ) -> Response:
        """The error row of one failed attempt (no payload)."""
        return self._new_response(
            request,
            status=ResponseStatus.ERROR,
            checksum=None,
            size=0,
            result=None,
            attempts=attempt,
            attempt=attempt,
            elapsed_ms=elapsed_ms,
            error=_error_text(exc),
            transport_status=getattr(exc, "transport_status", None),
            sequence=sequence,
        )

    def _new_response(
        self,
        request: Request,
        *,
        status: ResponseStatus,
        checksum: str | None,
        size: int,
        result: AdapterResult | None,
        attempts: int,
        attempt: int,
        elapsed_ms: float | None,
        error: str | None = None,
        transport_status: int | None = None,
        sequence: int | None = None,
        headers: Mapping[str, str] | None = None,
        revalidated_from: str | None = None,
        content_type: str | None = None,
        encoding: str | None = None,
        payload: bytes | None = None,
    ) -> Response:
        red = self._entry.redaction
        if result is not None:
            if headers is None:
                headers = red.headers_of(result.headers)
            transport_status = result.transport_status
            content_type = content_type or result.content_type
            encoding = encoding or result.encoding
        return Response(
            id=new_id(),
            request_id=request.id,
            request_hash=request.hash,
            session_id=self._record.id,
            status=status,
            checksum=checksum,
            size_bytes=size,
            fetched_at=utcnow(),
            cache_mode=request.cache_mode,
            ttl_seconds=request.ttl_seconds,
            as_of_bucket=request.as_of_bucket,
            cache_tag=request.cache_tag,
            from_cache=False,
            attempts=attempts,
            attempt=attempt,
            sequence=sequence,
            transport_status=transport_status,
            content_type=content_type,
            encoding=encoding,
            url=red.url(result.url) if result is not None else None,
            elapsed_ms=elapsed_ms,
            headers=headers,
            adapter_meta=result.adapter_meta if result is not None else None,
            error=error,
            revalidated_from=revalidated_from,
            payload=payload,
        )

    # -- read -----------------------------------------------------------------------------------

    async def read(self, response: Response) -> bytes:
        """The exact payload bytes of ``response``, verified (``IntegrityError`` if corrupt).

        A small payload this session recorded recently is served from memory: the very bytes whose
        sha256 was computed when they arrived, committed before ``fetch()`` returned.
        """
        if response.payload is not None:
            return response.payload
        self._require_open()
        if response.checksum is not None:
            recent = self._recent_payloads.get(response.checksum)
            if recent is not None and len(recent) == response.size_bytes:
                return recent
        return await self._store.read(response)

    # -- send -----------------------------------------------------------------------------------

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
        self._counts["requests"] += 1
        payload = bytes(payload)
        persist = persists(request.cache_mode)
        stored = self._persistable(request) if persist else request
        sent = await self._store.stage(payload) if persist else None
        started = time.perf_counter()
        try:
            async with self._entry.limiter.slot():
                result = _as_result(await self._entry.adapter.send(request, payload), "send")
                staged = await self._store.stage(result.data) if persist else None
                data = None if persist else await _in_memory(result.data)
        except Exception as exc:
            self._counts["errors"] += 1
            failed = self._failure(request, exc, attempt=1, elapsed_ms=_ms_since(started))
            if persist:
                self._counts["responses"] += 1
                await self._store.metadata.record(
                    Recording(stored, [failed], [sent] if sent else [], sent=sent.checksum if sent else None)
                )
            if isinstance(exc, DataIOError) and not isinstance(exc, TransientError):
                raise
            raise FetchError(
                f"send failed: {_error_text(exc)}",
                request=request,
                attempts=1,
                transport_status=getattr(exc, "transport_status", None),
                response_id=failed.id,
            ) from exc
        elapsed = result.elapsed_ms if result.elapsed_ms is not None else _ms_since(started)
        checksum, size = _identity_of(staged, data)
        status = ResponseStatus.ERROR if result.error is not None else ResponseStatus.ACK
        ack = self._new_response(
            request,
            status=status,
            checksum=checksum,
            size=size,
            result=result,
            attempts=1,
            attempt=1,
            elapsed_ms=elapsed,
            error=result.error,
            payload=data,
        )
        if persist:
            assert sent is not None and staged is not None
            self._counts["responses"] += 1
            await self._store.metadata.record(Recording(stored, [ack], [sent, staged], sent=sent.checksum))
        if result.error is not None:
            self._counts["errors"] += 1
            raise FetchError(
                f"{request!r}: {result.error}",
                request=request,
                attempts=1,
                transport_status=result.transport_status,
                response_id=ack.id,
            )
        return ack

    # -- stream ---------------------------------------------------------------------------------

    async def stream(self, request: Request) -> AsyncGenerator[Response, None]:
        """Yield one recorded Response per message, with ``sequence`` 0, 1, 2, ...

        Each message is durable before it is yielded. The stream holds one of the source's
        concurrency slots while open. An adapter error is recorded and raised as ``FetchError``.
        """
        self._require_open()
        self._check_request(request)
        if not self._entry.can_stream:
            raise CapabilityError(f"the adapter for {self.source!r} cannot stream (no stream())")
        self._counts["requests"] += 1
        persist = persists(request.cache_mode)
        stored = self._persistable(request) if persist else request
        sequence = 0
        started = time.perf_counter()
        async with self._entry.limiter.slot():
            messages = self._entry.adapter.stream(request)
            try:
                async for raw in messages:
                    result = _as_result(raw, "stream")
                    staged = await self._store.stage(result.data) if persist else None
                    data = None if persist else await _in_memory(result.data)
                    checksum, size = _identity_of(staged, data)
                    msg = self._new_response(
                        request,
                        status=ResponseStatus.STREAM_MESSAGE,
                        checksum=checksum,
                        size=size,
                        result=result,
                        attempts=1,
                        attempt=1,
                        elapsed_ms=_ms_since(started),
                        sequence=sequence,
                        payload=data,
                    )
                    self._counts["bytes"] += size
                    if staged is not None:
                        self._counts["responses"] += 1
                        await self._store.metadata.record(Recording(stored, [msg], [staged]))
                    yield msg
                    sequence += 1
            except Exception as exc:
                if isinstance(exc, StoreError):
                    raise
                self._counts["errors"] += 1
                failed = self._failure(
                    request, exc, attempt=1, elapsed_ms=_ms_since(started), sequence=sequence
                )
                if persist:
                    self._counts["responses"] += 1
                    with anyio.CancelScope(shield=True):
                        await self._store.metadata.record(Recording(stored, [failed]))
                if isinstance(exc, DataIOError) and not isinstance(exc, TransientError):
                    raise
                raise FetchError(
                    f"stream failed after {sequence} messages: {_error_text(exc)}",
                    request=request,
                    attempts=1,
                    response_id=failed.id,
                    transport_status=getattr(exc, "transport_status", None),
                ) from exc
            finally:
                aclose = getattr(messages, "aclose", None)
                if aclose is not None:
                    with anyio.CancelScope(shield=True):
                        await aclose()

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
