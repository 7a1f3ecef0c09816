"""``gc`` and ``prune``: free what no row names, delete old responses; each decides and deletes
in one ``BEGIN IMMEDIATE`` transaction (see ``_maintenance.py``)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Final

from mxm_dataio_async._exceptions import StoreError
from mxm_dataio_async._models import utcnow
from mxm_dataio_async._store._maintenance import (
    DEFAULT_BUSY_TIMEOUT,
    Duration,
    _age,
    _in_thread,
    _payload_file_rows,
    _present,
    _seconds,
    _size,
    _temp_leftovers,
    _ts,
    connection,
    transaction,
)
from mxm_dataio_async._store._payloads import PayloadFiles

__all__ = ["DEFAULT_GC_GRACE", "GcReport", "PruneReport", "gc", "prune"]

#: Files younger than this (seconds) may belong to a write whose row has not committed yet.
DEFAULT_GC_GRACE: Final = 3600.0

# Checksums some row still names: what gc must keep. NOT IN materialises the set once.
_REFERENCED: Final = (
    "SELECT checksum FROM responses WHERE checksum IS NOT NULL "
    "UNION SELECT sent_checksum FROM requests WHERE sent_checksum IS NOT NULL"
)
_UNREFERENCED: Final = (
    f"SELECT sha256, size_bytes, tier FROM payloads WHERE lower(hex(sha256)) NOT IN ({_REFERENCED})"
)


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


def _unlink(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise StoreError(f"cannot remove {path}: {exc.strerror or exc}") from exc
    return True


def _gc_sync(root: Path, busy_timeout: float, dry_run: bool, grace: float) -> GcReport:
    files = PayloadFiles(root, 0)
    now = time.time()
    rows = byte_count = kept = 0
    doomed_files: list[tuple[bytes, Path]] = []
    with connection(root, busy_timeout) as conn:
        with transaction(conn, write=True, commit=not dry_run):
            doomed: list[bytes] = []
            for digest_raw, size, tier in conn.execute(_UNREFERENCED).fetchall():
                digest = bytes(digest_raw)
                if tier == "file":
                    path = files.path_for(digest)
                    age = _age(path, now)
                    if age is not None and age[0] < grace:
                        kept += 1  # a fetch may be re-using this file right now
                        continue
                    if age is not None:
                        doomed_files.append((digest, path))
                doomed.append(digest)
                rows += 1
                byte_count += size
            conn.executemany("DELETE FROM payloads WHERE sha256 = ?", [(d,) for d in doomed])
        removed: list[Path] = []
        for digest, path in doomed_files:
            if dry_run:
                removed.append(path)
                continue
            # After the commit: a crash here leaves an orphan file (removed next time), never a
            # row without its file. Re-check: a fetch of the same bytes may have re-added the row.
            if _present(conn, [digest], tier=None):
                continue
            current = _age(path, time.time())
            if current is not None and current[0] >= grace and _unlink(path):
                removed.append(path)
        orphans: list[Path] = []
        orphan_bytes = 0
        for path, seconds, size, owned in _payload_file_rows(conn, files, now):
            if owned:
                continue
            if seconds < grace:
                kept += 1  # possibly a file whose row is about to commit
            elif dry_run or _unlink(path):
                orphans.append(path)
                orphan_bytes += size
    temps: list[Path] = []
    temp_bytes = 0
    for path in _temp_leftovers(files, grace, now):
        size = _size(path)
        if dry_run or _unlink(path):
            temps.append(path)
            temp_bytes += size
    return GcReport(
        dry_run, rows, byte_count, removed, orphans, orphan_bytes, temps, temp_bytes, kept
    )


async def gc(
    root: str | os.PathLike[str],
    *,
    dry_run: bool = False,
    grace: Duration = DEFAULT_GC_GRACE,
    busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
) -> GcReport:
    """Remove payloads nothing names (rows and files), orphan files and temp leftovers.

    Safe beside running writers: the unreferenced payload rows are found and deleted in one
    ``BEGIN IMMEDIATE`` transaction (a fetch's payload and response rows commit together, so no
    in-flight fetch loses its payload), and files are deleted only when older than ``grace``
    (a file is written before the row naming it commits). A file is re-checked for a row just
    before it is unlinked. One narrow window remains: a fetch whose bytes already sit on disk as
    an *old* unreferenced file re-uses that file without rewriting it, so its age does not show
    the reuse; if gc unlinks it between that fetch's staging and its commit, ``verify`` reports
    the payload missing.
    """
    return await _in_thread(lambda: _gc_sync(Path(root), busy_timeout, dry_run, _seconds(grace)))


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


def _prune_sync(
    root: Path,
    busy_timeout: float,
    cutoff: datetime,
    source: str | None,
    bucket: str | None,
    dry_run: bool,
) -> PruneReport:
    where, params = ["fetched_at < ?"], [_ts(cutoff)]
    if source is not None:
        where.append("source = ?")
        params.append(source)
    if bucket is not None:
        where.append("as_of_bucket = ?")
        params.append(bucket)
    with (
        connection(root, busy_timeout) as conn,
        transaction(conn, write=True, commit=not dry_run),
    ):
        conn.execute("CREATE TEMP TABLE doomed (id TEXT PRIMARY KEY, request_id TEXT)")
        conn.execute(
            f"INSERT INTO temp.doomed SELECT id, request_id FROM responses "
            f"WHERE {' AND '.join(where)}",
            params,
        )
        responses, response_bytes = conn.execute(
            "SELECT count(*), coalesce(sum(size_bytes), 0) FROM responses "
            "WHERE id IN (SELECT id FROM temp.doomed)"
        ).fetchone()
        conn.execute("DELETE FROM responses WHERE id IN (SELECT id FROM temp.doomed)")
        # Requests left with no response of their own, and cache hits (and coalesced
        # duplicates) that were served a deleted response.
        requests = conn.execute(
            "DELETE FROM requests WHERE (id IN (SELECT request_id FROM temp.doomed) "
            "AND id NOT IN (SELECT request_id FROM responses "
            "WHERE request_id IN (SELECT request_id FROM temp.doomed))) "
            "OR served_from IN (SELECT id FROM temp.doomed)"
        ).rowcount
        garbage, garbage_bytes = conn.execute(
            f"SELECT count(*), coalesce(sum(size_bytes), 0) FROM ({_UNREFERENCED})"
        ).fetchone()
        conn.execute("DROP TABLE temp.doomed")
    return PruneReport(dry_run, cutoff, responses, response_bytes, requests, garbage, garbage_bytes)


async def prune(
    root: str | os.PathLike[str],
    *,
    older_than: Duration,
    source: str | None = None,
    bucket: str | None = None,
    dry_run: bool = False,
    now: datetime | None = None,
    busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
) -> PruneReport:
    """Delete responses fetched before ``now - older_than`` (of ``source`` and ``as_of_bucket``
    ``bucket``, if given) and the requests left without a response, in one transaction.

    Sessions are kept (the record of what ran). The payloads the deleted rows named become garbage
    for :func:`gc`. ``older_than`` is a timedelta, seconds, or a text like ``"30d"``.
    """
    seconds = _seconds(older_than)
    if seconds < 0:
        raise ValueError("older_than must not be negative")
    moment = now if now is not None else utcnow()
    if moment.tzinfo is None:
        raise ValueError("now must be timezone-aware (e.g. datetime.now(UTC))")
    cutoff = moment - timedelta(seconds=seconds)
    return await _in_thread(
        lambda: _prune_sync(Path(root), busy_timeout, cutoff, source, bucket, dry_run)
    )
