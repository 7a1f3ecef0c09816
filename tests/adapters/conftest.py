"""A real aiohttp server on 127.0.0.1 (port 0) and a raw TCP server for misbehaving peers."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from multidict import CIMultiDict

# Deterministic filler for large bodies: a 64 KiB block repeated.
BLOCK = bytes(range(256)) * 256
ETAG = '"v1"'
LAST_MODIFIED = "Wed, 21 Oct 2015 07:28:00 GMT"


@dataclass
class Seen:
    """One request as the server received it."""

    method: str
    path: str
    query: list[tuple[str, str]]
    headers: CIMultiDict[str]
    body: bytes
    peer: str


@dataclass
class LocalServer:
    url: str
    seen: list[Seen] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)
    # SSE script: one entry per connection, consumed in order (see _sse).
    sse_script: list[Callable[[web.Request], Awaitable[web.StreamResponse]]] = field(
        default_factory=list
    )

    def bump(self, key: str) -> int:
        self.counters[key] = self.counters.get(key, 0) + 1
        return self.counters[key]


async def _body_stream(
    request: web.Request,
    size: int,
    *,
    declared: bool,
    status: int = 200,
    content_type: str = "application/octet-stream",
) -> web.StreamResponse:
    resp = web.StreamResponse(status=status, headers={"Content-Type": content_type})
    if declared:
        resp.content_length = size
    await resp.prepare(request)
    left = size if request.method != "HEAD" else 0  # a HEAD answer has no body
    while left > 0:
        piece = BLOCK[: min(left, len(BLOCK))]
        await resp.write(piece)
        left -= len(piece)
    await resp.write_eof()
    return resp


def _make_app(server: LocalServer) -> web.Application:
    async def record(request: web.Request) -> Seen:
        seen = Seen(
            method=request.method,
            path=request.path,
            query=list(request.query.items()),
            headers=CIMultiDict(request.headers),
            body=await request.read(),
            peer=str(request.transport.get_extra_info("peername") if request.transport else None),
        )
        server.seen.append(seen)
        return seen

    async def echo(request: web.Request) -> web.Response:
        seen = await record(request)
        return web.json_response(
            {
                "method": seen.method,
                "path": seen.path,
                "query": seen.query,
                "headers": dict(seen.headers),
                "body": seen.body.decode("latin-1"),
            }
        )

    async def status(request: web.Request) -> web.Response:
        await record(request)
        code = int(request.match_info["code"])
        headers = {}
        if "retry_after" in request.query:
            headers["Retry-After"] = request.query["retry_after"]
        return web.Response(status=code, body=f"status {code}".encode(), headers=headers)

    async def flaky(request: web.Request) -> web.Response:
        # /flaky/{key}?fail=N&code=503&retry_after=S: the first N requests for key fail, then 200.
        await record(request)
        key = request.match_info["key"]
        fail = int(request.query.get("fail", "1"))
        n = server.bump(f"flaky:{key}")
        if n <= fail:
            headers = {}
            if "retry_after" in request.query:
                headers["Retry-After"] = request.query["retry_after"]
            code = int(request.query.get("code", "503"))
            return web.Response(status=code, text="try later", headers=headers)
        return web.Response(text=f"ok after {n - 1} failures")

    async def slow(request: web.Request) -> web.Response:
        await record(request)
        await asyncio.sleep(float(request.query.get("delay", "5")))
        return web.Response(text="late")

    async def big(request: web.Request) -> web.StreamResponse:
        await record(request)
        return await _body_stream(request, int(request.query["size"]), declared=True)

    async def chunked(request: web.Request) -> web.StreamResponse:
        await record(request)
        return await _body_stream(request, int(request.query["size"]), declared=False)

    async def gzipped(request: web.Request) -> web.Response:
        await record(request)
        raw = b"hello gzip " * 100
        return web.Response(
            body=gzip.compress(raw),
            headers={"Content-Encoding": "gzip", "Content-Type": "text/plain; charset=utf-8"},
        )

    async def conditional(request: web.Request) -> web.Response:
        # /cond/etag, /cond/lastmod, /cond/both: 304 when the validator matches.
        await record(request)
        which = request.match_info["which"]
        headers = {}
        if which in ("etag", "both"):
            headers["ETag"] = ETAG
        if which in ("lastmod", "both"):
            headers["Last-Modified"] = LAST_MODIFIED
        inm = request.headers.get("If-None-Match")
        ims = request.headers.get("If-Modified-Since")
        if (inm is not None and inm == headers.get("ETag")) or (
            inm is None and ims is not None and ims == headers.get("Last-Modified")
        ):
            return web.Response(status=304, headers=headers)
        return web.Response(body=b"the content", headers=headers, content_type="text/plain")

    async def secret_headers(request: web.Request) -> web.Response:
        await record(request)
        resp = web.Response(text="cookies", headers={"X-Plain": "visible"})
        resp.headers.add("Set-Cookie", "session=SETCOOKIESECRET; Path=/")
        resp.headers.add("Set-Cookie", "other=SETCOOKIESECRET2; Path=/")
        resp.headers.add("X-Multi", "a")
        resp.headers.add("X-Multi", "b")
        return resp

    async def redirect(request: web.Request) -> web.Response:
        await record(request)
        # /redirect?to=/path&...: redirect there, keeping the query string.
        raise web.HTTPFound(location=f"{request.query.get('to', '/echo')}?{request.query_string}")

    async def hops(request: web.Request) -> web.Response:
        # /hops/{n}?...: n redirects (301, 302, 307 in turn), keeping the query, then 200.
        await record(request)
        n = int(request.match_info["n"])
        if n == 0:
            return web.Response(text="landed")
        code = (301, 302, 307)[n % 3]
        location = f"/hops/{n - 1}?{request.query_string}" if request.query_string else None
        return web.Response(
            status=code,
            headers={"Location": location or f"/hops/{n - 1}", "X-Hop": str(n)},
        )

    async def error_body(request: web.Request) -> web.StreamResponse:
        # /error-body?code=503&size=N: that status with an N-byte chunked body (BLOCK bytes).
        await record(request)
        code = int(request.query.get("code", "503"))
        size = int(request.query["size"])
        return await _body_stream(
            request, size, declared=False, status=code, content_type="text/plain"
        )

    async def sse(request: web.Request) -> web.StreamResponse:
        await record(request)
        if not server.sse_script:
            return web.Response(status=204)
        step = server.sse_script.pop(0)
        return await step(request)

    app = web.Application()
    app.router.add_route("*", "/echo", echo)
    app.router.add_route("*", "/status/{code}", status)
    app.router.add_get("/flaky/{key}", flaky)
    app.router.add_get("/slow", slow)
    app.router.add_get("/big", big)
    app.router.add_get("/chunked", chunked)
    app.router.add_get("/gzip", gzipped)
    app.router.add_get("/cond/{which}", conditional)
    app.router.add_get("/secret-headers", secret_headers)
    app.router.add_get("/redirect", redirect)
    app.router.add_get("/sse", sse)
    app.router.add_get("/hops/{n}", hops)
    app.router.add_get("/error-body", error_body)
    return app


@pytest.fixture
async def server() -> AsyncIterator[LocalServer]:
    srv = LocalServer(url="")
    runner = web.AppRunner(_make_app(srv), shutdown_timeout=0.5, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    srv.url = f"http://127.0.0.1:{port}"
    try:
        yield srv
    finally:
        await runner.cleanup()


RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_head(reader: asyncio.StreamReader) -> bytes:
    """Read one request head (up to the blank line)."""
    return await reader.readuntil(b"\r\n\r\n")


async def wait_for_close(reader: asyncio.StreamReader, cap: float = 30.0) -> None:
    """Keep the connection open, saying nothing, until the client closes it (or ``cap`` s)."""
    with contextlib.suppress(asyncio.TimeoutError, ConnectionError):
        await asyncio.wait_for(reader.read(), cap)


@pytest.fixture
async def raw_server() -> AsyncIterator[Callable[[RawHandler], Awaitable[str]]]:
    """Start a TCP server speaking whatever ``handler`` writes; returns its base URL."""
    servers: list[asyncio.Server] = []

    async def start(handler: RawHandler) -> str:
        async def wrapped(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        srv = await asyncio.start_server(wrapped, "127.0.0.1", 0)
        servers.append(srv)
        port = srv.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    try:
        yield start
    finally:
        for srv in servers:
            srv.close()
            await srv.wait_closed()


def sse_event(data: str, *, id: str | None = None, event: str | None = None) -> bytes:
    lines = []
    if event is not None:
        lines.append(f"event: {event}")
    if id is not None:
        lines.append(f"id: {id}")
    lines.extend(f"data: {line}" for line in data.split("\n"))
    return ("\n".join(lines) + "\n\n").encode()
