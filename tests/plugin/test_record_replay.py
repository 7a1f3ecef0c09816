"""Record against a loopback upstream, replay with it stopped: each record mode, exact bytes,
concurrency and repeats, a request not recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.plugin.conftest import RAW, Upstream

pytest_plugins = ["pytester"]

QUOTES = """
import anyio
import pytest
import mxm_dataio_async as dio

URL = "{url}"

@pytest.mark.anyio
async def test_quotes(dataio_store):
    async with dio.Registry() as registry:
        registry.register("prices", dio.HttpAdapter(base_url=URL))
        async with dio.AsyncSession("prices", store=dataio_store, registry=registry) as s:
            q = s.request("quote", endpoint="/quote", params={{"symbol": "CSPX.L"}})
            resp = await s.fetch(q)
            assert resp.status == "ok"
            assert await s.read(resp) == b'{{"symbol": "CSPX.L", "price": 63.0}}'
            raw = await s.read(await s.fetch(s.request("raw", endpoint="/raw")))
            assert raw == {raw!r}
"""


def recording_of(pytester: pytest.Pytester, test: str = "test_quotes") -> Path:
    return pytester.path / "recordings" / "test_quotes" / test


def test_once_records_then_none_replays_with_the_upstream_stopped(
    inner: pytest.Pytester, upstream: Upstream
) -> None:
    inner.makepyfile(test_quotes=QUOTES.format(url=upstream.url, raw=RAW))
    inner.runpytest("--dataio-record-mode=once").assert_outcomes(passed=1)
    assert upstream.hits == {"/quote": 1, "/raw": 1}
    folder = recording_of(inner)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["counts"]["responses"] == 2
    assert {i["endpoint"] for i in manifest["interactions"]} == {"/quote", "/raw"}
    payloads = {p.name: p.read_bytes() for p in (folder / "payloads").iterdir()}
    assert RAW in payloads.values()  # the exact bytes, as a plain file

    upstream.stop()
    result = inner.runpytest("--dataio-record-mode=none")
    result.assert_outcomes(passed=1)
    assert upstream.hits == {"/quote": 1, "/raw": 1}
    # the default mode is none: a plain run replays too, and leaves the recording unchanged
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    inner.runpytest().assert_outcomes(passed=1)
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
