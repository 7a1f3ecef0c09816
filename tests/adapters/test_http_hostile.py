"""HttpAdapter against malformed upstreams: no attempt outlives its timeouts, and what the parser
refused is reported as a protocol error with its reason (never as an "HTTP 400" nobody sent)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest
from aiohttp import web

from mxm_dataio_async._exceptions import DataIOError, FetchError, TransientError
from mxm_dataio_async._models import Request
from mxm_dataio_async._request import build_request
from mxm_dataio_async.adapters.http import DEFAULT_TOTAL_TIMEOUT, HttpAdapter
from tests._serve import serving
from tests.adapters.conftest import LocalServer, RawHandler, read_head, wait_for_close

pytestmark = pytest.mark.anyio

MiB = 1 << 20
RawStart = Callable[[RawHandler], Awaitable[str]]
BOUND = 30.0  # against hangs only


def req(endpoint: str | None = "/x", **kw: Any) -> Request:
    return build_request(session_id="t", source="http", kind="k", endpoint=endpoint, **kw)


CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


def bad_chunk_after_first(pause: asyncio.Event | None = None) -> RawHandler:
    """A chunked body whose second chunk size is garbage; the connection then stays open.
    With ``pause``: the bad chunk waits until it is set (else a short moment)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(CHUNKED_HEAD + b"5\r\nhello\r\n")
        await writer.drain()
        if pause is None:
            await asyncio.sleep(0.2)  # the client is waiting for the next chunk by then
        else:
            await pause.wait()
        writer.write(b"zz\r\nnot a chunk\r\n")
        await writer.drain()
        await wait_for_close(reader)

    return handler


# -- 1. no attempt outlives its timeouts --------------------------------------------------------


async def test_bad_chunk_size_after_the_first_chunk_does_not_hang(raw_server: RawStart) -> None:
    """aiohttp drops the read timer when its parser fails mid-body and never wakes the waiting
    read: fetch() with timeout=1 used to wait forever."""
    url = await raw_server(bad_chunk_after_first())
    async with HttpAdapter(url, timeout=1) as adapter:
        with anyio.fail_after(BOUND), pytest.raises(TransientError) as info:
            await adapter.fetch(req())
    message = str(info.value)
    assert message.startswith(f"protocol error in the response body from {url}/x: ")
    assert "chunk size" in message
    assert "400" not in message.replace(url, "<url>")
    assert info.value.transport_status is None
    assert info.value.url == f"{url}/x"


async def test_bad_chunk_wakes_the_waiting_read(raw_server: RawStart) -> None:
    """With a per-read timeout far above the safety bound, only waking the read ends it in time."""
    url = await raw_server(bad_chunk_after_first())
    async with HttpAdapter(url, timeout=3 * BOUND) as adapter:
        with anyio.fail_after(BOUND), pytest.raises(TransientError, match="protocol error"):
            await adapter.fetch(req())


async def test_bad_chunk_while_no_read_waits(raw_server: RawStart) -> None:
    """The bad chunk arrives while the consumer of a streamed body is not reading: aiohttp then
    raised a bare RuntimeError("Connection closed.") from the next read."""
    pause = asyncio.Event()
    url = await raw_server(bad_chunk_after_first(pause))
    async with HttpAdapter(url, timeout=1, stream_threshold=4) as adapter:
        with anyio.fail_after(BOUND):
            result = await adapter.fetch(req())
            stream = result.data
            assert not isinstance(stream, bytes)
            pause.set()
            await anyio.sleep(0.2)  # the bad chunk and the close reach the client meanwhile
            with pytest.raises(TransientError, match="protocol error") as info:
                async for _ in stream:
                    pass
    assert info.value.url == f"{url}/x"
    assert getattr(stream, "released", None) is True


async def test_bad_chunk_in_the_first_packet_is_the_same_error(raw_server: RawStart) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(CHUNKED_HEAD + b"5\r\nhello\r\nzz\r\nnot a chunk\r\n")
        await writer.drain()
        await wait_for_close(reader)

    url = await raw_server(handler)
    async with HttpAdapter(url, timeout=1) as adapter:
        with anyio.fail_after(BOUND), pytest.raises(TransientError) as info:
            await adapter.fetch(req())
    assert str(info.value).startswith("protocol error in the response body")
    assert info.value.transport_status is None


def endless_trickle(interval: float = 0.05) -> RawHandler:
    """A chunked body that never ends, one small chunk every ``interval`` seconds."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(CHUNKED_HEAD)
        for _ in range(2000):  # bounded: 100 s at most
            writer.write(b"2\r\nab\r\n")
            await writer.drain()
            await asyncio.sleep(interval)

    return handler


def test_total_timeout_default_and_validation() -> None:
    assert DEFAULT_TOTAL_TIMEOUT == 300.0
    assert HttpAdapter().total_timeout == DEFAULT_TOTAL_TIMEOUT
    assert HttpAdapter(total_timeout=None).total_timeout is None
    for bad in (0, -1, True, "5"):
        with pytest.raises(ValueError, match="total_timeout"):
            HttpAdapter(total_timeout=bad)  # type: ignore[arg-type]


async def test_total_timeout_bounds_a_body_that_never_ends(raw_server: RawStart) -> None:
    url = await raw_server(endless_trickle())
    async with HttpAdapter(url, timeout=5, total_timeout=0.5) as adapter:
        with anyio.fail_after(BOUND), pytest.raises(TransientError) as info:
            await adapter.fetch(req())
    assert "total_timeout of 0.5s" in str(info.value)
    assert str(info.value).startswith("timed out")
    assert info.value.url == f"{url}/x"


async def test_total_timeout_runs_on_while_a_streamed_body_is_read(raw_server: RawStart) -> None:
    url = await raw_server(endless_trickle())
    async with HttpAdapter(url, timeout=5, total_timeout=0.5, stream_threshold=4) as adapter:
        with anyio.fail_after(BOUND):
            result = await adapter.fetch(req())
            assert not isinstance(result.data, bytes)
            with pytest.raises(TransientError, match="total_timeout"):
                async for _ in result.data:
                    pass


async def test_total_timeout_bounds_the_wait_for_the_head(raw_server: RawStart) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        await wait_for_close(reader)

    url = await raw_server(silent)
    async with HttpAdapter(url, timeout=3 * BOUND, total_timeout=0.3) as adapter:
        with anyio.fail_after(BOUND), pytest.raises(TransientError, match="total_timeout"):
            await adapter.fetch(req())


async def test_the_head_deadline_cancels_only_the_late_and_leaves_other_cancellations(
    raw_server: RawStart,
) -> None:
    # One timer serves every attempt in flight: the silent upstream's attempts time out at their
    # own deadlines, while an attempt cancelled from outside stays cancelled (not a timeout), and
    # nothing is left watched afterwards.
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        await wait_for_close(reader)

    url = await raw_server(silent)
    async with HttpAdapter(url, timeout=3 * BOUND, total_timeout=0.3) as adapter:
        outcomes: list[str] = []

        async def attempt() -> None:
            try:
                await adapter.fetch(req())
            except TransientError as exc:
                outcomes.append("timeout" if "total_timeout" in str(exc) else str(exc))

        started = time.monotonic()
        with anyio.fail_after(BOUND):
            async with anyio.create_task_group() as tg:
                for _ in range(3):
                    tg.start_soon(attempt)
                async with anyio.create_task_group() as inner:
                    inner.start_soon(attempt)
                    await anyio.sleep(0.05)
                    inner.cancel_scope.cancel()  # from outside, before the deadline
        took = time.monotonic() - started
        assert outcomes == ["timeout"] * 3
        assert 0.3 <= took < BOUND
        assert len(adapter._deadlines) == 0


# -- 5. protocol errors, not "HTTP 400" ------------------------------------------------------


def answer(raw: bytes) -> RawHandler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(raw)
        await writer.drain()

    return handler


OK_LINE = b"HTTP/1.1 200 OK\r\n"
HI = b"Content-Length: 2\r\n\r\nhi"
MANY_HEADERS = b"".join(b"X-H%d: v\r\n" % i for i in range(200))
HUGE_HEADER = b"X-Big: " + b"S" * 100_000 + b"\r\n"
CSP_10K = b"Content-Security-Policy: default-src 'self'; " + b"x" * 10_000 + b"\r\n"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (OK_LINE + MANY_HEADERS + HI, "Too many headers"),
        (OK_LINE + HUGE_HEADER + HI, "max_field_size"),
        (b"HTPT/1.1 200 OK\r\n" + HI, "Bad status line"),
        (b"\x00\x01\x02 garbage\r\n\r\n", "status line"),
        (OK_LINE + b"Bad Name: x\r\n" + HI, "header"),
    ],
    ids=["too-many-headers", "huge-header", "bad-protocol", "binary-status", "bad-header-name"],
)
async def test_malformed_head_is_a_protocol_error(
    raw_server: RawStart, raw: bytes, reason: str
) -> None:
    url = await raw_server(answer(raw))
    async with HttpAdapter(url, timeout=2) as adapter:
        with anyio.fail_after(BOUND), pytest.raises(FetchError) as info:
            await adapter.fetch(req())
    message = str(info.value)
    assert message.startswith(f"protocol error from {url}/x: "), message
    assert reason in message
    assert "400" not in message.replace(url, "<url>")  # no status was ever received
    assert "SSSS" not in message  # no header bytes (a header may be a secret)
    assert info.value.transport_status is None
    assert info.value.url == f"{url}/x"


async def test_undecodable_br_body_is_a_protocol_error(raw_server: RawStart) -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Encoding: br\r\nContent-Length: 10\r\n\r\n0123456789"
    url = await raw_server(answer(raw))
    async with HttpAdapter(url, timeout=2) as adapter:
        with anyio.fail_after(BOUND), pytest.raises(TransientError) as info:
            await adapter.fetch(req())
    message = str(info.value)
    assert message.startswith(f"protocol error in the response body from {url}/x: ")
    assert "content-encoding: br" in message
    assert "400" not in message.replace(url, "<url>")  # no status was ever received
    assert info.value.transport_status is None


# brotli.compress(b"hello brotli " * 1000), made once: the server needs no brotli of its own.
BR_BODY = bytes.fromhex("1bc732f81da9539fbb702d5686262741d8e8922ded2d0e8c06ae5301c88c5f00")


async def test_br_body_is_decoded() -> None:
    """A dependency now: aiohttp decodes br only when Brotli (or brotlicffi) is importable."""
    text = b"hello brotli " * 1000

    async def br(request: web.Request) -> web.Response:
        seen = request.headers.get("Accept-Encoding", "")
        return web.Response(
            body=BR_BODY,
            headers={"Content-Encoding": "br", "X-Seen-Accept-Encoding": seen},
            content_type="text/plain",
        )

    app = web.Application()
    app.router.add_get("/br", br)
    async with serving(app) as url, HttpAdapter(url) as adapter:
        result = await adapter.fetch(req("/br"))
    assert result.data == text
    assert result.adapter_meta is not None
    assert result.adapter_meta["content_encoding"] == "br"
    assert result.headers is not None
    assert "br" in result.headers["X-Seen-Accept-Encoding"]


async def test_a_10k_header_is_accepted_and_the_limits_are_options(raw_server: RawStart) -> None:
    url = await raw_server(answer(OK_LINE + CSP_10K + HI))
    async with HttpAdapter(url, timeout=2) as adapter:
        result = await adapter.fetch(req())
    assert result.data == b"hi"
    assert result.headers is not None
    assert len(result.headers["Content-Security-Policy"]) > 10_000

    async with HttpAdapter(url, timeout=2, max_field_size=8190) as adapter:
        with pytest.raises(FetchError, match=r"protocol error.*max_field_size"):
            await adapter.fetch(req())

    many = OK_LINE + MANY_HEADERS + HI
    url = await raw_server(answer(many))
    async with HttpAdapter(url, timeout=2, max_headers=256) as adapter:
        assert (await adapter.fetch(req())).data == b"hi"

    long_reason = b"HTTP/1.1 200 " + b"O" * 200 + b"\r\nContent-Length: 2\r\n\r\nhi"
    url = await raw_server(answer(long_reason))
    async with HttpAdapter(url, timeout=2, max_line_size=100) as adapter:
        with pytest.raises(FetchError, match="protocol error"):
            await adapter.fetch(req())

    with pytest.raises(ValueError, match="max_line_size"):
        HttpAdapter(max_line_size=0)
    with pytest.raises(ValueError, match="max_field_size"):
        HttpAdapter(max_field_size=-1)
    with pytest.raises(ValueError, match="max_headers"):
        HttpAdapter(max_headers=True)


async def test_head_of_a_large_resource_is_not_refused_by_max_body(server: LocalServer) -> None:
    async with HttpAdapter(server.url, max_body=MiB, stream_threshold=1000) as adapter:
        result = await adapter.fetch(req("/big", method="HEAD", params={"size": 2 * MiB}))
        assert result.error is None
        assert result.transport_status == 200
        assert result.data == b""
        assert result.headers is not None
        assert result.headers["Content-Length"] == str(2 * MiB)
        # and the GET is still refused
        with pytest.raises(FetchError, match="max_body") as info:
            await adapter.fetch(req("/big", params={"size": 2 * MiB}))
    assert info.value.url == f"{server.url}/big?size={2 * MiB}"


async def test_errors_stay_ours(raw_server: RawStart) -> None:
    """Whatever the fault, what comes out is ours (a DataIOError), never aiohttp's."""
    faults = [
        CHUNKED_HEAD + b"5\r\nhel",  # closes mid-chunk
        CHUNKED_HEAD + b"-1\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: banana\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 4\r\n\r\nnope",
    ]
    for raw in faults:
        url = await raw_server(answer(raw))
        async with HttpAdapter(url, timeout=1) as adapter:
            with anyio.fail_after(BOUND), pytest.raises(DataIOError) as info:
                await adapter.fetch(req())
        assert "400" not in str(info.value).replace(url, "<url>"), (raw, str(info.value))
        assert getattr(info.value, "url", None) == f"{url}/x"
