"""Date chunking: split an inclusive date range into consecutive inclusive chunks.

Chunk ``k`` starts at ``start + k * step`` (always counted from ``start``, never from the previous
chunk, so month ends do not drift) and ends the day before chunk ``k + 1`` starts; the last chunk
is clipped to ``end``. Adding months keeps the day of the month, clamped to the month's last day:
``2024-01-31 + 1mo = 2024-02-29``. So chunks never overlap, never leave a gap, and cover exactly
``start..end``. Counting is arithmetic (O(1)), so a plan can be sized without iterating it.
"""

from __future__ import annotations

import calendar
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Final, Literal

from mxm_dataio_async._durations import UNITS, split_terms

__all__ = ["Chunk", "add_months", "count_chunks", "date_chunks", "parse_chunk"]

Unit = Literal["d", "w", "mo", "y"]
_UNITS: Final = ("d", "w", "mo", "y")
_HINT: Final = (
    "use a positive whole number and one unit: d (days), w (weeks), mo (calendar months) or "
    "y (calendar years), e.g. 30d, 2w, 1mo, 1y"
)
_ONE_DAY: Final = timedelta(days=1)


@dataclass(frozen=True, slots=True)
class Chunk:
    """A chunk length: ``count`` units of ``d`` (days), ``w`` (weeks), ``mo`` (calendar months)
    or ``y`` (calendar years); the grammar is the package's (``_durations.py``).
    ``str(Chunk(30, "d")) == "30d"``."""

    count: int
    unit: Unit

    def __post_init__(self) -> None:
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise ValueError(f"a chunk must be positive, got {self.count!r}{self.unit}")
        if self.unit not in _UNITS:
            also = " ('m'/'M' is ambiguous: mo is months)" if self.unit in ("m", "M") else ""
            raise ValueError(f"unknown chunk unit {self.unit!r}; use one of d, w, mo, y{also}")

    def __str__(self) -> str:
        return f"{self.count}{self.unit}"

    @property
    def months(self) -> int | None:
        """The step in months (``mo``, ``y``), or None for a fixed number of days."""
        if self.unit == "mo":
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
    """``"30d"``, ``"2w"``, ``"1mo"`` (calendar month), ``"1y"`` -> ``Chunk``, else ValueError.

    The units are those of the package's one grammar (``_durations.py``): ``m``/``M`` are refused
    as ambiguous, and a chunk is whole days or more (no ``s``, ``min`` or ``h``)."""
    if isinstance(text, Chunk):
        return text
    if not isinstance(text, str):
        raise ValueError(f"a chunk is text such as '30d' or '1mo', got {text!r}; {_HINT}")
    raw = text.strip()
    sign, body = (raw[0], raw[1:]) if raw[:1] in ("+", "-") else ("", raw)
    terms = split_terms(body, "chunk", _HINT, "write {n}mo for calendar months")
    if len(terms) != 1:
        raise ValueError(f"invalid chunk {text!r}: one unit per chunk (e.g. 18mo, not 1y6mo)")
    number, unit = terms[0]
    if unit not in _UNITS:
        raise ValueError(
            f"invalid chunk {text!r}: a chunk is whole days or more, not {UNITS[unit][0]}; {_HINT}"
        )
    if not number.isdigit():
        raise ValueError(f"invalid chunk {text!r}: {_HINT}")
    count = -int(number) if sign == "-" else int(number)
    if count < 1:
        raise ValueError(f"chunk must be positive, got {text!r}; {_HINT}")
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


def nth_chunk(start: date, end: date, chunk: Chunk | str, k: int) -> tuple[date, date]:
    """Chunk ``k`` of ``date_chunks(start, end, chunk)``, computed without iterating."""
    step = parse_chunk(chunk)
    first = _chunk_start(start, k, step) if k >= 0 else None
    if first is None or first > end:
        raise IndexError(f"chunk {k} is outside {start}..{end} by {chunk}")
    following = _chunk_start(start, k + 1, step)
    return first, end if following is None or following > end else following - _ONE_DAY


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
