"""Reading a response body within the attempt's time limits.

aiohttp stops a response's read timer when its parser fails mid-body (a bad chunk size, say), and
a read already waiting is then never woken; a later read raises a bare ``RuntimeError``. So here
every read has its own bound (the per-read timeout, and the attempt's deadline), a read waiting
when the connection closes on a parser failure is woken, and a failed read is explained by the
parser's reason when there is one.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections import deque
from collections.abc import Iterable

import aiohttp
from aiohttp.http_exceptions import HttpProcessingError

from mxm_dataio_async._exceptions import DataIOError, FetchError, TransientError
from mxm_dataio_async.adapters._http_errors import (
    CLIENT_ERRORS,
    Where,
    parser_reason,
    protocol_error,
    translate,
)

__all__ = ["Body", "BodyStream", "past", "past_deadline"]


# The protocols' "closed" futures this module asked aiohttp for; each gets one callback that
# retrieves its outcome, so that a connection lost with an error is never logged as unretrieved.
_RETRIEVED: weakref.WeakSet[asyncio.Future[None]] = weakref.WeakSet()


def _retrieve(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled():
        fut.exception()


def past(deadline: float | None) -> bool:
    """Whether ``deadline`` (``time.monotonic()``) has come (a timer may fire a hair early)."""
    return deadline is not None and time.monotonic() >= deadline - 1e-3


def past_deadline(where: Where, total: float | None) -> TransientError:
    return TransientError(
        f"timed out: the attempt on {where} passed its total_timeout of {total:g}s",
        url=where.url,
    )


class _ParserFailed(aiohttp.ClientPayloadError):
    """Set on a body whose connection closed because the parser refused what followed."""


class Body:
    """One response's body, read in bounded steps.

    ``sock_read``: seconds any one read may wait (``None``: no limit); ``deadline``: the
    ``time.monotonic()`` past which no read waits, the attempt's ``total_timeout`` seconds after it
    started (``None``: none). Every failure is ours (``TransientError`` / ``FetchError``).
    """

    __slots__ = (
        "_content",
        "_deadline",
        "_proto",
        "_resp",
        "_sock_read",
        "_total",
        "_waiting",
        "where",
    )

    def __init__(
        self,
        resp: aiohttp.ClientResponse,
        where: Where,
        *,
        sock_read: float | None,
        deadline: float | None = None,
        total: float | None = None,
    ) -> None:
        self._resp = resp
        self._content = resp.content
        conn = resp.connection
        self._proto = conn.protocol if conn is not None else None
        self._sock_read = sock_read
        self._deadline = deadline
        self._total = total
        self._waiting = False
        self.where = where
        self._watch()

    def _watch(self) -> None:
        """Wake a waiting read when the connection closes on a parser failure (best effort: on
        an aiohttp without ``protocol.closed`` the read still ends at its timeout)."""
        content = self._content
        if content.is_eof():  # all of the body is here: no read will wait
            return
        closed = getattr(self._proto, "closed", None)  # made on first access
        if not isinstance(closed, asyncio.Future) or closed.done():
            return
        self._hook(closed)

    def _hook(self, closed: asyncio.Future[None]) -> None:
        # Apart from _watch: the closures below are made only for a body that is still coming.
        content = self._content
        if closed not in _RETRIEVED:  # aiohttp made it for us: nobody else may look at it
            _RETRIEVED.add(closed)
            closed.add_done_callback(_retrieve)

        def woken(fut: asyncio.Future[None]) -> None:
            # Only a waiting read needs waking (its buffer is empty): data still buffered is read
            # first, and the read after it finds the connection closed and asks the parser why.
            failure = self.parser_failure() if self._waiting else None
            if failure is not None and content.exception() is None and not content.is_eof():
                exc = _ParserFailed(failure.message)
                exc.__cause__ = failure
                content.set_exception(exc)

        def unhook() -> None:  # a body read to its end needs no watch; the connection may live on
            closed.remove_done_callback(woken)

        closed.add_done_callback(woken)
        content.on_eof(unhook)

    def parser_failure(self) -> HttpProcessingError | None:
        """What aiohttp's parser refused on this connection, if it did."""
        proto = self._proto
        exc = proto.exception() if proto is not None else None
        return exc if isinstance(exc, HttpProcessingError) else None

    def _limit(self) -> tuple[float | None, bool]:
        """The longest the next read may wait, and whether it is the deadline that sets it."""
        limit = self._sock_read
        if self._deadline is None:
            return limit, False
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise self._past_deadline()
        if limit is None or left < limit:
            return left, True
        return limit, False

    def _past_deadline(self) -> TransientError:
        return past_deadline(self.where, self._total)

    async def read(self, n: int) -> bytes:
        """Up to ``n`` bytes (``n < 1``: whatever is buffered, at least one byte); ``b""`` at the
        end of the body."""
        content = self._content
        if content.is_eof():  # all of it is here: the read cannot wait (the common small body)
            try:
                return content.read_nowait(n if n > 0 else -1)
            except CLIENT_ERRORS as exc:
                raise self._failure(exc, False, False) from exc
        limit, by_deadline = self._limit()
        timer = asyncio.timeout(limit)
        self._waiting = True
        try:
            async with timer:
                if n > 0:
                    return await content.read(n)
                return await content.readany()
        except CLIENT_ERRORS as exc:
            raise self._failure(exc, timer.expired(), by_deadline) from exc
        except RuntimeError as exc:
            if type(exc) is not RuntimeError:  # RecursionError and the like: a bug, not I/O
                raise
            # aiohttp's "Connection closed.": the connection went under a read it never woke.
            raise self._failure(exc, timer.expired(), by_deadline) from exc
        finally:
            self._waiting = False

    def _failure(self, exc: BaseException, expired: bool, by_deadline: bool) -> DataIOError:
        where = self.where
        failure = self.parser_failure()
        if failure is not None:
            return protocol_error(parser_reason(failure), where, body=True)
        if (expired and by_deadline) or (
            isinstance(exc, asyncio.TimeoutError) and past(self._deadline)
        ):
            return self._past_deadline()  # ours, or aiohttp's total timeout: the same deadline
        if expired:
            return TransientError(
                f"timed out waiting for {where} (no data for {self._sock_read:g}s)", url=where.url
            )
        if isinstance(exc, RuntimeError):
            return TransientError(f"connection to {where} closed mid-body", url=where.url)
        return translate(exc, where)

    def release(self) -> None:
        self._resp.release()

    def close(self) -> None:
        self._resp.close()

    async def collect(
        self, *, max_body: int | None, threshold: int, chunk_size: int
    ) -> bytes | BodyStream:
        """The body as ``bytes`` when at most ``threshold`` bytes (decoded), else as a
        ``BodyStream`` (with what was read so far); ``FetchError`` above ``max_body``."""
        resp = self._resp
        length = resp.content_length
        encoding = resp.headers.get("Content-Encoding", "identity").strip().lower()
        where = self.where
        if length is not None and encoding == "identity":
            # The decoded size is known: refuse or stream it up front.
            if max_body is not None and length > max_body:
                raise FetchError(
                    f"response body from {where} is {length} bytes, above max_body={max_body}",
                    url=where.url,
                )
            if length > threshold:
                return BodyStream(self, chunk_size=chunk_size, max_body=max_body)
        # Otherwise buffer up to the threshold, then decide.
        chunks: list[bytes] = []
        received = 0
        while True:
            chunk = await self.read(chunk_size)
            if not chunk:
                self.release()
                return b"".join(chunks)
            received += len(chunk)
            if max_body is not None and received > max_body:
                raise FetchError(
                    f"response body from {where} exceeds max_body={max_body}", url=where.url
                )
            chunks.append(chunk)
            if received > threshold:
                return BodyStream(
                    self, prefix=chunks, received=received, chunk_size=chunk_size, max_body=max_body
                )

    async def head(self, cap: int) -> bytes:
        """Up to ``cap`` bytes of the body (an error response's detail), within the limits. The
        connection is kept when the body ended within them, else dropped; a failed read ends the
        head quietly (what was read is kept)."""
        chunks: list[bytes] = []
        got = 0
        try:
            while got < cap:
                chunk = await self.read(cap - got)
                if not chunk:
                    self.release()
                    return b"".join(chunks)
                chunks.append(chunk)
                got += len(chunk)
        except DataIOError:
            pass
        self.close()
        return b"".join(chunks)[:cap]


class BodyStream:
    """A response body as an async iterator of chunks; it owns the aiohttp response.

    The response is released at the end of the body and closed by ``aclose()`` or any error, so a
    consumer that stops early (or never starts) frees the connection either way. A class rather
    than an async generator because a generator never started cannot run its ``finally``. Each
    read is bounded as :class:`Body` says: the attempt's ``total_timeout`` runs on while the
    consumer iterates.
    """

    __slots__ = ("_body", "_chunk_size", "_max_body", "_prefix", "_received")

    def __init__(
        self,
        body: Body,
        *,
        prefix: Iterable[bytes] = (),
        received: int = 0,
        chunk_size: int,
        max_body: int | None,
    ) -> None:
        self._body: Body | None = body
        self._prefix = deque(prefix)
        self._received = received
        self._chunk_size = chunk_size
        self._max_body = max_body

    def __aiter__(self) -> BodyStream:
        return self

    async def __anext__(self) -> bytes:
        if self._prefix:
            return self._prefix.popleft()
        body = self._body
        if body is None:
            raise StopAsyncIteration
        try:
            chunk = await body.read(self._chunk_size)
        except BaseException:
            self._close()
            raise
        if not chunk:
            self._body = None
            body.release()
            raise StopAsyncIteration
        self._received += len(chunk)
        if self._max_body is not None and self._received > self._max_body:
            self._close()
            where = body.where
            raise FetchError(
                f"response body from {where} exceeds max_body={self._max_body}", url=where.url
            )
        return chunk

    async def aclose(self) -> None:
        """Stop early: drop the connection (its unread rest is useless)."""
        self._close()

    def _close(self) -> None:
        self._prefix.clear()
        body, self._body = self._body, None
        if body is not None:
            body.close()

    @property
    def released(self) -> bool:
        """Whether the response has been let go (consumed, closed or failed)."""
        return self._body is None
