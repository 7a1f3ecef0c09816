"""Builders for the contract suite: sessions, requests, responses and recordings made through the
protocols only, plus the few kinds of damage a test cannot do through them (skipped for backends
whose objects a test cannot reach)."""

from __future__ import annotations

import hashlib
import os
import re
import socket
import time
from collections.abc import AsyncIterable, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, TypeVar

import pytest

from mxm_dataio_async._models import (
    CacheMode,
    Request,
    Response,
    ResponseStatus,
    Session,
    new_id,
    new_session_id,
)
from mxm_dataio_async._request import build_request
from mxm_dataio_async._store._local import LocalPayloads
from mxm_dataio_async._store._protocols import (
    MetadataStore,
    PayloadStore,
    Recording,
    StagedPayload,
)

T = TypeVar("T")

#: The FakeClock's start: every timestamp of the suite is relative to it.
START: Final = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
#: The inline threshold the suite stages with (small, so the file tier is cheap to reach).
INLINE_THRESHOLD: Final = 1024


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


async def collect(items: AsyncIterable[T]) -> list[T]:
    return [x async for x in items]


def make_session(
    source: str = "src", *, at: datetime = START, id: str | None = None, **fields: Any
) -> Session:
    return Session(
        id=id if id is not None else new_session_id(),
        source=source,
        as_of=None,
        started_at=at,
        **fields,
    )


def make_request(
    session: Session,
    kind: str = "k",
    *,
    params: Mapping[str, Any] | None = None,
    id: str | None = None,
    **kw: Any,
) -> Request:
    req = build_request(
        session_id=session.id, source=session.source, kind=kind, params=params, **kw
    )
    if id is not None:
        req = replace(req, id=id)
    return req


def make_response(
    req: Request,
    *,
    at: datetime,
    payload: StagedPayload | None = None,
    checksum: str | None = None,
    size: int | None = None,
    status: ResponseStatus = ResponseStatus.OK,
    id: str | None = None,
    **kw: Any,
) -> Response:
    """A response to ``req`` naming ``payload`` (or a bare ``checksum``/``size``)."""
    fields: dict[str, Any] = {
        "id": id if id is not None else new_id(),
        "request_id": req.id,
        "request_hash": req.hash,
        "session_id": req.session_id,
        "status": status,
        "checksum": payload.checksum if payload is not None else checksum,
        "size_bytes": payload.size if payload is not None else (size or 0),
        "fetched_at": at,
        "cache_mode": CacheMode.DEFAULT,
        "ttl_seconds": None,
        "as_of_bucket": req.as_of_bucket,
        "cache_tag": None,
    }
    fields.update(kw)
    return Response(**fields)


async def stage(
    payloads: PayloadStore, data: bytes, *, threshold: int = INLINE_THRESHOLD
) -> StagedPayload:
    """What ``Store.stage`` does for bytes: inline up to ``threshold``, else durable first."""
    digest = sha(data)
    if len(data) <= threshold:
        return StagedPayload(digest, len(data), "inline", data)
    await payloads.put(digest, data)
    return StagedPayload(digest, len(data), "file", None)


async def record(
    metadata: MetadataStore,
    payloads: PayloadStore,
    req: Request,
    data: bytes | None,
    *,
    at: datetime,
    status: ResponseStatus = ResponseStatus.OK,
    sent: bytes | None = None,
    **kw: Any,
) -> Response:
    """Stage ``data`` (and ``sent``, the bytes a send() uploaded) and record one response."""
    staged = [] if data is None else [await stage(payloads, data)]
    sent_checksum = None
    if sent is not None:
        up = await stage(payloads, sent)
        staged.append(up)
        sent_checksum = up.checksum
    body = staged[0] if data is not None else None
    resp = make_response(req, at=at, payload=body, status=status, **kw)
    await metadata.record(Recording(req, [resp], staged, sent=sent_checksum))
    return resp


async def record_hit(metadata: MetadataStore, req: Request, served: Response) -> None:
    """Record a cache hit: ``req`` was served the stored response ``served``."""
    await metadata.record(Recording(req, served_from=served.id))


# -- damage a test cannot do through the protocols ------------------------------------------------
# Each helper reaches the backend's own storage: a local folder through the file system, an S3
# bucket through obstore. A backend neither of those reaches skips the test.


def _local(payloads: PayloadStore) -> LocalPayloads | None:
    return payloads if isinstance(payloads, LocalPayloads) else None


def _s3_put(payloads: PayloadStore, key: str, data: bytes) -> Path | None:
    """Put ``data`` at ``key`` (relative to an S3 payload store's prefix), behind its back."""
    if type(payloads).__name__ != "S3Payloads":
        return None
    import obstore

    s3: Any = payloads
    obstore.put(s3._store, key, data)
    return Path(s3._where(key))


async def overwrite_object(payloads: PayloadStore, digest: bytes, data: bytes) -> None:
    """Replace the stored bytes of ``digest`` (silent corruption)."""
    obj = await payloads.stat(digest)
    assert obj is not None, "nothing stored to corrupt"
    if _s3_put(payloads, getattr(payloads, "key_for", str)(digest), data) is not None:
        return
    path = Path(obj.location)
    if not path.is_absolute() or not path.is_file():
        pytest.skip(f"cannot corrupt objects at {obj.location!r} from a test")
    path.write_bytes(data)


def make_leftover(payloads: PayloadStore, data: bytes = b"half a payload", age: float = 0) -> Path:
    """A piece of a write whose process died, ``age`` seconds old."""
    local = _local(payloads)
    if local is None:
        if age:  # an object store stamps its own Last-Modified
            pytest.skip(f"cannot age an object in {type(payloads).__name__} from a test")
        host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:63] or "host"
        put = _s3_put(payloads, f"tmp/{host}/999999999-{new_id()}", data)  # a dead pid
        if put is None:
            pytest.skip(f"cannot leave an interrupted write in {type(payloads).__name__}")
        return put
    path = local.tmp / f"999999999-{new_id()}.part"  # no such pid: its writer is dead
    path.write_bytes(data)
    if age:
        t = time.time() - age
        os.utime(path, (t, t))
    return path


def make_stray(payloads: PayloadStore, data: bytes = b"stray") -> Path:
    """An object whose name is not a content address."""
    local = _local(payloads)
    if local is None:
        put = _s3_put(payloads, "00/00/not-a-digest.bin", data)
        if put is None:
            pytest.skip(f"cannot leave a stray object in {type(payloads).__name__}")
        return put
    path = local.dir / "00" / "00" / "not-a-digest.bin"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def pieces_left(payloads: PayloadStore) -> list[str]:
    """Every piece of an unfinished write, live writers' included (``leftovers`` skips those)."""
    if isinstance(payloads, LocalPayloads):
        return sorted(p.name for p in payloads.tmp.iterdir()) if payloads.tmp.is_dir() else []
    return []  # other backends: only what leftovers() reports (the tests check that too)
