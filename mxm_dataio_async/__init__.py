"""mxm-dataio-async: asyncio-native ingestion, caching and audit.

Every interaction with an external system is recorded as Session -> Request -> Response: the exact
payload bytes (content-addressed by sha256) and the metadata (SQLite), so any run can be audited
and replayed offline.

The root holds what making and reading recordings needs. The store's protocols, maintenance
reports, leases and rate-gate internals are in :mod:`mxm_dataio_async.store`; test helpers
(``FakeClock``) in :mod:`mxm_dataio_async.testing`; events, hooks, logging and statistics in
:mod:`mxm_dataio_async.telemetry`.
"""

import logging as _logging
import typing as _typing
import warnings as _warnings
from importlib import import_module as _import_module
from importlib.metadata import PackageNotFoundError as _PackageNotFoundError
from importlib.metadata import version as _version

from mxm_dataio_async._breaker import CircuitBreaker
from mxm_dataio_async._bulk import FetchOutcome
from mxm_dataio_async._clock import Clock
from mxm_dataio_async._exceptions import (
    AdapterNotFound,
    CacheMiss,
    CapabilityError,
    CircuitOpen,
    CoordinationError,
    DataIOError,
    FetchError,
    IntegrityError,
    LeaseHeld,
    StoreClosedError,
    StoreError,
    TransientError,
    UsageError,
)
from mxm_dataio_async._identity import JSONValue
from mxm_dataio_async._limits import RateLimit
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
from mxm_dataio_async._public import claim as _claim
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
from mxm_dataio_async._store import Store
from mxm_dataio_async.adapters.base import Fetcher, Revalidator, Sender, Streamer
from mxm_dataio_async.adapters.files import FileAdapter
from mxm_dataio_async.adapters.http import HttpAdapter
from mxm_dataio_async.adapters.mock import MockAdapter

try:
    __version__ = _version("mxm-dataio-async")
except _PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "AdapterNotFound",
    "AdapterResult",
    "AsyncSession",
    "CacheMiss",
    "CacheMode",
    "CapabilityError",
    "CircuitBreaker",
    "CircuitOpen",
    "Clock",
    "CoordinationError",
    "DataIOError",
    "FetchError",
    "FetchOutcome",
    "Fetcher",
    "FileAdapter",
    "HttpAdapter",
    "IntegrityError",
    "JSONValue",
    "LeaseHeld",
    "MockAdapter",
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
    "Store",
    "StoreClosedError",
    "StoreError",
    "Streamer",
    "TransientError",
    "USE_SESSION_DEFAULT",
    "UsageError",
    "default_registry",
    "disable_retry_waits",
    "list_registered",
    "register",
    "resolve_adapter",
    "unregister",
]


_claim(__name__, __all__, globals(), root=True)

# Silent unless the application configures logging (no "No handlers" fallback to stderr).
_logging.getLogger(__name__).addHandler(_logging.NullHandler())

# Exported from the root in 0.1.0; now imported from their public module. Still served here,
# with a DeprecationWarning, for one release.
_MOVED = {
    "ExportReport": "mxm_dataio_async.store",
    "GcReport": "mxm_dataio_async.store",
    "ImportReport": "mxm_dataio_async.store",
    "Lease": "mxm_dataio_async.store",
    "LimiterStatistics": "mxm_dataio_async.store",
    "Problem": "mxm_dataio_async.store",
    "PruneReport": "mxm_dataio_async.store",
    "SourceLimiter": "mxm_dataio_async.store",
    "StoreStats": "mxm_dataio_async.store",
    "VerifyReport": "mxm_dataio_async.store",
}


def _moved_attribute(name: str) -> object:
    """The module ``__getattr__``: a moved name, with a DeprecationWarning naming its new home."""
    home = _MOVED.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    _warnings.warn(
        f"{__name__}.{name} is deprecated; import it from {home}",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(_import_module(home), name)


if _typing.TYPE_CHECKING:
    # Type checkers see the moved names with their real types (and no module ``__getattr__``, so a
    # misspelt name is still an error); at run time they resolve through ``__getattr__``.
    from mxm_dataio_async.store import ExportReport as ExportReport
    from mxm_dataio_async.store import GcReport as GcReport
    from mxm_dataio_async.store import ImportReport as ImportReport
    from mxm_dataio_async.store import Lease as Lease
    from mxm_dataio_async.store import LimiterStatistics as LimiterStatistics
    from mxm_dataio_async.store import Problem as Problem
    from mxm_dataio_async.store import PruneReport as PruneReport
    from mxm_dataio_async.store import SourceLimiter as SourceLimiter
    from mxm_dataio_async.store import StoreStats as StoreStats
    from mxm_dataio_async.store import VerifyReport as VerifyReport
else:
    __getattr__ = _moved_attribute
