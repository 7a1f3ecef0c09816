"""A 10-million-request job in --dry-run: counted from the expansion sizes, memory flat."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.jobs.conftest import ROOT_DIR, cli_env, write_job

MIB = 1024 * 1024


def test_ten_million_requests_dry_run_under_100_mib(tmp_path: Path) -> None:
    data = {
        "job": "huge",
        "sources": {"prices": {"adapter": "http", "base_url": "http://127.0.0.1:9"}},
        "requests": [
            {
                "source": "prices",
                "kind": "bars",
                "endpoint": "/bars/{symbol}",
                "params": {"day": "{start}"},
                "expand": {
                    "symbol": [f"SYM{i:05d}" for i in range(10_000)],
                    "dates": {"start": "2000-01-01", "end": "2002-09-26", "chunk": "1d"},
                },
            }
        ],
    }
    path = write_job(tmp_path / "job.yaml", data)
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mxm_dataio_async", "run", str(path), "--dry-run", "--json"],
        cwd=ROOT_DIR,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = proc.stdout.read(), proc.stderr.read()  # type: ignore[union-attr]
    # wait4 gives this child's own peak RSS (getrusage(RUSAGE_CHILDREN) would be the max of all).
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    proc.stdout.close()  # type: ignore[union-attr]
    proc.stderr.close()  # type: ignore[union-attr]
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, err.decode()
    plan = json.loads(out)
    assert plan["total"] == 10_000_000 and plan["sources"] == {"prices": 10_000_000}
    assert [(r["endpoint"], r["params"]["day"]) for r in plan["first"][:2]] == [
        ("/bars/SYM00000", "2000-01-01"),
        ("/bars/SYM00000", "2000-01-02"),
    ]
    peak = usage.ru_maxrss * 1024  # KiB on Linux
    assert peak < 100 * MIB, f"peak RSS {peak / MIB:.1f} MiB"
    assert elapsed < 30, f"dry run took {elapsed:.1f}s"
    assert not (tmp_path / "dataio").exists()
