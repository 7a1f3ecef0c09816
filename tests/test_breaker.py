"""The circuit breaker: its pure state machine, then a source that keeps failing, end to end
(loopback server, fake clock)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest

import mxm_dataio_async as dio
from mxm_dataio_async import telemetry
from mxm_dataio_async._breaker import BreakerState, Circuit
from mxm_dataio_async.testing import FakeClock
from tests._serve import serving
from tests._upstream import Upstream

# -- the state machine ------------------------------------------------------------------------


def test_opens_after_n_consecutive_failures_and_probes_after_reset() -> None:
    c = Circuit(dio.CircuitBreaker(failures=3, reset_after=10.0))
    assert c.failed(0.0) is None and c.failed(1.0) is None
    assert c.succeeded() is None and c.failures == 0  # an answer resets the count
    c.failed(2.0), c.failed(3.0)
    change = c.failed(4.0)
    assert change is not None and (change.old, change.new) == ("closed", "open")
    assert c.admit(13.9) == (False, None) and c.retry_in(13.9) == pytest.approx(0.1)
    admitted, change = c.admit(14.0)
    assert admitted and change is not None and change.new is BreakerState.HALF_OPEN
    assert c.admit(14.0) == (False, None)  # one probe at a time
    change = c.failed(15.0)  # the probe failed: open again, for reset_after more
    assert change is not None and change.new is BreakerState.OPEN
    assert c.admit(24.9)[0] is False
    assert c.admit(25.0)[0] is True
    change = c.succeeded()
    assert change is not None and change.new is BreakerState.CLOSED and c.opened == 2


def test_a_probe_that_ends_without_an_answer_lets_the_next_one_probe() -> None:
    c = Circuit(dio.CircuitBreaker(failures=1, reset_after=5.0))
    c.failed(0.0)
    assert c.admit(5.0)[0] is True
    c.released()  # cancelled, say
    assert c.admit(5.0)[0] is True  # not stuck half-open with nobody probing


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="failures"):
        dio.CircuitBreaker(failures=0)
    with pytest.raises(ValueError, match="reset_after"):
        dio.CircuitBreaker(reset_after=0)
    with pytest.raises(TypeError):
        dio.CircuitBreaker(failures=True)
    with pytest.raises(TypeError, match="CircuitBreaker"):
        dio.Registry().register("x", dio.MockAdapter(lambda r: b""), breaker=5)  # type: ignore[arg-type]


# -- end to end -------------------------------------------------------------------------------


@dataclass
class Setup:
    session: dio.AsyncSession
    upstream: Upstream
    clock: FakeClock
    registry: dio.Registry
    events: list[telemetry.Event]


@asynccontextmanager
async def failing_source(tmp_path: Path, *statuses: int) -> AsyncIterator[Setup]:
    upstream = Upstream(*statuses)
    clock = FakeClock()
    events: list[telemetry.Event] = []
    async with serving(upstream.app()) as url:
        async with dio.Registry(clock=clock, hooks=[events.append]) as registry:
            registry.register(
                "up",
                dio.HttpAdapter(base_url=url),
                rate_limit=dio.RateLimit(1000),
                retry=dio.RetryPolicy(max_attempts=2, base_delay=0.1, jitter=0),
                breaker=dio.CircuitBreaker(failures=3, reset_after=30.0),
            )
            async with dio.AsyncSession("up", root=str(tmp_path), registry=registry) as s:
                yield Setup(s, upstream, clock, registry, events)


def changes(events: list[telemetry.Event]) -> list[tuple[str, str]]:
    return [(e.old, e.new) for e in events if isinstance(e, telemetry.BreakerStateChanged)]


@pytest.mark.anyio
async def test_a_failing_source_fails_fast_then_a_probe_closes_it(tmp_path: Path) -> None:
    async with failing_source(tmp_path, 503) as t:
        s = t.session
        with pytest.raises(dio.FetchError) as first:
            await s.fetch(s.request("q", endpoint="/q", params={"i": 0}))
        assert first.value.attempts == 2 and not isinstance(first.value, dio.CircuitOpen)
        with pytest.raises(dio.CircuitOpen) as opened:  # its first attempt is the third failure
            await s.fetch(s.request("q", endpoint="/q", params={"i": 1}))
        assert t.upstream.calls == 3
        assert opened.value.source == "up" and opened.value.retry_in == pytest.approx(30.0)
        assert isinstance(opened.value.__cause__, dio.TransientError)
        assert s.statistics().breaker == "open"
        granted = t.registry.gate("up").statistics().total_acquired
        for i in range(2, 50):  # fail fast: no adapter call, no rate budget
            with pytest.raises(dio.CircuitOpen, match="circuit breaker of source 'up' is open"):
                await s.fetch(s.request("q", endpoint="/q", params={"i": i}))
        assert t.upstream.calls == 3
        assert t.registry.gate("up").statistics().total_acquired == granted
        t.clock.advance(30.0)
        t.upstream.then(200)
        resp = await s.fetch(s.request("q", endpoint="/q", params={"i": 99}))
        assert resp.ok and t.upstream.calls == 4
        stats = s.statistics()
    assert changes(t.events) == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]
    assert stats.breaker == "closed" and stats.failures == 50 and stats.fetched == 1


@pytest.mark.anyio
async def test_a_failed_probe_opens_it_again(tmp_path: Path) -> None:
    async with failing_source(tmp_path, 503) as t:
        s = t.session
        for i in range(2):
            with pytest.raises(dio.FetchError):
                await s.fetch(s.request("q", endpoint="/q", params={"i": i}))
        t.clock.advance(30.0)
        with pytest.raises(dio.CircuitOpen):  # the probe fails: open again, no second attempt
            await s.fetch(s.request("q", endpoint="/q", params={"i": 9}))
        assert t.upstream.calls == 4
    assert changes(t.events) == [("closed", "open"), ("open", "half_open"), ("half_open", "open")]


@pytest.mark.anyio
async def test_answers_reset_the_count_and_refusals_are_answers(tmp_path: Path) -> None:
    async with failing_source(tmp_path, 503, 404) as t:
        s = t.session
        for i in range(5):  # 503 then 404 (an answer), over and over: never 3 in a row
            t.upstream.then(503, 404)
            with pytest.raises(dio.FetchError) as err:
                await s.fetch(s.request("q", endpoint="/q", params={"i": i}))
            assert not isinstance(err.value, dio.CircuitOpen)
        assert s.statistics().breaker == "closed"
    assert changes(t.events) == []


def test_circuit_open_is_a_fetch_error_and_a_dataio_error() -> None:
    assert issubclass(dio.CircuitOpen, dio.FetchError)
    assert issubclass(dio.CircuitOpen, dio.DataIOError)


# -- send and stream ---------------------------------------------------------------------------


@asynccontextmanager
async def mock_source(
    tmp_path: Path, adapter: dio.MockAdapter
) -> AsyncIterator[tuple[dio.AsyncSession, FakeClock, list[telemetry.Event]]]:
    clock = FakeClock()
    events: list[telemetry.Event] = []
    async with dio.Registry(clock=clock, hooks=[events.append]) as registry:
        registry.register(
            "m",
            adapter,
            retry=dio.RetryPolicy(max_attempts=1),
            breaker=dio.CircuitBreaker(failures=2, reset_after=10.0),
        )
        async with dio.AsyncSession("m", root=str(tmp_path), registry=registry) as s:
            yield s, clock, events


def unavailable(*_: object) -> bytes:
    raise dio.TransientError("503 Service Unavailable", transport_status=503)


@pytest.mark.anyio
async def test_sends_count_toward_the_circuit_and_an_open_circuit_refuses_them(
    tmp_path: Path,
) -> None:
    failing = [True, True]  # then the upstream answers

    def send(request: dio.Request, payload: bytes) -> bytes:
        if failing and failing.pop():
            unavailable()
        return b"ack"

    adapter = dio.MockAdapter(send_handler=send)
    async with mock_source(tmp_path, adapter) as (s, clock, events):
        for i in range(2):
            with pytest.raises(dio.FetchError) as failed:
                await s.send(s.request("up", method="POST", params={"i": i}), b"x")
            assert not isinstance(failed.value, dio.CircuitOpen)
        assert s.statistics().breaker == "open"
        with pytest.raises(dio.CircuitOpen, match="circuit breaker of source 'm' is open"):
            await s.send(s.request("up", method="POST", params={"i": 2}), b"x")
        with pytest.raises(dio.CircuitOpen):  # one circuit per source: fetches fail fast too
            await s.fetch(s.request("q"))
        assert adapter.calls["send"] == 2 and adapter.calls["fetch"] == 0
        clock.advance(10.0)
        ack = await s.send(s.request("up", method="POST", params={"i": 3}), b"x")  # the probe
        assert ack.status is dio.ResponseStatus.ACK and s.statistics().breaker == "closed"
    assert changes(events) == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]


@pytest.mark.anyio
async def test_a_refused_send_is_an_answer(tmp_path: Path) -> None:
    refusals = dio.MockAdapter(
        send_handler=lambda r, p: dio.AdapterResult(data=b"no", error="403 Forbidden")
    )
    async with mock_source(tmp_path, refusals) as (s, _, events):
        for i in range(4):
            with pytest.raises(dio.FetchError) as refused:
                await s.send(s.request("up", method="POST", params={"i": i}), b"x")
            assert not isinstance(refused.value, dio.CircuitOpen)
        assert s.statistics().breaker == "closed" and refusals.calls["send"] == 4
    assert changes(events) == []


@pytest.mark.anyio
async def test_streams_open_the_circuit_only_by_how_they_open(tmp_path: Path) -> None:
    opened: list[str] = []

    def stream(request: dio.Request) -> list[bytes]:
        mode = str(request.params["mode"])
        opened.append(mode)
        if mode == "down":
            unavailable()
        return [b"one", b"two"]

    adapter = dio.MockAdapter(stream_handler=stream)
    async with mock_source(tmp_path, adapter) as (s, clock, events):
        for _ in range(2):  # two streams that fail to open: the circuit opens
            with pytest.raises(dio.FetchError):
                async for _message in s.stream(s.request("feed", params={"mode": "down"})):
                    pass
        with pytest.raises(dio.CircuitOpen):
            async for _message in s.stream(s.request("feed", params={"mode": "up"})):
                pass
        assert opened == ["down", "down"]  # refused without calling the adapter
        clock.advance(10.0)
        messages = [m async for m in s.stream(s.request("feed", params={"mode": "up"}))]
        assert [m.sequence for m in messages] == [0, 1] and s.statistics().breaker == "closed"
    assert changes(events) == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]


@pytest.mark.anyio
async def test_a_probe_stream_closed_before_its_first_message_lets_another_probe(
    tmp_path: Path,
) -> None:
    waiting = anyio.Event()

    async def silent(request: dio.Request) -> AsyncIterator[bytes]:
        if request.params["mode"] == "down":
            unavailable()
        waiting.set()
        await anyio.sleep_forever()  # never answers: its consumer gives up first
        yield b"late"

    async def consume(s: dio.AsyncSession, mode: str) -> None:
        async for _message in s.stream(s.request("feed", params={"mode": mode})):
            pass

    adapter = dio.MockAdapter(stream_handler=silent)
    async with mock_source(tmp_path, adapter) as (s, clock, _):
        for _ in range(2):
            with pytest.raises(dio.FetchError):
                await consume(s, "down")
        clock.advance(10.0)
        async with anyio.create_task_group() as tg:
            tg.start_soon(consume, s, "up")  # admitted as the probe
            await waiting.wait()
            tg.cancel_scope.cancel()  # given up before its first message
        assert s.statistics().breaker == "open"  # not stuck half-open with nobody probing
        with pytest.raises(dio.FetchError):  # the next opening is admitted as the probe at once
            await consume(s, "down")
        assert adapter.calls["stream"] == 4
