"""One run of a job per store at a time: refused, waited for, or taken over once expired.

In-process runs get a ``FakeClock`` (``run_job(clock=...)``): the lease's expiry, heartbeat and
a waiting run's polls move only when the test advances it. CLI runs are real processes on real
time; they never wait out a lease here, and have safety nets, not time limits.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
from collections.abc import Callable
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import anyio.to_thread
import pytest

import mxm_dataio_async as dio
from mxm_dataio_async.jobs import JobSummary, run_job
from mxm_dataio_async.testing import FakeClock
from tests.jobs.conftest import JobServer, bars_job, cli, cli_process, write_job

# Later than any real "now" these tests run at: a store reading the real clock instead of the
# fake one would find a lease expiring then still held.
START = datetime(2030, 1, 1, tzinfo=UTC)
SAFETY = 60  # seconds: a safety net against hangs, never a timing assertion


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


async def _eventually(condition: Callable[[], bool]) -> None:
    """Let other tasks, threads and processes run until ``condition()`` holds."""
    while not condition():  # noqa: ASYNC110 - no event to wait for across threads and processes
        await anyio.sleep(0.01)


def _has_open(pid: int, path: Path) -> bool:
    """Whether process ``pid`` has ``path`` open (Linux ``/proc``)."""
    target = str(path.resolve())
    try:
        return any(os.readlink(fd) == target for fd in Path(f"/proc/{pid}/fd").iterdir())
    except OSError:  # the process is gone, or a descriptor closed while we looked
        return False


@pytest.mark.anyio
async def test_a_second_run_is_refused_then_waits_with_wait(
    job_server: JobServer, tmp_path: Path
) -> None:
    days = {"start": "2024-01-01", "end": "2024-01-20", "chunk": "1d"}
    data = bars_job(job_server.url, symbols=["A", "B"], concurrency=2)
    data["requests"][0]["expand"]["dates"] = days  # 40 requests
    path = write_job(tmp_path / "job.yaml", data)
    root = tmp_path / "dataio"
    job_server.pause()  # the first run holds its lease until the test lets its answers through
    first = cli_process("run", str(path), "--json")
    waiting = None
    try:
        with anyio.fail_after(SAFETY):
            await _eventually(lambda: job_server.total > 0 or first.poll() is not None)
            assert first.poll() is None, first.communicate()
            ((_, holder),) = _lease_rows(root)  # fetching, so under its lease
            refused = await anyio.to_thread.run_sync(lambda: cli("run", str(path)))
            assert refused.returncode == 3, (refused.stdout, refused.stderr)
            message = " ".join(refused.stderr.split())
            assert "refused: job 'prices_daily' is already running" in message
            assert holder in message and "--wait" in message
            waiting = cli_process("run", str(path), "--wait", "--json")
            if sys.platform == "linux":  # it has opened the store: its lease attempt is next
                db = root / "dataio.sqlite"
                await _eventually(lambda: _has_open(waiting.pid, db) or waiting.poll() is not None)
            assert waiting.poll() is None, waiting.communicate()  # waiting, not refused
            job_server.resume()
            _, first_err = await anyio.to_thread.run_sync(lambda: first.communicate(timeout=SAFETY))
            waited_out, waited_err = await anyio.to_thread.run_sync(
                lambda: waiting.communicate(timeout=SAFETY)
            )
    finally:
        job_server.resume()
        for proc in (first, waiting):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert first.returncode == 0, first_err
    assert waiting.returncode == 0, waited_err
    waited = json.loads(waited_out)
    assert (waited["fetched"], waited["from_cache"], waited["failed"]) == (0, 40, 0)
    assert job_server.total == 40  # the waiting run fetched nothing twice
    assert _lease_rows(root) == []  # released at the end


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
    path = write_job(tmp_path / "job.yaml", bars_job(job_server.url, lease_ttl=30))
    clock = FakeClock(START, auto_advance=False)
    # A waiting run tries again every min(1 s, lease_ttl / 3); heartbeats (every 10 s) are the
    # only other sleeps, so the 1 s sleeps count the waiting run's polls.
    poll = 1.0
    results: list[JobSummary] = []

    async def waiter() -> None:
        results.append(await run_job(path, wait=True, clock=clock))

    with anyio.fail_after(SAFETY):
        async with dio.Store(tmp_path / "dataio", clock=clock) as store:
            async with store.lease("prices_daily", ttl=30) as held:
                with pytest.raises(dio.LeaseHeld) as info:
                    await run_job(path, clock=clock)
                assert info.value.holder == held.holder
            assert job_server.total == 0
            assert poll not in clock.sleeps
            async with anyio.create_task_group() as tg:
                async with store.lease("prices_daily", ttl=30):
                    tg.start_soon(waiter)
                    await _eventually(lambda: clock.sleeps.count(poll) == 1)  # refused once
                    clock.advance(poll)
                    await _eventually(lambda: clock.sleeps.count(poll) == 2)  # and again
                    assert results == [] and job_server.total == 0
                clock.advance(poll)  # released: the waiting run's next poll takes the lease
    assert [(r.fetched, r.ok) for r in results] == [(9, True)]
    assert job_server.total == 9


@pytest.mark.anyio
async def test_run_job_takes_over_an_expired_lease_on_its_clock(
    job_server: JobServer, tmp_path: Path
) -> None:
    root = tmp_path / "dataio"
    path = write_job(tmp_path / "job.yaml", bars_job(job_server.url))
    clock = FakeClock(START, auto_advance=False)
    async with dio.Store(root, clock=clock) as store:
        # A run that took the lease for 30 s and died: nobody renews it.
        await store.metadata.acquire_lease("prices_daily", "dead-host:1:x", 30)
    with anyio.fail_after(SAFETY):
        clock.advance(29)
        with pytest.raises(dio.LeaseHeld) as info:
            await run_job(path, clock=clock)
        assert info.value.holder == "dead-host:1:x"
        assert info.value.expires_at == START + timedelta(seconds=30)
        clock.advance(1)  # the dead run's lease expires
        summary = await run_job(path, clock=clock)
    assert (summary.fetched, summary.ok) == (9, True)
    assert job_server.total == 9
    assert _lease_rows(root) == []
    # The job's sessions recorded on the same clock (its Registry got it too).
    async with dio.Store(root) as store:
        stamps = {r.fetched_at async for r in store.iter_responses()}
        sessions = await store.list_sessions()
    assert stamps == {START + timedelta(seconds=30)}
    assert {s.started_at for s in sessions} == {START + timedelta(seconds=30)}
