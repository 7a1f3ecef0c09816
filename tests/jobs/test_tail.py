"""``mxm-dataio tail``: every response once per checkpoint, across restarts and while following."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
from contextlib import closing
from pathlib import Path
from typing import Any

import anyio

from mxm_dataio_async.jobs import JobSummary, run_job
from tests.jobs.conftest import JobServer, bars_job, cli, cli_process, write_job


def _run(path: Path) -> JobSummary:
    return anyio.run(lambda: run_job(path))


def _all_ids(root: Path) -> list[str]:
    with closing(sqlite3.connect(root / "dataio.sqlite")) as conn:
        return [r[0] for r in conn.execute("SELECT id FROM responses ORDER BY rowid")]


def _lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_a_checkpointed_consumer_sees_every_response_once(
    job_server: JobServer, tmp_path: Path
) -> None:
    data = bars_job(job_server.url)
    path = write_job(tmp_path / "job.yaml", data)
    root = tmp_path / "dataio"
    _run(path)
    first = cli("tail", "--checkpoint", "etl", "--root", str(root))
    assert first.returncode == 0, first.stderr
    seen = _lines(first.stdout)
    assert [r["id"] for r in seen] == _all_ids(root)
    line = seen[0]
    assert set(line) >= {"id", "source", "kind", "status", "checksum", "size", "fetched_at"}
    assert (line["source"], line["kind"], line["status"]) == ("prices", "bars", "ok")
    assert line["params"] == {"start": "2024-01-01", "end": "2024-01-31"}
    assert line["endpoint"] == "/bars/CSPX.L" and line["size"] > 0
    assert len(line["checksum"]) == 64
    # A restart: nothing new, nothing again.
    again = cli("tail", "--checkpoint", "etl", "--root", str(root))
    assert again.returncode == 0 and again.stdout == ""
    # New responses (a new bucket): only those; a rerun from cache adds none.
    data["requests"][0]["as_of_bucket"] = "2025-01-01"
    _run(write_job(path, data))
    _run(path)
    more = _lines(cli("tail", "--checkpoint", "etl", "--root", str(root)).stdout)
    assert len(more) == 9 and {r["as_of_bucket"] for r in more} == {"2025-01-01"}
    ids = [r["id"] for r in seen + more]
    assert ids == _all_ids(root) and len(set(ids)) == 18
    # Another consumer has its own checkpoint; filters apply.
    other = _lines(cli("tail", "--checkpoint", "vw", "--root", str(root), "--kind", "bars").stdout)
    assert [r["id"] for r in other] == ids
    none = cli("tail", "--checkpoint", "x", "--root", str(root), "--source", "nope")
    assert none.returncode == 0 and none.stdout == ""


def test_follow_prints_what_arrives_while_it_runs(job_server: JobServer, tmp_path: Path) -> None:
    data = bars_job(job_server.url)
    path = write_job(tmp_path / "job.yaml", data)
    root = tmp_path / "dataio"
    _run(path)
    follower = cli_process(
        "tail", "--checkpoint", "live", "--root", str(root), "--follow",
        "--interval", "0.05", "--timeout", "8",
    )  # fmt: skip
    try:
        assert follower.stdout is not None
        first = [json.loads(follower.stdout.readline()) for _ in range(9)]
        data["requests"][0]["as_of_bucket"] = "next"
        _run(write_job(path, data))
        later = [json.loads(follower.stdout.readline()) for _ in range(9)]
    finally:
        follower.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            _, err = follower.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            follower.kill()
            follower.communicate()
            raise
    assert follower.returncode == 0, err
    assert [r["id"] for r in first + later] == _all_ids(root)
    # The checkpoint kept up: a restarted follower has nothing left to print.
    assert cli("tail", "--checkpoint", "live", "--root", str(root)).stdout == ""


def test_tail_errors(tmp_path: Path) -> None:
    missing = cli("tail", "--checkpoint", "c", "--root", str(tmp_path / "nothing"))
    assert missing.returncode == 1 and "no store at" in missing.stderr
    assert not (tmp_path / "nothing").exists()
    anyio.run(_make_store, tmp_path / "store")
    bad = cli("tail", "--checkpoint", "c", "--root", str(tmp_path / "store"), "--status", "meh")
    assert bad.returncode == 1 and "unknown status 'meh'" in bad.stderr
    timed = cli("tail", "--checkpoint", "c", "--root", str(tmp_path / "store"), "--follow",
                "--interval", "0.05", "--timeout", "0.2")  # fmt: skip
    assert timed.returncode == 0 and timed.stdout == ""


async def _make_store(root: Path) -> None:
    import mxm_dataio_async as dio

    async with dio.Store(root):
        pass


def test_a_checkpoint_keeps_its_filters(job_server: JobServer, tmp_path: Path) -> None:
    """Regression: the same checkpoint name under other filters silently skipped rows (its
    position is one place in recording order, advanced under the first filters)."""
    data = bars_job(job_server.url, symbols=["CSPX.L"])
    data["requests"].append({**data["requests"][0], "kind": "quotes"})
    path = write_job(tmp_path / "job.yaml", data)
    root = tmp_path / "dataio"
    _run(path)
    ids = _all_ids(root)
    assert len(ids) == 6
    bars = _lines(cli("tail", "--checkpoint", "etl", "--root", str(root), "--kind", "bars").stdout)
    assert [r["kind"] for r in bars] == ["bars"] * 3
    for other in ([], ["--kind", "quotes"], ["--kind", "bars", "--source", "prices"]):
        refused = cli("tail", "--checkpoint", "etl", "--root", str(root), *other)
        assert refused.returncode == 1 and refused.stdout == "", refused.stderr
        message = " ".join(refused.stderr.split())
        assert "checkpoint 'etl' was used with other filters" in message
        assert "own --checkpoint name" in message
    # The same filters go on where they stopped (nothing new); their own name sees every row.
    same = cli("tail", "--checkpoint", "etl", "--root", str(root), "--kind", "bars")
    assert same.returncode == 0 and same.stdout == ""
    quotes = cli("tail", "--checkpoint", "etl-quotes", "--root", str(root), "--kind", "quotes")
    assert [r["kind"] for r in _lines(quotes.stdout)] == ["quotes"] * 3
    # A name first used without filters refuses filters later, too.
    assert len(_lines(cli("tail", "--checkpoint", "all", "--root", str(root)).stdout)) == 6
    later = cli("tail", "--checkpoint", "all", "--root", str(root), "--kind", "bars")
    assert later.returncode == 1 and "other filters" in later.stderr
    # A checkpoint written as a plain name (the store API, or an older tail) is unfiltered.
    anyio.run(_checkpoint, root, "legacy", ids[2])
    legacy = cli("tail", "--checkpoint", "legacy", "--root", str(root), "--kind", "quotes")
    assert legacy.returncode == 1 and "other filters" in legacy.stderr
    rest = _lines(cli("tail", "--checkpoint", "legacy", "--root", str(root)).stdout)
    assert [r["id"] for r in rest] == ids[3:]


async def _checkpoint(root: Path, name: str, cursor: str) -> None:
    import mxm_dataio_async as dio

    async with dio.Store(root) as store:
        await store.write_checkpoint(name, cursor)
