"""``stats``: counts and bytes per source, hit and error rates, payload tiers, database size."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mxm_dataio_async._store._maintenance import (
    DEFAULT_BUSY_TIMEOUT,
    _in_thread,
    _size,
    connection,
    transaction,
)
from mxm_dataio_async._store._schema import DB_NAME

__all__ = ["SourceStats", "StoreStats", "stats"]


@dataclass(frozen=True, slots=True)
class SourceStats:
    source: str
    sessions: int
    requests: int
    cache_hits: int
    fetched: int
    responses: int
    errors: int
    bytes: int

    @property
    def hit_rate(self) -> float | None:
        served = self.cache_hits + self.fetched
        return self.cache_hits / served if served else None

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.responses if self.responses else None


@dataclass(frozen=True, slots=True)
class StoreStats:
    """Counts per source, cache hit rate, error rate, payload tiers and database size.

    A request is a cache hit when it was served a stored response (``requests.served_from``) and
    fetched when it has responses of its own; the hit rate is hits / (hits + fetched). The error
    rate is error responses (every failed attempt is one) over all responses.
    """

    root: Path
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
        names = ("sessions", "requests", "cache_hits", "fetched", "responses", "errors", "bytes")
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
                "errors": s.errors,
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


def _stats_sync(root: Path, busy_timeout: float) -> StoreStats:
    per: dict[str, dict[str, int]] = {}

    def add(source: str, **values: int) -> None:
        per.setdefault(source, {}).update(values)

    with connection(root, busy_timeout) as conn, transaction(conn, write=False):
        for src, n in conn.execute("SELECT source, count(*) FROM sessions GROUP BY source"):
            add(src, sessions=n)
        for src, n, hits in conn.execute(
            "SELECT source, count(*), count(served_from) FROM requests GROUP BY source"
        ):
            add(src, requests=n, cache_hits=hits)
        for src, n, errors, nbytes, fetched in conn.execute(
            "SELECT source, count(*), sum(status = 'error'), coalesce(sum(size_bytes), 0), "
            "count(DISTINCT request_id) FROM responses GROUP BY source"
        ):
            add(src, responses=n, errors=errors, bytes=nbytes, fetched=fetched)
        tiers = {
            tier: (n, b)
            for tier, n, b in conn.execute(
                "SELECT tier, count(*), coalesce(sum(size_bytes), 0) FROM payloads GROUP BY tier"
            )
        }
    names = ("sessions", "requests", "cache_hits", "fetched", "responses", "errors", "bytes")
    sources = [
        SourceStats(src, *(int(v.get(k) or 0) for k in names)) for src, v in sorted(per.items())
    ]
    db_bytes = sum(_size(root / (DB_NAME + suffix)) for suffix in ("", "-wal", "-shm"))
    inline, file = tiers.get("inline", (0, 0)), tiers.get("file", (0, 0))
    return StoreStats(root, sources, *inline, *file, db_bytes)


async def stats(
    root: str | os.PathLike[str], *, busy_timeout: float = DEFAULT_BUSY_TIMEOUT
) -> StoreStats:
    """Counts and bytes per source, hit and error rates, payload tiers, database size."""
    return await _in_thread(lambda: _stats_sync(Path(root), busy_timeout))
