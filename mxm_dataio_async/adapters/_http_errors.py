"""How HTTP outcomes are classified: the one place aiohttp exceptions become ours.

Retry may fix it -> ``TransientError`` (timeouts, connection errors, bodies cut short or corrupt,
429, 5xx except 501); anything else -> ``FetchError``. Messages carry the redacted URL only:
aiohttp's own texts for response and URL errors embed the raw URL, which may hold credentials.
Every error raised here carries ``url=`` (the redacted URL that failed or answered).

A response aiohttp's parser refuses (a garbage status line, too many or too large headers, a bad
chunk size, a body that does not decode) is a *protocol error*: aiohttp reports it as a
``ClientResponseError`` with status 400 although no status was ever received, so the parser's own
reason is reported instead, with ``transport_status`` ``None``.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Final

import aiohttp
from aiohttp.http_exceptions import ContentLengthError, HttpProcessingError, TransferEncodingError
from yarl import URL

from mxm_dataio_async._exceptions import DataIOError, FetchError, TransientError
from mxm_dataio_async._redact import REDACTED, Redaction

__all__ = [
    "CLIENT_ERRORS",
    "Where",
    "is_transient_status",
    "parse_retry_after",
    "parser_reason",
    "plain_headers",
    "protocol_error",
    "status_text",
    "translate",
]

# What aiohttp and the socket layer raise; anything else is a bug and propagates as is.
CLIENT_ERRORS: Final = (aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError)

_BYTES_LITERAL: Final = re.compile(r"""b(['"]).*?\1""", re.DOTALL)
_MAX_REASON: Final = 300
_URL_HEADERS: Final = frozenset({"location", "content-location"})


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
    """The redacted URL of one exchange, for messages and errors; computed only when needed.

    ``url`` is the URL as requested (``params`` are added the way aiohttp adds them) or, once
    there is a response, the URL that answered.
    """

    __slots__ = ("_params", "_redaction", "_text", "_url")

    def __init__(
        self,
        url: str | URL,
        redaction: Redaction,
        params: list[tuple[str, str]] | None = None,
    ) -> None:
        self._url = url
        self._params = params
        self._redaction = redaction
        self._text: str | None = None

    def __str__(self) -> str:
        if self._text is None:
            url = self._url
            if self._params:
                with contextlib.suppress(TypeError, ValueError):
                    url = URL(url).extend_query(self._params)
            self._text = self._redaction.url(str(url)) or "<no url>"
        return self._text

    @property
    def url(self) -> str:
        return str(self)


def parser_reason(exc: HttpProcessingError) -> str:
    """The parser's reason, on one line. Quoted raw bytes are kept only where they cannot be a
    header value (which may be a secret): the status line, a chunk-size line."""
    text = exc.message if isinstance(exc.message, str) else str(exc)
    keep = "status line" in text.lower() or "chunk" in text.lower()
    if not keep:
        text = _BYTES_LITERAL.sub("", text)
    text = " ".join(text.replace("^", " ").split()).rstrip(" .:")
    if text.startswith("Got more than") or "too long" in text.lower():
        text += " (a response line or header above max_line_size / max_field_size)"
    elif "too many headers" in text.lower():
        text += " (more than max_headers)"
    if not text:
        text = type(exc).__name__
    return text[:_MAX_REASON]


def _processing_cause(exc: BaseException) -> HttpProcessingError | None:
    cause = exc.__cause__
    return cause if isinstance(cause, HttpProcessingError) else None


def protocol_error(reason: str, where: Where, *, body: bool) -> DataIOError:
    """A response the parser refused: in its head, final; in its body, worth a retry (a body that
    breaks off corrupt is what a flaky hop produces)."""
    if body:
        return TransientError(
            f"protocol error in the response body from {where}: {reason}", url=where.url
        )
    return FetchError(f"protocol error from {where}: {reason}", url=where.url)


def translate(exc: BaseException, where: Where) -> DataIOError:
    """aiohttp / socket exception -> ours (cf. httpx's map_httpcore_exceptions)."""
    if isinstance(exc, DataIOError):
        return exc
    url = where.url
    if isinstance(exc, aiohttp.ClientSSLError | aiohttp.ServerFingerprintMismatch):
        return FetchError(f"TLS failure for {where}: {type(exc).__name__}: {exc}", url=url)
    if isinstance(exc, asyncio.TimeoutError):
        return TransientError(f"timed out waiting for {where} ({type(exc).__name__})", url=url)
    if isinstance(exc, aiohttp.ClientPayloadError):
        cause = _processing_cause(exc)
        if cause is None:
            return TransientError(f"incomplete or corrupt response body from {where}", url=url)
        reason = parser_reason(cause)
        if isinstance(cause, ContentLengthError | TransferEncodingError):
            # A body shorter than its Content-Length, or a chunked body cut off mid-way.
            return TransientError(f"incomplete response body from {where}: {reason}", url=url)
        return protocol_error(reason, where, body=True)
    if isinstance(exc, aiohttp.ClientConnectorError):
        # No connection, so nothing was sent: safe to retry whatever the method.
        return TransientError(f"cannot connect to {where}: {exc}", url=url, not_sent=True)
    if isinstance(exc, aiohttp.ClientConnectionError | OSError):
        return TransientError(f"connection to {where} lost: {type(exc).__name__}: {exc}", url=url)
    if isinstance(exc, aiohttp.TooManyRedirects):
        return FetchError(f"too many redirects fetching {where}", url=url)
    if isinstance(exc, aiohttp.ClientResponseError):
        cause = _processing_cause(exc)
        if cause is not None:  # the parser refused the response: no status was received
            reason = parser_reason(cause)
            # A bad chunk that came in the head's packet is still a body error: classified alike
            # whether it arrives with the head or after it.
            return protocol_error(reason, where, body="chunk" in reason.lower())
        return FetchError(f"bad response from {where}: {exc.message}", url=url)
    if isinstance(exc, aiohttp.InvalidURL | aiohttp.NonHttpUrlClientError):
        return FetchError(f"invalid URL {where}", url=url)
    if isinstance(exc, ValueError):
        return FetchError(f"invalid request for {where}: {exc}", url=url)
    return FetchError(f"HTTP client error for {where}: {type(exc).__name__}", url=url)


def plain_headers(raw: Mapping[str, str], redaction: Redaction) -> dict[str, str]:
    """A plain dict: repeated headers joined with ", ", secrets replaced (the URL in a
    ``Location`` or ``Content-Location`` too: a redirect may carry a token on). Names are plain
    ``str``: aiohttp's are ``istr``, which orjson refuses as keys (the JSON columns then took the
    standard library's slower encoder, ~5 us a miss)."""
    out: dict[str, str] = {}
    first: dict[str, str] = {}
    secret = redaction.headers
    for key, value in raw.items():
        lkey = key.lower()
        if lkey in secret:
            value = REDACTED
        elif lkey in _URL_HEADERS:
            value = redaction.url(value) or value
        name = first.get(lkey)
        if name is None:
            first[lkey] = key = str(key)
            out[key] = value
        elif value != REDACTED or out[name] != REDACTED:
            out[name] = f"{out[name]}, {value}"
    return out
