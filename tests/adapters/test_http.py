from __future__ import annotations

import asyncio
import hashlib
import json
import socket
from collections.abc import AsyncIterable, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import aiohttp
import anyio
import pytest

from mxm_dataio_async._exceptions import DataIOError, FetchError, TransientError
from mxm_dataio_async._models import (
    AdapterResult,
    CacheMode,
    Request,
    Response,
    ResponseStatus,
    new_id,
    utcnow,
)
from mxm_dataio_async._redact import REDACTED, Redaction
from mxm_dataio_async._request import build_request
from mxm_dataio_async.adapters.base import Closable, Fetcher, Revalidator, Sender, Streamer
from mxm_dataio_async.adapters.http import HttpAdapter, parse_retry_after
from tests.adapters.conftest import (
    BLOCK,
    ETAG,
    LAST_MODIFIED,
    LocalServer,
    RawHandler,
    read_head,
)

pytestmark = pytest.mark.anyio

MiB = 1 << 20
RawStart = Callable[[RawHandler], Awaitable[str]]


def req(endpoint: str | None = None, **kw: Any) -> Request:
    return build_request(session_id="t", source="http", kind="k", endpoint=endpoint, **kw)


def expected_body(size: int) -> bytes:
    return (BLOCK * (size // len(BLOCK) + 1))[:size]


async def drain(data: bytes | AsyncIterable[bytes]) -> tuple[int, int, str]:
    """(chunks, bytes, sha256) of a result body."""
    if isinstance(data, bytes):
        return 1, len(data), hashlib.sha256(data).hexdigest()
    h = hashlib.sha256()
    chunks = size = 0
    async for chunk in data:
        chunks += 1
        size += len(chunk)
        h.update(chunk)
    return chunks, size, h.hexdigest()


def body_json(result: AdapterResult) -> Any:
    assert isinstance(result.data, bytes)
    return json.loads(result.data)


def cached_response(headers: dict[str, str] | None) -> Response:
    return Response(
        id=new_id(),
        request_id=new_id(),
        request_hash="0" * 64,
        session_id="t",
        status=ResponseStatus.OK,
        checksum=None,
        size_bytes=0,
        fetched_at=utcnow(),
        cache_mode=CacheMode.DEFAULT,
        ttl_seconds=None,
        as_of_bucket=None,
        cache_tag=None,
        headers=headers,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# -- construction and lifecycle ----------------------------------------------------------------


def test_implements_protocols() -> None:
    adapter = HttpAdapter()
    for proto in (Fetcher, Sender, Streamer, Revalidator, Closable):
        assert isinstance(adapter, proto)
    assert isinstance(adapter.redaction, Redaction)


@pytest.mark.parametrize(
    ("base", "endpoint", "url"),
    [
        ("http://h/api", "/v1/x", "http://h/api/v1/x"),
        ("http://h/api/", "v1/x", "http://h/api/v1/x"),
        ("http://h/api/", "//v1/x", "http://h/api/v1/x"),
        ("http://h", "x", "http://h/x"),
        ("http://h/api/", None, "http://h/api"),
        ("http://h/api", "https://other/y", "https://other/y"),
    ],
)
def test_url_join_rule(base: str, endpoint: str | None, url: str) -> None:
    assert HttpAdapter(base).url_for(req(endpoint)) == url


def test_bad_construction() -> None:
    with pytest.raises(ValueError, match="base_url"):
        HttpAdapter("ftp://h")
    with pytest.raises(ValueError, match="query"):
        HttpAdapter("http://h/?a=1")
    with pytest.raises(ValueError, match="timeout"):
        HttpAdapter(timeout=0)
    with pytest.raises(ValueError, match="max_body"):
        HttpAdapter(max_body=-1)


def test_redaction_options() -> None:
    a = HttpAdapter(redact=["X-Token"], redact_params=["sig2"])
    assert a.redaction.is_secret_header("x-token")
    assert a.redaction.is_secret_header("Authorization")
    assert a.redaction.is_secret_param("SIG2")
    assert a.redaction.is_secret_param("api_key")
    b = HttpAdapter(redact=Redaction.extend(headers=["x-only"], replace=True), redact_params="p")
    assert b.redaction.is_secret_header("X-Only")
    assert not b.redaction.is_secret_header("authorization")
    assert b.redaction.is_secret_param("p")
    assert HttpAdapter(redact="X-One").redaction.is_secret_header("x-one")


def test_redaction_of_params_headers_and_urls() -> None:
    red = Redaction.extend(params=["Sig"])
    params = {"q": 1, "SIG": "s3cret", "api_key": "k"}
    assert red.has_secret_param(params) and not red.has_secret_param(["q", "page"])
    assert red.params_of(params) == {"q": 1, "SIG": REDACTED, "api_key": REDACTED}
    assert red.without_secret_params(params) == {"q": 1}
    assert red.headers_of({"Authorization": "Bearer x", "Accept": "*/*"}) == {
        "Authorization": REDACTED,
        "Accept": "*/*",
    }
    assert red.headers_of(None) is None
    # Repeated parameters keep their order and multiplicity; credentials leave the URL.
    assert red.url("https://u:p@h/x?a=1&sig=2&a=3") == f"https://h/x?a=1&sig={REDACTED}&a=3"
    assert red.url("https://h/x") == "https://h/x"


async def test_relative_endpoint_without_base_url() -> None:
    async with HttpAdapter() as adapter:
        with pytest.raises(FetchError, match="base_url"):
            await adapter.fetch(req("/x"))


async def test_aclose_idempotent_and_closed_adapter_refuses(server: LocalServer) -> None:
    adapter = HttpAdapter(server.url)
    assert "unopened" in repr(adapter)
    assert (await adapter.fetch(req("/echo"))).transport_status == 200
    assert "open" in repr(adapter)
    await adapter.aclose()
    await adapter.aclose()
    assert adapter.closed
    assert "closed" in repr(adapter)
    with pytest.raises(DataIOError, match="closed"):
        await adapter.fetch(req("/echo"))
    never_used = HttpAdapter()
    await never_used.aclose()
    await never_used.aclose()


async def test_connection_reuse(server: LocalServer) -> None:
    async with HttpAdapter(server.url, connector_limit=1) as adapter:
        for _ in range(3):
            await adapter.fetch(req("/echo"))
    assert len(server.seen) == 3
    assert len({s.peer for s in server.seen}) == 1


def test_bound_to_one_loop() -> None:
    # A sync test: drive two separate loops by hand.
    adapter = HttpAdapter("http://127.0.0.1:9")

    async def use() -> None:
        with pytest.raises(TransientError):
            await adapter.fetch(req("/x"))

    async def use_again() -> None:
        with pytest.raises(DataIOError, match="another event loop"):
            await adapter.fetch(req("/x"))

    asyncio.run(use())
    asyncio.run(use_again())
    assert adapter._session is not None
    asyncio.run(adapter._session.close())  # tidy up for the test only


# -- request mapping ---------------------------------------------------------------------------


async def test_query_mapping(server: LocalServer) -> None:
    params = {
        "a": [1, 2, None, "three"],
        "flag": True,
        "off": False,
        "skip": None,
        "s": "x y&z=é",
        "f": 1.5,
        "empty": [],
    }
    async with HttpAdapter(server.url) as adapter:
        result = await adapter.fetch(req("/echo", params=params))
    assert server.seen[-1].query == [
        ("a", "1"),
        ("a", "2"),
        ("a", "three"),
        ("flag", "true"),
        ("off", "false"),
        ("s", "x y&z=é"),
        ("f", "1.5"),
    ]
    assert result.transport_status == 200
    assert result.content_type == "application/json"
    assert result.encoding == "utf-8"
    assert result.error is None
    assert result.elapsed_ms is not None
    assert result.elapsed_ms > 0
    assert result.url is not None
    assert result.url.startswith(f"{server.url}/echo?a=1&a=2")
    assert result.headers is not None
    assert result.headers["Content-Type"].startswith("application/json")
    assert result.adapter_meta is not None
    assert result.adapter_meta["content_encoding"] is None
    assert "redirects" not in result.adapter_meta


async def test_params_extend_endpoint_query(server: LocalServer) -> None:
    async with HttpAdapter() as adapter:
        await adapter.fetch(req(f"{server.url}/echo?x=1", params={"y": 2}))
    assert server.seen[-1].query == [("x", "1"), ("y", "2")]


async def test_nested_param_refused(server: LocalServer) -> None:
    async with HttpAdapter(server.url) as adapter:
        with pytest.raises(FetchError, match="'nested'"):
            await adapter.fetch(req("/echo", params={"nested": {"a": 1}}))
    assert server.seen == []


async def test_post_json_body_and_header_merge(server: LocalServer) -> None:
    async with HttpAdapter(server.url, headers={"X-A": "1", "X-B": "adapter"}) as adapter:
        body = {"a": 1, "ü": ["é", None, True]}
        result = await adapter.fetch(req("/echo", method="POST", body=body, headers={"x-b": "req"}))
    seen = server.seen[-1]
    assert seen.method == "POST"
    assert json.loads(seen.body) == body
    assert seen.headers["Content-Type"] == "application/json"
    assert seen.headers["X-A"] == "1"
    assert seen.headers["X-B"] == "req"
    assert body_json(result)["method"] == "POST"


async def test_json_body_keeps_explicit_content_type(server: LocalServer) -> None:
    async with HttpAdapter(server.url) as adapter:
        headers = {"content-type": "application/vnd.api+json"}
        await adapter.fetch(req("/echo", method="PUT", body=[1], headers=headers))
    assert server.seen[-1].headers["Content-Type"] == "application/vnd.api+json"
    assert server.seen[-1].body == b"[1]"


async def test_no_body_when_body_is_none(server: LocalServer) -> None:
    async with HttpAdapter(server.url) as adapter:
        await adapter.fetch(req("/echo", method="POST"))
    assert server.seen[-1].body == b""


async def test_send_bytes_as_is(server: LocalServer) -> None:
    payload = bytes(range(256)) * 3
    async with HttpAdapter(server.url) as adapter:
        result = await adapter.send(
            req("/echo", method="PUT", params={"q": 1}, headers={"Content-Type": "x/raw"}),
            payload,
        )
        with pytest.raises(TypeError, match="bytes"):
            await adapter.send(req("/echo", method="PUT"), "text")  # type: ignore[arg-type]
    seen = server.seen[-1]
    assert seen.method == "PUT"
    assert seen.body == payload
    assert seen.query == [("q", "1")]
    assert seen.headers["Content-Type"] == "x/raw"
    assert result.transport_status == 200


# -- classification ----------------------------------------------------------------------------


@pytest.mark.parametrize("code", [500, 502, 503, 504, 599])
async def test_5xx_is_transient(server: LocalServer, code: int) -> None:
    async with HttpAdapter(server.url) as adapter:
        with pytest.raises(TransientError) as info:
            await adapter.fetch(req(f"/status/{code}"))
    assert info.value.transport_status == code
    assert info.value.retry_after is None
    assert f"HTTP {code}" in str(info.value)


@pytest.mark.parametrize(
    ("code", "error"),
    [
        (404, "HTTP 404 Not Found"),
        (400, "HTTP 400 Bad Request"),
        (403, "HTTP 403 Forbidden"),
        (501, "HTTP 501 Not Implemented"),
    ],
)
async def test_final_statuses_return_error_result(
    server: LocalServer, code: int, error: str
) -> None:
    async with HttpAdapter(server.url) as adapter:
        result = await adapter.fetch(req(f"/status/{code}"))
    assert result.error == error
    assert result.transport_status == code
    assert result.data == f"status {code}".encode()
    assert result.headers is not None
    assert result.headers["Content-Length"] == str(len(result.data))


async def test_429_retry_after_seconds(server: LocalServer) -> None:
    async with HttpAdapter(server.url) as adapter:
        with pytest.raises(TransientError) as info:
            await adapter.fetch(req("/status/429", params={"retry_after": "7"}))
    assert info.value.retry_after == 7.0
    assert info.value.transport_status == 429


async def test_429_retry_after_http_date(server: LocalServer) -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    async with HttpAdapter(server.url) as adapter:
        with pytest.raises(TransientError) as info:
            await adapter.fetch(req("/status/429", params={"retry_after": when}))
    assert info.value.retry_after is not None
    assert 25 <= info.value.retry_after <= 30


async def test_503_garbage_retry_after_ignored(server: LocalServer) -> None:
    async with HttpAdapter(server.url) as adapter:
        with pytest.raises(TransientError) as info:
            await adapter.fetch(req("/status/503", params={"retry_after": "soon-ish"}))
    assert info.value.retry_after is None


def test_parse_retry_after() -> None:
    now = datetime(2015, 10, 21, 7, 0, tzinfo=UTC)
    assert parse_retry_after("0") == 0.0
    assert parse_retry_after(" 120 ") == 120.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=now) == 28 * 60
    assert parse_retry_after("Wed, 21 Oct 2015 06:28:00 GMT", now=now) == 0.0
    for garbage in (None, "", "-5", "1.5", "soon", "Wed, 99 Foo 2015", "١٢"):
        assert parse_retry_after(garbage, now=now) is None


async def test_connection_refused_is_transient() -> None:
    async with HttpAdapter(f"http://127.0.0.1:{free_port()}") as adapter:
        with pytest.raises(TransientError, match="cannot connect") as info:
            await adapter.fetch(req("/x"))
    assert isinstance(info.value.__cause__, aiohttp.ClientError)


async def test_timeout_is_transient(server: LocalServer) -> None:
    async with HttpAdapter(server.url, timeout=0.2) as adapter:
        with pytest.raises(TransientError, match="timed out"):
            await adapter.fetch(req("/slow", params={"delay": 3}))


async def test_client_timeout_object_accepted(server: LocalServer) -> None:
    timeout = aiohttp.ClientTimeout(total=0.2)
    async with HttpAdapter(server.url, timeout=timeout) as adapter:
        assert adapter.timeout is timeout
        with pytest.raises(TransientError, match="timed out"):
            await adapter.fetch(req("/slow", params={"delay": 3}))


async def test_redirect_followed_final_url_redacted(server: LocalServer) -> None:
    async with HttpAdapter(server.url) as adapter:
        result = await adapter.fetch(req("/redirect", params={"api_key": "K3YSECRET", "a": 1}))
    assert result.transport_status == 200
    assert result.url == f"{server.url}/echo?api_key={REDACTED}&a=1"


async def test_invalid_url_is_final() -> None:
    async with HttpAdapter() as adapter:
        with pytest.raises(FetchError):
            await adapter.fetch(req("http://:bad:port/x"))


# -- integrity ---------------------------------------------------------------------------------


def _short_body(declared: int, sent: int, *, reset: bool = False) -> RawHandler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
            + f"Content-Length: {declared}\r\n\r\n".encode()
        )
        writer.write(b"x" * sent)
        await writer.drain()
        if reset:  # RST instead of FIN
            sock = writer.get_extra_info("socket")
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
        writer.close()

    return handler


@pytest.mark.parametrize("reset", [False, True])
async def test_truncated_small_body_is_transient(raw_server: RawStart, reset: bool) -> None:
    url = await raw_server(_short_body(100, 10, reset=reset))
    async with HttpAdapter(url) as adapter:
        with pytest.raises(TransientError, match=r"incomplete|lost"):
            await adapter.fetch(req("/"))


@pytest.mark.parametrize("reset", [False, True])
async def test_truncated_large_body_is_transient(raw_server: RawStart, reset: bool) -> None:
    url = await raw_server(_short_body(5 * MiB, 2 * MiB, reset=reset))
    async with HttpAdapter(url) as adapter:
        result = await adapter.fetch(req("/"))
        assert not isinstance(result.data, bytes)
        with pytest.raises(TransientError, match=r"incomplete|lost"):
            await drain(result.data)


async def test_truncated_chunked_body_is_transient(raw_server: RawStart) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()  # and close without the terminating 0-chunk

    url = await raw_server(handler)
    async with HttpAdapter(url) as adapter:
        with pytest.raises(TransientError, match="incomplete"):
            await adapter.fetch(req("/"))


async def test_gzip_body_is_decoded(server: LocalServer) -> None:
    async with HttpAdapter(server.url) as adapter:
        result = await adapter.fetch(req("/gzip"))
    assert result.data == b"hello gzip " * 100
    assert result.adapter_meta is not None
    assert result.adapter_meta["content_encoding"] == "gzip"
    assert result.content_type == "text/plain"
    assert result.encoding == "utf-8"


# -- large bodies ------------------------------------------------------------------------------


async def test_large_body_streamed_and_released(server: LocalServer) -> None:
    size = 5 * MiB + 123
    async with HttpAdapter(server.url, connector_limit=1) as adapter:
        result = await adapter.fetch(req("/big", params={"size": size}))
        assert not isinstance(result.data, bytes)
        chunks, got, digest = await drain(result.data)
        assert got == size
        assert chunks > 1
        assert digest == hashlib.sha256(expected_body(size)).hexdigest()
        assert getattr(result.data, "released", None) is True
        assert result.headers is not None
        assert result.headers["Content-Length"] == str(size)
        # With a pool of one, this only completes if the connection went back to the pool.
        with anyio.fail_after(5):
            again = await adapter.fetch(req("/echo"))
        assert again.transport_status == 200


async def test_unconsumed_stream_aclose_releases(server: LocalServer) -> None:
    async with HttpAdapter(server.url, connector_limit=1) as adapter:
        result = await adapter.fetch(req("/big", params={"size": 8 * MiB}))
        stream = result.data
        assert not isinstance(stream, bytes)
        await stream.aclose()  # type: ignore[attr-defined]
        await stream.aclose()  # type: ignore[attr-defined]
        assert [c async for c in stream] == []
        with anyio.fail_after(5):
            await adapter.fetch(req("/echo"))
        # Stopping part-way releases it too.
        result = await adapter.fetch(req("/big", params={"size": 8 * MiB}))
        stream = result.data
        assert not isinstance(stream, bytes)
        async for _ in stream:
            break
        await stream.aclose()  # type: ignore[attr-defined]
        with anyio.fail_after(5):
            await adapter.fetch(req("/echo"))


@pytest.mark.parametrize(
    ("size", "streamed"), [(1000, False), (MiB, False), (MiB + 1, True), (3 * MiB, True)]
)
async def test_chunked_body_threshold(server: LocalServer, size: int, streamed: bool) -> None:
    async with HttpAdapter(server.url) as adapter:
        result = await adapter.fetch(req("/chunked", params={"size": size}))
        assert result.headers is not None
        assert "Content-Length" not in result.headers
        assert isinstance(result.data, bytes) is not streamed
        _, got, digest = await drain(result.data)
    assert got == size
    assert digest == hashlib.sha256(expected_body(size)).hexdigest()


async def test_small_threshold_streams_declared_bodies(server: LocalServer) -> None:
    async with HttpAdapter(server.url, stream_threshold=5) as adapter:
        result = await adapter.fetch(req("/status/404"))
        assert not isinstance(result.data, bytes)
        assert result.error == "HTTP 404 Not Found"
        assert (await drain(result.data))[1] == len("status 404")


async def test_max_body_declared(server: LocalServer) -> None:
    async with HttpAdapter(server.url, max_body=MiB, connector_limit=1) as adapter:
        with pytest.raises(FetchError, match="max_body"):
            await adapter.fetch(req("/big", params={"size": 2 * MiB}))
        ok = await adapter.fetch(req("/big", params={"size": MiB}))
        assert (await drain(ok.data))[1] == MiB


async def test_max_body_chunked_while_buffering(server: LocalServer) -> None:
    async with HttpAdapter(server.url, max_body=100_000) as adapter:
        with pytest.raises(FetchError, match="max_body=100000"):
            await adapter.fetch(req("/chunked", params={"size": 200_000}))


async def test_max_body_while_streaming(server: LocalServer) -> None:
    async with HttpAdapter(server.url, max_body=3 * MiB, connector_limit=1) as adapter:
        result = await adapter.fetch(req("/chunked", params={"size": 5 * MiB}))
        assert not isinstance(result.data, bytes)
        with pytest.raises(FetchError, match="exceeds max_body"):
            await drain(result.data)
        assert getattr(result.data, "released", None) is True
        with anyio.fail_after(5):
            await adapter.fetch(req("/echo"))


# -- revalidation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("which", "sent"),
    [
        ("etag", {"If-None-Match": ETAG}),
        ("lastmod", {"If-Modified-Since": LAST_MODIFIED}),
        ("both", {"If-None-Match": ETAG, "If-Modified-Since": LAST_MODIFIED}),
    ],
)
async def test_revalidate_304(server: LocalServer, which: str, sent: dict[str, str]) -> None:
    async with HttpAdapter(server.url) as adapter:
        first = await adapter.fetch(req(f"/cond/{which}"))
        assert first.data == b"the content"
        assert first.headers is not None
        # Stored headers may come back in any case.
        stored = {k.lower(): v for k, v in first.headers.items()}
        result = await adapter.revalidate(req(f"/cond/{which}"), cached_response(stored))
    assert result.not_modified
    assert result.transport_status == 304
    assert result.data == b""
    assert result.error is None
    assert result.headers is not None
    seen = server.seen[-1].headers
    for name, value in sent.items():
        assert seen[name] == value
    for name in {"If-None-Match", "If-Modified-Since"} - sent.keys():
        assert name not in seen


async def test_revalidate_changed_resource(server: LocalServer) -> None:
    async with HttpAdapter(server.url) as adapter:
        result = await adapter.revalidate(
            req("/cond/etag"), cached_response({"ETag": '"old"', "Content-Type": "text/plain"})
        )
    assert not result.not_modified
    assert result.transport_status == 200
    assert result.data == b"the content"
    assert server.seen[-1].headers["If-None-Match"] == '"old"'


async def test_revalidate_without_validators_is_plain_fetch(server: LocalServer) -> None:
    async with HttpAdapter(server.url) as adapter:
        for headers in (None, {"Content-Type": "text/plain"}):
            result = await adapter.revalidate(req("/echo"), cached_response(headers))
            assert not result.not_modified
            assert result.transport_status == 200
            seen = server.seen[-1].headers
            assert "If-None-Match" not in seen
            assert "If-Modified-Since" not in seen


# -- secrets -----------------------------------------------------------------------------------


def assert_clean(obj: object, secrets: list[str]) -> None:
    text = repr(obj)
    for secret in secrets:
        assert secret not in text, f"{secret} leaked into {text}"


async def test_secrets_redacted_in_result(server: LocalServer) -> None:
    secrets = ["HDRSECRET", "PARAMSECRET", "SIGSECRET", "SETCOOKIESECRET", "CUSTOMSECRET"]
    adapter = HttpAdapter(
        server.url,
        headers={"Authorization": "Bearer HDRSECRET", "X-Custom-Token": "CUSTOMSECRET"},
        redact=["X-Custom-Token"],
        redact_params=["sig2"],
    )
    async with adapter:
        result = await adapter.fetch(
            req("/secret-headers", params={"api_key": "PARAMSECRET", "sig2": "SIGSECRET", "a": 1})
        )
    seen = server.seen[-1]
    assert seen.headers["Authorization"] == "Bearer HDRSECRET"  # the upstream got them
    assert ("api_key", "PARAMSECRET") in seen.query
    assert_clean([result.url, result.headers, result.adapter_meta], secrets)
    assert result.url == f"{server.url}/secret-headers?api_key={REDACTED}&sig2={REDACTED}&a=1"
    assert result.headers is not None
    assert result.headers["Set-Cookie"] == REDACTED
    assert result.headers["X-Multi"] == "a, b"
    assert result.headers["X-Plain"] == "visible"


async def test_url_credentials_redacted(server: LocalServer) -> None:
    base = server.url.replace("http://", "http://user:URLSECRET@")
    async with HttpAdapter(base) as adapter:
        result = await adapter.fetch(req("/echo"))
        with pytest.raises(TransientError) as info:
            await adapter.fetch(req("/status/503", params={"token": "TOKSECRET"}))
    assert server.seen[0].headers["Authorization"].startswith("Basic ")  # sent, as Basic auth
    assert_clean([result.url, result.headers, result.adapter_meta], ["URLSECRET", "user:"])
    assert_clean(str(info.value), ["URLSECRET", "TOKSECRET"])
    assert "URLSECRET" not in repr(adapter)


async def test_error_messages_redacted() -> None:
    port = free_port()
    async with HttpAdapter(f"http://u:PWSECRET@127.0.0.1:{port}") as adapter:
        with pytest.raises(TransientError) as info:
            await adapter.fetch(req("/x", params={"api_key": "KSECRET"}))
    assert_clean(str(info.value), ["PWSECRET", "KSECRET"])


@pytest.mark.parametrize(
    "query", ["api%5Fkey=ESCSECRET", "API_KEY=ESCSECRET", "x=%20&token=ESCSECRET"]
)
async def test_result_url_redacts_escaped_and_cased_names(server: LocalServer, query: str) -> None:
    async with HttpAdapter() as adapter:
        result = await adapter.fetch(req(f"{server.url}/echo?{query}"))
    assert result.url is not None
    assert "ESCSECRET" not in result.url


# -- cancellation ------------------------------------------------------------------------------


async def test_cancelled_fetch_frees_the_connection(server: LocalServer) -> None:
    async with HttpAdapter(server.url, connector_limit=1) as adapter:
        with anyio.move_on_after(0.2) as scope:
            await adapter.fetch(req("/slow", params={"delay": 3}))
        assert scope.cancelled_caught
        with anyio.fail_after(5):
            assert (await adapter.fetch(req("/echo"))).transport_status == 200


async def test_cancelled_body_iteration_frees_the_connection(server: LocalServer) -> None:
    async with HttpAdapter(server.url, connector_limit=1) as adapter:
        result = await adapter.fetch(req("/big", params={"size": 64 * MiB}))
        stream = result.data
        assert not isinstance(stream, bytes)
        with anyio.CancelScope() as scope:
            async for _ in stream:
                scope.cancel()  # delivered at the next read's checkpoint
        assert getattr(stream, "released", None) is True
        with anyio.fail_after(5):
            assert (await adapter.fetch(req("/echo"))).transport_status == 200
