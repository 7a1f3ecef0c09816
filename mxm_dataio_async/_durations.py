"""Durations as people write them: ``"30d"``, ``"12h"``, ``"90m"``, ``"1d12h"``, a number of
seconds, or a ``timedelta``. Shared by the store's maintenance, the command line and job files."""

from __future__ import annotations

import re
from datetime import timedelta

__all__ = ["Duration", "parse_duration", "seconds_of"]

Duration = timedelta | float | str
"""A timedelta, a number of seconds, or a text like ``"30d"`` (see :func:`parse_duration`)."""

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> timedelta:
    """A duration: ``"30d"``, ``"12h"``, ``"90m"``, ``"2w"``, ``"45s"``, ``"1d12h"``; a bare
    number is seconds."""
    raw = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", raw):
        return timedelta(seconds=float(raw))
    parts = re.findall(r"(\d+(?:\.\d+)?)([smhdw])", raw)
    if not raw or "".join(n + u for n, u in parts) != raw:
        raise ValueError(
            f"invalid duration {text!r}: use a number and a unit (s, m, h, d, w), "
            "e.g. 90m, 12h, 30d, 2w"
        )
    return timedelta(seconds=sum(float(n) * _UNITS[u] for n, u in parts))


def seconds_of(value: Duration) -> float:
    """``value`` in seconds."""
    if isinstance(value, str):
        return parse_duration(value).total_seconds()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"a duration is a timedelta, seconds or a text like '30d', not {value!r}")
    return float(value)
