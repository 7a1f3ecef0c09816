from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from mxm_dataio_async._demo import run_demo

pytestmark = pytest.mark.anyio


async def test_demo_records_then_serves_from_cache(tmp_path: Path) -> None:
    summary = await run_demo(tmp_path / "store", count=40, concurrency=8)
    first, second = summary.passes
    assert (first.fetched, first.from_cache, first.failed) == (40, 0, 0)
    assert (second.fetched, second.from_cache, second.failed) == (0, 40, 0)
    assert summary.upstream_hits == 40 and summary.verified == 40
    conn = sqlite3.connect(tmp_path / "store" / "dataio.sqlite")
    assert conn.execute("SELECT count(*), sum(status = 'ok') FROM sessions").fetchone() == (2, 2)
    assert conn.execute(
        "SELECT count(*) FROM requests WHERE served_from IS NOT NULL"
    ).fetchone() == (40,)


def test_demo_command_line(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mxm_dataio_async",
            "demo",
            "--root",
            str(tmp_path / "s"),
            "--count",
            "25",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "payloads verified: 25" in out.stdout
    assert (tmp_path / "s" / "dataio.sqlite").exists()
    bad = subprocess.run(
        [sys.executable, "-m", "mxm_dataio_async", "demo", "--count", "0"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0
