from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable

import anyio
import pytest
from aiohttp import web

from mxm_dataio_async._exceptions import FetchError, TransientError
from mxm_dataio_async._models import AdapterResult, Request
from mxm_dataio_async._request import build_request
from mxm_dataio_async.adapters._sse import SSEDecoder, SSEError, SSEEvent
from mxm_dataio_async.adapters.http import HttpAdapter
from tests.adapters.conftest import LocalServer, sse_event

pytestmark = pytest.mark.anyio

Step = Callable[[web.Request], Awaitable[web.StreamResponse]]


def req(endpoint: str = "/sse", **kw: object) -> Request:
    return build_request(session_id="t", source="http", kind="k", endpoint=endpoint, **kw)  # type: ignore[arg-type]


# -- the decoder -------------------------------------------------------------------------------


def feed_all(chunks: list[bytes], decoder: SSEDecoder | None = None) -> list[SSEEvent]:
    d = decoder or SSEDecoder()
    out: list[SSEEvent] = []
    for c in chunks:
        out.extend(d.feed(c))
    return out


STREAM = (
    "\ufeff: a comment\r\n"
    "retry: 1500\n"
    "event: greet\r"
    "id: 7\r\n"
    "data: héllo\n"
    "data:world\n"
    "unknown: field\n"
    "\n"
    "data\n"
    "\r\n"
    "id\n"
    "data: second-id-reset\n"
    "\n"
    "id: x\x00y\n"
    "data: nul-id-ignored\n"
    "\n"
    "data: unterminated"
).encode()

EXPECTED = [
    SSEEvent(data="héllo\nworld", event="greet", id="7"),
    SSEEvent(data="", event="message", id="7"),
    SSEEvent(data="second-id-reset", event="message", id=""),
    SSEEvent(data="nul-id-ignored", event="message", id=""),
]


def test_decoder_whole_stream() -> None:
    d = SSEDecoder()
    assert feed_all([STREAM], d) == EXPECTED
    assert d.retry == 1500
    d.end()
    assert d.feed(b"\n\n") == []  # the unterminated event was discarded


def test_decoder_byte_by_byte_matches_whole() -> None:
    # Splits inside CRLF pairs and inside multi-byte UTF-8 sequences.
    assert feed_all([STREAM[i : i + 1] for i in range(len(STREAM))]) == EXPECTED


@pytest.mark.parametrize("size", [2, 3, 5, 7, 11])
def test_decoder_any_chunking(size: int) -> None:
    assert feed_all([STREAM[i : i + size] for i in range(0, len(STREAM), size)]) == EXPECTED


def test_decoder_crlf_split_across_chunks() -> None:
    d = SSEDecoder()
    assert d.feed(b"data: a\r") == []
    assert d.feed(b"\n\r") == [SSEEvent("a")]
    assert d.feed(b"\ndata: b\n\n") == [SSEEvent("b")]


def test_decoder_id_only_event_updates_last_id() -> None:
    d = SSEDecoder(last_event_id="3")
    assert d.feed(b"id: 4\n\n") == []
    assert d.last_event_id == "4"
    assert d.feed(b"data: x\n\n") == [SSEEvent("x", id="4")]


def test_decoder_event_type_resets() -> None:
    events = feed_all([b"event: a\ndata: 1\n\ndata: 2\n\nevent: b\n\ndata: 3\n\n"])
    assert [e.event for e in events] == ["a", "message", "message"]


def test_decoder_retry_must_be_digits() -> None:
    d = SSEDecoder()
    d.feed(b"retry: 10x\nretry: -1\n\n")
    assert d.retry is None
    d.feed(b"retry:25\n\n")
    assert d.retry == 25


def test_decoder_limits() -> None:
    with pytest.raises(SSEError, match="line"):
        SSEDecoder(max_size=10).feed(b"data: " + b"x" * 20)
    with pytest.raises(SSEError, match="event"):
        SSEDecoder(max_size=10).feed(b"data: 123456\ndata: 123456\n")


# -- the adapter -------------------------------------------------------------------------------


class Sleeps:
    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.calls.append(delay)


async def open_stream(request: web.Request, status: int = 200) -> web.StreamResponse:
    resp = web.StreamResponse(status=status, headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    return resp


def send_then_drop(*events: bytes) -> Step:
    """Send ``events`` and drop the connection mid-stream (no end of chunked body)."""

    async def step(request: web.Request) -> web.StreamResponse:
        resp = await open_stream(request)
        for e in events:
            await resp.write(e)
        assert request.transport is not None
        sock = request.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        request.transport.close()
        return resp

    return step


def send_then_close(*events: bytes) -> Step:
    """Send ``events`` and end the response cleanly."""

    async def step(request: web.Request) -> web.StreamResponse:
        resp = await open_stream(request)
        for e in events:
            await resp.write(e)
        await resp.write_eof()
        return resp

    return step


def status(code: int, headers: dict[str, str] | None = None) -> Step:
    async def step(request: web.Request) -> web.StreamResponse:
        return web.Response(status=code, text="nope", headers=headers)

    return step


async def plain_text(request: web.Request) -> web.StreamResponse:
    return web.Response(text="data: x\n\n", content_type="text/plain")


async def collect_all(adapter: HttpAdapter, request: Request) -> list[AdapterResult]:
    """Everything the stream yields: its messages and its drops (``error`` set)."""
    with anyio.fail_after(10):
        return [r async for r in adapter.stream(request)]


async def collect(adapter: HttpAdapter, request: Request) -> list[AdapterResult]:
    """The stream's messages (what the session hands on), without its drops."""
    return [r for r in await collect_all(adapter, request) if r.error is None]


def last_event_ids(server: LocalServer) -> list[str | None]:
    return [s.headers.get("Last-Event-ID") for s in server.seen]


async def test_stream_reconnects_with_last_event_id_and_ends_on_204(server: LocalServer) -> None:
    server.sse_script = [
        send_then_drop(
            b"retry: 10\n\n", sse_event("a", id="1"), sse_event("b1\nb2", id="2"), b"data: lost"
        ),
        send_then_close(sse_event("c", id="3", event="tick"), b": keep-alive\n\n"),
    ]  # and then 204
    sleeps = Sleeps()
    async with HttpAdapter(server.url, sleep=sleeps) as adapter:
        results = await collect(adapter, req())
    assert [r.data for r in results] == [b"a", b"b1\nb2", b"c"]
    assert [r.adapter_meta for r in results] == [
        {"event": "message", "id": "1"},
        {"event": "message", "id": "2"},
        {"event": "tick", "id": "3"},
    ]
    assert all(r.content_type == "text/event-stream" for r in results)
    assert all(r.transport_status == 200 for r in results)
    assert results[0].url == f"{server.url}/sse"
    assert results[0].headers is not None
    assert results[0].headers["Content-Type"] == "text/event-stream"
    assert all(r.elapsed_ms is not None for r in results)
    assert last_event_ids(server) == [None, "2", "3"]
    assert sleeps.calls == [0.01, 0.01]  # the server's retry: hint (ms)
    assert server.seen[0].headers["Accept"] == "text/event-stream"


async def test_stream_ends_on_immediate_204(server: LocalServer) -> None:
    async with HttpAdapter(server.url, sleep=Sleeps()) as adapter:
        assert await collect(adapter, req()) == []


async def test_stream_sends_initial_last_event_id(server: LocalServer) -> None:
    server.sse_script = [send_then_close(sse_event("x", id="11"))]
    async with HttpAdapter(server.url, sleep=Sleeps()) as adapter:
        results = await collect(adapter, req(headers={"last-event-id": "10"}))
    assert [r.data for r in results] == [b"x"]
    assert last_event_ids(server) == ["10", "11"]


async def test_stream_transient_status_honours_retry_after(server: LocalServer) -> None:
    server.sse_script = [
        status(503, {"Retry-After": "2"}),
        send_then_close(sse_event("ok", id="1")),
    ]
    sleeps = Sleeps()
    async with HttpAdapter(server.url, sleep=sleeps, reconnect_delay=0.5) as adapter:
        results = await collect(adapter, req())
    assert [r.data for r in results] == [b"ok"]
    assert sleeps.calls == [2.0, 0.5]


async def test_stream_gives_up_after_max_reconnects(server: LocalServer) -> None:
    server.sse_script = [status(503)] * 10
    sleeps = Sleeps()
    async with HttpAdapter(server.url, sleep=sleeps, max_reconnects=2) as adapter:
        with pytest.raises(TransientError, match="gave up after 2 reconnects") as info:
            await collect(adapter, req())
    assert info.value.transport_status == 503
    assert len(server.seen) == 3
    assert sleeps.calls == [1.0, 1.0]


async def test_stream_reconnect_budget_resets_on_events(server: LocalServer) -> None:
    server.sse_script = [send_then_drop(sse_event(str(i), id=str(i))) for i in range(4)]
    async with HttpAdapter(server.url, sleep=Sleeps(), max_reconnects=1) as adapter:
        results = await collect(adapter, req())
    assert [r.data for r in results] == [b"0", b"1", b"2", b"3"]


async def test_stream_connection_refused_exhausts() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sleeps = Sleeps()
    async with HttpAdapter(f"http://127.0.0.1:{port}", sleep=sleeps, max_reconnects=1) as adapter:
        with pytest.raises(TransientError, match="cannot connect"):
            await collect(adapter, req())
    assert len(sleeps.calls) == 1


@pytest.mark.parametrize(
    ("step", "match"),
    [
        (status(404), "HTTP 404"),
        (status(501), "HTTP 501"),
        (plain_text, "not 'text/event-stream'"),
    ],
)
async def test_stream_final_failures(server: LocalServer, step: Step, match: str) -> None:
    server.sse_script = [step]
    async with HttpAdapter(server.url, sleep=Sleeps()) as adapter:
        with pytest.raises(FetchError, match=match):
            await collect(adapter, req())


async def test_stream_event_size_bounded_by_max_body(server: LocalServer) -> None:
    server.sse_script = [send_then_close(sse_event("x" * 1000))]
    async with HttpAdapter(server.url, sleep=Sleeps(), max_body=100) as adapter:
        with pytest.raises(FetchError, match="larger than 100"):
            await collect(adapter, req())


async def test_stream_consumer_stops_early(server: LocalServer) -> None:
    async def endless(request: web.Request) -> web.StreamResponse:
        resp = await open_stream(request)
        i = 0
        while True:
            await resp.write(sse_event(str(i), id=str(i)))
            i += 1
            await anyio.sleep(0.001)

    server.sse_script = [endless]
    async with HttpAdapter(server.url, sleep=Sleeps(), connector_limit=1) as adapter:
        gen = adapter.stream(req())
        got = [await gen.__anext__() for _ in range(3)]
        await gen.aclose()
        assert [r.data for r in got] == [b"0", b"1", b"2"]
        with anyio.fail_after(5):
            assert (await adapter.fetch(req("/echo"))).transport_status == 200


async def test_stream_yields_a_drop_before_each_reconnect(server: LocalServer) -> None:
    """Each reconnect is announced by a drop (``error`` set, ``data`` empty) naming why and the
    Last-Event-ID it resumes from, for the session to record; messages are unchanged."""
    server.sse_script = [
        send_then_drop(sse_event("a", id="1"), sse_event("b", id="2")),
        status(503, {"Retry-After": "3"}),
        send_then_close(sse_event("c", id="3")),
    ]  # and then 204
    sleeps = Sleeps()
    async with HttpAdapter(server.url, sleep=sleeps, reconnect_delay=0.5) as adapter:
        results = await collect_all(adapter, req(params={"token": "SSESECRET"}))
    kinds = ["drop" if r.error is not None else r.data.decode() for r in results]  # type: ignore[union-attr]
    assert kinds == ["a", "b", "drop", "drop", "c", "drop"]
    drops = [r for r in results if r.error is not None]
    assert [d.adapter_meta for d in drops] == [
        {"reconnect": {"last_event_id": "2", "attempt": 1}},
        {"reconnect": {"last_event_id": "2", "attempt": 2}},
        {"reconnect": {"last_event_id": "3", "attempt": 1}},
    ]
    assert all(d.data == b"" for d in drops)
    url = f"{server.url}/sse?token=[REDACTED]"
    assert [d.url for d in drops] == [url, url, url]
    first, refused, closed = drops
    assert first.error is not None and "incomplete response body" in first.error
    assert refused.error is not None and "HTTP 503" in refused.error
    assert refused.transport_status == 503
    assert refused.headers is not None and refused.headers["Retry-After"] == "3"
    assert closed.error is not None and "closed by the server" in closed.error
    assert last_event_ids(server) == [None, "2", "2", "3"]
    assert sleeps.calls == [0.5, 3.0, 0.5]


async def test_stream_drop_on_a_connect_failure_has_the_url() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    async with HttpAdapter(url, sleep=Sleeps(), max_reconnects=2) as adapter:
        gen = adapter.stream(req(headers={"Last-Event-ID": "41"}))
        with anyio.fail_after(10):
            drop = await gen.__anext__()
        await gen.aclose()
    assert drop.error is not None and "cannot connect" in drop.error
    assert drop.url == f"{url}/sse"
    assert drop.transport_status is None
    assert drop.adapter_meta == {"reconnect": {"last_event_id": "41", "attempt": 1}}


async def test_stream_reconnects_after_a_protocol_error(server: LocalServer) -> None:
    async def bad_chunk(request: web.Request) -> web.StreamResponse:
        resp = await open_stream(request)
        await resp.write(sse_event("a", id="1"))
        await anyio.sleep(0.2)  # "a" arrives on its own (else aiohttp drops it with the rest)
        assert request.transport is not None
        request.transport.write(b"zz\r\n")  # not a chunk size
        await anyio.sleep(30)  # and keep the connection open: the client must not wait for it
        return resp

    server.sse_script = [bad_chunk, send_then_close(sse_event("b", id="2"))]
    async with HttpAdapter(server.url, sleep=Sleeps(), timeout=60) as adapter:
        results = await collect_all(adapter, req())
    assert [r.data for r in results if r.error is None] == [b"a", b"b"]
    drop = results[1]
    assert drop.error is not None and "protocol error" in drop.error
    assert drop.adapter_meta == {"reconnect": {"last_event_id": "1", "attempt": 1}}
