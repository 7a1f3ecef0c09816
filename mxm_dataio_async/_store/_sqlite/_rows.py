"""Rows <-> models: the column lists of the public tables and the mapping both ways.

The table and column names are public (people inspect ``dataio.sqlite`` with the sqlite3 shell);
request hashes are 32-byte BLOBs, ids, checksums and timestamps text.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Final

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
from mxm_dataio_async._store._sqlite._sql import json_text, storable_text, ts

__all__ = [
    "REQUEST_COLUMNS",
    "RESPONSE_COLUMNS",
    "SESSION_COLUMNS",
    "request_row",
    "response_from_row",
    "response_row",
    "session_from_row",
    "session_row",
]

SESSION_COLUMNS: Final = (
    "id, source, as_of, started_at, ended_at, status, cache_mode, requests, responses, "
    "cache_hits, errors, bytes_fetched, error, host, pid"
)
REQUEST_COLUMNS: Final = (
    "id, session_id, hash, source, kind, method, endpoint, params, body, headers, as_of_bucket, "
    "cache_tag, cache_mode, ttl_seconds, created_at, served_from, sent_checksum"
)
RESPONSE_COLUMNS: Final = (
    "id, request_id, request_hash, session_id, source, kind, status, checksum, size_bytes, "
    "fetched_at, cache_mode, ttl_seconds, as_of_bucket, cache_tag, attempts, attempt, sequence, "
    "transport_status, content_type, encoding, url, elapsed_ms, headers, adapter_meta, error, "
    "revalidated_from, wait_ms, vary"
)


def _dt(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


def session_row(s: Session) -> tuple[Any, ...]:
    return (
        s.id,
        storable_text(s.source),
        storable_text(s.as_of),
        ts(s.started_at),
        ts(s.ended_at) if s.ended_at else None,
        s.status.value,
        s.cache_mode.value,
        s.requests,
        s.responses,
        s.cache_hits,
        s.errors,
        s.bytes_fetched,
        storable_text(s.error),
        storable_text(s.host),
        s.pid,
    )


def session_from_row(r: Sequence[Any]) -> Session:
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
        host=r[13],
        pid=r[14],
    )


def request_row(q: Request, served_from: str | None, sent: str | None) -> tuple[Any, ...]:
    return (
        q.id,
        q.session_id,
        bytes.fromhex(q.hash),
        storable_text(q.source),
        storable_text(q.kind),
        q.method,
        storable_text(q.endpoint),
        canonical_json(q.params) if q.params else "{}",  # (most requests have none)
        None if q.body is None else canonical_json(q.body),
        json_text(dict(q.headers)) if q.headers else None,
        storable_text(q.as_of_bucket),
        storable_text(q.cache_tag),
        q.cache_mode.value,
        q.ttl_seconds,
        ts(q.created_at),
        served_from,
        sent,
    )


def response_row(q: Request, r: Response) -> tuple[Any, ...]:
    return (
        r.id,
        r.request_id,
        bytes.fromhex(r.request_hash),
        r.session_id,
        storable_text(q.source),
        storable_text(q.kind),
        r.status.value,
        r.checksum,
        r.size_bytes,
        ts(r.fetched_at),
        r.cache_mode.value,
        r.ttl_seconds,
        storable_text(r.as_of_bucket),
        storable_text(r.cache_tag),
        r.attempts,
        r.attempt,
        r.sequence,
        r.transport_status,
        storable_text(r.content_type),
        storable_text(r.encoding),
        storable_text(r.url),
        r.elapsed_ms,
        json_text(dict(r.headers)) if r.headers is not None else None,
        json_text(dict(r.adapter_meta)) if r.adapter_meta is not None else None,
        storable_text(r.error),
        r.revalidated_from,
        r.wait_ms,
        json_text(dict(r.vary)) if r.vary is not None else None,
    )


_STATUSES: Final = {s.value: s for s in ResponseStatus}
_CACHE_MODES: Final = {m.value: m for m in CacheMode}


def response_from_row(r: Sequence[Any]) -> Response:
    # Positional, in Response's field order (the cache-hit path builds one per hit; keywords and
    # Enum(value) calls cost twice as much). tests/store/test_store.py round-trips every field.
    return make_response(
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
        r[26],  # wait_ms
        json.loads(r[27]) if r[27] is not None else None,  # vary
    )
