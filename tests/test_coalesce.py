from __future__ import annotations

import traceback
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from mxm_dataio_async._coalesce import Coalescer
from mxm_dataio_async._exceptions import DataIOError

pytestmark = pytest.mark.anyio


async def until(predicate: Callable[[], bool], *, limit: int = 10_000) -> None:
    """Yield to the scheduler until ``predicate()`` holds (deterministic: no wall-clock time)."""
    for _ in range(limit):
        if predicate():
            return
        await anyio.lowlevel.checkpoint()
    raise AssertionError("condition not reached")


class Producer:
    """A factory that blocks until released, then returns (or raises) and records what happened."""

    def __init__(self, result: object = "result", error: Exception | None = None) -> None:
        self.result = result
        self.error = error
        self.release = anyio.Event()
        self.calls = 0
        self.cancelled = 0
        self.finished = 0

    async def __call__(self) -> object:
        self.calls += 1
        try:
            await self.release.wait()
        except anyio.get_cancelled_exc_class():
            self.cancelled += 1
            raise
        finally:
            self.finished += 1
        if self.error is not None:
            raise self.error
        return self.result


@asynccontextmanager
async def coalescer() -> AsyncIterator[Coalescer[Any, Any]]:
    """A coalescer whose producers (owner None) are joined on exit, as a session joins its own."""
    co: Coalescer[Any, Any] = Coalescer()
    try:
        yield co
    finally:
        await co.join(None)


async def test_join_waits_for_running_producers() -> None:
    producer = Producer()
    co: Coalescer[str, object] = Coalescer()
    results: list[object] = []
    async with anyio.create_task_group() as tg:

        async def caller() -> None:
            results.append(await co.run("k", producer))

        tg.start_soon(caller)
        await until(lambda: producer.calls == 1)
        tg.start_soon(co.join, None)
        await until(lambda: co.waiters("k") == 1)
        producer.release.set()
    assert results == ["result"] and producer.cancelled == 0
    assert co.in_flight() == 0


async def test_concurrent_callers_share_one_producer() -> None:
    producer = Producer()
    results: list[object] = []
    async with coalescer() as co:

        async def caller() -> None:
            results.append(await co.run("k", producer))

        async with anyio.create_task_group() as callers:
            for _ in range(100):
                callers.start_soon(caller)
            await until(lambda: co.waiters("k") == 100)
            assert co.in_flight() == 1
            producer.release.set()
    assert producer.calls == 1
    assert results == ["result"] * 100
    assert co.in_flight() == 0
    assert co.waiters("k") == 0


async def test_different_keys_run_separately() -> None:
    a, b = Producer("a"), Producer("b")
    results: dict[str, object] = {}
    async with coalescer() as co:

        async def caller(key: str, factory: Producer) -> None:
            results[key] = await co.run(key, factory)

        async with anyio.create_task_group() as callers:
            callers.start_soon(caller, "a", a)
            callers.start_soon(caller, "b", b)
            await until(lambda: a.calls == 1 and b.calls == 1)
            assert co.in_flight() == 2
            b.release.set()
            await until(lambda: "b" in results)
            assert co.in_flight() == 1
            a.release.set()
    assert results == {"a": "a", "b": "b"}
    assert co.in_flight() == 0


async def test_none_is_a_valid_result() -> None:
    async def factory() -> object:
        return None

    async with coalescer() as co:
        assert await co.run(1, factory) is None


async def test_leader_cancelled_while_followers_wait() -> None:
    producer = Producer()
    results: list[object] = []
    leader_scope = anyio.CancelScope()
    async with coalescer() as co:

        async def leader() -> None:
            with leader_scope:
                await co.run("k", producer)

        async def follower() -> None:
            results.append(await co.run("k", producer))

        async with anyio.create_task_group() as callers:
            callers.start_soon(leader)
            await until(lambda: co.waiters("k") == 1)
            callers.start_soon(follower)
            callers.start_soon(follower)
            await until(lambda: co.waiters("k") == 3 and producer.calls == 1)
            leader_scope.cancel()
            await until(lambda: co.waiters("k") == 2)
            await anyio.lowlevel.checkpoint()
            assert producer.cancelled == 0
            producer.release.set()
    assert leader_scope.cancelled_caught
    assert results == ["result", "result"]
    assert (producer.calls, producer.cancelled) == (1, 0)
    assert co.in_flight() == 0


async def test_sole_caller_cancelled_at_once() -> None:
    abandoned = Producer()
    async with coalescer() as co:
        with anyio.CancelScope() as scope:
            scope.cancel()
            await co.run("k", abandoned)  # spawns the producer, then is cancelled at once
        assert scope.cancelled_caught
        # The key was dropped with its last waiter: the next caller does not join a dying producer.
        assert co.in_flight() == 0
        fresh = Producer("fresh")
        fresh.release.set()
        assert await co.run("k", fresh) == "fresh"
        await until(lambda: abandoned.finished == abandoned.calls)
    # The abandoned producer either never ran the factory or was cancelled inside it.
    assert abandoned.calls == abandoned.cancelled


async def test_all_waiters_cancelled_cancels_the_producer() -> None:
    producer = Producer()
    scopes = [anyio.CancelScope() for _ in range(3)]
    async with coalescer() as co:

        async def caller(scope: anyio.CancelScope) -> None:
            with scope:
                await co.run("k", producer)

        async with anyio.create_task_group() as callers:
            for scope in scopes:
                callers.start_soon(caller, scope)
            await until(lambda: co.waiters("k") == 3 and producer.calls == 1)
            scopes[0].cancel()
            scopes[1].cancel()
            await until(lambda: co.waiters("k") == 1)
            await anyio.lowlevel.checkpoint()
            assert producer.cancelled == 0  # one caller still waits
            scopes[2].cancel()
        assert co.in_flight() == 0  # dropped with the last waiter, before the producer ends
        await until(lambda: producer.finished == 1)
        assert producer.cancelled == 1
        # The next call starts a new producer.
        fresh = Producer("again")
        fresh.release.set()
        assert await co.run("k", fresh) == "again"
    assert co.in_flight() == 0


async def test_failure_is_delivered_to_every_waiter_and_not_remembered() -> None:
    boom = ValueError("upstream exploded")
    producer = Producer(error=boom)
    caught: list[BaseException] = []
    tb_lengths: list[int] = []
    async with coalescer() as co:

        async def caller() -> None:
            try:
                await co.run("k", producer)
            except ValueError as exc:
                caught.append(exc)
                tb_lengths.append(len(traceback.extract_tb(exc.__traceback__)))

        async with anyio.create_task_group() as callers:
            for _ in range(50):
                callers.start_soon(caller)
            await until(lambda: co.waiters("k") == 50)
            producer.release.set()
        assert co.in_flight() == 0
        assert len(caught) == 50
        assert all(exc is boom for exc in caught)
        # Each waiter raises from the producer's traceback: it does not grow with the waiters.
        assert len(set(tb_lengths)) == 1
        # Not remembered: the next call runs the factory again.
        retry = Producer("recovered")
        retry.release.set()
        assert await co.run("k", retry) == "recovered"
        assert (producer.calls, retry.calls) == (1, 1)


async def test_session_closing_gives_waiters_a_clear_error() -> None:
    producer = Producer()
    outcomes: list[BaseException] = []

    async def caller(co: Coalescer[str, object]) -> None:
        try:
            await co.run("k", producer)
        except DataIOError as exc:
            outcomes.append(exc)

    co: Coalescer[str, object] = Coalescer()
    async with anyio.create_task_group() as callers:
        for _ in range(3):
            callers.start_soon(caller, co)
        await until(lambda: co.waiters("k") == 3 and producer.calls == 1)
        await co.join(None, cancel=True)  # the session that started it is closing
    assert producer.cancelled == 1
    assert len(outcomes) == 3
    expected = "in-flight request cancelled: the session that started it is closing"
    assert all(str(e) == expected for e in outcomes)
    assert co.in_flight() == 0


async def test_a_producer_cancelled_before_its_first_step_still_releases_its_waiters() -> None:
    # join(cancel=True) right after the producer was spawned, before it ever ran: its coroutine
    # (and the release in it) never runs, so join must release the waiters itself
    import asyncio

    producer = Producer()
    co: Coalescer[str, object] = Coalescer()
    waiter = asyncio.get_running_loop().create_task(co.run("k", producer, owner="session"))
    await until(lambda: co.waiters("k") == 1)
    assert producer.calls == 0  # spawned, not yet started
    await co.join("session", cancel=True)
    with pytest.raises(DataIOError, match="the session that started it is closing"):
        await waiter
    assert (producer.calls, co.in_flight()) == (0, 0)
    assert co._tasks == {}  # nothing of the owner is kept


async def test_finished_producers_are_forgotten_by_their_owner() -> None:
    co: Coalescer[str, object] = Coalescer()
    for i in range(3):
        done = Producer(i)
        done.release.set()
        assert await co.run(f"k{i}", done, owner="session") == i
    assert co._tasks == {}
    # abandoned by its only caller before it started: cancelled, and forgotten too
    with anyio.CancelScope() as scope:
        scope.cancel()
        await co.run("gone", Producer(), owner="session")
    await until(lambda: co._tasks == {})


async def test_waiter_inside_the_closing_session_sees_its_own_cancellation() -> None:
    producer = Producer()
    seen: list[str] = []

    async def caller(co: Coalescer[str, object]) -> None:
        try:
            await co.run("k", producer)
        except anyio.get_cancelled_exc_class():
            seen.append("cancelled")
            raise
        except DataIOError:
            seen.append("DataIOError")

    co: Coalescer[str, object] = Coalescer()
    async with anyio.create_task_group() as session:
        session.start_soon(caller, co)
        await until(lambda: co.waiters("k") == 1 and producer.calls == 1)
        session.cancel_scope.cancel()
    await co.join(None, cancel=True)
    assert seen == ["cancelled"]
    assert co.in_flight() == 0


async def test_join_waits_only_for_the_owners_own_producers() -> None:
    """Sessions share one coalescer: each joins the producers it started, and a producer started
    by one session serves a waiter of another after the first one has left."""
    mine, theirs = Producer(), Producer()
    co: Coalescer[str, object] = Coalescer()
    results: list[object] = []
    async with anyio.create_task_group() as tg:

        async def call(key: str, producer: Producer, owner: str) -> None:
            results.append(await co.run(key, producer, owner=owner))

        tg.start_soon(call, "a", mine, "session-a")
        tg.start_soon(call, "b", theirs, "session-b")
        await until(lambda: mine.calls == 1 and theirs.calls == 1)
        tg.start_soon(call, "a", Producer(), "session-b")  # joins session-a's flight of "a"
        await until(lambda: co.waiters("a") == 2)
        mine.release.set()
        with anyio.fail_after(30):  # a bound, not a timing assertion
            await co.join("session-a")  # does not wait for session-b's producer
        assert co.waiters("b") == 1 and theirs.finished == 0
        theirs.release.set()
        await co.join("session-b")
    assert results == ["result", "result", "result"]
    assert co.in_flight() == 0


async def test_sequential_calls_each_run_the_factory() -> None:
    calls = 0

    async def factory() -> int:
        nonlocal calls
        calls += 1
        return calls

    async with coalescer() as co:
        assert [await co.run("k", factory) for _ in range(3)] == [1, 2, 3]
    assert co.in_flight() == 0
