"""One grammar for durations and date chunks: ``min`` is minutes, ``mo`` is months, ``m``/``M``
are refused as ambiguous, and calendar units are refused where a fixed length is needed."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from mxm_dataio_async._durations import parse_duration, seconds_of
from mxm_dataio_async.jobs import Chunk, JobConfigError, job_from_data, parse_chunk


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("45s", timedelta(seconds=45)),
        ("15min", timedelta(minutes=15)),
        ("15MIN", timedelta(minutes=15)),
        ("12h", timedelta(hours=12)),
        ("30d", timedelta(days=30)),
        ("2w", timedelta(weeks=2)),
        ("1d12h", timedelta(days=1, hours=12)),
        ("1h30min", timedelta(minutes=90)),
        ("1.5h", timedelta(minutes=90)),
        (" 45 ", timedelta(seconds=45)),
    ],
)
def test_durations(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected
    assert seconds_of(text) == expected.total_seconds()


@pytest.mark.parametrize("text", ["1M", "1m", "90m", "1d30m"])
def test_m_is_ambiguous_in_a_duration(text: str) -> None:
    """Regression: ``1M`` was a minute (``prune --older-than 1M`` deleted nearly everything)."""
    with pytest.raises(ValueError, match=r"ambiguous .*write \d+min for minutes .*30d"):
        parse_duration(text)


@pytest.mark.parametrize(("text", "instead"), [("1mo", "30d"), ("2MO", "30d"), ("1y", "365d")])
def test_calendar_units_have_no_fixed_length(text: str, instead: str) -> None:
    with pytest.raises(ValueError, match=f"no fixed length in seconds; write days .*{instead}"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1mo", Chunk(1, "mo")),
        ("3MO", Chunk(3, "mo")),
        ("1y", Chunk(1, "y")),
        ("2Y", Chunk(2, "y")),
        ("2W", Chunk(2, "w")),
    ],
)
def test_chunks_use_the_same_units(text: str, expected: Chunk) -> None:
    assert parse_chunk(text) == expected
    if expected.unit in ("mo", "y"):
        assert expected.months == expected.count * (12 if expected.unit == "y" else 1)


@pytest.mark.parametrize("text", ["1M", "1m"])
def test_m_is_ambiguous_in_a_chunk(text: str) -> None:
    """Regression: ``1M`` was a month in a chunk but a minute in a duration."""
    with pytest.raises(ValueError, match=r"ambiguous .*write 1mo for calendar months"):
        parse_chunk(text)
    with pytest.raises(ValueError, match="ambiguous"):
        Chunk(1, text[-1])  # type: ignore[arg-type]


def test_a_job_ttl_takes_the_same_durations(tmp_path: Path) -> None:
    def job(ttl: object) -> dict[str, object]:
        return {
            "job": "j",
            "sources": {"s": {"adapter": "http", "base_url": "http://127.0.0.1:1"}},
            "requests": [{"source": "s", "kind": "k", "endpoint": "/x", "ttl": ttl}],
        }

    config = job_from_data(job("15min"), base_dir=tmp_path)
    assert config.requests[0].ttl == 900
    assert job_from_data(job(90), base_dir=tmp_path).requests[0].ttl == 90
    for ttl, problem in (("1M", "ambiguous"), ("1mo", "no fixed length"), ("1y", "365d")):
        with pytest.raises(JobConfigError, match=problem) as info:
            job_from_data(job(ttl), base_dir=tmp_path)
        assert info.value.key == "requests[0].ttl"
