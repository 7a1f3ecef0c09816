"""Records on their way into a dataset: key and row hashes, provenance, columnar batches spooled
to a local Parquet file (pyarrow) so a publish never holds a whole input in memory."""

from __future__ import annotations

import enum
import hashlib
import json
import shutil
import tempfile
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Final

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel

__all__ = ["PROVENANCE", "Staging", "arrow_schema", "key_hash", "row_hash"]

#: Columns every dataset row carries besides its own.
PROVENANCE: Final = ("_key_hash", "_row_hash", "_response_id", "_fetched_at")
_BATCH: Final = 16_384

_SIMPLE: Final[dict[Any, pa.DataType]] = {
    bool: pa.bool_(),
    int: pa.int64(),
    float: pa.float64(),
    str: pa.string(),
    bytes: pa.binary(),
    date: pa.date32(),
    datetime: pa.timestamp("us", tz="UTC"),
}


def _canonical(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, datetime | date | Decimal):
        return value.isoformat() if not isinstance(value, Decimal) else str(value)
    return value


def _dumps(value: Any) -> bytes:
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_canonical
    ).encode()


def key_hash(record: Mapping[str, Any], keys: Sequence[str]) -> bytes:
    """16 bytes of BLAKE2b over the canonical JSON of the key values, in ``keys`` order."""
    return hashlib.blake2b(_dumps([record.get(k) for k in keys]), digest_size=16).digest()


def row_hash(record: Mapping[str, Any]) -> bytes:
    """16 bytes of BLAKE2b over the canonical JSON of the whole record (its own columns)."""
    return hashlib.blake2b(_dumps(record), digest_size=16).digest()


def _arrow_type(annotation: Any) -> tuple[pa.DataType, bool]:
    """(arrow type, encode as JSON text) for a model field's annotation."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _arrow_type(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return _arrow_type(args[0])
        return pa.string(), True
    if annotation in _SIMPLE:
        return _SIMPLE[annotation], False
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return pa.string(), False
    return pa.string(), True  # Decimal, lists, nested models...: their JSON text


def arrow_schema(model: type[BaseModel]) -> tuple[pa.Schema, frozenset[str]]:
    """The columns of ``model`` (by field name) and which of them are stored as JSON text."""
    fields, as_json = [], set()
    for name, info in model.model_fields.items():
        kind, encode = _arrow_type(info.annotation)
        fields.append(pa.field(name, kind))
        if encode:
            as_json.add(name)
    return pa.schema(fields), frozenset(as_json)


def _provenance_fields() -> list[pa.Field]:
    return [
        pa.field("_key_hash", pa.binary(), nullable=False),
        pa.field("_row_hash", pa.binary(), nullable=False),
        pa.field("_response_id", pa.string()),
        pa.field("_fetched_at", pa.timestamp("us", tz="UTC")),
        pa.field("_seq", pa.int64(), nullable=False),
    ]


class Staging:
    """Records staged for one publish: ``add()`` them (a response's records at a time), then
    ``Dataset.publish(staging)``. Columns come from ``model`` when given, else from the first
    batch; spooled to Parquet in a temporary folder that ``close()`` removes."""

    def __init__(self, keys: Sequence[str], model: type[BaseModel] | None = None) -> None:
        if not keys:
            raise ValueError("a dataset needs at least one key column")
        self.keys = tuple(keys)
        self.dir = Path(tempfile.mkdtemp(prefix="mxm-stage-"))
        self.path = self.dir / "staged.parquet"
        self.rows = 0
        self._schema: pa.Schema | None = None
        self._json: frozenset[str] = frozenset()
        if model is not None:
            own, self._json = arrow_schema(model)
            self._set_schema(own)
        self._writer: pq.ParquetWriter | None = None
        self._pending: list[dict[str, Any]] = []

    def _set_schema(self, own: pa.Schema) -> None:
        for name in own.names:
            if name.startswith("_") and name in (*PROVENANCE, "_seq"):
                raise ValueError(f"column {name!r} is reserved for provenance")
        missing = [k for k in self.keys if k not in own.names]
        if missing:
            raise ValueError(f"key columns {missing} are not columns of the records")
        self._schema = pa.schema([*own, *_provenance_fields()])

    @property
    def columns(self) -> list[str]:
        return [] if self._schema is None else [n for n in self._schema.names if n != "_seq"]

    def add(
        self,
        records: Iterable[Mapping[str, Any]],
        *,
        response_id: str | None = None,
        fetched_at: datetime | None = None,
    ) -> int:
        """Stage records with their provenance; returns how many."""
        n = 0
        fetched = fetched_at.astimezone(UTC) if fetched_at is not None else None
        for record in records:
            row = {k: v.value if isinstance(v, enum.Enum) else v for k, v in record.items()}
            for name in self._json:
                if row.get(name) is not None:
                    row[name] = _dumps(row[name]).decode()
            row["_key_hash"] = key_hash(row, self.keys)
            row["_row_hash"] = row_hash({k: row[k] for k in record})
            row["_response_id"] = response_id
            row["_fetched_at"] = fetched
            row["_seq"] = self.rows
            self.rows += 1
            n += 1
            self._pending.append(row)
            if len(self._pending) >= _BATCH:
                self._flush()
        return n

    def _flush(self) -> None:
        if not self._pending:
            return
        if self._schema is None:
            inferred = pa.Table.from_pylist(
                [
                    {k: v for k, v in r.items() if not k.startswith("_")}
                    for r in self._pending[:1000]
                ]
            ).schema
            self._set_schema(inferred)
        assert self._schema is not None
        table = pa.Table.from_pylist(self._pending, schema=self._schema)
        self._pending = []
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.path, self._schema)
        self._writer.write_table(table)

    def finish(self) -> Path | None:
        """Flush and close the spool; the staged file, or None when nothing was staged."""
        self._flush()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        return self.path if self.rows else None

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
