"""The inspection and maintenance queries of the PostgreSQL backend: coroutines over one pooled
connection, run by :class:`PostgresMetadata` (which translates their driver errors).

The writes here (gc's delete, prune, import) run in a transaction of their own. gc and prune first
lock the tables they decide on in ``SHARE ROW EXCLUSIVE`` mode: concurrent writers (every record
batch inserts into ``payloads``, ``requests`` and ``responses``) wait for them, and they wait for
the writers in flight, so what they decide ("no response names this payload", "no response is left
for this request") still holds when they delete, as with SQLite's ``BEGIN IMMEDIATE``. Writers wait
at most ``busy_timeout`` (the connections' ``lock_timeout``) and then retry.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final

from mxm_dataio_async._exceptions import IntegrityError, StoreError
from mxm_dataio_async._models import ResponseStatus
from mxm_dataio_async._store._postgres._rows import (
    COLUMNS,
    PAYLOAD_TYPES,
    RESPONSE_COLUMNS,
    TYPES,
    import_row,
    row_dict,
)
from mxm_dataio_async._store._postgres._sql import utc
from mxm_dataio_async._store._protocols import (
    DanglingReference,
    PayloadRow,
    PruneCounts,
    SourceCounts,
    Table,
    Tier,
)

__all__ = [
    "HORIZON",
    "response_pages",
    "ORDER",
    "dangling_page",
    "delete_unreferenced",
    "import_rows",
    "keys_of",
    "payload_page",
    "present",
    "prune",
    "resolve_response",
    "resolve_session",
    "rows_by_ids",
    "rows_page",
    "source_counts",
    "unreferenced",
]

Connection = Any  # asyncpg.Connection
#: Reads a chunk of an iterable in a worker thread (the iterables of import_rows may block).
ReadChunk = Callable[[Iterator[Any]], Awaitable[list[Any]]]

#: Recording order of each public table: the response log's (txid, pos); pos for the others.
ORDER: Final[dict[Table, tuple[str, ...]]] = {
    "sessions": ("pos",),
    "requests": ("pos",),
    "responses": ("txid", "pos"),
}
_IDS_PER_QUERY: Final = 10_000
_PAGE: Final = 500

# Payload rows no response or request names: what gc may delete. An anti-join reads each table
# once (NOT IN over a large set would fall back to a nested loop once it outgrows work_mem).
_UNREFERENCED: Final = (
    "NOT EXISTS (SELECT 1 FROM responses r WHERE r.checksum = encode(p.sha256, 'hex')) "
    "AND NOT EXISTS (SELECT 1 FROM requests q WHERE q.sent_checksum = encode(p.sha256, 'hex'))"
)


def _like_prefix(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


async def resolve_session(conn: Connection, text: str) -> str:
    """A session id from its full text or a unique prefix (as ``git`` resolves commits)."""
    if await conn.fetchval("SELECT 1 FROM sessions WHERE id = $1", text):
        return text
    if len(text) >= 4:
        found = await conn.fetch(
            "SELECT id FROM sessions WHERE id LIKE $1 ESCAPE '\\' LIMIT 2",
            _like_prefix(text) + "%",
        )
        if len(found) == 1:
            return str(found[0][0])
        if found:
            raise StoreError(f"session prefix {text!r} is ambiguous; give more characters")
    raise StoreError(f"unknown session {text!r}; `mxm-dataio sessions` lists them")


async def resolve_response(conn: Connection, text: str) -> str:
    """A full response id from itself, a unique prefix, or a unique tail (``…1a2b3c4d``)."""
    if await conn.fetchval("SELECT 1 FROM responses WHERE id = $1", text):
        return text
    tail = text.lstrip("…")
    if len(tail) >= 8:
        if tail == text:
            found = await conn.fetch(
                "SELECT id FROM responses WHERE id LIKE $1 ESCAPE '\\' LIMIT 2",
                _like_prefix(text) + "%",
            )
            if found:
                return _unique(found, text)
        found = await conn.fetch(
            "SELECT id FROM responses WHERE id LIKE $1 ESCAPE '\\' LIMIT 2",
            "%" + _like_prefix(tail),
        )
        if found:
            return _unique(found, text)
    raise StoreError(f"unknown response {text!r}")


def _unique(found: Sequence[Any], text: str) -> str:
    if len(found) > 1:
        raise StoreError(f"response id {text!r} is ambiguous; give more characters")
    return str(found[0][0])


# -- rows in recording order ----------------------------------------------------------------------


def _scope(table: Table, session_id: str | None, n: int) -> tuple[str, list[Any]]:
    if session_id is None:
        return "", []
    return (f" AND {'id' if table == 'sessions' else 'session_id'} = ${n}", [session_id])


def _after(table: Table) -> str:
    return "(txid, pos) > ($1::xid8, $2)" if table == "responses" else "pos > $1"


async def rows_page(
    conn: Connection,
    table: Table,
    after: tuple[int, ...],
    *,
    limit: int,
    session_id: str | None,
) -> tuple[tuple[int, ...], list[dict[str, Any]]]:
    """Up to ``limit`` rows of ``table`` after the key ``after`` (see ``ORDER``), as dicts;
    returns the last key seen (``after`` if none)."""
    key = ORDER[table]
    scope, scope_args = _scope(table, session_id, len(key) + 2)
    rows = await conn.fetch(
        f"SELECT {', '.join(COLUMNS[table])}, {', '.join(key)} FROM {table} "
        f"WHERE {_after(table)}{scope} ORDER BY {', '.join(key)} LIMIT ${len(key) + 1}",
        *after,
        limit,
        *scope_args,
    )
    if not rows:
        return after, []
    n = len(COLUMNS[table])
    return tuple(rows[-1][n:]), [row_dict(table, r) for r in rows]


async def keys_of(
    conn: Connection, table: Table, ids: Sequence[str], *, session_id: str | None
) -> list[str]:
    """Those of ``ids`` that are rows of ``table`` (of ``session_id``), in recording order."""
    key = ORDER[table]
    scope, scope_args = _scope(table, session_id, 2)
    found: list[tuple[Any, ...]] = []
    for i in range(0, len(ids), _IDS_PER_QUERY):
        rows = await conn.fetch(
            f"SELECT {', '.join(key)}, id FROM {table} WHERE id = ANY($1::text[]){scope}",
            ids[i : i + _IDS_PER_QUERY],
            *scope_args,
        )
        found.extend(tuple(r) for r in rows)
    found.sort()
    return [r[-1] for r in found]


async def rows_by_ids(conn: Connection, table: Table, ids: Sequence[str]) -> list[dict[str, Any]]:
    """The rows of ``ids`` in the order given (ids no longer there are left out)."""
    rows = await conn.fetch(
        f"SELECT {', '.join(COLUMNS[table])} FROM {table} WHERE id = ANY($1::text[])", ids
    )
    by_id = {r[0]: r for r in rows}
    return [row_dict(table, by_id[i]) for i in ids if i in by_id]


# -- payload rows ---------------------------------------------------------------------------------


async def present(conn: Connection, digests: Sequence[bytes], *, tier: Tier | None) -> set[bytes]:
    """Which of ``digests`` have a payload row (of ``tier``, if given)."""
    found: set[bytes] = set()
    where = "" if tier is None else " AND tier = $2"
    extra = [] if tier is None else [tier]
    for i in range(0, len(digests), _IDS_PER_QUERY):
        rows = await conn.fetch(
            f"SELECT sha256 FROM payloads WHERE sha256 = ANY($1::bytea[]){where}",
            digests[i : i + _IDS_PER_QUERY],
            *extra,
        )
        found.update(bytes(r[0]) for r in rows)
    return found


async def payload_page(conn: Connection, after: bytes, limit: int) -> list[PayloadRow]:
    """Payload rows with their inline bytes, by digest, after ``after``."""
    rows = await conn.fetch(
        "SELECT sha256, size_bytes, tier, data FROM payloads WHERE sha256 > $1 "
        "ORDER BY sha256 LIMIT $2",
        after,
        limit,
    )
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


async def dangling_page(
    conn: Connection, table: Table, after: tuple[int, ...], limit: int
) -> tuple[tuple[int, ...], int, list[DanglingReference]]:
    """Rows of ``responses`` (``checksum``) or ``requests`` (``sent_checksum``) after the key
    ``after`` that name a payload no payload row holds: ``(last key, rows seen, found)``.

    Two statements need no common snapshot: a row is committed with (or after) the payload rows
    it names, and gc never deletes a payload row a committed row names."""
    if table not in ("responses", "requests"):
        raise ValueError(f"only responses and requests name payloads, not {table}")
    column = "checksum" if table == "responses" else "sent_checksum"
    key = ORDER[table]
    rows = await conn.fetch(
        f"SELECT id, {column}, {', '.join(key)} FROM {table} WHERE {_after(table)} "
        f"ORDER BY {', '.join(key)} LIMIT ${len(key) + 1}",
        *after,
        limit,
    )
    named = {r[1]: _digest_of(r[1]) for r in rows if r[1] is not None}
    known = await present(conn, [d for d in named.values() if d is not None], tier=None)
    found = [
        DanglingReference(table, r[0], r[1])
        for r in rows
        if r[1] is not None and named[r[1]] not in known
    ]
    last = tuple(rows[-1][2:]) if rows else after
    return last, len(rows), found


async def unreferenced(conn: Connection) -> list[PayloadRow]:
    rows = await conn.fetch(
        f"SELECT sha256, size_bytes, tier FROM payloads p WHERE {_UNREFERENCED} ORDER BY sha256"
    )
    return [PayloadRow(bytes(d), size, tier) for d, size, tier in rows]


async def delete_unreferenced(conn: Connection, digests: Sequence[bytes]) -> list[bytes]:
    """Delete those of ``digests`` that no row names, in one transaction."""
    async with conn.transaction():
        await conn.execute("LOCK TABLE payloads IN SHARE ROW EXCLUSIVE MODE")
        rows = await conn.fetch(
            f"DELETE FROM payloads p WHERE sha256 = ANY($1::bytea[]) AND {_UNREFERENCED} "
            "RETURNING sha256",
            list(digests),
        )
    return [bytes(r[0]) for r in rows]


class _Rollback(Exception):
    """Leaves a transaction without committing it (a dry run)."""


async def prune(
    conn: Connection,
    cutoff: datetime,
    source: str | None,
    bucket: str | None,
    dry_run: bool,
) -> PruneCounts:
    where: list[str] = ["fetched_at < $1"]
    args: list[Any] = [utc(cutoff)]
    if source is not None:
        args.append(source)
        where.append(f"source = ${len(args)}")
    if bucket is not None:
        args.append(bucket)
        where.append(f"as_of_bucket = ${len(args)}")
    counts = PruneCounts()
    try:
        async with conn.transaction():
            # Writers wait while the rows to delete are chosen and deleted (see module docstring).
            await conn.execute(
                "LOCK TABLE requests, responses, payloads IN SHARE ROW EXCLUSIVE MODE"
            )
            await conn.execute(
                "CREATE TEMP TABLE doomed ON COMMIT DROP AS SELECT id, request_id, size_bytes "
                f"FROM responses WHERE {' AND '.join(where)}",
                *args,
            )
            await conn.execute("ANALYZE doomed")
            responses, response_bytes = await conn.fetchrow(
                "SELECT count(*), coalesce(sum(size_bytes), 0) FROM doomed"
            )
            await conn.execute("DELETE FROM responses WHERE id IN (SELECT id FROM doomed)")
            # Requests left with no response of their own, and cache hits (and coalesced
            # duplicates) that were served a deleted response.
            status = await conn.execute(
                "DELETE FROM requests WHERE (id IN (SELECT request_id FROM doomed) "
                "AND id NOT IN (SELECT request_id FROM responses "
                "WHERE request_id IN (SELECT request_id FROM doomed))) "
                "OR served_from IN (SELECT id FROM doomed)"
            )
            garbage, garbage_bytes = await conn.fetchrow(
                "SELECT count(*), coalesce(sum(size_bytes), 0) FROM payloads p "
                f"WHERE {_UNREFERENCED}"
            )
            counts = PruneCounts(
                int(responses),
                int(response_bytes),
                int(status.split()[-1]),
                int(garbage),
                int(garbage_bytes),
            )
            if dry_run:
                raise _Rollback
    except _Rollback:
        pass
    return counts


async def source_counts(
    conn: Connection, schema: str
) -> tuple[list[SourceCounts], dict[str, tuple[int, int]], int]:
    per: dict[str, dict[str, int]] = {}

    def add(source: str, **values: int) -> None:
        per.setdefault(source, {}).update(values)

    async with conn.transaction(isolation="repeatable_read", readonly=True):
        for src, n in await conn.fetch("SELECT source, count(*) FROM sessions GROUP BY source"):
            add(src, sessions=n)
        for src, n, hits in await conn.fetch(
            "SELECT source, count(*), count(served_from) FROM requests GROUP BY source"
        ):
            add(src, requests=n, cache_hits=hits)
        for src, n, errors, nbytes, fetched in await conn.fetch(
            "SELECT source, count(*), count(*) FILTER (WHERE status = 'error'), "
            "coalesce(sum(size_bytes), 0), count(DISTINCT request_id) FROM responses "
            "GROUP BY source"
        ):
            add(src, responses=n, error_responses=errors, bytes=int(nbytes), fetched=fetched)
        tiers = {
            tier: (int(n), int(b))
            for tier, n, b in await conn.fetch(
                "SELECT tier, count(*), coalesce(sum(size_bytes), 0) FROM payloads GROUP BY tier"
            )
        }
        size = await conn.fetchval(
            "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 "
            "AND c.relkind = 'r'",
            schema,
        )
    sources = [
        SourceCounts(src, **{k: int(v or 0) for k, v in values.items()})
        for src, values in sorted(per.items())
    ]
    return sources, tiers, int(size)


# -- import ---------------------------------------------------------------------------------------


def _insert_ignoring(table: str, columns: Sequence[str], types: Sequence[str], key: str) -> str:
    arrays = ", ".join(f"${i + 1}::{t}[]" for i, t in enumerate(types))
    return (
        f"INSERT INTO {table} ({', '.join(columns)}) SELECT * FROM unnest({arrays}) "
        f"ON CONFLICT ({key}) DO NOTHING"
    )


_IMPORT_PAYLOADS: Final = _insert_ignoring(
    "payloads", ("sha256", "size_bytes", "tier", "data", "created_at"), PAYLOAD_TYPES, "sha256"
)
_IMPORT: Final = {t: _insert_ignoring(t, COLUMNS[t], TYPES[t], "id") for t in COLUMNS}


def _inserted(status: str) -> int:
    return int(status.split()[-1])  # "INSERT 0 <n>"


def _columns(rows: Sequence[Sequence[Any]], n: int) -> list[Sequence[Any]]:
    return list(zip(*rows, strict=True)) if rows else [()] * n


async def import_rows(
    conn: Connection,
    payloads: Iterable[PayloadRow],
    rows: Mapping[Table, Iterable[Mapping[str, Any]]],
    now: datetime,
    read_chunk: ReadChunk,
) -> dict[str, int]:
    """Insert payload rows, then sessions, requests and responses (a reader never sees a response
    without its request), ignoring ids already present; one transaction."""
    added: dict[str, int] = {"payloads": 0}
    created = utc(now)
    async with conn.transaction():
        source = iter(payloads)
        while chunk := await read_chunk(source):
            unique = {p.digest: (p.digest, p.size, p.tier, p.data, created) for p in chunk}
            batch = [unique[d] for d in sorted(unique)]
            added["payloads"] += _inserted(
                await conn.execute(_IMPORT_PAYLOADS, *_columns(batch, len(PAYLOAD_TYPES)))
            )
        for table in ("sessions", "requests", "responses"):
            added[table] = 0
            named_by = {"responses": "checksum", "requests": "sent_checksum"}.get(table)
            ref = None if named_by is None else COLUMNS[table].index(named_by)
            source_rows = iter(rows.get(table, ()))
            while chunk := await read_chunk(source_rows):
                batch = [import_row(table, row) for row in chunk]
                if ref is not None:
                    await _check_named(conn, table, [r[ref] for r in batch])
                added[table] += _inserted(
                    await conn.execute(_IMPORT[table], *_columns(batch, len(COLUMNS[table])))
                )
    return added


async def _check_named(conn: Connection, table: str, checksums: list[Any]) -> None:
    named = {c for c in checksums if c is not None}
    digests = {c: _digest_of(c) if isinstance(c, str) else None for c in named}
    known = await present(conn, [d for d in digests.values() if d is not None], tier=None)
    lost = sorted(str(c) for c, d in digests.items() if d not in known)
    if lost:
        raise IntegrityError(
            f"{table} rows name payload {lost[0]}, which is neither imported nor stored"
        )


def chunks(iterable: Iterator[Any], n: int = _PAGE) -> list[Any]:
    """The next ``n`` items (fewer at the end); run in a worker thread."""
    return list(itertools.islice(iterable, n))


HORIZON: Final = "pg_snapshot_xmin(pg_current_snapshot())"
"""The oldest transaction still running: rows of transactions below it are all committed."""


def response_pages(
    *,
    source: str | None,
    kind: str | None,
    session_id: str | None,
    status: ResponseStatus | None,
    since: datetime | None,
    until: datetime | None,
) -> tuple[str, str, list[Any]]:
    """``iter_responses``' page query (rows after the position ``($1, $2)`` in commit order,
    below the horizon, filtered), the query for the newest filtered row beyond the position
    (committed above the horizon, or still running), and their filter arguments."""
    clauses: list[str] = []
    args: list[Any] = []

    def where(clause: str, value: Any) -> None:
        args.append(value)
        clauses.append(clause.format(f"${len(args) + 2}"))

    for column, value in (("source", source), ("kind", kind), ("session_id", session_id)):
        if value is not None:
            where(f"{column} = {{}}", value)
    if status is not None:
        where("status = {}", status.value)
    if since is not None:
        where("fetched_at >= {}", since.astimezone(UTC))
    if until is not None:
        where("fetched_at < {}", until.astimezone(UTC))
    filters = "".join(f" AND {c}" for c in clauses)
    page_sql = (
        f"SELECT {RESPONSE_COLUMNS}, txid, pos FROM responses "
        f"WHERE (txid, pos) > ($1::xid8, $2) AND txid < {HORIZON}{filters} "
        f"ORDER BY txid, pos LIMIT ${len(args) + 3}"
    )
    pending_sql = f"SELECT max(txid) FROM responses WHERE (txid, pos) > ($1::xid8, $2){filters}"
    return page_sql, pending_sql, args
