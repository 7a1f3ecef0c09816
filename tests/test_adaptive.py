"""Adaptive throttling (AIMD): the limiter's rule on a fake clock, then a 429 end to end.
The rate it achieves against a real limit is measured by ``benchmarks/adaptive.py``."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

import mxm_dataio_async as dio
from mxm_dataio_async import telemetry
from mxm_dataio_async.store import SourceLimiter
from mxm_dataio_async.testing import FakeClock
from tests._serve import serving
from tests._upstream import Upstream


def limiter(rate: float = 20, *, adaptive: bool = True) -> tuple[SourceLimiter, FakeClock]:
    clock = FakeClock()
    lim = SourceLimiter(
        dio.RateLimit(rate, adaptive=adaptive), clock=clock.monotonic, sleep=clock.sleep
    )
    return lim, clock


def test_a_refusal_lowers_the_rate_once_per_round_trip() -> None:
    lim, clock = limiter(20)
    assert lim.adaptive and lim.rate == 20
    sent = clock.monotonic()
    clock.advance(0.05)
    assert lim.slow_down(sent) == pytest.approx((20, 18))
    assert lim.slow_down(sent) is None  # on the wire before the decrease: says nothing new
    clock.advance(0.05)
    assert lim.slow_down(clock.monotonic()) == pytest.approx((18, 16.2))
    assert lim.statistics().rate == pytest.approx(16.2)
    assert "adaptive (now 16.2)" in repr(lim)


def test_successes_raise_it_back_additively_up_to_the_ceiling() -> None:
    lim, _ = limiter(20)
    lim.slow_down()
    assert lim.rate == pytest.approx(18)
    lim.speed_up()  # +1/40 of the ceiling per second: 0.5/s per second, at 18/s that is:
    assert lim.rate == pytest.approx(18 + 0.5 / 18)
    for _ in range(1000):
        lim.speed_up()
    assert lim.rate == 20


def test_a_rate_never_drops_below_one_percent_of_the_ceiling() -> None:
    lim, _ = limiter(100)
    for _ in range(200):
        lim.slow_down()
    assert lim.rate == pytest.approx(1.0)


@pytest.mark.anyio
async def test_grants_follow_the_lowered_rate() -> None:
    lim, clock = limiter(10)
    for _ in range(7):  # 10 -> 4.78/s
        lim.slow_down()
    rate = lim.rate
    assert rate is not None
    times = []
    for _ in range(4):
        async with lim.slot():
            times.append(clock.monotonic())
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps == pytest.approx([1 / rate] * 3)


def test_a_fixed_rate_never_adapts() -> None:
    lim, _ = limiter(20, adaptive=False)
    assert not lim.adaptive and lim.slow_down() is None
    lim.speed_up()
    assert lim.rate == 20
    with pytest.raises(TypeError, match="adaptive"):
        dio.RateLimit(20, adaptive=1)  # type: ignore[arg-type]


def test_a_redis_registry_refuses_an_adaptive_rate() -> None:
    registry = dio.Registry(redis="redis://127.0.0.1:1/0")  # never connects for this
    with pytest.raises(ValueError, match="adaptive rate limit is per process"):
        registry.register(
            "x", dio.MockAdapter(lambda r: b""), rate_limit=dio.RateLimit(20, adaptive=True)
        )


@pytest.mark.anyio
@pytest.mark.parametrize("adaptive", [True, False])
async def test_a_429_slows_an_adaptive_source_instead_of_pausing_it(
    tmp_path: Path, adaptive: bool
) -> None:
    upstream = Upstream(429, 200, retry_after="1")
    clock = FakeClock()
    events: list[telemetry.Event] = []
    async with serving(upstream.app()) as url:
        async with dio.Registry(clock=clock, hooks=[events.append]) as registry:
            registry.register(
                "up",
                dio.HttpAdapter(base_url=url),
                rate_limit=dio.RateLimit(20, adaptive=adaptive),
                retry=dio.RetryPolicy(max_attempts=2, base_delay=0, jitter=0),
            )
            async with dio.AsyncSession("up", root=str(tmp_path), registry=registry) as s:
                assert (await s.fetch(s.request("q", endpoint="/q"))).ok
                stats = s.statistics()
    assert max(clock.sleeps) >= 1.0  # the refused request itself honours Retry-After
    adjusted = [e for e in events if isinstance(e, telemetry.RateAdjusted)]
    cooled = [e for e in events if isinstance(e, telemetry.CooldownStarted)]
    if adaptive:
        assert [(e.rate_before, round(e.rate_after, 6)) for e in adjusted] == [(20, 18)]
        assert cooled == []  # a Retry-After within the limit's period: no source-wide pause
        assert stats.gate.rate is not None and 18 < stats.gate.rate < 20  # one success back up
    else:
        assert adjusted == [] and [e.seconds for e in cooled] == [1.0]
        assert stats.gate.rate == 20


@pytest.mark.anyio
async def test_a_long_retry_after_still_pauses_an_adaptive_source(tmp_path: Path) -> None:
    upstream = Upstream(503, 200, retry_after="120")  # maintenance, not a rate limit
    clock = FakeClock()
    events: list[telemetry.Event] = []
    async with serving(upstream.app()) as url:
        async with dio.Registry(clock=clock, hooks=[events.append]) as registry:
            registry.register(
                "up",
                dio.HttpAdapter(base_url=url),
                rate_limit=dio.RateLimit(20, adaptive=True),
                retry=dio.RetryPolicy(max_attempts=2, base_delay=0, jitter=0),
            )
            async with dio.AsyncSession("up", root=str(tmp_path), registry=registry) as s:
                assert (await s.fetch(s.request("q", endpoint="/q"))).ok
    assert [e.seconds for e in events if isinstance(e, telemetry.CooldownStarted)] == [120.0]
    assert any(isinstance(e, telemetry.RateAdjusted) for e in events)
