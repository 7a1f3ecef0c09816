"""What HttpAdapter reports for the audit trail: the redirect hops it followed, the headers it
actually sent, what a retried error answered (URL, headers, the start of its body), the URL of
every failure, and its own elapsed time."""

from __future__ import annotations

import socket
from typing import Any

import anyio
import pytest

from mxm_dataio_async import _identity as identity
from mxm_dataio_async._exceptions import FetchError, TransientError
from mxm_dataio_async._models import Request
from mxm_dataio_async._redact import REDACTED
from mxm_dataio_async._request import build_request
from mxm_dataio_async.adapters.http import HttpAdapter
from tests.adapters.conftest import BLOCK, LocalServer

pytestmark = pytest.mark.anyio

KiB = 1 << 10


def req(endpoint: str | None = None, **kw: Any) -> Request:
    return build_request(session_id="t", source="http", kind="k", endpoint=endpoint, **kw)


async def test_redirect_hops_are_reported_in_order(server: LocalServer) -> None:
    async with HttpAdapter(server.url) as adapter:
        result = await adapter.fetch(req("/hops/3", params={"a": 1, "token": "HOPSECRET"}))
    assert result.transport_status == 200
    assert result.data == b"landed"
    assert result.url == f"{server.url}/hops/0?a=1&token={REDACTED}"
    assert result.adapter_meta is not None
    hops = result.adapter_meta["redirects"]
    assert [(h["status"], h["url"], h["location"]) for h in hops] == [
        (301, f"{server.url}/hops/3?a=1&token={REDACTED}", f"/hops/2?a=1&token={REDACTED}"),
        (307, f"{server.url}/hops/2?a=1&token={REDACTED}", f"/hops/1?a=1&token={REDACTED}"),
        (302, f"{server.url}/hops/1?a=1&token={REDACTED}", f"/hops/0?a=1&token={REDACTED}"),
    ]
    assert [h["headers"]["X-Hop"] for h in hops] == ["3", "2", "1"]
    assert [h["headers"]["Location"] for h in hops] == [h["location"] for h in hops]
    assert "HOPSECRET" not in repr(result)
    assert len(server.seen) == 4


async def test_no_redirects_no_hops(server: LocalServer) -> None:
    async with HttpAdapter(server.url) as adapter:
        result = await adapter.fetch(req("/echo"))
    assert result.adapter_meta is not None
    assert "redirects" not in result.adapter_meta


async def test_request_headers_as_sent(server: LocalServer) -> None:
    adapter = HttpAdapter(
        server.url, headers={"X-Adapter": "a", "Authorization": "Bearer SENTSECRET"}
    )
    async with adapter:
        result = await adapter.fetch(
            req("/echo", method="POST", body={"x": 1}, headers={"X-Request": "r"})
        )
    assert result.adapter_meta is not None
    sent = result.adapter_meta["request_headers"]
    assert isinstance(sent, dict)
    on_the_wire = server.seen[-1].headers
    # Every header the server received, and no other.
    assert {k.lower() for k in sent} == {k.lower() for k in on_the_wire}
    assert sent["X-Adapter"] == "a"
    assert sent["X-Request"] == "r"
    assert sent["Content-Type"] == "application/json"
    assert sent["User-Agent"] == on_the_wire["User-Agent"]
    assert sent["Accept-Encoding"] == on_the_wire["Accept-Encoding"]
    assert sent["Authorization"] == REDACTED
    assert on_the_wire["Authorization"] == "Bearer SENTSECRET"
    # header names are plain str (aiohttp's are istr): what orjson writes to the JSON columns
    assert result.headers is not None
    assert {type(k) for k in [*sent, *result.headers]} == {str}
    try:
        import orjson  # noqa: F401  (the fast extra)
    except ImportError:
        return
    # orjson writes them, rather than the standard library's fallback
    assert identity._orjson_text(sent, 0) is not None
    assert identity._orjson_text(result.headers, 0) is not None


async def test_request_headers_on_error_results_and_304(server: LocalServer) -> None:
    async with HttpAdapter(server.url) as adapter:
        result = await adapter.fetch(req("/status/404", headers={"X-Why": "audit"}))
    assert result.error == "HTTP 404 Not Found"
    assert result.adapter_meta is not None
    assert result.adapter_meta["request_headers"]["X-Why"] == "audit"


async def test_retried_status_carries_what_the_upstream_answered(server: LocalServer) -> None:
    async with HttpAdapter(server.url, connector_limit=1) as adapter:
        with pytest.raises(TransientError) as info:
            await adapter.fetch(req("/status/503", params={"retry_after": "7", "api_key": "K"}))
        with anyio.fail_after(10):  # the small body was read: the connection is reused
            assert (await adapter.fetch(req("/echo"))).transport_status == 200
    exc = info.value
    assert exc.transport_status == 503
    assert exc.retry_after == 7.0
    assert exc.url == f"{server.url}/status/503?retry_after=7&api_key={REDACTED}"
    assert exc.headers is not None
    assert exc.headers["Retry-After"] == "7"
    assert exc.body == b"status 503"
    assert len({s.peer for s in server.seen}) == 1


async def test_retried_status_body_is_capped_at_64k(server: LocalServer) -> None:
    async with HttpAdapter(server.url) as adapter:
        with anyio.fail_after(10), pytest.raises(TransientError) as info:
            await adapter.fetch(req("/error-body", params={"code": 429, "size": 200 * KiB}))
    assert info.value.transport_status == 429
    assert info.value.body == (BLOCK * 4)[: 64 * KiB]


async def test_retried_status_after_a_redirect_names_the_url_that_answered(
    server: LocalServer,
) -> None:
    async with HttpAdapter(server.url) as adapter:
        with pytest.raises(TransientError) as info:
            await adapter.fetch(req("/redirect", params={"to": "/status/502"}))
    assert info.value.url is not None
    assert info.value.url.startswith(f"{server.url}/status/502?")


async def test_failures_without_a_response_carry_the_url() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://u:PWSECRET@127.0.0.1:{port}"
    async with HttpAdapter(base) as adapter:
        with pytest.raises(TransientError, match="cannot connect") as info:
            await adapter.fetch(req("/x", params={"q": "1", "token": "T"}))
    assert info.value.url == f"http://127.0.0.1:{port}/x?q=1&token={REDACTED}"
    assert info.value.headers is None
    async with HttpAdapter() as adapter:
        with pytest.raises(FetchError) as final:
            await adapter.fetch(req("http://:bad:port/x"))
    assert final.value.url is not None


async def test_elapsed_ms_is_the_adapters_own_time(server: LocalServer) -> None:
    async with HttpAdapter(server.url, stream_threshold=1000) as adapter:
        small = await adapter.fetch(req("/echo"))
        large = await adapter.fetch(req("/big", params={"size": 100 * KiB}))
        assert not isinstance(large.data, bytes)
        async for _ in large.data:
            pass
    assert small.elapsed_ms is not None
    assert small.elapsed_ms > 0
    # A streamed body ends after the result is returned: its end is the caller's to measure.
    assert large.elapsed_ms is None
