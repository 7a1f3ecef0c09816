"""``gc`` and ``prune`` through the storage protocols (any backend).

gc is safe beside running writers. The unreferenced payload rows are deleted by the metadata store
in one transaction that re-checks they are still unreferenced (a fetch's payload and response rows
commit together, so no in-flight fetch loses its payload), and objects are deleted only when older
than ``grace``: an object is put before the row naming it commits. Each object is re-checked for a
row just before it is removed. One narrow window remains: a fetch whose bytes already sit in the
payload store as an *old* unreferenced object re-uses it (a local file is touched, so its age
shows the reuse; an object store may not), and if gc removes it between that fetch's staging and
its commit, ``verify`` reports the payload missing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Final

from mxm_dataio_async._durations import Duration, seconds_of
from mxm_dataio_async._store._protocols import (
    MetadataStore,
    PayloadRow,
    PayloadStore,
    StoredObject,
)

__all__ = ["DEFAULT_GC_GRACE", "GcReport", "PruneReport", "gc", "prune"]

#: Objects younger than this (seconds) may belong to a write whose row has not committed yet.
DEFAULT_GC_GRACE: Final = 3600.0
_PAGE: Final = 500


# -- gc ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GcReport:
    """What :meth:`Store.gc` removed (or, with ``dry_run``, would remove).

    ``payload_rows``/``payload_bytes``: payloads no response or request names (inline bytes are
    freed inside the database file, which SQLite reuses; ``VACUUM`` shrinks it). ``kept_recent``:
    files younger than the grace period, left alone because a write may still be committing them.
    """

    dry_run: bool
    payload_rows: int = 0
    payload_bytes: int = 0
    payload_files: list[Path] = field(default_factory=list)
    orphan_files: list[Path] = field(default_factory=list)
    orphan_bytes: int = 0
    temp_files: list[Path] = field(default_factory=list)
    temp_bytes: int = 0
    kept_recent: int = 0

    @property
    def freed_bytes(self) -> int:
        return self.payload_bytes + self.orphan_bytes + self.temp_bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "payload_rows": self.payload_rows,
            "payload_bytes": self.payload_bytes,
            "payload_files": [str(p) for p in self.payload_files],
            "orphan_files": [str(p) for p in self.orphan_files],
            "orphan_bytes": self.orphan_bytes,
            "temp_files": [str(p) for p in self.temp_files],
            "temp_bytes": self.temp_bytes,
            "kept_recent": self.kept_recent,
            "freed_bytes": self.freed_bytes,
        }


async def gc(
    metadata: MetadataStore,
    payloads: PayloadStore,
    *,
    dry_run: bool = False,
    grace: Duration = DEFAULT_GC_GRACE,
) -> GcReport:
    """Remove payloads nothing names (rows and objects), orphan objects and temp leftovers."""
    grace_s = seconds_of(grace)
    kept = 0
    candidates: list[PayloadRow] = []
    objects: dict[bytes, StoredObject] = {}
    for row in await metadata.unreferenced_payloads():
        if row.tier == "file":
            obj = await payloads.stat(row.digest)
            if obj is not None and obj.age < grace_s:
                kept += 1  # a fetch may be re-using this object right now
                continue
            if obj is not None:
                objects[row.digest] = obj
        candidates.append(row)
    if dry_run:
        deleted = candidates
        removed = [Path(o.location) for o in objects.values()]
    else:
        gone = set(await metadata.delete_payloads([r.digest for r in candidates]))
        deleted = [r for r in candidates if r.digest in gone]
        removed = []
        for row in deleted:
            obj = objects.get(row.digest)
            if obj is None:
                continue
            # After the rows' commit: a crash here leaves an orphan object (removed next time),
            # never a row without its bytes. Re-check: a fetch of the same bytes may have
            # re-added the row, or re-used the object.
            if await metadata.present_payloads([row.digest]):
                continue
            current = await payloads.stat(row.digest)
            if current is not None and current.age >= grace_s and await payloads.delete(row.digest):
                removed.append(Path(obj.location))
    orphans, orphan_bytes, young = await _orphans(metadata, payloads, grace_s, dry_run)
    temps: list[Path] = []
    temp_bytes = 0
    async for obj in payloads.leftovers(grace_s):
        if dry_run or await payloads.delete(obj):
            temps.append(Path(obj.location))
            temp_bytes += obj.size
    return GcReport(
        dry_run,
        len(deleted),
        sum(r.size for r in deleted),
        removed,
        orphans,
        orphan_bytes,
        temps,
        temp_bytes,
        kept + young,
    )


async def _orphans(
    metadata: MetadataStore, payloads: PayloadStore, grace: float, dry_run: bool
) -> tuple[list[Path], int, int]:
    """Objects no payload row names: removed when older than ``grace``, counted when younger."""
    orphans: list[Path] = []
    orphan_bytes = young = 0
    page: list[StoredObject] = []

    async def flush() -> None:
        nonlocal orphan_bytes, young
        owned = await metadata.present_payloads(
            [o.digest for o in page if o.digest is not None], tier="file"
        )
        for obj in page:
            if obj.digest in owned:
                continue
            if obj.age < grace:
                young += 1  # possibly an object whose row is about to commit
            elif dry_run or await payloads.delete(obj):
                orphans.append(Path(obj.location))
                orphan_bytes += obj.size
        page.clear()

    async for obj in payloads.list():
        page.append(obj)
        if len(page) >= _PAGE:
            await flush()
    await flush()
    return orphans, orphan_bytes, young


# -- prune ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PruneReport:
    """What :meth:`Store.prune` deleted (or, with ``dry_run``, would delete).

    ``garbage_payloads``/``garbage_bytes``: payloads no row names any more; ``gc`` removes them.
    """

    dry_run: bool
    cutoff: datetime
    responses: int = 0
    response_bytes: int = 0
    requests: int = 0
    garbage_payloads: int = 0
    garbage_bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "cutoff": self.cutoff.isoformat(),
            "responses": self.responses,
            "response_bytes": self.response_bytes,
            "requests": self.requests,
            "garbage_payloads": self.garbage_payloads,
            "garbage_bytes": self.garbage_bytes,
        }


async def prune(
    metadata: MetadataStore,
    *,
    older_than: Duration,
    source: str | None = None,
    bucket: str | None = None,
    dry_run: bool = False,
    now: datetime,
) -> PruneReport:
    """Delete responses fetched before ``now - older_than`` (of ``source`` and ``as_of_bucket``
    ``bucket``, if given) and the requests left without a response, in one transaction.

    Sessions are kept (the record of what ran). The payloads the deleted rows named become garbage
    for :func:`gc`. ``older_than`` is a timedelta, seconds, or a text like ``"30d"``.
    """
    seconds = seconds_of(older_than)
    if seconds < 0:
        raise ValueError("older_than must not be negative")
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware (e.g. datetime.now(UTC))")
    cutoff = now - timedelta(seconds=seconds)
    counts = await metadata.prune(cutoff=cutoff, source=source, bucket=bucket, dry_run=dry_run)
    return PruneReport(
        dry_run,
        cutoff,
        counts.responses,
        counts.response_bytes,
        counts.requests,
        counts.garbage_payloads,
        counts.garbage_bytes,
    )
