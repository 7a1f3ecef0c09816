"""One run of a job per store at a time: refused, waited for, or taken over once expired."""

from __future__ import annotations

import sqlite3
import time
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import pytest

import mxm_dataio_async as dio
from mxm_dataio_async.jobs import run_job
from tests.jobs.conftest import JobServer, bars_job, cli, cli_process, write_job


def _lease_rows(root: Path) -> list[tuple[str, str]]:
    db = root / "dataio.sqlite"
    if not db.exists():
        return []
    try:
        with closing(sqlite3.connect(db)) as conn:
            return conn.execute("SELECT name, holder FROM leases").fetchall()
    except sqlite3.OperationalError:  # the schema is being created
        return []


def _insert_lease(root: Path, holder: str, expires: datetime) -> None:
    anyio.run(_create_store, root)
    with closing(sqlite3.connect(root / "dataio.sqlite")) as conn:
        conn.execute(
            "INSERT INTO leases (name, holder, acquired_at, heartbeat_at, expires_at) "
            "VALUES ('prices_daily', ?, ?, ?, ?)",
            (holder, "2026-01-01T00:00:00.000000+00:00", "2026-01-01T00:00:00.000000+00:00",
             expires.isoformat(timespec="microseconds")),
        )  # fmt: skip
        conn.commit()


async def _create_store(root: Path) -> None:
    async with dio.Store(root):
        pass


def test_a_second_run_is_refused_then_waits_with_wait(
    job_server: JobServer, tmp_path: Path
) -> None:
    job_server.delay = 0.15
    days = {"start": "2024-01-01", "end": "2024-01-20", "chunk": "1d"}
    data = bars_job(job_server.url, symbols=["A", "B"], concurrency=2)
    data["requests"][0]["expand"]["dates"] = days  # 40 requests, 2 at a time: ~3 s
    path = write_job(tmp_path / "job.yaml", data)
    first = cli_process("run", str(path), "--json")
    try:
        deadline = time.monotonic() + 30
        while not _lease_rows(tmp_path / "dataio"):
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first run never took its lease"
            time.sleep(0.02)
        holder = _lease_rows(tmp_path / "dataio")[0][1]
        refused = cli("run", str(path))
        assert first.poll() is None, "the first run ended too early for this test"
        assert refused.returncode == 3, (refused.stdout, refused.stderr)
        message = " ".join(refused.stderr.split())
        assert "refused: job 'prices_daily' is already running" in message
        assert holder in message and "--wait" in message
        waited = cli("run", str(path), "--wait", timeout=60)
        assert waited.returncode == 0, waited.stderr
        assert "40 of 40 requests: 0 fetched, 40 from cache, ok" in " ".join(waited.stdout.split())
    finally:
        _, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    assert job_server.total == 40  # the waiting run fetched nothing twice
    assert _lease_rows(tmp_path / "dataio") == []  # released at the end


def test_an_expired_lease_of_a_dead_run_is_taken_over(
    job_server: JobServer, tmp_path: Path
) -> None:
    path = write_job(tmp_path / "job.yaml", bars_job(job_server.url))
    _insert_lease(tmp_path / "dataio", "dead-host:1:x", datetime.now(UTC) - timedelta(seconds=1))
    done = cli("run", str(path))
    assert done.returncode == 0, done.stderr
    assert job_server.total == 9
    assert _lease_rows(tmp_path / "dataio") == []


def test_a_live_lease_names_its_holder(job_server: JobServer, tmp_path: Path) -> None:
    path = write_job(tmp_path / "job.yaml", bars_job(job_server.url))
    _insert_lease(tmp_path / "dataio", "other-host:42:abcd", datetime.now(UTC) + timedelta(hours=1))
    done = cli("run", str(path))
    assert done.returncode == 3
    assert "held by other-host:42:abcd" in " ".join(done.stderr.split())
    assert job_server.total == 0


@pytest.mark.anyio
async def test_run_job_raises_lease_held_or_waits(job_server: JobServer, tmp_path: Path) -> None:
    path = write_job(tmp_path / "job.yaml", bars_job(job_server.url, lease_ttl=5))
    async with dio.Store(tmp_path / "dataio") as store:
        async with store.lease("prices_daily", ttl=5) as held:
            with pytest.raises(dio.LeaseHeld) as info:
                await run_job(path)
            assert info.value.holder == held.holder
        assert job_server.total == 0
        async with anyio.create_task_group() as tg:
            results: list[int] = []

            async def waiter() -> None:
                results.append((await run_job(path, wait=True)).fetched)

            async with store.lease("prices_daily", ttl=5):
                tg.start_soon(waiter)
                await anyio.sleep(0.3)
                assert results == [] and job_server.total == 0
    assert results == [9]
