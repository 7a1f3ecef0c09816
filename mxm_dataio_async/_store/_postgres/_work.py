"""The work queue of a run shared by many workers, in PostgreSQL (see ``_store/_work.py``).

Every decision is on the server's clock (``clock_timestamp()``), so workers on hosts with skewed
clocks agree on whose lease has expired. Claims take chunks with ``FOR UPDATE SKIP LOCKED`` (one
statement, never one chunk twice). The fence that keeps a stale worker from committing is
``FENCE_SQL`` (``_fence.py``), run by the writer in the transaction that records the rows: it
locks the claimed chunks ``FOR SHARE`` while checking owner and lease, so a claim cannot pass to
another worker between the check and the commit (the other worker's claim skips the locked row
until then).
Rows are locked in chunk order everywhere, so the writer, heartbeats and claims never deadlock.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, Protocol, TypeVar

from mxm_dataio_async._exceptions import ClaimLost, RunMismatch
from mxm_dataio_async._store._postgres._fence import DONE_SQL
from mxm_dataio_async._store._work import ChunkState, Claim, Mark, RunInfo, RunStatus, WorkerStatus

__all__ = ["PostgresWorkQueue"]

Connection = Any  # asyncpg.Connection
T = TypeVar("T")


class Pool(Protocol):
    """Where the queue runs its statements: a ``PostgresMetadata`` (its pool, its error
    translation and retries)."""

    async def on_connection(
        self,
        action: str,
        fn: Callable[[Connection], Awaitable[T]],
        *,
        write: bool = False,
        retry: bool = True,
    ) -> T: ...


_RUN: Final = (
    "SELECT id, job, config_hash, total, chunk_size, planned, created_at, finished_at "
    "FROM job_runs WHERE id = $1"
)
_OPEN_RUN: Final = (
    "INSERT INTO job_runs (id, job, config_hash, total, chunk_size) VALUES ($1, $2, $3, $4, $5) "
    "ON CONFLICT (id) DO NOTHING"
)
_ENQUEUE: Final = (
    "INSERT INTO job_chunks (run_id, chunk, first_index, stop_index) "
    "SELECT $1, g, g::bigint * $2, least((g::bigint + 1) * $2, $3) "
    "FROM generate_series(0, $4 - 1) AS g ON CONFLICT (run_id, chunk) DO NOTHING"
)
# Chunks whose holders died max_attempts times are dead (with why), before anything is claimed.
_BURY: Final = (
    "UPDATE job_chunks SET state = 'dead', updated_at = clock_timestamp(), "
    "error = coalesce(error || '; ', '') || 'its lease expired (the worker holding it stopped)' "
    "WHERE run_id = $1 AND state = 'claimed' AND lease_until < clock_timestamp() "
    "AND attempts >= $2"
)
_CLAIM: Final = (
    "WITH picked AS (SELECT chunk FROM job_chunks WHERE run_id = $1 "
    "AND (state = 'pending' OR (state = 'claimed' AND lease_until < clock_timestamp())) "
    "ORDER BY chunk LIMIT $3 FOR UPDATE SKIP LOCKED) "
    "UPDATE job_chunks AS c SET state = 'claimed', owner = $2, attempts = c.attempts + 1, "
    "lease_until = clock_timestamp() + make_interval(secs => $4), updated_at = clock_timestamp() "
    "FROM picked WHERE c.run_id = $1 AND c.chunk = picked.chunk "
    "RETURNING c.chunk, c.first_index, c.stop_index, c.attempts, c.lease_until"
)
_EXTEND: Final = (
    "WITH held AS (SELECT chunk FROM job_chunks WHERE run_id = $1 AND owner = $2 "
    "AND chunk = ANY($4::int[]) "
    "AND state = 'claimed' AND lease_until > clock_timestamp() ORDER BY chunk FOR UPDATE) "
    "UPDATE job_chunks AS c SET lease_until = clock_timestamp() + make_interval(secs => $3) "
    "FROM held WHERE c.run_id = $1 AND c.chunk = held.chunk RETURNING c.chunk"
)
_HOLD: Final = (
    "SELECT attempts FROM job_chunks WHERE run_id = $1 AND chunk = $2 AND owner = $3 "
    "AND state = 'claimed' AND lease_until > clock_timestamp() FOR UPDATE"
)
_SEEN: Final = (
    "INSERT INTO job_workers (run_id, worker, host, pid) VALUES ($1, $2, $3, $4) "
    "ON CONFLICT (run_id, worker) DO UPDATE SET seen_at = now()"
)


def _run_info(row: Any) -> RunInfo:
    return RunInfo(
        id=row[0],
        job=row[1],
        config_hash=row[2],
        total=int(row[3]),
        chunk_size=int(row[4]),
        planned=bool(row[5]),
        created_at=row[6],
        finished_at=row[7],
    )


async def _open_run(
    conn: Connection, run_id: str, *, job: str, config_hash: str, total: int, chunk_size: int
) -> RunInfo:
    await conn.execute(_OPEN_RUN, run_id, job, config_hash, total, chunk_size)
    info = _run_info(await conn.fetchrow(_RUN, run_id))
    mine = (job, config_hash, total, chunk_size)
    theirs = (info.job, info.config_hash, info.total, info.chunk_size)
    if mine != theirs:
        raise RunMismatch(
            f"run {run_id!r} was started with another configuration: job {info.job!r}, config "
            f"{info.config_hash[:12]}, {info.total} requests in chunks of {info.chunk_size}; this "
            f"worker has job {job!r}, config {config_hash[:12]}, {total} requests in chunks of "
            f"{chunk_size}. Run the same job file (with the same --only/--limit and chunk size) "
            "to join it, or start a new run with another --run id"
        )
    return info


async def _enqueue(conn: Connection, run_id: str) -> int:
    async with conn.transaction():
        info = _run_info(await conn.fetchrow(_RUN, run_id))
        chunks = -(-info.total // info.chunk_size)  # ceiling
        status = await conn.execute(_ENQUEUE, run_id, info.chunk_size, info.total, chunks)
        await conn.execute("UPDATE job_runs SET planned = true WHERE id = $1", run_id)
    return int(status.split()[-1])


async def _claim(
    conn: Connection, run_id: str, owner: str, *, n: int, ttl: float, max_attempts: int
) -> list[Claim]:
    async with conn.transaction():
        await conn.execute(_BURY, run_id, max_attempts)
        rows = await conn.fetch(_CLAIM, run_id, owner, n, float(ttl))
    return sorted(
        (Claim(run_id, int(r[0]), owner, int(r[1]), int(r[2]), int(r[3]), r[4]) for r in rows),
        key=lambda c: c.chunk,
    )


async def _extend(
    conn: Connection, run_id: str, owner: str, ttl: float, chunks: Sequence[int]
) -> set[int]:
    rows = await conn.fetch(_EXTEND, run_id, owner, float(ttl), list(chunks))
    return {int(r[0]) for r in rows}


def _lost(c: Claim) -> ClaimLost:
    return ClaimLost(
        f"the claim of {c.owner} on chunk {c.chunk} of run {c.run_id!r} expired or was taken "
        "over; nothing was recorded under it"
    )


def _mark_args(run_id: str, marks: Sequence[Mark], outcome: str) -> list[list[Any]]:
    return [
        [run_id] * len(marks),
        [m.index for m in marks],
        [m.source for m in marks],
        [m.response_id for m in marks],
        [("cached" if m.response_id is not None else outcome) for m in marks],
    ]


async def _complete(conn: Connection, c: Claim, marks: Sequence[Mark]) -> None:
    async with conn.transaction():
        if await conn.fetchval(_HOLD, c.run_id, c.chunk, c.owner) is None:
            state = await conn.fetchval(
                "SELECT state FROM job_chunks WHERE run_id = $1 AND chunk = $2 AND owner = $3",
                c.run_id,
                c.chunk,
                c.owner,
            )
            if state == "done":
                return  # completed by this claim already (a retry after a lost connection)
            raise _lost(c)
        if marks:
            await conn.execute(DONE_SQL, *_mark_args(c.run_id, marks, "failed"))
        await conn.execute(
            "UPDATE job_chunks SET state = 'done', lease_until = NULL, error = NULL, "
            "updated_at = clock_timestamp() WHERE run_id = $1 AND chunk = $2",
            c.run_id,
            c.chunk,
        )


async def _release(conn: Connection, c: Claim, error: str, *, max_attempts: int) -> ChunkState:
    async with conn.transaction():
        attempts = await conn.fetchval(_HOLD, c.run_id, c.chunk, c.owner)
        if attempts is None:
            raise _lost(c)
        state: ChunkState = "dead" if int(attempts) >= max_attempts else "pending"
        await conn.execute(
            "UPDATE job_chunks SET state = $3, lease_until = NULL, error = $4, "
            "updated_at = clock_timestamp() WHERE run_id = $1 AND chunk = $2",
            c.run_id,
            c.chunk,
            state,
            error[:2000],
        )
    return state


async def _worker_seen(conn: Connection, run_id: str, worker: str, *, host: str, pid: int) -> None:
    await conn.execute(_SEEN, run_id, worker, host, pid)


async def _finish_run(conn: Connection, run_id: str) -> None:
    await conn.execute(
        "UPDATE job_runs SET finished_at = now() WHERE id = $1 AND finished_at IS NULL", run_id
    )


async def _run_status(conn: Connection, run_id: str, *, window: float, ttl: float) -> RunStatus:
    row = await conn.fetchrow(_RUN, run_id)
    if row is None:
        raise ValueError(f"unknown run {run_id!r}")
    info = _run_info(row)
    chunks = {
        r[0]: int(r[1])
        for r in await conn.fetch(
            "SELECT state, count(*) FROM job_chunks WHERE run_id = $1 GROUP BY state", run_id
        )
    }
    per_source = {
        (r[0] or ""): int(r[1])
        for r in await conn.fetch(
            "SELECT source, count(*) FROM job_done WHERE run_id = $1 GROUP BY source", run_id
        )
    }
    dead = [
        (int(r[0]), int(r[1]), r[2])
        for r in await conn.fetch(
            "SELECT chunk, attempts, error FROM job_chunks WHERE run_id = $1 AND state = 'dead' "
            "ORDER BY chunk LIMIT 100",
            run_id,
        )
    ]
    workers = [
        WorkerStatus(
            name=r[0],
            host=r[1],
            pid=int(r[2]),
            started_at=r[3],
            seen_at=r[4],
            alive=bool(r[5]),
            chunks=int(r[6]),
        )
        for r in await conn.fetch(
            "SELECT w.worker, w.host, w.pid, w.started_at, w.seen_at, "
            "w.seen_at > now() - make_interval(secs => $2), "
            "(SELECT count(*) FROM job_chunks c WHERE c.run_id = w.run_id AND c.owner = w.worker "
            "AND c.state = 'claimed' AND c.lease_until > clock_timestamp()) "
            "FROM job_workers w WHERE w.run_id = $1 ORDER BY w.started_at, w.worker",
            run_id,
            float(ttl),
        )
    ]
    rates = {
        (r[0] or ""): int(r[1]) / window
        for r in await conn.fetch(
            "SELECT source, count(*) FROM job_done WHERE run_id = $1 AND outcome = 'fetched' "
            "AND done_at > clock_timestamp() - make_interval(secs => $2) GROUP BY source",
            run_id,
            float(window),
        )
    }
    done = sum(per_source.values())
    return RunStatus(info, chunks, done, dead, workers, rates, window, per_source)


class PostgresWorkQueue:
    """:class:`WorkQueue` over a ``PostgresMetadata``'s pool (``metadata.work``)."""

    __slots__ = ("_store",)

    def __init__(self, store: Pool) -> None:
        self._store = store

    async def open_run(
        self, run_id: str, *, job: str, config_hash: str, total: int, chunk_size: int
    ) -> RunInfo:
        return await self._store.on_connection(
            "open the run",
            lambda conn: _open_run(
                conn, run_id, job=job, config_hash=config_hash, total=total, chunk_size=chunk_size
            ),
            write=True,
        )

    async def enqueue(self, run_id: str) -> int:
        return await self._store.on_connection(
            "plan the run", lambda c: _enqueue(c, run_id), write=True
        )

    async def claim(
        self, run_id: str, owner: str, *, n: int, ttl: float, max_attempts: int
    ) -> list[Claim]:
        return await self._store.on_connection(
            "claim work",
            lambda c: _claim(c, run_id, owner, n=n, ttl=ttl, max_attempts=max_attempts),
            write=True,
            retry=False,  # a lost claim statement may have claimed: its leases expire
        )

    async def extend(self, run_id: str, owner: str, ttl: float, chunks: Sequence[int]) -> set[int]:
        return await self._store.on_connection(
            "extend claims", lambda c: _extend(c, run_id, owner, ttl, chunks), write=True
        )

    async def complete(self, claim: Claim, marks: Sequence[Mark]) -> None:
        await self._store.on_connection(
            "complete a chunk", lambda c: _complete(c, claim, marks), write=True
        )

    async def release(self, claim: Claim, error: str, *, max_attempts: int) -> ChunkState:
        return await self._store.on_connection(
            "release a chunk",
            lambda c: _release(c, claim, error, max_attempts=max_attempts),
            write=True,
            retry=False,  # not idempotent; a release lost with the connection lets the lease expire
        )

    async def worker_seen(self, run_id: str, worker: str, *, host: str, pid: int) -> None:
        await self._store.on_connection(
            "record a heartbeat",
            lambda c: _worker_seen(c, run_id, worker, host=host, pid=pid),
            write=True,
        )

    async def run_status(
        self, run_id: str, *, window: float = 10.0, ttl: float = 30.0
    ) -> RunStatus:
        return await self._store.on_connection(
            "read the run", lambda c: _run_status(c, run_id, window=window, ttl=ttl)
        )

    async def finish_run(self, run_id: str) -> None:
        await self._store.on_connection(
            "finish the run", lambda c: _finish_run(c, run_id), write=True
        )
