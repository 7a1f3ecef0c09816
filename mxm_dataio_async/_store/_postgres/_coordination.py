"""Checkpoints for consumers of the response log, and leases for jobs (PostgreSQL).

A checkpoint keeps the response's position in the log, ``(txid, pos)`` (see ``_schema``), so it
outlives pruning of that response. Each write is one statement.

Leases are decided by the server's clock: ``now()`` stamps ``acquired_at``, ``heartbeat_at`` and
``expires_at`` and decides expiry, so hosts with skewed clocks sharing a store agree on who holds
a lease (the SQLite backend compares the holders' clocks). ``acquire`` is one upsert that only
takes over a row held by the same holder or expired; when it takes nothing, the same transaction
(which the upsert left holding the row's lock) reads who holds it.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any, Final

from mxm_dataio_async._exceptions import LeaseHeld
from mxm_dataio_async._store._postgres._sql import utc
from mxm_dataio_async._store._protocols import Lease

__all__ = [
    "acquire_lease",
    "position_of",
    "read_checkpoint",
    "release_lease",
    "renew_lease",
    "write_checkpoint",
]

Connection = Any  # asyncpg.Connection

# A cursor's position: its response's, else the newest a checkpoint kept for it (pruned since).
_POSITION: Final = (
    "SELECT txid, pos FROM responses WHERE id = $1 "
    "UNION ALL (SELECT txid, position FROM checkpoints WHERE response_id = $1 "
    "ORDER BY txid DESC, position DESC LIMIT 1) LIMIT 1"
)
_WRITE_CHECKPOINT: Final = (
    "INSERT INTO checkpoints (name, response_id, txid, position, updated_at) "
    "SELECT $2, $1, txid, pos, $3 FROM (" + _POSITION + ") AS found "
    "ON CONFLICT (name) DO UPDATE SET response_id = excluded.response_id, txid = excluded.txid, "
    "position = excluded.position, updated_at = excluded.updated_at RETURNING 1"
)
_ACQUIRE: Final = (
    "INSERT INTO leases AS l (name, holder, acquired_at, heartbeat_at, expires_at) "
    "VALUES ($1, $2, now(), now(), now() + make_interval(secs => $3)) "
    "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, "
    "acquired_at = excluded.acquired_at, heartbeat_at = excluded.heartbeat_at, "
    "expires_at = excluded.expires_at "
    "WHERE l.holder = excluded.holder OR l.expires_at <= now() OR l.holder = $4 "
    "RETURNING acquired_at, expires_at"
)
_RENEW: Final = (
    "INSERT INTO leases AS l (name, holder, acquired_at, heartbeat_at, expires_at) "
    "VALUES ($1, $2, $3, now(), now() + make_interval(secs => $4)) "
    "ON CONFLICT (name) DO UPDATE SET acquired_at = excluded.acquired_at, "
    "heartbeat_at = excluded.heartbeat_at, expires_at = excluded.expires_at "
    "WHERE l.holder = excluded.holder "
    "RETURNING expires_at"
)
_HOLDER: Final = "SELECT holder, expires_at FROM leases WHERE name = $1"


def _unknown(cursor: str) -> ValueError:
    return ValueError(f"unknown cursor {cursor!r}: no response with that id")


async def position_of(conn: Connection, cursor: str) -> tuple[int, int]:
    """The log position of a cursor (a response id), also after that response was pruned."""
    row = await conn.fetchrow(_POSITION, cursor)
    if row is None:
        raise _unknown(cursor)
    return int(row[0]), int(row[1])


async def read_checkpoint(conn: Connection, name: str) -> str | None:
    found = await conn.fetchval("SELECT response_id FROM checkpoints WHERE name = $1", name)
    return None if found is None else str(found)


async def write_checkpoint(conn: Connection, name: str, cursor: str, now: datetime) -> None:
    if await conn.fetchval(_WRITE_CHECKPOINT, cursor, name, utc(now)) is None:
        raise _unknown(cursor)


async def acquire_lease(
    conn: Connection, name: str, holder: str, ttl: float, replacing: str | None = None
) -> Lease:
    """Take the lease ``name`` for ``ttl`` seconds, or raise ``LeaseHeld`` naming its holder.

    A lease whose holder stopped renewing it (a crashed run) is taken over once expired, or at
    once when that holder is ``replacing`` (known dead)."""
    while True:
        async with conn.transaction():
            row = await conn.fetchrow(_ACQUIRE, name, holder, float(ttl), replacing)
            if row is not None:
                return Lease(name, holder, row[0], row[1])
            held = await conn.fetchrow(_HOLDER, name)
        if held is not None:
            raise LeaseHeld(name, held[0], held[1])
        # Released between the two statements (cannot happen while the upsert's lock is held,
        # but a loop costs nothing): try again.


async def renew_lease(conn: Connection, lease: Lease, ttl: float) -> Lease:
    """Extend a held lease; ``LeaseHeld`` if someone else took it meanwhile."""
    while True:
        async with conn.transaction():
            expires = await conn.fetchval(
                _RENEW, lease.name, lease.holder, utc(lease.acquired_at), float(ttl)
            )
            if expires is not None:
                return Lease(lease.name, lease.holder, lease.acquired_at, expires)
            held = await conn.fetchrow(_HOLDER, lease.name)
        if held is not None:
            raise LeaseHeld(lease.name, held[0], held[1])


async def abandon_sessions(conn: Connection, host: str, alive: Callable[[int], bool]) -> int:
    """Mark abandoned the open sessions of ``host`` whose process is gone."""
    async with conn.transaction():
        rows = await conn.fetch(
            "SELECT id, pid FROM sessions WHERE status = 'open' AND host = $1 FOR UPDATE", host
        )
        dead = [(r[0], r[1]) for r in rows if r[1] is not None and not alive(int(r[1]))]
        for sid, pid in dead:
            await conn.execute(
                "UPDATE sessions SET status = 'abandoned', ended_at = now(), error = $2 "
                "WHERE id = $1",
                sid,
                f"process {pid} on {host} ended without recording an end",
            )
    return len(dead)


async def release_lease(conn: Connection, lease: Lease) -> None:
    """Give the lease up (only if still ours)."""
    await conn.execute(
        "DELETE FROM leases WHERE name = $1 AND holder = $2", lease.name, lease.holder
    )
