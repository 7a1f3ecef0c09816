"""Running jobs through the Python API and the CLI against a loopback server."""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml

import mxm_dataio_async as dio
from mxm_dataio_async._request import build_request
from mxm_dataio_async.jobs import JobSummary, SourceSummary, load_job, run_job
from tests.jobs.conftest import JobServer, bars_job, cli, write_job

pytestmark = pytest.mark.anyio

SYMBOLS = ["CSPX.L", "VWRL.L", "EQQQ.L"]
# 2024-01-01..2024-03-31 in calendar months, written out by hand.
MONTHS = [
    ("2024-01-01", "2024-01-31"),
    ("2024-02-01", "2024-02-29"),
    ("2024-03-01", "2024-03-31"),
]


def query(root: Path, sql: str, params: Any = ()) -> list[Any]:
    with closing(sqlite3.connect(root / "dataio.sqlite")) as conn:
        return conn.execute(sql, params).fetchall()


def expected_hashes(bucket: str | None = None) -> set[str]:
    return {
        build_request(
            session_id="independent",
            source="prices",
            kind="bars",
            endpoint=f"/bars/{symbol}",
            params={"start": start, "end": end},
            as_of_bucket=bucket,
        ).hash
        for symbol in SYMBOLS
        for start, end in MONTHS
    }


async def test_expansion_records_exactly_the_expected_requests(
    job_server: JobServer, tmp_path: Path
) -> None:
    path = write_job(tmp_path / "job.yaml", bars_job(job_server.url))
    seen: list[SourceSummary] = []
    summary = await run_job(path, on_progress=seen.append)
    assert isinstance(summary, JobSummary)
    assert summary.job == "prices_daily"
    assert summary.ok
    prices = summary.sources["prices"]
    assert (prices.total, prices.fetched, prices.from_cache, prices.failed) == (9, 9, 0, 0)
    assert summary.root == tmp_path / "dataio"  # store: is relative to the job file
    root = summary.root
    requests = {r[0].lower() for r in query(root, "SELECT hex(hash) FROM requests")}
    responses = {
        r[0].lower()
        for r in query(root, "SELECT hex(request_hash) FROM responses WHERE status = 'ok'")
    }
    assert requests == responses == expected_hashes()
    assert len(query(root, "SELECT id FROM responses")) == 9
    assert job_server.total == 9 and set(job_server.hits.values()) == {1}
    # One session for the source, named after the job; progress ended at the totals.
    sessions = query(root, "SELECT id, source, as_of, status FROM sessions")
    assert sessions == [(summary.session_ids[0], "prices", "job:prices_daily", "ok")]
    assert seen[0].done == 0 and seen[-1].done == 9
    # ${PRICES_TOKEN} reached the server, and never the store.
    assert set(job_server.auth) == {"Bearer s3cr3t-token"}
    for db in root.glob("dataio.sqlite*"):
        assert b"s3cr3t-token" not in db.read_bytes()


async def test_rerun_fetches_nothing_unless_cache_mode_bucket_or_ttl_say_so(
    job_server: JobServer, tmp_path: Path
) -> None:
    data = bars_job(job_server.url)
    path = write_job(tmp_path / "job.yaml", data)
    first = await run_job(path)
    assert first.fetched == 9
    again = await run_job(path)
    assert (again.fetched, again.from_cache, again.failed) == (0, 9, 0)
    assert again.ok and job_server.total == 9  # the server saw nothing new
    assert again.session_ids != first.session_ids
    # A new bucket is a new identity: everything again, once.
    data["requests"][0]["as_of_bucket"] = "2025-01-02"
    bucketed = await run_job(write_job(tmp_path / "job.yaml", data))
    assert bucketed.fetched == 9 and job_server.total == 18
    # A TTL of 0 makes every stored response stale; bypass always fetches.
    data["requests"][0]["ttl"] = 0
    assert (await run_job(write_job(tmp_path / "job.yaml", data))).fetched == 9
    del data["requests"][0]["ttl"]
    data["requests"][0]["cache_mode"] = "bypass"
    assert (await run_job(write_job(tmp_path / "job.yaml", data))).fetched == 9
    data["requests"][0]["cache_mode"] = "only_if_cached"
    offline = await run_job(write_job(tmp_path / "job.yaml", data))
    assert (offline.fetched, offline.from_cache) == (0, 9)
    assert job_server.total == 36


async def test_failures_are_counted_not_raised(job_server: JobServer, tmp_path: Path) -> None:
    job_server.fail = {"VWRL.L"}
    path = write_job(tmp_path / "job.yaml", bars_job(job_server.url))
    summary = await run_job(path)
    assert not summary.ok
    assert (summary.fetched, summary.failed) == (6, 3)
    assert len(summary.sources["prices"].errors) == 3
    assert "/bars/VWRL.L" in summary.sources["prices"].errors[0]
    # The failures were recorded (as errors), so a rerun tries only them again.
    job_server.fail = set()
    retried = await run_job(path)
    assert retried.ok and (retried.fetched, retried.from_cache) == (3, 6)


async def test_several_sources_run_concurrently_each_with_its_session(
    job_server: JobServer, tmp_path: Path
) -> None:
    (tmp_path / "inbox").mkdir()
    for i in range(4):
        (tmp_path / "inbox" / f"f{i}.csv").write_text(f"row {i}\n")
    data = bars_job(job_server.url, concurrency=3)
    data["sources"]["files"] = {"adapter": "file", "root": "inbox", "concurrency": 2}
    data["sources"]["mock"] = {
        "adapter": "tests.jobs._factories:async_echo",
        "prefix": "hello",
        "rate_limit": {"rate": 1000, "burst": 10},
    }
    data["sources"]["sync_mock"] = {"adapter": "tests.jobs._factories.echo"}
    data["requests"] += [
        {"source": "files", "kind": "csv", "endpoint": "f{i}.csv", "expand": {"i": [0, 1, 2, 3]}},
        {
            "source": "mock",
            "kind": "page",
            "params": {"page": "{page}"},
            "expand": {"page": [1, 2]},
        },
        {"source": "sync_mock", "kind": "one", "endpoint": "/x"},
    ]
    path = write_job(tmp_path / "job.yaml", data)
    summary = await run_job(path)
    assert summary.ok, summary
    assert {n: s.fetched for n, s in summary.sources.items()} == {
        "prices": 9,
        "files": 4,
        "mock": 2,
        "sync_mock": 1,
    }
    assert len(set(summary.session_ids)) == 4
    async with dio.Store(summary.root) as store:
        pages = [r async for r in store.iter_responses(source="mock")]
        bodies = sorted([(await store.read(r)).decode() for r in pages])
        assert bodies == ["hello None [('page', 1)]", "hello None [('page', 2)]"]
        csv = [r async for r in store.iter_responses(source="files")]
        assert sorted([await store.read(r) for r in csv]) == [
            f"row {i}\n".encode() for i in range(4)
        ]


async def test_limit_and_only(job_server: JobServer, tmp_path: Path) -> None:
    data = bars_job(job_server.url)
    data["sources"]["mock"] = {"adapter": "tests.jobs._factories:echo"}
    data["requests"].append(
        {"source": "mock", "kind": "page", "params": {"page": "{p}"}, "expand": {"p": [1, 2, 3]}}
    )
    path = write_job(tmp_path / "job.yaml", data)
    limited = await run_job(path, limit=10)  # file order: 9 bars, then the first page
    assert {n: (s.total, s.fetched) for n, s in limited.sources.items()} == {
        "prices": (9, 9),
        "mock": (1, 1),
    }
    only = await run_job(path, only=["mock"])
    assert list(only.sources) == ["mock"]
    assert (only.fetched, only.from_cache) == (2, 1)
    assert job_server.total == 9


async def test_a_loaded_config_runs_with_an_explicit_root(
    job_server: JobServer, tmp_path: Path
) -> None:
    config = load_job(write_job(tmp_path / "job.yaml", bars_job(job_server.url)))
    summary = await run_job(config, root=tmp_path / "elsewhere", limit=2)
    assert summary.root == tmp_path / "elsewhere" and summary.fetched == 2
    assert (tmp_path / "elsewhere" / "dataio.sqlite").is_file()
    assert not (tmp_path / "dataio").exists()


async def test_store_and_payloads_from_the_job_file_or_the_caller(
    job_server: JobServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``payloads:`` in the job (relative to its folder) or ``payloads=`` names where large
    payloads go; a ``store:`` URL of an unknown kind is refused with a clear message."""
    jobdir = tmp_path / "jobs"
    jobdir.mkdir()
    config = load_job(write_job(jobdir / "job.yaml", bars_job(job_server.url, payloads="objects")))
    summary = await run_job(config, limit=2)
    assert summary.root == jobdir / "dataio" and summary.fetched == 2
    assert (jobdir / "objects" / "payloads").is_dir()  # the payload store the run opened
    assert not (jobdir / "dataio" / "payloads").exists()
    summary = await run_job(config, root=tmp_path / "s2", payloads=tmp_path / "o2", limit=1)
    assert (tmp_path / "o2" / "payloads").is_dir() and summary.fetched == 1
    monkeypatch.setenv("MXM_DATAIO_PAYLOADS", str(tmp_path / "o3"))
    bare = load_job(write_job(tmp_path / "bare.yaml", bars_job(job_server.url)))
    await run_job(bare, root=tmp_path / "s3", limit=1)
    assert (tmp_path / "o3" / "payloads").is_dir()
    with pytest.raises(ValueError, match="postgresql://"):
        await run_job(
            load_job(write_job(tmp_path / "x.yaml", bars_job(job_server.url, store="ftp://h/x")))
        )


def test_cli_run_summary_exit_codes_and_json(job_server: JobServer, tmp_path: Path) -> None:
    path = write_job(tmp_path / "job.yaml", bars_job(job_server.url))
    done = cli("run", str(path))
    assert done.returncode == 0, done.stderr
    assert "prices" in done.stdout and "9 of 9 requests: 9 fetched, 0 from cache, ok" in done.stdout
    again = cli("run", str(path), "--json")
    assert again.returncode == 0, again.stderr
    out = json.loads(again.stdout)
    assert (out["job"], out["ok"], out["fetched"], out["from_cache"]) == (
        "prices_daily",
        True,
        0,
        9,
    )
    assert out["sources"]["prices"]["session_id"] == out["session_ids"][0]
    assert job_server.total == 9
    job_server.fail = {"EQQQ.L"}
    data = bars_job(job_server.url)
    data["requests"][0]["cache_mode"] = "bypass"
    write_job(path, data)
    failed = cli("run", str(path))
    assert failed.returncode == 1
    assert "3 failed" in failed.stdout and "/bars/EQQQ.L" in failed.stderr
    allowed = cli("run", str(path), "--allow-failures")
    assert allowed.returncode == 0 and "3 failed" in allowed.stdout


def test_cli_dry_run_calls_nothing(job_server: JobServer, tmp_path: Path) -> None:
    path = write_job(tmp_path / "job.yaml", bars_job(job_server.url))
    done = cli("run", str(path), "--dry-run", "--show", "4")
    assert done.returncode == 0, done.stderr
    assert "job prices_daily: 9 requests (prices: 9)" in done.stdout
    assert "/bars/CSPX.L" in done.stdout and "2024-01-31" in done.stdout
    as_json = json.loads(cli("run", str(path), "--dry-run", "--json", "--limit", "5").stdout)
    assert as_json["total"] == 5 and len(as_json["first"]) == 5
    assert as_json["first"][1]["params"] == {"start": "2024-02-01", "end": "2024-02-29"}
    assert as_json["first"][0]["headers"] == {}
    assert job_server.total == 0
    assert not (tmp_path / "dataio").exists()


async def test_stop_ends_a_run_early_and_cleanly(job_server: JobServer, tmp_path: Path) -> None:
    job_server.delay = 0.02
    data = bars_job(job_server.url, start="2024-01-01", end="2024-01-20", chunk="1d")
    path = write_job(tmp_path / "job.yaml", data)
    stop = anyio.Event()

    def on_progress(s: SourceSummary) -> None:
        if s.done >= 5:
            stop.set()

    summary = await run_job(
        path, on_progress=on_progress, stop=stop, stop_reason=lambda: "stopped by the test"
    )
    assert summary.interrupted and not summary.ok
    assert 5 <= summary.done < 60
    root = Path(summary.root)  # a folder here (the job's store: ./dataio)
    assert query(root, "SELECT count(*) FROM leases") == [(0,)]
    [(status, error, ended)] = query(root, "SELECT status, error, ended_at FROM sessions")
    assert ended is not None and (status, error) == ("cancelled", "stopped by the test")
    rest = await run_job(path)
    assert not rest.interrupted and rest.ok
    assert rest.fetched + rest.from_cache == 60 and rest.from_cache >= summary.fetched


async def test_concurrency_is_job_wide(tmp_path: Path) -> None:
    from tests.jobs._factories import InFlight

    InFlight.peak = 0
    sources = {
        name: {"adapter": "tests.jobs._factories:tracked", "concurrency": 8} for name in "abc"
    }
    requests = [
        {"source": name, "kind": "k", "params": {"i": "{i}"}, "expand": {"i": list(range(30))}}
        for name in "abc"
    ]
    job = {"job": "wide", "sources": sources, "requests": requests, "concurrency": 5}
    summary = await run_job(write_job(tmp_path / "job.yaml", job))
    assert summary.root == Path("dataio")  # no store: ./dataio, in the current directory
    assert summary.ok and summary.fetched == 90
    assert InFlight.peak == 5  # three sources of 8 each, capped by the job's 5
    InFlight.peak = 0
    job["concurrency"] = 64
    for spec in sources.values():
        spec["concurrency"] = 2
    job["requests"] = [dict(r, cache_mode="bypass") for r in requests]
    summary = await run_job(write_job(tmp_path / "job.yaml", job))
    assert summary.fetched == 90 and InFlight.peak == 6  # each source's own cap: 3 x 2


def _factory_beside(job_dir: Path, module: str) -> Path:
    """A job whose adapter factory is a module next to the job file; the adapter imports a
    second neighbour only when it is called, during the run."""
    job_dir.mkdir()
    (job_dir / f"{module}.py").write_text(
        "import mxm_dataio_async as dio\n\n\n"
        "def make(prefix):\n"
        "    def handler(request):\n"
        f"        import {module}_helpers\n\n"
        f"        return {module}_helpers.body(prefix, request.endpoint)\n\n"
        "    return dio.MockAdapter(handler)\n",
        encoding="utf-8",
    )
    (job_dir / f"{module}_helpers.py").write_text(
        "def body(prefix, endpoint):\n    return f'{prefix} {endpoint}'.encode()\n",
        encoding="utf-8",
    )
    data = {
        "job": "beside",
        "store": "./dataio",
        "sources": {"feed": {"adapter": f"{module}:make", "prefix": "hello"}},
        "requests": [
            {"source": "feed", "kind": "k", "endpoint": "/n/{n}", "expand": {"n": [1, 2, 3]}}
        ],
    }
    return write_job(job_dir / "job.yaml", data)


def test_a_factory_next_to_the_job_file_imports(tmp_path: Path) -> None:
    """Regression: ``cd jobdir && mxm-dataio run job.yaml`` could not import a factory module
    beside the job file (a console script does not put the current folder on the path)."""
    import subprocess
    import sys

    from tests.jobs.conftest import cli_env

    path = _factory_beside(tmp_path / "jobdir", "beside_feed_cli")
    script = Path(sys.executable).with_name("mxm-dataio")
    assert script.exists()
    done = subprocess.run(
        [str(script), "run", "job.yaml", "--json"],
        cwd=path.parent,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["fetched"] == 3
    bodies = query(path.parent / "dataio", "SELECT count(*) FROM responses WHERE status = 'ok'")
    assert bodies == [(3,)]


async def test_the_job_folder_is_on_the_import_path_for_the_run_only(tmp_path: Path) -> None:
    import sys

    path = _factory_beside(tmp_path / "jobdir", "beside_feed_api")
    before = list(sys.path)
    summary = await run_job(path)
    assert summary.ok and summary.fetched == 3
    assert sys.path == before  # put back after the run
    async with dio.Store(path.parent / "dataio") as store:
        got = sorted([await store.read(r) async for r in store.iter_responses(status="ok")])
    assert got == [b"hello /n/1", b"hello /n/2", b"hello /n/3"]
    # Elsewhere, the error says where it looked and what to do.
    data = yaml.safe_load(path.read_text())
    data["sources"]["feed"]["adapter"] = "not_beside_anything:make"
    with pytest.raises(dio.DataIOError) as info:
        load_job(write_job(path, data))
    assert "job file's folder" in str(info.value) and "PYTHONPATH" in str(info.value)
