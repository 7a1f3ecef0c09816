"""Store maintenance, the shared part: connections, transactions, durations and the file walks
that ``_verify.py`` (verify), ``_cleanup.py`` (gc, prune), ``_stats.py`` (stats) and
``_bundle.py`` (export, import) build on; session lookup for inspection.

How maintenance touches SQLite (the ``Store`` methods and the ``mxm-dataio`` command share it):
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
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, TypeVar

import anyio
import anyio.to_thread

from mxm_dataio_async._exceptions import StoreError
from mxm_dataio_async._store._payloads import PayloadFiles, _pid_alive
from mxm_dataio_async._store._schema import DB_NAME, SCHEMA_VERSION
from mxm_dataio_async._store._writer import sqlite_error

__all__ = [
    "DEFAULT_BUSY_TIMEOUT",
    "Duration",
    "ProgressCallback",
    "connect",
    "connection",
    "parse_duration",
    "resolve_session",
    "transaction",
]

DEFAULT_BUSY_TIMEOUT: Final = 10.0
_CHUNK: Final = 256 * 1024
_IN_BATCH: Final = 500  # bound parameters per IN (...) query
_HEX64: Final = re.compile(r"[0-9a-f]{64}")

Duration = timedelta | float | str
"""A timedelta, a number of seconds, or a text like ``"30d"`` (see :func:`parse_duration`)."""

ProgressCallback = Callable[[str, int, "int | None"], None]
"""``on_progress(phase, done, total)``: called on the event loop between steps of a walk."""

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
