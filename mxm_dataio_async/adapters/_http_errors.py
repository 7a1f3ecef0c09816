"""How HTTP outcomes are classified: the one place aiohttp exceptions become ours.

Retry may fix it -> ``TransientError`` (timeouts, connection errors, bodies cut short, 429, 5xx
except 501); anything else -> ``FetchError``. Messages carry the redacted URL only: aiohttp's own
texts for response and URL errors embed the raw URL, which may hold credentials.
"""

from __future__ import annotations

import asyncio
import email.utils
from datetime import UTC, datetime
from typing import Final

import aiohttp

from mxm_dataio_async._exceptions import DataIOError, FetchError, TransientError
from mxm_dataio_async._redact import Redaction

__all__ = [
    "CLIENT_ERRORS",
    "Where",
    "is_transient_status",
    "parse_retry_after",
    "status_text",
    "translate",
]

# What aiohttp and the socket layer raise; anything else is a bug and propagates as is.
CLIENT_ERRORS: Final = (aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError)


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value: delta-seconds or an HTTP-date.

    A date in the past gives ``0.0``; anything unparsable gives ``None`` (the hint is ignored).

    >>> parse_retry_after("120")
    120.0
    """
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(int(value))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # an HTTP-date is always GMT
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def is_transient_status(status: int) -> bool:
    return status == 429 or (500 <= status <= 599 and status != 501)


def status_text(resp: aiohttp.ClientResponse) -> str:
    return f"HTTP {resp.status} {resp.reason}" if resp.reason else f"HTTP {resp.status}"


class Where:
    """The redacted URL for error messages, computed only when a message needs it."""

    __slots__ = ("_redaction", "_text", "_url")

    def __init__(self, url: str, redaction: Redaction) -> None:
        self._url = url
        self._redaction = redaction
        self._text: str | None = None

    def __str__(self) -> str:
        if self._text is None:
            self._text = self._redaction.url(self._url) or "<no url>"
        return self._text


def translate(exc: BaseException, where: Where) -> DataIOError:
    """aiohttp / socket exception -> ours (cf. httpx's map_httpcore_exceptions)."""
    if isinstance(exc, DataIOError):
        return exc
    if isinstance(exc, aiohttp.ClientSSLError | aiohttp.ServerFingerprintMismatch):
        return FetchError(f"TLS failure for {where}: {type(exc).__name__}: {exc}")
    if isinstance(exc, asyncio.TimeoutError):
        return TransientError(f"timed out waiting for {where} ({type(exc).__name__})")
    if isinstance(exc, aiohttp.ClientPayloadError):
        # Includes a body shorter than its Content-Length and a chunked body cut off mid-way.
        return TransientError(f"incomplete or corrupt response body from {where}: {exc}")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return TransientError(f"cannot connect to {where}: {exc}")
    if isinstance(exc, aiohttp.ClientConnectionError | OSError):
        return TransientError(f"connection to {where} lost: {type(exc).__name__}: {exc}")
    if isinstance(exc, aiohttp.TooManyRedirects):
        return FetchError(f"too many redirects fetching {where}")
    if isinstance(exc, aiohttp.ClientResponseError):
        return FetchError(f"bad response from {where}: HTTP {exc.status} {exc.message}")
    if isinstance(exc, aiohttp.InvalidURL | aiohttp.NonHttpUrlClientError):
        return FetchError(f"invalid URL {where}")
    if isinstance(exc, ValueError):
        return FetchError(f"invalid request for {where}: {exc}")
    return FetchError(f"HTTP client error for {where}: {type(exc).__name__}")
