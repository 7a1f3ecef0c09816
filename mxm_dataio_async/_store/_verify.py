"""``verify``: the integrity walk over every payload row, every row naming a payload and every
object in the payload store, through the storage protocols (any backend).

A payload is put in the payload store before the row naming it commits, so on a store being
written an object may exist briefly without its row: objects younger than ``grace`` are not
reported as orphans or leftovers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Final, Literal

from mxm_dataio_async._durations import Duration, seconds_of
from mxm_dataio_async._exceptions import IntegrityError, StoreError
from mxm_dataio_async._store._protocols import MetadataStore, PayloadRow, PayloadStore

__all__ = ["ProblemKind", "Problem", "ProgressCallback", "VerifyReport", "verify"]

ProgressCallback = Callable[[str, int, "int | None"], None]
"""``on_progress(phase, done, total)``: called on the event loop between steps of a walk."""

_PAGE: Final = 256  # payload rows per step of the walk (inline rows are at most inline_threshold)
_FILES_PAGE: Final = 500  # objects checked against payload rows per query


class ProblemKind(StrEnum):
    """What ``verify`` can find wrong."""

    MISSING_PAYLOAD = "missing_payload"
    """A file-tier payload row whose file is gone."""
    CORRUPT_PAYLOAD = "corrupt_payload"
    """Stored bytes whose size or sha256 do not match the row (or an unreadable file)."""
    MISSING_REFERENCE = "missing_reference"
    """A response (or a request's sent payload) names a checksum no payload row holds."""
    ORPHAN_FILE = "orphan_file"
    """A file under ``payloads/`` that no payload row names."""
    TEMP_LEFTOVER = "temp_leftover"
    """A file in ``tmp/`` that no live process is writing (a crashed write)."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One finding: ``detail`` is a line for people; ``checksum``/``path``/``row`` locate it."""

    kind: ProblemKind
    detail: str
    checksum: str | None = None
    path: Path | None = None
    row: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "detail": self.detail,
            "checksum": self.checksum,
            "path": None if self.path is None else str(self.path),
            "row": self.row,
        }


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """The result of :meth:`Store.verify`: what was checked, and the problems by kind.

    ``ok`` is True when there is no problem; ``exit_code`` is 0 then and 1 otherwise.
    """

    root: Path | str
    payloads: int = 0
    bytes: int = 0
    responses: int = 0
    requests: int = 0
    files: int = 0
    missing_payloads: list[Problem] = field(default_factory=list)
    corrupt_payloads: list[Problem] = field(default_factory=list)
    missing_references: list[Problem] = field(default_factory=list)
    orphan_files: list[Problem] = field(default_factory=list)
    temp_leftovers: list[Problem] = field(default_factory=list)

    @property
    def problems(self) -> list[Problem]:
        return [
            *self.missing_payloads,
            *self.corrupt_payloads,
            *self.missing_references,
            *self.orphan_files,
            *self.temp_leftovers,
        ]

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def to_json(self) -> dict[str, Any]:
        return {
            "root": str(self.root),
            "ok": self.ok,
            "checked": {
                "payloads": self.payloads,
                "bytes": self.bytes,
                "responses": self.responses,
                "requests": self.requests,
                "files": self.files,
            },
            "problems": [p.to_json() for p in self.problems],
        }


class _Verifier:
    def __init__(
        self,
        metadata: MetadataStore,
        payloads: PayloadStore,
        root: Path | str,
        grace: float,
        on_progress: ProgressCallback | None,
    ) -> None:
        self.metadata = metadata
        self.payloads = payloads
        self.grace = grace
        self.progress = on_progress or (lambda phase, done, total: None)
        self.report = VerifyReport(root)
        self.counts = {"payloads": 0, "bytes": 0, "responses": 0, "requests": 0, "files": 0}

    def _problem(self, bucket: list[Problem], kind: ProblemKind, detail: str, **kw: Any) -> None:
        bucket.append(Problem(kind, detail, **kw))

    async def run(self) -> VerifyReport:
        await self._payload_rows()
        await self._references()
        await self._objects()
        return self.result()

    async def _payload_rows(self) -> None:
        total = await self.metadata.count_rows("payloads")
        self.progress("payloads", 0, total)
        async for row in self.metadata.iter_payload_rows(page_size=_PAGE):
            await self._check_payload(row)
            self.counts["payloads"] += 1
            if self.counts["payloads"] % _PAGE == 0:
                self.progress("payloads", self.counts["payloads"], total)
        self.progress("payloads", self.counts["payloads"], total)

    async def _check_payload(self, row: PayloadRow) -> None:
        rep, hx = self.report, row.digest.hex()
        if row.tier == "inline":
            raw = b"" if row.data is None else row.data
            self.counts["bytes"] += len(raw)
            if len(raw) != row.size or hashlib.sha256(raw).digest() != row.digest:
                self._problem(
                    rep.corrupt_payloads,
                    ProblemKind.CORRUPT_PAYLOAD,
                    f"inline payload {hx} is corrupt: {len(raw)} bytes stored, {row.size} "
                    "recorded, sha256 does not match",
                    checksum=hx,
                )
            return
        if row.tier != "file":  # a row from a newer release
            self._problem(  # type: ignore[unreachable]
                rep.corrupt_payloads,
                ProblemKind.CORRUPT_PAYLOAD,
                f"payload {hx} has an unknown tier {row.tier!r}",
                checksum=hx,
            )
            return
        stored = await self.payloads.stat(row.digest)
        if stored is None:
            self._problem(
                rep.missing_payloads,
                ProblemKind.MISSING_PAYLOAD,
                f"payload {hx} is missing from the payload store ({self.payloads.location})",
                checksum=hx,
            )
            return
        where = Path(stored.location)
        seen = 0
        try:
            async for chunk in self.payloads.iter(row.digest, row.size):
                seen += len(chunk)
        except IntegrityError:
            self._problem(
                rep.corrupt_payloads,
                ProblemKind.CORRUPT_PAYLOAD,
                f"payload {hx} is corrupt on disk ({where}): {seen} bytes, {row.size} "
                "recorded, sha256 does not match",
                checksum=hx,
                path=where,
            )
            return
        except StoreError as exc:
            self._problem(
                rep.corrupt_payloads,
                ProblemKind.CORRUPT_PAYLOAD,
                f"payload {hx} cannot be read ({where}): {exc}",
                checksum=hx,
                path=where,
            )
            return
        finally:
            self.counts["bytes"] += seen

    async def _references(self) -> None:
        totals: dict[Literal["responses", "requests"], int] = {}
        tables: tuple[Literal["responses", "requests"], ...] = ("responses", "requests")
        for table in tables:
            totals[table] = await self.metadata.count_rows(table)
            self.progress(table, 0, totals[table])
        async for ref in self.metadata.iter_dangling_references():
            what = "response" if ref.table == "responses" else "request"
            self._problem(
                self.report.missing_references,
                ProblemKind.MISSING_REFERENCE,
                f"{what} {ref.row_id} names payload {ref.checksum}, which is not in the store",
                checksum=ref.checksum,
                row=f"{what} {ref.row_id}",
            )
        for table, total in totals.items():
            self.counts[table] = total
            self.progress(table, total, total)

    async def _objects(self) -> None:
        # Objects are checked against current rows: an object whose row committed during the
        # walk is not an orphan.
        self.progress("files", 0, None)
        page: list[Any] = []
        async for obj in self.payloads.list():
            page.append(obj)
            if len(page) >= _FILES_PAGE:
                await self._check_objects(page)
        await self._check_objects(page)
        self.progress("files", self.counts["files"], self.counts["files"])
        async for obj in self.payloads.leftovers(self.grace):
            self._problem(
                self.report.temp_leftovers,
                ProblemKind.TEMP_LEFTOVER,
                f"temp leftover {obj.location}: an interrupted write (gc removes it)",
                path=Path(obj.location),
            )

    async def _check_objects(self, page: list[Any]) -> None:
        if not page:
            return
        digests = [o.digest for o in page if o.digest is not None]
        owned = await self.metadata.present_payloads(digests, tier="file")
        for obj in page:
            self.counts["files"] += 1
            if obj.digest not in owned and obj.age >= self.grace:
                self._problem(
                    self.report.orphan_files,
                    ProblemKind.ORPHAN_FILE,
                    f"orphan file {obj.location}: no payload row names it (gc removes it)",
                    path=Path(obj.location),
                )
        page.clear()
        self.progress("files", self.counts["files"], None)

    def result(self) -> VerifyReport:
        c, r = self.counts, self.report
        return VerifyReport(
            r.root,
            c["payloads"],
            c["bytes"],
            c["responses"],
            c["requests"],
            c["files"],
            r.missing_payloads,
            r.corrupt_payloads,
            r.missing_references,
            r.orphan_files,
            r.temp_leftovers,
        )


async def verify(
    metadata: MetadataStore,
    payloads: PayloadStore,
    *,
    root: Path | str,
    grace: Duration = 0.0,
    on_progress: ProgressCallback | None = None,
) -> VerifyReport:
    """Walk every payload row (re-hashing its bytes), every row naming a payload, every object.

    Streaming: payload rows are read a page at a time and objects hashed in chunks, so memory
    stays bounded. Objects younger than ``grace`` seconds are not reported as orphans or
    leftovers (on a store being written, an object exists briefly before its row commits).
    """
    walker = _Verifier(metadata, payloads, root, seconds_of(grace), on_progress)
    return await walker.run()
