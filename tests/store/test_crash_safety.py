"""SIGKILL a bulk run at random moments: nothing committed is lost or corrupt, nothing refetched."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import pytest

from mxm_dataio_async import ResponseStatus, Store
from tests.store._ingest_child import INLINE_THRESHOLD, body

pytestmark = pytest.mark.anyio

ROOT_DIR = Path(__file__).resolve().parents[2]
PER_KILL = 1_200  # requests per planned kill: enough that runs are still going when killed
KILLS = 10


def _start(root: Path, start: int, stop: int, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.store._ingest_child",
            str(root),
            str(start),
            str(stop),
            *extra,
        ],
        cwd=ROOT_DIR,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_ready(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "ready", (line, proc.stderr.read() if proc.stderr else "")


async def _check_store(root: Path) -> int:
    """Integrity, every OK payload verified, temp leftovers cleaned; returns the OK count."""
    conn = sqlite3.connect(root / "dataio.sqlite")
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()
    ok = 0
    async with Store(root, inline_threshold=INLINE_THRESHOLD) as store:
        assert not any((root / "tmp").iterdir()), "temp leftovers survived reopening"
        async for resp in store.iter_responses(status=ResponseStatus.OK):
            data = await store.read(resp)  # raises IntegrityError if corrupt or missing
            ok += 1
            assert resp.size_bytes == len(data)
        # Every response row has its request row (they commit in one transaction).
        async for resp in store.iter_responses():
            assert resp.request_id
    return ok


async def test_sigkill_at_random_moments_loses_nothing(tmp_path: Path) -> None:
    await _soak(tmp_path, KILLS, seed=20261123)


@pytest.mark.slow
async def test_sigkill_soak(tmp_path: Path) -> None:
    """The long version (opt in: ``pytest -m slow``); MXM_SOAK_KILLS sets the count."""
    await _soak(tmp_path, int(os.environ.get("MXM_SOAK_KILLS", "60")), seed=int(time.time()))


async def _soak(tmp_path: Path, kills_wanted: int, *, seed: int) -> None:
    root = tmp_path / "store"
    rng = random.Random(seed)
    n = PER_KILL * kills_wanted
    recorded_before = 0
    kills = 0
    temp_seen = 0
    for _ in range(kills_wanted):
        proc = _start(root, 0, n)
        _wait_ready(proc)
        time.sleep(rng.uniform(0.0, 1.0))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.communicate()  # reap and close the pipes
        if (root / "tmp").exists():
            temp_seen += sum(1 for _ in (root / "tmp").iterdir())
        recorded = await _check_store(root)
        assert recorded >= recorded_before  # nothing committed disappears
        recorded_before = recorded
    assert kills >= kills_wanted // 2, "runs finished before they could be killed: raise PER_KILL"
    # Rerun to completion: only what is missing is fetched.
    proc = _start(root, 0, n)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    calls = int(out.strip().splitlines()[-1].split("calls=")[1])
    assert calls == n - recorded_before
    assert await _check_store(root) == n
    # And the bytes are the right ones.
    async with Store(root) as store:
        seen = 0
        async for resp in store.iter_responses(status=ResponseStatus.OK):
            with closing(sqlite3.connect(root / "dataio.sqlite")) as conn:
                (params,) = conn.execute(
                    "SELECT params FROM requests WHERE id = ?", (resp.request_id,)
                ).fetchone()
            i = json.loads(params)["i"]
            assert await store.read(resp) == body(i)
            seen += 1
    assert seen == n
    print(
        f"\ncrash safety: {kills} SIGKILLs, {temp_seen} temp files left by killed runs "
        f"(all removed on reopen), {recorded_before} responses survived, rerun fetched {calls}, "
        f"seed {seed}"
    )
