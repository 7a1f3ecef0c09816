"""Group commit over a pool: a few writer tasks, each committing a batch of queued jobs at a time.

A job is the rows of one ``record()`` (or one ``save_session``). While the writers are busy, new
jobs queue up and form the next batches, so batch size adapts to load without a timer. A batch is
ONE statement: data-modifying CTEs insert its payload, request and response rows from ``unnest``
of one array per column, so a batch costs one round trip and commits atomically on its own
(measured here with prebuilt rows, 1 KiB inline payloads, 4 connections, 64 fetches per
batch: ~37k fetches/s as one statement, ~32k with ``executemany`` per table in a transaction).
Session rows, rare, go first in the same transaction.

Rules:
- ``record()`` returns once its batch committed *and every batch taken before it* did (batches
  commit on several connections, so a later one may land first): a waited write commits what was
  queued before it, as with SQLite's single writer (``record_later`` relies on that).
- A bad row fails only its own job: a batch that fails for its data is retried job by job.
- Lost connections (a server restart) are retried until ``retry_for`` seconds have passed; if the
  lost attempt may have committed, the retry first checks whether the batch's rows are there (a
  batch is one transaction: all or none of them are).
- Deadlocks and lock timeouts roll the batch back; it is run again.
- Payload rows are sorted by digest within a batch, so two batches inserting the same payloads
  wait for each other in one order and never deadlock.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any, Final

import anyio

from mxm_dataio_async._exceptions import ClaimLost, StoreClosedError, StoreError
from mxm_dataio_async._store._postgres._fence import DONE_SQL, FENCE_SQL
from mxm_dataio_async._store._postgres._rows import (
    COLUMNS,
    PAYLOAD_TYPES,
    TYPES,
)
from mxm_dataio_async._store._postgres._sql import (
    DRIVER_ERRORS,
    is_disconnect,
    is_transient,
    pg_error,
)

__all__ = ["RECORD_SQL", "SESSION_SQL", "Job", "Writer", "batch_args"]

log = logging.getLogger("mxm_dataio_async.store")

Row = Sequence[Any]


def _unnest(types: Sequence[str], first: int) -> str:
    return ", ".join(f"${first + i}::{t}[]" for i, t in enumerate(types))


def _names(table: str) -> str:
    return ", ".join(COLUMNS[table])  # type: ignore[index]


_N_PAYLOAD: Final = len(PAYLOAD_TYPES)
_N_REQUEST: Final = len(TYPES["requests"])
_N_RESPONSE: Final = len(TYPES["responses"])

#: One batch of fetches: payloads, requests (written once per id), responses. One statement,
#: so one transaction and one round trip.
RECORD_SQL: Final = (
    "WITH p AS (INSERT INTO payloads (sha256, size_bytes, tier, data, created_at) "
    f"SELECT * FROM unnest({_unnest(PAYLOAD_TYPES, 1)}) ON CONFLICT (sha256) DO NOTHING), "
    f"q AS (INSERT INTO requests ({_names('requests')}) "
    f"SELECT * FROM unnest({_unnest(TYPES['requests'], 1 + _N_PAYLOAD)}) "
    "ON CONFLICT (id) DO NOTHING) "
    f"INSERT INTO responses ({_names('responses')}) "
    f"SELECT * FROM unnest({_unnest(TYPES['responses'], 1 + _N_PAYLOAD + _N_REQUEST)})"
)
SESSION_SQL: Final = (
    f"INSERT INTO sessions ({_names('sessions')}) "
    f"VALUES ({', '.join(f'${i + 1}' for i in range(len(COLUMNS['sessions'])))}) "
    "ON CONFLICT (id) DO UPDATE SET ended_at = excluded.ended_at, status = excluded.status, "
    "requests = excluded.requests, responses = excluded.responses, "
    "cache_hits = excluded.cache_hits, errors = excluded.errors, "
    "bytes_fetched = excluded.bytes_fetched, error = excluded.error"
)
_LANDED: Final = "SELECT EXISTS (SELECT 1 FROM responses WHERE id = $1)"

_TRANSIENT_RETRIES: Final = 20


class Job:
    """The rows one write commits together (tuples in the column order of their tables).

    ``fence`` (run id, chunk, owner): the job commits only while that claim holds (else its
    outcome is ``ClaimLost``), and its ``done`` rows (``job_done``) mark plan indices done with it.
    """

    __slots__ = ("done", "fence", "future", "payloads", "requests", "responses", "sessions")

    def __init__(
        self,
        *,
        payloads: list[Row] | None = None,
        requests: list[Row] | None = None,
        responses: list[Row] | None = None,
        sessions: list[Row] | None = None,
        fence: tuple[str, int, str] | None = None,
        done: list[Row] | None = None,
    ) -> None:
        self.payloads = payloads or []
        self.requests = requests or []
        self.responses = responses or []
        self.sessions = sessions or []
        self.fence = fence
        self.done = done or []
        self.future: asyncio.Future[None] | None = None


class _Unavailable(Exception):
    """The server stayed unreachable for ``retry_for`` seconds: fail the batch, do not split it."""

    def __init__(self, error: StoreError) -> None:
        super().__init__(str(error))
        self.error = error


def _columns(rows: Sequence[Row], n: int) -> list[Sequence[Any]]:
    if not rows:
        return [()] * n
    return list(zip(*rows, strict=True))


def batch_args(batch: Sequence[Job]) -> tuple[list[Row], list[Sequence[Any]] | None, str | None]:
    """A batch as ``SESSION_SQL`` rows, ``RECORD_SQL`` arguments (one array per column; None if
    the batch has only sessions) and the id of one of its responses (None if none)."""
    sessions: list[Row] = []
    payloads: dict[bytes, Row] = {}
    requests: list[Row] = []
    responses: list[Row] = []
    for job in batch:
        if job.sessions:
            sessions.extend(job.sessions)
        for p in job.payloads:
            payloads.setdefault(p[0], p)
        requests.extend(job.requests)
        responses.extend(job.responses)
    args: list[Sequence[Any]] | None = None
    if payloads or requests or responses:
        args = [
            *_columns([payloads[d] for d in sorted(payloads)], _N_PAYLOAD),
            *_columns(requests, _N_REQUEST),
            *_columns(responses, _N_RESPONSE),
        ]
    return sessions, args, (responses[0][0] if responses else None)


class Writer:
    """Commits queued jobs in batches on ``workers`` connections of ``pool``; :meth:`run` serves
    until :meth:`drain_and_stop`."""

    def __init__(
        self,
        pool: Any,
        location: str,
        *,
        workers: int,
        retry_for: float,
        max_batch: int = 512,
    ) -> None:
        self._pool = pool
        self._location = location
        self._workers = max(1, workers)
        self._retry_for = retry_for
        # How long the server lets a transaction of ours sit idle before ending it (see
        # _IDLE_SQL): never reached by a live writer, whose statements follow each other at once.
        self._idle_ms = str(max(1000, round(retry_for * 1000)))
        self._max_batch = max_batch
        self._pending: list[Job] = []
        self._wakeup = asyncio.Event()
        self._closing = False
        self._closed = False
        self._loop = asyncio.get_running_loop()
        self._taken = 0  # batches taken so far: the next batch's number
        self._released = 0  # batches whose jobs were told their outcome, in order
        self._done: dict[int, tuple[list[Job], list[BaseException | None]]] = {}
        self.batches = 0
        self.jobs = 0

    def submit(self, job: Job, *, wait: bool = True) -> asyncio.Future[None] | None:
        """Queue ``job``; its future resolves once it (and everything queued before it) is
        committed. ``wait=False``: no future; a failure is logged (audit rows)."""
        if self._closing or self._closed:
            raise StoreClosedError("the store is closed; no more writes are accepted")
        if wait:
            job.future = self._loop.create_future()
        self._pending.append(job)
        if not self._wakeup.is_set():
            self._wakeup.set()
        return job.future

    async def write(self, job: Job) -> None:
        fut = self.submit(job)
        assert fut is not None
        await fut

    def drain_and_stop(self) -> None:
        """Stop accepting writes; :meth:`run` returns once everything queued is committed."""
        self._closing = True
        self._wakeup.set()

    async def run(self) -> None:
        try:
            async with anyio.create_task_group() as tg:
                for _ in range(self._workers):
                    tg.start_soon(self._work)
        finally:
            self._closed = True
            err = StoreClosedError("the store closed before this write was committed")
            for job in self._pending:
                if job.future is not None and not job.future.done():
                    job.future.set_exception(err)
            self._pending.clear()
            for jobs, _ in self._done.values():
                for job in jobs:
                    if job.future is not None and not job.future.done():
                        job.future.set_exception(err)

    async def _work(self) -> None:
        while True:
            while not self._pending:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            batch = self._pending[: self._max_batch]
            del self._pending[: self._max_batch]
            number = self._taken
            self._taken += 1
            try:
                outcomes = await self._commit_batch(batch)
            except Exception as exc:  # a bug or an unexpected value: fail the batch, not us
                log.exception("store writer: batch failed")
                err = StoreError(f"cannot commit to the store: {type(exc).__name__}: {exc}")
                err.__cause__ = exc
                outcomes = [err] * len(batch)
            self._done[number] = (batch, outcomes)
            self._release()

    def _release(self) -> None:
        """Tell jobs their outcome, batch by batch in the order they were taken."""
        while self._released in self._done:
            jobs, outcomes = self._done.pop(self._released)
            self._released += 1
            for job, outcome in zip(jobs, outcomes, strict=True):
                fut = job.future
                if fut is None:
                    if outcome is not None:
                        log.error("audit write failed: %s", outcome)
                elif not fut.done():
                    if outcome is None:
                        fut.set_result(None)
                    else:
                        fut.set_exception(outcome)

    async def _commit_batch(self, batch: list[Job]) -> list[BaseException | None]:
        try:
            outcomes = await self._commit(batch)
        except _Unavailable as exc:
            return [exc.error] * len(batch)
        except StoreError as exc:
            if len(batch) > 1:
                # Isolate the offending job so one bad row does not fail its neighbours.
                each: list[BaseException | None] = []
                for job in batch:
                    each.extend(await self._commit_batch([job]))
                return each
            return [exc]
        self.batches += 1
        self.jobs += len(batch)
        return outcomes

    async def _commit(self, batch: list[Job]) -> list[BaseException | None]:
        """Commit the batch in one transaction; each job's outcome (``ClaimLost`` for a fenced
        job whose claim no longer holds, ``None`` for the rest)."""
        fenced = any(job.fence is not None for job in batch)
        sessions, args, probe = batch_args(batch)
        maybe_landed = False
        deadline: float | None = None
        delay = 0.01
        transient = 0
        while True:
            try:
                async with self._pool.acquire() as conn:
                    if fenced:
                        return await _commit_fenced(conn, batch, maybe_landed, self._idle_ms)
                    if maybe_landed and probe is not None and await conn.fetchval(_LANDED, probe):
                        return [None] * len(batch)  # the lost attempt had committed
                    if sessions:
                        async with conn.transaction():
                            await conn.execute(_IDLE_SQL, self._idle_ms)
                            await conn.executemany(SESSION_SQL, sessions)
                            if args is not None:
                                await conn.execute(RECORD_SQL, *args)
                    elif args is not None:
                        await conn.execute(RECORD_SQL, *args)
                return [None] * len(batch)
            except DRIVER_ERRORS as exc:
                if is_disconnect(exc):
                    maybe_landed = True
                    now = time.monotonic()
                    if deadline is None:
                        deadline = now + self._retry_for
                    if now >= deadline:
                        raise _Unavailable(
                            pg_error("commit to the store", exc, self._location)
                        ) from exc
                    await anyio.sleep(delay)
                    delay = min(delay * 2, 0.5)
                    continue
                if is_transient(exc) and transient < _TRANSIENT_RETRIES:
                    transient += 1
                    await anyio.sleep(0.005 * transient)
                    continue
                raise pg_error("commit to the store", exc, self._location) from exc
            except (ValueError, TypeError, OverflowError, UnicodeError) as exc:
                # A value the driver cannot encode: this batch fails (split, then this job).
                raise StoreError(
                    f"cannot commit to the store: {type(exc).__name__}: {exc}"
                ) from exc


#: The first statement of each transaction that spans several round trips: if this process stops
#: inside it (SIGSTOP, a partition) the server ends it after the given time, and its locks with
#: it. Otherwise a worker paused in its fenced commit would hold its chunks' rows FOR SHARE, and
#: SKIP LOCKED claims would pass them over for as long as it stays stopped. Set per transaction:
#: a bulk import may wait on its source far longer inside its own.
_IDLE_SQL: Final = "SELECT set_config('idle_in_transaction_session_timeout', $1, true)"


async def _commit_fenced(
    conn: Any, batch: list[Job], maybe_landed: bool, idle_ms: str
) -> list[BaseException | None]:
    """A batch with fenced jobs: in one transaction, lock the claims that still hold (``FOR
    SHARE``: no other worker can take them before this commits), then write the unfenced jobs
    and the fenced ones whose claim holds, with their ``job_done`` rows. After a lost connection
    (``maybe_landed``) the jobs whose responses are already there are not written again."""
    landed: set[str] = set()
    if maybe_landed:
        ids = [job.responses[0][0] for job in batch if job.responses]
        if ids:
            rows = await conn.fetch("SELECT id FROM responses WHERE id = ANY($1::text[])", ids)
            landed = {r[0] for r in rows}
    async with conn.transaction():
        await conn.execute(_IDLE_SQL, idle_ms)
        wanted = [job.fence for job in batch if job.fence is not None]
        held: set[tuple[str, int, str]] = set()
        if wanted:
            rows = await conn.fetch(
                FENCE_SQL, [f[0] for f in wanted], [f[1] for f in wanted], [f[2] for f in wanted]
            )
            held = {(r[0], int(r[1]), r[2]) for r in rows}
        outcomes: list[BaseException | None] = []
        keep: list[Job] = []
        for job in batch:
            if job.fence is not None and job.fence not in held:
                run_id, chunk, owner = job.fence
                outcomes.append(
                    ClaimLost(
                        f"the claim of {owner} on chunk {chunk} of run {run_id!r} expired or was "
                        "taken over; nothing was recorded under it"
                    )
                )
                continue
            outcomes.append(None)
            if not (job.responses and job.responses[0][0] in landed):
                keep.append(job)
        sessions, args, _ = batch_args(keep)
        if sessions:
            await conn.executemany(SESSION_SQL, sessions)
        if args is not None:
            await conn.execute(RECORD_SQL, *args)
        done = [row for job in keep for row in job.done]
        if done:
            await conn.execute(DONE_SQL, *_columns(done, 5))
    return outcomes
