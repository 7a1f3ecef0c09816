"""The store's seams and maintenance: for backends, operators and monitoring, not for recording.

- The facade, :class:`Store` (also at the package root), and the two protocols behind it:
  :class:`MetadataStore` (rows) and :class:`PayloadStore` (large bytes), with the value types
  they exchange and their first implementations, :class:`SqliteMetadata` and
  :class:`LocalPayloads`.
- What the maintenance methods return: :class:`VerifyReport` (with its :class:`Problem` list),
  :class:`GcReport`, :class:`PruneReport`, :class:`StoreStats`, :class:`ExportReport`,
  :class:`ImportReport`; and the :class:`Lease` a job holds on a store.
- Runs shared by many workers: the :class:`WorkQueue` protocol (``Store.work``, PostgreSQL) and
  what it hands out: :class:`RunInfo`, :class:`Claim`, :class:`Fence`, :class:`Mark`,
  :class:`RunStatus`, :class:`WorkerStatus`.
- Admission control: the :class:`RateGate` protocol (what ``Registry.register(gate=...)``
  takes), the in-process :class:`SourceLimiter` and its :class:`LimiterStatistics` snapshot.
"""

from __future__ import annotations

from mxm_dataio_async._limits import LimiterStatistics, RateGate, SourceLimiter
from mxm_dataio_async._public import claim as _claim
from mxm_dataio_async._store._bundle import ExportReport, ImportReport
from mxm_dataio_async._store._cleanup import GcReport, PruneReport
from mxm_dataio_async._store._copy import CopyReport
from mxm_dataio_async._store._local import LocalPayloads
from mxm_dataio_async._store._protocols import (
    DanglingReference,
    Lease,
    MetadataStats,
    MetadataStore,
    PayloadRow,
    PayloadStore,
    PruneCounts,
    Recording,
    SourceCounts,
    StagedPayload,
    StoredObject,
)
from mxm_dataio_async._store._sqlite import SqliteMetadata
from mxm_dataio_async._store._stats import SourceStats, StoreStats
from mxm_dataio_async._store._store import DEFAULT_INLINE_THRESHOLD, Store
from mxm_dataio_async._store._verify import Problem, ProblemKind, VerifyReport
from mxm_dataio_async._store._work import (
    Claim,
    Fence,
    Mark,
    RunInfo,
    RunStatus,
    WorkerStatus,
    WorkQueue,
)

__all__ = [
    "Claim",
    "CopyReport",
    "DEFAULT_INLINE_THRESHOLD",
    "DanglingReference",
    "ExportReport",
    "Fence",
    "GcReport",
    "ImportReport",
    "Lease",
    "LimiterStatistics",
    "LocalPayloads",
    "Mark",
    "MetadataStats",
    "MetadataStore",
    "PayloadRow",
    "PayloadStore",
    "Problem",
    "ProblemKind",
    "PruneCounts",
    "PruneReport",
    "RateGate",
    "Recording",
    "RunInfo",
    "RunStatus",
    "SourceCounts",
    "SourceLimiter",
    "SourceStats",
    "SqliteMetadata",
    "StagedPayload",
    "Store",
    "StoreStats",
    "StoredObject",
    "VerifyReport",
    "WorkQueue",
    "WorkerStatus",
]


_claim(__name__, __all__, globals())
