"""Session bundles: one tar file that another machine imports into its store and replays offline.

Layout (a plain tar; an output named ``*.tar.gz`` or ``*.tgz`` is gzip-compressed)::

    manifest.json        format, version, schema version, session id, counts, payload list
    sessions.jsonl       rows as JSON objects keyed by column (BLOB hashes as hex)
    requests.jsonl
    responses.jsonl
    payloads/<sha256>    the exact bytes of every payload a row names

A session that was served from cache carries the responses it was served (with their requests and
sessions): replaying it with ``cache_mode="only_if_cached"`` needs them.

Import verifies every payload against its sha256 before any row is written, puts large payloads
into the file tier first (temp, fsync, rename: as the store itself does, so a failed import can
leave orphan files for gc, never rows without bytes), then inserts every row in one
``BEGIN IMMEDIATE`` transaction with ``INSERT OR IGNORE``: ids and checksums are primary keys, so
importing a bundle twice adds nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sqlite3
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

from mxm_dataio_async._exceptions import IntegrityError, StoreError
from mxm_dataio_async._models import new_id, utcnow
from mxm_dataio_async._store._maintenance import (
    DEFAULT_BUSY_TIMEOUT,
    _batches,
    _digest_of,
    _in_thread,
    _marks,
    _present,
    _ts,
    connection,
    resolve_session,
    transaction,
)
from mxm_dataio_async._store._payloads import PayloadFiles
from mxm_dataio_async._store._schema import DB_NAME, DEFAULT_INLINE_THRESHOLD, SCHEMA_VERSION
from mxm_dataio_async._store._writer import REQUEST_COLUMNS, RESPONSE_COLUMNS, SESSION_COLUMNS

__all__ = ["BUNDLE_FORMAT", "ExportReport", "ImportReport", "export_session", "import_bundle"]

BUNDLE_FORMAT: Final = "mxm-dataio-bundle"
BUNDLE_VERSION: Final = 1
_CHUNK: Final = 256 * 1024
_TABLES: Final = {
    "sessions": SESSION_COLUMNS.replace(" ", "").split(","),
    "requests": REQUEST_COLUMNS.replace(" ", "").split(","),
    "responses": RESPONSE_COLUMNS.replace(" ", "").split(","),
}
_BLOBS: Final = {"hash", "request_hash"}  # BLOB columns, carried as hex text


@dataclass(frozen=True, slots=True)
class ExportReport:
    path: Path
    session_id: str
    sessions: int
    requests: int
    responses: int
    payloads: int
    payload_bytes: int


@dataclass(frozen=True, slots=True)
class ImportReport:
    """Rows and payloads the import added (all zero when the bundle was imported before)."""

    path: Path
    session_id: str
    sessions: int
    requests: int
    responses: int
    payloads: int
    files_written: int
    bytes_verified: int

    @property
    def added(self) -> int:
        return self.sessions + self.requests + self.responses + self.payloads


# -- export --------------------------------------------------------------------------------------


def _json_row(columns: Sequence[str], row: Sequence[Any]) -> bytes:
    pairs = zip(columns, row, strict=True)
    obj = {c: (bytes(v).hex() if isinstance(v, bytes) else v) for c, v in pairs}
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


class _Spool:
    """Rows of one table written to a temporary file (a big session never sits in memory)."""

    def __init__(self, table: str, file: IO[bytes]) -> None:
        self.table = table
        self.columns = _TABLES[table]
        self.file = file
        self.count = 0
        self.ids: set[str] = set()

    def select(self, conn: sqlite3.Connection, where: str, params: Sequence[Any]) -> list[Any]:
        """Write the rows matching ``where`` (skipping ids already written); return them."""
        rows = conn.execute(
            f"SELECT {', '.join(self.columns)} FROM {self.table} WHERE {where}", params
        ).fetchall()
        fresh = [r for r in rows if r[0] not in self.ids]
        for row in fresh:
            self.ids.add(row[0])
            self.file.write(_json_row(self.columns, row))
        self.count += len(fresh)
        return fresh

    def by_ids(self, conn: sqlite3.Connection, ids: set[str]) -> list[Any]:
        wanted = sorted(ids - self.ids)
        out: list[Any] = []
        for batch in _batches(wanted):
            out += self.select(conn, f"id IN ({_marks(len(batch))})", batch)
        return out


class _HashingReader:
    """Reads a file for tarfile while hashing what it hands over."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f = f
        self.hasher = hashlib.sha256()
        self.seen = 0

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        self.hasher.update(data)
        self.seen += len(data)
        return data


def _add_bytes(tar: tarfile.TarFile, name: str, data: Any, size: int) -> None:
    """Add ``size`` bytes read from ``data`` (bytes, or anything with ``read(n)``)."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = int(utcnow().timestamp())
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data) if isinstance(data, bytes) else data)


def _export_sync(root: Path, session_ref: str, out: Path, busy_timeout: float) -> ExportReport:
    files = PayloadFiles(root, 0)
    part = out.with_name(out.name + ".part")
    with contextlib.ExitStack() as stack:
        spools = {t: _Spool(t, stack.enter_context(tempfile.TemporaryFile())) for t in _TABLES}
        return _export_into(root, files, spools, session_ref, out, part, busy_timeout)


def _export_into(
    root: Path,
    files: PayloadFiles,
    spools: dict[str, _Spool],
    session_ref: str,
    out: Path,
    part: Path,
    busy_timeout: float,
) -> ExportReport:
    try:
        with connection(root, busy_timeout) as conn, transaction(conn, write=False):
            session_id = resolve_session(conn, session_ref)
            sessions, requests, responses = spools.values()
            q_served, q_sent = (requests.columns.index(c) for c in ("served_from", "sent_checksum"))
            r_req, r_sess, r_sum = (
                responses.columns.index(c) for c in ("request_id", "session_id", "checksum")
            )
            sessions.select(conn, "id = ?", (session_id,))
            reqs = requests.select(conn, "session_id = ?", (session_id,))
            resps = responses.select(conn, "session_id = ?", (session_id,))
            # Cache hits name the responses they were served: carry those (and their requests
            # and sessions) so the bundle replays.
            extra = responses.by_ids(conn, {r[q_served] for r in reqs if r[q_served] is not None})
            requests.by_ids(conn, {r[r_req] for r in extra})
            sessions.by_ids(conn, {r[r_sess] for r in extra})
            checksums = {r[r_sum] for r in (*resps, *extra) if r[r_sum] is not None}
            checksums |= {r[q_sent] for r in reqs if r[q_sent] is not None}
            digests = sorted(d for c in checksums if (d := _digest_of(c)) is not None)
            meta: dict[bytes, tuple[int, str]] = {}
            for batch in _batches(digests):
                for digest, size, tier in conn.execute(
                    f"SELECT sha256, size_bytes, tier FROM payloads "
                    f"WHERE sha256 IN ({_marks(len(batch))})",
                    batch,
                ):
                    meta[bytes(digest)] = (size, tier)
            missing = sorted(c for c in checksums if _digest_of(c) not in meta)
            if missing:
                raise IntegrityError(
                    f"payload {missing[0]} named by session {session_id} is not in the store "
                    f"({len(missing)} missing); run `mxm-dataio verify`"
                )
            manifest = {
                "format": BUNDLE_FORMAT,
                "version": BUNDLE_VERSION,
                "schema_version": SCHEMA_VERSION,
                "created_at": _ts(utcnow()),
                "session_id": session_id,
                "counts": {t: s.count for t, s in spools.items()},
                "payloads": [{"sha256": d.hex(), "size": meta[d][0]} for d in digests],
            }
            with _open_tar_out(part, gz=out.name.endswith((".gz", ".tgz"))) as tar:
                body = json.dumps(manifest, indent=2).encode()
                _add_bytes(tar, "manifest.json", body, len(body))
                for table, spool in spools.items():
                    size = spool.file.tell()
                    spool.file.seek(0)
                    _add_bytes(tar, f"{table}.jsonl", spool.file, size)
                total = 0
                for digest in digests:
                    total += _add_payload(tar, conn, files, digest, *meta[digest])
        os.replace(part, out)
    except OSError as exc:
        raise StoreError(f"cannot write bundle {out}: {exc.strerror or exc}") from exc
    finally:
        with contextlib.suppress(OSError):
            part.unlink()
    return ExportReport(
        out, session_id, sessions.count, requests.count, responses.count, len(digests), total
    )


def _add_payload(
    tar: tarfile.TarFile,
    conn: sqlite3.Connection,
    files: PayloadFiles,
    digest: bytes,
    size: int,
    tier: str,
) -> int:
    """Add one payload to the bundle, verified against its sha256; returns its size."""
    name, hx = f"payloads/{digest.hex()}", digest.hex()
    if tier == "inline":
        row = conn.execute("SELECT data FROM payloads WHERE sha256 = ?", (digest,)).fetchone()
        data = b"" if row is None or row[0] is None else bytes(row[0])
        if len(data) != size or hashlib.sha256(data).digest() != digest:
            raise IntegrityError(f"payload {hx} is corrupt in the database; not exported")
        _add_bytes(tar, name, data, size)
        return size
    path = files.path_for(digest)
    corrupt = IntegrityError(f"payload {hx} is corrupt on disk ({path}); not exported")
    try:
        with open(path, "rb") as f:
            reader = _HashingReader(f)
            try:
                _add_bytes(tar, name, reader, size)
            except OSError:
                if reader.seen < size:  # tarfile's "unexpected end of data": a short file
                    raise corrupt from None
                raise
    except FileNotFoundError:
        raise IntegrityError(f"payload {hx} is missing from the file tier ({path})") from None
    if reader.seen != size or reader.hasher.digest() != digest:
        raise corrupt
    return size


async def export_session(
    root: str | os.PathLike[str],
    session: str,
    path: str | os.PathLike[str],
    *,
    busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
) -> ExportReport:
    """Write session ``session`` (an id or a unique prefix) as a self-contained bundle at ``path``.

    Every payload is verified while it is copied; the file appears only when complete.
    """
    out = Path(path)
    return await _in_thread(lambda: _export_sync(Path(root), session, out, busy_timeout))


# -- import --------------------------------------------------------------------------------------


def _open_tar_out(path: Path, *, gz: bool) -> tarfile.TarFile:
    return tarfile.open(path, "w:gz") if gz else tarfile.open(path, "w")


def _open_tar_in(path: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(path, "r:*")
    except FileNotFoundError:
        raise StoreError(f"no bundle at {path}") from None
    except (tarfile.TarError, OSError) as exc:
        raise StoreError(f"cannot read bundle {path}: {exc}") from exc


def _member(tar: tarfile.TarFile, name: str) -> IO[bytes]:
    try:
        info = tar.getmember(name)
    except KeyError:
        raise StoreError(f"not a complete bundle: {name} is missing") from None
    f = tar.extractfile(info) if info.isreg() else None
    if f is None:
        raise StoreError(f"not a valid bundle: {name} is not a regular file")
    return f


def _manifest(tar: tarfile.TarFile) -> tuple[dict[str, Any], list[tuple[bytes, int]]]:
    try:
        manifest = json.loads(_member(tar, "manifest.json").read())
    except ValueError as exc:
        raise StoreError(f"not a valid bundle: manifest.json is not JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise StoreError("not an mxm-dataio bundle (manifest.json has another format)")
    if (
        manifest.get("version") != BUNDLE_VERSION
        or manifest.get("schema_version") != SCHEMA_VERSION
    ):
        raise StoreError(
            f"bundle version {manifest.get('version')} / schema {manifest.get('schema_version')} "
            f"is not supported by this release (bundle {BUNDLE_VERSION}, schema {SCHEMA_VERSION})"
        )
    payloads: list[tuple[bytes, int]] = []
    for entry in manifest.get("payloads", []):
        digest = _digest_of(str(entry.get("sha256", "")))
        size = entry.get("size")
        if digest is None or not isinstance(size, int) or size < 0:
            raise StoreError(f"not a valid bundle: bad payload entry {entry!r}")
        payloads.append((digest, size))
    return manifest, payloads


def _read_verified(
    tar: tarfile.TarFile, digest: bytes, size: int, sink: Callable[[bytes], object] | None = None
) -> bytes:
    """Read ``payloads/<sha256>`` in chunks, handing them to ``sink`` (else keeping them in memory);
    raise unless the bytes verify."""
    hx = digest.hex()
    src = _member(tar, f"payloads/{hx}")
    hasher, seen, kept = hashlib.sha256(), 0, []
    while chunk := src.read(_CHUNK):
        hasher.update(chunk)
        seen += len(chunk)
        if sink is None:
            kept.append(chunk)
        else:
            sink(chunk)
    if seen != size or hasher.digest() != digest:
        raise IntegrityError(
            f"bundle payload {hx} does not match its sha256 ({seen} bytes, {size} listed); "
            "nothing was imported"
        )
    return b"".join(kept)


def _stage_file(tar: tarfile.TarFile, files: PayloadFiles, digest: bytes, size: int) -> bool:
    """Verify a large payload and put it in the file tier; False if it was already there."""
    final = files.path_for(digest)
    if final.exists():
        _read_verified(tar, digest, size, lambda _chunk: None)
        return False
    files.tmp.mkdir(parents=True, exist_ok=True)
    temp = files.tmp / f"{os.getpid()}-{new_id()}.part"
    try:
        with open(temp, "wb") as f:
            _read_verified(tar, digest, size, f.write)
            f.flush()
            os.fsync(f.fileno())
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(temp, final)
    finally:
        with contextlib.suppress(OSError):
            temp.unlink()
    return True


def _rows(tar: tarfile.TarFile, table: str) -> Iterator[tuple[Any, ...]]:
    columns = _TABLES[table]
    for n, line in enumerate(_member(tar, f"{table}.jsonl"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise StoreError(f"not a valid bundle: {table}.jsonl line {n}: {exc}") from None
        if not isinstance(obj, dict) or set(obj) != set(columns):
            raise StoreError(f"not a valid bundle: {table}.jsonl line {n} has other columns")
        try:
            yield tuple(
                bytes.fromhex(obj[c]) if c in _BLOBS and obj[c] is not None else obj[c]
                for c in columns
            )
        except (TypeError, ValueError):
            raise StoreError(f"not a valid bundle: {table}.jsonl line {n}: bad hash") from None


def _insert_rows(conn: sqlite3.Connection, tar: tarfile.TarFile, table: str) -> int:
    columns = _TABLES[table]
    sql = f"INSERT OR IGNORE INTO {table} ({', '.join(columns)}) VALUES ({_marks(len(columns))})"
    named_by = {"responses": "checksum", "requests": "sent_checksum"}.get(table)
    ref = None if named_by is None else columns.index(named_by)
    added = 0
    batch: list[tuple[Any, ...]] = []

    def flush() -> int:
        if ref is not None:
            named = {r[ref] for r in batch if r[ref] is not None}
            known = _present(
                conn, [d for c in named if (d := _digest_of(c)) is not None], tier=None
            )
            lost = sorted(c for c in named if _digest_of(c) not in known)
            if lost:
                raise IntegrityError(f"bundle rows name payload {lost[0]}, which it does not hold")
        before = conn.total_changes
        conn.executemany(sql, batch)
        batch.clear()
        return conn.total_changes - before

    for row in _rows(tar, table):
        batch.append(row)
        if len(batch) >= 500:
            added += flush()
    if batch:
        added += flush()
    return added


def _import_sync(
    root: Path, path: Path, inline_threshold: int, busy_timeout: float
) -> ImportReport:
    files = PayloadFiles(root, inline_threshold)
    with _open_tar_in(path) as tar:
        manifest, payloads = _manifest(tar)
        # 1. Every payload verified (large ones written to the file tier) before any row.
        written = verified = 0
        for digest, size in payloads:
            if size > inline_threshold:
                written += _stage_file(tar, files, digest, size)
            else:
                _read_verified(tar, digest, size, lambda _chunk: None)
            verified += size
        # 2. Every row in one transaction; INSERT OR IGNORE makes a second import a no-op.
        now = _ts(utcnow())
        with connection(root, busy_timeout) as conn, transaction(conn, write=True):
            before = conn.total_changes
            for digest, size in payloads:
                inline = size <= inline_threshold
                data = _read_verified(tar, digest, size) if inline else None
                conn.execute(
                    "INSERT OR IGNORE INTO payloads (sha256, size_bytes, tier, data, created_at) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (digest, size, "inline" if inline else "file", data, now),
                )
            added_payloads = conn.total_changes - before
            # Sessions and requests first: a reader never sees a response without its request.
            counts = {t: _insert_rows(conn, tar, t) for t in ("sessions", "requests", "responses")}
    return ImportReport(
        path,
        str(manifest.get("session_id")),
        counts["sessions"],
        counts["requests"],
        counts["responses"],
        added_payloads,
        written,
        verified,
    )


async def import_bundle(
    root: str | os.PathLike[str],
    path: str | os.PathLike[str],
    *,
    inline_threshold: int = DEFAULT_INLINE_THRESHOLD,
    busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
) -> ImportReport:
    """Import a bundle made by :func:`export_session` into the store at ``root`` (created if need
    be). Idempotent; nothing is written unless every payload matches its sha256."""
    root = Path(root)
    if not (root / DB_NAME).exists():
        from mxm_dataio_async._store._store import Store  # here: _store imports this module

        async with Store(root, inline_threshold=inline_threshold):
            pass  # creates the folders and the schema
    return await _in_thread(lambda: _import_sync(root, Path(path), inline_threshold, busy_timeout))
