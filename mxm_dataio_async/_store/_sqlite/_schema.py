"""The on-disk schema of ``<root>/dataio.sqlite`` and its migrations.

The schema version lives in ``PRAGMA user_version``. Each release that changes the schema appends a
step to ``MIGRATIONS`` (from version N to N+1); opening a store runs the missing steps in one
transaction, and a store written by a newer release is refused rather than misread.

Design notes:
- ``requests``, ``responses`` and ``sessions`` are public names: people inspect them with the
  sqlite3 shell, so ids, checksums and timestamps are text (ISO 8601 UTC, fixed width, so text
  order is time order). Request hashes are 32-byte BLOBs (``hex(request_hash)`` in the shell):
  the hot lookup index stays half the size of a hex one.
- Indexes are only those the hot paths need: every index costs on each insert.
"""

from __future__ import annotations

import random
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from mxm_dataio_async._exceptions import StoreError
from mxm_dataio_async._store._sqlite._sql import configure, is_busy, sqlite_error, transaction

__all__ = ["DB_NAME", "MIGRATIONS", "SCHEMA_VERSION", "prepare"]

#: The database file under a store root.
DB_NAME = "dataio.sqlite"

_V1 = """
CREATE TABLE sessions (
    id            TEXT PRIMARY KEY,
    source        TEXT NOT NULL,
    as_of         TEXT,
    started_at    TEXT NOT NULL,
    ended_at      TEXT,
    status        TEXT NOT NULL,
    cache_mode    TEXT NOT NULL,
    requests      INTEGER NOT NULL DEFAULT 0,
    responses     INTEGER NOT NULL DEFAULT 0,
    cache_hits    INTEGER NOT NULL DEFAULT 0,
    errors        INTEGER NOT NULL DEFAULT 0,
    bytes_fetched INTEGER NOT NULL DEFAULT 0,
    error         TEXT
);

CREATE TABLE requests (
    id            TEXT PRIMARY KEY,
    session_id    TEXT NOT NULL,
    hash          BLOB NOT NULL,
    source        TEXT NOT NULL,
    kind          TEXT NOT NULL,
    method        TEXT NOT NULL,
    endpoint      TEXT,
    params        TEXT NOT NULL,
    body          TEXT,
    headers       TEXT,
    as_of_bucket  TEXT,
    cache_tag     TEXT,
    cache_mode    TEXT NOT NULL,
    ttl_seconds   REAL,
    created_at    TEXT NOT NULL,
    served_from   TEXT,
    sent_checksum TEXT
);
CREATE INDEX ix_requests_session ON requests (session_id);

CREATE TABLE responses (
    id               TEXT PRIMARY KEY,
    request_id       TEXT NOT NULL,
    request_hash     BLOB NOT NULL,
    session_id       TEXT NOT NULL,
    source           TEXT NOT NULL,
    kind             TEXT NOT NULL,
    status           TEXT NOT NULL,
    checksum         TEXT,
    size_bytes       INTEGER NOT NULL,
    fetched_at       TEXT NOT NULL,
    cache_mode       TEXT NOT NULL,
    ttl_seconds      REAL,
    as_of_bucket     TEXT,
    cache_tag        TEXT,
    attempts         INTEGER NOT NULL,
    attempt          INTEGER NOT NULL,
    sequence         INTEGER,
    transport_status INTEGER,
    content_type     TEXT,
    encoding         TEXT,
    url              TEXT,
    elapsed_ms       REAL,
    headers          TEXT,
    adapter_meta     TEXT,
    error            TEXT,
    revalidated_from TEXT
);
-- The cache's hot lookup: newest OK response for a request hash.
CREATE INDEX ix_responses_usable ON responses (request_hash, fetched_at) WHERE status = 'ok';
CREATE INDEX ix_responses_session ON responses (session_id);

-- Content-addressed payloads: inline bytes (small) or a file under payloads/ (large).
CREATE TABLE payloads (
    sha256     BLOB PRIMARY KEY,
    size_bytes INTEGER NOT NULL,
    tier       TEXT NOT NULL CHECK (tier IN ('inline', 'file')),
    data       BLOB,
    created_at TEXT NOT NULL
);
"""


def _to_v1(conn: sqlite3.Connection) -> None:
    _run(conn, _V1)


_V2 = """
-- Consumers' positions in the response log (rowid order = commit order: one writer at a time).
CREATE TABLE checkpoints (
    name        TEXT PRIMARY KEY,
    response_id TEXT NOT NULL,
    position    INTEGER NOT NULL,
    updated_at  TEXT NOT NULL
);
-- Who runs a job now; a holder that stops heart-beating loses it when expires_at passes.
CREATE TABLE leases (
    name         TEXT PRIMARY KEY,
    holder       TEXT NOT NULL,
    acquired_at  TEXT NOT NULL,
    heartbeat_at TEXT NOT NULL,
    expires_at   TEXT NOT NULL
);
"""


def _run(conn: sqlite3.Connection, script: str) -> None:
    # Statement by statement: executescript() would COMMIT the caller's migration transaction.
    code = "\n".join(line for line in script.splitlines() if not line.strip().startswith("--"))
    for statement in code.split(";"):
        if statement.strip():
            conn.execute(statement)


def _to_v2(conn: sqlite3.Connection) -> None:
    _run(conn, _V2)


_V3 = """
-- Who ran a session: a session left open by a process that is gone is marked abandoned.
ALTER TABLE sessions ADD COLUMN host TEXT;
ALTER TABLE sessions ADD COLUMN pid INTEGER;
-- Time an attempt waited for the source's rate gate (elapsed_ms is the adapter's own time).
ALTER TABLE responses ADD COLUMN wait_ms REAL;
-- For a response with Vary: the sha256 of each named request header's value (JSON).
ALTER TABLE responses ADD COLUMN vary TEXT
"""


def _to_v3(conn: sqlite3.Connection) -> None:
    _run(conn, _V3)


_V4 = """
-- Payloads found corrupt (or missing) on a verified read: their rows were deleted, and cache
-- lookups skip responses naming them until the bytes are recorded again.
CREATE TABLE bad_payloads (
    checksum TEXT PRIMARY KEY,
    found_at TEXT NOT NULL
)
"""


def _to_v4(conn: sqlite3.Connection) -> None:
    _run(conn, _V4)


_V5 = """
-- How each response's records validated (datasets): the first errors as JSON, all counted.
CREATE TABLE validations (
    response_id  TEXT NOT NULL,
    model        TEXT NOT NULL,
    dataset      TEXT,
    ok           INTEGER NOT NULL,
    failed       INTEGER NOT NULL,
    errors       TEXT NOT NULL,
    validated_at TEXT NOT NULL,
    PRIMARY KEY (response_id, model)
)
"""


def _to_v5(conn: sqlite3.Connection) -> None:
    _run(conn, _V5)


#: MIGRATIONS[n] upgrades a database at user_version n to n + 1.
MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {
    0: _to_v1,
    1: _to_v2,
    2: _to_v3,
    3: _to_v4,
    4: _to_v5,
}
SCHEMA_VERSION = max(MIGRATIONS) + 1


def _switch_to_wal(conn: sqlite3.Connection, busy_timeout: float) -> None:
    """``PRAGMA journal_mode=WAL``, retried while another process is switching too.

    Two processes switching a new (rollback-journal) database at once would deadlock on the
    exclusive lock, so SQLite answers one of them SQLITE_BUSY at once instead of calling its busy
    handler (seen when four processes opened one new store under load). The other finishes within
    milliseconds; after that the pragma is a no-op.
    """
    deadline = time.monotonic() + busy_timeout
    delay = 0.005
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if not is_busy(exc) or time.monotonic() + delay > deadline:
                raise
        time.sleep(delay * (0.5 + random.random()))  # in the opening thread, never the loop
        delay = min(delay * 2, 0.1)


def prepare(db: Path, busy_timeout: float, *, create: bool, read_only: bool) -> None:
    """Check (and unless read-only, create and migrate) the database. Runs in a worker thread."""
    if not create and not db.is_file():
        root = db.parent
        if not root.exists():
            raise StoreError(
                f"no store at {root}: the directory does not exist "
                "(pass --root or set MXM_DATAIO_ROOT)"
            )
        if not root.is_dir():
            raise StoreError(f"no store at {root}: not a directory")
        raise StoreError(f"no store at {root}: {DB_NAME} is missing")
    if create:
        # The metadata store creates its own directory: only Store(root) made it before, so
        # Store(metadata=SqliteMetadata(new_dir), payloads=...) failed to open (contract suite).
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"cannot create store root {db.parent}: {exc.strerror or exc}"
            ) from exc
    try:
        conn = sqlite3.connect(db, isolation_level=None, timeout=busy_timeout)
    except sqlite3.Error as exc:
        raise sqlite_error(f"open {db}", exc) from exc
    try:
        configure(conn, busy_timeout)
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{db} has schema version {version}, newer than this release supports "
                f"({SCHEMA_VERSION}); upgrade mxm-dataio-async"
            )
        if version == SCHEMA_VERSION:
            return
        if not create and version == 0:
            raise StoreError(f"{db} is not an mxm-dataio store (schema version 0)")
        if read_only:
            raise StoreError(
                f"{db} has schema version {version}; open it once writable to migrate it "
                f"to {SCHEMA_VERSION}"
            )
        # WAL: readers never block the writer and vice versa; the setting persists in the file.
        _switch_to_wal(conn, busy_timeout)
        with transaction(conn, write=True):
            # Re-read under the write lock: another process may have migrated meanwhile.
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            while version < SCHEMA_VERSION:
                MIGRATIONS[version](conn)
                version += 1
            conn.execute(f"PRAGMA user_version={version}")
    except sqlite3.Error as exc:
        raise sqlite_error(f"open {db}", exc) from exc
    finally:
        conn.close()
