"""Date chunking: calendar-correct, inclusive, no gap, no overlap (hypothesis properties)."""

from __future__ import annotations

import calendar
import itertools
from datetime import date, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mxm_dataio_async.jobs import Chunk, count_chunks, date_chunks, parse_chunk

DAY = timedelta(days=1)


def months_later(day: date, months: int) -> date:
    """Independent of the implementation: step month by month, then clamp the day."""
    year, month = day.year, day.month
    for _ in range(months):
        month += 1
        if month == 13:
            year, month = year + 1, 1
    return date(year, month, min(day.day, calendar.monthrange(year, month)[1]))


def chunk_start(start: date, k: int, chunk: Chunk) -> date:
    if chunk.unit == "d":
        return start + timedelta(days=k * chunk.count)
    if chunk.unit == "w":
        return start + timedelta(days=7 * k * chunk.count)
    return months_later(start, k * chunk.count * (12 if chunk.unit == "y" else 1))


chunks = st.builds(Chunk, st.integers(1, 60), st.sampled_from(["d", "w", "mo", "y"]))


@settings(deadline=None)  # a slow CI machine is not a failure
@given(
    start=st.dates(min_value=date(1900, 1, 1), max_value=date(2300, 12, 31)),
    length=st.integers(0, 2000),
    chunk=chunks,
)
def test_chunks_cover_the_range_in_order_without_gap_or_overlap(
    start: date, length: int, chunk: Chunk
) -> None:
    end = start + timedelta(days=length)
    got = list(date_chunks(start, end, chunk))
    assert got[0][0] == start and got[-1][1] == end  # both ends included
    assert all(first <= last for first, last in got)
    for (_, last), (first, _) in itertools.pairwise(got):
        assert first == last + DAY  # the next chunk starts the day after: no gap, no overlap
    days = [d for first, last in got for d in _days(first, last)]
    assert days == list(_days(start, end))  # the union is exactly the range, each day once
    assert count_chunks(start, end, chunk) == len(got)
    for k, (first, last) in enumerate(got):
        assert first == chunk_start(start, k, chunk)
        if k < len(got) - 1:
            assert last == chunk_start(start, k + 1, chunk) - DAY
            span = (last - first).days + 1
            if chunk.unit in ("d", "w"):
                assert span == chunk.count * (7 if chunk.unit == "w" else 1)
            else:
                months = chunk.count * (12 if chunk.unit == "y" else 1)
                assert 28 * months - 3 <= span <= 31 * months + 3
        else:
            assert last <= chunk_start(start, k + 1, chunk) - DAY  # the last one is clipped


def _days(first: date, last: date) -> list[date]:
    return [first + timedelta(days=i) for i in range((last - first).days + 1)]


@settings(deadline=None)
@given(
    start=st.dates(min_value=date(1, 1, 1), max_value=date(9999, 12, 31)),
    length=st.integers(0, 4_000_000),
    chunk=chunks,
)
def test_count_is_arithmetic_and_matches_the_chunks(start: date, length: int, chunk: Chunk) -> None:
    end = min(start + timedelta(days=min(length, (date.max - start).days)), date.max)
    n = count_chunks(start, end, chunk)
    if n <= 5_000:
        assert n == len(list(date_chunks(start, end, chunk)))
    else:  # too many to list: the last chunk counted still starts on or before end
        assert chunk_start(start, n - 1, chunk) <= end


def test_month_ends_clamp_and_do_not_drift() -> None:
    got = list(date_chunks(date(2024, 1, 31), date(2024, 6, 30), "1mo"))
    assert got == [
        (date(2024, 1, 31), date(2024, 2, 28)),
        (date(2024, 2, 29), date(2024, 3, 30)),
        (date(2024, 3, 31), date(2024, 4, 29)),
        (date(2024, 4, 30), date(2024, 5, 30)),
        (date(2024, 5, 31), date(2024, 6, 29)),
        (date(2024, 6, 30), date(2024, 6, 30)),
    ]


def test_calendar_months_and_years_from_the_first() -> None:
    months = list(date_chunks(date(2024, 1, 1), date(2024, 12, 31), "1mo"))
    assert len(months) == 12
    assert [(a.month, a.day, b.day) for a, b in months][:3] == [(1, 1, 31), (2, 1, 29), (3, 1, 31)]
    quarters = list(date_chunks(date(2023, 1, 1), date(2023, 12, 31), "3mo"))
    assert [b for _, b in quarters] == [
        date(2023, 3, 31),
        date(2023, 6, 30),
        date(2023, 9, 30),
        date(2023, 12, 31),
    ]
    assert list(date_chunks(date(2024, 2, 29), date(2026, 3, 1), "1y")) == [
        (date(2024, 2, 29), date(2025, 2, 27)),
        (date(2025, 2, 28), date(2026, 2, 27)),
        (date(2026, 2, 28), date(2026, 3, 1)),
    ]


def test_thirty_day_chunks_of_2024() -> None:
    got = list(date_chunks(date(2024, 1, 1), date(2024, 12, 31), "30d"))
    assert len(got) == 13 == count_chunks(date(2024, 1, 1), date(2024, 12, 31), "30d")
    assert got[0] == (date(2024, 1, 1), date(2024, 1, 30))
    assert got[-1] == (date(2024, 12, 26), date(2024, 12, 31))


def test_edges() -> None:
    one = date(2024, 5, 5)
    assert list(date_chunks(one, one, "1d")) == [(one, one)]
    assert list(date_chunks(one, one + 3 * DAY, "1y")) == [(one, one + 3 * DAY)]
    assert list(date_chunks(date(2024, 1, 1), date(2024, 1, 14), "1w")) == [
        (date(2024, 1, 1), date(2024, 1, 7)),
        (date(2024, 1, 8), date(2024, 1, 14)),
    ]
    # At the end of the calendar, the next chunk start does not exist: the last is clipped.
    assert len(list(date_chunks(date(9999, 1, 1), date.max, "1mo"))) == 12
    assert count_chunks(date(9999, 1, 1), date.max, "1mo") == 12
    assert list(date_chunks(date.max - 2 * DAY, date.max, "2d")) == [
        (date.max - 2 * DAY, date.max - DAY),
        (date.max, date.max),
    ]
    with pytest.raises(ValueError, match="before start"):
        list(date_chunks(one, one - DAY, "1d"))
    with pytest.raises(ValueError, match="before start"):
        count_chunks(one, one - DAY, "1d")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30d", Chunk(30, "d")),
        (" 2w ", Chunk(2, "w")),
        ("1mo", Chunk(1, "mo")),
        ("1y", Chunk(1, "y")),
    ],
)
def test_parse_chunk(text: str, expected: Chunk) -> None:
    assert parse_chunk(text) == expected
    assert str(expected) == text.strip()


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("0d", "chunk must be positive"),
        ("-1mo", "chunk must be positive"),
        ("1m", "'1m' is ambiguous .*write 1mo for calendar months"),
        ("1M", "'1M' is ambiguous .*write 1mo for calendar months"),
        ("12h", "whole days or more, not hours"),
        ("90min", "whole days or more, not minutes"),
        ("1y6mo", "one unit per chunk"),
        ("1q", "unknown unit"),
        ("d", "invalid chunk"),
        ("", "invalid chunk"),
        ("1.5d", "invalid chunk"),
        (30, "a chunk is text"),
    ],
)
def test_bad_chunks(text: object, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_chunk(text)
    with pytest.raises(ValueError, match="positive"):
        Chunk(0, "d")
