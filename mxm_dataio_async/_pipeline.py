"""The pipeline of one request, top to bottom (DESIGN §3).

A fetch reads in the order it runs::

    fetch      plan (lookup, then the pure cache decision)  ->  serve | miss | coalesce
    _produce   attempts: a loop the retry schedule drives, recording each failure
    _attempt   rate gate slot { adapter call -> stage the payload }
               then record (the recorder, the only writer)

Each stage is a call that returns a value to the next: nothing is handed down to be called back,
nothing records from a hook, no exception is smuggled. Events are reported where they happen,
only when someone listens (a hook, or a logger enabled at the event's level; ``_fetch_report.py``
builds them); the
source's circuit breaker is asked before each attempt and told each outcome; an adaptive rate
gate is told each 429/503 and each success; and when the upstream fails for good, a stored
response within the request's ``stale_if_error`` allowance answers instead. ``send`` (attempted
once) and ``stream`` (one slot held while open) are the other two paths. ``AsyncSession`` owns
the lifecycle and builds one ``Pipeline`` per session.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from functools import partial

import anyio

from mxm_dataio_async._breaker import BreakerState, Circuit
from mxm_dataio_async._clock import Clock
from mxm_dataio_async._coalesce import RequestCoalescer
from mxm_dataio_async._events import Telemetry
from mxm_dataio_async._exceptions import (
    CacheMiss,
    CircuitOpen,
    DataIOError,
    FetchError,
    StoreError,
    TransientError,
)
from mxm_dataio_async._fetch_report import AttemptTimes, FetchReport
from mxm_dataio_async._limits import SourceLimiter
from mxm_dataio_async._models import AdapterResult, Body, Request, Response
from mxm_dataio_async._policy import (
    Action,
    Decision,
    decide,
    needs_lookup,
    persists,
    serves_stale,
)
from mxm_dataio_async._recorder import Attempt, Recorder, error_text
from mxm_dataio_async._registry import SourceEntry
from mxm_dataio_async._retry import DeadlineExceeded, Retrying, retry_waits_disabled
from mxm_dataio_async._store import Store
from mxm_dataio_async._store._work import Fence

__all__ = ["Pipeline"]


class Pipeline:
    """Fetch, send and stream for one session's source, store and recorder."""

    __slots__ = (
        "_clock",
        "_coalescer",
        "_entry",
        "_metadata",
        "_owner",
        "_recorder",
        "_report",
        "_store",
        "_telemetry",
    )

    def __init__(
        self,
        *,
        entry: SourceEntry,
        store: Store,
        recorder: Recorder,
        coalescer: RequestCoalescer,
        clock: Clock,
        owner: object,
        telemetry: Telemetry | None = None,
    ) -> None:
        self._entry = entry
        self._store = store
        self._metadata = store.metadata
        self._recorder = recorder
        self._coalescer = coalescer
        self._clock = clock
        self._owner = owner  # the session: its producers are joined before it ends
        self._telemetry = telemetry if telemetry is not None else Telemetry()
        self._report = FetchReport(
            self._telemetry, clock, source=entry.name, redaction=entry.redaction
        )

    # -- fetch ----------------------------------------------------------------------------------

    async def fetch(self, request: Request, *, fence: Fence | None = None) -> Response:
        recorder, report = self._recorder, self._report
        recorder.began()
        watching = self._telemetry.watching()  # FetchStarted/Finished and CacheDecided
        started = report.fetch_started(request) if watching else None
        try:
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
                http_freshness=request.http_freshness,
            )
            if watching:
                report.cache_decided(request, decision)
            if decision.action is Action.SERVE:
                assert decision.cached is not None
                response = recorder.served(request, decision.cached)
            elif decision.action is Action.MISS:
                recorder.failed_request()
                raise CacheMiss(
                    f"{request!r}: cache_mode=only_if_cached and no stored response",
                    request=request,
                )
            else:
                # Coalesce: one producer per request identity, shared by every session on this
                # Registry and Store.
                try:
                    response = await self._coalescer.run(
                        key,
                        partial(self._produce, request, decision, persist, fence),
                        owner=self._owner,
                    )
                except FetchError as exc:
                    # Stale-if-error: the upstream failed for good (or its circuit is open), and
                    # the request allows a stored answer of some age instead.
                    stale = None
                    if request.stale_if_error is not None and persist and _upstream_failed(exc):
                        stale = await self._stale(request, decision, exc, fence)
                    if stale is None:
                        recorder.failed_request()
                        raise
                    response = stale
                except DataIOError:
                    recorder.failed_request()
                    raise
                else:
                    if response.request_id != request.id:
                        recorder.joined(request, response, persist=persist)
        except BaseException as exc:
            if started is not None:
                report.fetch_finished(request, started, None, exc)
            raise
        if started is not None:
            report.fetch_finished(request, started, response, None)
        return response

    async def _stale(
        self, request: Request, decision: Decision, error: FetchError, fence: Fence | None
    ) -> Response | None:
        """The newest stored OK response, if the request's allowance covers its age: recorded
        as served stale (a ``stale`` row), returned flagged ``stale``."""
        allowance = request.stale_if_error
        assert allowance is not None
        cached = decision.cached
        if cached is None:  # bypass, or a duplicate that joined: nothing was looked up yet
            cached = await self._metadata.latest_response(request.hash)
        now = self._clock.now()
        if cached is None or not serves_stale(cached, allowance, now, request.headers):
            return None
        age = (now - cached.fetched_at).total_seconds()
        response = await self._recorder.stale(
            request, cached, error, age_seconds=age, persist=True, fence=fence
        )
        self._report.stale_served(request, cached, age, error)
        return response

    async def _produce(
        self, request: Request, decision: Decision, persist: bool, fence: Fence | None
    ) -> Response:
        """Attempts until one answers or the retry schedule gives up, then the recorded answer."""
        recorder, clock, entry, report = self._recorder, self._clock, self._entry, self._report
        circuit = entry.circuit
        watching = self._telemetry.watching()  # AttemptStarted and AttemptFinished
        unsafe = request.unsafe and not request.retry_unsafe
        retrying = entry.retry.schedule(clock.monotonic(), unsafe=unsafe)
        last: Exception | None = None
        while True:
            if circuit is not None:  # an open circuit: fail fast, no adapter, no rate budget
                self._admit(circuit, request, retrying.attempts, last)
            number = retrying.begin()
            times = AttemptTimes(clock.monotonic())
            try:
                if retrying.policy.deadline is None:
                    attempt = await self._attempt(
                        request, decision, persist, number, times, watching
                    )
                else:
                    attempt = await self._bounded_attempt(
                        request, decision, persist, number, times, retrying, watching
                    )
                break
            except StoreError:
                if circuit is not None:
                    circuit.released()
                raise  # the store failed, not the upstream: nothing to retry or to record
            except Exception as exc:
                now = clock.monotonic()
                if circuit is not None:
                    self._attempted(circuit, exc, now)
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
                if watching:
                    report.attempt_finished(
                        request, number, "error", exc, times, now, 0, error=error_text(exc)
                    )
                if isinstance(exc, TransientError):
                    self._throttled(exc, times)
                wait = retrying.next_wait(exc, now)
                if wait is None:
                    raise retrying.failure(exc, request, response_id=error_id) from exc
                recorder.retried()
                report.retry_scheduled(request, number, wait, exc)
                last = exc
                if circuit is not None and circuit.state is BreakerState.OPEN:
                    continue  # it opened: the next admission fails fast, no need to wait first
                await clock.sleep(wait)
            except BaseException:
                if circuit is not None:
                    circuit.released()  # cancelled: a half-open probe lets the next one probe
                raise
        result = attempt.result
        if circuit is not None:
            report.breaker_changed(circuit.succeeded())  # any answer, a 404 included
        if entry.adaptive and result.error is None:
            gate = entry.gate
            assert isinstance(gate, SourceLimiter)
            gate.speed_up()
        if watching:
            outcome = "refused" if result.error else "not_modified" if result.not_modified else "ok"
            now = clock.monotonic()
            report.attempt_finished(
                request, number, outcome, result, times, now, attempt.identity()[1], result.error
            )
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

    def _admit(
        self, circuit: Circuit, request: Request, attempts: int, last: Exception | None
    ) -> None:
        now = self._clock.monotonic()
        admitted, change = circuit.admit(now)
        self._report.breaker_changed(change)
        if not admitted:
            retry_in = circuit.retry_in(now)
            raise CircuitOpen(
                f"{request!r}: the circuit breaker of source {request.source!r} is open "
                f"({circuit.failures} consecutive transient failures); not attempted, a probe "
                f"goes through in {retry_in:.3g}s",
                source=request.source,
                retry_in=retry_in,
                request=request,
                attempts=attempts,
            ) from last

    def _admitted_once(self, request: Request) -> Circuit | None:
        """The source's circuit (None without a breaker) for a send or a stream, the one attempt
        each makes: ``CircuitOpen`` (the request counted as failed) when it is open."""
        circuit = self._entry.circuit
        if circuit is not None:
            try:
                self._admit(circuit, request, 0, None)
            except CircuitOpen:
                self._recorder.failed_request()
                raise
        return circuit

    def _attempted(self, circuit: Circuit, exc: Exception, now: float) -> None:
        """An admitted attempt raised: a transient failure counts toward opening the circuit;
        anything else (an error of ours, a non-transient one) only ends the attempt, so a
        half-open circuit lets the next one probe."""
        if isinstance(exc, TransientError):
            self._report.breaker_changed(circuit.failed(now))
        else:
            circuit.released()

    def _throttled(self, exc: TransientError, times: AttemptTimes) -> None:
        """A transient failure's effect on the whole source: an adaptive gate slows down after
        a 429/503 (and pauses only for a Retry-After beyond its period, e.g. maintenance); any
        other gate pauses for the Retry-After."""
        entry, status = self._entry, exc.transport_status
        hint = exc.retry_after
        gate = entry.gate
        if entry.adaptive and status in (429, 503):
            assert isinstance(gate, SourceLimiter) and gate.rate_limit is not None
            changed = gate.slow_down(times.admitted)
            if changed is not None:
                self._report.rate_adjusted(changed[0], changed[1], status)
            if hint is None or hint <= gate.rate_limit.per:
                return
        if hint and not retry_waits_disabled():
            gate.cooldown(hint)  # the whole source pauses, not only this request
            self._report.cooldown_started(hint, status)

    async def _bounded_attempt(
        self,
        request: Request,
        decision: Decision,
        persist: bool,
        number: int,
        times: AttemptTimes,
        retrying: Retrying,
        watching: bool,
    ) -> Attempt:
        """One attempt, cancelled if the retry deadline passes while it runs."""
        left = retrying.time_left(times.started)
        assert left is not None  # called only when the policy has a deadline
        with self._clock.cancel_after(left):  # the session's clock, as the retry waits
            return await self._attempt(request, decision, persist, number, times, watching)
        raise DeadlineExceeded(
            f"the {retrying.policy.deadline:g}s retry deadline passed during attempt {number}; "
            "it was cancelled"
        )

    async def _attempt(
        self,
        request: Request,
        decision: Decision,
        persist: bool,
        number: int,
        times: AttemptTimes,
        watching: bool,
    ) -> Attempt:
        """The rate gate's slot around the adapter call and the staging of its payload (a
        streamed body is read while the slot, and the connection, are held)."""
        entry, clock = self._entry, self._clock
        revalidating = decision.action is Action.REVALIDATE and entry.can_revalidate
        async with entry.gate.slot():
            times.admitted = clock.monotonic()
            if watching:
                self._report.attempt_started(request, number, times)
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
        """One attempt, never retried; the sent bytes and the answer are recorded. An open
        circuit refuses it before anything is staged or sent."""
        recorder, entry = self._recorder, self._entry
        recorder.began()
        circuit = self._admitted_once(request)
        persist = persists(request.cache_mode)
        try:
            sent = await self._store.stage(payload) if persist else None
        except BaseException:
            if circuit is not None:
                circuit.released()  # nothing was sent: a half-open circuit lets another probe
            raise
        started = self._clock.monotonic()
        try:
            async with entry.gate.slot():
                result = _as_result(await entry.adapter.send(request, payload), "send")
                staged = await self._store.stage(result.data) if persist else None
                data = None if persist else await _in_memory(result.data)
        except Exception as exc:
            recorder.failed_request()
            if circuit is not None:
                self._attempted(circuit, exc, self._clock.monotonic())
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
        except BaseException:
            if circuit is not None:
                circuit.released()  # cancelled: a half-open probe lets the next one probe
            raise
        if circuit is not None:
            self._report.breaker_changed(circuit.succeeded())  # any answer, a refusal included
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
        source's gate is held while the stream is open. An open circuit refuses to open it; the
        opening is the attempt the circuit is told about (its first message, or its end, is an
        answer; a transient failure before either counts as one), not what follows."""
        recorder, entry = self._recorder, self._entry
        recorder.began()
        circuit = self._admitted_once(request)
        opening = circuit  # the circuit, until it has been told how the opening went
        persist = persists(request.cache_mode)
        sequence = 0
        started = self._clock.monotonic()
        try:
            async with entry.gate.slot():
                messages = entry.adapter.stream(request)
                try:
                    async for raw in messages:
                        result = _as_result(raw, "stream")
                        if result.error is not None:  # it dropped; the adapter resumes it
                            await recorder.dropped(request, result, sequence, persist=persist)
                            continue
                        if opening is not None:
                            self._report.breaker_changed(opening.succeeded())
                            opening = None
                        staged = await self._store.stage(result.data) if persist else None
                        data = None if persist else await _in_memory(result.data)
                        elapsed = (self._clock.monotonic() - started) * 1000.0
                        attempt = Attempt(result, staged, data, 1, elapsed)
                        yield await recorder.message(request, attempt, sequence, persist=persist)
                        sequence += 1
                    if opening is not None:  # it ended without a message: an answer all the same
                        self._report.breaker_changed(opening.succeeded())
                        opening = None
                except Exception as exc:
                    if opening is not None:
                        self._attempted(opening, exc, self._clock.monotonic())
                        opening = None
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
        finally:
            if opening is not None:  # cancelled or closed before anything came: no failure
                opening.released()


def _upstream_failed(error: FetchError) -> bool:
    """The upstream failed (transient errors until the retries gave up, or an open circuit), as
    opposed to answering with a refusal (a 404 is an answer, never replaced by a stale copy)."""
    return isinstance(error, CircuitOpen) or isinstance(error.__cause__, TransientError)


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
