"""HttpAdapter through the whole pipeline: AsyncSession, Store and retries, on a local server."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from mxm_dataio_async._exceptions import FetchError
from mxm_dataio_async._models import ResponseStatus
from mxm_dataio_async._registry import Registry
from mxm_dataio_async._retry import RetryPolicy, disable_retry_waits
from mxm_dataio_async._session import AsyncSession
from mxm_dataio_async._store import Store
from mxm_dataio_async.adapters.http import HttpAdapter
from mxm_dataio_async.testing import FakeClock
from tests.adapters.conftest import ETAG, LocalServer, sse_event

pytestmark = pytest.mark.anyio

FAST_RETRY = RetryPolicy(max_attempts=5, base_delay=0.0, jitter=0.0)


@asynccontextmanager
async def pipeline(
    root: Path,
    adapter: HttpAdapter,
    *,
    retry: RetryPolicy = FAST_RETRY,
    clock: FakeClock | None = None,
    **session_kw: Any,
) -> AsyncIterator[AsyncSession]:
    registry = Registry() if clock is None else Registry(clock=clock)
    async with Store(root) as store, registry:
        registry.register("http", adapter, retry=retry)
        async with AsyncSession("http", store=store, registry=registry, **session_kw) as s:
            yield s


def rows(root: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(root / "dataio.sqlite") as db:
        return db.execute(sql).fetchall()


async def test_5xx_retried_then_ok(server: LocalServer, tmp_path: Path) -> None:
    async with pipeline(tmp_path, HttpAdapter(server.url)) as s:
        resp = await s.fetch(s.request("k", endpoint="/flaky/a", params={"fail": 2}))
        assert resp.ok
        assert resp.attempts == 3
        assert resp.transport_status == 200
        assert await s.read(resp) == b"ok after 2 failures"
    recorded = rows(tmp_path, "SELECT status, transport_status FROM responses ORDER BY attempt")
    assert recorded == [("error", 503), ("error", 503), ("ok", 200)]


async def test_404_recorded_and_raised(server: LocalServer, tmp_path: Path) -> None:
    async with pipeline(tmp_path, HttpAdapter(server.url)) as s:
        with pytest.raises(FetchError, match="HTTP 404 Not Found") as info:
            await s.fetch(s.request("k", endpoint="/status/404"))
        assert info.value.transport_status == 404
        assert info.value.attempts == 1  # final: not retried
        assert info.value.response_id is not None
        stored = await s.store.get_response(info.value.response_id)
        assert stored is not None
        assert stored.status is ResponseStatus.ERROR
        assert stored.error == "HTTP 404 Not Found"
        assert await s.store.read(stored) == b"status 404"
    assert len(server.seen) == 1


async def test_429_retry_after_honoured(server: LocalServer, tmp_path: Path) -> None:
    clock = FakeClock()  # the server's Retry-After passes on the session's clock, not for real
    async with pipeline(tmp_path, HttpAdapter(server.url), clock=clock) as s:
        resp = await s.fetch(
            s.request("k", endpoint="/flaky/r", params={"fail": 1, "code": 429, "retry_after": 30})
        )
    assert resp.ok
    assert resp.attempts == 2
    assert clock.sleeps == [30.0]  # base_delay is 0: only Retry-After made it wait


async def test_retry_waits_can_be_disabled(server: LocalServer, tmp_path: Path) -> None:
    clock = FakeClock()
    async with pipeline(tmp_path, HttpAdapter(server.url), clock=clock) as s:
        with disable_retry_waits():
            resp = await s.fetch(
                s.request(
                    "k", endpoint="/flaky/d", params={"fail": 1, "code": 503, "retry_after": 30}
                )
            )
    assert resp.attempts == 2
    assert clock.sleeps == [0.0]  # the 30 s Retry-After was not waited


async def test_revalidate_304_reuses_payload(server: LocalServer, tmp_path: Path) -> None:
    async with pipeline(tmp_path, HttpAdapter(server.url)) as s:
        first = await s.fetch(s.request("k", endpoint="/cond/etag"))
        again = await s.fetch(s.request("k", endpoint="/cond/etag", cache_mode="revalidate"))
        assert again.id != first.id
        assert again.checksum == first.checksum
        assert again.revalidated_from == first.id
        assert again.transport_status == 304
        assert not again.from_cache
        assert await s.read(again) == b"the content"
    assert server.seen[-1].headers["If-None-Match"] == ETAG
    assert len(server.seen) == 2


SECRETS = [
    "AUTHSECRET1",
    "PARAMSECRET2",
    "URLSECRET3",
    "SETCOOKIESECRET",
    "APIKEYSECRET4",
    "TOKENSECRET5",
    "CUSTOMSECRET6",
]


def scan(root: Path) -> list[str]:
    """Every file under root, as bytes; which secrets appear where."""
    leaks: list[str] = []
    files = [p for p in root.rglob("*") if p.is_file()]
    assert any(p.name == "dataio.sqlite" for p in files)
    visible = False
    for path in files:
        data = path.read_bytes()
        leaks.extend(f"{s} in {path}" for s in SECRETS if s.encode() in data)
        visible = visible or b"X-Plain" in data
    assert visible, "the scan must see the recorded headers (a non-secret one is X-Plain)"
    return leaks


async def test_no_secret_reaches_the_store(server: LocalServer, tmp_path: Path) -> None:
    adapter = HttpAdapter(server.url, headers={"X-Custom": "CUSTOMSECRET6"}, redact=["X-Custom"])
    creds_url = server.url.replace("http://", "http://user:URLSECRET3@")
    async with pipeline(tmp_path, adapter, retry=RetryPolicy(max_attempts=2, base_delay=0)) as s:
        await s.fetch(
            s.request(
                "k",
                endpoint="/secret-headers",
                params={"api_key": "PARAMSECRET2", "a": 1},
                headers={"Authorization": "Bearer AUTHSECRET1", "X-Api-Key": "APIKEYSECRET4"},
            )
        )
        await s.fetch(s.request("k", endpoint=f"{creds_url}/secret-headers"))
        await s.fetch(
            s.request(
                "k", endpoint="/redirect", params={"to": "/status/200", "token": "TOKENSECRET5"}
            )
        )
        with pytest.raises(FetchError):
            await s.fetch(s.request("k", endpoint=f"{creds_url}/status/404?token=TOKENSECRET5"))
        with pytest.raises(FetchError):
            await s.fetch(s.request("k", endpoint="/status/503", params={"token": "TOKENSECRET5"}))
        await s.send(
            s.request("k", endpoint="/status/200", method="POST", params={"token": "TOKENSECRET5"}),
            b"payload",
        )
        # The upstream did get them.
        assert server.seen[0].headers["Authorization"] == "Bearer AUTHSECRET1"
        assert ("api_key", "PARAMSECRET2") in server.seen[0].query
        assert server.seen[1].headers["Authorization"].startswith("Basic ")
        assert scan(tmp_path) == []  # while open: the -wal file holds the recent pages
    assert scan(tmp_path) == []


def run_bigbody(mode: str, mib: int, root: Path) -> dict[str, Any]:
    script = Path(__file__).with_name("_bigbody.py")
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    proc = subprocess.run(
        [sys.executable, str(script), mode, str(mib), str(root)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize("mode", ["adapter", "pipeline"])
def test_256_mib_body_memory_bound(tmp_path: Path, mode: str) -> None:
    out = run_bigbody(mode, 256, tmp_path)
    assert out["size"] == 256 << 20
    assert out["sha256"] == out["expected_sha256"]
    growth_mib = (out["peak_kib"] - out["baseline_kib"]) / 1024
    assert growth_mib < 64, out
    assert out["seconds"] < 30, out
    if mode == "pipeline":
        files = [p for p in (tmp_path / "payloads").rglob("*") if p.is_file()]
        assert any(p.name == out["sha256"] and p.stat().st_size == 256 << 20 for p in files)


async def test_sse_through_session_stream(server: LocalServer, tmp_path: Path) -> None:
    async def drop_after_two(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"retry: 1\n\n" + sse_event("zero", id="0") + sse_event("one", id="1"))
        assert request.transport is not None
        request.transport.close()
        return resp

    async def last(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(sse_event("two", id="2", event="final"))
        await resp.write_eof()
        return resp

    server.sse_script = [drop_after_two, last]
    async with pipeline(tmp_path, HttpAdapter(server.url)) as s:
        messages = [m async for m in s.stream(s.request("k", endpoint="/sse"))]
        assert [m.sequence for m in messages] == [0, 1, 2]
        assert [m.status for m in messages] == [ResponseStatus.STREAM_MESSAGE] * 3
        assert [await s.read(m) for m in messages] == [b"zero", b"one", b"two"]
        assert messages[2].adapter_meta == {"event": "final", "id": "2"}
    assert [seen.headers.get("Last-Event-ID") for seen in server.seen] == [None, "1", "2"]
    # Each drop the adapter announced is an error row of the stream, never a message.
    drops = rows(
        tmp_path,
        "SELECT error, adapter_meta FROM responses WHERE status = 'error' ORDER BY sequence",
    )
    assert len(drops) == 2
    assert [json.loads(meta)["reconnect"] for _, meta in drops] == [
        {"last_event_id": "1", "attempt": 1},
        {"last_event_id": "2", "attempt": 1},
    ]
    assert "closed by the server" in drops[1][0]
