"""The recorder: the one writer of a session's rows.

Only this module calls the metadata store's write methods (``save_session``, ``record``), builds
``Response`` rows, redacts what is stored (once, here) and counts what the session did. The pipeline
hands it what happened (an attempt's result, a failure, a cache hit) and gets back the recorded
``Response``; whether anything is persisted follows from the request's cache mode, decided once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Final

import anyio

from mxm_dataio_async._clock import Clock
from mxm_dataio_async._models import (
    AdapterResult,
    Request,
    Response,
    ResponseStatus,
    Session,
    SessionStatus,
    new_id,
    served_from_cache,
)
from mxm_dataio_async._redact import REDACTED, Redaction
from mxm_dataio_async._store import MetadataStore, Recording, StagedPayload

__all__ = ["Attempt", "Recorder", "error_text"]

_MAX_ERROR_TEXT: Final = 2000


def error_text(exc: BaseException) -> str:
    """An exception as one line of at most 2,000 characters, for error rows and messages."""
    text = f"{type(exc).__name__}: {exc}"
    return text[:_MAX_ERROR_TEXT]


@dataclass(frozen=True, slots=True)
class Attempt:
    """One adapter call that produced an answer: its result, its payload (staged in the store,
    or in memory for an ephemeral fetch), its number and how long it took."""

    result: AdapterResult
    staged: StagedPayload | None
    data: bytes | None  # only for ephemeral (never) requests: the store never sees them
    number: int
    elapsed_ms: float

    def identity(self) -> tuple[str | None, int]:
        """``(checksum, size)`` of the payload, wherever it is."""
        if self.staged is not None:
            return self.staged.checksum, self.staged.size
        if self.data is not None:
            return hashlib.sha256(self.data).hexdigest(), len(self.data)
        return None, 0


class Recorder:
    """Records one session: its row, its requests' rows and counts (``session`` shows them)."""

    __slots__ = ("_clock", "_counts", "_metadata", "_record", "_redaction")

    def __init__(
        self, metadata: MetadataStore, session: Session, redaction: Redaction, clock: Clock
    ) -> None:
        self._metadata = metadata
        self._record = session
        self._redaction = redaction
        self._clock = clock
        self._counts = {"requests": 0, "responses": 0, "cache_hits": 0, "errors": 0, "bytes": 0}

    @property
    def session(self) -> Session:
        """The session row with the live counts."""
        c = self._counts
        return replace(
            self._record,
            requests=c["requests"],
            responses=c["responses"],
            cache_hits=c["cache_hits"],
            errors=c["errors"],
            bytes_fetched=c["bytes"],
        )

    # -- the session row ------------------------------------------------------------------------

    async def start(self) -> None:
        await self._metadata.save_session(self._record)

    async def end(self, exc: BaseException | None) -> Session:
        """Record the session's end: its counts, and ``error`` status if ``exc`` ended it."""
        self._record = replace(
            self.session,
            ended_at=self._clock.now(),
            status=SessionStatus.ERROR if exc is not None else SessionStatus.OK,
            error=error_text(exc) if exc is not None else None,
        )
        with anyio.CancelScope(shield=True):
            await self._metadata.save_session(self._record)
        return self._record

    # -- counts ---------------------------------------------------------------------------------

    def began(self) -> None:
        """A request (fetch, send or stream) started."""
        self._counts["requests"] += 1

    def failed_request(self) -> None:
        """A request ended in an error (``FetchError``, ``CacheMiss``...)."""
        self._counts["errors"] += 1

    # -- storage redaction, the one place ------------------------------------------------------

    def stored(self, request: Request) -> Request:
        """The request as it may be written: secret headers, params and URL credentials out."""
        red = self._redaction
        changes: dict[str, Any] = {}
        if request.headers:
            changes["headers"] = red.headers_of(request.headers)
        params = request.params
        if any(red.is_secret_param(k) for k in params):
            changes["params"] = {
                k: (REDACTED if red.is_secret_param(k) else v) for k, v in params.items()
            }
        if request.endpoint and "://" in request.endpoint:
            changes["endpoint"] = red.url(request.endpoint)
        return replace(request, **changes) if changes else request

    # -- rows -----------------------------------------------------------------------------------

    def served(self, request: Request, cached: Response) -> Response:
        """A cache hit: an audit row saying which stored response answered (not awaited)."""
        self._counts["cache_hits"] += 1
        self._metadata.record_later(Recording(self.stored(request), served_from=cached.id))
        return served_from_cache(cached)

    def joined(self, request: Request, response: Response, *, persist: bool) -> None:
        """A duplicate answered by another request's in-flight fetch (not awaited)."""
        if persist:
            self._metadata.record_later(Recording(self.stored(request), served_from=response.id))

    async def fetched(self, request: Request, attempt: Attempt, *, persist: bool) -> Response:
        """An attempt that produced the answer (``ok``)."""
        checksum, size = attempt.identity()
        response = self._response(
            request, ResponseStatus.OK, checksum, size, attempt, payload=attempt.data
        )
        self._counts["bytes"] += size
        await self._commit(request, response, attempt.staged, persist=persist)
        return response

    async def revalidated(self, request: Request, cached: Response, attempt: Attempt) -> Response:
        """A 304-style answer: a new row pointing at the stored payload."""
        headers = dict(cached.headers or {})
        headers.update(self._redaction.headers_of(attempt.result.headers) or {})
        response = self._response(
            request,
            ResponseStatus.OK,
            cached.checksum,
            cached.size_bytes,
            attempt,
            headers=headers,
            revalidated_from=cached.id,
            content_type=attempt.result.content_type or cached.content_type,
            encoding=attempt.result.encoding or cached.encoding,
        )
        await self._commit(request, response, None, persist=True)
        return response

    async def refused(self, request: Request, attempt: Attempt, *, persist: bool) -> Response:
        """A final upstream refusal (``AdapterResult.error``), recorded with its body."""
        checksum, size = attempt.identity()
        response = self._response(
            request,
            ResponseStatus.ERROR,
            checksum,
            size,
            attempt,
            error=attempt.result.error,
            payload=attempt.data,
        )
        await self._commit(request, response, attempt.staged, persist=persist)
        return response

    async def failed(
        self,
        request: Request,
        exc: BaseException,
        *,
        number: int,
        elapsed_ms: float,
        persist: bool,
        sequence: int | None = None,
        sent: StagedPayload | None = None,
    ) -> str:
        """An attempt that raised: its error row (no payload; with the bytes a send tried to
        send). Returns the row's id."""
        response = self._response(
            request,
            ResponseStatus.ERROR,
            None,
            0,
            None,
            number=number,
            elapsed_ms=elapsed_ms,
            error=error_text(exc),
            transport_status=getattr(exc, "transport_status", None),
            sequence=sequence,
        )
        await self._commit(request, response, None, persist=persist, sent=sent)
        return response.id

    async def acknowledged(
        self, request: Request, sent: StagedPayload | None, attempt: Attempt, *, persist: bool
    ) -> Response:
        """A send's answer (``ack``, or ``error`` for a refusal), with the bytes that were sent."""
        checksum, size = attempt.identity()
        status = ResponseStatus.ERROR if attempt.result.error is not None else ResponseStatus.ACK
        response = self._response(
            request,
            status,
            checksum,
            size,
            attempt,
            error=attempt.result.error,
            payload=attempt.data,
        )
        await self._commit(request, response, attempt.staged, persist=persist, sent=sent)
        return response

    async def message(
        self, request: Request, attempt: Attempt, sequence: int, *, persist: bool
    ) -> Response:
        """One message of a stream."""
        checksum, size = attempt.identity()
        response = self._response(
            request,
            ResponseStatus.STREAM_MESSAGE,
            checksum,
            size,
            attempt,
            sequence=sequence,
            payload=attempt.data,
        )
        self._counts["bytes"] += size
        await self._commit(request, response, attempt.staged, persist=persist)
        return response

    # -- internals ------------------------------------------------------------------------------

    async def _commit(
        self,
        request: Request,
        response: Response,
        staged: StagedPayload | None,
        *,
        persist: bool,
        sent: StagedPayload | None = None,
    ) -> None:
        if not persist:
            return
        self._counts["responses"] += 1
        payloads = [p for p in (sent, staged) if p is not None]
        await self._metadata.record(
            Recording(
                self.stored(request),
                (response,),
                payloads,
                sent=None if sent is None else sent.checksum,
            )
        )

    def _response(
        self,
        request: Request,
        status: ResponseStatus,
        checksum: str | None,
        size: int,
        attempt: Attempt | None,
        *,
        number: int | None = None,
        elapsed_ms: float | None = None,
        error: str | None = None,
        transport_status: int | None = None,
        sequence: int | None = None,
        headers: Mapping[str, str] | None = None,
        revalidated_from: str | None = None,
        content_type: str | None = None,
        encoding: str | None = None,
        payload: bytes | None = None,
    ) -> Response:
        red = self._redaction
        result = None
        if attempt is not None:
            result = attempt.result
            number = attempt.number
            elapsed_ms = attempt.elapsed_ms
            if headers is None:
                headers = red.headers_of(result.headers)
            transport_status = result.transport_status
            content_type = content_type or result.content_type
            encoding = encoding or result.encoding
        assert number is not None
        return Response(
            id=new_id(),
            request_id=request.id,
            request_hash=request.hash,
            session_id=self._record.id,
            status=status,
            checksum=checksum,
            size_bytes=size,
            fetched_at=self._clock.now(),
            cache_mode=request.cache_mode,
            ttl_seconds=request.ttl_seconds,
            as_of_bucket=request.as_of_bucket,
            cache_tag=request.cache_tag,
            from_cache=False,
            attempts=number,
            attempt=number,
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
