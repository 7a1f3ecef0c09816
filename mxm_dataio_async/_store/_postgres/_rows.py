"""Rows <-> models for PostgreSQL, and rows <-> the dicts bundles carry.

The tables and columns are those of the SQLite backend (``_sqlite/_rows.py`` names them); the
types are PostgreSQL's: request hashes and payload digests ``bytea``, times ``timestamptz``, the
JSON columns ``jsonb`` (through ``json_in``/``json_value``). ``iter_rows`` yields exactly the dicts
the SQLite backend yields (hashes as hex text, times as its fixed-width ISO text, JSON columns as
its JSON text), so a bundle moves between the two unchanged; ``import_row`` reads them back.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final

from mxm_dataio_async._exceptions import StoreError
from mxm_dataio_async._identity import canonical_json
from mxm_dataio_async._models import (
    CacheMode,
    Request,
    Response,
    ResponseStatus,
    Session,
    SessionStatus,
    make_response,
)
from mxm_dataio_async._store._postgres._sql import (
    json_in,
    json_out,
    json_value,
    pg_text,
    utc,
)
from mxm_dataio_async._store._protocols import Table
from mxm_dataio_async._store._sqlite._queries import COLUMNS, check_columns
from mxm_dataio_async._store._sqlite._rows import (
    REQUEST_COLUMNS,
    RESPONSE_COLUMNS,
    SESSION_COLUMNS,
)
from mxm_dataio_async._store._sqlite._sql import json_text, ts

__all__ = [
    "COLUMNS",
    "PAYLOAD_TYPES",
    "REQUEST_COLUMNS",
    "RESPONSE_COLUMNS",
    "SESSION_COLUMNS",
    "TYPES",
    "import_row",
    "request_row",
    "response_from_row",
    "response_row",
    "row_dict",
    "session_from_row",
    "session_row",
]

# fmt: off
#: The PostgreSQL type of each column, in ``COLUMNS`` order (the casts of the ``unnest`` inserts).
TYPES: Final[dict[Table, tuple[str, ...]]] = {
    "sessions": (
        "text", "text", "text", "timestamptz", "timestamptz", "text", "text",
        "int8", "int8", "int8", "int8", "int8", "text", "text", "int8",
    ),
    "requests": (
        "text", "text", "bytea", "text", "text", "text", "text", "jsonb", "jsonb", "jsonb",
        "text", "text", "text", "float8", "timestamptz", "text", "text",
    ),
    "responses": (
        "text", "text", "bytea", "text", "text", "text", "text", "text", "int8", "timestamptz",
        "text", "float8", "text", "text", "int8", "int8", "int8", "int8", "text", "text", "text",
        "float8", "jsonb", "jsonb", "text", "text", "float8", "jsonb",
    ),
}
# fmt: on
PAYLOAD_TYPES: Final = ("bytea", "int8", "text", "bytea", "timestamptz")
_CANONICAL_JSON: Final = frozenset({("requests", "params"), ("requests", "body")})
_IDS: Final = frozenset({"id", "session_id", "request_id", "served_from", "revalidated_from"})

for _table, _columns in COLUMNS.items():  # the two lists must never drift apart
    assert len(TYPES[_table]) == len(_columns), _table


def session_row(s: Session) -> tuple[Any, ...]:
    return (
        s.id,
        pg_text(s.source),
        pg_text(s.as_of),
        utc(s.started_at),
        utc(s.ended_at) if s.ended_at else None,
        s.status.value,
        s.cache_mode.value,
        s.requests,
        s.responses,
        s.cache_hits,
        s.errors,
        s.bytes_fetched,
        pg_text(s.error),
        pg_text(s.host),
        s.pid,
    )


def session_from_row(r: Sequence[Any]) -> Session:
    return Session(
        id=r[0],
        source=r[1],
        as_of=r[2],
        started_at=r[3],
        ended_at=r[4],
        status=SessionStatus(r[5]),
        cache_mode=CacheMode(r[6]),
        requests=r[7],
        responses=r[8],
        cache_hits=r[9],
        errors=r[10],
        bytes_fetched=r[11],
        error=r[12],
        host=r[13],
        pid=r[14],
    )


def request_row(q: Request, served_from: str | None, sent: str | None) -> tuple[Any, ...]:
    return (
        q.id,
        q.session_id,
        bytes.fromhex(q.hash),
        pg_text(q.source),
        pg_text(q.kind),
        q.method,
        pg_text(q.endpoint),
        json_in(canonical_json(q.params)),
        None if q.body is None else json_in(canonical_json(q.body)),
        json_in(json_text(dict(q.headers))) if q.headers else None,
        pg_text(q.as_of_bucket),
        pg_text(q.cache_tag),
        q.cache_mode.value,
        q.ttl_seconds,
        utc(q.created_at),
        served_from,
        sent,
    )


def response_row(q: Request, r: Response) -> tuple[Any, ...]:
    return (
        r.id,
        r.request_id,
        bytes.fromhex(r.request_hash),
        r.session_id,
        pg_text(q.source),
        pg_text(q.kind),
        r.status.value,
        r.checksum,
        r.size_bytes,
        utc(r.fetched_at),
        r.cache_mode.value,
        r.ttl_seconds,
        pg_text(r.as_of_bucket),
        pg_text(r.cache_tag),
        r.attempts,
        r.attempt,
        r.sequence,
        r.transport_status,
        pg_text(r.content_type),
        pg_text(r.encoding),
        pg_text(r.url),
        r.elapsed_ms,
        json_in(json_text(dict(r.headers))) if r.headers is not None else None,
        json_in(json_text(dict(r.adapter_meta))) if r.adapter_meta is not None else None,
        pg_text(r.error),
        r.revalidated_from,
        r.wait_ms,
        json_in(json_text(dict(r.vary))) if r.vary is not None else None,
    )


_STATUSES: Final = {s.value: s for s in ResponseStatus}
_CACHE_MODES: Final = {m.value: m for m in CacheMode}


def response_from_row(r: Sequence[Any]) -> Response:
    """A response from the first ``RESPONSE_COLUMNS`` of a row (positional, as the SQLite
    backend's twin: the cache-hit path builds one per hit)."""
    return make_response(
        r[0],  # id
        r[1],  # request_id
        r[2].hex(),  # request_hash
        r[3],  # session_id
        _STATUSES[r[6]],  # status
        r[7],  # checksum
        r[8],  # size_bytes
        r[9],  # fetched_at
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
        json_value(r[22]),  # headers
        json_value(r[23]),  # adapter_meta
        r[24],  # error
        r[25],  # revalidated_from
        r[26],  # wait_ms
        json_value(r[27]),  # vary
    )


# -- the dicts bundles carry ----------------------------------------------------------------------


def _hex(value: Any) -> Any:
    return None if value is None else bytes(value).hex()


def _ts_out(value: Any) -> Any:
    return None if value is None else ts(value)


def _out_converters(table: Table) -> list[Callable[[Any], Any] | None]:
    out: list[Callable[[Any], Any] | None] = []
    for column, kind in zip(COLUMNS[table], TYPES[table], strict=True):
        if kind == "bytea":
            out.append(_hex)
        elif kind == "timestamptz":
            out.append(_ts_out)
        elif kind == "jsonb":
            canonical = (table, column) in _CANONICAL_JSON
            out.append(lambda v, c=canonical: json_out(v, canonical=c))  # type: ignore[misc]
        else:
            out.append(None)
    return out


_OUT: Final = {table: _out_converters(table) for table in COLUMNS}


def row_dict(table: Table, row: Sequence[Any]) -> dict[str, Any]:
    """A row (its first ``COLUMNS[table]`` values) as the SQLite backend's ``iter_rows`` yields
    it."""
    return {
        column: (value if convert is None else convert(value))
        for column, convert, value in zip(COLUMNS[table], _OUT[table], row, strict=False)
    }


def _hash_in(value: Any) -> bytes:
    if not isinstance(value, str):
        raise TypeError(f"expected hex text, got {type(value).__name__}")
    return bytes.fromhex(value)


def _time_in(value: Any) -> datetime:
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, str):
        moment = datetime.fromisoformat(value)
    else:
        raise TypeError(f"expected ISO 8601 text, got {type(value).__name__}")
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _json_in(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected JSON text, got {type(value).__name__}")
    stored = json_in(value)
    assert stored is not None
    return stored


def _text_in(value: Any) -> Any:
    return pg_text(value) if isinstance(value, str) else value


def _in_converters(table: Table) -> list[Callable[[Any], Any] | None]:
    out: list[Callable[[Any], Any] | None] = []
    for column, kind in zip(COLUMNS[table], TYPES[table], strict=True):
        if kind == "bytea":
            out.append(_hash_in)
        elif kind == "timestamptz":
            out.append(_time_in)
        elif kind == "jsonb":
            out.append(_json_in)
        elif kind == "text" and column not in _IDS:
            out.append(_text_in)
        else:
            out.append(None)
    return out


_IN: Final = {table: _in_converters(table) for table in COLUMNS}


def import_row(table: Table, row: Mapping[str, Any]) -> tuple[Any, ...]:
    """A dict as :func:`row_dict` makes it, as a row tuple to insert; ``StoreError`` if it is not
    one."""
    columns = COLUMNS[table]
    check_columns(table, row)
    values: list[Any] = []
    for column, convert in zip(columns, _IN[table], strict=True):
        value = row.get(column)
        if convert is not None and value is not None:
            try:
                value = convert(value)
            except (TypeError, ValueError) as exc:
                raise StoreError(f"a {table} row has a bad {column}: {exc}") from None
        values.append(value)
    return tuple(values)
