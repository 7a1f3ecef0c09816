"""WAL checkpoints off the commit path.

SQLite checkpoints the write-ahead log automatically, inside the commit that crosses
``wal_autocheckpoint`` pages: that commit then copies every page of the log into the database
file, and every fetch waiting on it waits too (commit stalls of 10-19 ms measured here). The
writer's connection turns that off (``PRAGMA wal_autocheckpoint=0``) and this task runs a PASSIVE
checkpoint from a connection of its own shortly after commits: it copies what no reader still
needs without taking the write lock, so commits go on meanwhile. With the log checkpointed, the
writer starts it again from the top on its next commit, so the file stays small.

Under continuous commits that moment never comes: every checkpoint ends with new frames already
behind it, and SQLite starts the log again only when all of it is in the database as a write
transaction begins. The log then grew without bound (3.3 GB after 300,000 recorded 1 KiB misses,
its index mapped into memory with it). So once a checkpoint finds the log over ``RESTART_PAGES``,
the writer itself checkpoints what is left right after its next commit (little: this task has
copied the rest), in the same hop, and the transaction after that starts the log from the top.

Design decisions:

- After commits, not on a timer: an idle store does no work. A checkpoint waits for a commit, then
  for ``interval`` more (commits arriving meanwhile are checkpointed together).
- PASSIVE only: it never waits for readers or writers, so it cannot stall anything; what a
  long-lived reader still needs is copied by a later checkpoint.
- A failed checkpoint (busy, I/O) is logged and retried after the next commit: the log only grows
  until then, as it would with a long reader.
- Other processes' writers checkpoint with their own tasks; the last connection to close
  checkpoints and removes the log as SQLite always does.
"""

from __future__ import annotations

import logging
import sqlite3
from typing import Final

import aiosqlite
import anyio

__all__ = ["CHECKPOINT_INTERVAL", "RESTART_PAGES", "Checkpointer", "settings"]

log = logging.getLogger("mxm_dataio_async.store")

#: Seconds between a commit and the checkpoint that follows it.
CHECKPOINT_INTERVAL: Final = 0.05
#: Pages in the log past which the writer finishes a checkpoint after its next commit (16 MiB of
#: 4 KiB pages).
RESTART_PAGES = 4096


class settings:
    #: Checkpoint off the commit path (False: SQLite's automatic checkpoints inside commits, as
    #: before; benchmarks/engine.py compares the two in one run).
    off_commit = True
    #: Seconds between a commit and the checkpoint after it, for stores opened from now on.
    interval = CHECKPOINT_INTERVAL


class Checkpointer:
    """Runs PASSIVE WAL checkpoints on its own connection after the writer commits."""

    def __init__(
        self, conn: aiosqlite.Connection, *, interval: float = CHECKPOINT_INTERVAL
    ) -> None:
        self._conn = conn
        self._interval = interval
        self._restart_pages = RESTART_PAGES
        self._finish = False
        self._committed = anyio.Event()
        self._scope = anyio.CancelScope()
        self.checkpoints = 0
        """Checkpoints run (for tests and statistics)."""
        self.finishes = 0
        """Times the writer was asked to finish a checkpoint (for tests and statistics)."""

    def finish_wanted(self) -> bool:
        """Asked by the writer before each commit: whether to checkpoint what is left of the log
        right after it, so that the next transaction starts the log from the top (once per
        checkpoint that found the log too long)."""
        if self._finish:
            self._finish = False
            self.finishes += 1
            return True
        return False

    def committed(self) -> None:
        """Called by the writer after each commit."""
        self._committed.set()

    def stop(self) -> None:
        """End :meth:`run` (the last connection's close checkpoints what is left)."""
        self._scope.cancel()

    async def run(self) -> None:
        with self._scope:
            while True:
                await self._committed.wait()
                await anyio.sleep(self._interval)
                self._committed = anyio.Event()  # commits from now on ask for the next one
                await self.checkpoint()

    async def checkpoint(self) -> tuple[int, int, int] | None:
        """One PASSIVE checkpoint: ``(busy, pages in the log, pages checkpointed)``, or ``None``
        if it failed (logged)."""
        try:
            rows = await self._conn.execute_fetchall("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error as exc:
            log.warning("store: WAL checkpoint failed (retried after the next commit): %s", exc)
            return None
        self.checkpoints += 1
        busy, logged, moved = (int(x) for x in next(iter(rows)))
        if logged > self._restart_pages:
            self._finish = True
        return busy, logged, moved
