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
