"""A dataset: immutable Parquet parts, one manifest per version, and a ``current`` pointer
swapped by compare-and-swap, on a local folder or an S3 prefix.

Layout under ``<location>/<name>/``::

    current                          {"version": N, "manifest": "manifests/...json", "id": ...}
    manifests/<N>-<id>.json          the version: every part (cumulative), rows, keys, parent
    parts/<N>-<id>.parquet           the rows a version added (own columns + provenance)
    index/<N>-<id>.parquet           the same rows' _key_hash, _row_hash and version

A publish anti-joins the staged rows against the current version's index (DuckDB, reading the
index files), writes the new rows' part and index, then the manifest, and swaps the pointer only
if it still names the version the delta was computed against. A publisher that loses the race
deletes what it wrote and computes again on the winner's version (``retries`` times), or raises
``PublishConflict``. A crash before the swap leaves ``current`` as it was; what the crashed
publisher wrote is unreferenced and ``gc()`` removes it.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

from mxm_dataio_async._exceptions import DataIOError
from mxm_dataio_async.datasets._staging import Staging
from mxm_dataio_async.datasets._storage import Files, LocalFiles, S3Files, open_files

__all__ = ["Dataset", "PublishConflict", "PublishResult", "Version", "list_datasets"]

_POINTER: Final = "current"
_FORMAT: Final = 1


class PublishConflict(DataIOError):
    """Another publisher swapped ``current`` first, every time we tried."""


@dataclass(frozen=True, slots=True)
class Version:
    """One published version (what its manifest says)."""

    dataset: str
    version: int
    id: str
    created_at: datetime
    rows: int
    added: int
    changed: int
    keys: tuple[str, ...]
    columns: tuple[str, ...]
    parts: tuple[str, ...]
    """Part keys, relative to the dataset's folder (``Dataset.files()`` gives full paths)."""
    indexes: tuple[str, ...]
    parent: str | None
    manifest: str

    @classmethod
    def from_manifest(cls, manifest_key: str, data: dict[str, Any]) -> Version:
        return cls(
            dataset=str(data["dataset"]),
            version=int(data["version"]),
            id=str(data["id"]),
            created_at=datetime.fromisoformat(data["created_at"]),
            rows=int(data["rows"]),
            added=int(data["added"]),
            changed=int(data.get("changed", 0)),
            keys=tuple(data["keys"]),
            columns=tuple(data["columns"]),
            parts=tuple(p["path"] for p in data["parts"]),
            indexes=tuple(p["index"] for p in data["parts"]),
            parent=data.get("parent"),
            manifest=manifest_key,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "version": self.version,
            "id": self.id,
            "created_at": self.created_at.isoformat(),
            "rows": self.rows,
            "added": self.added,
            "changed": self.changed,
            "parts": len(self.parts),
        }


@dataclass(frozen=True, slots=True)
class PublishResult:
    """What a publish did: ``added`` new keys, ``changed`` rows for known keys (with
    ``track_changes``), the version now current (None: the dataset is still empty)."""

    dataset: str
    version: int | None
    added: int
    changed: int
    staged: int
    attempts: int
    published: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "version": self.version,
            "added": self.added,
            "changed": self.changed,
            "staged": self.staged,
            "attempts": self.attempts,
            "published": self.published,
        }


@dataclass(slots=True)
class _Delta:
    part: Path
    index: Path
    added: int
    changed: int


def _sql_list(paths: Sequence[Path | str]) -> str:
    return "[" + ", ".join("'" + str(p).replace("'", "''") + "'" for p in paths) + "]"


def _duckdb() -> Any:
    try:
        import duckdb
    except ImportError as exc:
        raise ImportError(
            "datasets need DuckDB and pyarrow, which come with the datasets extra: "
            "pip install 'mxm-dataio-async[datasets]'"
        ) from exc
    return duckdb


@dataclass(slots=True)
class Dataset:
    """``Dataset(location, name, keys=[...])``: a dataset in a folder or under ``s3://bucket/prefix``.

    Reading needs only ``location`` and ``name``: ``files()`` lists the current version's
    Parquet files for DuckDB or Polars::

        files = Dataset("./dataio/datasets", "bars").files()
        duckdb.sql(f"SELECT count(*) FROM read_parquet({files})")
        polars.scan_parquet(files).collect()

    Publishing needs ``keys`` (the primary key columns); ``track_changes=True`` also appends a
    new row for a known key whose other values changed (readers wanting the latest row per key
    take the one from the highest version: ``_fetched_at`` and the part order tell).
    """

    location: str | os.PathLike[str]
    name: str
    keys: Sequence[str] = ()
    track_changes: bool = False
    memory_limit: str = "256MB"
    """DuckDB's memory limit for a publish's joins (it spills to disk past it)."""
    _files: Files = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(
                f"a dataset name has no '/' and does not start with '.': {self.name!r}"
            )
        self.keys = tuple(self.keys)
        self._files = open_files(self.location, self.name)

    # -- reading ----------------------------------------------------------------------------------

    def _manifest(self, key: str) -> Version:
        blob = self._files.read(key)
        if blob is None:
            raise DataIOError(f"dataset {self.name!r}: manifest {key} is missing")
        return Version.from_manifest(key, json.loads(blob.data))

    def _pointer(self) -> tuple[Version | None, str | None]:
        blob = self._files.read(_POINTER)
        if blob is None:
            return None, None
        pointer = json.loads(blob.data)
        return self._manifest(str(pointer["manifest"])), blob.tag

    def current(self) -> Version | None:
        """The current version, or None before the first publish."""
        return self._pointer()[0]

    def versions(self) -> list[Version]:
        """Every version from the first to the current one (following the manifests' parents)."""
        out: list[Version] = []
        at = self.current()
        by_id = {v.id: v for v in self._all_manifests()} if at is not None else {}
        while at is not None:
            out.append(at)
            at = by_id.get(at.parent) if at.parent else None
        return out[::-1]

    def version(self, number: int) -> Version:
        for v in self.versions():
            if v.version == number:
                return v
        raise LookupError(f"dataset {self.name!r} has no version {number}")

    def _all_manifests(self) -> Iterator[Version]:
        for entry in self._files.list("manifests/"):
            if entry.key.endswith(".json"):
                yield self._manifest(entry.key)

    def files(self, version: int | None = None) -> list[str]:
        """The Parquet files of the current version (or of ``version``): local paths, or
        ``s3://`` URLs for a dataset in S3. Empty before the first publish."""
        v = self.current() if version is None else self.version(version)
        return [] if v is None else [self._files.url(p) for p in v.parts]

    # -- publishing -------------------------------------------------------------------------------

    def stage(self, model: Any = None) -> Staging:
        """A ``Staging`` for this dataset's keys (columns from ``model``, a pydantic class)."""
        return Staging(self._need_keys(), model)

    def _need_keys(self) -> tuple[str, ...]:
        if not self.keys:
            raise ValueError(f"publishing to dataset {self.name!r} needs keys=[...]")
        return tuple(self.keys)

    def publish(
        self,
        staging: Staging,
        *,
        retries: int = 5,
        before_swap: Callable[[], None] | None = None,
    ) -> PublishResult:
        """Append the staged rows whose key is new (or, with ``track_changes``, whose row
        changed) as a new version; nothing new: no version. Blocking (DuckDB and file or S3 I/O):
        in async code run it in a thread. ``before_swap`` is called after the parts and manifest
        are written, right before the swap (tests use it to crash or race there)."""
        keys = self._need_keys()
        if staging.keys != keys:
            raise ValueError(f"staged with keys {staging.keys}, dataset keys {keys}")
        staged = staging.finish()
        attempts = 0
        while True:
            attempts += 1
            current, tag = self._pointer()
            if current is not None and current.keys != keys:
                raise ValueError(
                    f"dataset {self.name!r} has keys {list(current.keys)}, not {list(keys)}"
                )
            if staged is None:
                return self._result(current, 0, 0, staging.rows, attempts, False)
            number = 1 if current is None else current.version + 1
            ident = uuid.uuid4().hex[:16]
            with tempfile.TemporaryDirectory(prefix="mxm-publish-") as tmp:
                delta = self._delta(staged, current, number, Path(tmp))
                if delta.added + delta.changed == 0:
                    return self._result(current, 0, 0, staging.rows, attempts, False)
                stem = f"{number:08d}-{ident}"
                part, index = f"parts/{stem}.parquet", f"index/{stem}.parquet"
                self._files.upload(delta.part, part)
                self._files.upload(delta.index, index)
            manifest = self._new_manifest(current, number, ident, staging, part, index, delta)
            manifest_key = f"manifests/{stem}.json"
            written = [part, index, manifest_key]
            self._files.create(manifest_key, json.dumps(manifest, indent=1).encode())
            if before_swap is not None:
                before_swap()
            pointer = {"version": number, "manifest": manifest_key, "id": ident}
            if self._files.swap(_POINTER, json.dumps(pointer).encode(), tag):
                return PublishResult(
                    self.name, number, delta.added, delta.changed, staging.rows, attempts, True
                )
            for key in written:  # lost the race: nothing of ours stays behind
                self._files.delete(key)
            if attempts > retries:
                raise PublishConflict(
                    f"dataset {self.name!r}: another publisher swapped 'current' first "
                    f"{attempts} times; nothing was published"
                )

    def _result(
        self,
        current: Version | None,
        added: int,
        changed: int,
        staged: int,
        attempts: int,
        published: bool,
    ) -> PublishResult:
        number = None if current is None else current.version
        return PublishResult(self.name, number, added, changed, staged, attempts, published)

    def _new_manifest(
        self,
        current: Version | None,
        number: int,
        ident: str,
        staging: Staging,
        part: str,
        index: str,
        delta: _Delta,
    ) -> dict[str, Any]:
        parts = []
        if current is not None:
            old = self._files.read(current.manifest)
            assert old is not None
            parts = list(json.loads(old.data)["parts"])
        parts.append(
            {"path": part, "index": index, "rows": delta.added + delta.changed, "version": number}
        )
        return {
            "format": _FORMAT,
            "dataset": self.name,
            "version": number,
            "id": ident,
            "parent": None if current is None else current.id,
            "created_at": datetime.now(UTC).isoformat(),
            "keys": list(self.keys),
            "columns": staging.columns,
            "rows": sum(int(p["rows"]) for p in parts),
            "added": delta.added,
            "changed": delta.changed,
            "parts": parts,
        }

    def _local_indexes(self, current: Version | None, tmp: Path) -> list[Path]:
        if current is None:
            return []
        if isinstance(self._files, LocalFiles):
            return [self._files.root / k for k in current.indexes]
        out = []
        for i, key in enumerate(current.indexes):
            path = tmp / f"index-{i}.parquet"
            self._files.download(key, path)
            out.append(path)
        return out

    def _delta(self, staged: Path, current: Version | None, number: int, tmp: Path) -> _Delta:
        duckdb = _duckdb()
        part, index = tmp / "part.parquet", tmp / "index.parquet"
        con = duckdb.connect()
        try:
            # Bounded memory: joins past the limit spill to the publish's temporary folder.
            con.execute(f"SET memory_limit='{self.memory_limit}'")
            con.execute(f"SET temp_directory='{tmp / 'spill'}'")
            con.execute("SET preserve_insertion_order=false")
            # The last row of a key within one input wins (a later response, a later line):
            # found on the key column alone, so the whole rows are never sorted or windowed.
            src = f"read_parquet('{staged}')"
            con.execute(
                f"CREATE VIEW staged AS SELECT s.* FROM {src} s SEMI JOIN "
                f"(SELECT _key_hash, max(_seq) AS _seq FROM {src} GROUP BY _key_hash) l "
                "USING (_key_hash, _seq)"
            )
            indexes = self._local_indexes(current, tmp)
            known = f"read_parquet({_sql_list(indexes)})"
            if not indexes:
                delta = "SELECT * FROM staged"
            elif not self.track_changes:
                delta = f"SELECT s.* FROM staged s ANTI JOIN {known} k USING (_key_hash)"
            else:
                con.execute(
                    "CREATE VIEW latest AS SELECT _key_hash, arg_max(_row_hash, _version) AS h "
                    f"FROM {known} GROUP BY _key_hash"
                )
                delta = (
                    "SELECT s.* FROM staged s ANTI JOIN latest l "
                    "ON s._key_hash = l._key_hash AND s._row_hash = l.h"
                )
            con.execute(
                f"COPY (SELECT * EXCLUDE (_seq) FROM ({delta})) "
                f"TO '{part}' (FORMAT parquet, COMPRESSION zstd)"
            )
            written = f"read_parquet('{part}')"
            row = con.execute(f"SELECT count(*) FROM {written}").fetchone()
            rows = int(row[0]) if row else 0
            changed = 0
            if indexes and self.track_changes and rows:
                row = con.execute(
                    f"SELECT count(*) FROM {written} p SEMI JOIN {known} k USING (_key_hash)"
                ).fetchone()
                changed = int(row[0]) if row else 0
            added = rows - changed
            con.execute(
                f"COPY (SELECT _key_hash, _row_hash, {number}::BIGINT AS _version FROM {written}) "
                f"TO '{index}' (FORMAT parquet)"
            )
        finally:
            con.close()
        return _Delta(part, index, int(added), int(changed))

    # -- maintenance ------------------------------------------------------------------------------

    def gc(self, *, grace: float = 3600.0, dry_run: bool = False) -> list[str]:
        """Delete parts, indexes and manifests that no published version references (left by a
        publisher that crashed before its swap) and that are older than ``grace`` seconds (a
        publish may be writing them now). Returns the keys deleted (or that would be)."""
        keep: set[str] = set()
        for v in self.versions():
            keep.update((v.manifest, *v.parts, *v.indexes))
        cutoff = datetime.now(UTC) - timedelta(seconds=grace)
        gone = []
        for prefix in ("parts/", "index/", "manifests/"):
            for entry in self._files.list(prefix):
                name = entry.key.rsplit("/", 1)[-1]
                if entry.key in keep or (name.startswith(".tmp-") and grace > 0):
                    continue
                if entry.modified <= cutoff:
                    gone.append(entry.key)
        if not dry_run:
            for key in gone:
                self._files.delete(key)
        return gone


def list_datasets(location: str | os.PathLike[str]) -> list[Version]:
    """The current version of every dataset under ``location`` (sorted by name)."""
    text = os.fspath(location)
    names: set[str] = set()
    if text.startswith(("s3://", "s3a://")):
        files = S3Files(text)
        for entry in files.list(""):
            parts = entry.key.split("/")
            if len(parts) >= 2 and parts[-1] == _POINTER:
                names.add(parts[-2])
    else:
        root = Path(text)
        if root.is_dir():
            names = {p.name for p in root.iterdir() if (p / _POINTER).is_file()}
    out = []
    for name in sorted(names):
        v = Dataset(location, name).current()
        if v is not None:
            out.append(v)
    return out
