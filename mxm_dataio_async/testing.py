"""Helpers for testing code that records: a clock that only moves when told to.

Pass a :class:`FakeClock` as ``clock=`` to ``Registry``, ``Store`` or ``AsyncSession`` and a
30-second Retry-After, a cache TTL or a lease's expiry pass in no time while every timestamp still
shows them. :class:`Clock` is the protocol any clock implements (also at the package root).
For retry waits alone, ``mxm_dataio_async.disable_retry_waits()`` is simpler.
"""

from __future__ import annotations

from mxm_dataio_async._clock import Clock, FakeClock
from mxm_dataio_async._public import claim as _claim

__all__ = ["Clock", "FakeClock"]


_claim(__name__, __all__, globals())
