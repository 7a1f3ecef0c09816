"""Schema migration to v2, consumer checkpoints, and job leases."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from datetime import timedelta
from pathlib import Path

import anyio
import pytest

import mxm_dataio_async as dio
from mxm_dataio_async._store import DB_NAME
from mxm_dataio_async._store._sqlite._schema import MIGRATIONS, SCHEMA_VERSION

pytestmark = pytest.mark.anyio


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
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
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


async def test_second_run_refused_then_waits_for_the_lease(tmp_path: Path) -> None:
    order: list[str] = []
    async with dio.Store(tmp_path) as store:

        async def waiter() -> None:
            async with store.lease("prices_daily", ttl=30, wait=True, poll=0.01):
                order.append("second")

        async with anyio.create_task_group() as tg:
            async with store.lease("prices_daily", ttl=30) as held:
                assert held.name == "prices_daily"
                with pytest.raises(dio.LeaseHeld, match="already running") as info:
                    async with store.lease("prices_daily", ttl=30):
                        pass
                assert info.value.holder == held.holder
                tg.start_soon(waiter)
                await anyio.sleep(0.05)  # the waiter polls meanwhile
                assert order == []
                order.append("first done")
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
    async with dio.Store(tmp_path) as store, store.lease("job", ttl=10) as held:
        assert held.holder != "dead-host:1:x"


async def test_heartbeat_keeps_the_lease_and_a_lost_lease_cancels_the_block(
    tmp_path: Path,
) -> None:
    async with dio.Store(tmp_path) as store:
        async with store.lease("job", ttl=0.3) as held:
            await anyio.sleep(0.8)  # longer than the ttl: renewed meanwhile
            with closing(sqlite3.connect(tmp_path / DB_NAME)) as conn:
                (expires,) = conn.execute("SELECT expires_at FROM leases").fetchone()
            assert expires > (held.expires_at + timedelta(seconds=0.2)).isoformat()
        reached_end = False
        with pytest.raises(dio.LeaseHeld):
            async with store.lease("job", ttl=0.3):
                with closing(sqlite3.connect(tmp_path / DB_NAME)) as conn:
                    conn.execute("UPDATE leases SET holder = 'thief'")
                    conn.commit()
                await anyio.sleep(5)  # cancelled by the failed renewal
                reached_end = True
        assert not reached_end
        with closing(sqlite3.connect(tmp_path / DB_NAME)) as conn:
            assert conn.execute("SELECT holder FROM leases").fetchone() == ("thief",)
