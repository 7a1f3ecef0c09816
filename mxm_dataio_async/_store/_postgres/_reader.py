"""Batched reads: the read-side twin of the group-commit writer.

The two reads on the hot path, the cache lookup (the newest OK response for a request hash) and an
inline payload by digest, are queued; one task answers everything queued so far with one query per
kind over an array of keys, so a round trip serves a whole batch (measured here: ~125-200k hashes/s
at 64-256 per query, against ~3k/s one query per lookup).

The lookup is ``= ANY($1)`` written as a lateral join over ``unnest($1)``: each hash reads one
entry of the partial index ``(request_hash, fetched_at) WHERE status = 'ok'`` backwards, however
many responses that hash has accumulated. ``DISTINCT ON (request_hash) ... WHERE request_hash =
ANY($1)`` reads them all, then sorts: as fast at one response per hash, 12x slower at 50 (measured
here, 256 hashes per query: ~13k against ~163k hashes/s).

The lookup also brings the inline payload of each response it finds (a left join on the payload's
primary key, up to ``PREFETCH_MAX`` bytes; ``_store/_memory.py``): a hit is nearly always
followed by ``read()``, which then needs no round trip of its own. The bytes are verified on read
like any stored bytes, and the prefetch pauses while they go unread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

from mxm_dataio_async._exceptions import StoreClosedError, StoreError
from mxm_dataio_async._store._memory import CHECKSUM_AT, PayloadMemory
from mxm_dataio_async._store._postgres._rows import RESPONSE_COLUMNS

__all__ = ["LATEST_SQL", "PAYLOAD_SQL", "PREFETCH_SQL", "BatchReader"]

LATEST_SQL: Final = (
    f"SELECT r.* FROM unnest($1::bytea[]) AS wanted(hash) CROSS JOIN LATERAL ("
    f"SELECT {RESPONSE_COLUMNS} FROM responses WHERE request_hash = wanted.hash "
    "AND status = 'ok' ORDER BY fetched_at DESC LIMIT 1) AS r"
)
# The same, with the response's inline payload (NULL when there is none, or it is over $2 bytes).
LATEST_PREFETCH_SQL: Final = (
    f"SELECT r.*, p.data FROM unnest($1::bytea[]) AS wanted(hash) CROSS JOIN LATERAL ("
    f"SELECT {RESPONSE_COLUMNS} FROM responses WHERE request_hash = wanted.hash "
    "AND status = 'ok' ORDER BY fetched_at DESC LIMIT 1) AS r "
    "LEFT JOIN payloads p ON r.checksum IS NOT NULL AND r.size_bytes <= $2 "
    "AND p.sha256 = decode(r.checksum, 'hex') AND p.tier = 'inline'"
)
# Inline payloads by digest, for a read-ahead.
PREFETCH_SQL: Final = (
    "SELECT sha256, data FROM payloads WHERE tier = 'inline' AND data IS NOT NULL "
    "AND sha256 = ANY($1::bytea[])"
)
PAYLOAD_SQL: Final = (
    "SELECT sha256, size_bytes, tier, data FROM payloads WHERE sha256 = ANY($1::bytea[])"
)
_CHUNK: Final = 1000  # keys per query

Futures = dict[bytes, list["asyncio.Future[Any]"]]
Fetch = Callable[[str, str, Sequence[Any]], Awaitable[list[Any]]]


class BatchReader:
    """Answers queued lookups in batches; ``fetch(action, sql, args)`` runs one query (the store
    translates its errors and retries a lost connection)."""

    def __init__(self, fetch: Fetch, memory: PayloadMemory) -> None:
        self._fetch = fetch
        self._memory = memory  # where the inline payloads the lookups bring go
        self._latest: Futures = {}
        self._payloads: Futures = {}
        self._wakeup = asyncio.Event()
        self._closing = False
        self._loop = asyncio.get_running_loop()
        self.batches = 0

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

    async def latest(self, request_hash: bytes) -> Any:
        """The newest OK response row for a hash (``RESPONSE_COLUMNS``), or None."""
        return await self._queue(self._latest, request_hash)

    async def payload(self, digest: bytes) -> Any:
        """The ``(sha256, size_bytes, tier, data)`` row of a payload, or None."""
        return await self._queue(self._payloads, digest)

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
                    limit = self._memory.lookup_limit()  # 0: not now
                    sql, extra = (LATEST_PREFETCH_SQL, (limit,)) if limit else (LATEST_SQL, ())
                    await self._answer(
                        latest, sql, key_index=2, action="look up responses", extra=extra
                    )
                if payloads:
                    await self._answer(payloads, PAYLOAD_SQL, key_index=0, action="read payloads")
        finally:
            err = StoreClosedError("the store closed before this read completed")
            for table in (self._latest, self._payloads):
                for futures in table.values():
                    for fut in futures:
                        if not fut.done():
                            fut.set_exception(err)
                table.clear()

    async def _answer(
        self,
        table: Futures,
        sql: str,
        *,
        key_index: int,
        action: str,
        extra: tuple[Any, ...] = (),
    ) -> None:
        keys = list(table)
        found: dict[bytes, Any] = {}
        try:
            for i in range(0, len(keys), _CHUNK):
                rows = await self._fetch(action, sql, (keys[i : i + _CHUNK], *extra))
                if extra:  # a lookup with its payloads: (sha256, data) of those it brought
                    brought = [
                        (bytes.fromhex(row[CHECKSUM_AT]), row[-1])
                        for row in rows
                        if row[-1] is not None
                    ]
                    if brought:
                        self._memory.found(brought)
                for row in rows:
                    found[bytes(row[key_index])] = row
        except Exception as exc:  # StoreError; anything else is a bug, reported to the waiters
            err = exc if isinstance(exc, StoreError) else StoreError(f"cannot {action}: {exc!r}")
            for futures in table.values():
                for fut in futures:
                    if not fut.done():
                        fut.set_exception(err)
            return
        for key, futures in table.items():
            row = found.get(key)
            for fut in futures:
                if not fut.done():
                    fut.set_result(row)
