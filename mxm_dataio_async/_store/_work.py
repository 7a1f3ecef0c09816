"""The work queue of a run shared by many workers (issue: many workers on many hosts).

A *run* is one execution of a job by any number of worker processes, on any number of hosts,
sharing one metadata store (PostgreSQL). Its plan (``JobPlan``: request *i* is computed from *i*)
is enqueued as *chunks*, ranges of plan indices; a worker *claims* a chunk with a lease on the
database's clock, extends the lease while it lives, and *completes* it. Every row a worker records
under a claim carries a :class:`Fence`; the store commits such rows only if the claim is still the
worker's and unexpired, checked in the same transaction that writes them, so a stale worker (paused
past its lease, partitioned away) commits nothing (``ClaimLost``). A request's plan index is marked
done in the transaction that records its response. A chunk that keeps failing is *dead* after
``max_attempts`` claims. A run is complete when every chunk is done or dead.

Implemented by ``PostgresMetadata``; ``Store.work`` hands it out (and refuses other backends).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Literal, Protocol, runtime_checkable

__all__ = [
    "ChunkState",
    "Claim",
    "Fence",
    "Mark",
    "RunInfo",
    "RunStatus",
    "WorkQueue",
    "WorkerStatus",
]

ChunkState = Literal["pending", "claimed", "done", "dead"]


@dataclass(frozen=True, slots=True)
class Fence:
    """What a row recorded under a claim is fenced by: the claim (run, chunk, owner), and the
    plan index the row answers (``None`` for rows that do not finish a request, e.g. a failed
    attempt that will be retried)."""

    run_id: str
    chunk: int
    owner: str
    index: int | None = None
    source: str | None = None

    def unmarked(self) -> Fence:
        """The same claim, marking no index."""
        return self if self.index is None else replace(self, index=None)


@dataclass(frozen=True, slots=True)
class Claim:
    """A chunk of a run held by ``owner`` until ``lease_until`` (the database's clock): plan
    indices ``first`` to ``stop - 1``. ``attempt`` counts the claims of this chunk so far."""

    run_id: str
    chunk: int
    owner: str
    first: int
    stop: int
    attempt: int
    lease_until: datetime

    def fence(self, index: int | None = None, source: str | None = None) -> Fence:
        return Fence(self.run_id, self.chunk, self.owner, index, source)

    @property
    def indices(self) -> range:
        return range(self.first, self.stop)


@dataclass(frozen=True, slots=True)
class Mark:
    """A plan index finished without a response of its own (a cache hit, a duplicate served by
    another request's fetch, or a failure): marked done when its chunk completes."""

    index: int
    source: str
    response_id: str | None = None


@dataclass(frozen=True, slots=True)
class RunInfo:
    """A run as recorded: its id, job, configuration hash and plan size."""

    id: str
    job: str
    config_hash: str
    total: int
    chunk_size: int
    planned: bool
    created_at: datetime
    finished_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    name: str
    host: str
    pid: int
    started_at: datetime
    seen_at: datetime
    alive: bool
    chunks: int
    """Chunks it holds now."""


@dataclass(frozen=True, slots=True)
class RunStatus:
    """Where a run stands: chunks by state, indices done, workers, recent rate per source."""

    run: RunInfo
    chunks: Mapping[ChunkState, int]
    done: int
    """Plan indices marked done."""
    dead_chunks: Sequence[tuple[int, int, str | None]]
    """``(chunk, attempts, last error)`` of each dead chunk (the first 100)."""
    workers: Sequence[WorkerStatus]
    rates: Mapping[str, float]
    """Indices done per second per source over the last ``window`` seconds."""
    window: float
    per_source_done: Mapping[str, int] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """Planned, and every chunk done or dead."""
        open_chunks = self.chunks.get("pending", 0) + self.chunks.get("claimed", 0)
        return self.run.planned and open_chunks == 0

    def to_json(self) -> dict[str, Any]:
        r = self.run
        return {
            "run": r.id,
            "job": r.job,
            "config_hash": r.config_hash,
            "total": r.total,
            "chunk_size": r.chunk_size,
            "planned": r.planned,
            "created_at": r.created_at.isoformat(),
            "finished_at": None if r.finished_at is None else r.finished_at.isoformat(),
            "complete": self.complete,
            "chunks": {s: self.chunks.get(s, 0) for s in ("pending", "claimed", "done", "dead")},
            "done": self.done,
            "per_source_done": dict(self.per_source_done),
            "dead_chunks": [
                {"chunk": c, "attempts": a, "error": e} for c, a, e in self.dead_chunks
            ],
            "workers": [
                {
                    "name": w.name,
                    "host": w.host,
                    "pid": w.pid,
                    "started_at": w.started_at.isoformat(),
                    "seen_at": w.seen_at.isoformat(),
                    "alive": w.alive,
                    "chunks": w.chunks,
                }
                for w in self.workers
            ],
            "rates": {k: round(v, 3) for k, v in self.rates.items()},
            "window": self.window,
        }


@runtime_checkable
class WorkQueue(Protocol):
    """The run's shared state, in the metadata store (all times on the database's clock)."""

    async def open_run(
        self, run_id: str, *, job: str, config_hash: str, total: int, chunk_size: int
    ) -> RunInfo:
        """Create the run, or join it: ``RunMismatch`` if it exists with another
        configuration hash, plan size or chunk size."""
        ...

    async def enqueue(self, run_id: str) -> int:
        """Enqueue every chunk of the run's plan (idempotent: chunks already there are kept);
        marks the run planned. Returns the chunks added."""
        ...

    async def claim(
        self, run_id: str, owner: str, *, n: int, ttl: float, max_attempts: int
    ) -> list[Claim]:
        """Up to ``n`` chunks that are pending, or claimed under an expired lease, now held by
        ``owner`` for ``ttl`` seconds (``FOR UPDATE SKIP LOCKED``: never one chunk twice). An
        expired chunk already claimed ``max_attempts`` times is dead instead."""
        ...

    async def extend(self, run_id: str, owner: str, ttl: float, chunks: Sequence[int]) -> set[int]:
        """Extend ``owner``'s unexpired leases on ``chunks``; returns those it still holds."""
        ...

    async def complete(self, claim: Claim, marks: Sequence[Mark]) -> None:
        """Mark ``marks`` done and the chunk done, fenced by the claim (``ClaimLost``)."""
        ...

    async def release(self, claim: Claim, error: str, *, max_attempts: int) -> ChunkState:
        """Give a chunk back after a failure, fenced by the claim: ``pending`` again, or
        ``dead`` when it has been claimed ``max_attempts`` times."""
        ...

    async def worker_seen(self, run_id: str, worker: str, *, host: str, pid: int) -> None:
        """Record that ``worker`` is alive (its heartbeat)."""
        ...

    async def run_status(
        self, run_id: str, *, window: float = 10.0, ttl: float = 30.0
    ) -> RunStatus:
        """The run's state; a worker is alive if seen within ``ttl`` seconds."""
        ...

    async def finish_run(self, run_id: str) -> None:
        """Record that the run completed (once: the first worker to see it complete)."""
        ...
