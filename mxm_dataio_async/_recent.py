"""A bounded map of recent entries: two generations of plain dicts.

When the young generation fills (by count, or by weight where a ``weigh`` function is given), it
becomes the old one and the old one is dropped, so between one and two generations' worth of the
most recent entries are kept. O(1) per operation and ~5x cheaper per insert than an LRU
``OrderedDict``; the price is that eviction is by generation, not by entry.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["Recent"]

K = TypeVar("K")
V = TypeVar("V")


class Recent(Generic[K, V]):
    """At most ``2 * max_items`` entries and, with ``weigh``, about ``2 * max_weight`` of weight
    (a generation closes once it reaches ``max_weight``; one entry heavier than that is not kept).
    """

    __slots__ = ("_max_items", "_max_weight", "_old", "_weigh", "_weight", "_young")

    def __init__(
        self,
        max_items: int,
        *,
        max_weight: int | None = None,
        weigh: Callable[[V], int] | None = None,
    ) -> None:
        if max_items < 1:
            raise ValueError(f"max_items must be at least 1, got {max_items!r}")
        if (max_weight is None) != (weigh is None):
            raise ValueError("max_weight and weigh go together")
        self._max_items = max_items
        self._max_weight = max_weight
        self._weigh = weigh
        self._young: dict[K, V] = {}
        self._old: dict[K, V] = {}
        self._weight = 0

    def get(self, key: K) -> V | None:
        found = self._young.get(key)
        if found is None:
            found = self._old.get(key)
        return found

    def put(self, key: K, value: V) -> None:
        if self._weigh is not None:
            assert self._max_weight is not None
            weight = self._weigh(value)
            if weight > self._max_weight:
                return
            self._weight += weight
        young = self._young
        young[key] = value
        if len(young) >= self._max_items or (
            self._max_weight is not None and self._weight >= self._max_weight
        ):
            self._old, self._young, self._weight = young, {}, 0

    def clear(self) -> None:
        self._young.clear()
        self._old.clear()
        self._weight = 0

    def __len__(self) -> int:
        return len(self._young) + len(self._old)

    def __contains__(self, key: object) -> bool:
        return key in self._young or key in self._old
