"""Operating a job: the CLI's logs (-v, --log-json) and the YAML keys for breakers, adaptive
rate limits and stale-if-error."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import mxm_dataio_async as dio
from mxm_dataio_async.jobs import load_job
from mxm_dataio_async.jobs._sources import register_sources
from tests.jobs.conftest import JobServer, cli, write_job


def items_job(url: str, n: int = 3, **source: Any) -> dict[str, Any]:
    return {
        "job": "items",
        "store": "./dataio",
        "sources": {
            "items": {
                "adapter": "http",
                "base_url": url,
                "retry": {"max_attempts": 3, "base_delay": 0, "jitter": 0},
                **source,
            }
        },
        "requests": [
            {
                "source": "items",
                "kind": "item",
                "endpoint": "/items/{n}",
                "expand": {"n": list(range(n))},
            }
        ],
    }


def test_log_json_shows_retries_as_json_lines(job_server: JobServer, tmp_path: Path) -> None:
    job_server.throttle["/items/1"] = 0  # one 429 (Retry-After: 0), then an answer
    path = write_job(tmp_path / "job.yaml", items_job(job_server.url))
    done = cli("--log-json", "run", str(path), "--json")
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    retry = next(line for line in lines if line.get("event") == "RetryScheduled")
    assert (retry["source"], retry["kind"], retry["status"], retry["attempt"]) == (
        "items",
        "item",
        429,
        1,
    )
    assert retry["logger"] == "mxm_dataio_async.fetch" and len(retry["request_hash"]) == 64
    quiet = cli("run", str(path), "--json")  # all cached now; and no logs without -v
    assert quiet.returncode == 0 and "RetryScheduled" not in quiet.stderr


def test_verbose_shows_the_logs_as_text(job_server: JobServer, tmp_path: Path) -> None:
    job_server.throttle["/items/2"] = 0
    path = write_job(tmp_path / "job.yaml", items_job(job_server.url))
    done = cli("run", str(path), "-v")
    assert done.returncode == 0, done.stderr
    assert "INFO mxm_dataio_async.fetch: retry items/item" in done.stderr


@pytest.mark.anyio
async def test_yaml_breaker_adaptive_and_stale_if_error(tmp_path: Path) -> None:
    data = items_job(
        "http://127.0.0.1:9",
        rate_limit={"rate": 20, "adaptive": True},
        breaker={"failures": 3, "reset_after": 10},
        stale_if_error=True,
    )
    config = load_job(write_job(tmp_path / "job.yaml", data))
    assert config.sources["items"].stale_if_error is True
    async with dio.Registry() as registry:
        await register_sources(registry, config, ["items"])
        entry = registry.entry("items")
        assert entry.adaptive and entry.circuit is not None
        assert entry.circuit.config == dio.CircuitBreaker(failures=3, reset_after=10.0)


def test_yaml_refuses_a_bad_breaker(tmp_path: Path) -> None:
    data = items_job("http://127.0.0.1:9", breaker={"failures": 0, "reset": 3})
    done = cli("run", str(write_job(tmp_path / "job.yaml", data)))
    assert done.returncode == 2
    assert "breaker" in done.stderr and "reset" in done.stderr


def test_stats_every_writes_json_lines_and_progress_shows_retries(
    job_server: JobServer, tmp_path: Path
) -> None:
    job_server.throttle["/items/0"] = 0
    data = items_job(job_server.url, n=5, breaker={"failures": 5, "reset_after": 30})
    path = write_job(tmp_path / "job.yaml", data)
    done = cli("run", str(path), "--json", "--stats-every", "0.1")
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.startswith('{"stats"')]
    assert lines, done.stderr
    stats = lines[-1]["stats"]
    assert stats["source"] == "items" and stats["breaker"] == "closed"
    assert {"requests", "fetched", "cache_hits", "retries", "failures", "bytes", "rate"} <= set(
        stats
    )
    assert {"limiter_wait", "gate"} <= set(stats) and lines[-1]["total"] == 5
    job_server.throttle["/items/1"] = 0
    data["requests"][0]["cache_mode"] = "bypass"
    shown = cli("run", str(write_job(path, data)))
    assert shown.returncode == 0, shown.stderr
    assert "retries 1 wait" in shown.stderr


def test_yaml_http_freshness(tmp_path: Path) -> None:
    data = items_job("http://127.0.0.1:9", http_freshness=True)
    assert load_job(write_job(tmp_path / "job.yaml", data)).sources["items"].http_freshness


@pytest.mark.anyio
async def test_progress_every_reports_a_source_while_nothing_finishes(
    job_server: JobServer, tmp_path: Path
) -> None:
    import anyio

    from mxm_dataio_async.jobs import run_job

    job_server.pause()  # every answer held: no request finishes for a while
    seen: list[Any] = []
    while_paused: list[Any] = []

    async def resume_later() -> None:
        await anyio.sleep(0.6)
        while_paused.extend(seen)  # after the resume a tick may see answers not yet done
        job_server.resume()

    path = write_job(tmp_path / "job.yaml", items_job(job_server.url, n=4))
    async with anyio.create_task_group() as tg:
        tg.start_soon(resume_later)
        summary = await run_job(path, on_progress=seen.append, progress_every=0.1)
    assert summary.ok
    stalled = [s for s in while_paused if s.done == 0 and s.statistics is not None]
    assert len(stalled) >= 3  # the ticks, not only the source's start
    assert stalled[-1].statistics.requests == 4 and stalled[-1].statistics.fetched == 0
