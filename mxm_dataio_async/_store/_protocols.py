"""The two storage seams: :class:`MetadataStore` (rows) and :class:`PayloadStore` (large bytes).

``Store`` is the facade users hold; behind it a metadata backend keeps sessions, requests,
responses, checkpoints, leases and the small (inline) payloads, and a payload backend keeps the
payloads above the inline threshold, content-addressed by sha256. SQLite + local files are the
first implementation of each (``Store("./data")``); any pair that passes the contract suite
(``tests/store/contract/``) can stand in for them.

Rules every implementation keeps:
- ``record()`` writes a request row (once per id), its responses and its inline payloads in one
  transaction: a reader sees all of them or none.
- A payload is in the payload store, complete and durable, before a row naming it commits; a put
  of bytes already stored is a no-op. So a crash may leave bytes no row names (``gc`` removes them)
  but never a row naming bytes that are not there.
- ``iter_responses(after=...)`` yields responses in commit order: a consumer that checkpoints the
  last one it processed sees every later response exactly once.
- Every dependency error is translated (``StoreError``, ``IntegrityError``); none escapes raw.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, Protocol, runtime_checkable

from mxm_dataio_async._models import Request, Response, ResponseStatus, Session
from mxm_dataio_async._store._validation import ValidationOutcome, ValidationTotals
from mxm_dataio_async._store._work import Fence

__all__ = [
    "TABLES",
    "DanglingReference",
    "Lease",
    "MetadataStats",
    "MetadataStore",
    "PayloadRow",
    "PayloadStore",
    "PruneCounts",
    "Recording",
    "SourceCounts",
    "StagedPayload",
    "StoredObject",
    "Table",
    "Tier",
]

Tier = Literal["inline", "file"]
"""Where a payload's bytes live: ``inline`` in the metadata store (with its rows), ``file`` in the
payload store (a local file or an object: the name predates object storage)."""

Table = Literal["sessions", "requests", "responses"]
TABLES: tuple[Table, ...] = ("sessions", "requests", "responses")


@dataclass(frozen=True, slots=True)
class StagedPayload:
    """A payload hashed and, for the ``file`` tier, already durable in the payload store; its
    row is not yet written (``record()`` writes it)."""

    digest: bytes
    size: int
    tier: Tier
    data: bytes | None  # the bytes of an inline payload; None for the file tier

    @property
    def checksum(self) -> str:
        return self.digest.hex()


@dataclass(frozen=True, slots=True)
class Recording:
    """What one ``record()`` commits together: a request row (written once per id, already
    redacted), its responses and the payload rows they name.

    ``served_from`` names the stored response a cache hit (or a coalesced duplicate) was given;
    ``sent`` is the checksum of the bytes a ``send()`` uploaded (also one of ``payloads``).
    """

    request: Request
    responses: Sequence[Response] = ()
    payloads: Sequence[StagedPayload] = ()
    served_from: str | None = None
    sent: str | None = None
    fence: Fence | None = None
    """Recorded under a worker's claim on a chunk of a run: commit only while the claim holds
    (``ClaimLost`` otherwise), and mark ``fence.index`` done in the same transaction. Only a
    store with a work queue (PostgreSQL) accepts it."""


@dataclass(frozen=True, slots=True)
class PayloadRow:
    """A payload as the metadata store knows it; ``data`` only for inline rows when asked.

    ``verified``: the implementation vouches that ``data`` matches ``digest`` (it hashed these
    very bytes itself, e.g. they come from its memory of its own commits), so a reader need not
    hash them again. Bytes read back from storage are never ``verified``.
    """

    digest: bytes
    size: int
    tier: Tier
    data: bytes | None = None
    verified: bool = field(default=False, compare=False)


@dataclass(frozen=True, slots=True)
class StoredObject:
    """An object in the payload store: ``digest`` is None for a stray object whose name is not a
    content address; ``location`` is its path or key; ``age`` seconds since it was written."""

    location: str
    size: int
    age: float
    digest: bytes | None = None


@dataclass(frozen=True, slots=True)
class Lease:
    """A held lease: ``name`` is the job, ``holder`` who holds it, until ``expires_at``."""

    name: str
    holder: str
    acquired_at: datetime
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class DanglingReference:
    """A row naming a payload the metadata store does not hold (``verify`` reports it)."""

    table: Literal["responses", "requests"]
    row_id: str
    checksum: str


@dataclass(frozen=True, slots=True)
class PruneCounts:
    responses: int = 0
    response_bytes: int = 0
    requests: int = 0
    garbage_payloads: int = 0
    garbage_bytes: int = 0


@dataclass(frozen=True, slots=True)
class SourceCounts:
    """Per-source totals (see ``StoreStats``)."""

    source: str
    sessions: int = 0
    requests: int = 0
    cache_hits: int = 0
    fetched: int = 0
    responses: int = 0
    error_responses: int = 0
    bytes: int = 0


@dataclass(frozen=True, slots=True)
class MetadataStats:
    sources: list[SourceCounts] = field(default_factory=list)
    tiers: Mapping[str, tuple[int, int]] = field(default_factory=dict)  # tier -> (count, bytes)
    size_bytes: int = 0  # the metadata's own footprint (database files), when known


@runtime_checkable
class MetadataStore(Protocol):
    """Sessions, requests, responses, inline payloads, checkpoints and leases."""

    @property
    def location(self) -> str:
        """Where the metadata lives, for messages (a path or a URL without credentials)."""
        ...

    async def open(self) -> None: ...

    async def aclose(self) -> None: ...

    # -- writing (the recorder is the only caller) ---------------------------------------------

    async def save_session(self, session: Session) -> None:
        """Insert a session row, or update its end, status and counts."""
        ...

    async def record(self, recording: Recording) -> None:
        """Commit ``recording`` in one transaction; returns once it is durable."""
        ...

    def record_later(self, recording: Recording) -> None:
        """Queue ``recording`` for the next commit and return at once (audit rows whose loss in
        a crash is harmless, such as a cache hit's request row). Closing the store commits it."""
        ...

    # -- reading -------------------------------------------------------------------------------

    async def latest_response(
        self, request_hash: str, *, statuses: Sequence[ResponseStatus] = (ResponseStatus.OK,)
    ) -> Response | None:
        """The newest response with one of ``statuses`` for a request hash (the cache lookup)."""
        ...

    async def get_response(self, response_id: str) -> Response | None: ...

    async def get_session(self, session_id: str) -> Session | None: ...

    async def list_sessions(
        self, *, source: str | None = None, limit: int | None = None
    ) -> list[Session]:
        """Sessions, newest first."""
        ...

    def iter_responses(
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
        """Responses in commit order; ``after`` is a response id (also one since pruned that a
        checkpoint remembers). ``since``/``until`` are aware UTC datetimes."""
        ...

    async def payload(self, digest: bytes) -> PayloadRow | None:
        """A payload's row, with its bytes if inline; None if no row names it. An
        implementation may answer from its memory of what it committed itself moments ago
        (bytes are immutable by their sha256), even if another process deleted the row since."""
        ...

    async def present_payloads(
        self, digests: Iterable[bytes], *, tier: Tier | None = None
    ) -> set[bytes]:
        """Which of ``digests`` have a payload row (of ``tier``, if given)."""
        ...

    async def discard_payload(self, digest: bytes) -> None:
        """Forget bytes a verified read found corrupt (or missing): delete their row, and let
        cache lookups skip the responses that name them until they are recorded again (then
        the bytes are stored afresh)."""
        ...

    # -- consumers and jobs --------------------------------------------------------------------

    async def read_checkpoint(self, name: str) -> str | None: ...

    async def write_checkpoint(self, name: str, cursor: str) -> None: ...

    async def acquire_lease(
        self, name: str, holder: str, ttl: float, *, replacing: str | None = None
    ) -> Lease:
        """Take lease ``name`` for ``ttl`` seconds (or renew it if ``holder`` has it); raise
        ``LeaseHeld`` while another holder's lease has not expired. ``replacing`` names a holder
        known to be dead (its process is gone): its lease is taken over at once."""
        ...

    async def abandon_sessions(self, host: str, alive: Callable[[int], bool]) -> int:
        """Mark ``abandoned`` the sessions still ``open`` that ran on ``host`` in a process for
        which ``alive(pid)`` is False (killed without recording an end); returns how many."""
        ...

    async def renew_lease(self, lease: Lease, ttl: float) -> Lease:
        """Extend a held lease; ``LeaseHeld`` if another holder took it meanwhile."""
        ...

    async def release_lease(self, lease: Lease) -> None: ...

    # -- validation outcomes (datasets) ------------------------------------------------------------

    async def record_validation(self, outcome: ValidationOutcome) -> None:
        """Keep how a response's records validated (replacing an outcome for the same
        response and model)."""
        ...

    async def validations(self, response_id: str) -> list[ValidationOutcome]: ...

    async def validation_totals(self) -> list[ValidationTotals]: ...

    # -- inspection and maintenance ------------------------------------------------------------

    async def resolve_session(self, text: str) -> str:
        """A session id from itself or a unique prefix (4+ characters); ``StoreError`` if unknown
        or ambiguous."""
        ...

    async def resolve_response(self, text: str) -> str:
        """A response id from itself, a unique prefix or a unique tail (8+ characters)."""
        ...

    def iter_rows(
        self,
        table: Table,
        *,
        session_id: str | None = None,
        ids: Iterable[str] | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """Raw rows of a public table as ``{column: value}`` (hashes as hex text, JSON columns as
        text), in recording order: the form bundles carry and ``meta`` prints."""
        ...

    async def count_rows(self, table: Table | Literal["payloads"]) -> int: ...

    def iter_payload_rows(self, *, page_size: int = 256) -> AsyncIterator[PayloadRow]:
        """Every payload row (inline ones with their bytes), by digest; pages, never all."""
        ...

    def iter_dangling_references(self) -> AsyncIterator[DanglingReference]:
        """Rows that name a payload no payload row holds."""
        ...

    async def unreferenced_payloads(self) -> list[PayloadRow]:
        """Payload rows no response or request names (without their bytes)."""
        ...

    async def delete_payloads(self, digests: Sequence[bytes]) -> list[bytes]:
        """Delete the payload rows among ``digests`` that are still unreferenced, in one
        transaction; returns those deleted."""
        ...

    async def prune(
        self,
        *,
        cutoff: datetime,
        source: str | None = None,
        bucket: str | None = None,
        dry_run: bool = False,
    ) -> PruneCounts:
        """Delete responses fetched before ``cutoff`` and the requests left without one (cache
        hits served a deleted response too), in one transaction; sessions are kept."""
        ...

    async def stats(self) -> MetadataStats: ...

    async def import_rows(
        self, payloads: Iterable[PayloadRow], rows: Mapping[Table, Iterable[dict[str, Any]]]
    ) -> dict[str, int]:
        """Insert payload rows and raw rows (as :meth:`iter_rows` yields them) in one
        transaction, ignoring ids already present; every payload a row names must be among
        ``payloads`` or already stored (``IntegrityError`` otherwise, nothing written). Returns
        how many rows of each kind (``payloads`` and the tables) were added. The iterables are
        consumed once, possibly in a worker thread; they may block (reading a bundle)."""
        ...


@runtime_checkable
class PayloadStore(Protocol):
    """Content-addressed bytes above the inline threshold: put once, read verified."""

    @property
    def location(self) -> str: ...

    async def open(self) -> int:
        """Make ready; returns how many leftovers of dead writers were removed."""
        ...

    async def aclose(self) -> None: ...

    async def put(self, digest: bytes, data: bytes) -> None:
        """Store ``data`` (whose sha256 is ``digest``) durably; a no-op if already stored."""
        ...

    async def put_stream(self, chunks: AsyncIterable[bytes]) -> tuple[bytes, int]:
        """Store a body as it streams, hashing it; returns ``(digest, size)`` once durable.
        Memory stays flat whatever the size."""
        ...

    async def get(self, digest: bytes, size: int) -> bytes:
        """The exact bytes, verified; ``IntegrityError`` if missing or corrupt."""
        ...

    def iter(self, digest: bytes, size: int, chunk_size: int = 256 * 1024) -> AsyncIterator[bytes]:
        """The bytes in chunks; ``IntegrityError`` (at the end at the latest) unless they verify."""
        ...

    async def stat(self, digest: bytes) -> StoredObject | None:
        """The stored object for ``digest``, or None if absent."""
        ...

    def list(self) -> AsyncIterator[StoredObject]:
        """Every stored object (strays included), a page at a time."""
        ...

    def leftovers(self, grace: float) -> AsyncIterator[StoredObject]:
        """Pieces of interrupted writes older than ``grace`` seconds that no live writer owns."""
        ...

    async def delete(self, target: bytes | StoredObject) -> bool:
        """Remove an object (by digest, or one :meth:`list`/:meth:`leftovers` yielded); False if
        it was already gone."""
        ...
