"""``SqliteMetadata``: the embedded :class:`MetadataStore`, one ``dataio.sqlite`` file.

The hot path has two connections, each served by one task: the group-commit writer (``_writer``)
and the batched reader (``_reader``), so a commit and a lookup each cost one hop to SQLite's thread
per batch, not per call. Everything else (checkpoints, leases, inspection, maintenance) is rare and
runs on a short-lived connection in a worker thread (``_queries``, ``_coordination``).

Read-your-writes across the two connections: a batched lookup's query may have started before a
commit that completes while the lookup is answered. So the store remembers what it committed
recently (OK responses by request hash, with the commit's sequence number) and a lookup also
considers a response committed *after the lookup began*; nothing older is ever taken from memory,
so the memory never answers for what SQL can see. Inline payloads committed recently are kept
too (bounded by weight), so ``read()`` right after ``fetch()`` needs no trip to SQLite's thread;
bytes are immutable by their sha256, and deleting payload rows clears that memory.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

import aiosqlite
import anyio
import anyio.to_thread

from mxm_dataio_async._clock import SYSTEM_CLOCK, Clock
from mxm_dataio_async._exceptions import UsageError
from mxm_dataio_async._lifecycle import State
from mxm_dataio_async._models import Response, ResponseStatus, Session
from mxm_dataio_async._store._memory import PayloadMemory
from mxm_dataio_async._store._protocols import (
    DanglingReference,
    Lease,
    MetadataStats,
    PayloadRow,
    PruneCounts,
    Recording,
    Table,
    Tier,
)
from mxm_dataio_async._store._sqlite import _coordination, _queries, _validations
from mxm_dataio_async._store._sqlite._checkpoint import Checkpointer
from mxm_dataio_async._store._sqlite._checkpoint import settings as checkpoints
from mxm_dataio_async._store._sqlite._reader import PREFETCH_SQL, BatchReader
from mxm_dataio_async._store._sqlite._rows import (
    RESPONSE_COLUMNS,
    SESSION_COLUMNS,
    request_row,
    response_from_row,
    response_row,
    session_from_row,
    session_row,
)
from mxm_dataio_async._store._sqlite._schema import DB_NAME, prepare
from mxm_dataio_async._store._sqlite._sql import (
    connection,
    sqlite_error,
    ts,
)
from mxm_dataio_async._store._sqlite._window import CommitWindow
from mxm_dataio_async._store._sqlite._writer import Row, Writer
from mxm_dataio_async._store._validation import ValidationOutcome, ValidationTotals

__all__ = ["SqliteMetadata"]

#: Answer cache lookups on the writer's connection (False: on the reader's, as before; the
#: benchmarks compare the two).
LOOKUPS_ON_WRITER = True

T = TypeVar("T")


async def _shielded(loop: Callable[[], Awaitable[None]]) -> None:
    # The writer and reader serve until aclose() stops them, not until the opener is cancelled:
    # code holding the store open under a cancelled scope still has its final writes (a
    # session's end row) to make on the way out.
    with anyio.CancelScope(shield=True):
        await loop()


async def _shielded_close(conn: aiosqlite.Connection) -> None:
    with anyio.CancelScope(shield=True):
        await conn.close()


class SqliteMetadata:
    """Metadata in ``<root>/dataio.sqlite`` (WAL, one writer with group commit, batched reads).

    ``create=False`` opens only an existing store; ``read_only=True`` also refuses every write
    (inspection commands use it: they never create or change a store by mistake).
    """

    def __init__(
        self,
        root: str | Path,
        *,
        busy_timeout: float = 10.0,
        create: bool = True,
        read_only: bool = False,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        if not busy_timeout >= 0:
            raise ValueError("busy_timeout must be >= 0 seconds")
        self.root = Path(root)
        self.db_path = self.root / DB_NAME
        self.busy_timeout = float(busy_timeout)
        self.create = create and not read_only
        self.read_only = read_only
        self.clock = clock
        self._state = State.UNOPENED
        self._stack: AsyncExitStack | None = None
        self._writer: Writer | None = None
        self._checkpointer: Checkpointer | None = None
        self._reader: aiosqlite.Connection | None = None
        self._batch_reader: BatchReader | None = None
        # Checksums of payloads found corrupt and discarded: lookups skip responses naming them.
        self._bad: set[str] = set()
        # What commits while lookups are in flight, for them (_window.py).
        self._window = CommitWindow()
        # Inline payloads read() gets without a query: committed here, found with a lookup, or
        # read ahead of a loop over iter_responses (_store/_memory.py).
        self._memory = PayloadMemory()

    def __repr__(self) -> str:
        mode = " read-only" if self.read_only else ""
        return f"<SqliteMetadata {str(self.db_path)!r}{mode} state={self._state}>"

    @property
    def location(self) -> str:
        return str(self.db_path)

    # -- lifecycle ------------------------------------------------------------------------------

    async def open(self) -> None:
        if self._state is State.OPEN:
            return
        if self._state is State.CLOSED:
            raise UsageError("this metadata store was closed; create a new one")
        stack = AsyncExitStack()
        try:
            await self._open(stack)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await stack.aclose()
            raise
        self._stack = stack
        self._state = State.OPEN

    async def _open(self, stack: AsyncExitStack) -> None:
        await anyio.to_thread.run_sync(
            lambda: prepare(
                self.db_path, self.busy_timeout, create=self.create, read_only=self.read_only
            )
        )
        try:
            rconn = await aiosqlite.connect(self.db_path, isolation_level=None)
            stack.push_async_callback(_shielded_close, rconn)
            await rconn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout * 1000)}")
            # The reader never writes; query_only turns a bug into an error instead of a lock.
            await rconn.execute("PRAGMA query_only=1")
            wconn = None
            checkpointer = None
            if not self.read_only:
                wconn = await aiosqlite.connect(self.db_path, isolation_level=None)
                stack.push_async_callback(_shielded_close, wconn)
                await wconn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout * 1000)}")
                # A commit survives a process crash; only an OS crash may lose the last few.
                await wconn.execute("PRAGMA synchronous=NORMAL")
                if checkpoints.off_commit:  # no commit copies the log into the database
                    cconn = await aiosqlite.connect(self.db_path, isolation_level=None)
                    stack.push_async_callback(_shielded_close, cconn)
                    await wconn.execute("PRAGMA wal_autocheckpoint=0")
                    checkpointer = Checkpointer(cconn, interval=checkpoints.interval)
            found = await rconn.execute_fetchall("SELECT checksum FROM bad_payloads")
        except sqlite3.Error as exc:
            raise sqlite_error(f"open {self.db_path}", exc) from exc
        self._bad = {str(row[0]) for row in found}
        self._reader = rconn
        writer = None
        if wconn is not None:
            on_commit = None if checkpointer is None else checkpointer.committed
            finish_log = None if checkpointer is None else checkpointer.finish_wanted
            writer = Writer(wconn, on_commit=on_commit, finish_log=finish_log)
        # Lookups go to the writer's connection, in the writer's thread (one thread less taking
        # turns at the GIL: +2% recorded misses, +5% hits measured); a read-only store has only
        # the reader. Its queries never land inside the writer's transaction (Writer.lock).
        if writer is not None and LOOKUPS_ON_WRITER:
            batch_reader = BatchReader(
                writer.conn, RESPONSE_COLUMNS, self._memory, lock=writer.lock
            )
        else:
            batch_reader = BatchReader(rconn, RESPONSE_COLUMNS, self._memory)
        # The writer and reader tasks live in a task group entered here and exited by aclose():
        # open and close happen in the same task, in LIFO order with other scopes (anyio's rule).
        tg = await stack.enter_async_context(anyio.create_task_group())
        if writer is not None:
            tg.start_soon(_shielded, writer.run)
            self._writer = writer
        if checkpointer is not None:
            tg.start_soon(_shielded, checkpointer.run)
            self._checkpointer = checkpointer
        tg.start_soon(_shielded, batch_reader.run)
        self._batch_reader = batch_reader

    async def aclose(self) -> None:
        """Commit what is queued, then close. Safe to call twice."""
        if self._state is not State.OPEN:
            self._state = State.CLOSED
            return
        self._state = State.CLOSED
        stack, self._stack = self._stack, None
        if self._writer is not None:
            self._writer.drain_and_stop()
        if self._checkpointer is not None:
            self._checkpointer.stop()
        if self._batch_reader is not None:
            self._batch_reader.stop()
        if stack is not None:
            await stack.aclose()  # exiting the task group waits for the writer's last commit
        self._writer = None
        self._checkpointer = None
        self._reader = None
        self._batch_reader = None

    def _require_open(self) -> None:
        if self._state is not State.OPEN:
            from mxm_dataio_async._exceptions import StoreClosedError

            raise StoreClosedError(
                f"the store at {self.root} {self._state.describe()}; use `async with Store(...)`"
            )

    def _require_writer(self) -> Writer:
        writer = self._writer
        if writer is None or self._state is not State.OPEN:
            self._require_open()
            raise UsageError(f"the store at {self.root} was opened read-only")
        return writer

    async def _in_thread(
        self,
        fn: Callable[[sqlite3.Connection], T],
        action: str,
        *,
        write: bool = False,
    ) -> T:
        """Run ``fn`` on a short-lived connection of its own, in a worker thread."""
        self._require_open()
        if write and self.read_only:
            raise UsageError(f"cannot {action}: the store at {self.root} was opened read-only")

        def run() -> T:
            with connection(self.db_path, self.busy_timeout, read_only=not write) as conn:
                return fn(conn)

        try:
            return await anyio.to_thread.run_sync(run)
        except sqlite3.Error as exc:
            raise sqlite_error(action, exc) from exc

    # -- writing --------------------------------------------------------------------------------

    async def save_session(self, session: Session) -> None:
        await self._require_writer().write([("session", session_row(session))])

    async def record(self, recording: Recording) -> None:
        fut = self._require_writer().submit(self._rows(recording), wait=True)
        assert fut is not None
        await fut
        self._window.committed(recording.responses)
        for payload in recording.payloads:
            if payload.data is not None:
                self._memory.committed.put(payload.digest, payload.data)
        if self._bad:
            await self._repaired(recording)

    async def _repaired(self, recording: Recording) -> None:
        """Discarded payloads recorded again: lookups may use the responses naming them."""
        again = [p.checksum for p in recording.payloads if p.checksum in self._bad]
        if not again:
            return
        await self._in_thread(
            lambda conn: _queries.forget_bad(conn, again), "record repaired payloads", write=True
        )
        self._bad.difference_update(again)

    def record_later(self, recording: Recording) -> None:
        self._require_writer().submit(self._rows(recording), wait=False)

    def _rows(self, recording: Recording) -> list[Row]:
        if recording.fence is not None:
            raise UsageError(
                "a recording fenced by a run's claim needs a store with a work queue "
                "(PostgreSQL); this SQLite store has none"
            )
        request = recording.request
        rows: list[Row] = []
        if recording.payloads:  # (a cache hit's audit row has none: no clock read for it)
            now = ts(self.clock.now())
            for p in recording.payloads:  # loops, not generators: no closure per recording
                rows.append(("payload", (p.digest, p.size, p.tier, p.data, now)))
        rows.append(("request", request_row(request, recording.served_from, recording.sent)))
        for r in recording.responses:
            rows.append(("response", response_row(request, r)))
        return rows

    # -- reading --------------------------------------------------------------------------------

    async def _fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        self._require_open()
        assert self._reader is not None
        try:
            return list(await self._reader.execute_fetchall(sql, params))
        except sqlite3.Error as exc:
            raise sqlite_error("read from the store", exc) from exc

    async def latest_response(
        self, request_hash: str, *, statuses: Sequence[ResponseStatus] = (ResponseStatus.OK,)
    ) -> Response | None:
        if len(statuses) == 1 and statuses[0] is ResponseStatus.OK:
            self._require_open()
            assert self._batch_reader is not None
            window = self._window
            began = window.begin()
            try:
                row = await self._batch_reader.latest(bytes.fromhex(request_hash))
            finally:
                newer = window.end(began, request_hash)
            found = response_from_row(row) if row is not None else None
            # Committed while this lookup ran, possibly after its query's snapshot:
            if newer is not None and (found is None or newer.fetched_at > found.fetched_at):
                found = newer
            if found is not None and self._bad and found.checksum in self._bad:
                return None  # its bytes were found corrupt: not an answer until fetched again
            return found
        sql = (
            f"SELECT {RESPONSE_COLUMNS} FROM responses WHERE request_hash = ? "
            f"AND status IN ({', '.join('?' for _ in statuses)}) ORDER BY fetched_at DESC LIMIT 1"
        )
        rows = await self._fetchall(
            sql, [bytes.fromhex(request_hash), *(s.value for s in statuses)]
        )
        return response_from_row(rows[0]) if rows else None

    async def get_response(self, response_id: str) -> Response | None:
        rows = await self._fetchall(
            f"SELECT {RESPONSE_COLUMNS} FROM responses WHERE id = ?", (response_id,)
        )
        return response_from_row(rows[0]) if rows else None

    async def get_session(self, session_id: str) -> Session | None:
        rows = await self._fetchall(
            f"SELECT {SESSION_COLUMNS} FROM sessions WHERE id = ?", (session_id,)
        )
        return session_from_row(rows[0]) if rows else None

    async def list_sessions(
        self, *, source: str | None = None, limit: int | None = None
    ) -> list[Session]:
        sql = f"SELECT {SESSION_COLUMNS} FROM sessions"
        params: list[Any] = []
        if source is not None:
            sql += " WHERE source = ?"
            params.append(source)
        sql += " ORDER BY started_at DESC"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        return [session_from_row(r) for r in await self._fetchall(sql, params)]

    async def iter_responses(
        self,
        *,
        source: str | None = None,
        kind: str | None = None,
        session_id: str | None = None,
        status: ResponseStatus | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        after: str | None = None,
        page_size: int = 500,
    ) -> AsyncIterator[Response]:
        clauses: list[str] = []
        params: list[Any] = []
        for column, value in (("source", source), ("kind", kind), ("session_id", session_id)):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        if status is not None:
            clauses.append("status = ?")
            params.append(status.value)
        if since is not None:
            clauses.append("fetched_at >= ?")
            params.append(ts(since.astimezone(UTC)))
        if until is not None:
            clauses.append("fetched_at < ?")
            params.append(ts(until.astimezone(UTC)))
        where = " AND ".join(clauses) if clauses else "1"
        last = 0
        if after is not None:
            last = await self._in_thread(
                lambda conn: _coordination.position_of(conn, after), "find the cursor"
            )
        while True:
            rows = await self._fetchall(
                f"SELECT rowid, {RESPONSE_COLUMNS} FROM responses WHERE rowid > ? AND {where} "
                "ORDER BY rowid LIMIT ?",
                [last, *params, page_size],
            )
            self._memory.page(rows, offset=1)  # rowid, then RESPONSE_COLUMNS
            for row in rows:
                yield response_from_row(row[1:])
            if len(rows) < page_size:
                return
            last = rows[-1][0]

    async def payload(self, digest: bytes) -> PayloadRow | None:
        self._require_open()
        memory = self._memory
        known = memory.row(digest)
        if known is not None:
            return known
        ahead = memory.ahead_of(digest)
        if ahead:  # a loop over iter_responses: this payload and the next ones, one query
            sql = PREFETCH_SQL.format(marks=", ".join("?" * len(ahead)))
            data = memory.keep(await self._fetchall(sql, ahead), digest, ahead)
            if data is not None:  # stored bytes, unverified: the reader hashes them
                return PayloadRow(digest, len(data), "inline", data)
        assert self._batch_reader is not None
        found = await self._batch_reader.payload(digest)
        if found is None:
            return None
        size, tier, data = found
        return PayloadRow(digest, size, tier, None if data is None else bytes(data))  # type: ignore[arg-type]

    async def present_payloads(
        self, digests: Iterable[bytes], *, tier: Tier | None = None
    ) -> set[bytes]:
        wanted = list(digests)
        return await self._in_thread(
            lambda conn: _queries.present(conn, wanted, tier=tier), "read payload rows"
        )

    async def discard_payload(self, digest: bytes) -> None:
        self._memory.forget()
        now = self.clock.now()
        await self._in_thread(
            lambda conn: _queries.discard_payload(conn, digest, now),
            "discard a corrupt payload",
            write=True,
        )
        self._bad.add(digest.hex())

    # -- consumers and jobs ---------------------------------------------------------------------

    async def read_checkpoint(self, name: str) -> str | None:
        return await self._in_thread(
            lambda conn: _coordination.read_checkpoint(conn, name), "read a checkpoint"
        )

    async def write_checkpoint(self, name: str, cursor: str) -> None:
        now = self.clock.now()
        await self._in_thread(
            lambda conn: _coordination.write_checkpoint(conn, name, cursor, now),
            "write a checkpoint",
            write=True,
        )

    async def record_validation(self, outcome: ValidationOutcome) -> None:
        now = self.clock.now()
        await self._in_thread(
            lambda conn: _validations.save(conn, outcome, now),
            "record a validation outcome",
            write=True,
        )

    async def validations(self, response_id: str) -> list[ValidationOutcome]:
        return await self._in_thread(
            lambda conn: _validations.for_response(conn, response_id), "read validation outcomes"
        )

    async def validation_totals(self) -> list[ValidationTotals]:
        return await self._in_thread(_validations.totals, "add up validation outcomes")

    async def acquire_lease(
        self, name: str, holder: str, ttl: float, *, replacing: str | None = None
    ) -> Lease:
        now = self.clock.now()
        return await self._in_thread(
            lambda conn: _coordination.acquire_lease(conn, name, holder, ttl, now, replacing),
            f"acquire the lease {name!r}",
            write=True,
        )

    async def abandon_sessions(self, host: str, alive: Callable[[int], bool]) -> int:
        now = self.clock.now()
        return await self._in_thread(
            lambda conn: _coordination.abandon_sessions(conn, host, alive, now),
            "mark abandoned sessions",
            write=True,
        )

    async def renew_lease(self, lease: Lease, ttl: float) -> Lease:
        now = self.clock.now()
        return await self._in_thread(
            lambda conn: _coordination.renew_lease(conn, lease, ttl, now),
            f"renew the lease {lease.name!r}",
            write=True,
        )

    async def release_lease(self, lease: Lease) -> None:
        await self._in_thread(
            lambda conn: _coordination.release_lease(conn, lease),
            f"release the lease {lease.name!r}",
            write=True,
        )

    # -- inspection and maintenance -------------------------------------------------------------

    async def resolve_session(self, text: str) -> str:
        return await self._in_thread(
            lambda conn: _queries.resolve_session(conn, text), "find the session"
        )

    async def resolve_response(self, text: str) -> str:
        return await self._in_thread(
            lambda conn: _queries.resolve_response(conn, text), "find the response"
        )

    async def iter_rows(
        self,
        table: Table,
        *,
        session_id: str | None = None,
        ids: Iterable[str] | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        if table not in _queries.COLUMNS:
            raise ValueError(f"unknown table {table!r}; one of: {', '.join(_queries.COLUMNS)}")
        if ids is not None:
            # Rows for more than one batch of ids must still come in recording order, not batch
            # by batch (the contract suite caught that): find their rowids first (ints, as many
            # as the ids given), then read the rows a page of rowids at a time.
            wanted = sorted(set(ids))
            rowids = await self._in_thread(
                lambda conn: _queries.rowids_of(conn, table, wanted, session_id=session_id),
                f"read {table}",
            )
            for i in range(0, len(rowids), 500):
                _, rows = await self._in_thread(
                    lambda conn, page=rowids[i : i + 500]: _queries.rows_page(  # type: ignore[misc]
                        conn, table, after=0, limit=500, rowids=page
                    ),
                    f"read {table}",
                )
                for row in rows:
                    yield row
            return
        last = 0
        while True:
            last, rows = await self._in_thread(
                lambda conn, after=last: _queries.rows_page(  # type: ignore[misc]
                    conn, table, after=after, limit=500, session_id=session_id
                ),
                f"read {table}",
            )
            for row in rows:
                yield row
            if len(rows) < 500:
                break

    async def count_rows(self, table: Table | Literal["payloads"]) -> int:
        if table not in (*_queries.COLUMNS, "payloads"):
            raise ValueError(f"unknown table {table!r}")
        return await self._in_thread(
            lambda conn: int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]),
            f"count {table}",
        )

    async def iter_payload_rows(self, *, page_size: int = 256) -> AsyncIterator[PayloadRow]:
        last = b""
        while True:
            page = await self._in_thread(
                lambda conn, after=last: _queries.payload_page(conn, after, page_size),  # type: ignore[misc]
                "read payload rows",
            )
            for row in page:
                yield row
            if len(page) < page_size:
                return
            last = page[-1].digest

    async def iter_dangling_references(self) -> AsyncIterator[DanglingReference]:
        for table in ("responses", "requests"):
            last = 0
            while True:
                last, seen, found = await self._in_thread(
                    lambda conn, t=table, after=last: _queries.dangling_page(  # type: ignore[misc]
                        conn, t, after, 500
                    ),
                    f"check {table}",
                )
                for ref in found:
                    yield ref
                if seen < 500:
                    break

    async def unreferenced_payloads(self) -> list[PayloadRow]:
        return await self._in_thread(_queries.unreferenced, "find unreferenced payloads")

    async def delete_payloads(self, digests: Sequence[bytes]) -> list[bytes]:
        doomed = list(digests)
        self._memory.forget()
        return await self._in_thread(
            lambda conn: _queries.delete_unreferenced(conn, doomed),
            "delete payload rows",
            write=True,
        )

    async def prune(
        self,
        *,
        cutoff: datetime,
        source: str | None = None,
        bucket: str | None = None,
        dry_run: bool = False,
    ) -> PruneCounts:
        if not dry_run:
            self._memory.forget()
        return await self._in_thread(
            lambda conn: _queries.prune(conn, cutoff, source, bucket, dry_run),
            "prune the store",
            write=True,
        )

    async def stats(self) -> MetadataStats:
        sources, tiers = await self._in_thread(_queries.source_counts, "count the store")
        size = 0
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(OSError):  # no -wal or -shm file is no bytes
                size += (self.root / (DB_NAME + suffix)).stat().st_size
        return MetadataStats(sources, tiers, size)

    async def import_rows(
        self, payloads: Iterable[PayloadRow], rows: Mapping[Table, Iterable[dict[str, Any]]]
    ) -> dict[str, int]:
        now = self.clock.now()
        return await self._in_thread(
            lambda conn: _queries.import_rows(conn, payloads, rows, now),
            "import rows",
            write=True,
        )
