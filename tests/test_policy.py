from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from mxm_dataio_async._models import CacheMode, Response, ResponseStatus
from mxm_dataio_async._policy import Action, decide, is_fresh, needs_lookup, persists

NOW = datetime(2026, 1, 2, 12, 0, tzinfo=UTC)


def stored(age_s: float) -> Response:
    return Response(
        id="r",
        request_id="q",
        request_hash="0" * 64,
        session_id="s",
        status=ResponseStatus.OK,
        checksum="0" * 64,
        size_bytes=1,
        fetched_at=NOW - timedelta(seconds=age_s),
        cache_mode=CacheMode.DEFAULT,
        ttl_seconds=None,
        as_of_bucket=None,
        cache_tag=None,
    )


@pytest.mark.parametrize(
    ("mode", "cached", "ttl", "action"),
    [
        (CacheMode.DEFAULT, None, None, Action.FETCH),
        (CacheMode.DEFAULT, stored(10**9), None, Action.SERVE),  # no TTL: fresh forever
        (CacheMode.DEFAULT, stored(59), 60, Action.SERVE),
        (CacheMode.DEFAULT, stored(61), 60, Action.FETCH),
        (CacheMode.DEFAULT, stored(1), 0, Action.FETCH),
        (CacheMode.ONLY_IF_CACHED, None, None, Action.MISS),
        (CacheMode.ONLY_IF_CACHED, stored(10**6), 1, Action.SERVE),  # TTL ignored
        (CacheMode.BYPASS, stored(0), None, Action.FETCH),
        (CacheMode.REVALIDATE, None, None, Action.FETCH),
        (CacheMode.REVALIDATE, stored(0), None, Action.REVALIDATE),
        (CacheMode.NEVER, stored(0), None, Action.FETCH),
    ],
)
def test_decide(
    mode: CacheMode, cached: Response | None, ttl: float | None, action: Action
) -> None:
    d = decide(mode, cached, ttl=ttl, now=NOW)
    assert d.action is action
    if action in (Action.SERVE, Action.REVALIDATE):
        assert d.cached is cached


def test_lookup_and_persist_flags() -> None:
    assert [m for m in CacheMode if needs_lookup(m)] == [
        CacheMode.DEFAULT,
        CacheMode.ONLY_IF_CACHED,
        CacheMode.REVALIDATE,
    ]
    assert [m for m in CacheMode if not persists(m)] == [CacheMode.NEVER]


def test_freshness_boundary() -> None:
    assert is_fresh(stored(60), 60, NOW)
    assert not is_fresh(stored(60.001), 60, NOW)
