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


def test_a_missing_recording_fails_naming_the_request_and_how_to_record(
    inner: pytest.Pytester, upstream: Upstream
) -> None:
    inner.makepyfile(test_quotes=QUOTES.format(url=upstream.url, raw=RAW))
    result = inner.runpytest("--dataio-record-mode=none")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*fetch not recorded: GET '/quote' params={'symbol': 'CSPX.L'}*"
            "(there is no recording yet)*--dataio-record-mode=once 'test_quotes.py::test_quotes'*"
        ]
    )
    assert upstream.hits == {}  # the upstream was never reached
    assert not recording_of(inner).exists()


ANOTHER = """
import pytest
import mxm_dataio_async as dio

URL = "{url}"

@pytest.mark.anyio
async def test_quotes(dataio_store):
    async with dio.Registry() as registry:
        registry.register("prices", dio.HttpAdapter(base_url=URL))
        async with dio.AsyncSession("prices", store=dataio_store, registry=registry) as s:
            for symbol in {symbols!r}:
                await s.fetch(s.request("quote", endpoint="/quote", params={{"symbol": symbol}}))
"""


def symbols_in(folder: Path) -> list[str]:
    manifest = json.loads((folder / "manifest.json").read_text())
    return sorted(i["params"]["symbol"] for i in manifest["interactions"])


def test_modes_once_new_episodes_all_rewrite(inner: pytest.Pytester, upstream: Upstream) -> None:
    def run(mode: str, symbols: list[str]) -> pytest.RunResult:
        inner.makepyfile(test_quotes=ANOTHER.format(url=upstream.url, symbols=symbols))
        return inner.runpytest(f"--dataio-record-mode={mode}")

    folder = recording_of(inner)
    run("once", ["A"]).assert_outcomes(passed=1)
    assert upstream.hits["/quote"] == 1 and symbols_in(folder) == ["A"]
    # once, with a recording: replays it, and a new request fails instead of being recorded
    run("once", ["A"]).assert_outcomes(passed=1)
    assert upstream.hits["/quote"] == 1
    result = run("once", ["A", "B"])
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*fetch not recorded*'B'*--dataio-record-mode=new_episodes*"])
    assert symbols_in(folder) == ["A"]
    # new_episodes: A replayed, B recorded and added
    run("new_episodes", ["A", "B"]).assert_outcomes(passed=1)
    assert upstream.hits["/quote"] == 2 and symbols_in(folder) == ["A", "B"]
    run("none", ["B", "A"]).assert_outcomes(passed=1)
    # all: everything fetched again, the old interactions kept
    run("all", ["A"]).assert_outcomes(passed=1)
    assert upstream.hits["/quote"] == 3 and symbols_in(folder) == ["A", "A", "B"]
    # rewrite: only what this run fetched
    run("rewrite", ["C"]).assert_outcomes(passed=1)
    assert upstream.hits["/quote"] == 4 and symbols_in(folder) == ["C"]
    upstream.stop()
    run("none", ["C"]).assert_outcomes(passed=1)
    run("none", ["A"]).assert_outcomes(failed=1)


def test_the_marker_sets_the_mode_per_test(inner: pytest.Pytester, upstream: Upstream) -> None:
    source = ANOTHER.format(url=upstream.url, symbols=["M"]).replace(
        "@pytest.mark.anyio", '@pytest.mark.anyio\n@pytest.mark.dataio(record_mode="once")'
    )
    inner.makepyfile(test_quotes=source)
    inner.runpytest("--dataio-record-mode=none").assert_outcomes(passed=1)
    assert upstream.hits["/quote"] == 1
    assert symbols_in(recording_of(inner)) == ["M"]


def test_a_failing_test_writes_no_recording(inner: pytest.Pytester, upstream: Upstream) -> None:
    inner.makepyfile(
        test_quotes=ANOTHER.format(url=upstream.url, symbols=["F"]) + "    assert False\n"
    )
    inner.runpytest("--dataio-record-mode=once").assert_outcomes(failed=1)
    assert upstream.hits["/quote"] == 1
    assert not recording_of(inner).exists()


CONCURRENT = """
import pytest
import mxm_dataio_async as dio

URL = "{url}"
SYMBOLS = [f"S{{n}}" for n in range(20)]

@pytest.mark.anyio
@pytest.mark.parametrize("order", ["forward", "backward"])
async def test_concurrent(dataio_store, order):
    symbols = SYMBOLS if order == "forward" else SYMBOLS[::-1]
    async with dio.Registry() as registry:
        registry.register("prices", dio.HttpAdapter(base_url=URL))
        # bypass: every fetch reaches the adapter, so replays go through the recording's index
        async with dio.AsyncSession(
            "prices", store=dataio_store, registry=registry, cache_mode="bypass"
        ) as s:
            reqs = [s.request("quote", endpoint="/quote", params={{"symbol": x}})
                    for x in symbols * 3]  # every request three times
            seen = {{}}
            async for outcome in s.fetch_many(reqs, concurrency=16):
                assert outcome.ok, outcome.error
                body = await s.read(outcome.response)
                seen.setdefault(outcome.request.params["symbol"], set()).add(body)
    assert sorted(seen) == sorted(SYMBOLS)
    for symbol, bodies in seen.items():
        expected = '{{"symbol": "%s", "price": %s}}' % (symbol, len(symbol) * 10.5)
        assert bodies == {{expected.encode()}}
"""


def test_concurrent_and_repeated_requests_replay_by_identity(
    inner: pytest.Pytester, upstream: Upstream
) -> None:
    inner.makepyfile(test_concurrent=CONCURRENT.format(url=upstream.url))
    inner.runpytest("--dataio-record-mode=once").assert_outcomes(passed=2)
    recorded = upstream.hits["/quote"]
    assert recorded >= 40  # bypass: each of the 60 fetches per test may reach the upstream
    upstream.stop()
    # replayed in another order, at another concurrency than recorded
    result = inner.runpytest("--dataio-record-mode=none", "-p", "no:randomly")
    result.assert_outcomes(passed=2)
    assert upstream.hits["/quote"] == recorded


QUOTES_ASYNCIO = QUOTES.replace("@pytest.mark.anyio", "@pytest.mark.asyncio")


def test_tests_run_by_pytest_asyncio_record_and_replay(
    inner: pytest.Pytester, upstream: Upstream
) -> None:
    pytest.importorskip("pytest_asyncio")
    inner.makepyfile(test_quotes=QUOTES_ASYNCIO.format(url=upstream.url, raw=RAW))
    inner.runpytest("-p", "no:anyio", "--dataio-record-mode=once").assert_outcomes(passed=1)
    assert upstream.hits == {"/quote": 1, "/raw": 1}
    upstream.stop()
    inner.runpytest("-p", "no:anyio", "--dataio-record-mode=none").assert_outcomes(passed=1)
    assert upstream.hits == {"/quote": 1, "/raw": 1}
