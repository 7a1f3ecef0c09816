"""SQLite helpers every part of the SQLite backend shares: connections with the store's pragmas,
explicit transactions, error translation and value encoding.

Each pragma says why it is set. Connections are opened in autocommit mode
(``isolation_level=None``) so that every transaction is explicit and a write can say
``BEGIN IMMEDIATE`` (take the write lock before reading what it will decide on).
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, TypeVar

from mxm_dataio_async._exceptions import StoreError
from mxm_dataio_async._identity import ascii_json

__all__ = [
    "IN_BATCH",
    "batches",
    "configure",
    "connect",
    "connection",
    "is_busy",
    "json_text",
    "marks",
    "sqlite_error",
    "storable_text",
    "transaction",
    "ts",
]

T = TypeVar("T")

IN_BATCH: Final = 500  # bound parameters per IN (...) query: plans stay simple, far below limits
_BUSY_CODES: Final = {5, 6}  # SQLITE_BUSY, SQLITE_LOCKED


def sqlite_error(action: str, exc: sqlite3.Error) -> StoreError:
    """Translate a sqlite3 error into a StoreError with a message a user can act on."""
    text = str(exc)
    if "not a database" in text:
        return StoreError(f"cannot {action}: the file is not an SQLite database ({text})")
    if "readonly" in text or "read-only" in text:
        return StoreError(f"cannot {action}: the store is read-only ({text})")
    if "disk is full" in text or "full" in text.lower():
        return StoreError(f"cannot {action}: disk full ({text})")
    return StoreError(f"cannot {action}: {text}")


def is_busy(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return (code & 0xFF) in _BUSY_CODES
    return "locked" in str(exc) or "busy" in str(exc)


def configure(conn: sqlite3.Connection, busy_timeout: float, *, read_only: bool = False) -> None:
    """The store's pragmas on a fresh connection."""
    # First: every later statement (even switching to WAL) may wait for another process's lock,
    # and must wait inside SQLite instead of failing at once.
    conn.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
    # NORMAL in WAL mode: a commit survives a process crash; only an OS crash may lose the last few.
    conn.execute("PRAGMA synchronous=NORMAL")
    if read_only:
        # A bug that writes becomes an error instead of taking the write lock.
        conn.execute("PRAGMA query_only=1")


def connect(db: Path, busy_timeout: float, *, read_only: bool = False) -> sqlite3.Connection:
    """A connection to an existing database file (never creates one); close it when done.

    ``check_same_thread=False``: walks step through worker threads, one call at a time.
    """
    try:
        # mode=rw: fail instead of creating an empty database file.
        conn = sqlite3.connect(
            f"{db.resolve().as_uri()}?mode=rw",
            uri=True,
            isolation_level=None,
            check_same_thread=False,
            timeout=busy_timeout,
        )
    except sqlite3.Error as exc:
        raise sqlite_error(f"open {db}", exc) from exc
    try:
        configure(conn, busy_timeout, read_only=read_only)
    except sqlite3.Error as exc:
        conn.close()
        raise sqlite_error(f"open {db}", exc) from exc
    return conn


@contextlib.contextmanager
def connection(
    db: Path, busy_timeout: float, *, read_only: bool = False
) -> Iterator[sqlite3.Connection]:
    conn = connect(db, busy_timeout, read_only=read_only)
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


def ts(dt: datetime) -> str:
    """The store's timestamp text: UTC, fixed width (microseconds always present), so text order
    is time order in SQL."""
    if dt.tzinfo is not UTC:  # the clock's times are UTC already: skip the conversion then
        dt = dt.astimezone(UTC)
    return dt.isoformat(timespec="microseconds")


def storable_text(value: str | None) -> str | None:
    """Text SQLite can store: a str with lone surrogates cannot be encoded as UTF-8, so those
    characters are written as backslash escapes instead of failing the whole batch."""
    if value is None or value.isascii():
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


def json_text(value: Any) -> str | None:
    """ASCII JSON: any str, lone surrogates included (aiohttp decodes undecodable header bytes to
    them), is representable; the escapes load back to the same str."""
    return None if value is None else ascii_json(value)


def batches(items: Sequence[T], n: int = IN_BATCH) -> Iterator[Sequence[T]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def marks(n: int) -> str:
    return ", ".join("?" * n)
