"""Leases (one run of a job at a time) and telling a dead run from a live one.

A holder is ``host:pid:random``; a holder or a session of this host whose process is gone was
killed without cleaning up: its lease is taken over at once and its session is abandoned.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.abc

from mxm_dataio_async._clock import Clock
from mxm_dataio_async._exceptions import LeaseHeld, StoreError
from mxm_dataio_async._models import Session, SessionStatus
from mxm_dataio_async._store._local import pid_alive
from mxm_dataio_async._store._protocols import Lease, MetadataStore

__all__ = ["dead_holder", "default_holder", "hold", "process_gone", "seen"]


def default_holder() -> str:
    """``host:pid:random``: unique per lease holder, readable in the ``leases`` table."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def process_gone(host: str | None, pid: int | None) -> bool:
    """A process of this host that is not running any more (a run killed without cleaning up)."""
    return host == socket.gethostname() and pid is not None and not pid_alive(pid)


def dead_holder(holder: str) -> bool:
    """A lease holder (``host:pid:random``) whose process on this host is gone."""
    host, _, rest = holder.partition(":")
    pid = rest.partition(":")[0]
    return pid.isdigit() and process_gone(host, int(pid))


def seen(session: Session) -> Session:
    """A session as it is: one still ``open`` whose process on this host is gone is abandoned
    (a writable open of the store records that; a read-only view shows it)."""
    if session.status is SessionStatus.OPEN and process_gone(session.host, session.pid):
        return dataclasses.replace(session, status=SessionStatus.ABANDONED)
    return session


@asynccontextmanager
async def hold(
    metadata: MetadataStore,
    tg: anyio.abc.TaskGroup,
    clock: Clock,
    name: str,
    holder: str | None,
    *,
    ttl: float,
    wait: bool,
    poll: float,
) -> AsyncIterator[Lease]:
    """``Store.lease``: acquire (taking over a dead holder's, waiting if asked), renew every
    ``ttl / 3`` from ``tg`` while the block runs, release at the end; a lost lease cancels the
    block and raises ``LeaseHeld``."""
    who = holder or default_holder()
    while True:
        try:
            held = await metadata.acquire_lease(name, who, ttl)
            break
        except LeaseHeld as exc:
            if dead_holder(exc.holder):  # a run of this host that was killed: take over
                held = await metadata.acquire_lease(name, who, ttl, replacing=exc.holder)
                break
            if not wait:
                raise
            await clock.sleep(poll)
    lost: list[LeaseHeld] = []
    body_scope = anyio.CancelScope()
    beat_scope = anyio.CancelScope()

    async def heartbeat() -> None:
        nonlocal held
        with beat_scope:
            while True:
                await clock.sleep(ttl / 3)
                try:
                    held = await metadata.renew_lease(held, ttl)
                except LeaseHeld as exc:
                    lost.append(exc)
                    body_scope.cancel()
                    return
                except StoreError:
                    continue  # a busy or briefly failing store: try again before expiry

    # The heartbeat runs in the store's task group, not around the block: an error in the
    # block then propagates as itself, not wrapped in an ExceptionGroup.
    tg.start_soon(heartbeat)
    try:
        with body_scope:
            yield held
        if lost:
            raise lost[0]
    finally:
        beat_scope.cancel()
        if not lost:
            with anyio.CancelScope(shield=True):
                await metadata.release_lease(held)
