"""The Redis rate gate in one process, against a real Redis: its schedule on a fake clock (the
script then reads that clock instead of ``TIME``), cooldowns crossing between coordinations (each
one stands for a process), the per-process concurrency cap, cancellation, and what happens when
Redis is not there. The cross-process rate itself is in ``test_processes.py``."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import anyio
import pytest

pytest.importorskip("redis")

import mxm_dataio_async as dio
from mxm_dataio_async import CoordinationError, DataIOError, RateLimit, UsageError
from mxm_dataio_async._coalesce import Coalescer
from mxm_dataio_async.redis import RedisCoalescer, RedisCoordination, RedisRateGate
from mxm_dataio_async.store import RateGate, SourceLimiter
from mxm_dataio_async.testing import FakeClock
from tests.redis.conftest import PrivateRedis, eventually, free_port

pytestmark = pytest.mark.anyio


async def cooldown_written(c: RedisCoordination, source: str) -> None:
    """Until the cooldown a gate set in the background is in Redis."""

    async def check() -> bool:
        return bool(await c.client.exists(c.key("cooldown", source)))

    await eventually(check)


async def sleeping(clock: FakeClock, count: int) -> None:
    """Until ``count`` sleeps were asked of the clock (a waiter reached its wait)."""

    async def check() -> bool:
        return len(clock.sleeps) >= count

    await eventually(check)


# -- the schedule ------------------------------------------------------------------------------


async def test_burst_then_steady_rate(coordination: RedisCoordination) -> None:
    clock = FakeClock()
    gate = RedisRateGate(coordination, "src", RateLimit(10, burst=3), clock=clock)
    assert isinstance(gate, RateGate)
    grants = []
    for _ in range(8):
        async with gate.slot():
            grants.append(clock.monotonic())
    assert grants == pytest.approx([0, 0, 0, 0.1, 0.2, 0.3, 0.4, 0.5])
    stats = gate.statistics()
    assert (stats.total_acquired, stats.total_waits, stats.in_flight, stats.waiting) == (8, 5, 0, 0)
    assert stats.tokens == pytest.approx(0.0, abs=1e-6)  # the burst is spent, the TAT ahead


async def test_two_processes_share_one_schedule(redis_url: str, prefix: str) -> None:
    """Two coordinations on one prefix (two processes) take turns on one budget; another prefix
    has a budget of its own."""
    clock = FakeClock()
    async with (
        RedisCoordination(redis_url, prefix=prefix) as one,
        RedisCoordination(redis_url, prefix=prefix) as two,
        RedisCoordination(redis_url, prefix=prefix + "x") as other,
    ):
        gates = [RedisRateGate(c, "src", RateLimit(10), clock=clock) for c in (one, two)]
        grants = []
        for n in range(6):
            async with gates[n % 2].slot():
                grants.append(clock.monotonic())
        assert grants == pytest.approx([0, 0.1, 0.2, 0.3, 0.4, 0.5])
        before = clock.monotonic()
        async with RedisRateGate(other, "src", RateLimit(10), clock=clock).slot():
            assert clock.monotonic() == before  # not behind the first prefix's schedule


async def test_a_cooldown_set_in_one_process_pauses_another(redis_url: str, prefix: str) -> None:
    clock = FakeClock()
    async with (
        RedisCoordination(redis_url, prefix=prefix) as one,
        RedisCoordination(redis_url, prefix=prefix) as two,
    ):
        here = RedisRateGate(one, "src", RateLimit(100), clock=clock)
        there = RedisRateGate(two, "src", RateLimit(100), clock=clock)
        here.cooldown(5.0)
        assert here.statistics().cooldown_remaining == pytest.approx(5.0)
        await cooldown_written(one, "src")
        async with there.slot():
            assert clock.monotonic() == pytest.approx(5.0)
        assert there.statistics().total_waits == 1
        # A shorter cooldown does not shorten the one in force.
        here.cooldown(10.0)
        await cooldown_written(one, "src")
        there.cooldown(1.0)
        await anyio.sleep(0.05)  # let its write land (it must change nothing)
        async with there.slot():
            assert clock.monotonic() == pytest.approx(15.0)


async def test_a_waiter_holding_a_reservation_rechecks_the_cooldown(
    redis_url: str, prefix: str
) -> None:
    """A waiter that reserved a slot before another process set a cooldown does not go through
    in the middle of that cooldown (INFRA: 32 grants within 0.32 s without the re-check)."""
    clock = FakeClock(auto_advance=False)
    async with (
        RedisCoordination(redis_url, prefix=prefix) as one,
        RedisCoordination(redis_url, prefix=prefix) as two,
    ):
        gate = RedisRateGate(one, "src", RateLimit(1), clock=clock)
        elsewhere = RedisRateGate(two, "src", RateLimit(1), clock=clock)
        async with gate.slot():  # at 0; the next slot is 1.0
            pass
        granted: list[float] = []

        async def wait_for_slot() -> None:
            async with gate.slot():
                granted.append(clock.monotonic())

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait_for_slot)
            await sleeping(clock, 1)
            assert clock.sleeps == [pytest.approx(1.0)]  # it holds the slot at 1.0
            elsewhere.cooldown(10.0)
            await cooldown_written(two, "src")
            clock.advance(1.0)
            await sleeping(clock, 2)
            assert granted == []
            assert clock.sleeps[1] == pytest.approx(9.0)  # the rest of the cooldown
            clock.advance(9.0)
        assert granted == [pytest.approx(10.0)]


# -- concurrency, cancellation -------------------------------------------------------------------


async def test_max_concurrency_is_per_process(redis_url: str, prefix: str) -> None:
    async with (
        RedisCoordination(redis_url, prefix=prefix) as one,
        RedisCoordination(redis_url, prefix=prefix) as two,
    ):
        gates = [RedisRateGate(c, "src", max_concurrency=2) for c in (one, two)]
        release = anyio.Event()
        peak = [0, 0]
        holding = [0, 0]

        async def hold(n: int) -> None:
            async with gates[n].slot():
                holding[n] += 1
                peak[n] = max(peak[n], holding[n])
                await release.wait()
                holding[n] -= 1

        async with anyio.create_task_group() as tg:
            for n in (0, 0, 0, 0, 0, 1, 1, 1):
                tg.start_soon(hold, n)

            async def settled() -> bool:
                return holding == [2, 2] and gates[0].statistics().waiting == 3

            await eventually(settled)
            assert gates[1].statistics().waiting == 1
            release.set()
        assert peak == [2, 2]
        assert [g.statistics().total_acquired for g in gates] == [5, 3]
        assert gates[0].statistics().in_flight == 0


async def test_a_cancelled_waiter_leaves_nothing_behind(coordination: RedisCoordination) -> None:
    gate = RedisRateGate(coordination, "src", RateLimit(1000), max_concurrency=1)
    async with gate.slot():
        with anyio.move_on_after(0.05):
            async with gate.slot():
                pytest.fail("granted while the only slot was held")
        assert gate.statistics().waiting == 0
    stats = gate.statistics()
    assert (stats.in_flight, stats.waiting, stats.total_acquired) == (0, 0, 1)
    with anyio.fail_after(5):
        async with gate.slot():
            assert gate.statistics().in_flight == 1


# -- keys ----------------------------------------------------------------------------------------


async def test_keys_are_namespaced_and_expire(coordination: RedisCoordination) -> None:
    gate = RedisRateGate(coordination, "quotes", RateLimit(10))
    async with gate.slot():
        pass
    gate.cooldown(2.0)
    await cooldown_written(coordination, "quotes")
    rate_key = coordination.key("rate", "quotes")
    assert rate_key == f"mxm:{coordination.prefix}:rate:quotes"
    for key, most in ((rate_key, 60_100), (coordination.key("cooldown", "quotes"), 62_000)):
        ttl = await coordination.client.pttl(key)
        assert 0 < ttl <= most, (key, ttl)


# -- Redis unreachable -----------------------------------------------------------------------------


async def test_unreachable_redis_fails_closed_quickly(prefix: str) -> None:
    port = free_port()  # nothing listens there
    async with RedisCoordination(f"redis://127.0.0.1:{port}/0", prefix=prefix, timeout=1) as c:
        gate = RedisRateGate(c, "src", RateLimit(10))
        started = time.monotonic()
        with anyio.fail_after(5), pytest.raises(CoordinationError) as info:
            async with gate.slot():
                pytest.fail("granted without Redis")
        assert time.monotonic() - started < 2.5
        assert f"127.0.0.1:{port}" in str(info.value) and "unreachable" in str(info.value)
        assert isinstance(info.value, DataIOError)
        assert gate.statistics().in_flight == 0


async def test_redis_going_away_mid_run_fails_closed(
    private_redis: PrivateRedis, prefix: str
) -> None:
    private_redis.start()
    async with RedisCoordination(private_redis.url, prefix=prefix, timeout=1) as c:
        gate = RedisRateGate(c, "src", RateLimit(1000), max_concurrency=4)
        for _ in range(3):
            async with gate.slot():
                pass
        private_redis.stop()
        with anyio.fail_after(5), pytest.raises(CoordinationError, match="unreachable"):
            async with gate.slot():
                pytest.fail("granted without Redis")
        stats = gate.statistics()
        assert (stats.in_flight, stats.waiting, stats.total_acquired) == (0, 0, 3)


async def test_local_fallback_grants_the_local_share_until_redis_answers(
    private_redis: PrivateRedis, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    async with RedisCoordination(
        private_redis.url, prefix=prefix, on_unavailable="local", local_share=0.5, timeout=1
    ) as c:
        gate = RedisRateGate(c, "src", RateLimit(10, burst=2), clock=clock)
        grants = []
        with caplog.at_level(logging.WARNING, logger="mxm_dataio_async.redis"):
            for _ in range(5):  # Redis is down: 5/s here (half of 10/s), burst 1
                async with gate.slot():
                    grants.append(clock.monotonic())
                assert gate.degraded
            private_redis.start()
            # It asks Redis again once probe_interval (1 s) has passed since it failed.
            for _ in range(4):
                async with gate.slot():
                    grants.append(clock.monotonic())
        assert not gate.degraded
        assert grants == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.0, 1.0, 1.1])
        messages = [r.getMessage() for r in caplog.records]
        assert any("granting 0.5 of its rate locally" in m for m in messages)
        assert any("answers again" in m for m in messages)


# -- configuration and the registry --------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"on_unavailable": "local"}, "needs local_share"),
        ({"on_unavailable": "local", "local_share": 1.5}, "local_share must be <= 1"),
        ({"on_unavailable": "local", "local_share": 0}, "local_share must be a finite"),
        ({"local_share": 0.5}, "only used with on_unavailable='local'"),
        ({"on_unavailable": "open"}, "must be 'fail' or 'local'"),
        ({"prefix": "a:b"}, "prefix must be non-empty"),
        ({"timeout": 0}, "timeout must be a finite number > 0"),
        ({"max_connections": 1}, "max_connections must be >= 2"),
    ],
)
def test_coordination_rejects_bad_configuration(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RedisCoordination("redis://127.0.0.1:1/0", **kwargs)  # type: ignore[arg-type]


def test_coordination_rejects_a_url_that_is_not_redis() -> None:
    with pytest.raises(ValueError, match="not a Redis URL"):
        RedisCoordination("http://127.0.0.1:1/0")


def test_gate_rejects_bad_configuration() -> None:
    c = RedisCoordination("redis://127.0.0.1:1/0")
    with pytest.raises(ValueError, match="max_concurrency must be >= 1"):
        RedisRateGate(c, "src", max_concurrency=0)
    with pytest.raises(TypeError, match="rate_limit must be a RateLimit"):
        RedisRateGate(c, "src", 10)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="coordination must be a RedisCoordination"):
        RedisRateGate("redis://x", "src")  # type: ignore[arg-type]
    gate = RedisRateGate(c, "src", RateLimit(10))
    with pytest.raises(ValueError, match="must be >= 0"):
        gate.cooldown(-1)


async def test_registry_builds_redis_gates_and_closes_the_client(
    redis_url: str, tmp_path: Path
) -> None:
    async with dio.Store(str(tmp_path)) as store:
        async with dio.Registry(redis=redis_url) as registry:
            adapter = dio.MockAdapter(lambda r: b"x")
            registry.register("limited", adapter, rate_limit=RateLimit(5), max_concurrency=2)
            registry.register("capped", adapter, max_concurrency=3)
            registry.register("free", adapter)
            limited, capped = registry.gate("limited"), registry.gate("capped")
            assert isinstance(limited, RedisRateGate) and limited.rate_limit == RateLimit(5)
            assert isinstance(capped, RedisRateGate) and capped.max_concurrency == 3
            assert isinstance(registry.gate("free"), SourceLimiter)  # nothing to share
            assert isinstance(registry.coalescer(store), RedisCoalescer)
            assert registry.coalescer(store) is registry.coalescer(store)
            async with dio.AsyncSession("limited", store=store, registry=registry) as s:
                resp = await s.fetch(s.request("one"))
                assert await s.read(resp) == b"x"
            assert limited.statistics().total_acquired == 1
            coordination = registry.redis
            assert coordination is not None
        with pytest.raises(UsageError, match="closed"):
            coordination.client  # noqa: B018


async def test_registry_without_redis_is_unchanged(tmp_path: Path) -> None:
    async with dio.Store(str(tmp_path)) as store, dio.Registry() as registry:
        registry.register("src", dio.MockAdapter(lambda r: b"x"), rate_limit=RateLimit(5))
        assert registry.redis is None
        assert type(registry.gate("src")) is SourceLimiter
        assert type(registry.coalescer(store)) is Coalescer
    with pytest.raises(TypeError, match="redis must be a redis:// URL or a RedisCoordination"):
        dio.Registry(redis=42)  # type: ignore[arg-type]
