"""Schema migration to v2, consumer checkpoints, and job leases."""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Callable
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import pytest

import mxm_dataio_async as dio
from mxm_dataio_async._store import DB_NAME
from mxm_dataio_async._store._sqlite._schema import MIGRATIONS, SCHEMA_VERSION
from mxm_dataio_async.store import Lease
from mxm_dataio_async.testing import FakeClock

pytestmark = pytest.mark.anyio

START = datetime(2026, 1, 1, tzinfo=UTC)
SAFETY = 30  # seconds: a safety net against hangs, never a timing assertion


async def _record(root: Path, n: int, start: int = 0) -> list[str]:
    reg = dio.Registry()
    reg.register("m", dio.MockAdapter())
    async with dio.AsyncSession("m", root=str(root), registry=reg) as s:
        ids = []
        for i in range(start, start + n):
            ids.append((await s.fetch(s.request("k", params={"i": i}))).id)
        return ids


async def test_v1_store_migrates_and_keeps_its_data(tmp_path: Path) -> None:
    with closing(sqlite3.connect(tmp_path / DB_NAME)) as conn:
        MIGRATIONS[0](conn)
        conn.execute(
            "INSERT INTO sessions (id, source, started_at, status, cache_mode) "
            "VALUES ('s1', 'old', '2026-01-01T00:00:00.000000+00:00', 'ok', 'default')"
        )
        conn.execute("PRAGMA user_version=1")
        conn.commit()
    async with dio.Store(tmp_path) as store:
        sessions = await store.list_sessions()
        assert [s.id for s in sessions] == ["s1"]
        assert await store.read_checkpoint("nobody") is None
    with closing(sqlite3.connect(tmp_path / DB_NAME)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 5
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"checkpoints", "leases"} <= tables


async def test_checkpointed_consumer_sees_each_response_once_across_restarts(
    tmp_path: Path,
) -> None:
    first = await _record(tmp_path, 10)
    seen: list[str] = []

    async def consume(stop_after: int | None) -> None:
        async with dio.Store(tmp_path) as store:  # a fresh process, in effect
            cursor = await store.read_checkpoint("etl")
            n = 0
            async for resp in store.iter_responses(after=cursor, page_size=3):
                seen.append(resp.id)
                await store.write_checkpoint("etl", resp.id)
                n += 1
                if stop_after is not None and n == stop_after:
                    return

    await consume(stop_after=4)
    await consume(stop_after=None)
    assert seen == first
    more = await _record(tmp_path, 5, start=10)
    await consume(stop_after=None)
    await consume(stop_after=None)  # nothing new: nothing seen twice
    assert seen == first + more


async def test_cursor_survives_pruning_and_unknown_cursor_is_refused(tmp_path: Path) -> None:
    ids = await _record(tmp_path, 6)
    async with dio.Store(tmp_path) as store:
        await store.write_checkpoint("etl", ids[2])
        with pytest.raises(ValueError, match="unknown cursor"):
            await store.write_checkpoint("etl", "no-such-response")
        with pytest.raises(ValueError, match="unknown cursor"):
            _ = [r async for r in store.iter_responses(after="no-such-response")]
    with closing(sqlite3.connect(tmp_path / DB_NAME)) as conn:
        conn.execute("DELETE FROM responses WHERE id = ?", (ids[2],))
        conn.commit()
    async with dio.Store(tmp_path) as store:
        cursor = await store.read_checkpoint("etl")
        assert cursor == ids[2]
        assert [r.id async for r in store.iter_responses(after=cursor)] == ids[3:]


# -- leases, on the store's clock ---------------------------------------------------------------
#
# Every lease below lives on a FakeClock that moves only when told to (auto_advance=False): its
# expiry, the heartbeat (every ttl/3) and a waiting run's polls are all driven by advance().


def _lease_row(root: Path) -> tuple[str, datetime] | None:
    with closing(sqlite3.connect(root / DB_NAME)) as conn:
        row = conn.execute("SELECT holder, expires_at FROM leases").fetchone()
    return None if row is None else (row[0], datetime.fromisoformat(row[1]))


async def _eventually(condition: Callable[[], bool]) -> None:
    """Let other tasks (and the store's threads) run until ``condition()`` holds."""
    while not condition():  # noqa: ASYNC110 - no event to wait for across the store's threads
        await anyio.sleep(0.001)


def _slept(clock: FakeClock, n: int) -> bool:
    return len(clock.sleeps) == n


def _seconds(n: float) -> timedelta:
    return timedelta(seconds=n)


async def test_second_run_refused_then_waits_for_the_lease(tmp_path: Path) -> None:
    clock = FakeClock(START, auto_advance=False)
    order: list[str] = []
    async with dio.Store(tmp_path, clock=clock) as store:

        async def waiter() -> None:
            async with store.lease("prices_daily", ttl=30, wait=True, poll=2):
                order.append("second")

        with anyio.fail_after(SAFETY):
            async with anyio.create_task_group() as tg:
                async with store.lease("prices_daily", ttl=30) as held:
                    assert held.name == "prices_daily"
                    assert (held.acquired_at, held.expires_at) == (START, START + _seconds(30))
                    with pytest.raises(dio.LeaseHeld, match="already running") as info:
                        async with store.lease("prices_daily", ttl=30):
                            pass
                    assert info.value.holder == held.holder
                    assert info.value.expires_at == held.expires_at
                    tg.start_soon(waiter)
                    await _eventually(lambda: clock.sleeps.count(2) == 1)  # refused, polling
                    clock.advance(2)
                    await _eventually(lambda: clock.sleeps.count(2) == 2)  # refused again
                    assert order == []
                    order.append("first done")
                assert _lease_row(tmp_path) is None  # released on exit
                clock.advance(2)  # the waiter's next poll finds the lease free
    assert order == ["first done", "second"]


async def test_expired_lease_of_a_dead_run_is_taken_over(tmp_path: Path) -> None:
    async with dio.Store(tmp_path):
        pass
    with closing(sqlite3.connect(tmp_path / DB_NAME)) as conn:
        conn.execute(
            "INSERT INTO leases (name, holder, acquired_at, heartbeat_at, expires_at) VALUES "
            "('job', 'dead-host:1:x', '2026-01-01T00:00:00.000000+00:00', "
            "'2026-01-01T00:00:00.000000+00:00', '2026-01-01T00:00:30.000000+00:00')"
        )
        conn.commit()
    clock = FakeClock(START, auto_advance=False)
    async with dio.Store(tmp_path, clock=clock) as store:
        for step in (0, 29):  # at 0 s and 29 s the dead run's lease is still valid
            clock.advance(step)
            with pytest.raises(dio.LeaseHeld) as info:
                async with store.lease("job", ttl=10):
                    pass
            assert info.value.holder == "dead-host:1:x"
            assert info.value.expires_at == START + _seconds(30)
        clock.advance(1)  # 30 s: expired
        async with store.lease("job", ttl=10) as held:
            assert held.holder != "dead-host:1:x"
            assert (held.acquired_at, held.expires_at) == (
                START + _seconds(30),
                START + _seconds(40),
            )
            assert _lease_row(tmp_path) == (held.holder, held.expires_at)


async def test_a_waiting_run_takes_over_once_a_dead_runs_lease_expires(tmp_path: Path) -> None:
    clock = FakeClock(START, auto_advance=False)
    got: list[Lease] = []
    async with dio.Store(tmp_path, clock=clock) as store:
        # A run that took the lease and died: nobody renews it.
        dead = await store.metadata.acquire_lease("job", "dead-host:1:x", 30)

        async def waiter() -> None:
            async with store.lease("job", ttl=30, wait=True, poll=5) as held:
                got.append(held)

        with anyio.fail_after(SAFETY):
            async with anyio.create_task_group() as tg:
                tg.start_soon(waiter)
                await _eventually(lambda: clock.sleeps == [5])  # refused at 0 s
                clock.advance(25)
                await _eventually(lambda: clock.sleeps == [5, 5])  # refused again at 25 s
                assert got == []
                assert _lease_row(tmp_path) == (dead.holder, START + _seconds(30))
                clock.advance(5)  # 30 s: the dead run's lease has expired
    assert len(got) == 1
    assert got[0].holder != dead.holder
    assert got[0].acquired_at == START + _seconds(30)


async def test_heartbeat_renews_the_lease_on_the_stores_clock(tmp_path: Path) -> None:
    clock = FakeClock(START, auto_advance=False)
    async with dio.Store(tmp_path, clock=clock) as store:
        with anyio.fail_after(SAFETY):
            async with store.lease("job", ttl=30) as held:
                assert held.expires_at == START + _seconds(30)
                await _eventually(lambda: clock.sleeps == [10.0])  # a heartbeat every ttl / 3
                for beat in range(1, 7):  # 60 fake seconds: twice the ttl
                    clock.advance(10)
                    await _eventually(functools.partial(_slept, clock, beat + 1))  # renewed
                    now = START + _seconds(10 * beat)
                    assert _lease_row(tmp_path) == (held.holder, now + _seconds(30))
                # Long past its first expiry, the lease is still held: another run is refused.
                with pytest.raises(dio.LeaseHeld) as info:
                    async with store.lease("job", ttl=30, holder="other-run"):
                        pass
                assert info.value.holder == held.holder
                assert info.value.expires_at == START + _seconds(90)
            assert clock.sleeps == [10.0] * 7
        assert _lease_row(tmp_path) is None  # released on exit


async def test_a_lost_lease_cancels_the_block(tmp_path: Path) -> None:
    clock = FakeClock(START, auto_advance=False)
    reached_end = False
    async with dio.Store(tmp_path, clock=clock) as store:
        with anyio.fail_after(SAFETY), pytest.raises(dio.LeaseHeld) as info:
            async with store.lease("job", ttl=30):
                await _eventually(lambda: clock.sleeps == [10.0])
                with closing(sqlite3.connect(tmp_path / DB_NAME)) as conn:
                    conn.execute("UPDATE leases SET holder = 'thief'")
                    conn.commit()
                clock.advance(10)  # the next heartbeat finds the lease taken
                await anyio.sleep_forever()  # cancelled by the failed renewal
                reached_end = True
        assert not reached_end
        assert info.value.holder == "thief"
        assert _lease_row(tmp_path) == ("thief", START + _seconds(30))  # not released: not ours
