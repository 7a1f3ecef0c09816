"""``mxm-dataio worker --redis``: worker processes sharing one run (PostgreSQL) share each
source's rate limit and its Retry-After pauses (Redis), measured at a loopback upstream that
notes when every request arrives."""

from __future__ import annotations

import bisect
import os
from pathlib import Path
from typing import Any

import pytest

from tests.jobs.conftest import JobServer, cli_process, job_server, write_job
from tests.workers.test_workers import (
    assert_exactly_once,
    finish,
    items_job,
    reap,
    store_url,
    worker_args,
)

__all__ = ["job_server", "store_url"]  # the fixtures, imported for these tests

RATE = 100
WORKERS = 4


def rated_job(url: str, items: int, prefix: str, **source: Any) -> dict[str, Any]:
    """``items`` item requests from one source limited to RATE/s; the Redis URL is left to the
    command line and the environment (the job says only which prefix to share)."""
    job = items_job(url, items=items, redis={"prefix": prefix})
    job["sources"]["api"].update(rate_limit={"rate": RATE}, max_concurrency=8, **source)
    return job


def start_workers(job: Path, store_url: str, redis_url: str) -> list[Any]:
    """WORKERS worker processes: half given ``--redis``, half ``$MXM_DATAIO_REDIS``."""
    base = [*worker_args(job, store_url), "--json"]
    return [
        cli_process(*base, "--redis", redis_url)
        if n % 2 == 0
        else cli_process(*base, MXM_DATAIO_REDIS=redis_url)
        for n in range(WORKERS)
    ]


def test_workers_share_one_rate_limit(
    job_server: JobServer, store_url: str, redis_url: str, prefix: str, tmp_path: Path
) -> None:
    items = 10 * RATE  # ten seconds at the shared rate
    job = write_job(tmp_path / "job.yaml", rated_job(job_server.url, items, prefix))
    procs = start_workers(job, store_url, redis_url)
    try:
        summaries = finish(procs)
    finally:
        reap(*procs)
    assert all(s["complete"] for s in summaries)
    assert_exactly_once(store_url, job_server, items)
    assert sum(1 for s in summaries if s["fetched"]) >= 2  # the rate was shared, not one's
    times = sorted(t for t, _ in job_server.arrivals)
    assert len(times) == items
    achieved = (items - 1) / (times[-1] - times[0])
    assert abs(achieved - RATE) <= 0.02 * RATE, achieved  # 4 workers, one budget
    # No burst above the shared rate: at most RATE * 2 + 1 grants in any 2 s, plus what the
    # upstream's own scheduling can bunch into a window's edge (its arrival times lag the grants
    # by up to ~100 ms on a busy machine: 10 requests at this rate). Per-process limits would
    # show about 4x.
    busiest = max(bisect.bisect_left(times, t + 2.0) - i for i, t in enumerate(times))
    assert busiest <= 2 * RATE + 1 + 10, busiest
    print(f"achieved {achieved:.2f}/s, busiest 2 s {busiest}")


def test_a_retry_after_seen_by_one_worker_pauses_all(
    job_server: JobServer, store_url: str, redis_url: str, prefix: str, tmp_path: Path
) -> None:
    items = 2 * RATE
    job_server.throttle["/items/100"] = 1  # answered once with 429, Retry-After: 1
    retry = {"max_attempts": 2, "base_delay": 0.01, "max_delay": 0.05}
    job = write_job(tmp_path / "job.yaml", rated_job(job_server.url, items, prefix, retry=retry))
    procs = start_workers(job, store_url, redis_url)
    try:
        summaries = finish(procs)
    finally:
        reap(*procs)
    assert all(s["complete"] for s in summaries) and sum(s["failed"] for s in summaries) == 0
    [(t429, _)] = job_server.throttled
    # Requests granted before the 429 reached its worker may still arrive within a few ms;
    # after that, no worker sends anything until the second is over.
    during = [round(t - t429, 3) for t, _ in job_server.arrivals if t429 + 0.05 <= t < t429 + 0.95]
    assert during == [], during
    after = [t for t, _ in job_server.arrivals if t >= t429 + 0.95]
    assert after and job_server.hits["/items/100"] == 2  # the run went on, the item retried
    assert_exactly_once(store_url, job_server, items)


def test_without_redis_each_worker_has_the_whole_rate(
    job_server: JobServer, store_url: str, tmp_path: Path, prefix: str
) -> None:
    """The contrast that shows the shared budget is Redis' doing: the same job, the redis: key
    taken out, runs at about WORKERS times the rate."""
    items = 4 * RATE
    data = rated_job(job_server.url, items, prefix)
    del data["redis"]
    job = write_job(tmp_path / "job.yaml", data)
    env = {k: v for k, v in os.environ.items() if k != "MXM_DATAIO_REDIS"}
    assert "MXM_DATAIO_REDIS" not in env
    procs = [cli_process(*worker_args(job, store_url), "--json") for _ in range(WORKERS)]
    try:
        summaries = finish(procs)
    finally:
        reap(*procs)
    busy = sum(1 for s in summaries if s["fetched"])
    times = sorted(t for t, _ in job_server.arrivals)
    busiest = max(bisect.bisect_left(times, t + 1.0) - i for i, t in enumerate(times))
    assert busy >= 2 and busiest > 1.5 * RATE, (busy, busiest)
    print(f"without Redis: busiest second {busiest} ({busy} workers fetched)")


@pytest.mark.parametrize(
    ("redis", "message"),
    [
        ("ftp://h/0", "redis.url: a Redis URL is redis://"),
        ({"prefix": "a:b"}, "redis.prefix: prefix must be non-empty"),
        ({"url": "redis://h/0", "on_unavailable": "local"}, "local needs local_share"),
    ],
)
def test_a_bad_redis_key_is_an_invalid_job(
    redis: object, message: str, tmp_path: Path, store_url: str
) -> None:
    job = write_job(tmp_path / "job.yaml", items_job("http://127.0.0.1:9", redis=redis))
    proc = cli_process(*worker_args(job, store_url))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, (out, err)
    assert message in " ".join(err.split()), err
