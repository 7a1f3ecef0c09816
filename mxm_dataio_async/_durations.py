"""Durations and date steps: one grammar for the whole package (the store's maintenance, the
command line and job files).

A text is one or more ``<number><unit>`` terms written together (``"90s"``, ``"15min"``,
``"1d12h"``, ``"1.5h"``); units are case-insensitive:

- ``s``: seconds; ``min``: minutes; ``h``: hours (durations only);
- ``d``: days (24 hours); ``w``: weeks (7 days) (durations and date chunks);
- ``mo``: calendar months; ``y``: calendar years (date chunks only).

``m`` (or ``M``) is refused everywhere: minutes or months? Write ``min`` or ``mo``.

A *duration* (``prune --older-than``, ``--grace``, a job's ``ttl``) is a fixed length of time;
a bare number is seconds. Months and years are refused there, since a calendar month or year is
no fixed number of seconds: write days (``30d``, ``365d``). A *date chunk* (a job's ``chunk:``,
see ``jobs/_dates.py``) is one whole number of ``d``, ``w``, ``mo`` or ``y``.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Final

__all__ = [
    "CALENDAR_UNITS",
    "DURATION_HINT",
    "UNITS",
    "Duration",
    "parse_duration",
    "seconds_of",
    "split_terms",
]

Duration = timedelta | float | str
"""A timedelta, a number of seconds, or a text like ``"30d"`` (see :func:`parse_duration`)."""

#: Every unit of the grammar: its meaning, and its length in seconds (None: a calendar unit).
UNITS: Final[dict[str, tuple[str, int | None]]] = {
    "s": ("seconds", 1),
    "min": ("minutes", 60),
    "h": ("hours", 3600),
    "d": ("days", 86400),
    "w": ("weeks", 7 * 86400),
    "mo": ("calendar months", None),
    "y": ("calendar years", None),
}
CALENDAR_UNITS: Final = frozenset(u for u, (_, seconds) in UNITS.items() if seconds is None)
_AMBIGUOUS: Final = frozenset({"m"})
_TERM: Final = re.compile(r"(\d+(?:\.\d+)?)([a-z]+)")

DURATION_HINT: Final = (
    "use a number and a unit: s, min, h, d or w (e.g. 90s, 15min, 12h, 30d, 2w, 1d12h); "
    "a bare number is seconds"
)


def split_terms(text: str, what: str, hint: str, ambiguous: str) -> list[tuple[str, str]]:
    """``"1d12h"`` -> ``[("1", "d"), ("12", "h")]`` (units lowercased, checked against
    :data:`UNITS`); ``ValueError`` naming ``what`` (``"duration"``, ``"chunk"``) otherwise.

    ``hint`` says what to write; ``ambiguous`` (with ``{n}`` for the number) is the advice for
    an ``m``/``M`` unit."""
    raw = text.strip()
    low = raw.lower()
    matches = list(_TERM.finditer(low))
    terms = [(m.group(1), m.group(2)) for m in matches]
    if not low or "".join(n + u for n, u in terms) != low:
        raise ValueError(f"invalid {what} {text!r}: {hint}")
    for match, (number, unit) in zip(matches, terms, strict=True):
        if unit in _AMBIGUOUS:
            written = raw[match.start() : match.end()] if len(raw) == len(low) else number + unit
            advice = ambiguous.format(n=number)
            raise ValueError(
                f"invalid {what} {text!r}: {written!r} is ambiguous (minutes or months?); {advice}"
            )
        if unit not in UNITS:
            raise ValueError(f"invalid {what} {text!r}: unknown unit {unit!r}; {hint}")
    return terms


def parse_duration(text: str) -> timedelta:
    """A fixed length of time: ``"45s"``, ``"15min"``, ``"12h"``, ``"30d"``, ``"2w"``,
    ``"1d12h"``, ``"1.5h"``; a bare number is seconds. ``m``/``M`` are refused as ambiguous, and
    ``mo``/``y`` because a calendar month or year is no fixed number of seconds."""
    raw = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", raw):
        return timedelta(seconds=float(raw))
    terms = split_terms(
        text,
        "duration",
        DURATION_HINT,
        "write {n}min for minutes (a month has no fixed length: write days, e.g. 30d)",
    )
    seconds = 0.0
    for number, unit in terms:
        meaning, length = UNITS[unit]
        if length is None:
            days = "365d" if unit == "y" else "30d"
            raise ValueError(
                f"invalid duration {text!r}: {number}{unit} ({meaning}) has no fixed length in "
                f"seconds; write days instead, e.g. {days}"
            )
        seconds += float(number) * length
    return timedelta(seconds=seconds)


def seconds_of(value: Duration) -> float:
    """``value`` in seconds."""
    if isinstance(value, str):
        return parse_duration(value).total_seconds()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"a duration is a timedelta, seconds or a text like '30d', not {value!r}")
    return float(value)
