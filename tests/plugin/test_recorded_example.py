"""A test with a committed recording: ``pytest`` replays it offline. The upstream below runs
only while recording (``pytest --dataio-record-mode=rewrite`` on this file).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import pytest
from aiohttp import web

import mxm_dataio_async as dio
from mxm_dataio_async.pytest_plugin import RecordingInfo
from tests._serve import serving
from tests.plugin.conftest import RAW

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def upstream_when_recording(info: RecordingInfo) -> AsyncIterator[str]:
    """A loopback upstream while recording; a dead address while replaying (never reached)."""
    if info.replaying:
        yield "http://127.0.0.1:9"
        return

    async def quote(request: web.Request) -> web.Response:
        return web.json_response({"symbol": request.query["symbol"], "close": 501.25})

    async def raw(request: web.Request) -> web.Response:
        return web.Response(body=RAW, content_type="application/octet-stream")

    app = web.Application()
    app.router.add_get("/quote", quote)
    app.router.add_get("/raw", raw)
    async with serving(app) as url:
        yield url


async def test_quote(dataio_store: dio.Store, dataio_recording: RecordingInfo) -> None:
    async with AsyncExitStack() as stack:
        url = await stack.enter_async_context(upstream_when_recording(dataio_recording))
        registry = await stack.enter_async_context(dio.Registry())
        registry.register("prices", dio.HttpAdapter(base_url=url))
        s = await stack.enter_async_context(
            dio.AsyncSession("prices", store=dataio_store, registry=registry)
        )
        resp = await s.fetch(s.request("quote", endpoint="/quote", params={"symbol": "CSPX.L"}))
        assert json.loads(await s.read(resp)) == {"symbol": "CSPX.L", "close": 501.25}
        assert await s.read(await s.fetch(s.request("raw", endpoint="/raw"))) == RAW
