"""The engine through the session: coalescing, limits, retries, bulk, cancellation."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest
from anyio import wait_all_tasks_blocked

import mxm_dataio_async as dio
from mxm_dataio_async._models import Request
from mxm_dataio_async._request import build_request
from mxm_dataio_async._store import DB_NAME
from mxm_dataio_async.testing import FakeClock

pytestmark = pytest.mark.anyio


class Gate:
    """An adapter whose fetches block until released; counts calls and cancellations."""

    def __init__(self) -> None:
        self.release = anyio.Event()
        self.calls = 0
        self.cancelled = 0
        self.active = 0
        self.max_active = 0

    async def fetch(self, request: Request) -> bytes:
        self.calls += 1
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await self.release.wait()
        except anyio.get_cancelled_exc_class():
            self.cancelled += 1
            raise
        finally:
            self.active -= 1
        return f"body:{request.params}".encode()


async def until(predicate: Callable[[], bool], limit: float = 30.0) -> None:
    """Wait for a condition (not for time): tasks here also wait on SQLite's thread, which
    ``wait_all_tasks_blocked`` cannot see. The limit only bounds a broken test."""
    with anyio.fail_after(limit):
        while not predicate():  # noqa: ASYNC110 - the state also changes on SQLite's thread
            await anyio.sleep(0.001)


def _count(root: Path, sql: str) -> int:
    conn = sqlite3.connect(root / DB_NAME)
    try:
        return int(conn.execute(sql).fetchone()[0])
    finally:
        conn.close()


async def test_concurrent_duplicates_make_one_adapter_call(tmp_path: Path) -> None:
    gate = Gate()
    reg = dio.Registry()
    reg.register("g", gate)
    async with dio.AsyncSession("g", root=str(tmp_path), registry=reg) as s:
        results: list[dio.Response] = []

        async def one() -> None:
            results.append(await s.fetch(s.request("k", params={"x": 1})))

        async with anyio.create_task_group() as tg:
            for _ in range(500):
                tg.start_soon(one)
            req = s.request("k", params={"x": 1})
            await until(lambda: reg.coalescer(s.store).waiters((req.hash, True, "")) == 500)
            gate.release.set()
        assert gate.calls == 1
        assert len({r.id for r in results}) == 1 and len(results) == 500
    # One response row; every duplicate's request is recorded as served by it.
    assert _count(tmp_path, "SELECT count(*) FROM responses") == 1
    assert _count(tmp_path, "SELECT count(*) FROM requests") == 500


async def test_sessions_sharing_a_store_and_registry_coalesce_with_each_other(
    tmp_path: Path,
) -> None:
    """The web-app shape: a session per incoming call, all on one Store and Registry. 200
    identical concurrent requests on a cold cache make one upstream call."""
    gate = Gate()
    reg = dio.Registry()
    reg.register("g", gate)
    served: list[dio.Response] = []
    async with dio.Store(tmp_path) as store:

        async def handle_one_call() -> None:
            async with dio.AsyncSession("g", store=store, registry=reg) as s:
                served.append(await s.fetch(s.request("k", params={"x": 1})))

        async with anyio.create_task_group() as tg:
            for _ in range(200):
                tg.start_soon(handle_one_call)
            key = (
                build_request(session_id="-", source="g", kind="k", params={"x": 1}).hash,
                True,
                "",
            )
            await until(lambda: reg.coalescer(store).waiters(key) == 200)
            assert (
                gate.calls == 1 and served == []
            )  # nobody is answered before the one upstream call returns
            gate.release.set()
        assert gate.calls == 1
        assert len(served) == 200 and len({r.id for r in served}) == 1
        sessions = await store.list_sessions()
        assert len(sessions) == 200 and all(x.status == "ok" for x in sessions)
    # One response row; each of the other 199 sessions recorded its request, served by it.
    assert _count(tmp_path, "SELECT count(*) FROM responses") == 1
    assert _count(tmp_path, "SELECT count(*) FROM requests WHERE served_from IS NOT NULL") == 199


async def test_leader_cancelled_followers_still_served(tmp_path: Path) -> None:
    gate = Gate()
    reg = dio.Registry()
    reg.register("g", gate)
    async with dio.AsyncSession("g", root=str(tmp_path), registry=reg) as s:
        follower: list[dio.Response] = []
        async with anyio.create_task_group() as tg:
            leader_scope = anyio.CancelScope()

            async def leader() -> None:
                with leader_scope:
                    await s.fetch(s.request("k"))

            async def follow() -> None:
                follower.append(await s.fetch(s.request("k")))

            key = (s.request("k").hash, True, "")
            tg.start_soon(leader)
            await until(lambda: gate.calls == 1)
            tg.start_soon(follow)
            await until(lambda: reg.coalescer(s.store).waiters(key) == 2)
            leader_scope.cancel()
            await until(lambda: reg.coalescer(s.store).waiters(key) == 1)
            await wait_all_tasks_blocked()
            assert gate.cancelled == 0  # the producer outlives its first caller
            gate.release.set()
        assert gate.calls == 1 and len(follower) == 1
        assert await s.read(follower[0]) == b"body:{}"


async def test_all_waiters_cancelled_cancels_the_producer(tmp_path: Path) -> None:
    gate = Gate()
    reg = dio.Registry()
    reg.register("g", gate)
    async with dio.AsyncSession("g", root=str(tmp_path), registry=reg) as s:
        with anyio.move_on_after(60) as outer:  # a bound, not a timing assertion
            async with anyio.create_task_group() as tg:
                key = (s.request("k").hash, True, "")
                for _ in range(3):
                    tg.start_soon(s.fetch, s.request("k"))
                await until(lambda: reg.coalescer(s.store).waiters(key) == 3)
                tg.cancel_scope.cancel()
        assert not outer.cancelled_caught
        await until(lambda: gate.cancelled == 1)
        assert gate.calls == 1
        # The next request starts afresh.
        gate.release.set()
        resp = await s.fetch(s.request("k"))
        assert gate.calls == 2 and resp.ok


async def test_failure_reaches_every_waiter_and_is_not_cached(tmp_path: Path) -> None:
    release = anyio.Event()
    calls = 0

    async def failing(req: Request) -> bytes:
        nonlocal calls
        calls += 1
        await release.wait()
        if calls == 1:
            raise ValueError("first call fails")
        return b"second call works"

    reg = dio.Registry()
    reg.register("m", dio.MockAdapter(failing))
    async with dio.AsyncSession("m", root=str(tmp_path), registry=reg) as s:
        errors: list[BaseException] = []

        async def one() -> None:
            try:
                await s.fetch(s.request("k"))
            except dio.FetchError as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            key = (s.request("k").hash, True, "")
            for _ in range(5):
                tg.start_soon(one)
            await until(lambda: reg.coalescer(s.store).waiters(key) == 5)
            release.set()
        assert len(errors) == 5 and calls == 1
        resp = await s.fetch(s.request("k"))
        assert calls == 2 and await s.read(resp) == b"second call works"


async def test_never_and_default_are_not_coalesced_together(tmp_path: Path) -> None:
    gate = Gate()
    reg = dio.Registry()
    reg.register("g", gate)
    async with dio.AsyncSession("g", root=str(tmp_path), registry=reg) as s:
        async with anyio.create_task_group() as tg:
            tg.start_soon(s.fetch, s.request("k"))
            tg.start_soon(s.fetch, s.request("k", cache_mode="never"))
            await until(lambda: gate.calls == 2)
            gate.release.set()
        assert gate.calls == 2
    assert _count(tmp_path, "SELECT count(*) FROM responses") == 1


async def test_max_concurrency_enforced_through_sessions(tmp_path: Path) -> None:
    gate = Gate()
    reg = dio.Registry()
    reg.register("g", gate, max_concurrency=3)
    async with dio.Store(tmp_path) as store:
        async with (
            dio.AsyncSession("g", store=store, registry=reg) as s1,
            dio.AsyncSession("g", store=store, registry=reg) as s2,
        ):
            async with anyio.create_task_group() as tg:
                for i in range(10):
                    sess = s1 if i % 2 else s2
                    tg.start_soon(sess.fetch, sess.request("k", params={"i": i}))
                limiter = reg.gate("g")
                await until(lambda: limiter.statistics().waiting == 7)
                await wait_all_tasks_blocked()
                stats = reg.gate("g").statistics()
                assert gate.active == 3 and stats.in_flight == 3 and stats.waiting == 7
                gate.release.set()
            assert gate.max_active == 3 and gate.calls == 10


async def test_cache_hits_do_not_spend_rate_budget(tmp_path: Path) -> None:
    reg = dio.Registry()
    reg.register("m", dio.MockAdapter(), rate_limit=dio.RateLimit(1, per=3600, burst=1))
    async with dio.AsyncSession("m", root=str(tmp_path), registry=reg) as s:
        await s.fetch(s.request("k"))  # spends the only token for an hour
        limiter = reg.gate("m")
        before = limiter.statistics().total_acquired
        with anyio.fail_after(30):  # would block for an hour if a hit touched the limiter
            for _ in range(200):
                assert (await s.fetch(s.request("k"))).from_cache
        assert limiter.statistics().total_acquired == before == 1


async def test_every_retry_attempt_spends_budget_and_retry_after_cools_source(
    tmp_path: Path,
) -> None:
    n = 0

    def flaky(req: Request) -> bytes:
        nonlocal n
        n += 1
        if n <= 2:
            raise dio.TransientError("slow down", retry_after=120, transport_status=429)
        return b"ok"

    reg = dio.Registry()
    reg.register("m", dio.MockAdapter(flaky), retry=dio.RetryPolicy(max_attempts=4))
    with dio.disable_retry_waits():
        async with dio.AsyncSession("m", root=str(tmp_path), registry=reg) as s:
            with anyio.fail_after(30):
                resp = await s.fetch(s.request("k"))
            assert resp.attempts == 3
            stats = reg.gate("m").statistics()
            assert stats.total_acquired == 3
    # Outside the testing switch, a retry_after pauses the whole source (on the registry's clock).
    clock = FakeClock(auto_advance=False)
    reg2 = dio.Registry(clock=clock)
    calls = 0

    def always_429(req: Request) -> bytes:
        nonlocal calls
        calls += 1
        raise dio.TransientError("slow down", retry_after=300, transport_status=429)

    reg2.register("m", dio.MockAdapter(always_429), retry=dio.RetryPolicy(max_attempts=1))
    async with dio.AsyncSession("m", root=str(tmp_path), registry=reg2) as s:
        with pytest.raises(dio.FetchError) as info:
            await s.fetch(s.request("a"))
        assert info.value.transport_status == 429
        assert reg2.gate("m").statistics().cooldown_remaining == 300
        later: list[BaseException] = []

        async def another_request() -> None:
            try:
                await s.fetch(s.request("b"))
            except dio.FetchError as exc:
                later.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(another_request)  # another request of the same source waits
            await until(lambda: reg2.gate("m").statistics().waiting == 1)
            clock.advance(299.0)
            await wait_all_tasks_blocked()
            assert calls == 1 and reg2.gate("m").statistics().waiting == 1
            clock.advance(1.0)
        assert calls == 2 and len(later) == 1


async def test_fetch_many_bounded_in_flight_and_lazy(tmp_path: Path) -> None:
    gate = Gate()
    gate.release.set()
    reg = dio.Registry()
    reg.register("g", gate)
    pulled = 0
    async with dio.AsyncSession("g", root=str(tmp_path), registry=reg) as s:

        def requests() -> Iterator[Request]:
            nonlocal pulled
            for i in range(1000):
                pulled += 1
                yield s.request("k", params={"i": i})

        got = 0
        async for outcome in s.fetch_many(requests(), concurrency=5):
            got += 1
            assert outcome.ok
            # The feeder never runs ahead of what is in flight (5), buffered (5) and handed out.
            assert pulled <= got + 5 + 5 + 1
        assert got == 1000 and pulled == 1000
        assert gate.max_active <= 5


async def test_fetch_many_consumer_cancelled_cleans_up(tmp_path: Path) -> None:
    gate = Gate()
    reg = dio.Registry()
    reg.register("g", gate)
    async with dio.AsyncSession("g", root=str(tmp_path), registry=reg) as s:
        reqs = (s.request("k", params={"i": i}) for i in range(10_000))
        with anyio.CancelScope() as scope:

            async def consume() -> None:
                async for _ in s.fetch_many(reqs, concurrency=8):
                    pass

            async with anyio.create_task_group() as tg:
                tg.start_soon(consume)
                await until(lambda: gate.active == 8)
                scope.cancel()
        await until(lambda: gate.cancelled == 8)
        assert gate.active == 0
        assert reg.coalescer(s.store).in_flight() == 0
    # The session exited cleanly after the cancelled bulk run.


async def test_fetch_many_early_break_cancels_in_flight(tmp_path: Path) -> None:
    gate = Gate()
    gate.release.set()
    reg = dio.Registry()
    reg.register("g", gate)
    async with dio.AsyncSession("g", root=str(tmp_path), registry=reg) as s:

        async def agen() -> AsyncIterator[Request]:
            for i in range(1_000_000):
                yield s.request("k", params={"i": i})

        seen = 0
        async with anyio.create_task_group():
            stream = s.fetch_many(agen(), concurrency=16)
            async for _ in stream:
                seen += 1
                if seen == 50:
                    break
            await stream.aclose()
        assert seen == 50
        assert gate.calls < 200


async def test_session_exit_on_error_cancels_in_flight(tmp_path: Path) -> None:
    gate = Gate()
    reg = dio.Registry()
    reg.register("g", gate)
    errors: list[BaseException] = []

    async def call(s: dio.AsyncSession) -> None:
        try:
            await s.fetch(s.request("k"))
        except dio.DataIOError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        with pytest.raises(RuntimeError, match="boom"):
            async with dio.AsyncSession("g", root=str(tmp_path), registry=reg) as s:
                tg.start_soon(call, s)
                await until(lambda: gate.calls == 1)
                raise RuntimeError("boom")
    assert gate.cancelled == 1
    assert len(errors) == 1 and "session that started it is closing" in str(errors[0])
    assert _count(tmp_path, "SELECT count(*) FROM sessions WHERE status = 'error'") == 1


async def test_session_closing_under_a_fetch_many_consumer_is_an_error(tmp_path: Path) -> None:
    async def quick(req: Request) -> bytes:
        await anyio.lowlevel.checkpoint()
        return b"x"

    reg = dio.Registry()
    reg.register("m", dio.MockAdapter(quick))
    got = 0
    errors: list[BaseException] = []
    async with anyio.create_task_group() as outer:
        async with dio.AsyncSession("m", root=str(tmp_path), registry=reg) as s:

            def endless() -> Iterator[Request]:
                i = 0
                while True:
                    yield s.request("k", params={"i": i})
                    i += 1

            async def consume() -> None:
                nonlocal got
                try:
                    async for _ in s.fetch_many(endless(), concurrency=4):
                        got += 1
                except dio.DataIOError as exc:
                    errors.append(exc)

            outer.start_soon(consume)
            await until(lambda: got >= 20)
        # The session has exited while the consumer was still iterating.
    assert len(errors) == 1 and "fetch_many stopped: the session is closing" in str(errors[0])
