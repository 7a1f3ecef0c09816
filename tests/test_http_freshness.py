"""The opt-in HTTP freshness policy: Cache-Control and Expires decide when no TTL is given."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from aiohttp import web

import mxm_dataio_async as dio
from mxm_dataio_async._models import CacheMode, Response, ResponseStatus
from mxm_dataio_async._policy import Action, decide, http_lifetime
from mxm_dataio_async.testing import FakeClock
from tests._serve import serving

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def stored(**headers: str) -> Response:
    return Response(
        id="r",
        request_id="q",
        request_hash="h",
        session_id="s",
        status=ResponseStatus.OK,
        checksum="c",
        size_bytes=1,
        fetched_at=T0,
        cache_mode=CacheMode.DEFAULT,
        ttl_seconds=None,
        as_of_bucket=None,
        cache_tag=None,
        headers={k.replace("_", "-"): v for k, v in headers.items()},
    )


@pytest.mark.parametrize(
    ("headers", "lifetime"),
    [
        ({}, None),
        ({"Cache_Control": "public, max-age=60"}, 60.0),
        ({"cache_control": 'max-age="30"'}, 30.0),
        ({"Cache_Control": "max-age=60, no-cache"}, 0.0),
        ({"Cache_Control": "no-store"}, 0.0),
        ({"Cache_Control": "s-maxage=10"}, None),  # a shared cache's, not ours
        ({"Expires": "Thu, 01 Jan 2026 00:02:00 GMT"}, 120.0),  # after the fetch time
        (
            {"Expires": "Thu, 01 Jan 2026 00:02:00 GMT", "Date": "Thu, 01 Jan 2026 00:01:00 GMT"},
            60.0,
        ),
        ({"Expires": "0"}, 0.0),  # invalid: already expired
        ({"Cache_Control": "max-age=5", "Expires": "Thu, 01 Jan 2026 01:00:00 GMT"}, 5.0),
    ],
)
def test_http_lifetime(headers: dict[str, str], lifetime: float | None) -> None:
    assert http_lifetime(stored(**headers)) == lifetime


def test_decide_honours_the_headers_only_when_asked_and_without_a_ttl() -> None:
    cached = stored(Cache_Control="max-age=60")
    at = T0 + timedelta(seconds=90)
    assert decide(CacheMode.DEFAULT, cached, ttl=None, now=at).action is Action.SERVE
    late = decide(CacheMode.DEFAULT, cached, ttl=None, now=at, http_freshness=True)
    assert late.action is Action.FETCH and "Cache-Control" in late.reason
    early = T0 + timedelta(seconds=30)
    assert (
        decide(CacheMode.DEFAULT, cached, ttl=None, now=early, http_freshness=True).action
        is Action.SERVE
    )
    # A TTL given wins over the headers.
    assert (
        decide(CacheMode.DEFAULT, cached, ttl=3600, now=at, http_freshness=True).action
        is Action.SERVE
    )
    never = dataclasses.replace(cached, headers={"Cache-Control": "no-cache"})
    assert (
        decide(CacheMode.DEFAULT, never, ttl=None, now=T0, http_freshness=True).action
        is Action.FETCH
    )


@pytest.mark.anyio
async def test_a_session_with_http_freshness_follows_max_age(tmp_path: Path) -> None:
    calls = 0

    async def handle(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        return web.Response(body=b"x", headers={"Cache-Control": "max-age=60"})

    app = web.Application()
    app.router.add_get("/q", handle)
    clock = FakeClock()
    async with serving(app) as url:
        async with dio.Registry(clock=clock) as registry:
            registry.register("up", dio.HttpAdapter(base_url=url))
            async with dio.AsyncSession(
                "up", root=str(tmp_path), registry=registry, http_freshness=True
            ) as s:
                await s.fetch(s.request("q", endpoint="/q"))
                clock.advance(30)
                assert (await s.fetch(s.request("q", endpoint="/q"))).from_cache
                clock.advance(40)  # 70 s old: past max-age
                assert not (await s.fetch(s.request("q", endpoint="/q"))).from_cache
                # The request overrides the session: forever fresh without a TTL.
                clock.advance(120)
                again = await s.fetch(s.request("q", endpoint="/q", http_freshness=False))
                assert again.from_cache
    assert calls == 2
