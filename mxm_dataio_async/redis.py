"""Many worker processes on many hosts, coordinated through one Redis (the ``redis`` extra:
``pip install 'mxm-dataio-async[redis]'``).

- :class:`RedisCoordination`: the connection, the key prefix that names a deployment, and what
  to do when Redis is unreachable (fail closed, or a local share of each rate).
- :class:`RedisRateGate`: a source's rate and cooldowns shared by every process (a GCRA in one
  Lua script on Redis' clock), the concurrency cap per process.
- :class:`RedisCoalescer`: concurrent identical requests on different processes make one
  upstream call; the others read the recorded response from the shared store.

``Registry(redis="redis://host:6379/0")`` (or ``redis=RedisCoordination(...)``) builds both for
you::

    redis = RedisCoordination("redis://10.0.0.5:6379/0", prefix="prices")
    async with dio.Store("postgresql://...") as store, dio.Registry(redis=redis) as registry:
        registry.register("yahoo", adapter, rate_limit=dio.RateLimit(100), max_concurrency=8)
        async with dio.AsyncSession("yahoo", store=store, registry=registry) as s:
            ...  # every process running this shares 100 calls/s and its in-flight requests

When Redis does not answer, gates and coalescers raise
:class:`~mxm_dataio_async.CoordinationError` unless ``on_unavailable="local"``.
"""

from __future__ import annotations

from mxm_dataio_async._public import claim as _claim
from mxm_dataio_async._redis import (
    RedisCoalescer,
    RedisCoordination,
    RedisRateGate,
    ResponseLookup,
)

__all__ = ["RedisCoalescer", "RedisCoordination", "RedisRateGate", "ResponseLookup"]


_claim(__name__, __all__, globals())
