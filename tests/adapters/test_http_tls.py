"""HttpAdapter's connection options: TLS with a private CA (made here with the openssl CLI), a
client certificate, a proxy, and trust_env. Every server is on 127.0.0.1."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from mxm_dataio_async._exceptions import DataIOError, FetchError
from mxm_dataio_async._models import Request
from mxm_dataio_async._redact import REDACTED
from mxm_dataio_async._request import build_request
from mxm_dataio_async.adapters.http import HttpAdapter
from tests.adapters.conftest import LocalServer, RawHandler, read_head

pytestmark = pytest.mark.anyio

RawStart = Callable[[RawHandler], Awaitable[str]]


def req(endpoint: str | None = "/who", **kw: Any) -> Request:
    return build_request(session_id="t", source="http", kind="k", endpoint=endpoint, **kw)


@dataclass(frozen=True)
class PKI:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    client_combined: Path  # certificate and key in one PEM file


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _issue(d: Path, name: str, subject: str, ext: str) -> None:
    (d / f"{name}.ext").write_text(ext)
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=d,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d,
    )  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    """A private CA, a server certificate for 127.0.0.1 and a client certificate, all new."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI makes the test certificates")
    d = tmp_path_factory.mktemp("pki")
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=mxm test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d,
    )  # fmt: skip
    common = "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\nbasicConstraints=CA:FALSE\n"
    _issue(
        d,
        "server",
        "/CN=127.0.0.1",
        common + "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    _issue(d, "client", "/CN=mxm test client", common + "extendedKeyUsage=clientAuth\n")
    combined = d / "client-combined.pem"
    combined.write_bytes((d / "client.pem").read_bytes() + (d / "client.key").read_bytes())
    return PKI(
        ca=d / "ca.pem",
        server_cert=d / "server.pem",
        server_key=d / "server.key",
        client_cert=d / "client.pem",
        client_key=d / "client.key",
        client_combined=combined,
    )


async def who(request: web.Request) -> web.Response:
    """Answers with the client certificate's common name, or "anonymous"."""
    assert request.transport is not None
    peer = request.transport.get_extra_info("peercert") or {}
    names = [value for rdn in peer.get("subject", ()) for key, value in rdn if key == "commonName"]
    return web.Response(text=names[0] if names else "anonymous")


StartTLS = Callable[..., Awaitable[str]]


@pytest.fixture
async def tls_server(pki: PKI) -> AsyncIterator[StartTLS]:
    """``await tls_server(require_client_cert=False)``: an HTTPS server on 127.0.0.1; its URL."""
    runners: list[web.AppRunner] = []

    async def start(*, require_client_cert: bool = False) -> str:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pki.server_cert, pki.server_key)
        if require_client_cert:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(pki.ca)
        app = web.Application()
        app.router.add_get("/who", who)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        return f"https://127.0.0.1:{runner.addresses[0][1]}"

    try:
        yield start
    finally:
        for runner in runners:
            await runner.cleanup()


# -- TLS -------------------------------------------------------------------------------------


async def test_private_ca_is_refused_by_default(tls_server: StartTLS) -> None:
    url = await tls_server()
    async with HttpAdapter(url) as adapter:
        with pytest.raises(FetchError, match="TLS failure") as info:
            await adapter.fetch(req())
    assert info.value.url == f"{url}/who"


async def test_ssl_option_trusts_a_private_ca(tls_server: StartTLS, pki: PKI) -> None:
    url = await tls_server()
    context = ssl.create_default_context(cafile=pki.ca)
    for option in (str(pki.ca), pki.ca, context, False):
        async with HttpAdapter(url, ssl=option) as adapter:
            result = await adapter.fetch(req())
        assert result.data == b"anonymous", option
        assert result.transport_status == 200


async def test_client_certificate(tls_server: StartTLS, pki: PKI) -> None:
    url = await tls_server(require_client_cert=True)
    async with HttpAdapter(url, ssl=pki.ca) as adapter:
        with pytest.raises(DataIOError):  # the server wants a certificate
            await adapter.fetch(req())
    for cert in ((pki.client_cert, pki.client_key), str(pki.client_combined)):
        async with HttpAdapter(url, ssl=pki.ca, client_cert=cert) as adapter:
            result = await adapter.fetch(req())
        assert result.data == b"mxm test client", cert
    # ssl=False (no verification of the server) still presents the certificate.
    async with HttpAdapter(url, ssl=False, client_cert=pki.client_combined) as adapter:
        assert (await adapter.fetch(req())).data == b"mxm test client"


def test_tls_options_are_checked_up_front(pki: PKI, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="SSLContext"):
        HttpAdapter(ssl=ssl.create_default_context(), client_cert=pki.client_combined)
    with pytest.raises(ValueError, match="CA bundle"):
        HttpAdapter(ssl=tmp_path / "missing.pem")
    with pytest.raises(ValueError, match="client_cert"):
        HttpAdapter(client_cert=tmp_path / "missing.pem")
    with pytest.raises(TypeError, match="ssl must be"):
        HttpAdapter(ssl=42)  # type: ignore[arg-type]


# -- proxy -----------------------------------------------------------------------------------


@dataclass
class Proxy:
    url: str
    seen: list[tuple[str, dict[str, str]]]  # request line, headers


@pytest.fixture
async def proxy(raw_server: RawStart) -> Proxy:
    """A forward proxy that answers every request itself, recording what it was asked."""
    seen: list[tuple[str, dict[str, str]]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await read_head(reader)).decode("latin-1").split("\r\n")
        headers = dict(line.split(": ", 1) for line in head[1:] if line)
        seen.append((head[0], headers))
        body = b"via proxy"
        writer.write(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()

    return Proxy(await raw_server(handler), seen)


async def test_proxy_option(proxy: Proxy) -> None:
    with_credentials = proxy.url.replace("http://", "http://puser:PROXYSECRET@")
    async with HttpAdapter("http://upstream.invalid", proxy=with_credentials) as adapter:
        result = await adapter.fetch(req("/x", params={"a": 1}))
    assert result.data == b"via proxy"
    ((line, headers),) = proxy.seen
    assert line == "GET http://upstream.invalid/x?a=1 HTTP/1.1"
    assert headers["Proxy-Authorization"].startswith("Basic ")
    assert "PROXYSECRET" not in repr(adapter)
    assert result.adapter_meta is not None
    sent = result.adapter_meta["request_headers"]
    assert sent["Proxy-Authorization"] == REDACTED  # sent to the proxy, and redacted
    with pytest.raises(ValueError, match="proxy"):
        HttpAdapter(proxy="socks5://127.0.0.1:1080")


@pytest.fixture
def env_proxy(proxy: Proxy, monkeypatch: pytest.MonkeyPatch) -> Proxy:
    for name in ("http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(name, proxy.url)
    for name in ("no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    return proxy


async def test_trust_env_takes_the_proxy_from_the_environment(env_proxy: Proxy) -> None:
    async with HttpAdapter("http://upstream.invalid", trust_env=True) as adapter:
        result = await adapter.fetch(req("/y"))
    assert result.data == b"via proxy"
    assert [line for line, _ in env_proxy.seen] == ["GET http://upstream.invalid/y HTTP/1.1"]


async def test_environment_is_ignored_by_default(env_proxy: Proxy, server: LocalServer) -> None:
    async with HttpAdapter(server.url) as adapter:
        result = await adapter.fetch(req("/echo"))
    assert result.transport_status == 200
    assert env_proxy.seen == []
    assert len(server.seen) == 1


async def test_a_job_files_http_source_takes_the_tls_options(
    tls_server: StartTLS, pki: PKI, tmp_path: Path
) -> None:
    """``ssl`` and ``client_cert`` in a job file, as paths relative to the job file's folder."""
    import yaml

    from mxm_dataio_async.jobs import JobConfigError, load_job, run_job

    url = await tls_server(require_client_cert=True)
    for name in ("ca.pem", "client.pem", "client.key"):
        (tmp_path / name).write_bytes((pki.ca.parent / name).read_bytes())
    source = {
        "adapter": "http",
        "base_url": url,
        "ssl": "ca.pem",
        "client_cert": ["client.pem", "client.key"],
        "total_timeout": 30,
        "max_field_size": 100_000,
    }
    job = {
        "job": "tls",
        "store": "./dataio",
        "sources": {"api": source},
        "requests": [{"source": "api", "kind": "who", "endpoint": "/who"}],
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job), encoding="utf-8")
    summary = await run_job(path)
    assert (summary.ok, summary.fetched) == (True, 1)
    path.write_text(yaml.safe_dump({**job, "sources": {"api": {**source, "ssl": "no.pem"}}}))
    with pytest.raises(JobConfigError, match=r"sources\.api: ssl: cannot load the CA bundle"):
        load_job(path)
