"""Worker processes sharing one run through a real PostgreSQL, against a loopback upstream that
counts what it serves: every plan index done exactly once, a killed worker costs at most what it
had in flight, a paused worker commits nothing late, another configuration is refused."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import duckdb
import pytest

from mxm_dataio_async.datasets import Dataset
from tests.jobs.conftest import JobServer, cli, cli_process, job_server, write_job
from tests.store.postgres._support import drop_schemas, new_schema, run_blocking

__all__ = ["job_server"]  # the fixture, imported for these tests

pytestmark = pytest.mark.anyio

ITEMS = 240


@pytest.fixture
def store_url(postgres_url: str) -> Iterator[str]:
    """A store of its own on the test server (a schema, dropped afterwards)."""
    schema = new_schema("w")
    try:
        yield f"{postgres_url}?schema={schema}"
    finally:
        run_blocking(drop_schemas(postgres_url, [schema]))


def items_job(url: str, *, items: int = ITEMS, **extra: Any) -> dict[str, Any]:
    return {
        "job": "items",
        "sources": {"api": {"adapter": "http", "base_url": url, "retry": {"max_attempts": 1}}},
        "requests": [
            {
                "source": "api",
                "kind": "item",
                "endpoint": "/items/{n}",
                "expand": {"n": list(range(items))},
            }
        ],
        "concurrency": 8,
        "lease_ttl": 2.0,
        **extra,
    }


def sql(url: str, query: str) -> list[tuple[Any, ...]]:
    base, _, schema = url.partition("?schema=")

    async def go() -> list[tuple[Any, ...]]:
        conn = await asyncpg.connect(base, server_settings={"search_path": schema})
        try:
            return [tuple(r) for r in await conn.fetch(query)]
        except asyncpg.UndefinedTableError:
            return []
        finally:
            await conn.close()

    return run_blocking(go())


def done_count(url: str) -> int:
    rows = sql(url, "SELECT count(*) FROM job_done")
    return int(rows[0][0]) if rows else 0


def workers(job: Path, store_url: str, n: int, *extra: str) -> list[subprocess.Popen[str]]:
    """``n`` worker processes (payloads above the inline threshold in a folder beside the job:
    these hosts share a filesystem)."""
    return [cli_process(*worker_args(job, store_url), "--json", *extra) for _ in range(n)]


def worker_args(job: Path, store_url: str) -> list[str]:
    payloads = str(job.parent / "payloads")
    return ["worker", str(job), "--store", store_url, "--payloads", payloads, "--chunk-size", "8"]


def finish(procs: list[subprocess.Popen[str]], timeout: float = 120) -> list[dict[str, Any]]:
    out = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, stderr
        out.append(json.loads(stdout))
    return out


def assert_exactly_once(store_url: str, srv: JobServer, items: int = ITEMS) -> None:
    done = sql(store_url, "SELECT idx, count(*) FROM job_done GROUP BY idx ORDER BY idx")
    assert [d[0] for d in done] == list(range(items)) and {d[1] for d in done} == {1}
    duplicates = sql(
        store_url,
        "SELECT request_hash, count(*) FROM responses WHERE status = 'ok' "
        "GROUP BY request_hash HAVING count(*) > 1",
    )
    assert duplicates == []  # no request recorded twice
    assert sql(store_url, "SELECT count(*) FROM responses WHERE status = 'ok'") == [(items,)]
    assert len(srv.hits) == items  # every item reached the upstream


def reap(*procs: subprocess.Popen[str]) -> None:
    """Kill what still runs (a failed test's workers) and close every pipe."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
        proc.communicate(timeout=30)


def wait_for(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_four_workers_share_one_run(job_server: JobServer, store_url: str, tmp_path: Path) -> None:
    job_server.delay = 0.005
    job = write_job(tmp_path / "job.yaml", items_job(job_server.url))
    summaries = finish(workers(job, store_url, 4))
    assert all(s["complete"] for s in summaries)
    assert_exactly_once(store_url, job_server)
    assert set(job_server.hits.values()) == {1}  # nothing fetched twice
    assert sum(s["chunks_done"] for s in summaries) == ITEMS // 8
    assert sum(s["fetched"] for s in summaries) == ITEMS
    assert sum(1 for s in summaries if s["chunks_done"]) >= 2  # shared, not one worker's

    status = cli("status", str(job), "--store", store_url, "--json")
    assert status.returncode == 0, status.stderr
    st = json.loads(status.stdout)
    assert st["complete"] and st["done"] == ITEMS and st["chunks"]["done"] == ITEMS // 8
    assert len(st["workers"]) == 4 and st["per_source_done"] == {"api": ITEMS}
    again = cli(*worker_args(job, store_url), "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["complete"]  # stays complete
    assert len(job_server.hits) == ITEMS and job_server.total == ITEMS


def test_a_killed_worker_costs_at_most_what_it_had_in_flight(
    job_server: JobServer, store_url: str, tmp_path: Path
) -> None:
    job_server.delay = 0.05
    job = write_job(tmp_path / "job.yaml", items_job(job_server.url))
    victim, *others = workers(job, store_url, 3)
    try:
        wait_for(lambda: done_count(store_url) >= 40, 60, "40 requests recorded")
        victim.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        victim.communicate(timeout=10)
        # Its chunks are taken over once their leases (2 s) expire.
        held = (
            "SELECT count(*) FROM job_chunks WHERE state = 'claimed' AND owner NOT IN "
            "(SELECT worker FROM job_workers w WHERE w.seen_at > now() - interval '1 second')"
        )
        wait_for(lambda: sql(store_url, held) == [(0,)], 10, "the dead worker's chunks")
        recovered = time.monotonic() - killed_at
        summaries = finish(others)
    finally:
        reap(victim, *others)
    assert all(s["complete"] for s in summaries)
    assert recovered <= 2.0 + 1.0 + 0.7  # lease TTL + 1 s (+ this test's own polling)
    assert_exactly_once(store_url, job_server)
    refetched = job_server.total - ITEMS
    assert 0 <= refetched <= 8  # at most the killed worker's concurrency


def test_a_paused_worker_past_its_lease_commits_nothing_late(
    job_server: JobServer, store_url: str, tmp_path: Path
) -> None:
    job = write_job(tmp_path / "job.yaml", items_job(job_server.url, lease_ttl=1.0))
    job_server.delay = 0.05
    paused, other = workers(job, store_url, 2)
    try:
        wait_for(lambda: done_count(store_url) >= 16, 60, "16 requests recorded")
        job_server.pause()  # answers held: both workers now have requests in flight
        wait_for(lambda: job_server.total >= done_count(store_url) + 12, 30, "in-flight requests")
        paused.send_signal(signal.SIGSTOP)
        time.sleep(2.5)  # real processes: its 1 s leases expire (the server's clock decides)
        job_server.resume()
        summary_other = finish([other])[0]  # the other finishes the run, the paused chunks too
        paused.send_signal(signal.SIGCONT)
        summary_paused = finish([paused])[0]
    finally:
        reap(paused, other)
    assert summary_other["complete"] and summary_paused["complete"]
    assert summary_paused["chunks_lost"] >= 1  # its late answers were fenced out
    assert_exactly_once(store_url, job_server)


def test_another_configuration_is_refused(
    job_server: JobServer, store_url: str, tmp_path: Path
) -> None:
    job = write_job(tmp_path / "job.yaml", items_job(job_server.url, items=16))
    assert finish(workers(job, store_url, 1))[0]["complete"]
    other = write_job(tmp_path / "other.yaml", items_job(job_server.url, items=17))
    refused = cli(*worker_args(other, store_url))
    assert refused.returncode == 4, refused.stderr
    assert "another configuration" in refused.stderr and "--run" in refused.stderr
    fresh = cli(*worker_args(other, store_url), "--run", "b")
    assert fresh.returncode == 0, fresh.stderr  # a new run of it is fine


def test_a_chunk_that_keeps_failing_is_dead_and_reported(
    job_server: JobServer, store_url: str, tmp_path: Path
) -> None:
    data = items_job(job_server.url, items=16)
    data["requests"][0]["endpoint"] = "/bars/{n}"
    job_server.fail = {"3"}
    job = write_job(tmp_path / "job.yaml", data)
    summary = finish(workers(job, store_url, 1, "--max-attempts", "2"))[0]
    assert summary["complete"] and summary["dead_chunks"] == 1
    assert summary["chunks_released"] == 2 and summary["chunks_done"] == 1
    status = json.loads(cli("status", str(job), "--store", store_url, "--json").stdout)
    assert status["complete"] and status["chunks"] == {
        "pending": 0,
        "claimed": 0,
        "done": 1,
        "dead": 1,
    }
    (dead,) = status["dead_chunks"]
    assert dead["chunk"] == 0 and dead["attempts"] == 2 and "404" in dead["error"]
    assert job_server.hits["/bars/3"] == 2  # one try per claim


def test_workers_leave_records_to_a_run_of_the_job_after_them(
    job_server: JobServer, store_url: str, tmp_path: Path
) -> None:
    """Workers fetch and record, and say that they do not parse, validate or publish; the run of
    the same job on the same store they point to does it from the recorded responses."""
    data = items_job(job_server.url, items=16)
    data["requests"][0] |= {
        "parse": {"format": "json"},
        "validate": {"model": "tests.datasets.models:Item"},
        "dataset": {"name": "items", "keys": ["item"]},
    }
    data["datasets"] = "published"  # beside the job file
    job = write_job(tmp_path / "job.yaml", data)
    summaries = finish(workers(job, store_url, 2))
    assert all(s["complete"] and s["not_parsed"] == ["items"] for s in summaries)
    assert sum(s["fetched"] for s in summaries) == 16
    assert not (tmp_path / "published").exists()  # nothing published by the workers
    told = cli(*worker_args(job, store_url))  # the run is complete: it says what is left
    assert told.returncode == 0, told.stderr
    assert "not parsed, validated or published by workers: items" in told.stdout
    assert "mxm-dataio run" in told.stdout

    payloads = str(job.parent / "payloads")
    ran = cli("run", str(job), "--store", store_url, "--payloads", payloads, "--json")
    assert ran.returncode == 0, ran.stderr
    summary = json.loads(ran.stdout)
    assert (summary["fetched"], summary["from_cache"]) == (0, 16)  # every response recorded
    assert job_server.total == 16  # nothing fetched again
    [published] = summary["datasets"]
    assert (published["name"], published["parsed"], published["added"]) == ("items", 16, 16)
    files = Dataset(tmp_path / "published", "items").files()
    found = duckdb.execute(f"SELECT item FROM read_parquet({files}) ORDER BY item::INT").fetchall()
    assert found == [(str(n),) for n in range(16)]


async def test_a_worker_needs_a_postgresql_store(tmp_path: Path) -> None:
    from mxm_dataio_async._exceptions import UsageError
    from mxm_dataio_async.jobs import job_from_data, run_worker

    config = job_from_data(items_job("http://127.0.0.1:9", items=2))
    with pytest.raises(UsageError, match="needs a PostgreSQL store"):
        await run_worker(config, store=tmp_path / "local")
