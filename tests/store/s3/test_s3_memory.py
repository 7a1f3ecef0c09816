"""(c) A 256 MiB body streamed through S3Payloads.put_stream (and read back with iter) grows the
process's peak RSS by less than 64 MiB, measured in a subprocess of its own (_bigstream.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[3]


def run_bigstream(url: str, mib: int) -> dict[str, Any]:
    script = Path(__file__).with_name("_bigstream.py")
    proc = subprocess.run(
        [sys.executable, str(script), url, str(mib)],
        capture_output=True,
        text=True,
        timeout=110,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_256_mib_streamed_to_s3_memory_bound(bucket_url: str) -> None:
    out = run_bigstream(bucket_url, 256)
    assert out["size"] == 256 << 20
    assert out["sha256"] == out["read_sha256"] == out["expected_sha256"]
    assert out["leftovers"] == []
    growth_mib = (out["peak_kib"] - out["baseline_kib"]) / 1024
    assert growth_mib < 64, out
    read_growth_mib = (out["read_peak_kib"] - out["baseline_kib"]) / 1024
    assert read_growth_mib < 64, out
