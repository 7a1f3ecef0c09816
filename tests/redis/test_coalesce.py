"""Coalescing across processes, in one process: two ``Registry`` objects on one Redis prefix and
one store have two separate in-process coalescers, exactly as two worker processes would. (Real
processes: ``test_processes.py``.)"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

pytest.importorskip("redis")

import mxm_dataio_async as dio
from mxm_dataio_async import CoordinationError, FetchError
from mxm_dataio_async.redis import RedisCoalescer, RedisCoordination
from mxm_dataio_async.testing import Clock, FakeClock
from tests.redis.conftest import eventually, free_port

pytestmark = pytest.mark.anyio


PREFIX: dict[str, str] = {}  # a session's Redis prefix


class Upstream:
    """A MockAdapter handler that counts calls and can hold them until released."""

    def __init__(self) -> None:
        self.calls = 0
        self.started = anyio.Event()
        self.release = anyio.Event()
        self.fail_first = False

    async def __call__(self, request: dio.Request) -> bytes:
        self.calls += 1
        self.started.set()
        await self.release.wait()
        if self.fail_first and self.calls == 1:
            raise ValueError("upstream broke")
        return f"answer {request.params.get('i')} #{self.calls}".encode()


@asynccontextmanager
async def worker(
    store: dio.Store,
    redis: RedisCoordination,
    upstream: Upstream,
    *,
    clock: Clock | None = None,
) -> AsyncIterator[dio.AsyncSession]:
    """One "process": its own Registry (so its own in-process coalescer) and a session."""
    registry = (
        dio.Registry(redis=redis) if clock is None else dio.Registry(redis=redis, clock=clock)
    )
    async with registry:
        registry.register("src", dio.MockAdapter(upstream), retry=dio.RetryPolicy(max_attempts=1))
        async with dio.AsyncSession("src", store=store, registry=registry) as session:
            PREFIX[session.id] = redis.prefix
            yield session


async def subscribed(c: RedisCoordination, channel: str, count: int = 1) -> None:
    """Until ``count`` processes wait on ``channel`` (they are subscribed to it)."""

    async def check() -> bool:
        numsub = await c.client.pubsub_numsub(channel)
        return int(numsub[0][1]) >= count

    await eventually(check)


def flight_of(session: dio.AsyncSession, request: dio.Request) -> str:
    """The Redis key (and channel) of a persisted ``request`` without headers."""
    redis = RedisCoordination("redis://127.0.0.1:1/0", prefix=PREFIX[session.id])
    return RedisCoalescer(redis, session.store).flight((request.hash, True, ""))


async def two_fetches(
    watch: RedisCoordination,
    first: tuple[dio.AsyncSession, dio.Request, Upstream],
    second: tuple[dio.AsyncSession, dio.Request],
    then: Callable[[], Awaitable[None]],
) -> list[Any]:
    """The first process fetches; once its upstream call has begun the second fetches the same
    request; once the second waits on the flight's channel, ``then()``. Returns both outcomes
    (a Response, or the exception raised)."""
    out: list[Any] = [None, None]

    async def keep(n: int, session: dio.AsyncSession, request: dio.Request) -> None:
        try:
            out[n] = await session.fetch(request)
        except Exception as exc:
            out[n] = exc

    async with anyio.create_task_group() as tg:
        tg.start_soon(keep, 0, first[0], first[1])
        await first[2].started.wait()
        tg.start_soon(keep, 1, *second)
        await subscribed(watch, flight_of(*second))
        await then()
    return out


async def test_two_processes_make_one_upstream_call(
    redis_url: str, prefix: str, tmp_path: Path
) -> None:
    up = Upstream()
    async with (
        dio.Store(tmp_path) as store,
        RedisCoordination(redis_url, prefix=prefix) as watch,
        worker(store, RedisCoordination(redis_url, prefix=prefix), up) as one,
        worker(store, RedisCoordination(redis_url, prefix=prefix), up) as two,
    ):
        r1, r2 = one.request("item", params={"i": 1}), two.request("item", params={"i": 1})

        async def release() -> None:
            up.release.set()

        got1, got2 = await two_fetches(watch, (one, r1, up), (two, r2), release)
        assert up.calls == 1
        assert isinstance(got1, dio.Response) and isinstance(got2, dio.Response)
        assert got1.request_id == r1.id
        assert got2.id == got1.id and got2.request_id == r1.id  # the recorded response, joined
        assert await two.read(got2) == b"answer 1 #1"
        assert not await watch.client.exists(flight_of(one, r1))  # the claim is released


async def test_duplicates_in_one_process_never_reach_redis(
    redis_url: str, prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs: list[str] = []
    real_run = RedisCoordination.run

    async def counting(self: RedisCoordination, lua: str, *args: Any) -> Any:
        runs.append(lua)
        return await real_run(self, lua, *args)

    monkeypatch.setattr(RedisCoordination, "run", counting)
    up = Upstream()
    up.release.set()
    async with (
        dio.Store(tmp_path) as store,
        worker(store, RedisCoordination(redis_url, prefix=prefix), up) as s,
    ):
        requests = [s.request("item", params={"i": 7}) for _ in range(20)]
        async with anyio.create_task_group() as tg:
            for r in requests:
                tg.start_soon(s.fetch, r)
    assert up.calls == 1
    assert len(runs) == 2  # one claim and one finish, for twenty callers


async def test_a_failed_producer_lets_the_waiter_fetch_itself(
    redis_url: str, prefix: str, tmp_path: Path
) -> None:
    up = Upstream()
    up.fail_first = True
    async with (
        dio.Store(tmp_path) as store,
        RedisCoordination(redis_url, prefix=prefix) as watch,
        worker(store, RedisCoordination(redis_url, prefix=prefix), up) as one,
        worker(store, RedisCoordination(redis_url, prefix=prefix), up) as two,
    ):
        r1, r2 = one.request("item", params={"i": 2}), two.request("item", params={"i": 2})

        async def release() -> None:
            up.release.set()

        got1, got2 = await two_fetches(watch, (one, r1, up), (two, r2), release)
        assert isinstance(got1, FetchError)
        assert isinstance(got2, dio.Response) and got2.request_id == r2.id  # its own fetch
        assert up.calls == 2
        assert await two.read(got2) == b"answer 2 #2"


async def test_a_waiter_fetches_itself_after_wait(
    redis_url: str, prefix: str, tmp_path: Path
) -> None:
    clock = FakeClock(auto_advance=False)
    held, quick = Upstream(), Upstream()
    quick.release.set()
    async with (
        dio.Store(tmp_path) as store,
        RedisCoordination(redis_url, prefix=prefix) as watch,
        worker(store, RedisCoordination(redis_url, prefix=prefix), held) as one,
        worker(
            store, RedisCoordination(redis_url, prefix=prefix, wait=5), quick, clock=clock
        ) as two,
    ):
        r1, r2 = one.request("item", params={"i": 3}), two.request("item", params={"i": 3})

        async def time_passes() -> None:
            clock.advance(4.9)
            await anyio.sleep(0.05)  # a chance to (wrongly) stop waiting early
            assert quick.calls == 0
            clock.advance(0.1)

            async def fetched_itself() -> bool:
                return quick.calls == 1

            await eventually(fetched_itself)
            held.release.set()  # only now does the first process's call end

        got1, got2 = await two_fetches(watch, (one, r1, held), (two, r2), time_passes)
        assert isinstance(got1, dio.Response) and isinstance(got2, dio.Response)
        assert got1.request_id == r1.id and got2.request_id == r2.id
        assert (held.calls, quick.calls) == (1, 1)


async def test_a_claim_left_by_a_dead_producer_is_taken_over_when_it_expires(
    redis_url: str, prefix: str, tmp_path: Path
) -> None:
    """A producer that died holds its claim until it expires (real milliseconds in Redis); a
    waiter then claims the flight itself and fetches."""
    up = Upstream()
    up.release.set()
    async with (
        dio.Store(tmp_path) as store,
        RedisCoordination(redis_url, prefix=prefix) as watch,
        worker(store, RedisCoordination(redis_url, prefix=prefix), up) as s,
    ):
        r = s.request("item", params={"i": 4})
        flight = flight_of(s, r)
        await watch.client.set(flight, "dead-producer", px=400)
        started = time.monotonic()
        got = await s.fetch(r)
        elapsed = time.monotonic() - started
        assert got.request_id == r.id and up.calls == 1
        assert 0.3 <= elapsed < 3.0, elapsed
        assert not await watch.client.exists(flight)  # its own claim, released


async def test_requests_sent_with_other_headers_are_not_coalesced(
    redis_url: str, prefix: str, tmp_path: Path
) -> None:
    up = Upstream()
    async with (
        dio.Store(tmp_path) as store,
        worker(store, RedisCoordination(redis_url, prefix=prefix), up) as one,
        worker(store, RedisCoordination(redis_url, prefix=prefix), up) as two,
    ):
        r1 = one.request("item", params={"i": 5}, headers={"Accept-Language": "en"})
        r2 = two.request("item", params={"i": 5}, headers={"Accept-Language": "fr"})
        assert r1.hash == r2.hash

        async def both_called() -> None:
            async def check() -> bool:
                return up.calls == 2

            await eventually(check)
            up.release.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(one.fetch, r1)
            tg.start_soon(two.fetch, r2)
            tg.start_soon(both_called)
        assert up.calls == 2


async def test_never_mode_is_coalesced_only_in_process(
    redis_url: str, prefix: str, tmp_path: Path
) -> None:
    up = Upstream()
    async with (
        dio.Store(tmp_path) as store,
        RedisCoordination(redis_url, prefix=prefix) as watch,
        worker(store, RedisCoordination(redis_url, prefix=prefix), up) as one,
        worker(store, RedisCoordination(redis_url, prefix=prefix), up) as two,
    ):
        r1 = one.request("item", params={"i": 6}, cache_mode="never")
        r2 = two.request("item", params={"i": 6}, cache_mode="never")

        async def both_called() -> None:
            async def check() -> bool:
                return up.calls == 2

            await eventually(check)
            assert not [k async for k in watch.client.scan_iter(match=watch.key("flight", "*"))]
            up.release.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(one.fetch, r1)
            tg.start_soon(two.fetch, r2)
            tg.start_soon(both_called)


async def test_unreachable_redis_fails_closed_or_coalesces_locally(
    prefix: str, tmp_path: Path
) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    up = Upstream()
    up.release.set()
    async with dio.Store(tmp_path) as store:
        async with worker(store, RedisCoordination(url, prefix=prefix, timeout=1), up) as s:
            with anyio.fail_after(5), pytest.raises(CoordinationError, match="unreachable"):
                await s.fetch(s.request("item", params={"i": 8}))
        assert up.calls == 0
        local = RedisCoordination(url, prefix=prefix, on_unavailable="local", local_share=1)
        async with worker(store, local, up) as s:
            got = await s.fetch(s.request("item", params={"i": 8}))
            assert await s.read(got) == b"answer 8 #1"
