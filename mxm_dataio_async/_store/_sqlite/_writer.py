"""The single writer: group commit of many jobs per transaction.

Producers submit a job (the rows of one fetch) and await a future that resolves once the
transaction holding those rows has committed. While one transaction runs in SQLite's thread, new
jobs accumulate and form the next batch, so the batch size adapts to load without a timer: one job
commits alone when idle, hundreds commit together under load. Measured here: one commit per row
~12k rows/s, one writer committing batches ~50k rows/s.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

import aiosqlite
import anyio

from mxm_dataio_async._exceptions import StoreClosedError, StoreError
from mxm_dataio_async._store._sqlite._rows import (
    REQUEST_COLUMNS,
    RESPONSE_COLUMNS,
    SESSION_COLUMNS,
)
from mxm_dataio_async._store._sqlite._sql import is_busy, sqlite_error

__all__ = ["SQL", "Row", "Writer"]

log = logging.getLogger("mxm_dataio_async.store")


def _placeholders(columns: str) -> str:
    return ", ".join("?" for _ in columns.split(","))


# Statement kinds in the order a batch executes them (payloads before the rows that name them).
SQL: Final[dict[str, str]] = {
    "session": (
        f"INSERT INTO sessions ({SESSION_COLUMNS}) VALUES ({_placeholders(SESSION_COLUMNS)}) "
        "ON CONFLICT (id) DO UPDATE SET ended_at = excluded.ended_at, status = excluded.status, "
        "requests = excluded.requests, responses = excluded.responses, "
        "cache_hits = excluded.cache_hits, errors = excluded.errors, "
        "bytes_fetched = excluded.bytes_fetched, error = excluded.error"
    ),
    "payload": (
        "INSERT OR IGNORE INTO payloads (sha256, size_bytes, tier, data, created_at) "
        "VALUES (?, ?, ?, ?, ?)"
    ),
    "request": (
        f"INSERT OR IGNORE INTO requests ({REQUEST_COLUMNS}) "
        f"VALUES ({_placeholders(REQUEST_COLUMNS)})"
    ),
    "response": (
        f"INSERT INTO responses ({RESPONSE_COLUMNS}) VALUES ({_placeholders(RESPONSE_COLUMNS)})"
    ),
}
_ORDER: Final = tuple(SQL)

Row = tuple[str, Sequence[Any]]

_BUSY_RETRIES: Final = 20


class _Job:
    __slots__ = ("future", "rows")

    def __init__(self, rows: list[Row], future: asyncio.Future[None] | None) -> None:
        self.rows = rows
        self.future = future


class Writer:
    """Owns the write connection; one task runs :meth:`run` for the store's lifetime."""

    def __init__(
        self,
        conn: aiosqlite.Connection,
        *,
        max_batch: int = 2048,
        on_commit: Callable[[], None] | None = None,
        finish_log: Callable[[], bool] | None = None,
    ) -> None:
        self._conn = conn
        # Held around a transaction that takes several calls (the fallback below), so that
        # another user of this connection (the batched lookups) never reads inside it.
        self.lock = asyncio.Lock()
        self._on_commit = on_commit  # told after each commit (the WAL checkpointer)
        self._finish_log = finish_log  # asked before each: checkpoint the rest after it?
        self._max_batch = max_batch
        self._pending: list[_Job] = []
        self._wakeup = asyncio.Event()
        self._closing = False
        self._closed = False
        self._loop = asyncio.get_running_loop()
        self.batches = 0
        self.jobs = 0
        self.slowest_commit = 0.0  # seconds, the longest transaction so far (benchmarks report it)

    def submit(self, rows: list[Row], *, wait: bool = True) -> asyncio.Future[None] | None:
        """Queue ``rows`` to commit together; the future resolves once they are committed.

        With ``wait=False`` no future is made: the rows commit with the next batch and a failure
        is logged (used for audit rows whose loss is harmless, e.g. a cache hit's request row).
        """
        if self._closing or self._closed:
            raise StoreClosedError("the store is closed; no more writes are accepted")
        fut = self._loop.create_future() if wait else None
        self._pending.append(_Job(rows, fut))
        if not self._wakeup.is_set():
            self._wakeup.set()
        return fut

    @property
    def conn(self) -> aiosqlite.Connection:
        """The write connection (the batched lookups share it: see ``lock``)."""
        return self._conn

    async def write(self, rows: list[Row]) -> None:
        fut = self.submit(rows)
        assert fut is not None
        await fut

    async def run(self) -> None:
        try:
            while True:
                if not self._pending:
                    if self._closing:
                        return
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
                try:
                    await self._commit_batch(batch)
                except Exception as exc:  # a bug or an unexpected value: fail the batch, not us
                    log.exception("store writer: batch failed")
                    err = StoreError(f"cannot commit to the store: {type(exc).__name__}: {exc}")
                    err.__cause__ = exc
                    for job in batch:
                        if job.future is not None and not job.future.done():
                            job.future.set_exception(err)
        finally:
            self._closed = True
            err = StoreClosedError("the store closed before this write was committed")
            for job in self._pending:
                if job.future is not None and not job.future.done():
                    job.future.set_exception(err)
            self._pending.clear()

    def drain_and_stop(self) -> None:
        """Stop accepting writes; :meth:`run` returns once everything queued is committed."""
        self._closing = True
        self._wakeup.set()

    async def _commit_batch(self, batch: list[_Job]) -> None:
        started = time.perf_counter()
        try:
            await self._commit([row for job in batch for row in job.rows])
        except StoreError as exc:
            if len(batch) > 1 and not isinstance(exc.__cause__, sqlite3.OperationalError):
                # Isolate the offending job so one bad row does not fail its neighbours.
                for job in batch:
                    await self._commit_batch([job])
                return
            for job in batch:
                if job.future is None:
                    log.error("audit write failed: %s", exc)
                elif not job.future.done():
                    job.future.set_exception(exc)
            return
        self.batches += 1
        self.jobs += len(batch)
        self.slowest_commit = max(self.slowest_commit, time.perf_counter() - started)
        if self._on_commit is not None:
            self._on_commit()
        for job in batch:
            if job.future is not None and not job.future.done():
                job.future.set_result(None)

    async def _commit(self, rows: list[Row]) -> None:
        grouped: dict[str, list[Sequence[Any]]] = {}
        for kind, params in rows:
            grouped.setdefault(kind, []).append(params)
        batches = [(SQL[kind], grouped[kind]) for kind in _ORDER if kind in grouped]
        delay = 0.005
        for attempt in range(_BUSY_RETRIES + 1):
            try:
                await self._transaction(batches)
                return
            except (ValueError, TypeError, OverflowError) as exc:
                # A value SQLite cannot bind (e.g. a str with lone surrogates): this batch fails,
                # with the store's own error, and the writer goes on.
                raise StoreError(
                    f"cannot commit to the store: {type(exc).__name__}: {exc}"
                ) from exc
            except sqlite3.Error as exc:
                # busy_timeout already waited inside SQLite; a few more tries ride out a long
                # checkpoint or a slow writer in another process.
                if is_busy(exc) and attempt < _BUSY_RETRIES:
                    await anyio.sleep(delay)
                    delay = min(delay * 2, 0.5)
                    continue
                raise sqlite_error("commit to the store", exc) from exc

    async def _transaction(self, batches: list[tuple[str, list[Sequence[Any]]]]) -> None:
        run_in_thread = getattr(self._conn, "_execute", None)
        finish = self._finish_log is not None and self._finish_log()
        if ONE_HOP_COMMIT and run_in_thread is not None:
            # One hop to SQLite's thread for the whole transaction instead of one per statement:
            # each hop back also waits for the GIL, up to the interpreter's switch interval.
            # aiosqlite runs ``fn`` on its connection thread (the same path as its public calls).
            raw = self._conn._conn
            await run_in_thread(_transaction_sync, raw, batches, finish)
            return
        async with self.lock:
            await self._conn.execute("BEGIN IMMEDIATE")
            try:
                for sql, params_list in batches:
                    await self._conn.executemany(sql, params_list)
                await self._conn.execute("COMMIT")
                if finish:  # the commit is done: a failure here is logged, not the batch's
                    try:
                        await self._conn.execute_fetchall("PRAGMA wal_checkpoint(PASSIVE)")
                    except sqlite3.Error as exc:
                        log.warning("store: WAL checkpoint after a commit failed: %s", exc)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    try:
                        await self._conn.execute("ROLLBACK")
                    except sqlite3.Error as rb_exc:  # no transaction left to roll back
                        log.debug("rollback after failed batch: %s", rb_exc)
                raise


#: Commit a batch in one call on the connection's thread (set False to use only aiosqlite's
#: public per-statement calls; the tests run both paths).
ONE_HOP_COMMIT = True


def _transaction_sync(
    conn: sqlite3.Connection, batches: list[tuple[str, list[Any]]], finish: bool = False
) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        for sql, params_list in batches:
            conn.executemany(sql, params_list)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    if finish:
        _finish_checkpoint(conn)


def _finish_checkpoint(conn: sqlite3.Connection) -> None:
    """Checkpoint what is left of the log, after a commit (``_checkpoint.py``). The commit is
    done: a failure here is logged, never the batch's."""
    try:
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
    except sqlite3.Error as exc:
        log.warning("store: WAL checkpoint after a commit failed: %s", exc)
