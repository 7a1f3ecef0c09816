"""Events, hooks and logs of a running pipeline, against a loopback HTTP server on a fake clock."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

import mxm_dataio_async as dio
from mxm_dataio_async import telemetry
from mxm_dataio_async._events import Telemetry
from mxm_dataio_async.testing import FakeClock
from tests._serve import serving
from tests._upstream import Upstream

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def session_on(
    tmp_path: Path,
    upstream: Upstream,
    *,
    registry_hooks: tuple[telemetry.Hook, ...] = (),
    hooks: tuple[telemetry.Hook, ...] = (),
    retry: dio.RetryPolicy | None = None,
) -> AsyncIterator[dio.AsyncSession]:
    clock = FakeClock()
    async with serving(upstream.app()) as url:
        async with dio.Registry(clock=clock, hooks=registry_hooks) as registry:
            registry.register("up", dio.HttpAdapter(base_url=url), retry=retry)
            async with dio.AsyncSession(
                "up", root=str(tmp_path), registry=registry, hooks=hooks
            ) as s:
                yield s


async def test_hooks_see_a_miss_then_a_hit_in_pipeline_order(tmp_path: Path) -> None:
    on_registry: list[telemetry.Event] = []
    on_session: list[telemetry.Event] = []
    async with session_on(
        tmp_path, Upstream(200), registry_hooks=(on_registry.append,), hooks=(on_session.append,)
    ) as s:
        req = s.request("q", endpoint="/q")
        await s.fetch(req)
        miss = list(on_session)
        await s.fetch(s.request("q", endpoint="/q"))
    assert on_registry == on_session  # both see every event, the registry's first
    assert [type(e).__name__ for e in miss] == [
        "FetchStarted",
        "CacheDecided",
        "AttemptStarted",
        "AttemptFinished",
        "ResponseRecorded",
        "FetchFinished",
    ]
    decided, finished, done = miss[1], miss[3], miss[-1]
    assert isinstance(decided, telemetry.CacheDecided) and decided.decision == "fetch"
    assert isinstance(finished, telemetry.AttemptFinished)
    assert (finished.attempt, finished.outcome, finished.status) == (1, "ok", 200)
    assert finished.size_bytes == len(b'{"n": 1}')
    assert isinstance(done, telemetry.FetchFinished) and done.outcome == "fetched"
    assert all(e.request_hash == req.hash for e in miss)  # type: ignore[union-attr]
    hit = on_session[len(miss) :]
    assert [type(e).__name__ for e in hit] == ["FetchStarted", "CacheDecided", "FetchFinished"]
    assert isinstance(hit[1], telemetry.CacheDecided) and hit[1].decision == "serve"
    assert isinstance(hit[2], telemetry.FetchFinished) and hit[2].outcome == "cached"


async def test_retry_and_cooldown_events_carry_wait_and_reason(tmp_path: Path) -> None:
    events: list[telemetry.Event] = []
    upstream = Upstream(503, 200, retry_after="2")
    async with session_on(
        tmp_path, upstream, hooks=(events.append,), retry=dio.RetryPolicy(max_attempts=3)
    ) as s:
        resp = await s.fetch(s.request("q", endpoint="/q"))
        stats = s.statistics()
    assert resp.ok and upstream.calls == 2
    retry = next(e for e in events if isinstance(e, telemetry.RetryScheduled))
    assert retry.attempt == 1 and retry.wait >= 2.0 and retry.status == 503
    assert "503" in retry.reason
    cooldown = next(e for e in events if isinstance(e, telemetry.CooldownStarted))
    assert (cooldown.source, cooldown.seconds, cooldown.status) == ("up", 2.0, 503)
    failed = [e for e in events if isinstance(e, telemetry.AttemptFinished)]
    assert [(e.attempt, e.outcome, e.status) for e in failed] == [(1, "error", 503), (2, "ok", 200)]
    assert (stats.requests, stats.fetched, stats.retries, stats.failures) == (1, 1, 1, 0)


async def test_events_are_frozen_and_slotted() -> None:
    event = telemetry.RetryScheduled("s", "k", "id", "h" * 64, 1, 0.5, "boom", 503)
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.wait = 1.0  # type: ignore[misc]
    assert not hasattr(event, "__dict__")


async def test_a_failing_hook_is_logged_and_the_fetch_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(event: telemetry.Event) -> None:
        raise RuntimeError("hook bug")

    caplog.set_level(logging.ERROR, logger="mxm_dataio_async.hooks")
    async with session_on(tmp_path, Upstream(200), hooks=(broken,)) as s:
        resp = await s.fetch(s.request("q", endpoint="/q"))
    assert resp.ok
    assert any("hook bug" in (r.exc_text or "") for r in caplog.records)


async def test_nothing_is_built_when_nobody_listens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    """No hooks and the loggers at their default (NullHandler, WARNING from the root): a fetch
    with a retry builds no event at all (neither DEBUG nor INFO ones)."""

    def emit(self: Telemetry, event: telemetry.Event) -> None:
        raise AssertionError(f"built {event!r} with nobody listening")

    monkeypatch.setattr(Telemetry, "emit", emit)
    logger = logging.getLogger("mxm_dataio_async")
    level = logger.level
    logger.setLevel(logging.WARNING)  # as configured by nobody (a CLI test may have said -v)
    request.addfinalizer(lambda: logger.setLevel(level))
    async with session_on(tmp_path, Upstream(503, 200), retry=dio.RetryPolicy(max_attempts=2)) as s:
        assert (await s.fetch(s.request("q", endpoint="/q"))).ok


async def test_logs_are_structured_and_silent_by_default(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert any(
        isinstance(h, logging.NullHandler) for h in logging.getLogger("mxm_dataio_async").handlers
    )
    caplog.set_level(logging.DEBUG, logger="mxm_dataio_async")
    async with session_on(tmp_path, Upstream(503, 200), retry=dio.RetryPolicy(max_attempts=2)) as s:
        req = s.request("q", endpoint="/q")
        await s.fetch(req)
    records = [r for r in caplog.records if r.name.startswith("mxm_dataio_async.")]
    by_event = {getattr(r, "event", None): r for r in records}
    decided = by_event["CacheDecided"]
    assert decided.name == "mxm_dataio_async.fetch" and decided.levelno == logging.DEBUG
    assert (decided.source, decided.kind, decided.request_hash) == ("up", "q", req.hash)  # type: ignore[attr-defined]
    assert decided.decision == "fetch"  # type: ignore[attr-defined]
    retry = by_event["RetryScheduled"]
    assert retry.levelno == logging.INFO and retry.attempt == 1 and retry.status == 503  # type: ignore[attr-defined]
    ok = [r for r in records if getattr(r, "event", None) == "AttemptFinished"][-1]
    assert ok.status == 200 and ok.elapsed_ms >= 0  # type: ignore[attr-defined]
    assert by_event["ResponseRecorded"].name == "mxm_dataio_async.recorder"


async def test_json_lines_carry_the_extra_fields(tmp_path: Path) -> None:
    out = io.StringIO()
    handler = telemetry.configure_logging(logging.DEBUG, json_lines=True, stream=out)
    try:
        async with session_on(tmp_path, Upstream(200)) as s:
            await s.fetch(s.request("q", endpoint="/q"))
    finally:
        logger = logging.getLogger("mxm_dataio_async")
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    attempt = next(line for line in lines if line["event"] == "AttemptFinished")
    assert attempt["logger"] == "mxm_dataio_async.fetch" and attempt["level"] == "debug"
    assert (attempt["source"], attempt["status"], attempt["attempt"]) == ("up", 200, 1)
    assert {"request_hash", "elapsed_ms", "wait_ms", "message", "time"} <= attempt.keys()
