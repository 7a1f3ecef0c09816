"""Batched reads: the read-side twin of the group-commit writer.

Every aiosqlite call is a hop to the connection's thread and back, and under load each hop also
costs a GIL hand-off. The two reads on the hot path (the cache lookup of a request hash, and an
inline payload by sha256) are therefore queued, and one task answers everything queued so far with a
single ``IN (...)`` query per kind: one hop for a whole batch instead of three per call.

A lookup that finds responses also reads, in the same hop, the inline payloads they name (up to
``PREFETCH_MAX`` bytes each, ``_store/_memory.py``): a cache hit is nearly always followed by
``read()``, which then finds the bytes in memory instead of queueing a second query. They are the
stored bytes, unverified: ``Store.read`` hashes them as it hashes any bytes read back.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence
from typing import Any, Final

import aiosqlite

from mxm_dataio_async._exceptions import StoreClosedError
from mxm_dataio_async._store._memory import CHECKSUM_AT, SIZE_AT, PayloadMemory
from mxm_dataio_async._store._sqlite._sql import sqlite_error

__all__ = ["PREFETCH_SQL", "BatchReader", "LATEST_SQL_PREFIX"]

# SQLite returns the bare columns of the row holding max(fetched_at) in each group.
LATEST_SQL_PREFIX: Final = (
    "SELECT {columns}, max(fetched_at) FROM responses INDEXED BY ix_responses_usable "
    "WHERE status = 'ok' AND request_hash IN ({marks}) GROUP BY request_hash"
)
_PAYLOAD_SQL: Final = (
    "SELECT sha256, size_bytes, tier, data FROM payloads WHERE sha256 IN ({marks})"
)
_CHUNK: Final = 500  # bound parameters per statement (SQLite allows far more; plans stay simple)


Futures = dict[bytes, list["asyncio.Future[Any]"]]


class BatchReader:
    """Answers queued lookups in batches on one read connection."""

    def __init__(
        self,
        conn: aiosqlite.Connection,
        response_columns: str,
        memory: PayloadMemory,
        *,
        lock: asyncio.Lock | None = None,
    ) -> None:
        self._conn = conn
        # Given when the connection is the writer's: held around each query, so that no read
        # sees the inside of a transaction the writer spreads over several calls.
        self._lock = lock
        self._columns = response_columns
        self._latest: Futures = {}
        self._payloads: Futures = {}
        self._wakeup = asyncio.Event()
        self._closing = False
        self._loop = asyncio.get_running_loop()
        self.batches = 0
        # Where the inline payloads of the responses lookups find go (unverified).
        self._memory = memory

    def _queue(self, table: Futures, key: bytes) -> asyncio.Future[Any]:
        if self._closing:
            raise StoreClosedError("the store is closed")
        fut: asyncio.Future[Any] = self._loop.create_future()
        waiting = table.get(key)
        if waiting is None:
            table[key] = [fut]
        else:
            waiting.append(fut)
        if not self._wakeup.is_set():
            self._wakeup.set()
        return fut

    async def latest(self, request_hash: bytes) -> tuple[Any, ...] | None:
        """The newest OK response row for a hash (columns as ``response_columns``), or None."""
        result: tuple[Any, ...] | None = await self._queue(self._latest, request_hash)
        return result

    async def payload(self, digest: bytes) -> tuple[int, str, bytes | None] | None:
        """``(size_bytes, tier, data)`` of a payload, or None if it is not stored."""
        result: tuple[int, str, bytes | None] | None = await self._queue(self._payloads, digest)
        return result

    def stop(self) -> None:
        self._closing = True
        self._wakeup.set()

    async def run(self) -> None:
        try:
            while True:
                if not self._latest and not self._payloads:
                    if self._closing:
                        return
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                latest, self._latest = self._latest, {}
                payloads, self._payloads = self._payloads, {}
                self.batches += 1
                if latest:
                    await self._answer(latest, self._latest_rows, key_index=2, trim=1)
                if payloads:
                    await self._answer(payloads, self._payload_rows, key_index=0, trim=0)
        finally:
            err = StoreClosedError("the store closed before this read completed")
            for table in (self._latest, self._payloads):
                for futures in table.values():
                    for fut in futures:
                        if not fut.done():
                            fut.set_exception(err)
                table.clear()

    async def _latest_rows(self, keys: Sequence[bytes]) -> list[Any]:
        sql = LATEST_SQL_PREFIX.format(columns=self._columns, marks=", ".join("?" * len(keys)))
        run_in_thread = getattr(self._conn, "_execute", None)
        if run_in_thread is None:  # an aiosqlite without it: the lookup alone
            return await self._query(sql, keys)
        # One hop for the lookup and the inline payloads of what it found (aiosqlite runs the
        # function on its connection thread, as the writer's one-hop commit does).
        raw, limit = self._conn._conn, self._memory.lookup_limit()
        found: tuple[list[Any], list[Any]]
        if self._lock is None:
            found = await run_in_thread(_latest_sync, raw, sql, keys, limit)
        else:
            async with self._lock:
                found = await run_in_thread(_latest_sync, raw, sql, keys, limit)
        rows, payloads = found
        if payloads:
            self._memory.found(payloads)
        return rows

    async def _payload_rows(self, keys: Sequence[bytes]) -> list[Any]:
        sql = _PAYLOAD_SQL.format(marks=", ".join("?" * len(keys)))
        return await self._query(sql, keys)

    async def _query(self, sql: str, keys: Sequence[bytes]) -> list[Any]:
        if self._lock is None:
            return list(await self._conn.execute_fetchall(sql, keys))
        async with self._lock:
            return list(await self._conn.execute_fetchall(sql, keys))

    async def _answer(self, table: Futures, query: Any, *, key_index: int, trim: int) -> None:
        keys = list(table)
        found: dict[bytes, tuple[Any, ...]] = {}
        try:
            for i in range(0, len(keys), _CHUNK):
                for row in await query(keys[i : i + _CHUNK]):
                    values = tuple(row)
                    if trim:
                        values = values[:-trim]
                    found[bytes(values[key_index])] = values
        except sqlite3.Error as exc:
            err = sqlite_error("read from the store", exc)
            for futures in table.values():
                for fut in futures:
                    if not fut.done():
                        fut.set_exception(err)
            return
        for key, futures in table.items():
            row = found.get(key)
            if row is not None and key_index == 0:
                row = row[1:]  # payload rows: drop the key
            for fut in futures:
                if not fut.done():
                    fut.set_result(row)


def _latest_sync(
    conn: sqlite3.Connection, sql: str, keys: Sequence[bytes], limit: int
) -> tuple[list[Any], list[Any]]:
    """The lookup's rows, and ``(sha256, data)`` of the inline payloads they name up to
    ``limit`` bytes each."""
    rows: list[Any] = conn.execute(sql, keys).fetchall()
    if limit <= 0:
        return rows, []
    wanted = [
        bytes.fromhex(row[CHECKSUM_AT])
        for row in rows
        if row[CHECKSUM_AT] is not None and row[SIZE_AT] <= limit
    ]
    if not wanted:
        return rows, []
    marks = ", ".join("?" * len(wanted))
    payloads: list[Any] = conn.execute(PREFETCH_SQL.format(marks=marks), wanted).fetchall()
    return rows, payloads


PREFETCH_SQL: Final = (
    "SELECT sha256, data FROM payloads WHERE tier = 'inline' AND data IS NOT NULL "
    "AND sha256 IN ({marks})"
)
