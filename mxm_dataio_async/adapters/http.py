"""HttpAdapter: fetch, send and server-sent events over aiohttp.

Every aiohttp (and socket) exception is classified in one function, :func:`translate`: what a
retry may fix becomes ``TransientError``, the rest ``FetchError``; none escapes raw. Every read of
a body is bounded (:mod:`._http_body`), so no attempt outlives its timeouts.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping
from typing import Any, Final

import aiohttp
import anyio
from multidict import CIMultiDictProxy
from yarl import URL

from mxm_dataio_async._exceptions import DataIOError, FetchError, TransientError
from mxm_dataio_async._malloc import settle_malloc
from mxm_dataio_async._models import AdapterResult, Request, Response, make_adapter_result
from mxm_dataio_async._redact import Redaction
from mxm_dataio_async.adapters._deadlines import Deadlines
from mxm_dataio_async.adapters._http_body import Body, BodyStream, past, past_deadline
from mxm_dataio_async.adapters._http_errors import (
    CLIENT_ERRORS,
    Where,
    is_transient_status,
    parse_retry_after,
    plain_headers,
    status_text,
    translate,
)
from mxm_dataio_async.adapters._http_parts import (
    ClientCert,
    SSLOption,
    check_proxy,
    header,
    header_limits,
    make_redaction,
    make_ssl,
    make_timeout,
    merge_headers,
    min_total,
    names_in,
    query,
)
from mxm_dataio_async.adapters._sse import SSEDecoder, SSEError

__all__ = ["DEFAULT_STREAM_THRESHOLD", "DEFAULT_TOTAL_TIMEOUT", "HttpAdapter", "parse_retry_after"]

DEFAULT_STREAM_THRESHOLD: Final = 1 << 20  # 1 MiB
DEFAULT_TOTAL_TIMEOUT: Final = 300.0  # seconds: one attempt, from sending to the end of the body
_DEFAULT_CHUNK_SIZE: Final = 1 << 18  # 256 KiB, aiohttp's own read buffer size
_ERROR_BODY: Final = 1 << 16  # what a retried error response's body contributes to its error

Sleep = Callable[[float], Awaitable[None]]


class HttpAdapter:
    """Fetcher, Sender, Revalidator and Streamer (server-sent events) over one aiohttp session.

    ``base_url``: relative endpoints are joined to it by plain concatenation with exactly one
    ``/`` between (``"http://h/api"`` + ``"v1/x"`` or ``"/v1/x"`` -> ``"http://h/api/v1/x"``; the
    base path is kept, unlike ``urljoin``); an endpoint with a scheme (``http://``/``https://``) is
    used as is; no endpoint means ``base_url`` itself.

    Query string from ``request.params``, in their order: lists become repeated keys, ``True`` /
    ``False`` become ``"true"`` / ``"false"``, numbers ``str()``, ``None`` (also inside lists) is
    left out; nested objects are refused. They extend any query already in the endpoint.
    ``request.body`` (when not ``None``) is sent as compact UTF-8 JSON with
    ``Content-Type: application/json`` unless the request sets one. ``request.headers`` override
    the adapter's ``headers``. Cookies are never kept between requests (send a ``Cookie`` header).

    Outcomes: 2xx is a normal result. 429 and 5xx except 501, connection errors, timeouts and a
    body cut short or corrupt (shorter than its Content-Length, a reset mid-body, a bad chunk)
    raise ``TransientError`` with ``url`` (the URL that answered or failed); for 429/5xx also
    ``retry_after`` (from ``Retry-After``), ``headers`` and ``body`` (its first 64 KiB). Other
    statuses (4xx, 501, an unfollowed 3xx) are final: the result carries the body and
    ``error="HTTP 404 Not Found"``, which the session records and turns into ``FetchError``. A
    response head the parser refuses (garbage status line, too many or too large headers) is a
    final ``FetchError("protocol error ...: <the parser's reason>")`` with ``transport_status``
    ``None``: no status was received. Every ``FetchError`` the adapter raises carries ``url``.

    Stored bytes are the *decoded* body: aiohttp undoes ``Content-Encoding`` (gzip, deflate, br),
    and ``adapter_meta["content_encoding"]`` records the header that was on the wire (or ``None``).
    Bodies of at most ``stream_threshold`` bytes come back as ``bytes``; larger ones, or ones whose
    decoded size is not known up front and turns out larger, as an async iterator of chunks that
    owns the connection (iterate it to the end or ``aclose()`` it). ``max_body`` (bytes, decoded)
    turns a larger body into ``FetchError`` (a ``HEAD`` answer, which has none, is never refused).

    ``adapter_meta`` also holds ``request_headers`` (the headers actually sent, aiohttp's own
    ``User-Agent``, ``Accept-Encoding``, ``Host`` included) and, when redirects were followed,
    ``redirects``: one ``{"status", "url", "location", "headers"}`` per hop, in order.
    ``elapsed_ms`` is the adapter's own time, from sending the request to the end of the body;
    ``None`` for a streamed body, whose end comes after the result is returned.

    ``timeout``: a number bounds each network wait (connecting, every read); pass an
    ``aiohttp.ClientTimeout`` for anything else. ``total_timeout`` (seconds, default 300, ``None``
    for none) bounds each attempt from sending the request to the end of its body, a streamed body
    included, so raise it for very large downloads. Secrets (``redact`` header names or a
    ``Redaction``, ``redact_params`` query names, URL credentials) are replaced in every URL,
    header and message the adapter returns; ``redaction`` tells the session the same names.

    TLS: ``ssl`` is ``None`` (verify with the default CAs), ``False`` (no verification), the path
    of a CA bundle (a private CA) or an ``ssl.SSLContext``; ``client_cert`` a PEM file with
    certificate and key, or a ``(certificate, key)`` pair of files (not with an ``SSLContext``:
    load it into the context). ``proxy``: an ``http://`` proxy URL (credentials in it are used);
    ``trust_env=True`` lets aiohttp take proxies from ``HTTP_PROXY`` / ``HTTPS_PROXY`` /
    ``NO_PROXY`` and credentials from ``~/.netrc`` (off by default: what is sent should not depend
    on the environment). Response heads are limited by ``max_line_size`` (the status line),
    ``max_field_size`` (one header; 64 KiB, as Python's ``http.client``) and ``max_headers``.

    Server-sent events (``stream()``): see :meth:`stream`. ``max_reconnects``, ``reconnect_delay``
    (seconds, until the server sends ``retry:``) and ``sleep`` (an injection point for tests)
    govern reconnection.

    >>> adapter = HttpAdapter("https://api.example.com", headers={"Authorization": "Bearer ..."})
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float | aiohttp.ClientTimeout = 30.0,
        total_timeout: float | None = DEFAULT_TOTAL_TIMEOUT,
        redact: Redaction | Iterable[str] | None = None,
        redact_params: Iterable[str] = (),
        max_body: int | None = None,
        connector_limit: int = 100,
        stream_threshold: int = DEFAULT_STREAM_THRESHOLD,
        chunk_size: int = _DEFAULT_CHUNK_SIZE,
        max_reconnects: int = 5,
        reconnect_delay: float = 1.0,
        ssl: SSLOption = None,
        client_cert: ClientCert = None,
        proxy: str | None = None,
        trust_env: bool = False,
        max_line_size: int = 8190,
        max_field_size: int = 1 << 16,
        max_headers: int = 128,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        if base_url is not None:
            if not base_url.startswith(("http://", "https://")):
                raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
            if "?" in base_url or "#" in base_url:
                raise ValueError("base_url must not carry a query or fragment; use request params")
            base_url = base_url.rstrip("/")
        for name, value in (
            ("max_body", max_body),
            ("connector_limit", connector_limit),
            ("stream_threshold", stream_threshold),
            ("chunk_size", chunk_size),
            ("max_reconnects", max_reconnects),
        ):
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or value < 0
            ):
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if chunk_size < 1:
            raise ValueError("chunk_size must be at least 1")
        if not reconnect_delay >= 0:
            raise ValueError(f"reconnect_delay must be >= 0 seconds, got {reconnect_delay!r}")
        if total_timeout is not None and (
            isinstance(total_timeout, bool)
            or not isinstance(total_timeout, int | float)
            or not total_timeout > 0
        ):
            raise ValueError(f"total_timeout must be > 0 seconds or None, got {total_timeout!r}")
        self.base_url = base_url
        self.headers: dict[str, str] = dict(headers or {})
        self.timeout = make_timeout(timeout)
        self.total_timeout = None if total_timeout is None else float(total_timeout)
        # The attempt's limit: total_timeout, or the ClientTimeout's own total if that is less.
        self._total = min_total(self.timeout.total, self.total_timeout)
        self.redaction: Redaction = make_redaction(redact, redact_params)
        self.max_body = max_body
        self.stream_threshold = stream_threshold
        self.chunk_size = chunk_size
        self.max_reconnects = max_reconnects
        self.reconnect_delay = float(reconnect_delay)
        self.proxy = check_proxy(proxy)
        self.trust_env = bool(trust_env)
        self._ssl = make_ssl(ssl, client_cert)
        self._limits = header_limits(
            max_line_size=max_line_size, max_field_size=max_field_size, max_headers=max_headers
        )
        self._connector_limit = connector_limit
        self._sleep = sleep
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._deadlines_of: Deadlines | None = None
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("open" if self._session else "unopened")
        return f"HttpAdapter(base_url={self.redaction.url(self.base_url)!r}, {state})"

    async def __aenter__(self) -> HttpAdapter:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- lifecycle -------------------------------------------------------------------------------

    def _client(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        session = self._session
        if session is not None and self._loop is loop:
            return session
        if self._closed:
            raise DataIOError("this HttpAdapter is closed; create a new one")
        if session is not None:
            raise DataIOError(
                "this HttpAdapter was first used in another event loop; an aiohttp session "
                "belongs to one loop, so create one adapter per loop (and aclose() it there)"
            )
        settle_malloc()  # socket reads from malloc's heap, not an mmap each (_malloc.py)
        # Created here, not in __init__: aiohttp binds the session to the running loop.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self._connector_limit, ssl=self._ssl),
            timeout=self.timeout,
            auto_decompress=True,
            cookie_jar=aiohttp.DummyCookieJar(),  # no hidden state between recorded requests
            read_bufsize=self.chunk_size,
            trust_env=self.trust_env,
            **self._limits,
        )
        # aiohttp silently repeats an idempotent request once when a reused keep-alive connection
        # turns out closed. That is an upstream attempt nobody records and no limiter counts: turn
        # it off (as aiohttp's own test client does) and let our retry policy, which records every
        # attempt, decide. The attribute is private; without it the behaviour is unchanged.
        if hasattr(self._session, "_retry_connection"):
            self._session._retry_connection = False
        self._loop = loop
        return self._session

    @property
    def _deadlines(self) -> Deadlines:
        """The deadlines of this adapter's attempts in flight (on its loop: see _client)."""
        deadlines = self._deadlines_of
        if deadlines is None:
            deadlines = self._deadlines_of = Deadlines(asyncio.get_running_loop())
        return deadlines

    async def aclose(self) -> None:
        """Close the connection pool. Safe to call twice; the adapter cannot be used afterwards."""
        self._closed = True
        session, self._session = self._session, None
        if session is not None and not session.closed:
            with anyio.CancelScope(shield=True):
                await session.close()

    @property
    def closed(self) -> bool:
        return self._closed

    # -- request mapping -------------------------------------------------------------------------

    def url_for(self, request: Request) -> str:
        """The URL ``request`` goes to, before its query parameters are added."""
        endpoint = request.endpoint
        if endpoint and endpoint.startswith(("http://", "https://")):
            return endpoint
        if self.base_url is None:
            raise FetchError(
                f"endpoint {endpoint!r} is not an absolute http(s) URL and this HttpAdapter "
                "has no base_url",
                request=request,
            )
        if not endpoint:
            return self.base_url
        return f"{self.base_url}/{endpoint.lstrip('/')}"

    async def _open(
        self,
        request: Request,
        *,
        payload: bytes | None,
        deadline: float | None,
        extra_headers: Mapping[str, str] | None = None,
        client_timeout: aiohttp.ClientTimeout | None = None,
    ) -> tuple[aiohttp.ClientResponse, Where]:
        """Send ``request``; the response with its head read, and where it came from."""
        url = self.url_for(request)
        headers = merge_headers(self.headers, request.headers, extra_headers)
        data = payload
        if data is None and request.body is not None:
            data = json.dumps(request.body, separators=(",", ":"), ensure_ascii=False).encode()
            if header(headers, "content-type") is None:
                headers["Content-Type"] = "application/json"
        try:
            params = query(request.params) if request.params else None
        except FetchError as exc:
            exc.url = self.redaction.url(url)
            raise
        where = Where(url, self.redaction, params)
        client = self._client()
        # The attempt's deadline bounds sending and the head here (one timer for all attempts in
        # flight, _deadlines.py), and each body read in Body.
        watch = None if deadline is None else self._deadlines.watch(deadline)
        try:
            resp = await client.request(
                request.method,
                url,
                params=params,
                headers=headers,
                data=data,
                proxy=self.proxy,
                timeout=client_timeout if client_timeout is not None else self.timeout,
            )
        except CLIENT_ERRORS as exc:
            if isinstance(exc, asyncio.TimeoutError) and past(deadline):
                raise past_deadline(where, self._total) from exc
            raise translate(exc, where) from exc
        except asyncio.CancelledError as exc:
            if watch is not None and watch.timed_out(exc):
                raise past_deadline(where, self._total) from None
            raise
        finally:
            if watch is not None:
                self._deadlines.forget(watch)
        return resp, Where(resp.url, self.redaction)

    # -- capabilities ----------------------------------------------------------------------------

    async def fetch(self, request: Request) -> AdapterResult:
        """Perform ``request`` (method, URL, params, JSON body, headers) and classify the answer."""
        return await self._exchange(request, payload=None)

    async def send(self, request: Request, payload: bytes) -> AdapterResult:
        """Send ``payload`` as the body, byte for byte, with ``request.method``; returns the ack."""
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise TypeError(f"payload must be bytes, not {type(payload).__name__}")
        return await self._exchange(request, payload=bytes(payload))

    async def revalidate(self, request: Request, cached: Response) -> AdapterResult:
        """Conditional fetch: ``If-None-Match`` / ``If-Modified-Since`` from the stored headers.

        A 304 gives ``AdapterResult(data=b"", not_modified=True, transport_status=304, ...)``;
        anything else is handled as by :meth:`fetch`, which is also what happens when the stored
        response has neither an ETag nor a Last-Modified.
        """
        conditional: dict[str, str] = {}
        etag = header(cached.headers, "ETag")
        if etag:
            conditional["If-None-Match"] = etag
        last_modified = header(cached.headers, "Last-Modified")
        if last_modified:
            conditional["If-Modified-Since"] = last_modified
        return await self._exchange(
            request, payload=None, extra_headers=conditional, conditional=bool(conditional)
        )

    async def _exchange(
        self,
        request: Request,
        *,
        payload: bytes | None,
        extra_headers: Mapping[str, str] | None = None,
        conditional: bool = False,
    ) -> AdapterResult:
        started = time.perf_counter()
        total = self._total
        deadline = None if total is None else time.monotonic() + total
        resp, where = await self._open(
            request, payload=payload, extra_headers=extra_headers, deadline=deadline
        )
        try:
            body = Body(
                resp, where, sock_read=self.timeout.sock_read, deadline=deadline, total=total
            )
            status = resp.status
            if is_transient_status(status):
                raise await self._transient(resp, body, f"{status_text(resp)} from {where}")
            data: bytes | BodyStream
            if status in (204, 304) or resp.method == "HEAD":
                resp.release()  # no body, whatever Content-Length says
                data = b""
            else:
                data = await body.collect(
                    max_body=self.max_body,
                    threshold=self.stream_threshold,
                    chunk_size=self.chunk_size,
                )
        except BaseException:
            resp.close()
            raise
        if status == 304 and conditional:
            return self._result(resp, data, started, not_modified=True)
        error = None if 200 <= status <= 299 else status_text(resp)
        return self._result(resp, data, started, error=error)

    async def _transient(
        self, resp: aiohttp.ClientResponse, body: Body, text: str
    ) -> TransientError:
        """The error for a 429/5xx: what the upstream answered, with the start of its body (read
        within the limits; the connection is kept when the body ended there)."""
        return TransientError(
            text,
            retry_after=parse_retry_after(resp.headers.get("Retry-After")),
            transport_status=resp.status,
            url=body.where.url,
            headers=self._response_headers(resp.headers),
            body=await body.head(_ERROR_BODY),
        )

    def _result(
        self,
        resp: aiohttp.ClientResponse,
        data: bytes | BodyStream,
        started: float,
        *,
        not_modified: bool = False,
        error: str | None = None,
    ) -> AdapterResult:
        raw = resp.headers
        meta: dict[str, Any] = {
            "content_encoding": raw.get("Content-Encoding"),
            "request_headers": self._response_headers(resp.request_info.headers),
        }
        if resp.history:
            meta["redirects"] = self._hops(resp)
        # Positional, in AdapterResult's field order (every answer makes one).
        return make_adapter_result(
            data,
            resp.content_type if "Content-Type" in raw else None,  # content_type
            resp.charset,  # encoding
            resp.status,  # transport_status
            self._public_url(resp.url),  # url
            None if isinstance(data, BodyStream) else (time.perf_counter() - started) * 1000.0,
            self._response_headers(raw),  # headers
            meta,  # adapter_meta
            not_modified,
            error,
        )

    def _hops(self, resp: aiohttp.ClientResponse) -> list[dict[str, Any]]:
        """The redirects followed, as ``adapter_meta["redirects"]`` holds them."""
        return [
            {
                "status": hop.status,
                "url": self._public_url(hop.url),
                "location": self.redaction.url(hop.headers.get("Location", "")) or "",
                "headers": self._response_headers(hop.headers),
            }
            for hop in resp.history
        ]

    def _public_url(self, url: URL) -> str:
        """``url`` as text, redacted; the common case (no credentials or secret params) is cheap."""
        text = str(url)
        if url.raw_user is None:
            query = url.raw_query_string.lower()
            # Over-approximates "has a secret param" (escaped names take the slow path too).
            if not query or ("%" not in query and not names_in(self.redaction.params, query)):
                return text
        return self.redaction.url(text) or text

    def _response_headers(self, raw: CIMultiDictProxy[str]) -> dict[str, str]:
        """A plain dict: repeated headers joined with ", ", secrets replaced."""
        return plain_headers(raw, self.redaction)

    # -- server-sent events ----------------------------------------------------------------------

    async def stream(self, request: Request) -> AsyncGenerator[AdapterResult, None]:
        """Server-sent events from ``request``: one ``AdapterResult`` per event.

        Each result holds the event's data as UTF-8 bytes, ``content_type="text/event-stream"``
        and ``adapter_meta={"event": <type, "message" by default>, "id": <last event id or None>}``.

        Reconnection follows the EventSource model: when the connection drops or the server
        closes it, or a (re)connect fails transiently (connection error, timeout, a protocol
        error, 429, 5xx except 501), the adapter waits (the server's ``retry:`` hint, else
        ``reconnect_delay``, at least any ``Retry-After``) and reconnects with ``Last-Event-ID``.
        After ``max_reconnects`` consecutive attempts without receiving an event it raises
        ``TransientError``.

        Before each reconnect it yields a *drop*, not a message: ``AdapterResult(data=b"",
        error=<why it dropped>, adapter_meta={"reconnect": {"last_event_id": <the id it resumes
        from, or None>, "attempt": <n, counting consecutive reconnects from 1>}}, url=...)``, with
        the failed connection's ``transport_status`` and ``headers`` when it had any. A consumer
        tells drops from messages by ``error``: the session records a drop as an error row of the
        stream and does not hand it on.

        The stream ends cleanly when the server answers a (re)connect with **204 No Content**:
        so a finite stream is served by closing the connection after the last event and answering
        the reconnect (which carries ``Last-Event-ID``) with 204. Any other status, or a 200 that
        is not ``text/event-stream``, raises ``FetchError``.

        Each result also carries the connection's status, redacted URL and headers, and
        ``elapsed_ms`` from the (re)connect to the event. ``max_body`` bounds one event's size.
        Reads time out per ``timeout`` (``total_timeout`` does not apply to a stream).
        """
        last_id = header(request.headers, "Last-Event-ID") or ""
        delay = self.reconnect_delay
        failures = 0
        accept = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        # No total time limit for a stream; reads still time out per self.timeout.sock_read.
        timeout = aiohttp.ClientTimeout(
            total=None,
            connect=self.timeout.connect,
            sock_connect=self.timeout.sock_connect,
            sock_read=self.timeout.sock_read,
        )
        while True:
            extra = dict(accept)
            if last_id:
                extra["Last-Event-ID"] = last_id
            started = time.perf_counter()
            try:
                resp, where = await self._open(
                    request,
                    payload=None,
                    extra_headers=extra,
                    client_timeout=timeout,
                    deadline=None,
                )
                try:
                    body = Body(resp, where, sock_read=timeout.sock_read)
                    status = resp.status
                    if status == 204:
                        resp.release()
                        return
                    if is_transient_status(status):
                        text = f"{status_text(resp)} from event stream {where}"
                        raise await self._transient(resp, body, text)
                    if status != 200:
                        raise FetchError(
                            f"event stream {where} answered {status_text(resp)}",
                            transport_status=status,
                            url=where.url,
                        )
                    if resp.content_type != "text/event-stream":
                        raise FetchError(
                            f"event stream {where} answered with Content-Type "
                            f"{resp.content_type!r}, not 'text/event-stream'",
                            transport_status=status,
                            url=where.url,
                        )
                    url = self._public_url(resp.url)
                    headers = self._response_headers(resp.headers)
                    decoder = SSEDecoder(last_event_id=last_id, max_size=self.max_body)
                    while chunk := await body.read(0):
                        try:
                            events = decoder.feed(chunk)
                        except SSEError as exc:
                            raise FetchError(f"event stream {where}: {exc}", url=where.url) from exc
                        if decoder.retry is not None:
                            delay = decoder.retry / 1000.0
                        for event in events:
                            last_id = event.id
                            failures = 0
                            yield AdapterResult(
                                data=event.data.encode("utf-8"),
                                content_type="text/event-stream",
                                encoding="utf-8",
                                transport_status=status,
                                url=url,
                                elapsed_ms=(time.perf_counter() - started) * 1000.0,
                                headers=headers,
                                adapter_meta={"event": event.event, "id": event.id or None},
                            )
                        last_id = decoder.last_event_id
                    decoder.end()
                    raise TransientError(
                        f"event stream {where} closed by the server",
                        transport_status=status,
                        url=where.url,
                    )
                finally:
                    resp.close()
            except TransientError as exc:
                failures += 1
                if failures > self.max_reconnects:
                    raise TransientError(
                        f"{exc} (gave up after {self.max_reconnects} reconnects without an event)",
                        retry_after=exc.retry_after,
                        transport_status=exc.transport_status,
                        url=exc.url,
                        headers=exc.headers,
                        body=exc.body,
                    ) from exc
                wait = max(delay, exc.retry_after or 0.0)
                dropped = exc
            yield AdapterResult(
                data=b"",
                transport_status=dropped.transport_status,
                url=dropped.url,
                elapsed_ms=(time.perf_counter() - started) * 1000.0,
                headers=dropped.headers,
                adapter_meta={"reconnect": {"last_event_id": last_id or None, "attempt": failures}},
                error=str(dropped),
            )
            await self._sleep(wait)
