"""Persistence: SQLite metadata (one writer, group commit) and tiered content-addressed payloads."""

from mxm_dataio_async._store._coordination import Lease
from mxm_dataio_async._store._payloads import StagedPayload
from mxm_dataio_async._store._schema import DB_NAME, DEFAULT_INLINE_THRESHOLD
from mxm_dataio_async._store._store import Store

__all__ = ["DB_NAME", "DEFAULT_INLINE_THRESHOLD", "Lease", "StagedPayload", "Store"]
