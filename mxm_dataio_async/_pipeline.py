"""The pipeline of one request, top to bottom (DESIGN §3).

A fetch reads in the order it runs::

    fetch      plan (lookup, then the pure cache decision)  ->  serve | miss | coalesce
    _produce   attempts: a loop the retry schedule drives, recording each failure
    _attempt   rate gate slot { adapter call -> stage the payload }
               then record (the recorder, the only writer)

Each stage is a call that returns a value to the next: nothing is handed down to be called back,
nothing records from a hook, no exception is smuggled. ``send`` (attempted once) and ``stream``
(one slot held while open) are the other two paths. ``AsyncSession`` owns the lifecycle and
builds one ``Pipeline`` per session.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

import anyio

from mxm_dataio_async._clock import Clock
from mxm_dataio_async._coalesce import RequestCoalescer
from mxm_dataio_async._exceptions import (
    CacheMiss,
    DataIOError,
    FetchError,
    StoreError,
    TransientError,
)
from mxm_dataio_async._models import AdapterResult, Body, Request, Response
from mxm_dataio_async._policy import Action, Decision, decide, needs_lookup, persists
from mxm_dataio_async._recorder import Attempt, Recorder, error_text
from mxm_dataio_async._registry import SourceEntry
from mxm_dataio_async._retry import DeadlineExceeded, Retrying, retry_waits_disabled
from mxm_dataio_async._store import Store
from mxm_dataio_async._store._work import Fence

__all__ = ["Pipeline"]


class Pipeline:
    """Fetch, send and stream for one session's source, store and recorder."""

    __slots__ = ("_clock", "_coalescer", "_entry", "_metadata", "_owner", "_recorder", "_store")

    def __init__(
        self,
        *,
        entry: SourceEntry,
        store: Store,
        recorder: Recorder,
        coalescer: RequestCoalescer,
        clock: Clock,
        owner: object,
    ) -> None:
        self._entry = entry
        self._store = store
        self._metadata = store.metadata
        self._recorder = recorder
        self._coalescer = coalescer
        self._clock = clock
        self._owner = owner  # the session: its producers are joined before it ends

    # -- fetch ----------------------------------------------------------------------------------

    async def fetch(self, request: Request, *, fence: Fence | None = None) -> Response:
        recorder = self._recorder
        recorder.began()
        # Plan: look up what is stored (unless the mode never serves it), then decide (pure).
        mode = request.cache_mode
        persist = persists(mode)
        key = _flight_key(request, persist)
        in_flight = self._coalescer.waiters(key) > 0
        cached = None
        if needs_lookup(mode, in_flight=in_flight):
            cached = await self._metadata.latest_response(request.hash)
        decision = decide(
            mode,
            cached,
            ttl=request.ttl_seconds,
            now=self._clock.now(),
            in_flight=in_flight,
            headers=request.headers,
        )
        if decision.action is Action.SERVE:
            assert decision.cached is not None
            return recorder.served(request, decision.cached)
        if decision.action is Action.MISS:
            recorder.failed_request()
            raise CacheMiss(
                f"{request!r}: cache_mode=only_if_cached and no stored response", request=request
            )
        # Coalesce: one producer per request identity, shared by every session on this
        # Registry and Store.
        try:
            response = await self._coalescer.run(
                key, lambda: self._produce(request, decision, persist, fence), owner=self._owner
            )
        except DataIOError:
            recorder.failed_request()
            raise
        if response.request_id != request.id:
            recorder.joined(request, response, persist=persist)
        return response

    async def _produce(
        self, request: Request, decision: Decision, persist: bool, fence: Fence | None
    ) -> Response:
        """Attempts until one answers or the retry schedule gives up, then the recorded answer."""
        recorder, clock, entry = self._recorder, self._clock, self._entry
        unsafe = request.unsafe and not request.retry_unsafe
        retrying = entry.retry.schedule(clock.monotonic(), unsafe=unsafe)
        while True:
            number = retrying.begin()
            times = _Times(clock.monotonic())
            try:
                if retrying.policy.deadline is None:
                    attempt = await self._attempt(request, decision, persist, number, times)
                else:
                    attempt = await self._bounded_attempt(
                        request, decision, persist, number, times, retrying
                    )
                break
            except StoreError:
                raise  # the store failed, not the upstream: nothing to retry or to record
            except Exception as exc:
                now = clock.monotonic()
                body = getattr(exc, "body", None)  # what the upstream said (an API's error detail)
                answered = await self._store.stage(body) if body and persist else None
                error_id = await recorder.failed(
                    request,
                    exc,
                    number=number,
                    elapsed_ms=times.elapsed_ms(now),
                    wait_ms=times.wait_ms(now),
                    persist=persist,
                    answered=answered,
                    fence=fence,
                )
                hint = exc.retry_after if isinstance(exc, TransientError) else None
                if hint and not retry_waits_disabled():
                    entry.gate.cooldown(hint)  # the whole source pauses, not only this request
                wait = retrying.next_wait(exc, now)
                if wait is None:
                    raise retrying.failure(exc, request, response_id=error_id) from exc
                await clock.sleep(wait)
        result = attempt.result
        if result.error is not None:
            refused = await recorder.refused(request, attempt, persist=persist, fence=fence)
            raise FetchError(
                f"{request!r}: {result.error}",
                request=request,
                attempts=attempt.number,
                transport_status=result.transport_status,
                response_id=refused.id if persist and attempt.staged is not None else None,
                url=result.url,
            )
        if result.not_modified:
            assert decision.cached is not None
            return await recorder.revalidated(request, decision.cached, attempt, fence=fence)
        return await recorder.fetched(request, attempt, persist=persist, fence=fence)

    async def _bounded_attempt(
        self,
        request: Request,
        decision: Decision,
        persist: bool,
        number: int,
        times: _Times,
        retrying: Retrying,
    ) -> Attempt:
        """One attempt, cancelled if the retry deadline passes while it runs."""
        left = retrying.time_left(times.started)
        assert left is not None  # called only when the policy has a deadline
        with self._clock.cancel_after(left):  # the session's clock, as the retry waits
            return await self._attempt(request, decision, persist, number, times)
        raise DeadlineExceeded(
            f"the {retrying.policy.deadline:g}s retry deadline passed during attempt {number}; "
            "it was cancelled"
        )

    async def _attempt(
        self, request: Request, decision: Decision, persist: bool, number: int, times: _Times
    ) -> Attempt:
        """The rate gate's slot around the adapter call and the staging of its payload (a
        streamed body is read while the slot, and the connection, are held)."""
        entry, clock = self._entry, self._clock
        revalidating = decision.action is Action.REVALIDATE and entry.can_revalidate
        async with entry.gate.slot():
            times.admitted = clock.monotonic()
            if revalidating:
                assert decision.cached is not None
                raw = await entry.adapter.revalidate(request, decision.cached)
            else:
                raw = await entry.adapter.fetch(request)
            result = _as_result(raw, "fetch")
            staged, data = None, None
            if result.not_modified:
                if not revalidating:
                    raise FetchError(
                        "adapter answered not_modified to a request that was not conditional",
                        request=request,
                    )
            elif persist:
                staged = await self._store.stage(result.data)
            else:
                data = await _in_memory(result.data)
        now = clock.monotonic()
        elapsed = result.elapsed_ms if result.elapsed_ms is not None else times.elapsed_ms(now)
        return Attempt(result, staged, data, number, elapsed, times.wait_ms(now))

    # -- send -----------------------------------------------------------------------------------

    async def send(self, request: Request, payload: bytes) -> Response:
        """One attempt, never retried; the sent bytes and the answer are recorded."""
        recorder, entry = self._recorder, self._entry
        recorder.began()
        persist = persists(request.cache_mode)
        sent = await self._store.stage(payload) if persist else None
        started = self._clock.monotonic()
        try:
            async with entry.gate.slot():
                result = _as_result(await entry.adapter.send(request, payload), "send")
                staged = await self._store.stage(result.data) if persist else None
                data = None if persist else await _in_memory(result.data)
        except Exception as exc:
            recorder.failed_request()
            if isinstance(exc, StoreError):
                raise
            elapsed = (self._clock.monotonic() - started) * 1000.0
            error_id = await recorder.failed(
                request, exc, number=1, elapsed_ms=elapsed, persist=persist, sent=sent
            )
            if isinstance(exc, DataIOError) and not isinstance(exc, TransientError):
                raise
            raise FetchError(
                f"send failed: {error_text(exc)}",
                request=request,
                attempts=1,
                transport_status=getattr(exc, "transport_status", None),
                response_id=error_id,
            ) from exc
        took = result.elapsed_ms
        if took is None:
            took = (self._clock.monotonic() - started) * 1000.0
        ack = await recorder.acknowledged(
            request, sent, Attempt(result, staged, data, 1, took), persist=persist
        )
        if result.error is not None:
            recorder.failed_request()
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
        """One recorded Response per message (durable before it is yielded); one slot of the
        source's gate is held while the stream is open."""
        recorder, entry = self._recorder, self._entry
        recorder.began()
        persist = persists(request.cache_mode)
        sequence = 0
        started = self._clock.monotonic()
        async with entry.gate.slot():
            messages = entry.adapter.stream(request)
            try:
                async for raw in messages:
                    result = _as_result(raw, "stream")
                    if result.error is not None:  # it dropped; the adapter resumes it
                        await recorder.dropped(request, result, sequence, persist=persist)
                        continue
                    staged = await self._store.stage(result.data) if persist else None
                    data = None if persist else await _in_memory(result.data)
                    elapsed = (self._clock.monotonic() - started) * 1000.0
                    attempt = Attempt(result, staged, data, 1, elapsed)
                    yield await recorder.message(request, attempt, sequence, persist=persist)
                    sequence += 1
            except Exception as exc:
                if isinstance(exc, StoreError):
                    raise
                recorder.failed_request()
                elapsed = (self._clock.monotonic() - started) * 1000.0
                with anyio.CancelScope(shield=True):
                    error_id = await recorder.failed(
                        request,
                        exc,
                        number=1,
                        elapsed_ms=elapsed,
                        persist=persist,
                        sequence=sequence,
                    )
                if isinstance(exc, DataIOError) and not isinstance(exc, TransientError):
                    raise
                raise FetchError(
                    f"stream failed after {sequence} messages: {error_text(exc)}",
                    request=request,
                    attempts=1,
                    response_id=error_id,
                    transport_status=getattr(exc, "transport_status", None),
                ) from exc
            finally:
                aclose = getattr(messages, "aclose", None)
                if aclose is not None:
                    with anyio.CancelScope(shield=True):
                        await aclose()


class _Times:
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


def _flight_key(request: Request, persist: bool) -> tuple[str, bool, str]:
    """What makes two fetches the same in flight: their identity, whether they persist, and the
    headers they send (a response that varies by a header must not be shared with a request
    sending another value of it)."""
    if not request.headers:
        return (request.hash, persist, "")
    return (request.hash, persist, repr(sorted((k.lower(), v) for k, v in request.headers.items())))


def _as_result(value: object, what: str) -> AdapterResult:
    if isinstance(value, AdapterResult):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return AdapterResult(data=bytes(value))
    raise TypeError(
        f"adapter {what}() must return bytes or AdapterResult, got {type(value).__name__}"
    )


async def _in_memory(data: Body) -> bytes:
    if isinstance(data, bytes | bytearray | memoryview):
        return bytes(data)
    parts = [bytes(chunk) async for chunk in data]
    return b"".join(parts)
