"""Persistence behind two protocols: metadata (SQLite by default: one writer, group commit) and
content-addressed payloads (local files by default), composed by the ``Store`` facade."""

from mxm_dataio_async._store._local import LocalPayloads
from mxm_dataio_async._store._protocols import (
    Lease,
    MetadataStore,
    PayloadStore,
    Recording,
    StagedPayload,
)
from mxm_dataio_async._store._sqlite import DB_NAME, SqliteMetadata
from mxm_dataio_async._store._store import DEFAULT_INLINE_THRESHOLD, Store

__all__ = [
    "DB_NAME",
    "DEFAULT_INLINE_THRESHOLD",
    "Lease",
    "LocalPayloads",
    "MetadataStore",
    "PayloadStore",
    "Recording",
    "SqliteMetadata",
    "StagedPayload",
    "Store",
]
