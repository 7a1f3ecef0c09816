"""Watching a running ingestion: events and hooks, logs, statistics (OpenTelemetry: the ``otel``
extra, :mod:`mxm_dataio_async.otel`).

- **Hooks**: any callable taking an event, registered on the registry (``registry.add_hook(f)``,
  every session created on it afterwards) or on one session (``AsyncSession(..., hooks=[f])``).
  Events are frozen, slotted values: :class:`FetchStarted`, :class:`CacheDecided`,
  :class:`AttemptStarted`, :class:`AttemptFinished`, :class:`RetryScheduled`,
  :class:`CooldownStarted`, :class:`RateAdjusted`, :class:`BreakerStateChanged`,
  :class:`ResponseRecorded`, :class:`StaleServed`, :class:`FetchFinished`.
- **Logs**: the same events on the stdlib loggers ``mxm_dataio_async.fetch``, ``.recorder``,
  ``.limits`` and ``.breaker``, each field an ``extra`` attribute of the record; silent until
  configured (:func:`configure_logging`, or the CLI's ``-v`` / ``--log-json``), and nothing is
  formatted while they are off.
- **Statistics**: ``session.statistics()`` returns a :class:`SourceStatistics`; a source's
  circuit breaker is in :class:`BreakerState`.

```python
import logging
from mxm_dataio_async import telemetry

telemetry.configure_logging(logging.INFO, json_lines=True)   # retries, breakers, stale answers
registry.add_hook(lambda e: print(e) if isinstance(e, telemetry.RetryScheduled) else None)
```
"""

from __future__ import annotations

from mxm_dataio_async._breaker import BreakerState
from mxm_dataio_async._events import (
    AttemptFinished,
    AttemptStarted,
    BreakerStateChanged,
    CacheDecided,
    CooldownStarted,
    Event,
    FetchFinished,
    FetchStarted,
    Hook,
    RateAdjusted,
    ResponseRecorded,
    RetryScheduled,
    StaleServed,
)
from mxm_dataio_async._logging import JsonFormatter, configure_logging
from mxm_dataio_async._public import claim as _claim
from mxm_dataio_async._statistics import SourceStatistics

__all__ = [
    "AttemptFinished",
    "AttemptStarted",
    "BreakerState",
    "BreakerStateChanged",
    "CacheDecided",
    "CooldownStarted",
    "Event",
    "FetchFinished",
    "FetchStarted",
    "Hook",
    "JsonFormatter",
    "RateAdjusted",
    "ResponseRecorded",
    "RetryScheduled",
    "SourceStatistics",
    "StaleServed",
    "configure_logging",
]


_claim(__name__, __all__, globals())
