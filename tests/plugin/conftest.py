"""An upstream on 127.0.0.1 in a thread of its own (the inner pytest runs block the caller),
counting what reaches it, and the source of inner test files that record and replay it."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Iterator

import pytest
from aiohttp import web

# Bytes no text layer keeps intact: CRLF, a lone CR, NUL, invalid UTF-8, a BOM.
RAW = b"\xef\xbb\xbfline1\r\nline2\rline3\x00\xff\xfe end"


class Upstream:
    """An aiohttp app served from its own thread and loop; ``hits`` counts requests by path."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def _app(self) -> web.Application:
        async def quote(request: web.Request) -> web.Response:
            self.hits["/quote"] += 1
            symbol = request.query.get("symbol", "?")
            return web.json_response({"symbol": symbol, "price": len(symbol) * 10.5})

        async def raw(request: web.Request) -> web.Response:
            self.hits["/raw"] += 1
            return web.Response(body=RAW, content_type="application/octet-stream")

        async def echo(request: web.Request) -> web.Response:
            self.hits["/echo"] += 1
            return web.Response(text=f"you sent {request.headers.get('X-Token', '')}")

        async def missing(request: web.Request) -> web.Response:
            self.hits["/missing"] += 1
            return web.Response(status=404, text="no such thing")

        async def sse(request: web.Request) -> web.StreamResponse:
            self.hits["/sse"] += 1
            if self.hits["/sse"] % 2 == 0:  # the reconnect after the first stream: the end
                return web.Response(status=204)
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for n in range(3):
                await resp.write(f"id: {n}\ndata: tick {n}\n\n".encode())
            await resp.write_eof()
            return resp

        app = web.Application()
        app.router.add_get("/quote", quote)
        app.router.add_get("/raw", raw)
        app.router.add_get("/echo", echo)
        app.router.add_get("/missing", missing)
        app.router.add_get("/sse", sse)
        return app

    async def _start(self) -> str:
        self._runner = web.AppRunner(self._app(), access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    def start(self) -> None:
        self._thread.start()
        self.url = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)

    def stop(self) -> None:
        """Stop serving: afterwards a connect to ``url`` is refused."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            asyncio.run_coroutine_threadsafe(runner.cleanup(), self._loop).result(10)

    def close(self) -> None:
        self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    server = Upstream()
    server.start()
    try:
        yield server
    finally:
        server.close()


# The inner tests' conftest: the asyncio backend for anyio, a registry per test.
INNER_CONFTEST = """
import pytest

@pytest.fixture
def anyio_backend():
    return "asyncio"
"""


@pytest.fixture
def inner(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(INNER_CONFTEST)
    # pytest-asyncio (a dev dependency) warns in every run whose config leaves this unset.
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    return pytester
