"""Stale-if-error: a stored answer when the upstream fails for good, end to end (loopback
server, fake clock: stored responses age without waiting)."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

import mxm_dataio_async as dio
from mxm_dataio_async import telemetry
from mxm_dataio_async.testing import FakeClock
from tests._serve import serving
from tests._upstream import Upstream

pytestmark = pytest.mark.anyio


@dataclass
class Setup:
    session: dio.AsyncSession
    upstream: Upstream
    clock: FakeClock
    events: list[telemetry.Event]


@asynccontextmanager
async def source(
    tmp_path: Path,
    *,
    stale_if_error: float | bool | None,
    breaker: dio.CircuitBreaker | None = None,
) -> AsyncIterator[Setup]:
    upstream = Upstream(200)
    clock = FakeClock()
    events: list[telemetry.Event] = []
    async with serving(upstream.app()) as url:
        async with dio.Registry(clock=clock) as registry:
            registry.register(
                "up",
                dio.HttpAdapter(base_url=url),
                retry=dio.RetryPolicy(max_attempts=2, base_delay=0.1, jitter=0),
                breaker=breaker,
            )
            async with dio.AsyncSession(
                "up",
                root=str(tmp_path),
                registry=registry,
                ttl=10,
                stale_if_error=stale_if_error,
                hooks=[events.append],
            ) as s:
                yield Setup(s, upstream, clock, events)


async def test_a_failing_upstream_is_answered_from_the_store_and_recorded(
    tmp_path: Path,
) -> None:
    async with source(tmp_path, stale_if_error=60) as t:
        s = t.session
        first = await s.fetch(s.request("q", endpoint="/q"))
        t.clock.advance(20)  # past the TTL: the next fetch goes upstream, which now fails
        t.upstream.then(503)
        stale = await s.fetch(s.request("q", endpoint="/q"))
        assert t.upstream.calls == 3  # both attempts were made first
        assert stale.stale and stale.from_cache and stale.ok and stale.id == first.id
        assert await s.read(stale) == b'{"n": 1}'
        stats = s.statistics()
        assert (stats.stale, stats.failures, stats.requests) == (1, 0, 2)
        rows = [r async for r in s.store.iter_responses(status="stale")]
        again = await s.fetch(s.request("q", endpoint="/q"))  # a stale row never answers as fresh
        assert again.stale and t.upstream.calls == 5
    assert len(rows) == 1
    row = rows[0]
    assert row.status is dio.ResponseStatus.STALE and row.checksum == first.checksum
    assert row.adapter_meta == {"stale_from": first.id, "age_seconds": 20.1}  # + the retry wait
    assert row.error is not None and "503" in row.error and row.attempts == 2
    served = next(e for e in t.events if isinstance(e, telemetry.StaleServed))
    assert served.response_id == first.id and served.age_seconds == pytest.approx(20.1)
    finished = [e for e in t.events if isinstance(e, telemetry.FetchFinished)]
    assert [e.outcome for e in finished] == ["fetched", "stale", "stale"]


async def test_too_old_for_the_allowance_fails(tmp_path: Path) -> None:
    async with source(tmp_path, stale_if_error=15) as t:
        s = t.session
        await s.fetch(s.request("q", endpoint="/q"))
        t.clock.advance(20)
        t.upstream.then(503)
        with pytest.raises(dio.FetchError, match="503"):
            await s.fetch(s.request("q", endpoint="/q"))
        assert s.statistics().failures == 1


async def test_the_request_overrides_the_session(tmp_path: Path) -> None:
    async with source(tmp_path, stale_if_error=None) as t:
        s = t.session
        await s.fetch(s.request("q", endpoint="/q"))
        t.clock.advance(3600)
        t.upstream.then(503)
        with pytest.raises(dio.FetchError):
            await s.fetch(s.request("q", endpoint="/q"))
        req = s.request("q", endpoint="/q", stale_if_error=True)
        assert req.stale_if_error == math.inf
        assert (await s.fetch(req)).stale
        assert s.request("q", stale_if_error=30).stale_if_error == 30.0
        with pytest.raises(ValueError, match="stale_if_error"):
            s.request("q", stale_if_error=-1)


async def test_a_refusal_is_an_answer_and_is_never_replaced(tmp_path: Path) -> None:
    async with source(tmp_path, stale_if_error=True) as t:
        s = t.session
        await s.fetch(s.request("q", endpoint="/q"))
        t.clock.advance(20)
        t.upstream.then(404)
        with pytest.raises(dio.FetchError, match="404"):
            await s.fetch(s.request("q", endpoint="/q"))


async def test_an_open_circuit_is_answered_from_the_store_without_a_call(tmp_path: Path) -> None:
    breaker = dio.CircuitBreaker(failures=2, reset_after=600)
    async with source(tmp_path, stale_if_error=True, breaker=breaker) as t:
        s = t.session
        await s.fetch(s.request("q", endpoint="/q", params={"a": 1}))
        t.clock.advance(20)
        t.upstream.then(503)
        with pytest.raises(dio.FetchError):  # never stored: nothing to serve; the circuit opens
            await s.fetch(s.request("q", endpoint="/q", params={"b": 2}))
        assert s.statistics().breaker == "open"
        calls = t.upstream.calls
        stale = await s.fetch(s.request("q", endpoint="/q", params={"a": 1}))
        assert stale.stale and t.upstream.calls == calls
        rows = [r async for r in s.store.iter_responses(status="stale")]
    assert len(rows) == 1 and rows[0].error is not None and "CircuitOpen" in rows[0].error
