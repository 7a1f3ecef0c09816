"""Store: ``<root>/dataio.sqlite`` (metadata + inline payloads) and ``<root>/payloads/`` (large)."""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

import aiosqlite
import anyio
import anyio.abc
import anyio.to_thread

from mxm_dataio_async._exceptions import IntegrityError, LeaseHeld, StoreClosedError, StoreError
from mxm_dataio_async._identity import canonical_json
from mxm_dataio_async._models import (
    Body,
    CacheMode,
    Request,
    Response,
    ResponseStatus,
    Session,
    SessionStatus,
    utcnow,
)
from mxm_dataio_async._store import _coordination
from mxm_dataio_async._store._payloads import PayloadFiles, StagedPayload, verify
from mxm_dataio_async._store._reader import BatchReader
from mxm_dataio_async._store._schema import (
    DB_NAME,
    DEFAULT_INLINE_THRESHOLD,
    MIGRATIONS,
    SCHEMA_VERSION,
)
from mxm_dataio_async._store._writer import (
    RESPONSE_COLUMNS,
    SESSION_COLUMNS,
    Row,
    Writer,
    sqlite_error,
)

__all__ = ["DB_NAME", "Store"]


_UNOPENED, _OPEN, _CLOSED = "unopened", "open", "closed"


def _ts(dt: datetime) -> str:
    # Fixed width (microseconds always present) so text order is time order in SQL.
    return dt.isoformat(timespec="microseconds")


def _dt(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


def _json(value: Any) -> str | None:
    # ASCII JSON: any str, lone surrogates included (aiohttp decodes undecodable header bytes to
    # them), is representable; the escapes load back to the same str.
    return None if value is None else json.dumps(value, separators=(",", ":"), ensure_ascii=True)


def _text(value: str | None) -> str | None:
    """Text SQLite can store: a str with lone surrogates cannot be encoded as UTF-8, so those
    characters are written as backslash escapes instead of failing the whole batch."""
    if value is None or value.isascii():
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


def _configure(conn: sqlite3.Connection, busy_timeout_ms: int) -> None:
    # WAL: readers never block the writer and vice versa; the setting persists in the file.
    conn.execute("PRAGMA journal_mode=WAL")
    # Wait (inside SQLite) for another process's write lock instead of failing at once.
    conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
    # NORMAL in WAL mode: a commit survives a process crash; only an OS crash may lose the last few.
    conn.execute("PRAGMA synchronous=NORMAL")


def _prepare_db(db_path: Path, busy_timeout_ms: int) -> None:
    """Open once synchronously: set WAL, migrate the schema. Runs in a worker thread."""
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        _configure(conn, busy_timeout_ms)
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{db_path} has schema version {version}, newer than this release supports "
                f"({SCHEMA_VERSION}); upgrade mxm-dataio-async"
            )
        if version < SCHEMA_VERSION:
            conn.execute("BEGIN IMMEDIATE")
            try:
                # Re-read under the write lock: another process may have migrated meanwhile.
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                while version < SCHEMA_VERSION:
                    MIGRATIONS[version](conn)
                    version += 1
                conn.execute(f"PRAGMA user_version={version}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
    finally:
        conn.close()


class Store:
    """An append-only record of sessions, requests, responses and their exact payload bytes.

    ```python
    async with Store("./data") as store:
        async for resp in store.iter_responses(source="example"):
            body = await store.read(resp)
    ```

    ``inline_threshold``: payloads up to this many bytes live inside SQLite (atomic with their
    rows); larger ones are content-addressed files under ``<root>/payloads/``.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        inline_threshold: int = DEFAULT_INLINE_THRESHOLD,
        busy_timeout: float = 10.0,
    ) -> None:
        if isinstance(inline_threshold, bool) or not isinstance(inline_threshold, int):
            raise TypeError("inline_threshold must be an int (bytes)")
        if inline_threshold < 0:
            raise ValueError("inline_threshold must be >= 0 bytes")
        if not busy_timeout >= 0:
            raise ValueError("busy_timeout must be >= 0 seconds")
        self.root = Path(root)
        self.db_path = self.root / DB_NAME
        self.inline_threshold = inline_threshold
        self._busy_timeout_ms = int(busy_timeout * 1000)
        self._files = PayloadFiles(self.root, inline_threshold)
        self._state = _UNOPENED
        self._stack: AsyncExitStack | None = None
        self._writer: Writer | None = None
        self._reader: aiosqlite.Connection | None = None
        self._batch_reader: BatchReader | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._users = 0
        self.temp_files_removed = 0

    def __repr__(self) -> str:
        return f"<Store root={str(self.root)!r} state={self._state}>"

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._state == _OPEN

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def open(self) -> None:
        """Open the store (create it if needed). A closed store cannot be reopened."""
        if self._state == _OPEN:
            return
        if self._state == _CLOSED:
            raise StoreClosedError("this Store was closed; create a new Store to reopen the root")
        stack = AsyncExitStack()
        try:
            await self._open(stack)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await stack.aclose()
            raise
        self._stack = stack
        self._state = _OPEN

    async def _open(self, stack: AsyncExitStack) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"cannot create store root {self.root}: {exc.strerror or exc}"
            ) from exc
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StoreError(f"store root {self.root} is not writable")
        self.temp_files_removed = await anyio.to_thread.run_sync(self._files.prepare)
        try:
            await anyio.to_thread.run_sync(_prepare_db, self.db_path, self._busy_timeout_ms)
            wconn = await aiosqlite.connect(self.db_path, isolation_level=None)
            stack.push_async_callback(_shielded_close, wconn)
            rconn = await aiosqlite.connect(self.db_path, isolation_level=None)
            stack.push_async_callback(_shielded_close, rconn)
            for conn in (wconn, rconn):
                await conn.execute(f"PRAGMA busy_timeout={self._busy_timeout_ms}")
                await conn.execute("PRAGMA synchronous=NORMAL")
            # The reader never writes; query_only turns a bug into an error instead of a lock.
            await rconn.execute("PRAGMA query_only=1")
        except sqlite3.Error as exc:
            raise sqlite_error(f"open {self.db_path}", exc) from exc
        self._reader = rconn
        writer = Writer(wconn)
        batch_reader = BatchReader(rconn, RESPONSE_COLUMNS)
        # The writer task lives in a task group entered here and exited by aclose(): open and
        # close must happen in the same task, in LIFO order with other scopes (anyio's rule).
        tg = await stack.enter_async_context(anyio.create_task_group())
        tg.start_soon(_shielded, writer.run)
        tg.start_soon(_shielded, batch_reader.run)
        self._tg = tg
        self._writer = writer
        self._batch_reader = batch_reader

    async def aclose(self) -> None:
        """Commit what is queued, then close. Safe to call twice."""
        if self._state != _OPEN:
            self._state = _CLOSED
            return
        self._state = _CLOSED
        stack, self._stack = self._stack, None
        if self._writer is not None:
            self._writer.drain_and_stop()
        if self._batch_reader is not None:
            self._batch_reader.stop()
        if stack is not None:
            # Exiting the task group waits for the writer to commit what is queued.
            await stack.aclose()
        self._writer = None
        self._reader = None
        self._batch_reader = None

    def _require_open(self) -> tuple[Writer, aiosqlite.Connection]:
        if self._state != _OPEN or self._writer is None or self._reader is None:
            state = "was closed" if self._state == _CLOSED else "is not open yet"
            raise StoreClosedError(f"the store at {self.root} {state}; use `async with Store(...)`")
        return self._writer, self._reader

    # -- writing (used by AsyncSession) ---------------------------------------------------------

    async def stage(self, data: Body) -> StagedPayload:
        """Hash a payload and write it to the file tier if large (its row is written by record)."""
        self._require_open()
        return await self._files.stage(data)

    async def save_session(self, session: Session) -> None:
        writer, _ = self._require_open()
        await writer.write([("session", _session_row(session))])

    async def record(
        self,
        request: Request,
        responses: Sequence[Response],
        payloads: Sequence[StagedPayload] = (),
        *,
        served_from: str | None = None,
        sent: StagedPayload | None = None,
        wait: bool = True,
    ) -> None:
        """Persist a request row (once), its payloads and responses in one transaction.

        ``served_from`` names the stored response a cache hit returned; ``sent`` is the payload a
        ``send()`` uploaded (also one of ``payloads``). With ``wait=False`` the rows commit with
        the next batch without the caller waiting (audit rows whose loss on a crash is harmless).
        """
        writer, _ = self._require_open()
        now = _ts(utcnow())
        rows: list[Row] = [("payload", (p.digest, p.size, p.tier, p.data, now)) for p in payloads]
        rows.append(("request", _request_row(request, served_from, sent)))
        rows.extend(("response", _response_row(request, r)) for r in responses)
        fut = writer.submit(rows, wait=wait)
        if fut is not None:
            await fut

    # -- reading --------------------------------------------------------------------------------

    async def _fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        _, reader = self._require_open()
        try:
            return list(await reader.execute_fetchall(sql, params))
        except sqlite3.Error as exc:
            raise sqlite_error("read from the store", exc) from exc

    async def latest_response(
        self, request_hash: str, *, statuses: Sequence[ResponseStatus] = (ResponseStatus.OK,)
    ) -> Response | None:
        """The newest response with one of ``statuses`` for a request hash (the cache lookup)."""
        if tuple(statuses) == (ResponseStatus.OK,):
            self._require_open()
            assert self._batch_reader is not None
            row = await self._batch_reader.latest(bytes.fromhex(request_hash))
            return _response_from_row(row) if row is not None else None
        marks = ", ".join("?" for _ in statuses)
        sql = (
            f"SELECT {RESPONSE_COLUMNS} FROM responses WHERE request_hash = ? "
            f"AND status IN ({marks}) ORDER BY fetched_at DESC LIMIT 1"
        )
        params: list[Any] = [bytes.fromhex(request_hash), *(s.value for s in statuses)]
        rows = await self._fetchall(sql, params)
        return _response_from_row(rows[0]) if rows else None

    async def get_response(self, response_id: str) -> Response | None:
        rows = await self._fetchall(
            f"SELECT {RESPONSE_COLUMNS} FROM responses WHERE id = ?", (response_id,)
        )
        return _response_from_row(rows[0]) if rows else None

    async def get_session(self, session_id: str) -> Session | None:
        rows = await self._fetchall(
            f"SELECT {SESSION_COLUMNS} FROM sessions WHERE id = ?", (session_id,)
        )
        return _session_from_row(rows[0]) if rows else None

    async def list_sessions(
        self, *, source: str | None = None, limit: int | None = None
    ) -> list[Session]:
        """Sessions, newest first."""
        sql = f"SELECT {SESSION_COLUMNS} FROM sessions"
        params: list[Any] = []
        if source is not None:
            sql += " WHERE source = ?"
            params.append(source)
        sql += " ORDER BY started_at DESC"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        return [_session_from_row(r) for r in await self._fetchall(sql, params)]

    async def iter_responses(
        self,
        *,
        source: str | None = None,
        kind: str | None = None,
        session_id: str | None = None,
        status: ResponseStatus | str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        after: str | None = None,
        page_size: int = 500,
    ) -> AsyncIterator[Response]:
        """Responses in the order they were recorded, filtered; fetched page by page.

        ``since`` is inclusive and ``until`` exclusive (timezone-aware datetimes). ``after`` is a
        cursor (a response id, e.g. from ``read_checkpoint``): only responses recorded after it.
        A consumer that processes each response and then ``write_checkpoint(name, resp.id)``
        sees every response exactly once across restarts::

            async for resp in store.iter_responses(after=await store.read_checkpoint("etl")):
                process(await store.read(resp))
                await store.write_checkpoint("etl", resp.id)
        """
        clauses: list[str] = []
        params: list[Any] = []
        for column, value in (("source", source), ("kind", kind), ("session_id", session_id)):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        if status is not None:
            clauses.append("status = ?")
            params.append(ResponseStatus(status).value)
        bounds: tuple[tuple[str, datetime | None, str], ...] = (
            (">=", since, "since"),
            ("<", until, "until"),
        )
        for op, moment, name in bounds:
            if moment is not None:
                if moment.tzinfo is None:
                    raise ValueError(f"{name} must be timezone-aware (e.g. datetime.now(UTC))")
                clauses.append(f"fetched_at {op} ?")
                params.append(_ts(moment.astimezone(UTC)))
        where = " AND ".join(clauses) if clauses else "1"
        last = 0 if after is None else await self._position_of(after)
        while True:
            rows = await self._fetchall(
                f"SELECT rowid, {RESPONSE_COLUMNS} FROM responses WHERE rowid > ? AND {where} "
                "ORDER BY rowid LIMIT ?",
                [last, *params, page_size],
            )
            for row in rows:
                yield _response_from_row(row[1:])
            if len(rows) < page_size:
                return
            last = rows[-1][0]

    async def _position_of(self, cursor: str) -> int:
        rows = await self._fetchall("SELECT rowid FROM responses WHERE id = ?", (cursor,))
        if not rows:  # the response was pruned: its checkpoint still knows where it was
            rows = await self._fetchall(
                "SELECT max(position) FROM checkpoints WHERE response_id = ?", (cursor,)
            )
        if not rows or rows[0][0] is None:
            raise ValueError(f"unknown cursor {cursor!r}: no response with that id")
        return int(rows[0][0])

    # -- checkpoints and leases -----------------------------------------------------------------

    async def read_checkpoint(self, name: str) -> str | None:
        """The cursor last written under ``name`` (a response id), or None."""
        self._require_open()
        return await _coordination.read_checkpoint(self.root, name, self._busy_timeout_ms / 1000)

    async def write_checkpoint(self, name: str, cursor: str) -> None:
        """Remember ``cursor`` (a response id) as consumer ``name``'s position."""
        self._require_open()
        await _coordination.write_checkpoint(self.root, name, cursor, self._busy_timeout_ms / 1000)

    @asynccontextmanager
    async def lease(
        self,
        name: str,
        *,
        ttl: float = 30.0,
        wait: bool = False,
        poll: float = 1.0,
        holder: str | None = None,
    ) -> AsyncIterator[_coordination.Lease]:
        """Hold the lease ``name`` while the block runs (one run of a job at a time).

        Raises ``LeaseHeld`` if another live run holds it (or, with ``wait=True``, waits for it,
        checking every ``poll`` seconds). The lease is renewed every ``ttl / 3`` seconds; a run
        that dies stops renewing, so its lease expires after ``ttl`` and the next run takes over.
        If the lease is lost anyway (renewals failing for longer than ``ttl``), the block is
        cancelled and ``LeaseHeld`` raised.
        """
        self._require_open()
        who = holder or _coordination.default_holder()
        busy = self._busy_timeout_ms / 1000
        while True:
            try:
                held = await _coordination.acquire_lease(self.root, name, who, ttl, busy)
                break
            except LeaseHeld:
                if not wait:
                    raise
                await anyio.sleep(poll)
        lost: list[LeaseHeld] = []
        body_scope = anyio.CancelScope()
        beat_scope = anyio.CancelScope()

        async def heartbeat() -> None:
            nonlocal held
            with beat_scope:
                while True:
                    await anyio.sleep(ttl / 3)
                    try:
                        held = await _coordination.renew_lease(self.root, held, ttl, busy)
                    except LeaseHeld as exc:
                        lost.append(exc)
                        body_scope.cancel()
                        return
                    except StoreError:
                        continue  # a busy or briefly failing store: try again before expiry

        # The heartbeat runs in the store's task group, not around the block: an error in the
        # block then propagates as itself, not wrapped in an ExceptionGroup.
        assert self._tg is not None
        self._tg.start_soon(heartbeat)
        try:
            with body_scope:
                yield held
            if lost:
                raise lost[0]
        finally:
            beat_scope.cancel()
            if not lost:
                with anyio.CancelScope(shield=True):
                    await _coordination.release_lease(self.root, held, busy)

    async def read(self, response: Response | str) -> bytes:
        """The exact payload bytes of a response (or a checksum), verified against the sha256."""
        checksum = response if isinstance(response, str) else response.checksum
        if checksum is None:
            raise IntegrityError("this response has no payload (it recorded an error without one)")
        try:
            digest = bytes.fromhex(checksum)
        except ValueError:
            raise ValueError(f"not a sha256 checksum: {checksum!r}") from None
        self._require_open()
        assert self._batch_reader is not None
        found = await self._batch_reader.payload(digest)
        if found is None:
            raise IntegrityError(f"payload {checksum} is not in the store")
        size, tier, data = found
        if tier == "inline":
            verify(data if data is not None else b"", digest, size, where=str(self.db_path))
            return bytes(data) if data is not None else b""
        return await self._files.read(digest, size)

    async def iter_payload(
        self, response: Response | str, *, chunk_size: int = 256 * 1024
    ) -> AsyncIterator[bytes]:
        """Stream a payload in chunks (large file-tier payloads never load whole)."""
        checksum = response if isinstance(response, str) else response.checksum
        if checksum is None:
            raise IntegrityError("this response has no payload")
        digest = bytes.fromhex(checksum)
        rows = await self._fetchall(
            "SELECT size_bytes, tier FROM payloads WHERE sha256 = ?", (digest,)
        )
        if not rows:
            raise IntegrityError(f"payload {checksum} is not in the store")
        size, tier = rows[0]
        if tier == "inline":
            data = await self.read(checksum)
            for i in range(0, len(data), chunk_size):
                yield data[i : i + chunk_size]
            return
        async for chunk in self._files.iter_file(digest, size, chunk_size):
            yield chunk

    async def export_payload(self, response: Response | str, path: str | os.PathLike[str]) -> Path:
        """Write a payload's exact bytes to ``path`` as a plain file (verified while copying)."""
        out = Path(path)
        temp = out.with_name(out.name + ".part")
        try:
            async with await anyio.open_file(temp, "wb") as f:
                async for chunk in self.iter_payload(response):
                    await f.write(chunk)
            os.replace(temp, out)
        except OSError as exc:
            raise StoreError(f"cannot export payload to {out}: {exc.strerror or exc}") from exc
        finally:
            if temp.exists():
                temp.unlink()
        return out

    # -- maintenance (see _maintenance.py) --------------------------------------------------------
    # Thin delegations: the logic, and why it uses its own short-lived sqlite3 connection, live in
    # _maintenance.py, _verify.py, _cleanup.py, _stats.py and _bundle.py (imported here, not at the
    # top: they import this module).

    from mxm_dataio_async._store import _bundle, _cleanup, _maintenance, _stats, _verify

    async def verify(
        self,
        *,
        grace: _maintenance.Duration = 0.0,
        on_progress: _maintenance.ProgressCallback | None = None,
    ) -> _verify.VerifyReport:
        """Walk every row and payload: missing and corrupt payloads, rows naming absent
        payloads, orphan files and temp leftovers. ``report.ok`` / ``report.exit_code``.

        ```python
        report = await store.verify()
        for problem in report.problems:
            print(problem.kind, problem.detail)
        ```
        """
        self._require_open()
        return await self._verify.verify(
            self.root,
            grace=grace,
            busy_timeout=self._busy_timeout_ms / 1000,
            on_progress=on_progress,
        )

    async def gc(
        self, *, dry_run: bool = False, grace: _maintenance.Duration = _cleanup.DEFAULT_GC_GRACE
    ) -> _cleanup.GcReport:
        """Remove payloads no row names, orphan files and temp leftovers older than ``grace`` s."""
        self._require_open()
        return await self._cleanup.gc(
            self.root, dry_run=dry_run, grace=grace, busy_timeout=self._busy_timeout_ms / 1000
        )

    async def prune(
        self,
        *,
        older_than: _maintenance.Duration,
        source: str | None = None,
        bucket: str | None = None,
        dry_run: bool = False,
    ) -> _cleanup.PruneReport:
        """Delete old responses (and requests left without one) in one transaction; ``gc`` then
        frees their payloads. ``older_than``: a timedelta, seconds, or e.g. ``"30d"``."""
        self._require_open()
        return await self._cleanup.prune(
            self.root,
            older_than=older_than,
            source=source,
            bucket=bucket,
            dry_run=dry_run,
            busy_timeout=self._busy_timeout_ms / 1000,
        )

    async def stats(self) -> _stats.StoreStats:
        """Counts and bytes per source, cache hit and error rates, payload tiers, database size."""
        self._require_open()
        return await self._stats.stats(self.root, busy_timeout=self._busy_timeout_ms / 1000)

    async def export_session(
        self, session_id: str, path: str | os.PathLike[str]
    ) -> _bundle.ExportReport:
        """Write a session as a self-contained bundle (tar) that another store can import."""
        self._require_open()
        return await self._bundle.export_session(
            self.root, session_id, path, busy_timeout=self._busy_timeout_ms / 1000
        )

    async def import_bundle(self, path: str | os.PathLike[str]) -> _bundle.ImportReport:
        """Import a bundle (idempotent; every payload verified before any row is written)."""
        self._require_open()
        return await self._bundle.import_bundle(
            self.root,
            path,
            inline_threshold=self.inline_threshold,
            busy_timeout=self._busy_timeout_ms / 1000,
        )

    # -- end of maintenance -----------------------------------------------------------------------


async def _shielded(loop: Callable[[], Awaitable[None]]) -> None:
    # The writer and reader serve until aclose() stops them, not until the opener is cancelled:
    # code holding the store open under a cancelled scope still has its final writes (a
    # session's end row) to make on the way out.
    with anyio.CancelScope(shield=True):
        await loop()


async def _shielded_close(conn: aiosqlite.Connection) -> None:
    with anyio.CancelScope(shield=True):
        await conn.close()


# -- row mapping ---------------------------------------------------------------------------------


def _session_row(s: Session) -> tuple[Any, ...]:
    return (
        s.id,
        _text(s.source),
        _text(s.as_of),
        _ts(s.started_at),
        _ts(s.ended_at) if s.ended_at else None,
        s.status.value,
        s.cache_mode.value,
        s.requests,
        s.responses,
        s.cache_hits,
        s.errors,
        s.bytes_fetched,
        _text(s.error),
    )


def _session_from_row(r: Sequence[Any]) -> Session:
    started = _dt(r[3])
    assert started is not None
    return Session(
        id=r[0],
        source=r[1],
        as_of=r[2],
        started_at=started,
        ended_at=_dt(r[4]),
        status=SessionStatus(r[5]),
        cache_mode=CacheMode(r[6]),
        requests=r[7],
        responses=r[8],
        cache_hits=r[9],
        errors=r[10],
        bytes_fetched=r[11],
        error=r[12],
    )


def _request_row(
    q: Request, served_from: str | None, sent: StagedPayload | None
) -> tuple[Any, ...]:
    return (
        q.id,
        q.session_id,
        bytes.fromhex(q.hash),
        _text(q.source),
        _text(q.kind),
        q.method,
        _text(q.endpoint),
        canonical_json(q.params),
        None if q.body is None else canonical_json(q.body),
        _json(dict(q.headers)) if q.headers else None,
        _text(q.as_of_bucket),
        _text(q.cache_tag),
        q.cache_mode.value,
        q.ttl_seconds,
        _ts(q.created_at),
        served_from,
        sent.checksum if sent is not None else None,
    )


def _response_row(q: Request, r: Response) -> tuple[Any, ...]:
    return (
        r.id,
        r.request_id,
        bytes.fromhex(r.request_hash),
        r.session_id,
        _text(q.source),
        _text(q.kind),
        r.status.value,
        r.checksum,
        r.size_bytes,
        _ts(r.fetched_at),
        r.cache_mode.value,
        r.ttl_seconds,
        _text(r.as_of_bucket),
        _text(r.cache_tag),
        r.attempts,
        r.attempt,
        r.sequence,
        r.transport_status,
        _text(r.content_type),
        _text(r.encoding),
        _text(r.url),
        r.elapsed_ms,
        _json(dict(r.headers)) if r.headers is not None else None,
        _json(dict(r.adapter_meta)) if r.adapter_meta is not None else None,
        _text(r.error),
        r.revalidated_from,
    )


_STATUSES: Final = {s.value: s for s in ResponseStatus}
_CACHE_MODES: Final = {m.value: m for m in CacheMode}


def _response_from_row(r: Sequence[Any]) -> Response:
    # Positional, in Response's field order (the cache-hit path builds one per hit; keywords and
    # Enum(value) calls cost twice as much). tests/store/test_store.py round-trips every field.
    return Response(
        r[0],  # id
        r[1],  # request_id
        bytes(r[2]).hex(),  # request_hash
        r[3],  # session_id
        _STATUSES[r[6]],  # status
        r[7],  # checksum
        r[8],  # size_bytes
        datetime.fromisoformat(r[9]),  # fetched_at
        _CACHE_MODES[r[10]],  # cache_mode
        r[11],  # ttl_seconds
        r[12],  # as_of_bucket
        r[13],  # cache_tag
        False,  # from_cache
        r[14],  # attempts
        r[15],  # attempt
        r[16],  # sequence
        r[17],  # transport_status
        r[18],  # content_type
        r[19],  # encoding
        r[20],  # url
        r[21],  # elapsed_ms
        json.loads(r[22]) if r[22] is not None else None,  # headers
        json.loads(r[23]) if r[23] is not None else None,  # adapter_meta
        r[24],  # error
        r[25],  # revalidated_from
    )
