from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio import wait_all_tasks_blocked

import mxm_dataio_async as dio
from mxm_dataio_async._models import Request, Response
from mxm_dataio_async._store import DB_NAME

pytestmark = pytest.mark.anyio


@pytest.fixture
def registry() -> dio.Registry:
    reg = dio.Registry()
    reg.register("mock", dio.MockAdapter(), retry=dio.RetryPolicy(max_attempts=1))
    return reg


def counter_adapter() -> tuple[dio.MockAdapter, list[str]]:
    calls: list[str] = []

    def handler(req: Request) -> bytes:
        calls.append(req.hash)
        return f"{req.kind}:{req.params}:{len(calls)}".encode()

    return dio.MockAdapter(handler), calls


def rows(root: Path, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(root / DB_NAME)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


async def test_fetch_records_and_reads_back(tmp_path: Path, registry: dio.Registry) -> None:
    async with dio.AsyncSession("mock", root=str(tmp_path), registry=registry) as s:
        req = s.request("quote", endpoint="/quote", params={"symbol": "CSPX.L"})
        resp = await s.fetch(req)
        assert resp.status is dio.ResponseStatus.OK and not resp.from_cache
        assert resp.attempts == 1 and resp.cache_mode is dio.CacheMode.DEFAULT
        body = await s.read(resp)
        assert b"CSPX.L" in body
        assert resp.size_bytes == len(body)
        import hashlib

        assert resp.checksum == hashlib.sha256(body).hexdigest()
        sid = s.session.id
    (status, requests, responses, ended) = rows(
        tmp_path, "SELECT status, requests, responses, ended_at FROM sessions"
    )[0]
    assert (status, requests, responses) == ("ok", 1, 1) and ended is not None
    assert rows(tmp_path, "SELECT session_id, kind FROM requests") == [(sid, "quote")]


async def test_every_field_of_a_recorded_answer(tmp_path: Path) -> None:
    # Each field from where it comes (the request, the adapter's answer, the session), distinct
    # values throughout so that no two can be swapped unnoticed; the stored row says the same.
    def answer(request: Request) -> dio.AdapterResult:
        return dio.AdapterResult(
            data=b"the body",
            content_type="text/plain",
            encoding="latin-1",
            transport_status=203,
            url="https://upstream.example/q",
            elapsed_ms=12.5,
            headers={"Content-Type": "text/plain", "Vary": "X-Tenant", "ETag": "e1"},
            adapter_meta={"attempted_via": "proxy"},
        )

    reg = dio.Registry()
    reg.register("mock", dio.MockAdapter(answer))
    async with dio.AsyncSession(
        "mock", root=str(tmp_path), registry=reg, as_of_bucket="2026-11", cache_tag="t1", ttl=60
    ) as s:
        req = s.request("quote", endpoint="/q", headers={"X-Tenant": "acme"})
        resp = await s.fetch(req)
        stored = await s.store.metadata.get_response(resp.id)
        sid = s.session.id
    assert stored is not None
    for got in (resp, stored):
        assert got.request_id == req.id and got.request_hash == req.hash
        assert got.session_id == sid
        assert got.status is dio.ResponseStatus.OK and got.error is None
        assert got.size_bytes == len(b"the body")
        assert got.cache_mode is dio.CacheMode.DEFAULT and got.ttl_seconds == 60
        assert got.as_of_bucket == "2026-11" and got.cache_tag == "t1"
        assert not got.from_cache and got.attempts == 1 and got.attempt == 1
        assert got.sequence is None and got.revalidated_from is None
        assert got.transport_status == 203
        assert got.content_type == "text/plain" and got.encoding == "latin-1"
        assert got.url == "https://upstream.example/q" and got.elapsed_ms == 12.5
        assert got.headers == {"Content-Type": "text/plain", "Vary": "X-Tenant", "ETag": "e1"}
        assert got.adapter_meta == {"attempted_via": "proxy"}
        assert got.wait_ms is not None and got.wait_ms >= 0.0
        assert got.vary is not None and set(got.vary) == {"x-tenant"}
    assert resp.payload is None and resp.fetched_at == stored.fetched_at


async def test_default_mode_serves_cache_across_sessions(tmp_path: Path) -> None:
    adapter, calls = counter_adapter()
    reg = dio.Registry()
    reg.register("m", adapter)
    async with dio.Store(tmp_path) as store:
        async with dio.AsyncSession("m", store=store, registry=reg) as s:
            first = await s.fetch(s.request("k", params={"a": 1}))
        async with dio.AsyncSession("m", store=store, registry=reg) as s2:
            second = await s2.fetch(s2.request("k", params={"a": 1}))
            assert second.from_cache and second.id == first.id
            assert await s2.read(second) == await store.read(first)
            assert s2.session.cache_hits == 1
        assert len(calls) == 1
    served = rows(tmp_path, "SELECT served_from FROM requests WHERE served_from IS NOT NULL")
    assert served == [(first.id,)]


async def test_ttl_expiry(tmp_path: Path) -> None:
    adapter, calls = counter_adapter()
    reg = dio.Registry()
    reg.register("m", adapter)
    async with dio.Store(tmp_path) as store:
        async with dio.AsyncSession("m", store=store, registry=reg, ttl=3600) as s:
            first = await s.fetch(s.request("k"))
            assert (await s.fetch(s.request("k"))).from_cache
    # Age the stored response by two hours.
    conn = sqlite3.connect(tmp_path / DB_NAME)
    conn.execute(
        "UPDATE responses SET "
        "fetched_at = strftime('%Y-%m-%dT%H:%M:%f000+00:00', 'now', '-2 hours')"
    )
    conn.commit()
    conn.close()
    async with dio.Store(tmp_path) as store:
        async with dio.AsyncSession("m", store=store, registry=reg, ttl=3600) as s:
            fresh = await s.fetch(s.request("k"))
            assert not fresh.from_cache and fresh.id != first.id and len(calls) == 2
            # A longer TTL per request still accepts the now-newest response.
            again = await s.fetch(s.request("k", ttl=3 * 3600))
            assert again.from_cache and again.id == fresh.id
            # No TTL: fresh forever.
            assert (await s.fetch(s.request("k", ttl=None))).from_cache
            assert fresh.ttl_seconds == 3600


async def test_only_if_cached(tmp_path: Path) -> None:
    adapter, calls = counter_adapter()
    reg = dio.Registry()
    reg.register("m", adapter)
    async with dio.AsyncSession("m", root=str(tmp_path), registry=reg) as s:
        with pytest.raises(dio.CacheMiss, match="only_if_cached") as info:
            await s.fetch(s.request("k", cache_mode="only_if_cached"))
        assert isinstance(info.value, LookupError)
        await s.fetch(s.request("k", ttl=0))
        hit = await s.fetch(s.request("k", cache_mode="only_if_cached", ttl=0))  # TTL ignored
        assert hit.from_cache
    assert len(calls) == 1


async def test_bypass_always_fetches_and_stores(tmp_path: Path) -> None:
    adapter, calls = counter_adapter()
    reg = dio.Registry()
    reg.register("m", adapter)
    async with dio.AsyncSession("m", root=str(tmp_path), registry=reg, cache_mode="bypass") as s:
        a = await s.fetch(s.request("k"))
        b = await s.fetch(s.request("k"))
        assert a.id != b.id and not b.from_cache
        c = await s.fetch(s.request("k", cache_mode="default"))
        assert c.from_cache and c.id == b.id  # the newest stored
    assert len(calls) == 2
    assert rows(tmp_path, "SELECT count(*) FROM responses")[0][0] == 2


async def test_never_persists_nothing(tmp_path: Path) -> None:
    adapter, calls = counter_adapter()
    reg = dio.Registry()
    reg.register("m", adapter)
    async with dio.AsyncSession("m", root=str(tmp_path), registry=reg, cache_mode="never") as s:
        r = await s.fetch(s.request("k", params={"x": 1}))
        assert await s.read(r) == b"k:{'x': 1}:1"
        r2 = await s.fetch(s.request("k", params={"x": 1}))
        assert not r2.from_cache
    assert len(calls) == 2
    assert rows(tmp_path, "SELECT count(*) FROM responses")[0][0] == 0
    assert rows(tmp_path, "SELECT count(*) FROM requests")[0][0] == 0
    assert rows(tmp_path, "SELECT count(*) FROM payloads")[0][0] == 0


async def test_revalidate_with_not_modified(tmp_path: Path) -> None:
    seen: list[Response] = []

    def revalidate(req: Request, cached: Response) -> dio.AdapterResult:
        seen.append(cached)
        if cached.headers and cached.headers.get("ETag") == '"v1"':
            return dio.AdapterResult(
                b"", transport_status=304, not_modified=True, headers={"ETag": '"v1"'}
            )
        return dio.AdapterResult(b"v2", headers={"ETag": '"v2"'})

    adapter = dio.MockAdapter(
        lambda req: dio.AdapterResult(b"v1", headers={"ETag": '"v1"'}, content_type="text/plain"),
        revalidate_handler=revalidate,
    )
    reg = dio.Registry()
    reg.register("m", adapter)
    async with dio.AsyncSession("m", root=str(tmp_path), registry=reg) as s:
        first = await s.fetch(s.request("k"))
        second = await s.fetch(s.request("k", cache_mode="revalidate"))
        assert seen[0].id == first.id
        assert second.id != first.id and not second.from_cache
        assert second.checksum == first.checksum and second.revalidated_from == first.id
        assert second.transport_status == 304 and second.content_type == "text/plain"
        assert await s.read(second) == b"v1"
    assert rows(tmp_path, "SELECT count(*) FROM payloads")[0][0] == 1
    assert adapter.calls == {"fetch": 1, "send": 0, "stream": 0, "revalidate": 1}


async def test_revalidate_without_revalidator_refetches(tmp_path: Path) -> None:
    class PlainFetcher:
        n = 0

        async def fetch(self, request: Request) -> bytes:
            self.n += 1
            return str(self.n).encode()

    reg = dio.Registry()
    fetcher = PlainFetcher()
    reg.register("m", fetcher)
    async with dio.AsyncSession("m", root=str(tmp_path), registry=reg) as s:
        await s.fetch(s.request("k"))
        r = await s.fetch(s.request("k", cache_mode="revalidate"))
        assert await s.read(r) == b"2"
        with pytest.raises(dio.CapabilityError, match="cannot send"):
            await s.send(s.request("up", method="POST"), b"x")
        with pytest.raises(dio.CapabilityError, match="cannot stream"):
            _ = [m async for m in s.stream(s.request("feed"))]


async def test_bucket_and_tag_partition_the_cache(tmp_path: Path) -> None:
    adapter, calls = counter_adapter()
    reg = dio.Registry()
    reg.register("m", adapter)
    async with dio.AsyncSession(
        "m", root=str(tmp_path), registry=reg, as_of_bucket="2025-10-27", cache_tag="en"
    ) as s:
        base = s.request("k")
        assert base.as_of_bucket == "2025-10-27" and base.cache_tag == "en"
        await s.fetch(base)
        await s.fetch(s.request("k"))  # same partition: hit
        await s.fetch(s.request("k", as_of_bucket="2025-10-28"))
        await s.fetch(s.request("k", cache_tag="de"))
        await s.fetch(s.request("k", cache_tag=None))
        await s.fetch(s.request("k", as_of_bucket=None, cache_tag=None))
        assert len(calls) == 5
        resp = await s.fetch(s.request("k", cache_tag="de"))
        assert resp.from_cache and resp.cache_tag == "de" and resp.as_of_bucket == "2025-10-27"


async def test_adapter_error_recorded_then_fetch_error(tmp_path: Path) -> None:
    def boom(req: Request) -> bytes:
        raise RuntimeError("upstream exploded")

    reg = dio.Registry()
    reg.register("m", dio.MockAdapter(boom))
    async with dio.AsyncSession("m", root=str(tmp_path), registry=reg) as s:
        req = s.request("k")
        with pytest.raises(dio.FetchError, match="upstream exploded") as info:
            await s.fetch(req)
        assert info.value.attempts == 1 and info.value.request is req
        assert isinstance(info.value.__cause__, RuntimeError)
        assert s.session.errors == 1
    ((status, error, attempt),) = rows(tmp_path, "SELECT status, error, attempt FROM responses")
    assert status == "error" and "upstream exploded" in error and attempt == 1
    # Its only request failed: the session does not say "ok" (issue 14, item 9).
    assert rows(tmp_path, "SELECT status, error FROM sessions") == [
        ("error", "every request failed (1 of 1)")
    ]


async def test_upstream_refusal_recorded_with_body(tmp_path: Path) -> None:
    reg = dio.Registry()
    reg.register(
        "m",
        dio.MockAdapter(
            lambda r: dio.AdapterResult(
                b'{"error":"no such symbol"}', transport_status=404, error="HTTP 404 Not Found"
            )
        ),
    )
    async with dio.AsyncSession("m", root=str(tmp_path), registry=reg) as s:
        with pytest.raises(dio.FetchError, match="404") as info:
            await s.fetch(s.request("k"))
        assert info.value.transport_status == 404 and info.value.response_id
        recorded = await s.store.get_response(info.value.response_id)
        assert recorded is not None and recorded.status is dio.ResponseStatus.ERROR
        assert await s.read(recorded) == b'{"error":"no such symbol"}'
        # An error response is never served from cache.
        with pytest.raises(dio.FetchError):
            await s.fetch(s.request("k"))
    assert rows(tmp_path, "SELECT count(*) FROM responses WHERE status='error'")[0][0] == 2


async def test_transient_errors_retried_and_each_attempt_recorded(tmp_path: Path) -> None:
    n = 0

    def flaky(req: Request) -> bytes:
        nonlocal n
        n += 1
        if n < 3:
            raise dio.TransientError(f"try again {n}", transport_status=503)
        return b"finally"

    reg = dio.Registry()
    reg.register("m", dio.MockAdapter(flaky), retry=dio.RetryPolicy(max_attempts=5, base_delay=10))
    with dio.disable_retry_waits():
        async with dio.AsyncSession("m", root=str(tmp_path), registry=reg) as s:
            resp = await s.fetch(s.request("k"))
            assert resp.attempts == 3 and await s.read(resp) == b"finally"
    got = rows(
        tmp_path, "SELECT status, attempt, transport_status, error FROM responses ORDER BY rowid"
    )
    assert [(g[0], g[1], g[2]) for g in got] == [
        ("error", 1, 503),
        ("error", 2, 503),
        ("ok", 3, None),
    ]
    assert "try again 1" in got[0][3]


async def test_send_recorded_never_cached(tmp_path: Path) -> None:
    received: list[bytes] = []

    def on_send(req: Request, payload: bytes) -> bytes:
        received.append(payload)
        return b"ack-" + str(len(received)).encode()

    reg = dio.Registry()
    reg.register("m", dio.MockAdapter(send_handler=on_send))
    async with dio.AsyncSession("m", root=str(tmp_path), registry=reg) as s:
        req = s.request("upload", endpoint="/up", method="POST")
        a1 = await s.send(req, b"payload-1")
        a2 = await s.send(s.request("upload", endpoint="/up", method="POST"), b"payload-1")
        assert a1.status is dio.ResponseStatus.ACK and not a2.from_cache and a1.id != a2.id
        assert await s.read(a2) == b"ack-2"
        with pytest.raises(TypeError, match="payload must be bytes"):
            await s.send(req, "text")  # type: ignore[arg-type]
        # A stored ack is not a usable response for fetch.
        assert await s.store.latest_response(req.hash) is None
        sent = rows(tmp_path, "SELECT sent_checksum FROM requests")
        assert all(c[0] for c in sent)
        assert await s.store.read(sent[0][0]) == b"payload-1"
    assert received == [b"payload-1", b"payload-1"]


async def test_stream_sequence_numbers_each_persisted(tmp_path: Path) -> None:
    async def messages(req: Request) -> AsyncIterator[bytes]:
        for i in range(4):
            yield f"msg{i}".encode()

    reg = dio.Registry()
    reg.register("m", dio.MockAdapter(stream_handler=messages))
    async with dio.AsyncSession("m", root=str(tmp_path), registry=reg) as s:
        got = []
        async for msg in s.stream(s.request("feed")):
            # durable before it is yielded
            stored = await s.store.get_response(msg.id)
            assert stored is not None and stored.sequence == msg.sequence
            got.append((msg.sequence, await s.read(msg), msg.status))
    assert got == [(i, f"msg{i}".encode(), dio.ResponseStatus.STREAM_MESSAGE) for i in range(4)]


async def test_stream_failure_recorded(tmp_path: Path) -> None:
    async def messages(req: Request) -> AsyncIterator[bytes]:
        yield b"one"
        raise dio.TransientError("dropped")

    reg = dio.Registry()
    reg.register("m", dio.MockAdapter(stream_handler=messages))
    async with dio.AsyncSession("m", root=str(tmp_path), registry=reg) as s:
        seen = []
        with pytest.raises(dio.FetchError, match="after 1 messages"):
            async for msg in s.stream(s.request("feed")):
                seen.append(msg.sequence)
    assert seen == [0]
    assert rows(tmp_path, "SELECT status, sequence FROM responses ORDER BY rowid") == [
        ("stream_message", 0),
        ("error", 1),
    ]


async def test_unknown_source_lists_registered(tmp_path: Path, registry: dio.Registry) -> None:
    with pytest.raises(
        dio.AdapterNotFound, match=r"unknown source 'mokc'; registered: mock"
    ) as info:
        dio.AsyncSession("mokc", root=str(tmp_path), registry=registry)
    assert isinstance(info.value, KeyError)


async def test_closed_session_and_store_refused(tmp_path: Path, registry: dio.Registry) -> None:
    s = dio.AsyncSession("mock", root=str(tmp_path), registry=registry)
    assert s.state == "unopened"
    with pytest.raises(dio.UsageError, match="not open yet") as info:
        await s.fetch(s.request("k"))
    assert isinstance(info.value, RuntimeError) and not isinstance(info.value, dio.StoreError)
    async with s:
        assert s.state == "open"
        req = s.request("k")
        resp = await s.fetch(req)
    assert s.state == "closed"
    with pytest.raises(dio.UsageError, match="was closed"):
        await s.fetch(req)
    with pytest.raises(dio.UsageError, match="was closed"):
        s.request("k")
    with pytest.raises(dio.UsageError, match="was closed"):
        await s.read(resp)
    with pytest.raises(dio.UsageError, match="entered once"):
        async with s:
            pass
    store = dio.Store(tmp_path)
    with pytest.raises(dio.StoreClosedError, match="not open"):
        async with dio.AsyncSession("mock", store=store, registry=registry):
            pass


async def test_bad_requests_rejected(tmp_path: Path, registry: dio.Registry) -> None:
    async with dio.AsyncSession("mock", root=str(tmp_path), registry=registry) as s:
        with pytest.raises(TypeError, match="sets have no order"):
            s.request("k", params={"s": {1, 2}})
        with pytest.raises(ValueError, match="NaN"):
            s.request("k", params={"x": float("nan")})
        with pytest.raises(TypeError, match="keys must be str"):
            s.request("k", params={1: "x"})  # type: ignore[dict-item]
        async with dio.AsyncSession("mock", store=s.store, registry=registry) as other:
            foreign = other.request("k")
            with pytest.raises(ValueError, match="another session"):
                await s.fetch(foreign)
    assert rows(tmp_path, "SELECT count(*) FROM requests")[0][0] == 0


async def test_session_error_status_recorded(tmp_path: Path, registry: dio.Registry) -> None:
    with pytest.raises(RuntimeError, match="user code failed"):
        async with dio.AsyncSession("mock", root=str(tmp_path), registry=registry):
            raise RuntimeError("user code failed")
    ((status, error),) = rows(tmp_path, "SELECT status, error FROM sessions")
    assert status == "error" and "user code failed" in error


async def test_secrets_redacted_before_persisting(tmp_path: Path) -> None:
    def handler(req: Request) -> dio.AdapterResult:
        assert req.headers["Authorization"] == "Bearer SECRET-TOKEN-1"
        assert req.params["api_key"] == "SECRET-KEY-2"
        return dio.AdapterResult(
            b"ok",
            url="https://user:SECRET-PW-3@example.test/x?api_key=SECRET-KEY-2&q=1",
            headers={"Set-Cookie": "session=SECRET-COOKIE-4", "ETag": "e"},
        )

    reg = dio.Registry()
    reg.register("m", dio.MockAdapter(handler))
    async with dio.AsyncSession("m", root=str(tmp_path), registry=reg) as s:
        resp = await s.fetch(
            s.request(
                "k",
                endpoint="https://user:SECRET-PW-3@example.test/x",
                params={"api_key": "SECRET-KEY-2", "q": 1},
                headers={"Authorization": "Bearer SECRET-TOKEN-1"},
            )
        )
        assert resp.headers is not None and resp.headers["ETag"] == "e"
    blob = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    for secret in (b"SECRET-TOKEN-1", b"SECRET-KEY-2", b"SECRET-PW-3", b"SECRET-COOKIE-4"):
        assert secret not in blob


async def test_default_registry_functions(tmp_path: Path) -> None:
    adapter = dio.MockAdapter()
    dio.register("default-reg-test", adapter)
    try:
        assert dio.resolve_adapter("default-reg-test") is adapter
        assert "default-reg-test" in dio.list_registered()
        with pytest.raises(ValueError, match="already registered"):
            dio.register("default-reg-test", adapter)
        async with dio.AsyncSession("default-reg-test", root=str(tmp_path)) as s:
            assert (await s.fetch(s.request("k"))).ok
    finally:
        assert dio.unregister("default-reg-test") is adapter
    with pytest.raises(dio.AdapterNotFound):
        dio.resolve_adapter("default-reg-test")
    with pytest.raises(TypeError, match="not an adapter"):
        dio.Registry().register("x", object())


async def test_fetch_many_yields_all_outcomes(tmp_path: Path) -> None:
    def handler(req: Request) -> bytes:
        i = req.params["i"]
        assert isinstance(i, int)
        if i % 10 == 3:
            raise ValueError("bad one")
        return str(req.params["i"]).encode()

    reg = dio.Registry()
    reg.register("m", dio.MockAdapter(handler))
    async with dio.AsyncSession("m", root=str(tmp_path), registry=reg) as s:
        reqs = (s.request("k", params={"i": i}) for i in range(100))
        outcomes = [o async for o in s.fetch_many(reqs, concurrency=8)]
        assert len(outcomes) == 100
        assert sum(1 for o in outcomes if not o.ok) == 10
        assert all(isinstance(o.error, dio.FetchError) for o in outcomes if not o.ok)

        async def agen() -> AsyncIterator[Request]:
            for i in range(20):
                yield s.request("k", params={"i": i})

        again = [o async for o in s.fetch_many(agen(), concurrency=4)]
        assert sum(1 for o in again if o.ok and o.response and o.response.from_cache) == 18
        with pytest.raises(dio.FetchError, match="bad one"):
            async for _ in s.fetch_many(agen(), return_exceptions=False):
                pass
        with pytest.raises(ValueError, match="concurrency"):
            async for _ in s.fetch_many([], concurrency=0):
                pass


async def test_exit_waits_for_in_flight_fetches(tmp_path: Path) -> None:
    release = anyio.Event()
    started = anyio.Event()

    async def slow(req: Request) -> bytes:
        started.set()
        await release.wait()
        return b"done"

    reg = dio.Registry()
    reg.register("m", dio.MockAdapter(slow))
    results: list[Response] = []

    async def releaser() -> None:
        await started.wait()
        await wait_all_tasks_blocked()  # the session is blocked in its exit, waiting for us
        release.set()

    async with dio.Store(tmp_path) as store:
        async with anyio.create_task_group() as outer:
            outer.start_soon(releaser)
            async with dio.AsyncSession("m", store=store, registry=reg) as s:

                async def caller() -> None:
                    results.append(await s.fetch(s.request("k")))

                outer.start_soon(caller)
                await started.wait()
            assert release.is_set()  # exit returned only after the in-flight fetch finished
        assert len(results) == 1
        assert await store.read(results[0]) == b"done"


async def test_cancelled_from_outside_the_session_still_records_its_end(tmp_path: Path) -> None:
    release = anyio.Event()

    async def slow(req: Request) -> bytes:
        await release.wait()
        return b"never"

    reg = dio.Registry()
    reg.register("m", dio.MockAdapter(slow))
    with anyio.move_on_after(0.2) as scope:  # the caller's deadline, not a timing assertion
        async with (
            dio.Store(tmp_path) as store,
            dio.AsyncSession("m", store=store, registry=reg) as s,
        ):
            await s.fetch(s.request("k"))
    assert scope.cancelled_caught
    ((status, ended, error),) = rows(tmp_path, "SELECT status, ended_at, error FROM sessions")
    assert status == "cancelled" and ended is not None and error == "cancelled"


def _tamper(root: Path, checksum: str) -> None:
    conn = sqlite3.connect(root / DB_NAME)
    try:
        conn.execute(
            "UPDATE payloads SET data = ? WHERE sha256 = ?", (b"T", bytes.fromhex(checksum))
        )
        conn.commit()
    finally:
        conn.close()


async def test_read_right_after_fetch_is_served_from_the_stores_memory(tmp_path: Path) -> None:
    """The store remembers the inline payloads it committed recently: the very bytes hashed on
    arrival. A read right after the fetch is served from there, by any session of that store;
    another Store on the same root reads (and verifies) the stored bytes, and so does verify."""
    reg = dio.Registry()
    reg.register("m", dio.MockAdapter(lambda r: f"payload {r.params}".encode() * 50))
    async with dio.Store(tmp_path) as store:
        async with dio.AsyncSession("m", store=store, registry=reg) as s:
            first = await s.fetch(s.request("k", params={"i": 1}))
            expected = b"payload {'i': 1}" * 50
            # The stored row no longer matches: only the store's memory still has the bytes.
            _tamper(tmp_path, first.checksum or "")
            assert await s.read(first) == expected
            assert await store.read(first) == expected
        async with dio.AsyncSession("m", store=store, registry=reg) as s2:
            assert await s2.read(first) == expected
        report = await store.verify()
        assert [p.checksum for p in report.corrupt_payloads] == [first.checksum]
    async with dio.Store(tmp_path, read_only=True) as other:
        with pytest.raises(dio.IntegrityError, match="corrupt"):
            await other.read(first)


async def test_the_store_keeps_only_a_bounded_amount_of_recent_payloads(tmp_path: Path) -> None:
    reg = dio.Registry()
    reg.register("m", dio.MockAdapter(lambda r: bytes([int(str(r.params["i"])) % 251]) * 60_000))
    async with dio.Store(tmp_path) as store:
        async with dio.AsyncSession("m", store=store, registry=reg) as s:
            first = await s.fetch(s.request("k", params={"i": 0}))
            _tamper(tmp_path, first.checksum or "")
            assert await s.read(first) == bytes([0]) * 60_000
            # 12 MB of newer inline payloads: more than the 2 x 4 MiB the store keeps.
            for i in range(1, 201):
                await s.fetch(s.request("k", params={"i": i}))
            with pytest.raises(dio.IntegrityError, match="corrupt"):
                await s.read(first)  # evicted: read from the database, which verifies it


class _Closing:
    """An adapter whose aclose() may fail; records that it was called."""

    def __init__(self, fail: bool) -> None:
        self.fail = fail
        self.closed = False

    async def fetch(self, request: dio.Request) -> bytes:
        return b""

    async def aclose(self) -> None:
        self.closed = True
        if self.fail:
            raise OSError("socket already gone")


async def test_registry_aclose_closes_every_adapter_even_if_one_fails() -> None:
    adapters = [_Closing(fail=False), _Closing(fail=True), _Closing(fail=False)]
    reg = dio.Registry()
    for i, adapter in enumerate(adapters):
        reg.register(f"s{i}", adapter)
    with pytest.raises(OSError, match="socket already gone"):
        await reg.aclose()
    assert [a.closed for a in adapters] == [True, True, True]


async def test_a_half_failed_enter_closes_what_it_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The session's row cannot be written: the session stays closed, and the store it opened
    for itself (root=) is closed again rather than left open."""
    from mxm_dataio_async._store import SqliteMetadata

    async def refuse(self: object, session: dio.Session) -> None:
        raise dio.StoreError("cannot commit to the store: disk full")

    monkeypatch.setattr(SqliteMetadata, "save_session", refuse)
    reg = dio.Registry()
    reg.register("m", dio.MockAdapter(lambda r: b"x"))
    session = dio.AsyncSession("m", root=str(tmp_path), registry=reg)
    with pytest.raises(dio.StoreError, match="disk full"):
        async with session:
            pass
    assert session.state == "closed" and session.store.state == "closed"
    with pytest.raises(dio.UsageError, match="entered once"):
        async with session:
            pass


async def test_a_store_can_stand_in_for_the_upstream(tmp_path: Path) -> None:
    """``Store.stand_in`` swaps the source a session resolves (how the pytest plugin replays):
    sessions on that store call the stand-in's adapter; the registry, and sessions on other
    stores, keep the real one."""
    import dataclasses

    from mxm_dataio_async._registry import SourceEntry

    calls: list[str] = []

    def answer(name: str) -> dio.MockAdapter:
        def handler(request: dio.Request) -> bytes:
            calls.append(name)
            return name.encode()

        return dio.MockAdapter(handler)

    registry = dio.Registry()
    registry.register("src", answer("real"))
    stand_in_adapter = answer("stand-in")

    def stand_in(entry: SourceEntry) -> SourceEntry:
        return dataclasses.replace(entry, adapter=stand_in_adapter)

    async with (
        dio.Store(tmp_path / "replaying") as replaying,
        dio.Store(tmp_path / "plain") as plain,
    ):
        replaying.stand_in = stand_in
        async with dio.AsyncSession("src", store=replaying, registry=registry) as s:
            assert await s.read(await s.fetch(s.request("k"))) == b"stand-in"
        async with dio.AsyncSession("src", store=plain, registry=registry) as s:
            assert await s.read(await s.fetch(s.request("k"))) == b"real"
    assert calls == ["stand-in", "real"]
    assert registry.resolve_adapter("src") is not stand_in_adapter
