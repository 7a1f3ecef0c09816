"""``Store``: the facade over one metadata backend and one payload backend.

``Store("./data")`` is SQLite (``<root>/dataio.sqlite``) with payload files under
``<root>/payloads/``; a ``postgresql://`` store or ``s3://`` payloads pick those backends (the
choice is ``_backends.py``'s), and ``metadata=`` / ``payloads=`` take any implementation of the
protocols in ``_protocols.py``. The facade owns the rule that splits payloads between the two
(``inline_threshold``), verified reads, leases (``_lease.py``: acquire, heartbeat, take over a
dead holder's) and the maintenance walks, which it runs against the protocols.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

import anyio
import anyio.abc

from mxm_dataio_async._clock import SYSTEM_CLOCK, Clock
from mxm_dataio_async._durations import Duration
from mxm_dataio_async._exceptions import (
    IntegrityError,
    StoreClosedError,
    StoreError,
    UsageError,
)
from mxm_dataio_async._lifecycle import State
from mxm_dataio_async._models import Body, Response, ResponseStatus, Session
from mxm_dataio_async._registry import SourceEntry
from mxm_dataio_async._store import _bundle, _cleanup, _copy, _lease, _stats, _verify
from mxm_dataio_async._store._backends import AbsentPayloads, metadata_for, payloads_for
from mxm_dataio_async._store._local import LocalPayloads, pid_alive, verify_bytes
from mxm_dataio_async._store._protocols import (
    Lease,
    MetadataStore,
    PayloadStore,
    StagedPayload,
    Table,
)
from mxm_dataio_async._store._sqlite import DB_NAME, SqliteMetadata
from mxm_dataio_async._store._validation import ValidationOutcome, ValidationTotals
from mxm_dataio_async._store._work import WorkQueue

__all__ = ["DEFAULT_INLINE_THRESHOLD", "HASH_ON_LOOP_MAX", "Store"]

#: In-memory payloads above this many bytes are hashed (and copied, if not ``bytes``) in a worker
#: thread: sha256 takes ~0.5 ms a MiB here, which on the event loop stalls every other fetch.
HASH_ON_LOOP_MAX: Final = 1024 * 1024

#: Payloads up to this many bytes are stored inline in the metadata store by default.
DEFAULT_INLINE_THRESHOLD: Final = 64 * 1024


class Store:
    """An append-only record of sessions, requests, responses and their exact payload bytes.

    ```python
    async with Store("./data") as store:
        async for resp in store.iter_responses(source="example"):
            body = await store.read(resp)
    ```

    ``Store("./data")`` keeps metadata in ``./data/dataio.sqlite`` and payloads in files under it;
    ``Store("postgresql://user@host:5432/db", payloads="s3://bucket/prefix")`` keeps them in
    PostgreSQL and S3 (the ``postgres`` and ``s3`` extras; ``payloads=`` may be a folder too).
    ``metadata=`` and ``payloads=`` also take any implementation of the protocols.
    ``inline_threshold``: payloads up to this many bytes live in the metadata store (atomic with
    their rows); larger ones go to the payload store.
    ``read_only=True`` opens an existing store for inspection and refuses writes;
    ``create=False`` opens only an existing one. ``clock`` times leases and ``fetched_at``.

    ``stand_in`` (settable; ``None`` by default) is called with each source a session on this
    store resolves from its registry (a ``SourceEntry``: adapter, gate, retry policy) and returns
    the one the session uses instead: how a store that replays recordings answers in place of
    the upstream (the pytest plugin's ``dataio_store``), without touching the registry.
    """

    stand_in: Callable[[SourceEntry], SourceEntry] | None = None

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        metadata: MetadataStore | None = None,
        payloads: str | os.PathLike[str] | PayloadStore | None = None,
        inline_threshold: int = DEFAULT_INLINE_THRESHOLD,
        busy_timeout: float = 10.0,
        create: bool = True,
        read_only: bool = False,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        if isinstance(inline_threshold, bool) or not isinstance(inline_threshold, int):
            raise TypeError("inline_threshold must be an int (bytes)")
        if inline_threshold < 0:
            raise ValueError("inline_threshold must be >= 0 bytes")
        if not busy_timeout >= 0:
            raise ValueError("busy_timeout must be >= 0 seconds")
        if (root is None) == (metadata is None):
            raise TypeError(
                "pass a store (a folder, or a postgresql:// URL) or metadata= (a MetadataStore)"
            )
        create = create and not read_only
        self.clock = clock
        self.inline_threshold = inline_threshold
        self.read_only = read_only
        if metadata is None:
            assert root is not None
            metadata, folder = metadata_for(
                root, busy_timeout=busy_timeout, create=create, read_only=read_only, clock=clock
            )
        else:
            folder = getattr(metadata, "root", None)
        if payloads is None:
            if folder is None and read_only:
                payloads = AbsentPayloads(metadata.location)  # rows only: payloads= to read bytes
            elif folder is None:
                raise TypeError(
                    f"say where payloads above the inline threshold go for {metadata.location}: "
                    "payloads='s3://bucket/prefix' or a folder"
                )
            else:
                payloads = LocalPayloads(folder, create=create)
        elif isinstance(payloads, str | os.PathLike):
            payloads = payloads_for(payloads, create=create)
        self.root: Path | None = Path(folder) if folder is not None else None
        """The store's folder (the embedded backend); None for a store kept in a server."""
        self.location: str = metadata.location
        """Where the metadata lives: a path, or a URL without its password."""
        self.metadata: MetadataStore = metadata
        self.payloads: PayloadStore = payloads
        self._create = create
        self._state = State.UNOPENED
        self._stack: AsyncExitStack | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self.temp_files_removed = 0

    @property
    def db_path(self) -> Path:
        """The SQLite database file (the embedded backend)."""
        if self.root is None:
            raise AttributeError(f"the store at {self.location} has no SQLite database file")
        return self.root / DB_NAME

    @property
    def state(self) -> State:
        return self._state

    @property
    def is_open(self) -> bool:
        return self._state is State.OPEN

    def __repr__(self) -> str:
        return (
            f"<Store metadata={self.location!r} payloads={self.payloads.location!r} "
            f"state={self._state}>"
        )

    # -- lifecycle ------------------------------------------------------------------------------

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
        """Open the store (creating it unless ``create=False``). A closed store is not reopened.

        If any part fails to open, the parts already open are closed again.
        """
        if self._state is State.OPEN:
            return
        if self._state is State.CLOSED:
            raise StoreClosedError("this Store was closed; create a new Store to reopen the root")
        self._state = State.CLOSED  # until fully open: a failed open leaves a closed store
        stack = AsyncExitStack()
        try:
            if self._create and isinstance(self.metadata, SqliteMetadata):
                self._make_root()
            self.temp_files_removed = await self.payloads.open()
            stack.push_async_callback(self.payloads.aclose)
            await self.metadata.open()
            # Not wrapped in a shielded scope: the backend exits task groups it entered in open(),
            # which must be the innermost scopes then (anyio's rule); its own waits are shielded.
            stack.push_async_callback(self.metadata.aclose)
            if not self.read_only:  # sessions of runs killed on this host: say so
                await self.metadata.abandon_sessions(socket.gethostname(), pid_alive)
            # Background work of the store's own (lease heartbeats): entered here, exited by
            # aclose(), in the same task (anyio's rule).
            self._tg = await stack.enter_async_context(anyio.create_task_group())
        except BaseException:
            with anyio.CancelScope(shield=True):
                await stack.aclose()
            raise
        self._stack = stack
        self._state = State.OPEN

    def _make_root(self) -> None:
        assert self.root is not None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"cannot create store root {self.root}: {exc.strerror or exc}"
            ) from exc
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StoreError(f"store root {self.root} is not writable")

    async def aclose(self) -> None:
        """Commit what is queued, then close. Safe to call twice."""
        if self._state is not State.OPEN:
            self._state = State.CLOSED
            return
        self._state = State.CLOSED
        stack, self._stack = self._stack, None
        self._tg = None
        if stack is not None:
            await stack.aclose()

    def _require_open(self) -> None:
        if self._state is not State.OPEN:
            raise StoreClosedError(
                f"the store at {self.location} {self._state.describe()}; "
                "use `async with Store(...)`"
            )

    # -- staging (the pipeline's write path; the recorder commits the rows) ---------------------

    async def stage(self, data: Body) -> StagedPayload:
        """Hash a payload; above ``inline_threshold`` make it durable in the payload store.

        Its row is written when the recorder records the response that names it. A stream is
        buffered only up to the threshold, then handed on chunk by chunk.
        """
        self._require_open()
        if isinstance(data, bytes | bytearray | memoryview):
            if len(data) <= HASH_ON_LOOP_MAX:
                raw = bytes(data)
                digest = hashlib.sha256(raw).digest()
            else:  # ~0.5 ms a MiB: in a worker thread (hashlib lets go of the GIL), not the loop
                raw, digest = await anyio.to_thread.run_sync(_copied_and_hashed, data)
            if len(raw) <= self.inline_threshold:
                return StagedPayload(digest, len(raw), "inline", raw)
            await self.payloads.put(digest, raw)
            return StagedPayload(digest, len(raw), "file", None)
        return await self._stage_stream(data)

    async def _stage_stream(self, chunks: AsyncIterable[bytes]) -> StagedPayload:
        source = chunks.__aiter__()
        buffered: list[bytes] = []
        size = 0
        try:
            async for chunk in source:
                if not chunk:
                    continue
                buffered.append(bytes(chunk))
                size += len(chunk)
                if size > self.inline_threshold:
                    digest, size = await self.payloads.put_stream(_prefixed(buffered, source))
                    return StagedPayload(digest, size, "file", None)
            data = b"".join(buffered)
            return StagedPayload(hashlib.sha256(data).digest(), size, "inline", data)
        finally:
            aclose = getattr(source, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()

    # -- reading --------------------------------------------------------------------------------

    async def latest_response(
        self, request_hash: str, *, statuses: Iterable[ResponseStatus] = (ResponseStatus.OK,)
    ) -> Response | None:
        """The newest response with one of ``statuses`` for a request hash (the cache lookup)."""
        self._require_open()
        return await self.metadata.latest_response(request_hash, statuses=tuple(statuses))

    async def get_response(self, response_id: str) -> Response | None:
        self._require_open()
        return await self.metadata.get_response(response_id)

    async def get_session(self, session_id: str) -> Session | None:
        self._require_open()
        found = await self.metadata.get_session(session_id)
        return None if found is None else _lease.seen(found)

    async def list_sessions(
        self, *, source: str | None = None, limit: int | None = None
    ) -> list[Session]:
        """Sessions, newest first."""
        self._require_open()
        return [
            _lease.seen(s) for s in await self.metadata.list_sessions(source=source, limit=limit)
        ]

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
        """Responses in the order they were committed, filtered; fetched page by page.

        ``since`` is inclusive and ``until`` exclusive (timezone-aware datetimes). ``after`` is a
        cursor (a response id, e.g. from ``read_checkpoint``): only responses committed after it.
        A consumer that processes each response and then ``write_checkpoint(name, resp.id)``
        sees every response exactly once across restarts::

            async for resp in store.iter_responses(after=await store.read_checkpoint("etl")):
                process(await store.read(resp))
                await store.write_checkpoint("etl", resp.id)
        """
        self._require_open()
        wanted = None
        if status is not None:
            try:
                wanted = ResponseStatus(status)
            except ValueError:
                allowed = ", ".join(s.value for s in ResponseStatus)
                raise ValueError(f"unknown status {status!r}; use one of: {allowed}") from None
        for name, moment in (("since", since), ("until", until)):
            if moment is not None and moment.tzinfo is None:
                raise ValueError(f"{name} must be timezone-aware (e.g. datetime.now(UTC))")
        if page_size < 1:
            raise ValueError("page_size must be >= 1")
        async for response in self.metadata.iter_responses(
            source=source,
            kind=kind,
            session_id=session_id,
            status=wanted,
            since=since,
            until=until,
            after=after,
            page_size=page_size,
        ):
            yield response

    async def read(self, response: Response | str) -> bytes:
        """The exact payload bytes of a response (or a checksum), verified against the sha256.

        Bytes that fail verification (or are gone) are discarded: ``IntegrityError`` says so,
        ``verify()`` reports the responses that named them, and a ``fetch()`` in default mode
        fetches them again instead of serving the stored response.
        """
        digest, size, inline = await self._locate(response)
        if inline is not None:
            return inline
        try:
            return await self.payloads.get(digest, size)
        except IntegrityError as exc:
            raise await self._discarded(digest, exc) from None

    async def iter_payload(
        self, response: Response | str, *, chunk_size: int = 256 * 1024
    ) -> AsyncIterator[bytes]:
        """Stream a payload in chunks (large payloads never load whole); ``IntegrityError`` at
        the end at the latest if the bytes do not verify (and they are discarded, as in
        :meth:`read`)."""
        digest, size, inline = await self._locate(response)
        if inline is not None:
            for i in range(0, len(inline), chunk_size):
                yield inline[i : i + chunk_size]
            return
        try:
            async for chunk in self.payloads.iter(digest, size, chunk_size):
                yield chunk
        except IntegrityError as exc:
            raise await self._discarded(digest, exc) from None

    async def _locate(self, response: Response | str) -> tuple[bytes, int, bytes | None]:
        """``(digest, size, bytes)`` of a payload: the bytes (verified) if inline, else None."""
        digest = _digest(response)
        self._require_open()
        row = await self.metadata.payload(digest)
        if row is None:
            raise await self._discarded(
                digest, IntegrityError(f"payload {digest.hex()} is not in the store")
            )
        if row.tier != "inline":
            return digest, row.size, None
        data = row.data if row.data is not None else b""
        if not row.verified:
            try:
                verify_bytes(data, digest, row.size, where=f"inline in {self.metadata.location}")
            except IntegrityError as exc:
                raise await self._discarded(digest, exc) from None
        return digest, row.size, data

    async def _discarded(self, digest: bytes, error: IntegrityError) -> IntegrityError:
        """Forget bytes that failed verification (a writable store), and say so."""
        if self.read_only:
            return error
        with anyio.CancelScope(shield=True):
            await self.metadata.discard_payload(digest)
            await self.payloads.delete(digest)
        return IntegrityError(
            f"{error}; the bad copy was discarded: fetch() in default mode fetches it again, "
            "and verify() lists the responses that named it"
        )

    async def export_payload(self, response: Response | str, path: str | os.PathLike[str]) -> Path:
        """Write a payload's exact bytes to ``path`` as a plain file (verified while copying;
        the file appears only when complete and verified)."""
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
            with contextlib.suppress(OSError):
                temp.unlink()
        return out

    # -- inspection -----------------------------------------------------------------------------

    async def resolve_session(self, text: str) -> str:
        """A session id from itself or a unique prefix of 4+ characters (as git resolves
        commits); ``StoreError`` if unknown or ambiguous."""
        self._require_open()
        return await self.metadata.resolve_session(text)

    async def resolve_response(self, text: str) -> str:
        """A response id from itself, a unique prefix, or a unique tail of 8+ characters."""
        self._require_open()
        return await self.metadata.resolve_response(text)

    async def iter_rows(
        self, table: Table, *, session_id: str | None = None, ids: Iterable[str] | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """Raw rows of ``sessions``, ``requests`` or ``responses`` as ``{column: value}`` (hashes
        as hex, JSON columns as text), in recording order: what ``mxm-dataio meta`` prints."""
        self._require_open()
        async for row in self.metadata.iter_rows(table, session_id=session_id, ids=ids):
            yield row

    # -- checkpoints and leases -----------------------------------------------------------------

    async def read_checkpoint(self, name: str) -> str | None:
        """The cursor last written under ``name`` (a response id), or None."""
        self._require_open()
        return await self.metadata.read_checkpoint(name)

    async def write_checkpoint(self, name: str, cursor: str) -> None:
        """Remember ``cursor`` (a response id) as consumer ``name``'s position."""
        if not isinstance(name, str) or not name:
            raise ValueError("a checkpoint needs a non-empty name")
        self._require_open()
        await self.metadata.write_checkpoint(name, cursor)

    # -- validation outcomes (datasets) ---------------------------------------------------------

    async def record_validation(self, outcome: ValidationOutcome) -> None:
        """Keep how ``outcome.response_id``'s records validated against ``outcome.model``."""
        self._require_open()
        await self.metadata.record_validation(outcome)

    async def validations(self, response_id: str) -> list[ValidationOutcome]:
        """The validation outcomes recorded for a response (one per model)."""
        self._require_open()
        return await self.metadata.validations(response_id)

    async def validation_totals(self) -> list[ValidationTotals]:
        """Records ok and failed, per model, over every validated response."""
        self._require_open()
        return await self.metadata.validation_totals()

    @asynccontextmanager
    async def lease(
        self,
        name: str,
        *,
        ttl: float = 30.0,
        wait: bool = False,
        poll: float = 1.0,
        holder: str | None = None,
    ) -> AsyncIterator[Lease]:
        """Hold the lease ``name`` while the block runs (one run of a job at a time).

        Raises ``LeaseHeld`` if another live run holds it (or, with ``wait=True``, waits for it,
        checking every ``poll`` seconds). The lease is renewed every ``ttl / 3`` seconds; a run
        that dies stops renewing, so its lease expires after ``ttl`` and the next run takes over.
        If the lease is lost anyway (renewals failing for longer than ``ttl``), the block is
        cancelled and ``LeaseHeld`` raised. A lease whose holder ran on this host in a process
        that is gone (killed) is taken over at once. Waits use the store's clock.
        """
        if not isinstance(name, str) or not name:
            raise ValueError("a lease needs a non-empty name")
        if not ttl > 0:
            raise ValueError(f"lease ttl must be > 0 seconds, got {ttl!r}")
        self._require_open()
        assert self._tg is not None
        async with _lease.hold(
            self.metadata, self._tg, self.clock, name, holder, ttl=ttl, wait=wait, poll=poll
        ) as held:
            yield held

    @property
    def work(self) -> WorkQueue:
        """The work queue of runs shared by many workers (``mxm-dataio worker``): the metadata
        store's, which only PostgreSQL has (``UsageError`` otherwise)."""
        self._require_open()
        work = getattr(self.metadata, "work", None)
        if not isinstance(work, WorkQueue):
            raise UsageError(
                f"a run shared by many workers needs a PostgreSQL store (postgresql://...); "
                f"the store at {self.location} has no work queue"
            )
        return work

    # -- maintenance ----------------------------------------------------------------------------

    async def verify(
        self, *, grace: Duration = 0.0, on_progress: _verify.ProgressCallback | None = None
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
        return await _verify.verify(
            self.metadata,
            self.payloads,
            root=self._where,
            grace=grace,
            on_progress=on_progress,
        )

    async def gc(
        self, *, dry_run: bool = False, grace: Duration = _cleanup.DEFAULT_GC_GRACE
    ) -> _cleanup.GcReport:
        """Remove payloads no row names, orphan files and temp leftovers older than ``grace``."""
        self._writable("gc")
        return await _cleanup.gc(self.metadata, self.payloads, dry_run=dry_run, grace=grace)

    async def prune(
        self,
        *,
        older_than: Duration,
        source: str | None = None,
        bucket: str | None = None,
        dry_run: bool = False,
    ) -> _cleanup.PruneReport:
        """Delete old responses (and requests left without one) in one transaction; ``gc`` then
        frees their payloads. ``older_than``: a timedelta, seconds, or e.g. ``"30d"``."""
        self._writable("prune")
        return await _cleanup.prune(
            self.metadata,
            older_than=older_than,
            source=source,
            bucket=bucket,
            dry_run=dry_run,
            now=self.clock.now(),
        )

    async def stats(self) -> _stats.StoreStats:
        """Counts and bytes per source, cache hit and error rates, payload tiers, database size."""
        self._require_open()
        return await _stats.stats(self.metadata, root=self._where)

    async def export_session(
        self, session_id: str, path: str | os.PathLike[str]
    ) -> _bundle.ExportReport:
        """Write a session as a self-contained bundle (tar) that another store can import."""
        self._require_open()
        return await _bundle.export_session(self.metadata, self.payloads, session_id, path)

    async def import_bundle(self, path: str | os.PathLike[str]) -> _bundle.ImportReport:
        """Import a bundle (idempotent; every payload verified before any row is written)."""
        self._writable("import")
        return await _bundle.import_bundle(
            self.metadata, self.payloads, path, inline_threshold=self.inline_threshold
        )

    async def copy_to(
        self, target: Store, *, on_progress: _copy.CopyProgress | None = None
    ) -> _copy.CopyReport:
        """Copy every session, request, response and payload into ``target``, which may be
        another backend (a SQLite store into PostgreSQL + S3). Every payload is verified on the
        way; running it again adds only what is missing.

        ```python
        async with Store("./data") as src, Store("postgresql://...", payloads="s3://b/p") as dst:
            report = await src.copy_to(dst)
        ```
        """
        self._require_open()
        target._writable("copy into")
        return await _copy.copy_store(self, target, on_progress=on_progress)

    @property
    def _where(self) -> Path | str:
        """What reports name: the folder, else the metadata's location."""
        return self.root if self.root is not None else self.location

    def _writable(self, action: str) -> None:
        self._require_open()
        if self.read_only:
            raise UsageError(f"cannot {action}: the store at {self.location} was opened read-only")


def _digest(response: Response | str) -> bytes:
    checksum = response if isinstance(response, str) else response.checksum
    if checksum is None:
        raise IntegrityError("this response has no payload (it recorded an error without one)")
    try:
        digest = bytes.fromhex(checksum)
    except ValueError:
        digest = b""
    if len(digest) != 32:
        raise ValueError(f"not a sha256 checksum: {checksum!r}")
    return digest


async def _prefixed(head: list[bytes], rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    for chunk in head:
        yield chunk
    head.clear()
    async for chunk in rest:
        if chunk:
            yield bytes(chunk)


def _copied_and_hashed(data: bytes | bytearray | memoryview) -> tuple[bytes, bytes]:
    raw = bytes(data)
    return raw, hashlib.sha256(raw).digest()
