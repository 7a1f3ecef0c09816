"""Every kind of adapter records and replays: HTTP (an OK answer and a 404), SSE streams, files
and a user's own adapter, which a replay never calls."""

from __future__ import annotations

import pytest

from tests.plugin.conftest import Upstream

pytest_plugins = ["pytester"]

HTTP_AND_SSE = """
import pytest
import mxm_dataio_async as dio

URL = "{url}"

@pytest.mark.anyio
async def test_sse(dataio_store):
    async with dio.Registry() as registry:
        registry.register("ticks", dio.HttpAdapter(base_url=URL))
        async with dio.AsyncSession("ticks", store=dataio_store, registry=registry) as s:
            got = [await s.read(m) async for m in s.stream(s.request("ticks", endpoint="/sse"))]
    assert [g.decode() for g in got] == ["tick 0", "tick 1", "tick 2"]

@pytest.mark.anyio
async def test_not_found(dataio_store):
    async with dio.Registry() as registry:
        registry.register("prices", dio.HttpAdapter(base_url=URL))
        async with dio.AsyncSession("prices", store=dataio_store, registry=registry) as s:
            with pytest.raises(dio.FetchError) as caught:
                await s.fetch(s.request("missing", endpoint="/missing"))
    assert caught.value.transport_status == 404
"""


def test_http_refusals_and_sse_streams_replay(inner: pytest.Pytester, upstream: Upstream) -> None:
    inner.makepyfile(test_http=HTTP_AND_SSE.format(url=upstream.url))
    inner.runpytest("--dataio-record-mode=once").assert_outcomes(passed=2)
    hits = dict(upstream.hits)
    assert hits == {"/sse": 2, "/missing": 1}
    upstream.stop()
    inner.runpytest("--dataio-record-mode=none").assert_outcomes(passed=2)
    assert upstream.hits == hits


FILES_AND_CUSTOM = '''
import pathlib
import pytest
import mxm_dataio_async as dio

DATA = pathlib.Path(r"{data}")
CALLS = []

class Oracle:
    """A user's adapter: fetch(request) -> bytes."""

    async def fetch(self, request):
        CALLS.append(request.endpoint)
        return f"oracle says {{request.params['q']}}".encode()

@pytest.mark.anyio
async def test_file(dataio_store):
    async with dio.Registry() as registry:
        registry.register("files", dio.FileAdapter(DATA))
        async with dio.AsyncSession("files", store=dataio_store, registry=registry) as s:
            body = await s.read(await s.fetch(s.request("csv", endpoint="prices.csv")))
    assert body == b"date,close\\r\\n2024-01-02,10.5\\r\\n"

@pytest.mark.anyio
async def test_custom(dataio_store, dataio_recording):
    async with dio.Registry() as registry:
        registry.register("oracle", Oracle())
        async with dio.AsyncSession(
            "oracle", store=dataio_store, registry=registry, cache_mode="bypass"
        ) as s:
            body = await s.read(await s.fetch(s.request("ask", params={{"q": "rain"}})))
    assert body == b"oracle says rain"
    assert CALLS == ([] if dataio_recording.replaying else [None])
'''


def test_files_and_a_custom_adapter_replay(inner: pytest.Pytester) -> None:
    data = inner.mkdir("data")
    (data / "prices.csv").write_bytes(b"date,close\r\n2024-01-02,10.5\r\n")
    inner.makepyfile(test_other=FILES_AND_CUSTOM.format(data=data))
    inner.runpytest("--dataio-record-mode=once").assert_outcomes(passed=2)
    (data / "prices.csv").unlink()  # replay needs only the recording
    inner.runpytest("--dataio-record-mode=none").assert_outcomes(passed=2)
