"""The states an object with an explicit lifecycle goes through (httpx's ``ClientState``).

``Store`` and ``AsyncSession`` are created UNOPENED, OPEN once entered, CLOSED after ``aclose()``
(or a failed enter); a CLOSED object is never reopened: make a new one.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["State"]


class State(StrEnum):
    UNOPENED = "unopened"
    OPEN = "open"
    CLOSED = "closed"

    def describe(self) -> str:
        """The state as the end of a sentence: ``"... was closed"``."""
        return "was closed" if self is State.CLOSED else "is not open yet"
