"""Date chunking: split an inclusive date range into consecutive inclusive chunks.

Chunk ``k`` starts at ``start + k * step`` (always counted from ``start``, never from the previous
chunk, so month ends do not drift) and ends the day before chunk ``k + 1`` starts; the last chunk
is clipped to ``end``. Adding months keeps the day of the month, clamped to the month's last day:
``2024-01-31 + 1M = 2024-02-29``. So chunks never overlap, never leave a gap, and cover exactly
``start..end``. Counting is arithmetic (O(1)), so a plan can be sized without iterating it.
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Final, Literal

__all__ = ["Chunk", "add_months", "count_chunks", "date_chunks", "parse_chunk"]

Unit = Literal["d", "w", "M", "y"]
_UNITS: Final[dict[str, str]] = {
    "d": "days",
    "w": "weeks (7 days)",
    "M": "calendar months",
    "y": "calendar years",
}
_CHUNK_RE: Final = re.compile(r"\s*([+-]?\d+)\s*([A-Za-z]+)\s*")
_ONE_DAY: Final = timedelta(days=1)


@dataclass(frozen=True, slots=True)
class Chunk:
    """A chunk length: ``count`` units of ``d`` (days), ``w`` (weeks), ``M`` (months), ``y``
    (years). ``str(Chunk(30, "d")) == "30d"``."""

    count: int
    unit: Unit

    def __post_init__(self) -> None:
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise ValueError(f"a chunk must be positive, got {self.count!r}{self.unit}")
        if self.unit not in _UNITS:
            raise ValueError(f"unknown chunk unit {self.unit!r}; use one of d, w, M, y")

    def __str__(self) -> str:
        return f"{self.count}{self.unit}"

    @property
    def months(self) -> int | None:
        """The step in months (``M``, ``y``), or None for a fixed number of days."""
        if self.unit == "M":
            return self.count
        if self.unit == "y":
            return 12 * self.count
        return None

    @property
    def days(self) -> int | None:
        """The step in days (``d``, ``w``), or None for calendar units."""
        if self.unit == "d":
            return self.count
        if self.unit == "w":
            return 7 * self.count
        return None


def parse_chunk(text: object) -> Chunk:
    """``"30d"``, ``"2w"``, ``"1M"`` (calendar month), ``"1y"`` -> ``Chunk``, else ValueError."""
    if isinstance(text, Chunk):
        return text
    hint = "use a positive whole number and a unit: d (days), w (weeks), M (calendar months) or "
    hint += "y (years), e.g. 30d, 1M"
    if not isinstance(text, str):
        raise ValueError(f"a chunk is text such as '30d' or '1M', got {text!r}; {hint}")
    match = _CHUNK_RE.fullmatch(text)
    if match is None:
        raise ValueError(f"invalid chunk {text!r}; {hint}")
    count, unit = int(match.group(1)), match.group(2)
    if unit == "m":
        raise ValueError(f"invalid chunk {text!r}: 'm' is ambiguous; write M for calendar months")
    if unit not in _UNITS:
        raise ValueError(f"invalid chunk {text!r}: unknown unit {unit!r}; {hint}")
    if count < 1:
        raise ValueError(f"chunk must be positive, got {text!r}; {hint}")
    return Chunk(count, unit)  # type: ignore[arg-type]


def add_months(day: date, months: int) -> date | None:
    """``day`` plus ``months`` calendar months, the day clamped to the month's length; None past
    year 9999."""
    index = day.month - 1 + months
    year = day.year + index // 12
    if year > date.max.year:
        return None
    month = index % 12 + 1
    return date(year, month, min(day.day, calendar.monthrange(year, month)[1]))


def _chunk_start(start: date, k: int, chunk: Chunk) -> date | None:
    """The first day of chunk ``k`` (None if past ``date.max``)."""
    months = chunk.months
    if months is not None:
        return add_months(start, k * months)
    days = chunk.days
    assert days is not None
    try:
        return start + timedelta(days=k * days)
    except OverflowError:
        return None


def date_chunks(start: date, end: date, chunk: Chunk | str) -> Iterator[tuple[date, date]]:
    """Yield ``(first, last)`` (both inclusive) for each chunk of ``start..end``, in order.

    ```python
    list(date_chunks(date(2024, 1, 1), date(2024, 1, 10), "4d"))
    # [(2024-01-01, 2024-01-04), (2024-01-05, 2024-01-08), (2024-01-09, 2024-01-10)]
    ```
    """
    step = parse_chunk(chunk)
    if end < start:
        raise ValueError(f"end {end} is before start {start}")
    first: date | None = start
    k = 0
    while first is not None and first <= end:
        following = _chunk_start(start, k + 1, step)
        last = end if following is None or following > end else following - _ONE_DAY
        yield first, last
        first, k = following, k + 1


def count_chunks(start: date, end: date, chunk: Chunk | str) -> int:
    """How many chunks ``date_chunks(start, end, chunk)`` yields, computed without iterating."""
    step = parse_chunk(chunk)
    if end < start:
        raise ValueError(f"end {end} is before start {start}")
    days = step.days
    if days is not None:
        return (end - start).days // days + 1
    months = step.months
    assert months is not None
    # The last k whose chunk starts on or before ``end``: estimate from the month difference,
    # then correct for day-of-month clamping (at most one step either way).
    k = ((end.year - start.year) * 12 + end.month - start.month) // months

    def starts_by_end(i: int) -> bool:
        first = add_months(start, i * months)
        return first is not None and first <= end

    while starts_by_end(k + 1):
        k += 1
    while k > 0 and not starts_by_end(k):
        k -= 1
    return k + 1
