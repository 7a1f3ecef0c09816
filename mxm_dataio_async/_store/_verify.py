"""``verify``: the integrity walk over every payload row, every row naming a payload and every
file (how it reaches SQLite, and why young files are spared: ``_maintenance.py``)."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Final

from mxm_dataio_async._store._maintenance import (
    _IN_BATCH,
    DEFAULT_BUSY_TIMEOUT,
    Duration,
    ProgressCallback,
    _digest_of,
    _drive,
    _hash_file,
    _payload_file_rows,
    _present,
    _seconds,
    _temp_leftovers,
    connect,
    connection,
    transaction,
)
from mxm_dataio_async._store._payloads import PayloadFiles

__all__ = ["Problem", "ProblemKind", "VerifyReport", "verify"]

_PAGE: Final = 256  # payload rows per step of the walk (inline rows are at most inline_threshold)


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

    root: Path
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
    def __init__(self, root: Path, busy_timeout: float, grace: float) -> None:
        self.root = root
        self.busy_timeout = busy_timeout
        self.grace = grace
        self.files = PayloadFiles(root, 0)
        self.report = VerifyReport(root)
        self.counts = {"payloads": 0, "bytes": 0, "responses": 0, "requests": 0, "files": 0}

    def _problem(self, bucket: list[Problem], kind: ProblemKind, detail: str, **kw: Any) -> None:
        bucket.append(Problem(kind, detail, **kw))

    def _check_payload(self, digest: bytes, size: int, tier: str, data: bytes | None) -> None:
        rep, hx = self.report, digest.hex()
        if tier == "inline":
            raw = b"" if data is None else bytes(data)
            self.counts["bytes"] += len(raw)
            if len(raw) != size or hashlib.sha256(raw).digest() != digest:
                self._problem(
                    rep.corrupt_payloads,
                    ProblemKind.CORRUPT_PAYLOAD,
                    f"inline payload {hx} is corrupt: {len(raw)} bytes stored, {size} recorded, "
                    "sha256 does not match",
                    checksum=hx,
                )
            return
        path = self.files.path_for(digest)
        if tier != "file":
            self._problem(
                rep.corrupt_payloads,
                ProblemKind.CORRUPT_PAYLOAD,
                f"payload {hx} has an unknown tier {tier!r}",
                checksum=hx,
            )
            return
        try:
            found, seen = _hash_file(path)
        except FileNotFoundError:
            self._problem(
                rep.missing_payloads,
                ProblemKind.MISSING_PAYLOAD,
                f"payload {hx} is missing from the file tier ({path})",
                checksum=hx,
                path=path,
            )
            return
        except OSError as exc:
            self._problem(
                rep.corrupt_payloads,
                ProblemKind.CORRUPT_PAYLOAD,
                f"payload {hx} cannot be read ({path}): {exc.strerror or exc}",
                checksum=hx,
                path=path,
            )
            return
        self.counts["bytes"] += seen
        if seen != size or found != digest:
            self._problem(
                rep.corrupt_payloads,
                ProblemKind.CORRUPT_PAYLOAD,
                f"payload {hx} is corrupt on disk ({path}): {seen} bytes, {size} recorded, "
                "sha256 does not match",
                checksum=hx,
                path=path,
            )

    def _check_references(self, conn: sqlite3.Connection, table: str, column: str) -> Iterator[int]:
        """Walk ``table`` by rowid; report rows whose ``column`` names no payload row."""
        last = 0
        while True:
            rows = conn.execute(
                f"SELECT rowid, id, {column} FROM {table} WHERE rowid > ? ORDER BY rowid LIMIT ?",
                (last, _IN_BATCH),
            ).fetchall()
            if not rows:
                return
            last = rows[-1][0]
            named = {c: _digest_of(c) for _, _, c in rows if c is not None}
            known = _present(conn, [d for d in named.values() if d is not None], tier=None)
            what = "response" if table == "responses" else "request"
            for _, row_id, checksum in rows:
                if checksum is None or named[checksum] in known:
                    continue
                self._problem(
                    self.report.missing_references,
                    ProblemKind.MISSING_REFERENCE,
                    f"{what} {row_id} names payload {checksum}, which is not in the store",
                    checksum=checksum,
                    row=f"{what} {row_id}",
                )
            yield len(rows)

    def steps(self) -> Generator[tuple[str, int, int | None]]:
        conn = connect(self.root, busy_timeout=self.busy_timeout)
        try:
            # One read snapshot for the row phases: rows and the payloads they name agree.
            with transaction(conn, write=False):
                yield from self._row_phases(conn)
        finally:
            conn.close()
        # Files are checked against current rows (not the snapshot): a file whose row committed
        # during the walk is not an orphan.
        now = time.time()
        yield "files", 0, None
        with connection(self.root, self.busy_timeout) as conn:
            for path, age, _size, owned in _payload_file_rows(conn, self.files, now):
                self.counts["files"] += 1
                if not owned and age >= self.grace:
                    self._problem(
                        self.report.orphan_files,
                        ProblemKind.ORPHAN_FILE,
                        f"orphan file {path}: no payload row names it (gc removes it)",
                        path=path,
                    )
                if self.counts["files"] % _IN_BATCH == 0:
                    yield "files", self.counts["files"], None
        yield "files", self.counts["files"], self.counts["files"]
        for path in _temp_leftovers(self.files, self.grace, now):
            self._problem(
                self.report.temp_leftovers,
                ProblemKind.TEMP_LEFTOVER,
                f"temp leftover {path}: an interrupted write (gc removes it)",
                path=path,
            )

    def _row_phases(self, conn: sqlite3.Connection) -> Iterator[tuple[str, int, int | None]]:
        total = conn.execute("SELECT count(*) FROM payloads").fetchone()[0]
        yield "payloads", 0, total
        last = b""
        while True:
            rows = conn.execute(
                "SELECT sha256, size_bytes, tier, data FROM payloads WHERE sha256 > ? "
                "ORDER BY sha256 LIMIT ?",
                (last, _PAGE),
            ).fetchall()
            if not rows:
                break
            for digest, size, tier, data in rows:
                self._check_payload(bytes(digest), size, tier, data)
            last = bytes(rows[-1][0])
            self.counts["payloads"] += len(rows)
            yield "payloads", self.counts["payloads"], total
        for table, column, counter in (
            ("responses", "checksum", "responses"),
            ("requests", "sent_checksum", "requests"),
        ):
            total = conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            yield table, 0, total
            for n in self._check_references(conn, table, column):
                self.counts[counter] += n
                yield table, self.counts[counter], total

    def result(self) -> VerifyReport:
        c, r = self.counts, self.report
        return VerifyReport(
            self.root,
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
    root: str | os.PathLike[str],
    *,
    grace: Duration = 0.0,
    busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
    on_progress: ProgressCallback | None = None,
) -> VerifyReport:
    """Walk every payload row (re-hashing its bytes), every row naming a payload, every file.

    Streaming: payload rows are read a page at a time and files hashed in chunks, so memory stays
    bounded. Files younger than ``grace`` seconds are not reported as orphans or leftovers (on a
    store being written, a file exists briefly before its row commits).
    """
    walker = _Verifier(Path(root), busy_timeout, _seconds(grace))
    await _drive(walker.steps(), on_progress)
    return walker.result()
