"""``PostgresMetadata``: the :class:`MetadataStore` in a PostgreSQL server (asyncpg).

One asyncpg pool of ``pool_size`` connections serves everything. The hot path has two kinds of
tasks, as in the SQLite backend: group-commit writers (``_writer``: ``pool_size - 1`` of them, each
committing a batch of queued ``record()`` jobs as one statement) and one batched reader
(``_reader``: cache lookups and inline payloads answered a batch per query). Everything else
(checkpoints, leases, inspection, maintenance) borrows a connection from the pool for its query.

Every driver error is translated by ``_sql.pg_error`` (in :meth:`_run`, the writer and the reader).
Reads, checkpoints and leases are retried on a fresh connection when the connection was lost (a
server restart) for up to ``busy_timeout`` seconds; the writer does the same for batches.

Read-your-writes needs no memory of recent commits here (the SQLite backend keeps one for its
cache lookups): a lookup is queued before its batch is taken, and the batch's query starts after
that, so its snapshot holds every commit that returned before the lookup began. Inline payloads
committed recently are remembered (bounded by weight), so ``read()`` right after ``fetch()`` needs
no round trip and no second sha256 (``PayloadRow.verified``); deleting payload rows clears that
memory.

Commit order for ``iter_responses`` (``after=``): see ``_schema``. A short page may have stopped
below rows that are committed but whose transaction ids are above the oldest transaction still
running; the iterator then waits (up to ``busy_timeout``) for those older transactions to finish
and reads on, so a response recorded before the call is not left out. A transaction that stays
open (on any database of the server) holds every consumer back until it ends: none skips a row.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import AsyncExitStack
from datetime import datetime
from typing import Any, Literal, TypeVar

import anyio
import anyio.to_thread

from mxm_dataio_async._clock import SYSTEM_CLOCK, Clock
from mxm_dataio_async._exceptions import StoreClosedError, UsageError
from mxm_dataio_async._lifecycle import State
from mxm_dataio_async._models import Response, ResponseStatus, Session
from mxm_dataio_async._store._memory import PayloadMemory
from mxm_dataio_async._store._postgres import _coordination, _queries, _validations
from mxm_dataio_async._store._postgres._reader import PREFETCH_SQL, BatchReader
from mxm_dataio_async._store._postgres._rows import (
    COLUMNS,
    RESPONSE_COLUMNS,
    SESSION_COLUMNS,
    request_row,
    response_from_row,
    response_row,
    session_from_row,
    session_row,
)
from mxm_dataio_async._store._postgres._schema import prepare
from mxm_dataio_async._store._postgres._sql import (
    DRIVER_ERRORS,
    close_pool,
    is_disconnect,
    open_pool,
    parse_target,
    pg_error,
    shielded,
    utc,
)
from mxm_dataio_async._store._postgres._work import PostgresWorkQueue
from mxm_dataio_async._store._postgres._writer import Job, Writer
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
from mxm_dataio_async._store._validation import ValidationOutcome, ValidationTotals

__all__ = ["PostgresMetadata"]

T = TypeVar("T")
Connection = Any  # asyncpg.Connection


class _SourceError(Exception):
    """An error raised by an iterable given to import_rows (reading a bundle): not the server's."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


class PostgresMetadata:
    """Metadata in PostgreSQL: ``PostgresMetadata("postgresql://user:pw@host:5432/db")``.

    ``schema`` (or ``?schema=name`` in the URL) puts the store's tables in that PostgreSQL schema,
    so several stores can share a database (default ``public``). ``pool_size`` connections serve
    the store (writers take all but one). ``create=False`` opens only an existing store;
    ``read_only=True`` also refuses every write. ``busy_timeout``: how long a statement waits for
    a lock held by another transaction, and how long a lost connection is retried. ``clock``
    stamps payload rows and checkpoints; leases use the server's clock.
    """

    def __init__(
        self,
        url: str,
        *,
        schema: str | None = None,
        pool_size: int = 4,
        create: bool = True,
        read_only: bool = False,
        busy_timeout: float = 10.0,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        if not busy_timeout >= 0:
            raise ValueError("busy_timeout must be >= 0 seconds")
        if isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 1:
            raise ValueError(f"pool_size must be an int >= 1, got {pool_size!r}")
        target = parse_target(url, schema)
        self._dsn = target.dsn  # with the password: never shown
        self.schema = target.schema
        self._location = target.location
        self.pool_size = pool_size
        self.busy_timeout = float(busy_timeout)
        self.create = create and not read_only
        self.read_only = read_only
        self.clock = clock
        self.migrations_run = 0
        """How many schema migration steps this store's ``open()`` ran (0: none were needed, or
        another process ran them first)."""
        self._state = State.UNOPENED
        self._stack: AsyncExitStack | None = None
        self._pool: Any = None
        self._writer: Writer | None = None
        self._reader: BatchReader | None = None
        self._bad: set[str] = set()  # payloads found corrupt: lookups skip responses naming them
        # Inline payloads read() gets without a round trip: committed here, brought by a lookup,
        # or read ahead of a loop over iter_responses (_store/_memory.py, as the SQLite backend).
        self._memory = PayloadMemory()

    def __repr__(self) -> str:
        mode = " read-only" if self.read_only else ""
        return f"<PostgresMetadata {self._location!r}{mode} state={self._state}>"

    @property
    def location(self) -> str:
        """The URL without its password (with ``?schema=`` unless ``public``)."""
        return self._location

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
        pool = await open_pool(
            self._dsn,
            self._location,
            schema=self.schema,
            size=self.pool_size,
            busy_timeout=self.busy_timeout,
            read_only=self.read_only,
        )
        stack.push_async_callback(close_pool, pool)
        self._pool = pool
        try:
            async with pool.acquire() as conn:
                self.migrations_run = await prepare(
                    conn,
                    self.schema,
                    self._location,
                    create=self.create,
                    read_only=self.read_only,
                )
                bad = await conn.fetch("SELECT checksum FROM bad_payloads")
                self._bad = {str(row[0]) for row in bad}
        except DRIVER_ERRORS as exc:
            raise pg_error(f"open {self._location}", exc, self._location) from exc
        # The writers and the reader live in a task group entered here and exited by aclose():
        # open and close happen in the same task, in LIFO order with other scopes (anyio's rule).
        tg = await stack.enter_async_context(anyio.create_task_group())
        if not self.read_only:
            writer = Writer(
                pool,
                self._location,
                workers=max(1, self.pool_size - 1),
                retry_for=self.busy_timeout,
            )
            tg.start_soon(shielded, writer.run)
            self._writer = writer
        reader = BatchReader(self._fetch, self._memory)
        tg.start_soon(shielded, reader.run)
        self._reader = reader

    async def aclose(self) -> None:
        """Commit what is queued, then close. Safe to call twice."""
        if self._state is not State.OPEN:
            self._state = State.CLOSED
            return
        self._state = State.CLOSED
        stack, self._stack = self._stack, None
        if self._writer is not None:
            self._writer.drain_and_stop()
        if self._reader is not None:
            self._reader.stop()
        if stack is not None:
            await stack.aclose()  # exiting the task group waits for the writers' last commits
        self._writer = None
        self._reader = None
        self._pool = None

    def _require_open(self) -> None:
        if self._state is not State.OPEN:
            raise StoreClosedError(
                f"the store at {self._location} {self._state.describe()}; "
                "use `async with Store(...)`"
            )

    def _require_writer(self) -> Writer:
        writer = self._writer
        if writer is None or self._state is not State.OPEN:
            self._require_open()
            raise UsageError(f"the store at {self._location} was opened read-only")
        return writer

    async def _run(
        self,
        action: str,
        fn: Callable[[Connection], Awaitable[T]],
        *,
        write: bool = False,
        retry: bool = True,
    ) -> T:
        """``fn`` on a pooled connection; driver errors become ``StoreError``. A lost connection
        is retried (``retry``: the operation is idempotent) for up to ``busy_timeout``."""
        self._require_open()
        if write and self.read_only:
            raise UsageError(f"cannot {action}: the store at {self._location} was opened read-only")
        deadline: float | None = None
        delay = 0.01
        while True:
            pool = self._pool
            if pool is None:
                self._require_open()
            try:
                async with pool.acquire() as conn:
                    return await fn(conn)
            except DRIVER_ERRORS as exc:
                if retry and is_disconnect(exc) and self._state is State.OPEN:
                    now = time.monotonic()
                    if deadline is None:
                        deadline = now + self.busy_timeout
                    if now < deadline:
                        await anyio.sleep(delay)
                        delay = min(delay * 2, 0.5)
                        continue
                raise pg_error(action, exc, self._location) from exc

    async def _fetch(self, action: str, sql: str, args: Sequence[Any]) -> list[Any]:
        rows: list[Any] = await self._run(action, lambda conn: conn.fetch(sql, *args))
        return rows

    # -- writing --------------------------------------------------------------------------------

    async def save_session(self, session: Session) -> None:
        await self._require_writer().write(Job(sessions=[session_row(session)]))

    async def record(self, recording: Recording) -> None:
        fut = self._require_writer().submit(self._job(recording), wait=True)
        assert fut is not None
        await fut
        for payload in recording.payloads:
            if payload.data is not None:
                self._memory.committed.put(payload.digest, payload.data)
        again = [p.checksum for p in recording.payloads if p.checksum in self._bad]
        if again:  # discarded payloads recorded again: lookups may use them
            await self._run(
                "record repaired payloads",
                lambda conn: conn.execute(
                    "DELETE FROM bad_payloads WHERE checksum = ANY($1::text[])", again
                ),
                write=True,
            )
            self._bad.difference_update(again)

    def record_later(self, recording: Recording) -> None:
        self._require_writer().submit(self._job(recording), wait=False)

    def _job(self, recording: Recording) -> Job:
        request = recording.request
        payloads: list[Sequence[Any]] | None = None
        if recording.payloads:  # (a cache hit's audit row has none: no clock read for it)
            now = utc(self.clock.now())
            payloads = [(p.digest, p.size, p.tier, p.data, now) for p in recording.payloads]
        fence = recording.fence
        done: list[Sequence[Any]] | None = None
        if fence is not None and fence.index is not None and recording.responses:
            answer = recording.responses[-1]
            outcome = "fetched" if answer.status is ResponseStatus.OK else "failed"
            done = [(fence.run_id, fence.index, fence.source, answer.id, outcome)]
        return Job(
            payloads=payloads,
            requests=[request_row(request, recording.served_from, recording.sent)],
            responses=[response_row(request, r) for r in recording.responses],
            fence=None if fence is None else (fence.run_id, fence.chunk, fence.owner),
            done=done,
        )

    @property
    def work(self) -> PostgresWorkQueue:
        """The work queue of runs shared by many workers, in this store's database."""
        return PostgresWorkQueue(self)

    async def on_connection(
        self,
        action: str,
        fn: Callable[[Connection], Awaitable[T]],
        *,
        write: bool = False,
        retry: bool = True,
    ) -> T:
        """``fn`` on a pooled connection, with this store's error translation and retries (for
        the modules of this package that run their own statements)."""
        return await self._run(action, fn, write=write, retry=retry)

    # -- reading --------------------------------------------------------------------------------

    async def latest_response(
        self, request_hash: str, *, statuses: Sequence[ResponseStatus] = (ResponseStatus.OK,)
    ) -> Response | None:
        if len(statuses) == 1 and statuses[0] is ResponseStatus.OK:
            self._require_open()
            assert self._reader is not None
            row = await self._reader.latest(bytes.fromhex(request_hash))
            found = response_from_row(row) if row is not None else None
            if found is not None and self._bad and found.checksum in self._bad:
                return None  # its bytes were found corrupt: not an answer until fetched again
            return found
        rows = await self._fetch(
            "look up a response",
            f"SELECT {RESPONSE_COLUMNS} FROM responses WHERE request_hash = $1 "
            "AND status = ANY($2::text[]) ORDER BY fetched_at DESC LIMIT 1",
            (bytes.fromhex(request_hash), [s.value for s in statuses]),
        )
        return response_from_row(rows[0]) if rows else None

    async def get_response(self, response_id: str) -> Response | None:
        rows = await self._fetch(
            "read a response",
            f"SELECT {RESPONSE_COLUMNS} FROM responses WHERE id = $1",
            (response_id,),
        )
        return response_from_row(rows[0]) if rows else None

    async def get_session(self, session_id: str) -> Session | None:
        rows = await self._fetch(
            "read a session", f"SELECT {SESSION_COLUMNS} FROM sessions WHERE id = $1", (session_id,)
        )
        return session_from_row(rows[0]) if rows else None

    async def list_sessions(
        self, *, source: str | None = None, limit: int | None = None
    ) -> list[Session]:
        sql = f"SELECT {SESSION_COLUMNS} FROM sessions"
        args: list[Any] = []
        if source is not None:
            args.append(source)
            sql += " WHERE source = $1"
        sql += " ORDER BY started_at DESC, pos DESC"
        if limit is not None:
            args.append(int(limit))
            sql += f" LIMIT ${len(args)}"
        return [session_from_row(r) for r in await self._fetch("list sessions", sql, args)]

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
        page_sql, pending_sql, args = _queries.response_pages(
            source=source,
            kind=kind,
            session_id=session_id,
            status=status,
            since=since,
            until=until,
        )
        position = (0, 0)
        if after is not None:
            position = await self._run(
                "find the cursor", lambda conn: _coordination.position_of(conn, after)
            )
        n = len(RESPONSE_COLUMNS.split(","))
        waited = False
        while True:
            rows = await self._fetch("read responses", page_sql, (*position, *args, page_size))
            self._memory.page(rows)  # for the reads that follow
            for row in rows:
                yield response_from_row(row)
            if rows:
                position = (int(rows[-1][n]), int(rows[-1][n + 1]))
            if len(rows) == page_size:
                continue
            if waited:
                return
            # Committed rows beyond the horizon: wait for the older transactions still running.
            waited = True
            newest = await self._run(
                "read responses",
                lambda conn, p=position: conn.fetchval(pending_sql, *p, *args),  # type: ignore[misc]
            )
            if newest is None or not await self._wait_past(int(newest)):
                return

    async def _wait_past(self, txid: int) -> bool:
        """Wait until every transaction up to ``txid`` has ended (up to ``busy_timeout``)."""
        deadline = time.monotonic() + self.busy_timeout
        delay = 0.001
        while True:
            horizon = await self._run(
                "read responses", lambda conn: conn.fetchval(f"SELECT {_queries.HORIZON}")
            )
            if int(horizon) > txid:
                return True
            if time.monotonic() >= deadline:
                return False
            await anyio.sleep(delay)
            delay = min(delay * 2, 0.05)

    async def payload(self, digest: bytes) -> PayloadRow | None:
        self._require_open()
        memory = self._memory
        known = memory.row(digest)
        if known is not None:
            return known
        ahead = memory.ahead_of(digest)
        if ahead:  # a loop over iter_responses: this payload and the next ones, one query
            rows = await self._fetch("read payloads ahead", PREFETCH_SQL, (ahead,))
            data = memory.keep(rows, digest, ahead)
            if data is not None:  # stored bytes, unverified: the reader hashes them
                return PayloadRow(digest, len(data), "inline", data)
        assert self._reader is not None
        found = await self._reader.payload(digest)
        if found is None:
            return None
        _, size, tier, data = found
        return PayloadRow(digest, size, tier, None if data is None else bytes(data))

    async def discard_payload(self, digest: bytes) -> None:
        self._memory.forget()

        async def run(conn: Connection) -> None:
            async with conn.transaction():
                await conn.execute("DELETE FROM payloads WHERE sha256 = $1", digest)
                await conn.execute(
                    "INSERT INTO bad_payloads (checksum) VALUES ($1) ON CONFLICT DO NOTHING",
                    digest.hex(),
                )

        await self._run("discard a corrupt payload", run, write=True)
        self._bad.add(digest.hex())

    async def present_payloads(
        self, digests: Iterable[bytes], *, tier: Tier | None = None
    ) -> set[bytes]:
        wanted = list(digests)
        if not wanted:
            self._require_open()
            return set()
        return await self._run(
            "read payload rows", lambda conn: _queries.present(conn, wanted, tier=tier)
        )

    # -- consumers and jobs ---------------------------------------------------------------------

    async def read_checkpoint(self, name: str) -> str | None:
        return await self._run(
            "read a checkpoint", lambda conn: _coordination.read_checkpoint(conn, name)
        )

    async def write_checkpoint(self, name: str, cursor: str) -> None:
        now = self.clock.now()
        await self._run(
            "write a checkpoint",
            lambda conn: _coordination.write_checkpoint(conn, name, cursor, now),
            write=True,
        )

    async def record_validation(self, outcome: ValidationOutcome) -> None:
        now = self.clock.now()
        await self._run(
            "record a validation outcome",
            lambda conn: _validations.save(conn, outcome, now),
            write=True,
        )

    async def validations(self, response_id: str) -> list[ValidationOutcome]:
        return await self._run(
            "read validation outcomes", lambda conn: _validations.for_response(conn, response_id)
        )

    async def validation_totals(self) -> list[ValidationTotals]:
        return await self._run("add up validation outcomes", _validations.totals)

    async def acquire_lease(
        self, name: str, holder: str, ttl: float, *, replacing: str | None = None
    ) -> Lease:
        return await self._run(
            f"acquire the lease {name!r}",
            lambda conn: _coordination.acquire_lease(conn, name, holder, ttl, replacing),
            write=True,
        )

    async def abandon_sessions(self, host: str, alive: Callable[[int], bool]) -> int:
        return await self._run(
            "mark abandoned sessions",
            lambda conn: _coordination.abandon_sessions(conn, host, alive),
            write=True,
        )

    async def renew_lease(self, lease: Lease, ttl: float) -> Lease:
        return await self._run(
            f"renew the lease {lease.name!r}",
            lambda conn: _coordination.renew_lease(conn, lease, ttl),
            write=True,
        )

    async def release_lease(self, lease: Lease) -> None:
        await self._run(
            f"release the lease {lease.name!r}",
            lambda conn: _coordination.release_lease(conn, lease),
            write=True,
        )

    # -- inspection and maintenance -------------------------------------------------------------

    async def resolve_session(self, text: str) -> str:
        return await self._run("find the session", lambda c: _queries.resolve_session(c, text))

    async def resolve_response(self, text: str) -> str:
        return await self._run("find the response", lambda c: _queries.resolve_response(c, text))

    async def iter_rows(
        self,
        table: Table,
        *,
        session_id: str | None = None,
        ids: Iterable[str] | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        if table not in COLUMNS:
            raise ValueError(f"unknown table {table!r}; one of: {', '.join(COLUMNS)}")
        if ids is not None:
            # Rows for more than one page of ids still come in recording order: find the order
            # of all of them first (as many keys as ids given), then read a page at a time.
            wanted = sorted(set(ids))
            ordered = await self._run(
                f"read {table}",
                lambda conn: _queries.keys_of(conn, table, wanted, session_id=session_id),
            )
            for i in range(0, len(ordered), 500):
                page = ordered[i : i + 500]
                for row in await self._run(
                    f"read {table}",
                    lambda conn, p=page: _queries.rows_by_ids(conn, table, p),  # type: ignore[misc]
                ):
                    yield row
            return
        last: tuple[int, ...] = (0,) * len(_queries.ORDER[table])
        while True:
            last, rows = await self._run(
                f"read {table}",
                lambda conn, after=last: _queries.rows_page(  # type: ignore[misc]
                    conn, table, after, limit=500, session_id=session_id
                ),
            )
            for row in rows:
                yield row
            if len(rows) < 500:
                break

    async def count_rows(self, table: Table | Literal["payloads"]) -> int:
        if table not in (*COLUMNS, "payloads"):
            raise ValueError(f"unknown table {table!r}")
        found = await self._run(
            f"count {table}", lambda conn: conn.fetchval(f"SELECT count(*) FROM {table}")
        )
        return int(found)

    async def iter_payload_rows(self, *, page_size: int = 256) -> AsyncIterator[PayloadRow]:
        last = b""
        while True:
            page = await self._run(
                "read payload rows",
                lambda conn, after=last: _queries.payload_page(conn, after, page_size),  # type: ignore[misc]
            )
            for row in page:
                yield row
            if len(page) < page_size:
                return
            last = page[-1].digest

    async def iter_dangling_references(self) -> AsyncIterator[DanglingReference]:
        tables: tuple[Table, ...] = ("responses", "requests")
        for table in tables:
            last: tuple[int, ...] = (0,) * len(_queries.ORDER[table])
            while True:
                last, seen, found = await self._run(
                    f"check {table}",
                    lambda conn, t=table, after=last: _queries.dangling_page(  # type: ignore[misc]
                        conn, t, after, 500
                    ),
                )
                for ref in found:
                    yield ref
                if seen < 500:
                    break

    async def unreferenced_payloads(self) -> list[PayloadRow]:
        return await self._run("find unreferenced payloads", _queries.unreferenced)

    async def delete_payloads(self, digests: Sequence[bytes]) -> list[bytes]:
        doomed = list(digests)
        self._require_open()
        self._memory.forget()
        return await self._run(
            "delete payload rows",
            lambda conn: _queries.delete_unreferenced(conn, doomed),
            write=True,
            retry=False,
        )

    async def prune(
        self,
        *,
        cutoff: datetime,
        source: str | None = None,
        bucket: str | None = None,
        dry_run: bool = False,
    ) -> PruneCounts:
        return await self._run(
            "prune the store",
            lambda conn: _queries.prune(conn, cutoff, source, bucket, dry_run),
            write=True,
            retry=dry_run,
        )

    async def stats(self) -> MetadataStats:
        sources, tiers, size = await self._run(
            "count the store", lambda conn: _queries.source_counts(conn, self.schema)
        )
        return MetadataStats(sources, tiers, size)

    async def import_rows(
        self, payloads: Iterable[PayloadRow], rows: Mapping[Table, Iterable[dict[str, Any]]]
    ) -> dict[str, int]:
        now = self.clock.now()

        async def read_chunk(source: Any) -> list[Any]:
            try:
                return await anyio.to_thread.run_sync(_queries.chunks, source)
            except Exception as exc:  # reading a bundle failed: its own error, not the server's
                raise _SourceError(exc) from exc

        try:
            return await self._run(
                "import rows",
                lambda conn: _queries.import_rows(conn, payloads, rows, now, read_chunk),
                write=True,
                retry=False,
            )
        except _SourceError as exc:
            raise exc.error from None
