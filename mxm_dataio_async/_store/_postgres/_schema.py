"""The PostgreSQL schema of a store and its migrations.

All tables live in one PostgreSQL schema (``public`` unless the URL says ``?schema=name``), so
several stores can share a database. The version is the one row of ``schema_version``; each release
that changes the tables appends a step to ``MIGRATIONS`` (from version N to N+1). Opening a store
runs the missing steps in one transaction under ``pg_advisory_xact_lock`` (so processes opening a
new store at once create it exactly once), and a store written by a newer release is refused.

Design notes (the SQLite schema's, where they apply; see ``_sqlite/_schema.py``):
- ``sessions``, ``requests``, ``responses`` and their columns are public names, the same as
  SQLite's. Request hashes and payload digests are ``bytea``; times ``timestamptz`` (microseconds,
  as the models carry); params, body, headers and adapter_meta ``jsonb``. Ids are ``text COLLATE
  "C"``: byte order, so prefix lookups use the primary key whatever the database's locale.
- Commit order: a ``bigserial`` is not commit order when several connections commit (a row that
  took its number first may commit last). Every response row therefore records its transaction's
  id (``txid xid8 DEFAULT pg_current_xact_id()``) and ``pos``, its number; the log is ordered by
  ``(txid, pos)`` and a reader only goes up to ``pg_snapshot_xmin(pg_current_snapshot())``, the
  oldest transaction still running, below which no row can appear any more. Checkpoints keep that
  position, so they survive pruning of the response they name.
- ``pos`` orders ``sessions`` and ``requests`` too (``iter_rows``' recording order).
- Indexes are those the hot paths need, as in SQLite, plus the log's ``(txid, pos)``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from mxm_dataio_async._exceptions import StoreError
from mxm_dataio_async._store._postgres._sql import advisory_key

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "prepare", "read_version"]

_V1 = """
CREATE TABLE schema_version (
    one        boolean PRIMARY KEY DEFAULT true CHECK (one),
    version    integer NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE sessions (
    id            text COLLATE "C" PRIMARY KEY,
    source        text NOT NULL,
    as_of         text,
    started_at    timestamptz NOT NULL,
    ended_at      timestamptz,
    status        text NOT NULL,
    cache_mode    text NOT NULL,
    requests      bigint NOT NULL DEFAULT 0,
    responses     bigint NOT NULL DEFAULT 0,
    cache_hits    bigint NOT NULL DEFAULT 0,
    errors        bigint NOT NULL DEFAULT 0,
    bytes_fetched bigint NOT NULL DEFAULT 0,
    error         text,
    pos           bigint GENERATED ALWAYS AS IDENTITY
);
CREATE INDEX ix_sessions_pos ON sessions (pos);

CREATE TABLE requests (
    id            text COLLATE "C" PRIMARY KEY,
    session_id    text COLLATE "C" NOT NULL,
    hash          bytea NOT NULL,
    source        text NOT NULL,
    kind          text NOT NULL,
    method        text NOT NULL,
    endpoint      text,
    params        jsonb NOT NULL,
    body          jsonb,
    headers       jsonb,
    as_of_bucket  text,
    cache_tag     text,
    cache_mode    text NOT NULL,
    ttl_seconds   double precision,
    created_at    timestamptz NOT NULL,
    served_from   text COLLATE "C",
    sent_checksum text,
    pos           bigint GENERATED ALWAYS AS IDENTITY
);
CREATE INDEX ix_requests_session ON requests (session_id);
CREATE INDEX ix_requests_pos ON requests (pos);

CREATE TABLE responses (
    id               text COLLATE "C" PRIMARY KEY,
    request_id       text COLLATE "C" NOT NULL,
    request_hash     bytea NOT NULL,
    session_id       text COLLATE "C" NOT NULL,
    source           text NOT NULL,
    kind             text NOT NULL,
    status           text NOT NULL,
    checksum         text,
    size_bytes       bigint NOT NULL,
    fetched_at       timestamptz NOT NULL,
    cache_mode       text NOT NULL,
    ttl_seconds      double precision,
    as_of_bucket     text,
    cache_tag        text,
    attempts         bigint NOT NULL,
    attempt          bigint NOT NULL,
    sequence         bigint,
    transport_status bigint,
    content_type     text,
    encoding         text,
    url              text,
    elapsed_ms       double precision,
    headers          jsonb,
    adapter_meta     jsonb,
    error            text,
    revalidated_from text,
    txid             xid8 NOT NULL DEFAULT pg_current_xact_id(),
    pos              bigint GENERATED ALWAYS AS IDENTITY
);
-- The cache's hot lookup: newest OK response for a request hash.
CREATE INDEX ix_responses_usable ON responses (request_hash, fetched_at) WHERE status = 'ok';
CREATE INDEX ix_responses_session ON responses (session_id);
-- The response log in commit order (see the module docstring).
CREATE UNIQUE INDEX ix_responses_log ON responses (txid, pos);

-- Content-addressed payloads: inline bytes (small) or an object in the payload store (large).
CREATE TABLE payloads (
    sha256     bytea PRIMARY KEY,
    size_bytes bigint NOT NULL,
    tier       text NOT NULL CHECK (tier IN ('inline', 'file')),
    data       bytea,
    created_at timestamptz NOT NULL
);

-- Consumers' positions in the response log: (txid, position) of the response they name.
CREATE TABLE checkpoints (
    name        text PRIMARY KEY,
    response_id text COLLATE "C" NOT NULL,
    txid        xid8 NOT NULL,
    position    bigint NOT NULL,
    updated_at  timestamptz NOT NULL
);
-- Who runs a job now; expiry is decided by the server's clock (now()), not the holders'.
CREATE TABLE leases (
    name         text PRIMARY KEY,
    holder       text NOT NULL,
    acquired_at  timestamptz NOT NULL,
    heartbeat_at timestamptz NOT NULL,
    expires_at   timestamptz NOT NULL
);
"""

Connection = Any  # asyncpg.Connection (asyncpg has no type information)


async def _to_v1(conn: Connection) -> None:
    await conn.execute(_V1)


_V2 = """
-- Who ran a session: a session left open by a process that is gone is marked abandoned.
ALTER TABLE sessions ADD COLUMN host text;
ALTER TABLE sessions ADD COLUMN pid bigint;
-- Time an attempt waited for the source's rate gate (elapsed_ms is the adapter's own time).
ALTER TABLE responses ADD COLUMN wait_ms double precision;
-- For a response with Vary: the sha256 of each named request header's value.
ALTER TABLE responses ADD COLUMN vary jsonb;
"""


async def _to_v2(conn: Connection) -> None:
    await conn.execute(_V2)


#: MIGRATIONS[n] upgrades a schema at version n to n + 1 (in the migration's transaction, with
#: the store's schema first on the search_path).
_V3 = """
-- Payloads found corrupt (or missing) on a verified read: their rows were deleted, and cache
-- lookups skip responses naming them until the bytes are recorded again.
CREATE TABLE bad_payloads (
    checksum text COLLATE "C" PRIMARY KEY,
    found_at timestamptz NOT NULL DEFAULT now()
);
"""


async def _to_v3(conn: Connection) -> None:
    await conn.execute(_V3)


_V4 = """
-- Runs shared by many workers (see _store/_work.py): a run, its plan enqueued as chunks of plan
-- indices, the indices done (each marked in the transaction that recorded its answer, fenced by
-- the claim), and the workers' heartbeats. Leases are on this server's clock.
CREATE TABLE job_runs (
    id          text COLLATE "C" PRIMARY KEY,
    job         text NOT NULL,
    config_hash text NOT NULL,
    total       bigint NOT NULL,
    chunk_size  integer NOT NULL,
    planned     boolean NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz
);
CREATE TABLE job_chunks (
    run_id      text COLLATE "C" NOT NULL REFERENCES job_runs (id) ON DELETE CASCADE,
    chunk       integer NOT NULL,
    first_index bigint NOT NULL,
    stop_index  bigint NOT NULL,
    state       text NOT NULL DEFAULT 'pending'
                CHECK (state IN ('pending', 'claimed', 'done', 'dead')),
    owner       text,
    lease_until timestamptz,
    attempts    integer NOT NULL DEFAULT 0,
    error       text,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, chunk)
);
-- What a claim looks for: open chunks in order.
CREATE INDEX ix_job_chunks_open ON job_chunks (run_id, chunk) WHERE state IN ('pending', 'claimed');
CREATE TABLE job_done (
    run_id      text COLLATE "C" NOT NULL REFERENCES job_runs (id) ON DELETE CASCADE,
    idx         bigint NOT NULL,
    source      text,
    response_id text COLLATE "C",
    outcome     text NOT NULL CHECK (outcome IN ('fetched', 'cached', 'failed')),
    done_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (run_id, idx)
);
CREATE TABLE job_workers (
    run_id     text COLLATE "C" NOT NULL REFERENCES job_runs (id) ON DELETE CASCADE,
    worker     text COLLATE "C" NOT NULL,
    host       text NOT NULL,
    pid        integer NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    seen_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, worker)
);
"""


async def _to_v4(conn: Connection) -> None:
    await conn.execute(_V4)


_V5 = """
-- How each response's records validated (datasets): the first errors as JSON, all counted.
CREATE TABLE validations (
    response_id  text NOT NULL,
    model        text NOT NULL,
    dataset      text,
    ok           bigint NOT NULL,
    failed       bigint NOT NULL,
    errors       text NOT NULL,
    validated_at timestamptz NOT NULL,
    PRIMARY KEY (response_id, model)
);
"""


async def _to_v5(conn: Connection) -> None:
    await conn.execute(_V5)


MIGRATIONS: dict[int, Callable[[Connection], Awaitable[None]]] = {
    0: _to_v1,
    1: _to_v2,
    2: _to_v3,
    3: _to_v4,
    4: _to_v5,
}
SCHEMA_VERSION = max(MIGRATIONS) + 1


async def read_version(conn: Connection, schema: str) -> int | None:
    """The schema's version, or None if it has no ``schema_version`` table (no store there)."""
    found = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f'"{schema}".schema_version')
    if not found:
        return None
    version = await conn.fetchval(f'SELECT max(version) FROM "{schema}".schema_version')
    return 0 if version is None else int(version)


def _newer(location: str, version: int) -> StoreError:
    return StoreError(
        f"{location} has schema version {version}, newer than this release supports "
        f"({SCHEMA_VERSION}); upgrade mxm-dataio-async"
    )


async def prepare(
    conn: Connection, schema: str, location: str, *, create: bool, read_only: bool
) -> int:
    """Check (and unless read-only, create and migrate) the store's tables; returns how many
    migration steps this call ran (0 if another process had done it)."""
    version = await read_version(conn, schema)
    if version is not None and version > SCHEMA_VERSION:
        raise _newer(location, version)
    if version == SCHEMA_VERSION:
        return 0
    if version is None and not create:
        raise StoreError(
            f"no store at {location}: schema {schema!r} has no mxm-dataio tables "
            "(open it with create=True to make one there)"
        )
    if read_only:
        raise StoreError(
            f"{location} has schema version {version}; open it once writable to migrate it to "
            f"{SCHEMA_VERSION}"
        )
    steps = 0
    async with conn.transaction():
        # One process creates or migrates; the others wait here and find it done.
        await conn.execute("SELECT pg_advisory_xact_lock($1)", advisory_key(schema))
        if not await conn.fetchval("SELECT 1 FROM pg_namespace WHERE nspname = $1", schema):
            await conn.execute(f'CREATE SCHEMA "{schema}"')
        await conn.execute(f'SET LOCAL search_path TO "{schema}"')
        current = await read_version(conn, schema) or 0
        if current > SCHEMA_VERSION:
            raise _newer(location, current)
        while current < SCHEMA_VERSION:
            await MIGRATIONS[current](conn)
            current += 1
            steps += 1
        await conn.execute(
            "INSERT INTO schema_version (one, version) VALUES (true, $1) ON CONFLICT (one) "
            "DO UPDATE SET version = excluded.version, updated_at = now()",
            current,
        )
    return steps
