"""Store maintenance: the integrity walk, garbage collection, pruning, statistics and inspection.

How this module touches SQLite (the ``Store`` methods and the ``mxm-dataio`` command share it):
every operation opens its own short-lived ``sqlite3`` connection to ``<root>/dataio.sqlite`` with
the store's pragmas (``busy_timeout``, ``synchronous=NORMAL``; WAL is a property of the file) and
runs in a worker thread.

- Not the Store's connections: the group-commit writer owns its connection and only commits
  batches of rows, and the reader is ``query_only``. gc and prune need one transaction that reads,
  decides and deletes, which a private connection gives without disturbing the writer.
- Writes (gc, prune, bundle import) start with ``BEGIN IMMEDIATE``: they take SQLite's write lock
  before reading, so what they decide (e.g. "no response names this payload") still holds when they
  delete, and a writer in another process waits for the lock (its ``busy_timeout`` and retries)
  rather than interleaving. The lock is held for one scan of the metadata, never for file I/O.
- Nothing here opens a ``Store``: opening one creates a missing root and removes temp leftovers,
  which ``verify`` must report, and an inspection command must not create a store by mistake.

A payload's file is written (temp, fsync, rename) before the row naming it commits, and a fetch's
payload row and response row commit in one transaction. So inside one transaction "payload rows no
response or request names" is exactly the garbage, while a file without a row may be a write in
progress: files are only deleted once older than a grace period.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import sqlite3
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any, Final, TypeVar

import anyio
import anyio.to_thread

from mxm_dataio_async._exceptions import StoreError
from mxm_dataio_async._models import utcnow
from mxm_dataio_async._store._payloads import PayloadFiles, _pid_alive
from mxm_dataio_async._store._schema import DB_NAME, SCHEMA_VERSION
from mxm_dataio_async._store._writer import sqlite_error

__all__ = [
    "DEFAULT_GC_GRACE",
    "Duration",
    "GcReport",
    "Problem",
    "ProblemKind",
    "ProgressCallback",
    "PruneReport",
    "SourceStats",
    "StoreStats",
    "VerifyReport",
    "connect",
    "gc",
    "parse_duration",
    "prune",
    "resolve_session",
    "stats",
    "verify",
]

DEFAULT_BUSY_TIMEOUT: Final = 10.0
#: Files younger than this (seconds) may belong to a write whose row has not committed yet.
DEFAULT_GC_GRACE: Final = 3600.0
_CHUNK: Final = 256 * 1024
_PAGE: Final = 256  # payload rows per step of the walk (inline rows are at most inline_threshold)
_IN_BATCH: Final = 500  # bound parameters per IN (...) query
_HEX64: Final = re.compile(r"[0-9a-f]{64}")

Duration = timedelta | float | str
"""A timedelta, a number of seconds, or a text like ``"30d"`` (see :func:`parse_duration`)."""

ProgressCallback = Callable[[str, int, "int | None"], None]
"""``on_progress(phase, done, total)``: called on the event loop between steps of a walk."""

# Checksums some row still names: what gc must keep. NOT IN materialises the set once.
_REFERENCED: Final = (
    "SELECT checksum FROM responses WHERE checksum IS NOT NULL "
    "UNION SELECT sent_checksum FROM requests WHERE sent_checksum IS NOT NULL"
)
_UNREFERENCED: Final = (
    f"SELECT sha256, size_bytes, tier FROM payloads WHERE lower(hex(sha256)) NOT IN ({_REFERENCED})"
)

T = TypeVar("T")


# -- connections ---------------------------------------------------------------------------------


def connect(
    root: str | os.PathLike[str], *, busy_timeout: float = DEFAULT_BUSY_TIMEOUT
) -> sqlite3.Connection:
    """A short-lived connection to an existing store (never creates one); close it when done.

    Autocommit mode (``isolation_level=None``): transactions are explicit, so a write can say
    ``BEGIN IMMEDIATE``. ``check_same_thread=False``: walks step through worker threads, one at
    a time.
    """
    root = Path(root)
    db = root / DB_NAME
    if not root.exists():
        raise StoreError(
            f"no store at {root}: the directory does not exist (pass --root or set MXM_DATAIO_ROOT)"
        )
    if not root.is_dir():
        raise StoreError(f"no store at {root}: not a directory")
    if not db.is_file():
        raise StoreError(f"no store at {root}: {DB_NAME} is missing")
    try:
        # mode=rw: fail instead of creating an empty database file.
        conn = sqlite3.connect(
            f"{db.resolve().as_uri()}?mode=rw",
            uri=True,
            isolation_level=None,
            check_same_thread=False,
        )
    except sqlite3.Error as exc:
        raise sqlite_error(f"open {db}", exc) from exc
    try:
        # Wait (inside SQLite) for another process's write lock instead of failing at once.
        conn.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
        # As the store's own connections: a commit survives a process crash.
        conn.execute("PRAGMA synchronous=NORMAL")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
    except sqlite3.Error as exc:
        conn.close()
        raise sqlite_error(f"open {db}", exc) from exc
    if version != SCHEMA_VERSION:
        conn.close()
        what = "is not an mxm-dataio store" if version == 0 else f"has schema version {version}"
        raise StoreError(f"{db} {what}; this release reads schema version {SCHEMA_VERSION}")
    return conn


@contextlib.contextmanager
def connection(root: str | os.PathLike[str], busy_timeout: float) -> Iterator[sqlite3.Connection]:
    conn = connect(root, busy_timeout=busy_timeout)
    try:
        yield conn
    finally:
        conn.close()


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection, *, write: bool, commit: bool = True) -> Iterator[None]:
    """``BEGIN IMMEDIATE`` (write) or a read snapshot; ``commit=False`` rolls back (dry runs)."""
    try:
        conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
    except sqlite3.Error as exc:
        raise sqlite_error("lock the store", exc) from exc
    try:
        yield
        conn.execute("COMMIT" if commit else "ROLLBACK")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def resolve_session(conn: sqlite3.Connection, text: str) -> str:
    """A session id from its full text or a unique prefix (as ``git`` resolves commits)."""
    if conn.execute("SELECT 1 FROM sessions WHERE id = ?", (text,)).fetchone():
        return text
    if len(text) >= 4:
        like = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        found = [
            r[0]
            for r in conn.execute(
                "SELECT id FROM sessions WHERE id LIKE ? ESCAPE '\\' LIMIT 2", (like,)
            )
        ]
        if len(found) == 1:
            return str(found[0])
        if found:
            raise StoreError(f"session prefix {text!r} is ambiguous; give more characters")
    raise StoreError(f"unknown session {text!r}; `mxm-dataio sessions` lists them")


async def _in_thread(fn: Callable[[], T]) -> T:
    try:
        return await anyio.to_thread.run_sync(fn)
    except sqlite3.Error as exc:
        raise sqlite_error("use the store", exc) from exc


async def _drive(
    steps: Generator[tuple[str, int, int | None]], cb: ProgressCallback | None
) -> None:
    """Run a sync generator step by step in worker threads; report progress on the loop."""
    try:
        while True:
            event = await _in_thread(lambda: next(steps, None))
            if event is None:
                return
            if cb is not None:
                cb(*event)
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(steps.close)


# -- small helpers -------------------------------------------------------------------------------


def _ts(dt: datetime) -> str:
    # The store's timestamp format: fixed width, so text order is time order.
    return dt.astimezone(UTC).isoformat(timespec="microseconds")


def _batches(items: Sequence[T], n: int = _IN_BATCH) -> Iterator[Sequence[T]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def _marks(n: int) -> str:
    return ", ".join("?" * n)


def _age(path: Path, now: float) -> tuple[float, int] | None:
    """``(age in seconds, size)`` of a file, or None if it is gone."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return now - st.st_mtime, st.st_size


def _digest_of(text: str) -> bytes | None:
    return bytes.fromhex(text) if _HEX64.fullmatch(text) else None


def _present(conn: sqlite3.Connection, digests: Iterable[bytes], *, tier: str | None) -> set[bytes]:
    """Which of ``digests`` have a payload row (of ``tier``, if given)."""
    found: set[bytes] = set()
    where = "" if tier is None else " AND tier = ?"
    for batch in _batches(list(digests)):
        params: list[Any] = [*batch] + ([] if tier is None else [tier])
        sql = f"SELECT sha256 FROM payloads WHERE sha256 IN ({_marks(len(batch))}){where}"
        found.update(bytes(r[0]) for r in conn.execute(sql, params))
    return found


def _hash_file(path: Path) -> tuple[bytes, int]:
    hasher = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            hasher.update(chunk)
            size += len(chunk)
    return hasher.digest(), size


def _payload_files(files: PayloadFiles) -> Iterator[Path]:
    """Every file under ``payloads/``, directory by directory (never the whole list at once)."""
    for dirpath, _dirs, names in os.walk(files.dir):
        for name in names:
            yield Path(dirpath) / name


def _file_digest(files: PayloadFiles, path: Path) -> bytes | None:
    """The digest a payload file's path stands for, or None for a stray file."""
    digest = _digest_of(path.name)
    return digest if digest is not None and files.path_for(digest) == path else None


def _payload_file_rows(
    conn: sqlite3.Connection, files: PayloadFiles, now: float
) -> Iterator[tuple[Path, float, int, bool]]:
    """Every file under ``payloads/`` as ``(path, age, size, owned)``; ``owned``: a payload row
    names it. Checked against current rows a batch at a time."""
    batch: list[tuple[Path, float, int]] = []

    def flush() -> list[tuple[Path, float, int, bool]]:
        digests = {p: _file_digest(files, p) for p, _, _ in batch}
        known = _present(conn, [d for d in digests.values() if d is not None], tier="file")
        out = [(p, age, size, digests[p] in known) for p, age, size in batch]
        batch.clear()
        return out

    for path in _payload_files(files):
        info = _age(path, now)
        if info is not None:
            batch.append((path, *info))
        if len(batch) >= _IN_BATCH:
            yield from flush()
    if batch:
        yield from flush()


def _writer_alive(name: str) -> bool:
    """Temp files are named ``<pid>-<uuid>.part``: is that process still running?"""
    pid = name.split("-", 1)[0]
    try:
        return pid.isdigit() and _pid_alive(int(pid))
    except (OverflowError, OSError):  # not a pid this system can have
        return False


def _temp_leftovers(files: PayloadFiles, grace: float, now: float) -> Iterator[Path]:
    """Files in ``tmp/`` that no live process is writing, older than ``grace``."""
    if not files.tmp.is_dir():
        return
    for entry in sorted(files.tmp.iterdir()):
        if _writer_alive(entry.name):
            continue  # a write in progress (in this process or another)
        age = _age(entry, now)
        if age is not None and age[0] >= grace:
            yield entry


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def parse_duration(text: str) -> timedelta:
    """A duration: ``"30d"``, ``"12h"``, ``"90m"``, ``"2w"``, ``"45s"``, ``"1d12h"``; a bare
    number is seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
    raw = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", raw):
        return timedelta(seconds=float(raw))
    parts = re.findall(r"(\d+(?:\.\d+)?)([smhdw])", raw)
    if not raw or "".join(n + u for n, u in parts) != raw:
        raise ValueError(
            f"invalid duration {text!r}: use a number and a unit (s, m, h, d, w), "
            "e.g. 90m, 12h, 30d, 2w"
        )
    return timedelta(seconds=sum(float(n) * units[u] for n, u in parts))


def _seconds(value: Duration) -> float:
    if isinstance(value, str):
        return parse_duration(value).total_seconds()
    if isinstance(value, timedelta):
        return value.total_seconds()
    return float(value)


# -- verify --------------------------------------------------------------------------------------


class ProblemKind(StrEnum):
    """What ``verify`` can find wrong."""

    MISSING_PAYLOAD = "missing_payload"
    """A file-tier payload row whose file is gone."""
    CORRUPT_PAYLOAD = "corrupt_payload"
    """Stored bytes whose size or sha256 do not match the row (or an unreadable file)."""
    MISSING_REFERENCE = "missing_reference"
    """A response (or a request's sent payload) names a checksum no payload row holds."""
    ORPHAN_FILE = "orphan_file"
    """A file under ``payloads/`` that no payload row names."""
    TEMP_LEFTOVER = "temp_leftover"
    """A file in ``tmp/`` that no live process is writing (a crashed write)."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One finding: ``detail`` is a line for people; ``checksum``/``path``/``row`` locate it."""

    kind: ProblemKind
    detail: str
    checksum: str | None = None
    path: Path | None = None
    row: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "detail": self.detail,
            "checksum": self.checksum,
            "path": None if self.path is None else str(self.path),
            "row": self.row,
        }


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """The result of :meth:`Store.verify`: what was checked, and the problems by kind.

    ``ok`` is True when there is no problem; ``exit_code`` is 0 then and 1 otherwise.
    """

    root: Path
    payloads: int = 0
    bytes: int = 0
    responses: int = 0
    requests: int = 0
    files: int = 0
    missing_payloads: list[Problem] = field(default_factory=list)
    corrupt_payloads: list[Problem] = field(default_factory=list)
    missing_references: list[Problem] = field(default_factory=list)
    orphan_files: list[Problem] = field(default_factory=list)
    temp_leftovers: list[Problem] = field(default_factory=list)

    @property
    def problems(self) -> list[Problem]:
        return [
            *self.missing_payloads,
            *self.corrupt_payloads,
            *self.missing_references,
            *self.orphan_files,
            *self.temp_leftovers,
        ]

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def to_json(self) -> dict[str, Any]:
        return {
            "root": str(self.root),
            "ok": self.ok,
            "checked": {
                "payloads": self.payloads,
                "bytes": self.bytes,
                "responses": self.responses,
                "requests": self.requests,
                "files": self.files,
            },
            "problems": [p.to_json() for p in self.problems],
        }


class _Verifier:
    def __init__(self, root: Path, busy_timeout: float, grace: float) -> None:
        self.root = root
        self.busy_timeout = busy_timeout
        self.grace = grace
        self.files = PayloadFiles(root, 0)
        self.report = VerifyReport(root)
        self.counts = {"payloads": 0, "bytes": 0, "responses": 0, "requests": 0, "files": 0}

    def _problem(self, bucket: list[Problem], kind: ProblemKind, detail: str, **kw: Any) -> None:
        bucket.append(Problem(kind, detail, **kw))

    def _check_payload(self, digest: bytes, size: int, tier: str, data: bytes | None) -> None:
        rep, hx = self.report, digest.hex()
        if tier == "inline":
            raw = b"" if data is None else bytes(data)
            self.counts["bytes"] += len(raw)
            if len(raw) != size or hashlib.sha256(raw).digest() != digest:
                self._problem(
                    rep.corrupt_payloads,
                    ProblemKind.CORRUPT_PAYLOAD,
                    f"inline payload {hx} is corrupt: {len(raw)} bytes stored, {size} recorded, "
                    "sha256 does not match",
                    checksum=hx,
                )
            return
        path = self.files.path_for(digest)
        if tier != "file":
            self._problem(
                rep.corrupt_payloads,
                ProblemKind.CORRUPT_PAYLOAD,
                f"payload {hx} has an unknown tier {tier!r}",
                checksum=hx,
            )
            return
        try:
            found, seen = _hash_file(path)
        except FileNotFoundError:
            self._problem(
                rep.missing_payloads,
                ProblemKind.MISSING_PAYLOAD,
                f"payload {hx} is missing from the file tier ({path})",
                checksum=hx,
                path=path,
            )
            return
        except OSError as exc:
            self._problem(
                rep.corrupt_payloads,
                ProblemKind.CORRUPT_PAYLOAD,
                f"payload {hx} cannot be read ({path}): {exc.strerror or exc}",
                checksum=hx,
                path=path,
            )
            return
        self.counts["bytes"] += seen
        if seen != size or found != digest:
            self._problem(
                rep.corrupt_payloads,
                ProblemKind.CORRUPT_PAYLOAD,
                f"payload {hx} is corrupt on disk ({path}): {seen} bytes, {size} recorded, "
                "sha256 does not match",
                checksum=hx,
                path=path,
            )

    def _check_references(self, conn: sqlite3.Connection, table: str, column: str) -> Iterator[int]:
        """Walk ``table`` by rowid; report rows whose ``column`` names no payload row."""
        last = 0
        while True:
            rows = conn.execute(
                f"SELECT rowid, id, {column} FROM {table} WHERE rowid > ? ORDER BY rowid LIMIT ?",
                (last, _IN_BATCH),
            ).fetchall()
            if not rows:
                return
            last = rows[-1][0]
            named = {c: _digest_of(c) for _, _, c in rows if c is not None}
            known = _present(conn, [d for d in named.values() if d is not None], tier=None)
            what = "response" if table == "responses" else "request"
            for _, row_id, checksum in rows:
                if checksum is None or named[checksum] in known:
                    continue
                self._problem(
                    self.report.missing_references,
                    ProblemKind.MISSING_REFERENCE,
                    f"{what} {row_id} names payload {checksum}, which is not in the store",
                    checksum=checksum,
                    row=f"{what} {row_id}",
                )
            yield len(rows)

    def steps(self) -> Generator[tuple[str, int, int | None]]:
        conn = connect(self.root, busy_timeout=self.busy_timeout)
        try:
            # One read snapshot for the row phases: rows and the payloads they name agree.
            with transaction(conn, write=False):
                yield from self._row_phases(conn)
        finally:
            conn.close()
        # Files are checked against current rows (not the snapshot): a file whose row committed
        # during the walk is not an orphan.
        now = time.time()
        yield "files", 0, None
        with connection(self.root, self.busy_timeout) as conn:
            for path, age, _size, owned in _payload_file_rows(conn, self.files, now):
                self.counts["files"] += 1
                if not owned and age >= self.grace:
                    self._problem(
                        self.report.orphan_files,
                        ProblemKind.ORPHAN_FILE,
                        f"orphan file {path}: no payload row names it (gc removes it)",
                        path=path,
                    )
                if self.counts["files"] % _IN_BATCH == 0:
                    yield "files", self.counts["files"], None
        yield "files", self.counts["files"], self.counts["files"]
        for path in _temp_leftovers(self.files, self.grace, now):
            self._problem(
                self.report.temp_leftovers,
                ProblemKind.TEMP_LEFTOVER,
                f"temp leftover {path}: an interrupted write (gc removes it)",
                path=path,
            )

    def _row_phases(self, conn: sqlite3.Connection) -> Iterator[tuple[str, int, int | None]]:
        total = conn.execute("SELECT count(*) FROM payloads").fetchone()[0]
        yield "payloads", 0, total
        last = b""
        while True:
            rows = conn.execute(
                "SELECT sha256, size_bytes, tier, data FROM payloads WHERE sha256 > ? "
                "ORDER BY sha256 LIMIT ?",
                (last, _PAGE),
            ).fetchall()
            if not rows:
                break
            for digest, size, tier, data in rows:
                self._check_payload(bytes(digest), size, tier, data)
            last = bytes(rows[-1][0])
            self.counts["payloads"] += len(rows)
            yield "payloads", self.counts["payloads"], total
        for table, column, counter in (
            ("responses", "checksum", "responses"),
            ("requests", "sent_checksum", "requests"),
        ):
            total = conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            yield table, 0, total
            for n in self._check_references(conn, table, column):
                self.counts[counter] += n
                yield table, self.counts[counter], total

    def result(self) -> VerifyReport:
        c, r = self.counts, self.report
        return VerifyReport(
            self.root,
            c["payloads"],
            c["bytes"],
            c["responses"],
            c["requests"],
            c["files"],
            r.missing_payloads,
            r.corrupt_payloads,
            r.missing_references,
            r.orphan_files,
            r.temp_leftovers,
        )


async def verify(
    root: str | os.PathLike[str],
    *,
    grace: Duration = 0.0,
    busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
    on_progress: ProgressCallback | None = None,
) -> VerifyReport:
    """Walk every payload row (re-hashing its bytes), every row naming a payload, every file.

    Streaming: payload rows are read a page at a time and files hashed in chunks, so memory stays
    bounded. Files younger than ``grace`` seconds are not reported as orphans or leftovers (on a
    store being written, a file exists briefly before its row commits).
    """
    walker = _Verifier(Path(root), busy_timeout, _seconds(grace))
    await _drive(walker.steps(), on_progress)
    return walker.result()


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


# -- stats ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SourceStats:
    source: str
    sessions: int
    requests: int
    cache_hits: int
    fetched: int
    responses: int
    errors: int
    bytes: int

    @property
    def hit_rate(self) -> float | None:
        served = self.cache_hits + self.fetched
        return self.cache_hits / served if served else None

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.responses if self.responses else None


@dataclass(frozen=True, slots=True)
class StoreStats:
    """Counts per source, cache hit rate, error rate, payload tiers and database size.

    A request is a cache hit when it was served a stored response (``requests.served_from``) and
    fetched when it has responses of its own; the hit rate is hits / (hits + fetched). The error
    rate is error responses (every failed attempt is one) over all responses.
    """

    root: Path
    sources: list[SourceStats]
    inline_payloads: int
    inline_bytes: int
    file_payloads: int
    file_bytes: int
    db_bytes: int

    def _total(self, name: str) -> int:
        return sum(int(getattr(s, name)) for s in self.sources)

    @property
    def totals(self) -> SourceStats:
        names = ("sessions", "requests", "cache_hits", "fetched", "responses", "errors", "bytes")
        return SourceStats("(all)", *(self._total(n) for n in names))

    def to_json(self) -> dict[str, Any]:
        def one(s: SourceStats) -> dict[str, Any]:
            return {
                "source": s.source,
                "sessions": s.sessions,
                "requests": s.requests,
                "cache_hits": s.cache_hits,
                "fetched": s.fetched,
                "responses": s.responses,
                "errors": s.errors,
                "bytes": s.bytes,
                "hit_rate": s.hit_rate,
                "error_rate": s.error_rate,
            }

        return {
            "root": str(self.root),
            "sources": [one(s) for s in self.sources],
            "totals": one(self.totals),
            "payloads": {
                "inline": {"count": self.inline_payloads, "bytes": self.inline_bytes},
                "file": {"count": self.file_payloads, "bytes": self.file_bytes},
            },
            "db_bytes": self.db_bytes,
        }


def _stats_sync(root: Path, busy_timeout: float) -> StoreStats:
    per: dict[str, dict[str, int]] = {}

    def add(source: str, **values: int) -> None:
        per.setdefault(source, {}).update(values)

    with connection(root, busy_timeout) as conn, transaction(conn, write=False):
        for src, n in conn.execute("SELECT source, count(*) FROM sessions GROUP BY source"):
            add(src, sessions=n)
        for src, n, hits in conn.execute(
            "SELECT source, count(*), count(served_from) FROM requests GROUP BY source"
        ):
            add(src, requests=n, cache_hits=hits)
        for src, n, errors, nbytes, fetched in conn.execute(
            "SELECT source, count(*), sum(status = 'error'), coalesce(sum(size_bytes), 0), "
            "count(DISTINCT request_id) FROM responses GROUP BY source"
        ):
            add(src, responses=n, errors=errors, bytes=nbytes, fetched=fetched)
        tiers = {
            tier: (n, b)
            for tier, n, b in conn.execute(
                "SELECT tier, count(*), coalesce(sum(size_bytes), 0) FROM payloads GROUP BY tier"
            )
        }
    names = ("sessions", "requests", "cache_hits", "fetched", "responses", "errors", "bytes")
    sources = [
        SourceStats(src, *(int(v.get(k) or 0) for k in names)) for src, v in sorted(per.items())
    ]
    db_bytes = sum(_size(root / (DB_NAME + suffix)) for suffix in ("", "-wal", "-shm"))
    inline, file = tiers.get("inline", (0, 0)), tiers.get("file", (0, 0))
    return StoreStats(root, sources, *inline, *file, db_bytes)


async def stats(
    root: str | os.PathLike[str], *, busy_timeout: float = DEFAULT_BUSY_TIMEOUT
) -> StoreStats:
    """Counts and bytes per source, hit and error rates, payload tiers, database size."""
    return await _in_thread(lambda: _stats_sync(Path(root), busy_timeout))
