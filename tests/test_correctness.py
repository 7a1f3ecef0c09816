"""Regression tests for the core's share of issue 14 (correctness against real use): unsafe
retries, cached bytes that do not answer the request, what error rows keep, how long an attempt
waited, stream drops, and sessions that said "ok" when they were not."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from contextlib import closing
from pathlib import Path
from typing import Any

import anyio
import pytest
from aiohttp import web

import mxm_dataio_async as dio
from mxm_dataio_async.testing import FakeClock
from tests._serve import serving

pytestmark = pytest.mark.anyio


def rows(root: Path, sql: str) -> list[tuple[Any, ...]]:
    with closing(sqlite3.connect(root / "dataio.sqlite")) as conn:
        return conn.execute(sql).fetchall()


def registry_with(handler: Any, **register: Any) -> dio.Registry:
    reg = dio.Registry(clock=FakeClock())
    reg.register("m", dio.MockAdapter(handler), **register)
    return reg


# -- 2. unsafe retries ---------------------------------------------------------------------------


class Upstream:
    """Fails each call with the next error of a script, then answers."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0

    def __call__(self, request: dio.Request) -> bytes:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return b"done"


@pytest.mark.parametrize(
    ("error", "method", "body"),
    [
        (dio.TransientError("read timed out after the request was sent"), "POST", None),
        (dio.TransientError("HTTP 503", transport_status=503), "POST", None),
        (dio.TransientError("HTTP 500", transport_status=500), "PATCH", None),
        (dio.TransientError("connection reset"), "PUT", {"a": 1}),  # any method with a body
    ],
)
async def test_a_request_not_safe_to_repeat_is_not_sent_twice(
    tmp_path: Path, error: Exception, method: str, body: Any
) -> None:
    upstream = Upstream(error)
    reg = registry_with(upstream, retry=dio.RetryPolicy(max_attempts=3))
    async with dio.AsyncSession("m", root=str(tmp_path), registry=reg) as s:
        with pytest.raises(dio.FetchError, match="not safe to repeat") as info:
            await s.fetch(s.request("k", method=method, body=body))
    assert upstream.calls == 1 and info.value.attempts == 1


@pytest.mark.parametrize(
    "error",
    [
        dio.TransientError("cannot connect", not_sent=True),
        dio.TransientError("HTTP 503", transport_status=503, retry_after=2),
        dio.TransientError("HTTP 429", transport_status=429, retry_after=2),
    ],
)
async def test_an_unsafe_request_is_retried_when_the_upstream_never_acted_on_it(
    tmp_path: Path, error: Exception
) -> None:
    upstream = Upstream(error)
    reg = registry_with(upstream, retry=dio.RetryPolicy(max_attempts=3))
    async with dio.AsyncSession("m", root=str(tmp_path), registry=reg) as s:
        resp = await s.fetch(s.request("k", method="POST"))
    assert upstream.calls == 2 and resp.attempts == 2


async def test_retrying_an_unsafe_request_is_an_opt_in(tmp_path: Path) -> None:
    timeout = dio.TransientError("read timed out")
    per_request = Upstream(timeout)
    reg = registry_with(per_request)
    async with dio.AsyncSession("m", root=str(tmp_path / "a"), registry=reg) as s:
        assert (await s.fetch(s.request("k", method="POST", retry_unsafe=True))).attempts == 2
    per_source = Upstream(dio.TransientError("read timed out"))
    reg = registry_with(per_source, retry=dio.RetryPolicy(retry_unsafe=True))
    async with dio.AsyncSession("m", root=str(tmp_path / "b"), registry=reg) as s:
        assert (await s.fetch(s.request("k", method="POST"))).attempts == 2
    safe = Upstream(dio.TransientError("read timed out"))
    async with dio.AsyncSession("m", root=str(tmp_path / "c"), registry=registry_with(safe)) as s:
        assert (await s.fetch(s.request("k"))).attempts == 2  # a GET is retried as always


@pytest.fixture
async def posting_server() -> AsyncIterator[tuple[str, dict[str, int]]]:
    """``/slow`` takes the POST and never answers; ``/busy`` answers 503 (with Retry-After when
    asked); the number of POSTs each path received is counted."""
    hits: dict[str, int] = {}
    never = anyio.Event()

    async def slow(request: web.Request) -> web.Response:
        hits["slow"] = hits.get("slow", 0) + 1
        await never.wait()
        raise AssertionError("unreachable")

    async def busy(request: web.Request) -> web.Response:
        hits["busy"] = hits.get("busy", 0) + 1
        headers = {"Retry-After": "1"} if "retry_after" in request.query else {}
        if hits["busy"] > 1:
            return web.Response(text="done")
        return web.Response(status=503, headers=headers)

    app = web.Application()
    app.router.add_post("/slow", slow)
    app.router.add_post("/busy", busy)
    try:
        async with serving(app) as url:
            yield url, hits
    finally:
        never.set()


def http_registry(base_url: str, **adapter: Any) -> dio.Registry:
    reg = dio.Registry(clock=FakeClock())
    reg.register(
        "h",
        dio.HttpAdapter(base_url=base_url, **adapter),
        retry=dio.RetryPolicy(max_attempts=3),
    )
    return reg


async def test_a_post_the_server_took_is_not_sent_again_over_http(
    tmp_path: Path, posting_server: tuple[str, dict[str, int]]
) -> None:
    url, hits = posting_server
    async with (
        http_registry(url, timeout=0.2) as reg,
        dio.AsyncSession("h", root=str(tmp_path), registry=reg) as s,
    ):
        with pytest.raises(dio.FetchError, match="not safe to repeat"):
            await s.fetch(s.request("k", method="POST", endpoint="/slow", body={"order": 1}))
        with pytest.raises(dio.FetchError, match="not safe to repeat"):
            await s.fetch(s.request("k", method="POST", endpoint="/busy"))
    assert hits == {"slow": 1, "busy": 1}


async def test_a_post_is_retried_when_it_never_reached_the_server_or_was_told_to_over_http(
    tmp_path: Path, posting_server: tuple[str, dict[str, int]]
) -> None:
    url, hits = posting_server
    with socket.socket() as probe:  # a port nothing listens on: every connect is refused
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    async with (
        http_registry(closed) as reg,
        dio.AsyncSession("h", root=str(tmp_path / "a"), registry=reg) as s,
    ):
        with pytest.raises(dio.FetchError, match="cannot connect") as info:
            await s.fetch(s.request("k", method="POST", endpoint="/x", body={"order": 1}))
    assert info.value.attempts == 3  # every attempt, since none was sent
    async with (
        http_registry(url) as reg,
        dio.AsyncSession("h", root=str(tmp_path / "b"), registry=reg) as s,
    ):
        resp = await s.fetch(
            s.request("k", method="POST", endpoint="/busy", params={"retry_after": "1"})
        )
    assert (resp.attempts, hits) == (2, {"busy": 2})  # a 503 with Retry-After: sent again


# -- 3. cached bytes must answer the request -----------------------------------------------------


@pytest.fixture
async def negotiating_server() -> AsyncIterator[tuple[str, dict[str, int]]]:
    """Bytes by Range, and a body by Accept-Language with ``Vary: Accept-Language``."""
    hits: dict[str, int] = {}
    data = bytes(range(200))

    async def ranged(request: web.Request) -> web.Response:
        hits["ranged"] = hits.get("ranged", 0) + 1
        first, last = (int(x) for x in request.headers["Range"].split("=")[1].split("-"))
        return web.Response(status=206, body=data[first : last + 1])

    async def greeting(request: web.Request) -> web.Response:
        hits["greeting"] = hits.get("greeting", 0) + 1
        language = request.headers.get("Accept-Language", "en")
        text = {"fr": "bonjour", "de": "hallo"}.get(language, "hello")
        return web.Response(text=text, headers={"Vary": "Accept-Language"})

    app = web.Application()
    app.router.add_get("/bytes", ranged)
    app.router.add_get("/greeting", greeting)
    async with serving(app) as url:
        yield url, hits


async def test_a_range_is_part_of_the_identity(
    tmp_path: Path, negotiating_server: tuple[str, dict[str, int]]
) -> None:
    url, hits = negotiating_server
    async with dio.Registry() as reg:
        reg.register("h", dio.HttpAdapter(url))
        async with dio.AsyncSession("h", root=str(tmp_path), registry=reg) as s:
            first = await s.fetch(
                s.request("b", endpoint="/bytes", headers={"Range": "bytes=0-99"})
            )
            second = await s.fetch(
                s.request("b", endpoint="/bytes", headers={"Range": "bytes=100-199"})
            )
            again = await s.fetch(
                s.request("b", endpoint="/bytes", headers={"Range": "bytes=0-99"})
            )
            assert await s.read(first) == bytes(range(100))
            assert await s.read(second) == bytes(range(100, 200))  # not the stored bytes 0-99
            assert again.from_cache and await s.read(again) == bytes(range(100))
    assert hits["ranged"] == 2


async def test_a_stored_response_is_served_only_for_the_header_values_it_varies_by(
    tmp_path: Path, negotiating_server: tuple[str, dict[str, int]]
) -> None:
    url, hits = negotiating_server
    async with dio.Registry() as reg:
        reg.register("h", dio.HttpAdapter(url))
        async with dio.AsyncSession("h", root=str(tmp_path), registry=reg) as s:

            async def greet(language: str) -> tuple[bytes, bool]:
                r = s.request("g", endpoint="/greeting", headers={"Accept-Language": language})
                resp = await s.fetch(r)
                return await s.read(resp), resp.from_cache

            assert await greet("fr") == (b"bonjour", False)
            assert await greet("de") == (b"hallo", False)  # not the stored French body
            assert await greet("de") == (b"hallo", True)
            # The newest stored answer is German: French asks again (and is stored again).
            assert await greet("fr") == (b"bonjour", False)
    assert hits["greeting"] == 3
    stored = rows(tmp_path, "SELECT vary FROM responses WHERE status = 'ok' LIMIT 1")
    assert "accept-language" in stored[0][0] and "fr" not in stored[0][0]  # a digest, not a value


async def test_different_header_values_in_flight_are_not_coalesced(tmp_path: Path) -> None:
    release, both = anyio.Event(), anyio.Event()
    seen: list[str] = []

    async def upstream(request: dio.Request) -> dio.AdapterResult:
        seen.append(request.headers["Accept-Language"])
        if len(seen) == 2:
            both.set()
        await release.wait()
        return dio.AdapterResult(
            data=request.headers["Accept-Language"].encode(),
            headers={"Vary": "Accept-Language"},
        )

    reg = dio.Registry()
    reg.register("m", dio.MockAdapter(upstream))
    async with dio.AsyncSession("m", root=str(tmp_path), registry=reg) as s:
        results: dict[str, bytes] = {}

        async def one(language: str) -> None:
            resp = await s.fetch(s.request("g", headers={"Accept-Language": language}))
            results[language] = await s.read(resp)

        async with anyio.create_task_group() as tg:
            tg.start_soon(one, "fr")
            tg.start_soon(one, "de")
            with anyio.fail_after(30):  # a bound: coalesced, the second would never reach it
                await both.wait()
            release.set()
    assert results == {"fr": b"fr", "de": b"de"}


# -- 6. what the record keeps --------------------------------------------------------------------


async def test_an_error_row_keeps_what_the_upstream_answered(tmp_path: Path) -> None:
    upstream = Upstream(
        dio.TransientError(
            "HTTP 429 Too Many Requests",
            transport_status=429,
            retry_after=5,
            url="https://api.example/v1/q?api_key=SECRET1&x=1",
            headers={"Retry-After": "5", "Set-Cookie": "s=SECRET2"},
            body=b'{"detail": "slow down"}',
        )
    )
    async with dio.AsyncSession("m", root=str(tmp_path), registry=registry_with(upstream)) as s:
        resp = await s.fetch(s.request("k"))
        assert resp.ok and resp.attempts == 2
        (error,) = [r async for r in s.store.iter_responses(status="error")]
        assert error.transport_status == 429
        assert error.headers == {"Retry-After": "5", "Set-Cookie": "[REDACTED]"}
        assert error.url == "https://api.example/v1/q?api_key=[REDACTED]&x=1"
        assert await s.read(error) == b'{"detail": "slow down"}'
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("dataio.sqlite*"))
    assert b"SECRET1" not in stored and b"SECRET2" not in stored


async def test_waiting_for_the_rate_gate_is_not_the_adapters_time(tmp_path: Path) -> None:
    clock = FakeClock()
    reg = dio.Registry(clock=clock)
    reg.register(
        "m",
        dio.MockAdapter(lambda r: dio.AdapterResult(data=b"x", elapsed_ms=7.0)),
        rate_limit=dio.RateLimit(1, per=10),
    )
    async with dio.AsyncSession("m", root=str(tmp_path), registry=reg) as s:
        first = await s.fetch(s.request("k", params={"i": 1}))
        second = await s.fetch(s.request("k", params={"i": 2}))  # waits 10 s for a token
    assert first.elapsed_ms == second.elapsed_ms == 7.0
    assert first.wait_ms == 0.0 and second.wait_ms == pytest.approx(10_000.0)


async def test_sent_headers_and_redirect_hops_are_stored_redacted(tmp_path: Path) -> None:
    meta = {
        "request_headers": {"User-Agent": "x", "Authorization": "Bearer SECRET3"},
        "redirects": [
            {
                "status": 302,
                "url": "https://u:SECRET4@a.example/old",
                "location": "https://b.example/new?token=SECRET5",
                "headers": {"Location": "https://b.example/new", "Set-Cookie": "SECRET6"},
            }
        ],
    }
    reg = registry_with(lambda r: dio.AdapterResult(data=b"ok", adapter_meta=meta))
    async with dio.AsyncSession("m", root=str(tmp_path), registry=reg) as s:
        resp = await s.fetch(s.request("k"))
    assert resp.adapter_meta is not None
    assert resp.adapter_meta["request_headers"]["Authorization"] == "[REDACTED]"
    (hop,) = resp.adapter_meta["redirects"]
    assert hop["status"] == 302 and hop["url"] == "https://a.example/old"
    assert hop["headers"]["Set-Cookie"] == "[REDACTED]" and "SECRET5" not in hop["location"]
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("dataio.sqlite*"))
    assert not any(f"SECRET{i}".encode() in stored for i in (3, 4, 5, 6))


async def test_a_stream_drop_is_a_row_of_its_own(tmp_path: Path) -> None:
    async def stream(request: dio.Request) -> AsyncIterator[dio.AdapterResult]:
        yield dio.AdapterResult(data=b"one")
        yield dio.AdapterResult(
            data=b"",
            error="connection reset; reconnecting",
            adapter_meta={"reconnect": {"last_event_id": "1", "attempt": 1}},
        )
        yield dio.AdapterResult(data=b"two")

    reg = dio.Registry()
    reg.register("m", dio.MockAdapter(None, stream_handler=stream))
    async with dio.AsyncSession("m", root=str(tmp_path), registry=reg) as s:
        messages = [m async for m in s.stream(s.request("events"))]
    assert [m.sequence for m in messages] == [0, 1]  # the drop is not a message
    recorded = rows(tmp_path, "SELECT status, sequence, error, adapter_meta FROM responses")
    assert [r[:2] for r in recorded] == [("stream_message", 0), ("error", 1), ("stream_message", 1)]
    assert "reconnecting" in recorded[1][2] and '"last_event_id":"1"' in recorded[1][3]


# -- 9. error counts named apart ----------------------------------------------------------------


async def test_failed_requests_and_error_rows_are_named_apart(tmp_path: Path) -> None:
    upstream = Upstream(*(dio.TransientError("HTTP 502", transport_status=502) for _ in range(3)))
    reg = registry_with(upstream, retry=dio.RetryPolicy(max_attempts=3))
    async with dio.Store(tmp_path) as store:
        async with dio.AsyncSession("m", store=store, registry=reg) as s:
            with pytest.raises(dio.FetchError):
                await s.fetch(s.request("k"))
            await s.fetch(s.request("k", endpoint="/fine"))
        assert (s.session.requests, s.session.errors) == (2, 1)  # one request failed
        (m,) = (await store.stats()).sources
        assert (m.responses, m.error_responses) == (4, 3)  # each failed attempt is a row
        assert m.error_rate == pytest.approx(3 / 4)
        with pytest.warns(DeprecationWarning, match="error_responses"):
            assert m.errors == 3
        assert (await store.stats()).to_json()["sources"][0]["error_responses"] == 3


# -- 9 and 10. sessions and leases of processes that are gone ------------------------------------

_HOLD = textwrap.dedent(
    """
    import sys, anyio
    import mxm_dataio_async as dio

    async def main() -> None:
        reg = dio.Registry()
        reg.register("m", dio.MockAdapter(lambda r: b"x"))
        async with dio.Store(sys.argv[1]) as store:
            async with store.lease("nightly", ttl=3600), dio.AsyncSession(
                "m", store=store, registry=reg
            ) as s:
                await s.fetch(s.request("k"))
                print("holding", flush=True)
                await anyio.sleep(3600)

    anyio.run(main)
    """
)


def _killed_holder(root: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(root)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "holding"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)


async def test_a_killed_runs_session_is_abandoned_and_its_lease_taken_over(tmp_path: Path) -> None:
    await anyio.to_thread.run_sync(_killed_holder, tmp_path)
    assert rows(tmp_path, "SELECT status FROM sessions") == [("open",)]  # as it was left
    async with dio.Store(tmp_path, read_only=True) as view:
        (seen,) = await view.list_sessions()
        assert seen.status == "abandoned"  # a read-only view tells, without writing
    assert rows(tmp_path, "SELECT status FROM sessions") == [("open",)]
    async with dio.Store(tmp_path) as store:
        (session,) = await store.list_sessions()
        assert session.status == "abandoned" and session.pid != os.getpid()
        assert "ended without recording an end" in (session.error or "")
        with anyio.fail_after(30):  # not the hour the dead run's lease had left
            async with store.lease("nightly", ttl=60) as lease:
                assert lease.holder.split(":")[1] == str(os.getpid())
    assert rows(tmp_path, "SELECT status FROM sessions") == [("abandoned",)]


async def test_a_live_holders_lease_is_still_refused(tmp_path: Path) -> None:
    async with dio.Store(tmp_path) as store, store.lease("nightly", ttl=60):
        with pytest.raises(dio.LeaseHeld):
            async with store.lease("nightly", ttl=60):
                pass


# -- 8. a corrupt cached payload is not served forever -------------------------------------------


@pytest.mark.parametrize("size", [100, 5_000], ids=["inline", "file"])
async def test_a_corrupt_cached_payload_is_fetched_again(tmp_path: Path, size: int) -> None:
    calls = 0

    def upstream(request: dio.Request) -> bytes:
        nonlocal calls
        calls += 1
        return b"v" * size

    reg = dio.Registry()
    reg.register("m", dio.MockAdapter(upstream))
    async with dio.Store(tmp_path, inline_threshold=1_000) as store:
        async with dio.AsyncSession("m", store=store, registry=reg) as s:
            first = await s.fetch(s.request("k"))
        checksum = first.checksum or ""
        if size > 1_000:
            (path,) = list((tmp_path / "payloads").rglob(checksum))
            path.write_bytes(b"x" * size)
        else:
            with closing(sqlite3.connect(tmp_path / "dataio.sqlite")) as conn:
                conn.execute(
                    "UPDATE payloads SET data = ? WHERE sha256 = ?",
                    (b"x" * size, bytes.fromhex(checksum)),
                )
                conn.commit()
        store.metadata._memory.forget()  # type: ignore[attr-defined]  # as a new process
        async with dio.AsyncSession("m", store=store, registry=reg) as s:
            served = await s.fetch(s.request("k"))
            assert served.from_cache
            with pytest.raises(dio.IntegrityError, match="fetches it again"):
                await s.read(served)
            report = await store.verify()
            assert [p.row for p in report.missing_references] == [f"response {first.id}"]
            again = await s.fetch(s.request("k"))
            assert not again.from_cache and calls == 2
            assert await s.read(again) == b"v" * size
            assert (await s.fetch(s.request("k"))).from_cache  # an answer again
        assert (await store.verify()).ok
