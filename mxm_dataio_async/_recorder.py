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
from mxm_dataio_async._events import ResponseRecorded, Telemetry
from mxm_dataio_async._models import (
    AdapterResult,
    Request,
    Response,
    ResponseStatus,
    Session,
    SessionStatus,
    make_response,
    new_id,
    served_from_cache,
)
from mxm_dataio_async._redact import Redaction
from mxm_dataio_async._store import MetadataStore, Recording, StagedPayload
from mxm_dataio_async._store._work import Fence

__all__ = ["Attempt", "Recorder", "error_text", "vary_of"]

_MAX_ERROR_TEXT: Final = 2000


def vary_of(
    response_headers: Mapping[str, str] | None, request_headers: Mapping[str, str]
) -> dict[str, str] | None:
    """For a response with ``Vary``: each named request header's value as sent, as a sha256 (so
    no secret is stored), for the cache to serve it only to requests that send the same.
    ``Accept-Encoding`` is left out: what is stored is the decoded body."""
    if not response_headers:
        return None
    named = [v for k, v in response_headers.items() if k.lower() == "vary"]
    if not named:
        return None
    sent = {k.lower(): v for k, v in request_headers.items()}
    out: dict[str, str] = {}
    for name in ",".join(named).split(","):
        key = name.strip().lower()
        if key and key != "accept-encoding":
            value = sent.get(key, "") if key != "*" else "*"
            out[key] = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()
    return out or None


def error_text(exc: BaseException) -> str:
    """An exception as one line of at most 2,000 characters, for error rows and messages."""
    text = f"{type(exc).__name__}: {exc}"
    return text[:_MAX_ERROR_TEXT]


@dataclass(frozen=True, slots=True)
class Attempt:
    """One adapter call that produced an answer: its result, its payload (staged in the store,
    or in memory for an ephemeral fetch), its number, how long the adapter took and how long the
    attempt waited for the rate gate before."""

    result: AdapterResult
    staged: StagedPayload | None
    data: bytes | None  # only for ephemeral (never) requests: the store never sees them
    number: int
    elapsed_ms: float | None  # the adapter's own time
    wait_ms: float | None = None  # waiting for the source's rate gate first

    def identity(self) -> tuple[str | None, int]:
        """``(checksum, size)`` of the payload, wherever it is."""
        if self.staged is not None:
            return self.staged.checksum, self.staged.size
        if self.data is not None:
            return hashlib.sha256(self.data).hexdigest(), len(self.data)
        return None, 0


class Recorder:
    """Records one session: its row, its requests' rows and counts (``session`` shows them)."""

    __slots__ = (
        "_clock",
        "_counts",
        "_metadata",
        "_record",
        "_redaction",
        "_telemetry",
        "_wait_ms",
    )

    def __init__(
        self,
        metadata: MetadataStore,
        session: Session,
        redaction: Redaction,
        clock: Clock,
        telemetry: Telemetry | None = None,
    ) -> None:
        self._metadata = metadata
        self._record = session
        self._redaction = redaction
        self._clock = clock
        self._telemetry = telemetry if telemetry is not None else Telemetry()
        self._wait_ms = 0.0
        self._counts = {
            "requests": 0,
            "responses": 0,
            "cache_hits": 0,
            "errors": 0,
            "bytes": 0,
            "fetched": 0,
            "retries": 0,
            "stale": 0,
        }

    @property
    def counts(self) -> Mapping[str, int]:
        """The live counters (requests, fetched, cache_hits, retries, errors, stale, bytes...),
        for ``AsyncSession.statistics()``."""
        return self._counts

    @property
    def wait_ms(self) -> float:
        """Milliseconds the fetched answers' attempts waited for the rate gate, in total."""
        return self._wait_ms

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

    async def end(self, exc: BaseException | None, *, interrupted: str | None = None) -> Session:
        """Record the session's end: its counts and a status that says what happened.

        ``cancelled`` when cancellation ended it (``interrupted`` says why, e.g. "interrupted
        (SIGINT)"), ``error`` when an exception did or when every request failed, else ``ok``.
        """
        session = self.session
        status, error = SessionStatus.OK, None
        if exc is not None and isinstance(exc, anyio.get_cancelled_exc_class() | KeyboardInterrupt):
            status, error = SessionStatus.CANCELLED, interrupted or "cancelled"
        elif exc is not None:
            status, error = SessionStatus.ERROR, error_text(exc)
        elif interrupted is not None:
            status, error = SessionStatus.CANCELLED, interrupted
        elif session.requests and session.errors >= session.requests:
            status = SessionStatus.ERROR
            error = f"every request failed ({session.errors} of {session.requests})"
        self._record = replace(session, ended_at=self._clock.now(), status=status, error=error)
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

    def retried(self) -> None:
        """An attempt failed and another is scheduled."""
        self._counts["retries"] += 1

    # -- storage redaction, the one place ------------------------------------------------------

    def stored(self, request: Request) -> Request:
        """The request as it may be written: secret headers, params and URL credentials out."""
        red = self._redaction
        changes: dict[str, Any] = {}
        if request.headers:
            changes["headers"] = red.headers_of(request.headers)
        params = request.params
        if params and red.has_secret_param(params):
            changes["params"] = red.params_of(params)
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

    async def fetched(
        self, request: Request, attempt: Attempt, *, persist: bool, fence: Fence | None = None
    ) -> Response:
        """An attempt that produced the answer (``ok``)."""
        checksum, size = attempt.identity()
        response = self._response(
            request,
            ResponseStatus.OK,
            checksum,
            size,
            attempt,
            payload=attempt.data,
            vary=vary_of(attempt.result.headers, request.headers),
        )
        counts = self._counts
        counts["bytes"] += size
        counts["fetched"] += 1
        if attempt.wait_ms:
            self._wait_ms += attempt.wait_ms
        await self._commit(request, response, attempt.staged, persist=persist, fence=fence)
        return response

    async def revalidated(
        self, request: Request, cached: Response, attempt: Attempt, *, fence: Fence | None = None
    ) -> Response:
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
        await self._commit(request, response, None, persist=True, fence=fence)
        return response

    async def stale(
        self,
        request: Request,
        cached: Response,
        error: BaseException,
        *,
        age_seconds: float,
        persist: bool,
        fence: Fence | None = None,
    ) -> Response:
        """Stale-if-error: the upstream failed and ``cached`` answers instead. A ``stale`` row
        says so (which response, how old, after what error); the caller gets ``cached`` with
        ``from_cache`` and ``stale`` set."""
        self._counts["stale"] += 1
        row = self._response(
            request,
            ResponseStatus.STALE,
            cached.checksum,
            cached.size_bytes,
            None,
            number=getattr(error, "attempts", 0) or 0,
            error=error_text(error),
            transport_status=getattr(error, "transport_status", None),
            content_type=cached.content_type,
            encoding=cached.encoding,
            meta={"stale_from": cached.id, "age_seconds": round(age_seconds, 3)},
        )
        await self._commit(request, row, None, persist=persist, fence=fence)
        return replace(served_from_cache(cached), stale=True)

    async def refused(
        self, request: Request, attempt: Attempt, *, persist: bool, fence: Fence | None = None
    ) -> Response:
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
        await self._commit(request, response, attempt.staged, persist=persist, fence=fence)
        return response

    async def failed(
        self,
        request: Request,
        exc: BaseException,
        *,
        number: int,
        elapsed_ms: float | None,
        persist: bool,
        sequence: int | None = None,
        sent: StagedPayload | None = None,
        answered: StagedPayload | None = None,
        wait_ms: float | None = None,
        fence: Fence | None = None,
    ) -> str:
        """An attempt that raised: its error row. What the upstream answered, if the error
        carries it (``TransientError``: the URL, response headers and the start of the body,
        staged as ``answered``), goes on the row too; with a send, the bytes it tried to send.
        Returns the row's id. Under a ``fence`` the row is fenced but marks no index (the
        request may yet be retried)."""
        red = self._redaction
        headers = getattr(exc, "headers", None)
        response = self._response(
            request,
            ResponseStatus.ERROR,
            None if answered is None else answered.checksum,
            0 if answered is None else answered.size,
            None,
            number=number,
            elapsed_ms=elapsed_ms,
            error=error_text(exc),
            transport_status=getattr(exc, "transport_status", None),
            sequence=sequence,
            headers=red.headers_of(headers) if headers else None,
            url=red.url(getattr(exc, "url", None)),
            wait_ms=wait_ms,
        )
        await self._commit(
            request,
            response,
            answered,
            persist=persist,
            sent=sent,
            fence=None if fence is None else fence.unmarked(),
        )
        return response.id

    async def dropped(
        self, request: Request, result: AdapterResult, sequence: int, *, persist: bool
    ) -> str:
        """A stream that dropped and is being resumed (the adapter said why, and with which
        ``Last-Event-ID``): a row of its own, never a message."""
        response = self._response(
            request,
            ResponseStatus.ERROR,
            None,
            0,
            Attempt(result, None, None, 1, result.elapsed_ms),
            error=result.error,
            sequence=sequence,
        )
        await self._commit(request, response, None, persist=persist)
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
        fence: Fence | None = None,
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
                fence=fence,
            )
        )
        telemetry = self._telemetry  # after the commit: the row is durable
        if telemetry.wants(ResponseRecorded):
            telemetry.emit(
                ResponseRecorded(
                    request.source,
                    request.kind,
                    request.id,
                    request.hash,
                    response.id,
                    response.status.value,
                    response.attempt,
                    response.size_bytes,
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
        url: str | None = None,
        wait_ms: float | None = None,
        vary: Mapping[str, str] | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> Response:
        red = self._redaction
        result = None
        if attempt is not None:
            result = attempt.result
            number = attempt.number
            elapsed_ms = attempt.elapsed_ms
            wait_ms = attempt.wait_ms
            if headers is None:
                headers = red.headers_of(result.headers)
            transport_status = result.transport_status
            content_type = content_type or result.content_type
            encoding = encoding or result.encoding
            url = red.url(result.url)
            meta = self._meta(result.adapter_meta)
        assert number is not None
        # Positional, in Response's field order (one per recorded answer; keywords cost ~2x).
        # tests/store/test_store.py round-trips every field.
        return make_response(
            new_id(),  # id
            request.id,  # request_id
            request.hash,  # request_hash
            self._record.id,  # session_id
            status,
            checksum,
            size,  # size_bytes
            self._clock.now(),  # fetched_at
            request.cache_mode,
            request.ttl_seconds,
            request.as_of_bucket,
            request.cache_tag,
            False,  # from_cache
            number,  # attempts
            number,  # attempt
            sequence,
            transport_status,
            content_type,
            encoding,
            url,
            elapsed_ms,
            headers,
            meta,  # adapter_meta
            error,
            revalidated_from,
            wait_ms,
            vary,
            payload,
        )

    def _meta(self, meta: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
        """An adapter's metadata as it may be stored: the headers it sent and the redirect hops
        it followed, redacted like everything else."""
        if not meta or ("request_headers" not in meta and "redirects" not in meta):
            return meta
        red = self._redaction
        out = dict(meta)
        sent = meta.get("request_headers")
        if isinstance(sent, Mapping):
            out["request_headers"] = red.headers_of(sent)
        hops = meta.get("redirects")
        if isinstance(hops, list):
            out["redirects"] = _redacted_hops(red, hops)
        return out


def _redacted_hops(red: Redaction, hops: list[Any]) -> list[Any]:
    """Redirect hops as they may be stored (a function of its own: the comprehension's closure
    is then made only when there are hops)."""
    return [
        {
            **hop,
            "url": red.url(hop.get("url")),
            "location": red.url(hop.get("location")),
            "headers": red.headers_of(hop.get("headers")),
        }
        if isinstance(hop, Mapping)
        else hop
        for hop in hops
    ]
