"""Copying a whole store into another, across backends (SQLite + files -> PostgreSQL + S3, or
back): every payload verified on the way, nothing duplicated when the copy is run again.

Through the protocols only, in an order that keeps the destination consistent at every moment:
payload bytes first (into the destination's payload store, or inline), then their payload rows,
then sessions, requests and responses, each batch in one transaction that ignores ids already
there. A copy interrupted half-way leaves a destination that verifies clean; running it again
adds only what is missing. Payloads are re-tiered by the destination's ``inline_threshold``.

Checkpoints and leases are not copied: a checkpoint is a position in the source's commit order.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

from mxm_dataio_async._exceptions import IntegrityError
from mxm_dataio_async._store._protocols import TABLES, MetadataStore, PayloadRow, PayloadStore

__all__ = ["CopyReport", "copy_store"]

_ROWS: Final = 500  # rows per destination transaction

CopyProgress = Callable[[str, int], None]
"""``on_progress(phase, done)``: ``payloads``, ``sessions``, ``requests`` or ``responses``."""


class Side(Protocol):
    """What a copy needs of either store (a ``Store`` is one): its two backends and the size
    up to which it keeps payloads inline."""

    @property
    def metadata(self) -> MetadataStore: ...
    @property
    def payloads(self) -> PayloadStore: ...
    @property
    def inline_threshold(self) -> int: ...


@dataclass(frozen=True, slots=True)
class CopyReport:
    """What a copy added to the destination (all zero when it was copied before), and how many
    payload bytes it verified."""

    payloads: int
    objects_written: int
    bytes_verified: int
    sessions: int
    requests: int
    responses: int

    @property
    def added(self) -> int:
        return self.payloads + self.sessions + self.requests + self.responses

    def to_json(self) -> dict[str, Any]:
        return {
            "payloads": self.payloads,
            "objects_written": self.objects_written,
            "bytes_verified": self.bytes_verified,
            "sessions": self.sessions,
            "requests": self.requests,
            "responses": self.responses,
        }


async def copy_store(
    source: Side, target: Side, *, on_progress: CopyProgress | None = None
) -> CopyReport:
    """Copy every session, request, response and payload of ``source`` into ``target``."""
    progress = on_progress or (lambda phase, done: None)
    added = {"payloads": 0, "sessions": 0, "requests": 0, "responses": 0}
    written = verified = seen = 0
    batch: list[PayloadRow] = []
    try:
        async for row in source.metadata.iter_payload_rows():
            moved, wrote = await _move(source, target, row)
            batch.append(moved)
            written += wrote
            verified += row.size
            seen += 1
            if len(batch) >= 256:
                added["payloads"] += (await target.metadata.import_rows(batch, {}))["payloads"]
                batch = []
                progress("payloads", seen)
    except Exception:
        # The objects copied so far get their rows: a failed copy leaves unreferenced payloads
        # (gc's to free, or the rerun's to use), not orphan objects.
        if batch:
            await target.metadata.import_rows(batch, {})
        raise
    if batch:
        added["payloads"] += (await target.metadata.import_rows(batch, {}))["payloads"]
    progress("payloads", seen)
    for table in TABLES:
        done = 0
        rows: list[dict[str, Any]] = []
        async for raw in source.metadata.iter_rows(table):
            rows.append(raw)
            if len(rows) >= _ROWS:
                added[table] += (await target.metadata.import_rows([], {table: rows}))[table]
                done += len(rows)
                rows = []
                progress(table, done)
        if rows:
            added[table] += (await target.metadata.import_rows([], {table: rows}))[table]
            done += len(rows)
        progress(table, done)
    return CopyReport(
        added["payloads"],
        written,
        verified,
        added["sessions"],
        added["requests"],
        added["responses"],
    )


async def _move(source: Side, target: Side, row: PayloadRow) -> tuple[PayloadRow, int]:
    """One payload into the target's tier for its size: its row for the target, and whether an
    object was written. The bytes are verified against the sha256 whichever way they go."""
    hx = row.digest.hex()
    if row.size <= target.inline_threshold:
        if row.tier == "inline":
            data = row.data or b""
            if len(data) != row.size or hashlib.sha256(data).digest() != row.digest:
                raise IntegrityError(f"payload {hx} is corrupt in the source; nothing copied")
        else:
            data = await source.payloads.get(row.digest, row.size)  # verified
        return PayloadRow(row.digest, row.size, "inline", data), 0
    if await target.payloads.stat(row.digest) is not None:
        return PayloadRow(row.digest, row.size, "file"), 0
    if row.tier == "inline":
        chunks: AsyncIterator[bytes] = _once(row.data or b"")
    else:
        chunks = source.payloads.iter(row.digest, row.size)  # raises at the end if corrupt
    digest, size = await target.payloads.put_stream(chunks)
    if (digest, size) != (row.digest, row.size):
        await target.payloads.delete(digest)
        raise IntegrityError(
            f"payload {hx} is corrupt in the source ({size} bytes with another sha256); not copied"
        )
    return PayloadRow(row.digest, row.size, "file"), 1


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data
