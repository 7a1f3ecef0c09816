"""A session's live statistics: its recorder's counts beside its source's gate and breaker."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from mxm_dataio_async._limits import LimiterStatistics

if TYPE_CHECKING:
    from mxm_dataio_async._recorder import Recorder
    from mxm_dataio_async._registry import SourceEntry

__all__ = ["SourceStatistics", "statistics_of"]


@dataclass(frozen=True, slots=True)
class SourceStatistics:
    """A snapshot of one session (one source) while it runs: ``session.statistics()``."""

    source: str
    requests: int
    """Requests started (fetch, send, stream)."""
    fetched: int
    """Answers fetched from the upstream (OK), cache hits not included."""
    cache_hits: int
    retries: int
    """Attempts that failed and were retried."""
    failures: int
    """Requests that failed in the end."""
    stale: int
    """Requests answered by stale-if-error."""
    bytes: int
    """Payload bytes fetched."""
    elapsed: float
    """Seconds since the session was created."""
    rate: float
    """Achieved upstream fetches per second over ``elapsed``."""
    limiter_wait: float
    """Seconds the session's successful attempts waited for the rate gate, in total."""
    breaker: str | None
    """The source's circuit breaker: ``closed``, ``open``, ``half_open`` (``None``: none)."""
    gate: LimiterStatistics
    """The source's rate gate (shared by every session of the source)."""

    def to_json(self) -> dict[str, Any]:
        """As plain JSON values (``--stats-every`` writes these)."""
        out = asdict(self)
        out["gate"] = {k: v for k, v in out["gate"].items() if v != float("inf")}
        return out


def statistics_of(recorder: Recorder, entry: SourceEntry, elapsed: float) -> SourceStatistics:
    c = recorder.counts
    fetched = c["fetched"]
    return SourceStatistics(
        source=entry.name,
        requests=c["requests"],
        fetched=fetched,
        cache_hits=c["cache_hits"],
        retries=c["retries"],
        failures=c["errors"],
        stale=c["stale"],
        bytes=c["bytes"],
        elapsed=elapsed,
        rate=fetched / elapsed if elapsed > 0 else 0.0,
        limiter_wait=recorder.wait_ms / 1000.0,
        breaker=None if entry.circuit is None else entry.circuit.state.value,
        gate=entry.gate.statistics(),
    )
