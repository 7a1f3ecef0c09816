"""The inspection and maintenance queries of the SQLite backend: plain functions over a sqlite3
connection, run by :class:`SqliteMetadata` in a worker thread.

They use a short-lived connection of their own, not the store's: the group-commit writer owns its
connection and only commits batches of rows, and the batched reader is ``query_only``. Writes
(gc, prune, import) start with ``BEGIN IMMEDIATE``: they take SQLite's write lock before reading,
so what they decide ("no response names this payload") still holds when they delete, and a writer
in another process waits for the lock (its ``busy_timeout`` and retries) rather than interleaving.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, Final

from mxm_dataio_async._exceptions import IntegrityError, StoreError
from mxm_dataio_async._store._protocols import (
    DanglingReference,
    PayloadRow,
    PruneCounts,
    SourceCounts,
    Table,
    Tier,
)
from mxm_dataio_async._store._sqlite._rows import (
    REQUEST_COLUMNS,
    RESPONSE_COLUMNS,
    SESSION_COLUMNS,
)
from mxm_dataio_async._store._sqlite._sql import batches, marks, transaction, ts

__all__ = [
    "COLUMNS",
    "discard_payload",
    "forget_bad",
    "LATER_COLUMNS",
    "check_columns",
    "dangling_page",
    "delete_unreferenced",
    "import_rows",
    "payload_page",
    "present",
    "prune",
    "resolve_response",
    "resolve_session",
    "rowids_of",
    "rows_page",
    "source_counts",
    "unreferenced",
]

COLUMNS: Final[dict[Table, list[str]]] = {
    "sessions": SESSION_COLUMNS.replace(" ", "").split(","),
    "requests": REQUEST_COLUMNS.replace(" ", "").split(","),
    "responses": RESPONSE_COLUMNS.replace(" ", "").split(","),
}
_BLOBS: Final = frozenset({"hash", "request_hash"})  # BLOB columns, carried as hex text

# Checksums some row still names: what gc must keep. NOT IN materialises the set once.
_REFERENCED: Final = (
    "SELECT checksum FROM responses WHERE checksum IS NOT NULL "
    "UNION SELECT sent_checksum FROM requests WHERE sent_checksum IS NOT NULL"
)
_UNREFERENCED: Final = (
    f"SELECT sha256, size_bytes, tier FROM payloads WHERE lower(hex(sha256)) NOT IN ({_REFERENCED})"
)


def _like_prefix(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def resolve_session(conn: sqlite3.Connection, text: str) -> str:
    """A session id from its full text or a unique prefix (as ``git`` resolves commits)."""
    if conn.execute("SELECT 1 FROM sessions WHERE id = ?", (text,)).fetchone():
        return text
    if len(text) >= 4:
        found = [
            r[0]
            for r in conn.execute(
                "SELECT id FROM sessions WHERE id LIKE ? ESCAPE '\\' LIMIT 2",
                (_like_prefix(text) + "%",),
            )
        ]
        if len(found) == 1:
            return str(found[0])
        if found:
            raise StoreError(f"session prefix {text!r} is ambiguous; give more characters")
    raise StoreError(f"unknown session {text!r}; `mxm-dataio sessions` lists them")


def resolve_response(conn: sqlite3.Connection, text: str) -> str:
    """A full response id from itself, a unique prefix, or a unique tail (``…1a2b3c4d``).

    Response ids are time-ordered (UUID version 7): ids of one run share their first characters,
    so ``show`` prints their random last ones.
    """
    if conn.execute("SELECT 1 FROM responses WHERE id = ?", (text,)).fetchone():
        return text
    tail = text.lstrip("…")
    if len(tail) >= 8:
        if tail == text:
            found = conn.execute(
                "SELECT id FROM responses WHERE id >= ? AND id < ? LIMIT 2",
                (text, text + "\uffff"),
            ).fetchall()
            if found:
                return _unique(found, text)
        found = conn.execute(
            "SELECT id FROM responses WHERE id LIKE ? ESCAPE '\\' LIMIT 2",
            ("%" + _like_prefix(tail),),
        ).fetchall()
        if found:
            return _unique(found, text)
    raise StoreError(f"unknown response {text!r}")


def _unique(found: list[Any], text: str) -> str:
    if len(found) > 1:
        raise StoreError(f"response id {text!r} is ambiguous; give more characters")
    return str(found[0][0])


def _as_dict(columns: Sequence[str], row: Sequence[Any]) -> dict[str, Any]:
    return {
        c: (bytes(v).hex() if isinstance(v, bytes) else v)
        for c, v in zip(columns, row, strict=True)
    }


def rows_page(
    conn: sqlite3.Connection,
    table: Table,
    *,
    after: int,
    limit: int,
    session_id: str | None = None,
    ids: Sequence[str] | None = None,
    rowids: Sequence[int] | None = None,
) -> tuple[int, list[dict[str, Any]]]:
    """Up to ``limit`` rows of ``table`` after rowid ``after``, as dicts; returns the last rowid
    seen (``after`` if none)."""
    columns = COLUMNS[table]
    where: list[str] = ["rowid > ?"]
    params: list[Any] = [after]
    if session_id is not None:
        where.append("session_id = ?" if table != "sessions" else "id = ?")
        params.append(session_id)
    if ids is not None:
        where.append(f"id IN ({marks(len(ids))})")
        params.extend(ids)
    if rowids is not None:
        where.append(f"rowid IN ({marks(len(rowids))})")
        params.extend(rowids)
    rows = conn.execute(
        f"SELECT rowid, {', '.join(columns)} FROM {table} WHERE {' AND '.join(where)} "
        "ORDER BY rowid LIMIT ?",
        [*params, limit],
    ).fetchall()
    if not rows:
        return after, []
    return int(rows[-1][0]), [_as_dict(columns, r[1:]) for r in rows]


def rowids_of(
    conn: sqlite3.Connection, table: Table, ids: Sequence[str], *, session_id: str | None
) -> list[int]:
    """The rowids of the rows of ``table`` among ``ids`` (of ``session_id``), in recording order."""
    found: list[int] = []
    scope, scope_params = "", []
    if session_id is not None:
        scope = " AND session_id = ?" if table != "sessions" else " AND id = ?"
        scope_params = [session_id]
    for batch in batches(ids):
        found.extend(
            int(r[0])
            for r in conn.execute(
                f"SELECT rowid FROM {table} WHERE id IN ({marks(len(batch))}){scope}",
                [*batch, *scope_params],
            )
        )
    found.sort()
    return found


def present(conn: sqlite3.Connection, digests: Iterable[bytes], *, tier: Tier | None) -> set[bytes]:
    """Which of ``digests`` have a payload row (of ``tier``, if given)."""
    found: set[bytes] = set()
    where = "" if tier is None else " AND tier = ?"
    for batch in batches(list(digests)):
        params: list[Any] = [*batch] + ([] if tier is None else [tier])
        sql = f"SELECT sha256 FROM payloads WHERE sha256 IN ({marks(len(batch))}){where}"
        found.update(bytes(r[0]) for r in conn.execute(sql, params))
    return found


def payload_page(conn: sqlite3.Connection, after: bytes, limit: int) -> list[PayloadRow]:
    """Payload rows with their inline bytes, by digest, after ``after``."""
    rows = conn.execute(
        "SELECT sha256, size_bytes, tier, data FROM payloads WHERE sha256 > ? "
        "ORDER BY sha256 LIMIT ?",
        (after, limit),
    ).fetchall()
    return [
        PayloadRow(bytes(d), size, tier, None if data is None else bytes(data))
        for d, size, tier, data in rows
    ]


def _digest_of(text: str) -> bytes | None:
    try:
        digest = bytes.fromhex(text)
    except ValueError:
        return None
    return digest if len(digest) == 32 else None


def dangling_page(
    conn: sqlite3.Connection, table: Table, after: int, limit: int
) -> tuple[int, int, list[DanglingReference]]:
    """Rows of ``responses`` (``checksum``) or ``requests`` (``sent_checksum``) after rowid
    ``after`` that name a payload no payload row holds: ``(last rowid, rows seen, found)``."""
    if table not in ("responses", "requests"):
        raise ValueError(f"only responses and requests name payloads, not {table}")
    column = "checksum" if table == "responses" else "sent_checksum"
    with transaction(conn, write=False):  # the rows and the payloads they name agree
        rows = conn.execute(
            f"SELECT rowid, id, {column} FROM {table} WHERE rowid > ? ORDER BY rowid LIMIT ?",
            (after, limit),
        ).fetchall()
        named = {c: _digest_of(c) for _, _, c in rows if c is not None}
        known = present(conn, [d for d in named.values() if d is not None], tier=None)
    found = [
        DanglingReference(table, row_id, checksum)
        for _, row_id, checksum in rows
        if checksum is not None and named[checksum] not in known
    ]
    last = int(rows[-1][0]) if rows else after
    return last, len(rows), found


def unreferenced(conn: sqlite3.Connection) -> list[PayloadRow]:
    return [PayloadRow(bytes(d), size, tier) for d, size, tier in conn.execute(_UNREFERENCED)]


def delete_unreferenced(conn: sqlite3.Connection, digests: Sequence[bytes]) -> list[bytes]:
    """Delete those of ``digests`` that no row names, in one write transaction."""
    deleted: list[bytes] = []
    with transaction(conn, write=True):
        for batch in batches(list(digests)):
            doomed = conn.execute(
                f"SELECT sha256 FROM payloads WHERE sha256 IN ({marks(len(batch))}) "
                f"AND lower(hex(sha256)) NOT IN ({_REFERENCED})",
                list(batch),
            ).fetchall()
            conn.executemany("DELETE FROM payloads WHERE sha256 = ?", doomed)
            deleted.extend(bytes(d[0]) for d in doomed)
    return deleted


def prune(
    conn: sqlite3.Connection,
    cutoff: datetime,
    source: str | None,
    bucket: str | None,
    dry_run: bool,
) -> PruneCounts:
    where, params = ["fetched_at < ?"], [ts(cutoff)]
    if source is not None:
        where.append("source = ?")
        params.append(source)
    if bucket is not None:
        where.append("as_of_bucket = ?")
        params.append(bucket)
    with transaction(conn, write=True, commit=not dry_run):
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
    return PruneCounts(responses, response_bytes, requests, garbage, garbage_bytes)


def source_counts(
    conn: sqlite3.Connection,
) -> tuple[list[SourceCounts], dict[str, tuple[int, int]]]:
    per: dict[str, dict[str, int]] = {}

    def add(source: str, **values: int) -> None:
        per.setdefault(source, {}).update(values)

    with transaction(conn, write=False):
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
            add(src, responses=n, error_responses=errors, bytes=nbytes, fetched=fetched)
        tiers = {
            tier: (n, b)
            for tier, n, b in conn.execute(
                "SELECT tier, count(*), coalesce(sum(size_bytes), 0) FROM payloads GROUP BY tier"
            )
        }
    sources = [
        SourceCounts(src, **{k: int(v or 0) for k, v in values.items()})
        for src, values in sorted(per.items())
    ]
    return sources, tiers


# Columns added after the first bundles were written: a row from an older store lacks them.
LATER_COLUMNS: Final = frozenset({"host", "pid", "wait_ms", "vary"})


def check_columns(table: Table, row: Mapping[str, Any]) -> None:
    """A row to import must have the table's columns (older rows may lack ``LATER_COLUMNS``)."""
    columns = COLUMNS[table]
    if not set(columns) - LATER_COLUMNS <= set(row) <= set(columns):
        raise StoreError(f"a {table} row must have the columns {', '.join(columns)}")


def _row_tuple(table: Table, row: Mapping[str, Any]) -> tuple[Any, ...]:
    check_columns(table, row)
    try:
        return tuple(
            bytes.fromhex(row[c]) if c in _BLOBS and row.get(c) is not None else row.get(c)
            for c in COLUMNS[table]
        )
    except (TypeError, ValueError):
        raise StoreError(f"a {table} row has a bad hash") from None


def import_rows(
    conn: sqlite3.Connection,
    payloads: Iterable[PayloadRow],
    rows: Mapping[Table, Iterable[Mapping[str, Any]]],
    now: datetime,
) -> dict[str, int]:
    """Insert payload rows, then sessions, requests and responses (a reader never sees a
    response without its request), ignoring ids already present; one write transaction."""
    added: dict[str, int] = {}
    with transaction(conn, write=True):
        before = conn.total_changes
        conn.executemany(
            "INSERT OR IGNORE INTO payloads (sha256, size_bytes, tier, data, created_at) "
            "VALUES (?, ?, ?, ?, ?)",
            ((p.digest, p.size, p.tier, p.data, ts(now)) for p in payloads),
        )
        added["payloads"] = conn.total_changes - before
        for table in ("sessions", "requests", "responses"):
            added[table] = _insert(conn, table, rows.get(table, ()))
    return added


def _insert(conn: sqlite3.Connection, table: Table, rows: Iterable[Mapping[str, Any]]) -> int:
    columns = COLUMNS[table]
    sql = f"INSERT OR IGNORE INTO {table} ({', '.join(columns)}) VALUES ({marks(len(columns))})"
    named_by = {"responses": "checksum", "requests": "sent_checksum"}.get(table)
    ref = None if named_by is None else columns.index(named_by)
    added = 0
    batch: list[tuple[Any, ...]] = []

    def flush() -> int:
        if ref is not None:
            named = {r[ref] for r in batch if r[ref] is not None}
            digests = {c: _digest_of(c) for c in named}
            known = present(conn, [d for d in digests.values() if d is not None], tier=None)
            lost = sorted(c for c, d in digests.items() if d not in known)
            if lost:
                raise IntegrityError(
                    f"{table} rows name payload {lost[0]}, which is neither imported nor stored"
                )
        before = conn.total_changes
        conn.executemany(sql, batch)
        batch.clear()
        return conn.total_changes - before

    for row in rows:
        batch.append(_row_tuple(table, row))
        if len(batch) >= 500:
            added += flush()
    if batch:
        added += flush()
    return added


def discard_payload(conn: sqlite3.Connection, digest: bytes, now: datetime) -> None:
    """Delete a payload's row and remember its checksum as bad, in one write transaction."""
    with transaction(conn, write=True):
        conn.execute("DELETE FROM payloads WHERE sha256 = ?", (digest,))
        conn.execute(
            "INSERT OR IGNORE INTO bad_payloads (checksum, found_at) VALUES (?, ?)",
            (digest.hex(), ts(now)),
        )


def forget_bad(conn: sqlite3.Connection, checksums: Sequence[str]) -> None:
    """The bytes of these checksums were recorded again."""
    with transaction(conn, write=True):
        conn.executemany("DELETE FROM bad_payloads WHERE checksum = ?", [(c,) for c in checksums])
