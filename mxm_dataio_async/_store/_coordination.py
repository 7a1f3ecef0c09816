"""Checkpoints for consumers of the response log, and leases for jobs.

Both are small, rare writes with a read-decide-write shape, so they run on a short-lived
connection in a worker thread inside ``BEGIN IMMEDIATE`` (the group-commit writer only appends
rows). A checkpoint's position is the response's rowid: with one writer at a time, rowid order is
commit order, so a consumer that resumes "after" a position sees every later response once.

Lease expiry compares UTC wall-clock times written by the holders: processes sharing a store on
several hosts need synchronised clocks (NTP); the TTL should be well above their skew.
"""

from __future__ import annotations

import os
import secrets
import socket
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TypeVar

import anyio.to_thread

from mxm_dataio_async._exceptions import LeaseHeld
from mxm_dataio_async._models import utcnow
from mxm_dataio_async._store._maintenance import connection, transaction
from mxm_dataio_async._store._writer import sqlite_error

__all__ = [
    "Lease",
    "acquire_lease",
    "default_holder",
    "position_of",
    "read_checkpoint",
    "release_lease",
    "renew_lease",
    "write_checkpoint",
]


def _ts(dt: datetime) -> str:
    return dt.isoformat(timespec="microseconds")


def default_holder() -> str:
    """``host:pid:random``: unique per lease holder, readable in the ``leases`` table."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


@dataclass(frozen=True, slots=True)
class Lease:
    """A held lease: ``name`` is the job, ``holder`` who holds it, until ``expires_at``."""

    name: str
    holder: str
    acquired_at: datetime
    expires_at: datetime


# -- checkpoints ---------------------------------------------------------------------------------


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


async def read_checkpoint(root: Path, name: str, busy_timeout: float) -> str | None:
    def run() -> str | None:
        with connection(root, busy_timeout) as conn:
            row = conn.execute(
                "SELECT response_id FROM checkpoints WHERE name = ?", (name,)
            ).fetchone()
            return None if row is None else str(row[0])

    return await _in_thread(run, "read a checkpoint")


async def write_checkpoint(root: Path, name: str, cursor: str, busy_timeout: float) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError("a checkpoint needs a non-empty name")

    def run() -> None:
        with connection(root, busy_timeout) as conn, transaction(conn, write=True):
            position = position_of(conn, cursor)
            conn.execute(
                "INSERT INTO checkpoints (name, response_id, position, updated_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET "
                "response_id = excluded.response_id, position = excluded.position, "
                "updated_at = excluded.updated_at",
                (name, cursor, position, _ts(utcnow())),
            )

    await _in_thread(run, "write a checkpoint")


# -- leases --------------------------------------------------------------------------------------


async def acquire_lease(
    root: Path, name: str, holder: str, ttl: float, busy_timeout: float
) -> Lease:
    """Take the lease ``name`` for ``ttl`` seconds, or raise ``LeaseHeld`` naming its holder.

    A lease whose holder stopped renewing it (a crashed run) is taken over once it has expired.
    """
    if not isinstance(name, str) or not name:
        raise ValueError("a lease needs a non-empty name")
    if not ttl > 0:
        raise ValueError(f"lease ttl must be > 0 seconds, got {ttl!r}")

    def run() -> Lease:
        now = utcnow()
        expires = now + timedelta(seconds=ttl)
        with connection(root, busy_timeout) as conn, transaction(conn, write=True):
            row = conn.execute(
                "SELECT holder, expires_at FROM leases WHERE name = ?", (name,)
            ).fetchone()
            if row is not None and row[0] != holder and datetime.fromisoformat(row[1]) > now:
                raise LeaseHeld(name, row[0], datetime.fromisoformat(row[1]))
            conn.execute(
                "INSERT INTO leases (name, holder, acquired_at, heartbeat_at, expires_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, "
                "acquired_at = excluded.acquired_at, heartbeat_at = excluded.heartbeat_at, "
                "expires_at = excluded.expires_at",
                (name, holder, _ts(now), _ts(now), _ts(expires)),
            )
        return Lease(name, holder, now, expires)

    return await _in_thread(run, f"acquire the lease {name!r}")


async def renew_lease(root: Path, lease: Lease, ttl: float, busy_timeout: float) -> Lease:
    """Extend a held lease; ``LeaseHeld`` if it expired and someone else took it meanwhile."""

    def run() -> Lease:
        now = utcnow()
        expires = now + timedelta(seconds=ttl)
        with connection(root, busy_timeout) as conn, transaction(conn, write=True):
            row = conn.execute(
                "SELECT holder, expires_at FROM leases WHERE name = ?", (lease.name,)
            ).fetchone()
            if row is not None and row[0] != lease.holder:
                raise LeaseHeld(lease.name, row[0], datetime.fromisoformat(row[1]))
            conn.execute(
                "INSERT INTO leases (name, holder, acquired_at, heartbeat_at, expires_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET "
                "heartbeat_at = excluded.heartbeat_at, expires_at = excluded.expires_at",
                (lease.name, lease.holder, _ts(lease.acquired_at), _ts(now), _ts(expires)),
            )
        return Lease(lease.name, lease.holder, lease.acquired_at, expires)

    return await _in_thread(run, f"renew the lease {lease.name!r}")


async def release_lease(root: Path, lease: Lease, busy_timeout: float) -> None:
    """Give the lease up (only if still ours)."""

    def run() -> None:
        with connection(root, busy_timeout) as conn, transaction(conn, write=True):
            conn.execute(
                "DELETE FROM leases WHERE name = ? AND holder = ?", (lease.name, lease.holder)
            )

    await _in_thread(run, f"release the lease {lease.name!r}")


T = TypeVar("T")


async def _in_thread(fn: Callable[[], T], action: str) -> T:
    try:
        return await anyio.to_thread.run_sync(fn)
    except sqlite3.Error as exc:
        raise sqlite_error(action, exc) from exc
