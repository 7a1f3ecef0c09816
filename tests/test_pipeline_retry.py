"""Retries end to end: ``AsyncSession.fetch`` over a ``MockAdapter`` on a ``FakeClock``.

Every wait here is a fake one: the registry's clock drives the retry waits and the source's rate
gate, so a 30-second Retry-After passes in no time while ``clock.sleeps`` and ``monotonic()``
still show it. Nothing here uses ``disable_retry_waits``. The pure schedule is tested in
``test_retry.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

import mxm_dataio_async as dio
from mxm_dataio_async._models import Request, Response
from mxm_dataio_async.testing import FakeClock

pytestmark = pytest.mark.anyio

START = datetime(2026, 1, 1, tzinfo=UTC)
SAFETY = 30  # seconds: a safety net against hangs, never a timing assertion


class Script:
    """A fetch handler playing outcomes in order (the last repeats): exceptions are raised,
    bytes returned, an ``anyio.Event`` waited for; ``raised`` keeps what was raised."""

    def __init__(self, *outcomes: BaseException | bytes | anyio.Event) -> None:
        self.outcomes = list(outcomes)
        self.calls: list[str] = []
        self.raised: list[BaseException] = []
        self.entered = anyio.Event()  # set when an attempt starts waiting on an Event outcome
        self.cancelled = False

    async def __call__(self, request: Request) -> bytes:
        self.calls.append(request.kind)
        outcome = self.outcomes[min(len(self.calls), len(self.outcomes)) - 1]
        if isinstance(outcome, anyio.Event):
            self.entered.set()
            try:
                await outcome.wait()
            except anyio.get_cancelled_exc_class():
                self.cancelled = True
                raise
            return b"late"
        if isinstance(outcome, BaseException):
            self.raised.append(outcome)
            raise outcome
        return outcome


@asynccontextmanager
async def session(
    tmp_path: Path, handler: Callable[[Request], object], clock: FakeClock, retry: dio.RetryPolicy
) -> AsyncIterator[dio.AsyncSession]:
    """A session of source ``m`` on a store that outlives it (``session.store``)."""
    registry = dio.Registry(clock=clock)
    registry.register("m", dio.MockAdapter(handler), retry=retry)  # type: ignore[arg-type]
    async with dio.Store(tmp_path) as store:
        async with dio.AsyncSession("m", store=store, registry=registry) as s:
            yield s


async def error_rows(store: dio.Store) -> list[Response]:
    return [r async for r in store.iter_responses(status="error")]


async def eventually(condition: Callable[[], bool]) -> None:
    """Let other tasks (and the store's threads) run until ``condition()`` holds."""
    while not condition():  # noqa: ASYNC110 - no event to wait for across the store's threads
        await anyio.sleep(0.001)


# -- Retry-After, recorded attempts, and time -------------------------------------------------


async def test_429_with_retry_after_then_success(tmp_path: Path) -> None:
    clock = FakeClock(START)
    script = Script(
        dio.TransientError("slow down", retry_after=30, transport_status=429),
        dio.TransientError("bad gateway", transport_status=502),
        b"finally",
    )
    retry = dio.RetryPolicy(max_attempts=3, base_delay=0.1, jitter=0)
    with anyio.fail_after(SAFETY):
        async with session(tmp_path, script, clock, retry) as s:
            resp = await s.fetch(s.request("k"))
            assert await s.read(resp) == b"finally"
            errors = await error_rows(s.store)
    assert resp.ok and resp.attempts == resp.attempt == 3
    assert len(script.calls) == 3
    # The upstream asked for 30 s: the retry waited 30 (not the 0.1 backoff), then 0.2.
    assert clock.sleeps == pytest.approx([30.0, 0.2])
    assert clock.monotonic() >= 30
    # Every failed attempt is an error row, with its number, status and error.
    assert [(r.attempt, r.transport_status) for r in errors] == [(1, 429), (2, 502)]
    assert errors[0].error is not None and "slow down" in errors[0].error
    assert errors[1].error is not None and "bad gateway" in errors[1].error
    assert all(r.request_hash == resp.request_hash for r in errors)
    # Rows are stamped on the session's clock: the answer came 30.2 fake seconds in.
    assert errors[0].fetched_at == START
    assert resp.fetched_at == START + timedelta(seconds=30.2)


async def test_exhaustion_raises_a_complete_fetch_error(tmp_path: Path) -> None:
    clock = FakeClock()
    script = Script(dio.TransientError("503 Service Unavailable", transport_status=503))
    retry = dio.RetryPolicy(max_attempts=3, base_delay=1, jitter=0)
    with anyio.fail_after(SAFETY):
        async with session(tmp_path, script, clock, retry) as s:
            request = s.request("k")
            with pytest.raises(dio.FetchError) as info:
                await s.fetch(request)
            errors = await error_rows(s.store)
            assert s.session.errors == 1
    err = info.value
    assert str(err) == "fetch failed after 3 attempts: 503 Service Unavailable"
    assert err.attempts == 3
    assert err.request is request
    assert err.transport_status == 503
    assert [r.attempt for r in errors] == [1, 2, 3]
    assert err.response_id == errors[-1].id  # the last attempt's error row
    assert err.__cause__ is script.raised[-1]
    assert len(script.calls) == 3
    assert clock.sleeps == pytest.approx([1, 2])  # no wait after the last attempt


async def test_a_non_transient_error_is_final_at_once(tmp_path: Path) -> None:
    clock = FakeClock()
    boom = ValueError("bad payload")
    script = Script(boom, b"never")
    with anyio.fail_after(SAFETY):
        async with session(tmp_path, script, clock, dio.RetryPolicy(max_attempts=5)) as s:
            with pytest.raises(dio.FetchError) as info:
                await s.fetch(s.request("k"))
            errors = await error_rows(s.store)
    assert str(info.value) == "fetch failed: bad payload (not retried: ValueError)"
    assert info.value.attempts == 1
    assert info.value.__cause__ is boom
    assert info.value.transport_status is None
    assert [r.id for r in errors] == [info.value.response_id]
    assert len(script.calls) == 1
    assert clock.sleeps == []
    assert clock.monotonic() == 0.0


async def test_an_adapters_fetch_error_passes_through_after_retries(tmp_path: Path) -> None:
    clock = FakeClock()
    refusal = dio.FetchError("upstream said 404", transport_status=404)
    script = Script(dio.TransientError("reset"), refusal, b"never")
    retry = dio.RetryPolicy(max_attempts=5, base_delay=0.5, jitter=0)
    with anyio.fail_after(SAFETY):
        async with session(tmp_path, script, clock, retry) as s:
            with pytest.raises(dio.FetchError) as info:
                await s.fetch(s.request("k"))
            errors = await error_rows(s.store)
    err = info.value
    assert str(err) == "upstream said 404"
    assert (err.attempts, err.transport_status) == (2, 404)
    assert err.__cause__ is refusal
    assert err.response_id == errors[-1].id
    assert [(r.attempt, r.transport_status) for r in errors] == [(1, None), (2, 404)]
    assert clock.sleeps == [0.5]


# -- cancellation -----------------------------------------------------------------------------


async def test_cancellation_during_an_attempt_is_neither_retried_nor_wrapped(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    script = Script(dio.TransientError("503"), anyio.Event(), b"never")
    outcome: list[str] = []

    async def fetch(s: dio.AsyncSession) -> None:
        try:
            await s.fetch(s.request("k"))
        except anyio.get_cancelled_exc_class():
            outcome.append("cancelled")
            raise
        except BaseException as exc:  # what this test guards against: wrapping it
            outcome.append(repr(exc))
            raise

    retry = dio.RetryPolicy(max_attempts=5, jitter=0)
    with anyio.fail_after(SAFETY):
        async with session(tmp_path, script, clock, retry) as s:
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(fetch, s)
                    await script.entered.wait()  # attempt 2 is in the adapter
                    scope.cancel()
        # The session has joined its producer: whatever it was going to do, it has done.
        async with dio.Store(tmp_path) as store:
            errors = await error_rows(store)
            rows = [r async for r in store.iter_responses()]
    assert scope.cancelled_caught
    assert outcome == ["cancelled"]
    assert script.cancelled  # the attempt itself was cancelled...
    assert script.calls == ["k", "k"]  # ...and not retried
    assert [r.attempt for r in errors] == [1]  # and the cancellation is not an error row
    assert len(rows) == 1
    assert clock.sleeps == pytest.approx([0.1])


async def test_cancellation_during_a_retry_wait_propagates(tmp_path: Path) -> None:
    clock = FakeClock(auto_advance=False)  # the retry wait parks until advance()
    script = Script(dio.TransientError("503"), b"ok")
    outcome: list[str] = []

    async def fetch(s: dio.AsyncSession) -> None:
        try:
            await s.fetch(s.request("k"))
        except anyio.get_cancelled_exc_class():
            outcome.append("cancelled")
            raise
        except BaseException as exc:
            outcome.append(repr(exc))
            raise
        outcome.append("answered")

    retry = dio.RetryPolicy(max_attempts=3, base_delay=5, jitter=0)
    with anyio.fail_after(SAFETY):
        async with session(tmp_path, script, clock, retry) as s:
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(fetch, s)
                    await eventually(lambda: bool(clock.sleeps or outcome))
                    assert clock.sleeps == [5.0]  # parked in the retry wait...
                    assert outcome == [] and script.calls == ["k"]  # ...and held there
                    scope.cancel()
            clock.advance(60)  # the wait would be over now; nothing is left to retry
            await anyio.wait_all_tasks_blocked()
            errors = await error_rows(s.store)
            assert [r async for r in s.store.iter_responses(status="ok")] == []
    assert scope.cancelled_caught
    assert outcome == ["cancelled"]
    assert script.calls == ["k"]
    assert [r.attempt for r in errors] == [1]


# -- the retry deadline -----------------------------------------------------------------------


async def test_the_retry_deadline_gives_up_a_wait_that_would_pass_it(tmp_path: Path) -> None:
    clock = FakeClock()
    script = Script(dio.TransientError("503", transport_status=503))
    retry = dio.RetryPolicy(max_attempts=10, base_delay=1, multiplier=2, jitter=0, deadline=5)
    with anyio.fail_after(SAFETY):
        async with session(tmp_path, script, clock, retry) as s:
            with pytest.raises(dio.FetchError) as info:
                await s.fetch(s.request("k"))
            errors = await error_rows(s.store)
    # attempts at 0, 1 and 3 fake seconds; a 4 s wait would end at 7, past the 5 s deadline
    assert clock.sleeps == pytest.approx([1, 2])
    assert info.value.attempts == len(script.calls) == len(errors) == 3
    assert str(info.value) == (
        "fetch failed after 3 attempts: 503 (gave up: waiting 4s more would pass the 5s retry "
        "deadline)"
    )
    assert info.value.response_id == errors[-1].id


async def test_a_retry_after_beyond_the_deadline_gives_up_without_waiting(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    script = Script(dio.TransientError("slow down", retry_after=3600, transport_status=429))
    retry = dio.RetryPolicy(max_attempts=5, jitter=0, deadline=60)
    with anyio.fail_after(SAFETY):
        async with session(tmp_path, script, clock, retry) as s:
            with pytest.raises(dio.FetchError, match="60s retry deadline") as info:
                await s.fetch(s.request("k"))
    assert info.value.attempts == 1
    assert info.value.transport_status == 429
    assert clock.sleeps == []
    assert clock.monotonic() == 0.0


async def test_an_attempt_running_past_the_deadline_is_cancelled_on_the_sessions_clock(
    tmp_path: Path,
) -> None:
    clock = FakeClock(auto_advance=False)
    stalled = anyio.Event()  # a stalled upstream: never answers
    script = Script(stalled, b"never")
    retry = dio.RetryPolicy(max_attempts=3, base_delay=1, jitter=0, deadline=3600)
    outcome: list[BaseException] = []

    async def fetch(s: dio.AsyncSession) -> None:
        try:
            await s.fetch(s.request("k"))
        except dio.FetchError as exc:
            outcome.append(exc)

    with anyio.fail_after(SAFETY):
        async with session(tmp_path, script, clock, retry) as s:
            async with anyio.create_task_group() as tg:
                tg.start_soon(fetch, s)
                await script.entered.wait()
                clock.advance(3601)  # the hour's deadline has passed on the session's clock
                await anyio.wait_all_tasks_blocked()
                try:
                    assert script.cancelled, "the attempt still runs past its deadline"
                finally:
                    stalled.set()  # end the stalled attempt either way
    assert len(outcome) == 1
    assert "deadline" in str(outcome[0])


# -- Retry-After cools the whole source -------------------------------------------------------


async def test_retry_after_cools_down_the_source_for_other_requests(tmp_path: Path) -> None:
    clock = FakeClock(auto_advance=False)
    calls: list[str] = []

    def handler(request: Request) -> bytes:
        calls.append(request.kind)
        if request.kind == "a":
            raise dio.TransientError("slow down", retry_after=30, transport_status=429)
        return b"b answered"

    registry = dio.Registry(clock=clock)
    registry.register("m", dio.MockAdapter(handler), retry=dio.RetryPolicy(max_attempts=1))
    gate = registry.gate("m")
    answers: list[bytes] = []
    with anyio.fail_after(SAFETY):
        async with (
            dio.Store(tmp_path) as store,
            dio.AsyncSession("m", store=store, registry=registry) as s,
        ):
            with pytest.raises(dio.FetchError, match="slow down"):
                await s.fetch(s.request("a"))
            assert gate.statistics().cooldown_remaining == 30

            async def fetch_b() -> None:
                answers.append(await s.read(await s.fetch(s.request("b"))))

            async with anyio.create_task_group() as tg:
                tg.start_soon(fetch_b)
                await eventually(lambda: bool(clock.sleeps or answers))
                assert clock.sleeps == [30.0]  # b waits at the gate for the cooldown
                assert gate.statistics().waiting == 1
                clock.advance(29.5)
                await anyio.wait_all_tasks_blocked()
                assert calls == ["a"] and answers == []  # still held: the cooldown has 0.5 s
                clock.advance(0.5)
            assert calls == ["a", "b"]
            assert answers == [b"b answered"]
            assert gate.statistics().cooldown_remaining == 0
