"""Four processes ingesting into one store at once: no lost rows, no lock errors, shared content."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import pytest

from mxm_dataio_async import ResponseStatus, Store

pytestmark = pytest.mark.anyio

ROOT_DIR = Path(__file__).resolve().parents[2]
PROCESSES = 4
EACH = 2_500
SHARED = 300


async def test_four_processes_one_store(tmp_path: Path) -> None:
    root = tmp_path / "store"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.store._ingest_child",
                str(root),
                str(p * EACH),
                str((p + 1) * EACH),
                "--shared",
                str(SHARED),
            ],
            cwd=ROOT_DIR,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for p in range(PROCESSES)
    ]
    outputs = [proc.communicate(timeout=300) for proc in procs]
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, (out, err)
        assert "locked" not in out + err
    calls = [int(out.strip().splitlines()[-1].split("calls=")[1]) for out, _ in outputs]
    # Every distinct request was fetched by its process; shared ones by one or more processes.
    assert sum(calls) >= PROCESSES * EACH + SHARED
    with closing(sqlite3.connect(root / "dataio.sqlite")) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        responses = conn.execute("SELECT count(*) FROM responses").fetchone()[0]
        distinct = conn.execute("SELECT count(DISTINCT request_hash) FROM responses").fetchone()[0]
        sessions = conn.execute("SELECT count(*), sum(status = 'ok') FROM sessions").fetchone()
        payload_rows = conn.execute("SELECT count(*) FROM payloads").fetchone()[0]
    assert responses == sum(calls)  # every adapter call is one recorded response: none lost
    assert distinct == PROCESSES * EACH + SHARED
    assert sessions == (PROCESSES, PROCESSES)
    assert payload_rows == distinct  # the same content from several processes is stored once
    async with Store(root) as store:
        n = 0
        async for resp in store.iter_responses(status=ResponseStatus.OK):
            await store.read(resp)
            n += 1
        assert n == responses


def test_switching_to_wal_waits_for_another_process_switching(tmp_path: Path) -> None:
    """SQLite answers a journal-mode switch SQLITE_BUSY at once where waiting could deadlock
    (two processes switching one new database); the switch is retried until the other is done,
    and fails with SQLite's error after the busy timeout."""
    import threading

    from mxm_dataio_async._store._sqlite._schema import _switch_to_wal

    db = tmp_path / "new.sqlite"
    holder = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    switcher = sqlite3.connect(db, isolation_level=None)
    try:
        holder.execute("CREATE TABLE t (x)")
        holder.execute("BEGIN EXCLUSIVE")  # what the other process holds while it switches
        switcher.execute("PRAGMA busy_timeout=0")  # no waiting inside SQLite, as in the deadlock
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            switcher.execute("PRAGMA journal_mode=WAL")
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            _switch_to_wal(switcher, busy_timeout=0.05)
        released = threading.Timer(0.05, holder.execute, args=("COMMIT",))
        released.start()
        try:
            _switch_to_wal(switcher, busy_timeout=5.0)
        finally:
            released.join()
        assert switcher.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        holder.close()
        switcher.close()
