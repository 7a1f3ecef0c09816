"""``JobPlan.at(i)``: the i-th planned request, computed without iterating (workers sharing a run
address requests by plan index), always the same as iterating the plan."""

from __future__ import annotations

from datetime import date
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mxm_dataio_async.jobs import JobPlan, job_from_data
from mxm_dataio_async.jobs._dates import date_chunks, nth_chunk

URL = "http://127.0.0.1:9"


def _job(requests: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "job": "indexed",
        "sources": {"a": {"adapter": "http", "base_url": URL}, "b": {"adapter": "http"}},
        "requests": requests,
    }


REQUESTS: list[dict[str, Any]] = [
    {
        "source": "a",
        "kind": "bars",
        "endpoint": "/bars/{symbol}/{venue}",
        "params": {"start": "{start}", "end": "{end}"},
        "expand": {
            "symbol": ["X", "Y", "Z"],
            "venue": ["L", "N"],
            "dates": {"start": "2024-01-31", "end": "2024-12-15", "chunk": "1mo"},
        },
    },
    {"source": "b", "kind": "one", "endpoint": "http://127.0.0.1:9/one"},
    {
        "source": "a",
        "kind": "days",
        "endpoint": "/d",
        "params": {"day": "{start}", "n": "{n}"},
        "expand": {
            "dates": {"start": "2024-02-25", "end": "2024-03-04", "chunk": "3d"},
            "n": [1, 2],
        },
    },
]


@pytest.mark.parametrize("limit", [None, 0, 1, 50, 71, 72, 80, 1000])
@pytest.mark.parametrize("only", [None, "a", "b"])
def test_at_is_the_same_as_iterating(limit: int | None, only: str | None) -> None:
    plan = JobPlan(job_from_data(_job(REQUESTS)), limit=limit, only=only, today=date(2024, 6, 1))
    listed = list(plan)
    assert len(listed) == plan.total
    assert [plan.at(i) for i in range(plan.total)] == listed
    with pytest.raises(IndexError, match="out of range"):
        plan.at(plan.total)
    with pytest.raises(IndexError):
        plan.at(-1)


def test_a_far_index_is_computed_not_iterated() -> None:
    data = _job(
        [
            {
                "source": "a",
                "kind": "k",
                "endpoint": "/x/{i}/{start}",
                "expand": {
                    "i": list(range(1000)),
                    "dates": {"start": "1900-01-01", "end": "2099-12-31", "chunk": "1d"},
                },
            }
        ]
    )
    plan = JobPlan(job_from_data(data))
    assert plan.total == 1000 * 73049  # 73 million: iterating to the end would take minutes
    last = plan.at(plan.total - 1)
    assert last.endpoint == "/x/999/2099-12-31"
    assert plan.at(73049).endpoint == "/x/1/1900-01-01"


@settings(max_examples=200, deadline=None)
@given(
    start=st.dates(min_value=date(1990, 1, 1), max_value=date(2030, 12, 31)),
    days=st.integers(min_value=0, max_value=900),
    n=st.integers(min_value=1, max_value=40),
    unit=st.sampled_from(["d", "w", "mo", "y"]),
)
def test_nth_chunk_matches_date_chunks(start: date, days: int, n: int, unit: str) -> None:
    end = date.fromordinal(start.toordinal() + days)
    chunks = list(date_chunks(start, end, f"{n}{unit}"))
    assert [nth_chunk(start, end, f"{n}{unit}", k) for k in range(len(chunks))] == chunks
    with pytest.raises(IndexError):
        nth_chunk(start, end, f"{n}{unit}", len(chunks))


def test_a_new_optional_request_key_leaves_the_config_hash_as_it_was() -> None:
    """Workers of two releases share a run: a release that adds an optional request key (as
    parse:, validate: and dataset: were added) plans the same requests, so the hash is the same
    while the key is left unset; a key that changes which requests are planned changes it."""
    from pydantic import Field, create_model

    from mxm_dataio_async.jobs import JobConfig, config_hash
    from mxm_dataio_async.jobs._config import RequestSpec

    newer_request = create_model(
        "NewerRequestSpec", __base__=RequestSpec, added=(str | None, None), flag=(bool, False)
    )
    newer_job = create_model(
        "NewerJobConfig",
        __base__=JobConfig,
        requests=(list[newer_request], Field(min_length=1)),  # type: ignore[valid-type]
    )

    def data(**request: Any) -> dict[str, Any]:
        entry = {"source": "s", "kind": "k", "endpoint": "/x/{n}", "expand": {"n": [1, 2]}}
        return {
            "job": "j",
            "sources": {"s": {"adapter": "http", "base_url": "http://127.0.0.1:9"}},
            "requests": [entry | request],
        }

    def hashed(config: JobConfig) -> str:
        return config_hash(config, JobPlan(config))

    today = hashed(job_from_data(data()))
    assert hashed(newer_job.model_validate(data())) == today
    assert hashed(newer_job.model_validate(data(added="x"))) != today
    assert hashed(job_from_data(data(endpoint="/y/{n}"))) != today
