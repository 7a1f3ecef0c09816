"""Checkpoints for consumers of the response log, and leases for jobs (SQLite).

Both are small, rare writes with a read-decide-write shape, so they run on a short-lived
connection in a worker thread inside ``BEGIN IMMEDIATE`` (the group-commit writer only appends
rows). A checkpoint's position is the response's rowid: with one writer at a time, rowid order is
commit order, so a consumer that resumes "after" a position sees every later response once.

Lease expiry compares UTC times from the holders' clocks (the Store's clock): processes sharing a
store on several hosts need synchronised clocks (NTP); the TTL should be well above their skew.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from datetime import datetime, timedelta

from mxm_dataio_async._exceptions import LeaseHeld
from mxm_dataio_async._store._protocols import Lease
from mxm_dataio_async._store._sqlite._sql import transaction, ts

__all__ = [
    "abandon_sessions",
    "acquire_lease",
    "position_of",
    "read_checkpoint",
    "release_lease",
    "renew_lease",
    "write_checkpoint",
]

_UPSERT_LEASE = (
    "INSERT INTO leases (name, holder, acquired_at, heartbeat_at, expires_at) "
    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, "
    "acquired_at = excluded.acquired_at, heartbeat_at = excluded.heartbeat_at, "
    "expires_at = excluded.expires_at"
)


def position_of(conn: sqlite3.Connection, cursor: str) -> int:
    """The log position of a cursor (a response id), also after that response was pruned."""
    row = conn.execute("SELECT rowid FROM responses WHERE id = ?", (cursor,)).fetchone()
    if row is None:
        row = conn.execute(
            "SELECT max(position) FROM checkpoints WHERE response_id = ?", (cursor,)
        ).fetchone()
        if row is None or row[0] is None:
            raise ValueError(f"unknown cursor {cursor!r}: no response with that id")
    return int(row[0])


def read_checkpoint(conn: sqlite3.Connection, name: str) -> str | None:
    row = conn.execute("SELECT response_id FROM checkpoints WHERE name = ?", (name,)).fetchone()
    return None if row is None else str(row[0])


def write_checkpoint(conn: sqlite3.Connection, name: str, cursor: str, now: datetime) -> None:
    with transaction(conn, write=True):
        position = position_of(conn, cursor)
        conn.execute(
            "INSERT INTO checkpoints (name, response_id, position, updated_at) "
            "VALUES (?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET "
            "response_id = excluded.response_id, position = excluded.position, "
            "updated_at = excluded.updated_at",
            (name, cursor, position, ts(now)),
        )


def acquire_lease(
    conn: sqlite3.Connection,
    name: str,
    holder: str,
    ttl: float,
    now: datetime,
    replacing: str | None = None,
) -> Lease:
    """Take the lease ``name`` for ``ttl`` seconds, or raise ``LeaseHeld`` naming its holder.

    A lease whose holder stopped renewing it (a crashed run) is taken over once it has expired,
    or at once when that holder is ``replacing`` (known dead).
    """
    expires = now + timedelta(seconds=ttl)
    with transaction(conn, write=True):
        row = conn.execute(
            "SELECT holder, expires_at FROM leases WHERE name = ?", (name,)
        ).fetchone()
        held_by_another = row is not None and row[0] not in (holder, replacing)
        if held_by_another and datetime.fromisoformat(row[1]) > now:
            raise LeaseHeld(name, row[0], datetime.fromisoformat(row[1]))
        conn.execute(_UPSERT_LEASE, (name, holder, ts(now), ts(now), ts(expires)))
    return Lease(name, holder, now, expires)


def renew_lease(conn: sqlite3.Connection, lease: Lease, ttl: float, now: datetime) -> Lease:
    """Extend a held lease; ``LeaseHeld`` if someone else took it meanwhile."""
    expires = now + timedelta(seconds=ttl)
    with transaction(conn, write=True):
        row = conn.execute(
            "SELECT holder, expires_at FROM leases WHERE name = ?", (lease.name,)
        ).fetchone()
        if row is not None and row[0] != lease.holder:
            raise LeaseHeld(lease.name, row[0], datetime.fromisoformat(row[1]))
        conn.execute(
            _UPSERT_LEASE,
            (lease.name, lease.holder, ts(lease.acquired_at), ts(now), ts(expires)),
        )
    return Lease(lease.name, lease.holder, lease.acquired_at, expires)


def abandon_sessions(
    conn: sqlite3.Connection, host: str, alive: Callable[[int], bool], now: datetime
) -> int:
    """Mark abandoned the open sessions of ``host`` whose process is gone."""
    with transaction(conn, write=True):
        rows = conn.execute(
            "SELECT id, pid FROM sessions WHERE status = 'open' AND host = ?", (host,)
        ).fetchall()
        dead = [(sid, pid) for sid, pid in rows if pid is not None and not alive(int(pid))]
        for sid, pid in dead:
            conn.execute(
                "UPDATE sessions SET status = 'abandoned', ended_at = ?, error = ? "
                "WHERE id = ? AND status = 'open'",
                (ts(now), f"process {pid} on {host} ended without recording an end", sid),
            )
    return len(dead)


def release_lease(conn: sqlite3.Connection, lease: Lease) -> None:
    """Give the lease up (only if still ours)."""
    with transaction(conn, write=True):
        conn.execute("DELETE FROM leases WHERE name = ? AND holder = ?", (lease.name, lease.holder))
