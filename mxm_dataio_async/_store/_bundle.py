"""Session bundles: one tar file that another store imports and replays offline.

Layout (a plain tar; an output named ``*.tar.gz`` or ``*.tgz`` is gzip-compressed)::

    manifest.json        format, version, schema version, session id, counts, payload list
    sessions.jsonl       rows as JSON objects keyed by column (hashes as hex)
    requests.jsonl
    responses.jsonl
    payloads/<sha256>    the exact bytes of every payload a row names

A session that was served from cache carries the responses it was served (with their requests and
sessions): replaying it with ``cache_mode="only_if_cached"`` needs them.

Export and import go through the storage protocols, so a bundle moves a session between any two
backends. Import verifies every payload against its sha256 before any row is written, puts large
payloads into the payload store first (so a failed import can leave unreferenced objects for gc,
never rows without bytes), then inserts every row in one transaction that ignores ids already
present: importing a bundle twice adds nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tarfile
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

import anyio.from_thread
import anyio.to_thread

from mxm_dataio_async._exceptions import IntegrityError, StoreError
from mxm_dataio_async._models import utcnow
from mxm_dataio_async._store._protocols import (
    TABLES,
    MetadataStore,
    PayloadRow,
    PayloadStore,
    Table,
)
from mxm_dataio_async._store._sqlite import SCHEMA_VERSION

__all__ = ["BUNDLE_FORMAT", "ExportReport", "ImportReport", "export_session", "import_bundle"]

BUNDLE_FORMAT: Final = "mxm-dataio-bundle"
BUNDLE_VERSION: Final = 1
_CHUNK: Final = 256 * 1024


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


class _Spool:
    """Rows of one table written to a temporary file (a big session never sits in memory)."""

    def __init__(self, table: Table, file: IO[bytes]) -> None:
        self.table = table
        self.file = file
        self.count = 0
        self.ids: set[str] = set()

    async def add(self, rows: AsyncIterator[dict[str, Any]]) -> list[dict[str, Any]]:
        """Write the rows not written yet; return them."""
        fresh = []
        async for row in rows:
            if row["id"] in self.ids:
                continue
            self.ids.add(row["id"])
            self.file.write(json.dumps(row, separators=(",", ":"), ensure_ascii=False).encode())
            self.file.write(b"\n")
            fresh.append(row)
        self.count += len(fresh)
        return fresh


async def _next_chunk(chunks: AsyncIterator[bytes]) -> bytes:
    return await chunks.__anext__()


class _BlockingChunks:
    """A file-like ``read(n)`` for tarfile (in a worker thread) over an async chunk iterator
    (on the event loop); an error of the iterator (``IntegrityError``) surfaces in ``read``."""

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self._chunks = chunks
        self._buffer = bytearray()
        self._done = False

    def _next(self) -> None:
        try:
            self._buffer += anyio.from_thread.run(_next_chunk, self._chunks)
        except StopAsyncIteration:
            self._done = True

    def read(self, size: int = -1) -> bytes:
        while not self._done and (size < 0 or len(self._buffer) < size):
            self._next()
        n = len(self._buffer) if size < 0 else min(size, len(self._buffer))
        out = bytes(self._buffer[:n])
        del self._buffer[:n]
        return out


def _add_bytes(tar: tarfile.TarFile, name: str, data: Any, size: int) -> None:
    """Add ``size`` bytes read from ``data`` (bytes, or anything with ``read(n)``)."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = int(utcnow().timestamp())
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data) if isinstance(data, bytes) else data)


async def export_session(
    metadata: MetadataStore,
    payloads: PayloadStore,
    session: str,
    path: str | os.PathLike[str],
) -> ExportReport:
    """Write session ``session`` (an id or a unique prefix) as a self-contained bundle at ``path``.

    Every payload is verified while it is copied; the file appears only when complete.
    """
    out = Path(path)
    session_id = await metadata.resolve_session(session)
    with contextlib.ExitStack() as stack:
        spools = {t: _Spool(t, stack.enter_context(tempfile.TemporaryFile())) for t in TABLES}
        sessions, requests, responses = spools.values()
        await sessions.add(metadata.iter_rows("sessions", ids=[session_id]))
        reqs = await requests.add(metadata.iter_rows("requests", session_id=session_id))
        resps = await responses.add(metadata.iter_rows("responses", session_id=session_id))
        # Cache hits name the responses they were served: carry those (and their requests and
        # sessions) so the bundle replays.
        served = {q["served_from"] for q in reqs if q["served_from"] is not None}
        extra = await responses.add(metadata.iter_rows("responses", ids=served))
        await requests.add(metadata.iter_rows("requests", ids={r["request_id"] for r in extra}))
        await sessions.add(metadata.iter_rows("sessions", ids={r["session_id"] for r in extra}))
        checksums = {r["checksum"] for r in (*resps, *extra) if r["checksum"] is not None}
        checksums |= {q["sent_checksum"] for q in reqs if q["sent_checksum"] is not None}
        rows: list[PayloadRow] = []
        missing: list[str] = []
        for checksum in sorted(checksums):
            row = await metadata.payload(bytes.fromhex(checksum))
            if row is None:
                missing.append(checksum)
            else:
                rows.append(row)
        if missing:
            raise IntegrityError(
                f"payload {missing[0]} named by session {session_id} is not in the store "
                f"({len(missing)} missing); run `mxm-dataio verify`"
            )
        manifest = {
            "format": BUNDLE_FORMAT,
            "version": BUNDLE_VERSION,
            "schema_version": SCHEMA_VERSION,
            "created_at": utcnow().isoformat(timespec="microseconds"),
            "session_id": session_id,
            "counts": {t: s.count for t, s in spools.items()},
            "payloads": [{"sha256": r.digest.hex(), "size": r.size} for r in rows],
        }
        chunks = {r.digest: payloads.iter(r.digest, r.size) for r in rows if r.tier != "inline"}
        part = out.with_name(out.name + ".part")
        try:
            total = await anyio.to_thread.run_sync(
                lambda: _write_tar(part, out, manifest, spools, rows, chunks)
            )
            os.replace(part, out)
        except OSError as exc:
            raise StoreError(f"cannot write bundle {out}: {exc.strerror or exc}") from exc
        finally:
            for it in chunks.values():
                with anyio.CancelScope(shield=True):
                    await it.aclose()  # type: ignore[attr-defined]
            with contextlib.suppress(OSError):
                part.unlink()
    return ExportReport(
        out, session_id, sessions.count, requests.count, responses.count, len(rows), total
    )


def _write_tar(
    part: Path,
    out: Path,
    manifest: dict[str, Any],
    spools: dict[Table, _Spool],
    rows: list[PayloadRow],
    chunks: dict[bytes, AsyncIterator[bytes]],
) -> int:
    """Runs in a worker thread; the payload store's chunks are pulled from the event loop."""
    total = 0
    with _open_tar_out(part, gz=out.name.endswith((".gz", ".tgz"))) as tar:
        body = json.dumps(manifest, indent=2).encode()
        _add_bytes(tar, "manifest.json", body, len(body))
        for table, spool in spools.items():
            size = spool.file.tell()
            spool.file.seek(0)
            _add_bytes(tar, f"{table}.jsonl", spool.file, size)
        for row in rows:
            name, hx = f"payloads/{row.digest.hex()}", row.digest.hex()
            if row.tier == "inline":
                data = row.data or b""
                if len(data) != row.size or hashlib.sha256(data).digest() != row.digest:
                    raise IntegrityError(f"payload {hx} is corrupt in the database; not exported")
                _add_bytes(tar, name, data, row.size)
            else:
                reader = _BlockingChunks(chunks[row.digest])
                try:
                    _add_bytes(tar, name, reader, row.size)
                except OSError:  # tarfile's "unexpected end of data": a short object
                    raise IntegrityError(f"payload {hx} is corrupt in the payload store") from None
                if reader.read(1):  # a longer object: iterating to the end verifies it
                    raise IntegrityError(f"payload {hx} is corrupt in the payload store")
            total += row.size
    return total


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


def _digest_of(text: str) -> bytes | None:
    try:
        digest = bytes.fromhex(text)
    except ValueError:
        return None
    return digest if len(digest) == 32 else None


def _manifest(tar: tarfile.TarFile) -> tuple[dict[str, Any], list[tuple[bytes, int]]]:
    try:
        manifest = json.loads(_member(tar, "manifest.json").read())
    except ValueError as exc:
        raise StoreError(f"not a valid bundle: manifest.json is not JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise StoreError("not an mxm-dataio bundle (manifest.json has another format)")
    schema = manifest.get("schema_version")
    # Rows of older stores import (the columns added since stay empty); newer ones do not.
    if (
        manifest.get("version") != BUNDLE_VERSION
        or not isinstance(schema, int)
        or not 1 <= schema <= SCHEMA_VERSION
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


async def _member_chunks(tar: tarfile.TarFile, name: str) -> AsyncIterator[bytes]:
    src = await anyio.to_thread.run_sync(_member, tar, name)
    while chunk := await anyio.to_thread.run_sync(src.read, _CHUNK):
        yield chunk


def _rows(tar: tarfile.TarFile, table: Table) -> Iterator[dict[str, Any]]:
    for n, line in enumerate(_member(tar, f"{table}.jsonl"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise StoreError(f"not a valid bundle: {table}.jsonl line {n}: {exc}") from None
        if not isinstance(obj, dict):
            raise StoreError(f"not a valid bundle: {table}.jsonl line {n} is not an object")
        yield obj


def _inline_rows(
    tar: tarfile.TarFile, payloads: list[tuple[bytes, int]], threshold: int
) -> Iterator[PayloadRow]:
    """The payload rows to insert, read again from the bundle (verified) as they are needed."""
    for digest, size in payloads:
        if size <= threshold:
            yield PayloadRow(digest, size, "inline", _read_verified(tar, digest, size))
        else:
            yield PayloadRow(digest, size, "file")


async def import_bundle(
    metadata: MetadataStore,
    payloads: PayloadStore,
    path: str | os.PathLike[str],
    *,
    inline_threshold: int,
) -> ImportReport:
    """Import a bundle made by :func:`export_session`. Idempotent; nothing is written unless
    every payload matches its sha256."""
    path = Path(path)
    tar = await anyio.to_thread.run_sync(_open_tar_in, path)
    try:
        manifest, listed = await anyio.to_thread.run_sync(_manifest, tar)
        # 1. Every payload verified (large ones put into the payload store) before any row.
        written = verified = 0
        for digest, size in listed:
            if size <= inline_threshold:
                await anyio.to_thread.run_sync(
                    lambda d=digest, n=size: _read_verified(tar, d, n, lambda _chunk: None)  # type: ignore[misc]
                )
            else:
                existed = await payloads.stat(digest) is not None
                got = await payloads.put_stream(_member_chunks(tar, f"payloads/{digest.hex()}"))
                if got != (digest, size):
                    raise IntegrityError(
                        f"bundle payload {digest.hex()} does not match its sha256 ({got[1]} "
                        f"bytes, {size} listed); nothing was imported"
                    )
                written += not existed
            verified += size
        # 2. Every row in one transaction; ids already present are ignored.
        added = await metadata.import_rows(
            _LazyRows(lambda: _inline_rows(tar, listed, inline_threshold)),
            {table: _LazyRows(lambda t=table: _rows(tar, t)) for table in TABLES},  # type: ignore[misc]
        )
    finally:
        await anyio.to_thread.run_sync(tar.close)
    return ImportReport(
        path,
        str(manifest.get("session_id")),
        added["sessions"],
        added["requests"],
        added["responses"],
        added["payloads"],
        written,
        verified,
    )


class _LazyRows:
    """An iterable made only when iterated (in the metadata store's own thread, where it may
    block on reading the bundle)."""

    def __init__(self, make: Callable[[], Iterator[Any]]) -> None:
        self._make = make

    def __iter__(self) -> Iterator[Any]:
        return self._make()
