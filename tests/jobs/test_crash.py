"""A run killed with SIGKILL half-way: the rerun fetches exactly what is missing."""

from __future__ import annotations

import json
import signal
import sqlite3
import time
from contextlib import closing
from pathlib import Path

from tests.jobs.conftest import JobServer, bars_job, cli, cli_process, write_job

TOTAL = 4 * 30  # four symbols x 30 daily chunks


def _ok_hashes(root: Path) -> set[bytes]:
    db = root / "dataio.sqlite"
    if not db.exists():
        return set()
    try:
        with closing(sqlite3.connect(db)) as conn:
            rows = conn.execute("SELECT request_hash FROM responses WHERE status = 'ok'")
            return {bytes(r[0]) for r in rows.fetchall()}
    except sqlite3.OperationalError:  # not created yet
        return set()


def test_sigkill_mid_run_then_rerun_fetches_only_the_rest(
    job_server: JobServer, tmp_path: Path
) -> None:
    job_server.delay = 0.03
    data = bars_job(
        job_server.url,
        symbols=["A", "B", "C", "D"],
        start="2024-01-01",
        end="2024-01-30",
        chunk="1d",
        concurrency=4,
        lease_ttl=1,  # the killed run's lease expires quickly
    )
    path = write_job(tmp_path / "job.yaml", data)
    root = tmp_path / "dataio"
    proc = cli_process("run", str(path))
    try:
        deadline = time.monotonic() + 60
        while len(_ok_hashes(root)) < 30:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the run recorded too little"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    recorded = _ok_hashes(root)
    assert 30 <= len(recorded) < TOTAL, "killed too late to test a resume"
    hits_before = job_server.hits.copy()
    # The dead run's lease has not been released: the rerun waits for it to expire.
    rerun = cli("run", str(path), "--wait", "--json", timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    out = json.loads(rerun.stdout)
    assert (out["fetched"], out["from_cache"], out["failed"]) == (
        TOTAL - len(recorded),
        len(recorded),
        0,
    )
    new_hits = job_server.hits - hits_before
    assert new_hits.total() == TOTAL - len(recorded)  # each missing request once, nothing else
    assert set(new_hits.values()) == {1}
    assert len(_ok_hashes(root)) == TOTAL
    assert len(job_server.hits) == TOTAL


def test_ctrl_c_stops_cleanly_and_releases_the_lease(job_server: JobServer, tmp_path: Path) -> None:
    job_server.delay = 0.03
    data = bars_job(
        job_server.url, symbols=["A", "B", "C", "D"], start="2024-01-01", end="2024-01-30",
        chunk="1d", concurrency=4,
    )  # fmt: skip
    path = write_job(tmp_path / "job.yaml", data)
    root = tmp_path / "dataio"
    proc = cli_process("run", str(path))
    try:
        deadline = time.monotonic() + 60
        while len(_ok_hashes(root)) < 20:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the run recorded too little"
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
    finally:
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    recorded = _ok_hashes(root)
    with closing(sqlite3.connect(root / "dataio.sqlite")) as conn:
        assert conn.execute("SELECT count(*) FROM leases").fetchone()[0] == 0
        ends = set(conn.execute("SELECT status, error FROM sessions"))
    # The session recorded its end and why: cancelled by Ctrl-C, never left "open".
    assert ends == {("cancelled", "interrupted (SIGINT)")}
    rerun = cli("run", str(path), "--json")  # no --wait needed: the lease was released
    assert rerun.returncode == 0, rerun.stderr
    assert json.loads(rerun.stdout)["fetched"] == TOTAL - len(recorded)
