"""A 10-million-request job in --dry-run: counted from the expansion sizes, memory flat."""

from __future__ import annotations

import json
import subprocess
import sys
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
    hwm_file = tmp_path / "vmhwm"
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURED, str(hwm_file), "run", str(path), "--dry-run", "--json"],
        cwd=ROOT_DIR,
        env=cli_env(),
        capture_output=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    plan = json.loads(proc.stdout)
    assert plan["total"] == 10_000_000 and plan["sources"] == {"prices": 10_000_000}
    assert [(r["endpoint"], r["params"]["day"]) for r in plan["first"][:2]] == [
        ("/bars/SYM00000", "2000-01-01"),
        ("/bars/SYM00000", "2000-01-02"),
    ]
    # VmHWM is the child's own peak RSS: unlike ru_maxrss it does not carry over the pages of
    # the (large) pytest process it was forked from before exec.
    peak = int(hwm_file.read_text()) * 1024  # kB
    assert peak < 100 * MIB, f"peak RSS {peak / MIB:.1f} MiB"
    assert not (tmp_path / "dataio").exists()


_MEASURED = """
import re, runpy, sys
out = sys.argv.pop(1)
sys.argv[0] = "mxm-dataio"
try:
    runpy.run_module("mxm_dataio_async", run_name="__main__")
finally:
    status = open("/proc/self/status").read()
    open(out, "w").write(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1))
"""
