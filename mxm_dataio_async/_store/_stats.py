"""``stats``: counts and bytes per source, hit and error rates, payload tiers, database size."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mxm_dataio_async._store._protocols import MetadataStore

__all__ = ["SourceStats", "StoreStats", "stats"]


@dataclass(frozen=True, slots=True)
class SourceStats:
    """One source's counts. ``error_responses`` counts error *rows* (every failed attempt is
    one, so a request retried three times adds three), unlike ``Session.errors``, which counts
    the *requests* that failed in the end."""

    source: str
    sessions: int
    requests: int
    cache_hits: int
    fetched: int
    responses: int
    error_responses: int
    bytes: int

    @property
    def errors(self) -> int:
        """Deprecated: ``error_responses`` (rows, not requests)."""
        warnings.warn(
            "SourceStats.errors is now SourceStats.error_responses (error rows, one per failed "
            "attempt; Session.errors counts failed requests)",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.error_responses

    @property
    def hit_rate(self) -> float | None:
        served = self.cache_hits + self.fetched
        return self.cache_hits / served if served else None

    @property
    def error_rate(self) -> float | None:
        return self.error_responses / self.responses if self.responses else None


@dataclass(frozen=True, slots=True)
class StoreStats:
    """Counts per source, cache hit rate, error rate, payload tiers and database size.

    A request is a cache hit when it was served a stored response (``requests.served_from``) and
    fetched when it has responses of its own; the hit rate is hits / (hits + fetched). The error
    rate is error responses (every failed attempt is one) over all responses.
    """

    root: Path | str
    sources: list[SourceStats]
    inline_payloads: int
    inline_bytes: int
    file_payloads: int
    file_bytes: int
    db_bytes: int

    def _total(self, name: str) -> int:
        return sum(int(getattr(s, name)) for s in self.sources)

    @property
    def totals(self) -> SourceStats:
        names = (
            "sessions",
            "requests",
            "cache_hits",
            "fetched",
            "responses",
            "error_responses",
            "bytes",
        )
        return SourceStats("(all)", *(self._total(n) for n in names))

    def to_json(self) -> dict[str, Any]:
        def one(s: SourceStats) -> dict[str, Any]:
            return {
                "source": s.source,
                "sessions": s.sessions,
                "requests": s.requests,
                "cache_hits": s.cache_hits,
                "fetched": s.fetched,
                "responses": s.responses,
                "error_responses": s.error_responses,
                "bytes": s.bytes,
                "hit_rate": s.hit_rate,
                "error_rate": s.error_rate,
            }

        return {
            "root": str(self.root),
            "sources": [one(s) for s in self.sources],
            "totals": one(self.totals),
            "payloads": {
                "inline": {"count": self.inline_payloads, "bytes": self.inline_bytes},
                "file": {"count": self.file_payloads, "bytes": self.file_bytes},
            },
            "db_bytes": self.db_bytes,
        }


async def stats(metadata: MetadataStore, *, root: Path | str) -> StoreStats:
    """Counts and bytes per source, hit and error rates, payload tiers, database size."""
    counts = await metadata.stats()
    sources = [
        SourceStats(
            c.source,
            c.sessions,
            c.requests,
            c.cache_hits,
            c.fetched,
            c.responses,
            c.error_responses,
            c.bytes,
        )
        for c in counts.sources
    ]
    inline, file = counts.tiers.get("inline", (0, 0)), counts.tiers.get("file", (0, 0))
    return StoreStats(root, sources, *inline, *file, counts.size_bytes)
