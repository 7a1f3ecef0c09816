"""Expansion: order, placeholders, limits, and laziness (a 10-million-request plan)."""

from __future__ import annotations

import itertools
import time
import tracemalloc
from datetime import date
from pathlib import Path
from typing import Any

import pytest

import mxm_dataio_async as dio
from mxm_dataio_async._request import build_request
from mxm_dataio_async.jobs import JobPlan, job_from_data

TODAY = date(2025, 10, 27)


def job(*requests: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {
        "job": "j",
        "sources": {"s": {"adapter": "http", "base_url": "http://127.0.0.1:9"}},
        "requests": list(requests),
        **top,
    }


def plan_of(*requests: dict[str, Any], **kwargs: Any) -> JobPlan:
    return JobPlan(job_from_data(job(*requests)), today=TODAY, **kwargs)


def test_product_in_written_order_last_fastest_and_entries_in_file_order() -> None:
    plan = plan_of(
        {
            "source": "s",
            "kind": "k",
            "endpoint": "/{a}/{b}/{start}",
            "expand": {
                "a": ["x", "y"],
                "dates": {"start": "2024-01-01", "end": "2024-01-02", "chunk": "1d"},
                "b": [1, 2],
            },
        },
        {"source": "s", "kind": "plain", "endpoint": "/plain"},
    )
    assert plan.total == 9 and plan.count("s") == 9 and plan.sources == ("s",)
    assert [r.endpoint for r in plan] == [
        "/x/1/2024-01-01",
        "/x/2/2024-01-01",
        "/x/1/2024-01-02",
        "/x/2/2024-01-02",
        "/y/1/2024-01-01",
        "/y/2/2024-01-01",
        "/y/1/2024-01-02",
        "/y/2/2024-01-02",
        "/plain",
    ]
    assert [r.entry for r in plan] == [0] * 8 + [1]
    limited = plan_of(
        {"source": "s", "kind": "k", "endpoint": "/{a}", "expand": {"a": [1, 2, 3]}},
        {"source": "s", "kind": "k", "endpoint": "/b/{a}", "expand": {"a": [1, 2, 3]}},
        limit=4,
    )
    assert [r.endpoint for r in limited] == ["/1", "/2", "/3", "/b/1"]
    assert limited.total == 4
    assert plan_of({"source": "s", "kind": "k"}, limit=0).total == 0


def test_placeholder_rendering_rules() -> None:
    (r,) = plan_of(
        {
            "source": "s",
            "kind": "k",
            "endpoint": "/{sym}/{flag}/{{literal}}/{start:%Y%m%d}",
            "params": {
                "page": "{page}",  # exactly one placeholder: keeps the int
                "day": "{start}",  # a date: ISO text
                "label": "p{page:03d}",
                "on": "{flag}",
                "fixed": 7,
                "escaped": "{{x}}",
                "when": "{today}",
                "who": "{job}",
            },
            "body": {"q": ["{sym}", {"n": "{page}"}], "d": date(2024, 5, 6)},
            "as_of_bucket": "{today:%Y-%m}",
            "cache_tag": "{sym}",
            "expand": {
                "sym": ["A"],
                "page": [5],
                "flag": [True],
                "dates": {"start": "2024-02-03", "end": "2024-02-03"},
            },
        }
    )
    assert r.endpoint == "/A/true/{literal}/20240203"
    assert r.params == {
        "page": 5,
        "day": "2024-02-03",
        "label": "p005",
        "on": True,
        "fixed": 7,
        "escaped": "{x}",
        "when": "2025-10-27",
        "who": "j",
    }
    assert r.body == {"q": ["A", {"n": 5}], "d": "2024-05-06"}
    assert (r.as_of_bucket, r.cache_tag) == ("2025-10", "A")
    assert r.values["start"] == date(2024, 2, 3) and r.values["today"] == TODAY


@pytest.mark.anyio
async def test_planned_requests_build_the_identity_build_request_computes(
    tmp_path: Path,
) -> None:
    plan = plan_of(
        {
            "source": "s",
            "kind": "bars",
            "endpoint": "/bars/{sym}",
            "params": {"from": "{start}"},
            "method": "post",
            "body": {"x": "{sym}"},
            "cache_mode": "bypass",
            "ttl": "1h",
            "as_of_bucket": "b",
            "headers": {"X-Api-Key": "k"},
            "expand": {"sym": ["A", "B"], "dates": {"start": "2024-01-01", "end": "2024-01-01"}},
        }
    )
    registry = dio.Registry()
    registry.register("s", dio.MockAdapter())
    async with dio.AsyncSession("s", root=str(tmp_path), registry=registry) as session:
        for planned in plan:
            req = planned.build(session)
            sym = planned.values["sym"]
            independent = build_request(
                session_id="x",
                source="s",
                kind="bars",
                endpoint=f"/bars/{sym}",
                params={"from": "2024-01-01"},
                method="POST",
                body={"x": sym},
                as_of_bucket="b",
            )
            assert req.hash == independent.hash
            assert (req.cache_mode, req.ttl_seconds) == (dio.CacheMode.BYPASS, 3600.0)
            assert req.headers == {"X-Api-Key": "k"}
            assert planned.to_json()["headers"] == {"X-Api-Key": "[REDACTED]"}


def test_ten_million_requests_are_planned_lazily() -> None:
    started = time.perf_counter()
    plan = plan_of(
        {
            "source": "s",
            "kind": "bars",
            "endpoint": "/bars/{sym}",
            "params": {"d": "{start}"},
            "expand": {
                "sym": [f"S{i:05d}" for i in range(10_000)],
                "dates": {"start": "2000-01-01", "end": "2002-09-26", "chunk": "1d"},
            },
        }
    )
    assert plan.total == 10_000_000
    first = list(itertools.islice(plan, 3))
    assert time.perf_counter() - started < 5
    assert [(r.endpoint, r.params) for r in first] == [
        ("/bars/S00000", {"d": "2000-01-01"}),
        ("/bars/S00000", {"d": "2000-01-02"}),
        ("/bars/S00000", {"d": "2000-01-03"}),
    ]
    # Memory stays flat while iterating: nothing is kept behind the cursor.
    tracemalloc.start()
    try:
        it = iter(plan)
        for _ in itertools.islice(it, 5_000):
            pass
        base = tracemalloc.get_traced_memory()[0]
        for _ in itertools.islice(it, 50_000):
            pass
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert current - base < 256 * 1024
    assert peak - base < 1024 * 1024


def test_only_and_sources() -> None:
    data = job(
        {"source": "s", "kind": "k", "endpoint": "/a"},
        {"source": "t", "kind": "k", "endpoint": "/{n}", "expand": {"n": [1, 2]}},
    )
    data["sources"]["t"] = {"adapter": "http"}
    config = job_from_data(data)
    assert JobPlan(config).sources == ("s", "t")
    only = JobPlan(config, only="t")
    assert only.sources == ("t",) and only.total == 2 and only.count("s") == 0
    assert [r.endpoint for r in only.for_source("t")] == ["/1", "/2"]
    with pytest.raises(ValueError, match="limit must be >= 0"):
        JobPlan(config, limit=-1)
