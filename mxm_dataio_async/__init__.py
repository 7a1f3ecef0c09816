"""mxm-dataio-async: asyncio-native ingestion, caching and audit.

Every interaction with an external system is recorded as Session -> Request -> Response: the exact
payload bytes (content-addressed by sha256) and the metadata (SQLite), so any run can be audited
and replayed offline.
"""

from mxm_dataio_async._bulk import FetchOutcome
from mxm_dataio_async._exceptions import (
    AdapterNotFound,
    CacheMiss,
    CapabilityError,
    DataIOError,
    FetchError,
    IntegrityError,
    LeaseHeld,
    StoreClosedError,
    StoreError,
    TransientError,
    UsageError,
)
from mxm_dataio_async._limits import LimiterStatistics, RateLimit, SourceLimiter
from mxm_dataio_async._models import (
    USE_SESSION_DEFAULT,
    AdapterResult,
    CacheMode,
    Request,
    Response,
    ResponseStatus,
    Session,
    SessionStatus,
)
from mxm_dataio_async._redact import Redaction
from mxm_dataio_async._registry import (
    Registry,
    default_registry,
    list_registered,
    register,
    resolve_adapter,
    unregister,
)
from mxm_dataio_async._retry import RetryPolicy, disable_retry_waits
from mxm_dataio_async._session import AsyncSession
from mxm_dataio_async._store import Lease, Store
from mxm_dataio_async._store._bundle import ExportReport, ImportReport
from mxm_dataio_async._store._cleanup import GcReport, PruneReport
from mxm_dataio_async._store._stats import StoreStats
from mxm_dataio_async._store._verify import Problem, VerifyReport
from mxm_dataio_async.adapters.base import Fetcher, Revalidator, Sender, Streamer
from mxm_dataio_async.adapters.files import FileAdapter
from mxm_dataio_async.adapters.http import HttpAdapter
from mxm_dataio_async.adapters.mock import MockAdapter

__version__ = "0.1.0"

__all__ = [
    "AdapterNotFound",
    "AdapterResult",
    "AsyncSession",
    "CacheMiss",
    "CacheMode",
    "CapabilityError",
    "DataIOError",
    "ExportReport",
    "FetchError",
    "FetchOutcome",
    "Fetcher",
    "FileAdapter",
    "GcReport",
    "HttpAdapter",
    "ImportReport",
    "IntegrityError",
    "Lease",
    "LeaseHeld",
    "LimiterStatistics",
    "MockAdapter",
    "Problem",
    "PruneReport",
    "RateLimit",
    "Redaction",
    "Registry",
    "Request",
    "Response",
    "ResponseStatus",
    "RetryPolicy",
    "Revalidator",
    "Sender",
    "Session",
    "SessionStatus",
    "SourceLimiter",
    "Store",
    "StoreClosedError",
    "StoreError",
    "StoreStats",
    "Streamer",
    "TransientError",
    "USE_SESSION_DEFAULT",
    "UsageError",
    "VerifyReport",
    "default_registry",
    "disable_retry_waits",
    "list_registered",
    "register",
    "resolve_adapter",
    "unregister",
]
