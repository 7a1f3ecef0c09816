"""Showing the library's logs: a JSON-lines formatter and a one-call setup (the CLI's ``-v`` and
``--log-json``). The library itself only logs: its loggers (``mxm_dataio_async.*``) have a
``NullHandler`` and no level, so they are silent until the application configures logging."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, Final, TextIO

__all__ = ["JsonFormatter", "configure_logging"]

# What every LogRecord has: the rest of its attributes are the ``extra`` fields of the call.
_STANDARD: Final = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys() | {"message", "asctime"}
)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``time``, ``level``, ``logger``, ``message`` and every
    ``extra`` field (an event's ``source``, ``kind``, ``request_hash``, ``attempt``,
    ``status``, ``elapsed_ms``, ``decision``...)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, allow_nan=False, ensure_ascii=False)


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a record is emitted (a test runner swaps it)."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


def configure_logging(
    level: int | str = logging.INFO, *, json_lines: bool = False, stream: TextIO | None = None
) -> logging.Handler:
    """Show the ``mxm_dataio_async`` logs at ``level`` and above on ``stream`` (stderr), as text
    or as JSON lines; returns the handler (remove it from the ``mxm_dataio_async`` logger to
    stop). ``logging.DEBUG`` shows every cache decision and attempt, ``INFO`` retries and rate
    changes, ``WARNING`` cooldowns, breaker changes and stale answers."""
    handler = logging.StreamHandler(stream) if stream is not None else _Stderr()
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("mxm_dataio_async")
    logger.addHandler(handler)
    logger.setLevel(level)
    return handler
