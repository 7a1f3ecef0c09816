"""Coordination of many worker processes through Redis (the ``redis`` extra): global per-source
rate gates and coalescing across processes. Public names: :mod:`mxm_dataio_async.redis`."""

from mxm_dataio_async._redis._client import RedisCoordination
from mxm_dataio_async._redis._coalesce import RedisCoalescer, ResponseLookup
from mxm_dataio_async._redis._gate import RedisRateGate

__all__ = ["RedisCoalescer", "RedisCoordination", "RedisRateGate", "ResponseLookup"]
