"""The network is blocked while replaying (and everywhere with --dataio-block-network); secrets
never reach a recording; xdist workers each record and replay their own tests."""

from __future__ import annotations

import gc
import json
import socket
import urllib.request
import warnings

import pytest

from mxm_dataio_async._pytest._network import NetworkBlocked, blocking_network
from tests.plugin.conftest import Upstream

pytest_plugins = ["pytester"]

DIRECT = """
import pytest
import mxm_dataio_async as dio

URL = "{url}"

@pytest.mark.anyio
async def test_other_store(dataio_store, tmp_path):
    # a session on another store reaches its adapter for real: blocked while replaying
    async with dio.Registry() as registry:
        registry.register("prices", dio.HttpAdapter(base_url=URL))
        async with dio.AsyncSession("prices", root=str(tmp_path), registry=registry) as s:
            await s.fetch(s.request("quote", endpoint="/quote"))
"""


def test_replaying_blocks_the_network(inner: pytest.Pytester, upstream: Upstream) -> None:
    inner.makepyfile(test_direct=DIRECT.format(url=upstream.url))
    result = inner.runpytest("--dataio-record-mode=none")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["*network access blocked by the mxm-dataio pytest plugin*a connect to 127.0.0.1:*"]
    )
    assert upstream.hits == {}
    # an allowed host goes through
    inner.runpytest(
        "--dataio-record-mode=none", "--dataio-allowed-hosts=localhost"
    ).assert_outcomes(passed=1)
    assert upstream.hits["/quote"] == 1


def test_a_blocked_connect_leaves_no_socket_open(upstream: Upstream) -> None:
    # socket.create_connection closes its socket on OSError only; NetworkBlocked is not one, so
    # the guard closes it: otherwise a ResourceWarning surfaces in whichever test collects it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        with blocking_network((), "a test"):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            with pytest.raises(NetworkBlocked):
                sock.connect(("127.0.0.1", 9))
            assert sock.fileno() == -1
            with pytest.raises(NetworkBlocked):
                urllib.request.urlopen(f"{upstream.url}/quote")
        gc.collect()
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []
    assert upstream.hits == {}


PLAIN = """
import urllib.request

def test_plain():
    urllib.request.urlopen("{url}/quote").read()
"""


def test_block_network_option_covers_every_test(inner: pytest.Pytester, upstream: Upstream) -> None:
    inner.makepyfile(test_plain=PLAIN.format(url=upstream.url))
    inner.runpytest().assert_outcomes(passed=1)  # not blocked unless asked
    result = inner.runpytest("--dataio-block-network")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*NetworkBlocked: network access blocked*"])
    assert upstream.hits["/quote"] == 1
    inner.runpytest("--dataio-block-network", "--dataio-allowed-hosts=127.0.0.1").assert_outcomes(
        passed=1
    )


SECRETS = """
import pytest
import mxm_dataio_async as dio

URL = "{url}"

@pytest.mark.anyio
@pytest.mark.dataio(redact_headers=["X-Token"], redact_params=["session"])
async def test_secrets(dataio_store):
    async with dio.Registry() as registry:
        registry.register("api", dio.HttpAdapter(base_url=URL))
        async with dio.AsyncSession("api", store=dataio_store, registry=registry) as s:
            await s.fetch(s.request("quote", endpoint="/quote",
                                    params={{"symbol": "X", "token": "tok-123", "session": "s-42"}},
                                    headers={{"X-Token": "hdr-456"}}))
"""

ECHO = """
import pytest
import mxm_dataio_async as dio

URL = "{url}"

@pytest.mark.anyio
async def test_echo(dataio_store):
    async with dio.Registry() as registry:
        registry.register("api", dio.HttpAdapter(base_url=URL))
        async with dio.AsyncSession("api", store=dataio_store, registry=registry) as s:
            # the server echoes the header into the body: no header redaction hides that
            await s.fetch(s.request("echo", endpoint="/echo", headers={{"X-Token": "hdr-456"}}))
"""


def test_secrets_never_reach_a_recording(
    inner: pytest.Pytester, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    inner.makepyfile(test_secrets=SECRETS.format(url=upstream.url))
    inner.runpytest("--dataio-record-mode=once").assert_outcomes(passed=1)
    folder = inner.path / "recordings" / "test_secrets" / "test_secrets"
    text = "".join(p.read_text(errors="replace") for p in folder.rglob("*") if p.is_file())
    for secret in ("tok-123", "s-42", "hdr-456"):
        assert secret not in text
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["interactions"][0]["params"]["symbol"] == "X"

    # a configured secret value found anywhere (here in the payload) fails the test, unwritten
    monkeypatch.setenv("MY_API_TOKEN", "hdr-456")
    inner.makepyfile(test_echo=ECHO.format(url=upstream.url))
    result = inner.runpytest("--dataio-record-mode=once", "--dataio-secret-env=MY_API_TOKEN")
    result.assert_outcomes(passed=2, errors=1)  # test_secrets replays; test_echo errs
    result.stdout.fnmatch_lines(
        [
            "*SecretInRecording: a configured secret value would be written to the recording*"
            "requests.jsonl: request GET /echo*payloads/*: the response to api/echo*"
            "Nothing was written*"
        ]
    )
    assert not any((inner.path / "recordings" / "test_echo").iterdir())
    # the same through the marker
    marked = ECHO.replace(
        "@pytest.mark.anyio", '@pytest.mark.anyio\n@pytest.mark.dataio(secrets=["hdr-456"])'
    )
    inner.makepyfile(test_echo=marked.format(url=upstream.url))
    inner.runpytest("--dataio-record-mode=once").assert_outcomes(passed=2, errors=1)
    assert not any((inner.path / "recordings" / "test_echo").iterdir())


MANY = """
import pytest
import mxm_dataio_async as dio

URL = "{url}"

@pytest.mark.anyio
@pytest.mark.parametrize("symbol", ["A", "B", "C", "D", "E", "F"])
async def test_symbol(dataio_store, symbol):
    async with dio.Registry() as registry:
        registry.register("prices", dio.HttpAdapter(base_url=URL))
        async with dio.AsyncSession("prices", store=dataio_store, registry=registry) as s:
            body = await s.read(await s.fetch(
                s.request("quote", endpoint="/quote", params={{"symbol": symbol}})))
    assert body.startswith(b'{{"symbol": "' + symbol.encode())
"""


def test_xdist_workers_record_and_replay(inner: pytest.Pytester, upstream: Upstream) -> None:
    pytest.importorskip("xdist")
    inner.makepyfile(test_many=MANY.format(url=upstream.url))
    inner.runpytest("-n", "2", "--dataio-record-mode=once").assert_outcomes(passed=6)
    assert upstream.hits["/quote"] == 6
    folders = sorted(p.name for p in (inner.path / "recordings" / "test_many").iterdir())
    assert folders == [f"test_symbol[{s}]" for s in "ABCDEF"]
    upstream.stop()
    inner.runpytest("-n", "2", "--dataio-record-mode=none").assert_outcomes(passed=6)
