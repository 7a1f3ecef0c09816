"""The parts of HttpAdapter that are not the exchange itself: request building (query strings,
header layers, redaction and timeout options) and the streamed response body."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping

import aiohttp

from mxm_dataio_async._exceptions import FetchError
from mxm_dataio_async._identity import JSONValue
from mxm_dataio_async._redact import Redaction
from mxm_dataio_async.adapters._http_errors import CLIENT_ERRORS, Where, translate

__all__ = [
    "BodyStream",
    "header",
    "make_redaction",
    "make_timeout",
    "merge_headers",
    "query",
]


def _query_value(key: str, value: JSONValue) -> str:
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return str(value)
    raise FetchError(
        f"query parameter {key!r} holds a {type(value).__name__}; a query string carries only "
        "scalars and lists of scalars (send structured data as the JSON body)"
    )


def query(params: Mapping[str, JSONValue]) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for key, value in params.items():
        if value is None:
            continue
        if isinstance(value, list):
            pairs.extend((key, _query_value(key, item)) for item in value if item is not None)
        else:
            pairs.append((key, _query_value(key, value)))
    return pairs


def header(headers: Mapping[str, str] | None, name: str) -> str | None:
    """Case-insensitive lookup in a plain mapping (stored response headers)."""
    if not headers:
        return None
    value = headers.get(name)
    if value is not None:
        return value
    lname = name.lower()
    for key, value in headers.items():
        if key.lower() == lname:
            return value
    return None


def merge_headers(*layers: Mapping[str, str] | None) -> dict[str, str]:
    """Later layers override earlier ones, matching names case-insensitively."""
    out: dict[str, str] = {}
    lower: dict[str, str] = {}
    for layer in layers:
        if not layer:
            continue
        for key, value in layer.items():
            previous = lower.get(key.lower())
            if previous is not None:
                del out[previous]
            lower[key.lower()] = key
            out[key] = value
    return out


def make_redaction(
    redact: Redaction | Iterable[str] | None, redact_params: Iterable[str]
) -> Redaction:
    params = [redact_params] if isinstance(redact_params, str) else list(redact_params)
    if redact is None:
        return Redaction.extend(params=params) if params else Redaction()
    if isinstance(redact, Redaction):
        return redact.merge(
            Redaction(headers=frozenset(), params=frozenset(p.lower() for p in params))
        )
    names = [redact] if isinstance(redact, str) else list(redact)
    return Redaction.extend(headers=names, params=params)


def make_timeout(timeout: float | aiohttp.ClientTimeout) -> aiohttp.ClientTimeout:
    if isinstance(timeout, aiohttp.ClientTimeout):
        return timeout
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise ValueError(
            f"timeout must be a positive number of seconds or a ClientTimeout, not {timeout!r}"
        )
    # Per network wait, like httpx: no total, so a large body takes as long as it needs while a
    # stalled connection still fails.
    return aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout)


class BodyStream:
    """A response body as an async iterator of chunks; it owns the aiohttp response.

    The response is released at the end of the body and closed by ``aclose()`` or any error, so a
    consumer that stops early (or never starts) frees the connection either way. A class rather
    than an async generator because a generator never started cannot run its ``finally``.
    """

    __slots__ = ("_chunk_size", "_max_body", "_prefix", "_received", "_resp", "_where")

    def __init__(
        self,
        resp: aiohttp.ClientResponse,
        *,
        prefix: Iterable[bytes] = (),
        received: int = 0,
        chunk_size: int,
        max_body: int | None,
        where: Where,
    ) -> None:
        self._resp: aiohttp.ClientResponse | None = resp
        self._prefix = deque(prefix)
        self._received = received
        self._chunk_size = chunk_size
        self._max_body = max_body
        self._where = where

    def __aiter__(self) -> BodyStream:
        return self

    async def __anext__(self) -> bytes:
        if self._prefix:
            return self._prefix.popleft()
        resp = self._resp
        if resp is None:
            raise StopAsyncIteration
        try:
            chunk = await resp.content.read(self._chunk_size)
        except BaseException as exc:
            self._close()
            if isinstance(exc, CLIENT_ERRORS):
                raise translate(exc, self._where) from exc
            raise
        if not chunk:
            self._resp = None
            resp.release()
            raise StopAsyncIteration
        self._received += len(chunk)
        if self._max_body is not None and self._received > self._max_body:
            self._close()
            raise FetchError(f"response body from {self._where} exceeds max_body={self._max_body}")
        return chunk

    async def aclose(self) -> None:
        """Stop early: drop the connection (its unread rest is useless)."""
        self._close()

    def _close(self) -> None:
        self._prefix.clear()
        resp, self._resp = self._resp, None
        if resp is not None:
            resp.close()

    @property
    def released(self) -> bool:
        """Whether the response has been let go (consumed, closed or failed)."""
        return self._resp is None
