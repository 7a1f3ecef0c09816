"""Jobs that parse, validate and publish: the Python API and the CLI, on real files."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import duckdb
import pytest

import mxm_dataio_async as dio
from mxm_dataio_async.datasets import Dataset
from mxm_dataio_async.jobs import run_job
from tests.jobs.conftest import cli, write_job

pytestmark = pytest.mark.anyio


def write_inbox(root: Path, files: dict[str, str]) -> None:
    (root / "inbox").mkdir(exist_ok=True)
    for name, text in files.items():
        (root / "inbox" / name).write_text(text)


def job(names: list[str], on_error: str = "skip", **extra: Any) -> dict[str, Any]:
    return {
        "job": "bars",
        "store": "dataio",
        "sources": {"files": {"adapter": "file", "root": "inbox"}},
        "requests": [
            {
                "source": "files",
                "kind": "bars",
                "endpoint": "{name}",
                "expand": {"name": names},
                "cache_mode": "bypass",
                "parse": {"format": "csv"},
                "validate": {"model": "tests.datasets.models:Bar", "on_error": on_error},
                "dataset": {"name": "bars", "keys": ["symbol", "day"]},
            }
        ],
        **extra,
    }


GOOD = "symbol,day,close\nA,2025-01-02,1.5\nB,2025-01-02,2.5\n"
MORE = "symbol,day,close\nA,2025-01-02,1.5\nA,2025-01-03,1.7\n"
BAD = "symbol,day,close\nC,2025-01-02,oops\nC,2025-01-03,3.0\n"


def rows(location: Path) -> list[tuple[Any, ...]]:
    files = Dataset(location, "bars").files()
    return duckdb.execute(
        f"SELECT symbol, day::VARCHAR, close, _response_id IS NOT NULL "
        f"FROM read_parquet({files}) ORDER BY symbol, day"
    ).fetchall()


async def test_run_parses_validates_publishes_and_rerun_adds_nothing(tmp_path: Path) -> None:
    write_inbox(tmp_path, {"a.csv": GOOD, "b.csv": MORE, "c.csv": BAD})
    path = write_job(tmp_path / "job.yaml", job(["a.csv", "b.csv", "c.csv"]))
    summary = await run_job(path)
    assert summary.ok, summary.to_json()
    assert (summary.records_parsed, summary.records_failed, summary.records_added) == (6, 1, 4)
    [ds] = summary.datasets
    assert (ds.name, ds.added, ds.version, ds.published) == ("bars", 4, 1, True)
    location = tmp_path / "dataio" / "datasets"
    assert rows(location) == [
        ("A", "2025-01-02", 1.5, True),
        ("A", "2025-01-03", 1.7, True),
        ("B", "2025-01-02", 2.5, True),
        ("C", "2025-01-03", 3.0, True),
    ]
    # Every response's outcome is in the store, linked to it.
    async with dio.Store(tmp_path / "dataio") as store:
        outcomes = [v async for r in store.iter_responses() for v in await store.validations(r.id)]
        totals = await store.validation_totals()
    assert sorted((v.ok, v.failed) for v in outcomes) == [(1, 1), (2, 0), (2, 0)]
    [bad] = [v for v in outcomes if v.failed]
    assert [(e.index, e.path) for e in bad.errors] == [(0, "close")]
    assert bad.model == "tests.datasets.models:Bar" and bad.dataset == "bars"
    assert [(t.responses, t.ok, t.failed) for t in totals] == [(3, 5, 1)]

    again = await run_job(path)  # bypass: fetched again, the same records
    assert again.ok and again.records_parsed == 6 and again.records_added == 0
    assert again.datasets[0].published is False and again.datasets[0].version == 1
    assert len(rows(location)) == 4


async def test_on_error_fail_publishes_nothing_and_stop_ends_the_source(tmp_path: Path) -> None:
    write_inbox(tmp_path, {"a.csv": GOOD, "c.csv": BAD, "d.csv": MORE})
    failing = await run_job(write_job(tmp_path / "fail.yaml", job(["c.csv", "a.csv"], "fail")))
    assert not failing.ok
    assert failing.datasets[0].error is not None and not failing.datasets[0].published
    assert failing.records_parsed == 4  # fetching went on
    assert "close" in failing.sources["files"].errors[0]
    assert Dataset(tmp_path / "dataio" / "datasets", "bars").current() is None

    stopping = job(["c.csv", "a.csv", "d.csv"], "stop", concurrency=1)
    stopped = await run_job(write_job(tmp_path / "stop.yaml", stopping))
    assert not stopped.ok
    assert stopped.sources["files"].done < 3  # no more requests after the failed records
    assert Dataset(tmp_path / "dataio" / "datasets", "bars").current() is None


async def test_a_payload_that_does_not_parse_is_never_skipped(tmp_path: Path) -> None:
    write_inbox(tmp_path, {"a.csv": GOOD, "x.csv": "symbol,day,close\nA,2025-01-02\n"})
    summary = await run_job(write_job(tmp_path / "job.yaml", job(["a.csv", "x.csv"])))
    assert not summary.ok
    assert "cannot parse" in (summary.datasets[0].error or "")


def test_cli_run_show_stats_and_datasets(tmp_path: Path) -> None:
    write_inbox(tmp_path, {"a.csv": GOOD, "c.csv": BAD})
    path = write_job(tmp_path / "job.yaml", job(["a.csv", "c.csv"], datasets="published"))
    run = cli("run", str(path))
    assert run.returncode == 0, run.stderr
    assert "records: 4 parsed, 1 failed, 3 added" in run.stdout
    assert "dataset bars: 3 added, 0 changed, version 1" in run.stdout
    as_json = json.loads(cli("run", str(path), "--json").stdout)
    assert (as_json["records_parsed"], as_json["records_added"]) == (4, 0)

    listed = json.loads(cli("datasets", str(tmp_path / "published"), "--json").stdout)
    [entry] = listed["datasets"]
    assert (entry["dataset"], entry["version"], entry["rows"]) == ("bars", 1, 3)
    table = cli("datasets", str(tmp_path / "published")).stdout
    assert "bars" in table

    root = str(tmp_path / "dataio")
    stats = json.loads(cli("stats", "--root", root, "--json").stdout)
    assert stats["validations"] == [  # two runs, each fetched both files (bypass)
        {"model": "tests.datasets.models:Bar", "responses": 4, "ok": 6, "failed": 2}
    ]
    assert (
        "validated tests.datasets.models:Bar: 4 responses, 6 records ok, 2 failed"
        in cli("stats", "--root", root).stdout
    )
    session = as_json["session_ids"][0]
    shown = json.loads(cli("show", session, "--root", root, "--json").stdout)
    outcomes = [v for q in shown["requests"] for r in q["responses"] for v in r["validations"]]
    assert sorted((v["ok"], v["failed"]) for v in outcomes) == [(1, 1), (2, 0)]
    text = cli("show", session, "--root", root).stdout
    assert "record 0 close" in text


def test_cli_datasets_gc_removes_only_old_files_no_version_references(tmp_path: Path) -> None:
    """What a publish that crashed before its swap leaves (parts, indexes, manifests nobody
    references) goes once older than --grace; younger ones may be a publish in progress, and
    everything a version references stays."""
    write_inbox(tmp_path, {"a.csv": GOOD})
    path = write_job(tmp_path / "job.yaml", job(["a.csv"], datasets="published"))
    assert cli("run", str(path)).returncode == 0
    location = tmp_path / "published"
    referenced = sorted(p for p in (location / "bars").rglob("*") if p.is_file())
    old, young = [], []
    for folder in ("parts", "index", "manifests"):
        stale = location / "bars" / folder / f"crashed-{folder}.bin"
        stale.write_bytes(b"left by a crash")
        os.utime(stale, (time.time() - 7200, time.time() - 7200))  # two hours old
        old.append(f"{folder}/{stale.name}")
        fresh = location / "bars" / folder / f"writing-{folder}.bin"
        fresh.write_bytes(b"a publish in progress")
        young.append(fresh)

    dry = cli("datasets", str(location), "--gc", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    [report] = json.loads(dry.stdout)["datasets"]
    assert (report["dataset"], sorted(report["removed"])) == ("bars", sorted(old))
    assert all((location / "bars" / key).exists() for key in old)  # a dry run changes nothing

    text = cli("datasets", str(location), "--gc")
    assert text.returncode == 0, text.stderr
    assert "dataset bars: removed 3 files no version references" in text.stdout
    assert "(1 parts, 1 indexes, 1 manifests), older than 1h" in text.stdout
    assert not any((location / "bars" / key).exists() for key in old)
    assert all(p.exists() for p in young) and all(p.exists() for p in referenced)
    assert rows(location) == [("A", "2025-01-02", 1.5, True), ("B", "2025-01-02", 2.5, True)]

    refused = cli("datasets", str(location), "--dry-run")
    assert refused.returncode == 1 and "--dry-run goes with --gc" in refused.stderr
