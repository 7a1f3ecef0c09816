"""The :class:`MetadataStore` contract: what every metadata backend does, through the protocol."""

from __future__ import annotations

import os
import re
import uuid
from dataclasses import replace
from datetime import datetime, timedelta
from functools import partial
from typing import Literal

import anyio
import pytest

from mxm_dataio_async._clock import FakeClock
from mxm_dataio_async._exceptions import IntegrityError, LeaseHeld, StoreError
from mxm_dataio_async._models import ResponseStatus, SessionStatus
from mxm_dataio_async._store._protocols import (
    TABLES,
    DanglingReference,
    MetadataStore,
    PayloadRow,
    PayloadStore,
    PruneCounts,
    Recording,
    SourceCounts,
    Table,
)
from tests.store.contract._helpers import (
    INLINE_THRESHOLD,
    collect,
    make_request,
    make_response,
    make_session,
    record,
    record_hit,
    sha,
    stage,
)
from tests.store.contract.conftest import BackendPair, PairMaker

pytestmark = pytest.mark.anyio

OK, ERROR, ACK = ResponseStatus.OK, ResponseStatus.ERROR, ResponseStatus.ACK
HEX64 = re.compile(r"[0-9a-f]{64}")
EVERY_TABLE: tuple[Table | Literal["payloads"], ...] = (*TABLES, "payloads")


def big(n: int = 1) -> bytes:
    """Bytes above the inline threshold (file tier)."""
    return os.urandom(INLINE_THRESHOLD * 2 + n)


async def ids_of(metadata: MetadataStore, **filters: object) -> list[str]:
    return [r.id async for r in metadata.iter_responses(**filters)]  # type: ignore[arg-type]


async def test_backends_implement_the_protocols(backend: BackendPair) -> None:
    assert isinstance(backend.metadata, MetadataStore)
    assert isinstance(backend.payloads, PayloadStore)
    assert isinstance(backend.metadata.location, str) and backend.metadata.location
    assert isinstance(backend.payloads.location, str) and backend.payloads.location


# -- sessions -------------------------------------------------------------------------------------


async def test_save_session_inserts_then_updates_end_status_and_counts(
    metadata: MetadataStore, clock: FakeClock
) -> None:
    s = make_session("src", at=clock.now())
    await metadata.save_session(s)
    assert await metadata.get_session(s.id) == s
    clock.advance(90)
    done = replace(
        s,
        ended_at=clock.now(),
        status=SessionStatus.ERROR,
        requests=3,
        responses=4,
        cache_hits=1,
        errors=2,
        bytes_fetched=12345,
        error="upstream went away",
    )
    await metadata.save_session(done)
    assert await metadata.get_session(s.id) == done
    assert await metadata.count_rows("sessions") == 1
    # Only the end, status and counts change: what identifies the session stays.
    await metadata.save_session(replace(done, source="renamed", started_at=clock.now()))
    assert await metadata.get_session(s.id) == done
    assert await metadata.get_session("no-such-session") is None


async def test_list_sessions_newest_first_by_source_with_limit(
    metadata: MetadataStore, clock: FakeClock
) -> None:
    made = []
    for source in ("a", "b", "a", "c"):
        s = make_session(source, at=clock.now())
        made.append(s)
        clock.advance(60)
    # Saved out of order: the order is by start, not by saving.
    for s in (made[2], made[0], made[3], made[1]):
        await metadata.save_session(s)
    a1, b1, a2, c1 = made
    assert [s.id for s in await metadata.list_sessions()] == [c1.id, a2.id, b1.id, a1.id]
    assert [s.id for s in await metadata.list_sessions(source="a")] == [a2.id, a1.id]
    assert [s.id for s in await metadata.list_sessions(limit=2)] == [c1.id, a2.id]
    assert [s.id for s in await metadata.list_sessions(source="a", limit=1)] == [a2.id]
    assert await metadata.list_sessions(source="nobody") == []
    assert (await metadata.list_sessions(source="b"))[0] == b1


# -- record ---------------------------------------------------------------------------------------


async def test_record_writes_request_responses_and_inline_payloads(
    backend: BackendPair, clock: FakeClock
) -> None:
    m, p = backend.metadata, backend.payloads
    s = make_session()
    await m.save_session(s)
    req = make_request(s, "quote", params={"symbol": "X"})
    first, second = await stage(p, b"first attempt"), await stage(p, b"second attempt")
    failed = make_response(req, at=clock.now(), payload=first, status=ERROR, error="500")
    clock.advance(1)
    good = make_response(req, at=clock.now(), payload=second, attempt=2, attempts=2)
    await m.record(Recording(req, [failed, good], [first, second]))

    assert await m.get_response(failed.id) == failed
    assert await m.get_response(good.id) == good
    rows = await collect(m.iter_rows("requests"))
    assert [r["id"] for r in rows] == [req.id]
    assert rows[0]["hash"] == req.hash and rows[0]["session_id"] == s.id
    assert (rows[0]["source"], rows[0]["kind"]) == ("src", "quote")
    assert await m.payload(first.digest) == PayloadRow(first.digest, 13, "inline", b"first attempt")
    assert await m.payload(second.digest) == PayloadRow(
        second.digest, 14, "inline", b"second attempt"
    )
    assert [await m.count_rows(t) for t in ("requests", "responses", "payloads")] == [1, 2, 2]


async def test_record_writes_the_request_row_once_per_id(
    backend: BackendPair, clock: FakeClock
) -> None:
    m, p = backend.metadata, backend.payloads
    s = make_session()
    await m.save_session(s)
    req = make_request(s)
    original = make_request(s, "other")
    r1 = await record(m, p, original, b"one", at=clock.now())
    r2 = await record(m, p, req, b"two", at=clock.now())
    # The same request id again (a retry recorded later, a cache hit of a fetched request): no
    # second row, and the first row is not rewritten.
    r3 = await record(m, p, req, b"three", at=clock.now(), attempt=2)
    await m.record(Recording(req, served_from=r1.id))
    rows = [r async for r in m.iter_rows("requests") if r["id"] == req.id]
    assert len(rows) == 1 and rows[0]["served_from"] is None
    assert await m.count_rows("requests") == 2
    assert await ids_of(m) == [r1.id, r2.id, r3.id]


async def test_record_is_all_or_nothing(backend: BackendPair, clock: FakeClock) -> None:
    m, p = backend.metadata, backend.payloads
    s = make_session()
    await m.save_session(s)
    first = await record(m, p, make_request(s), b"first", at=clock.now())
    req = make_request(s, "again")
    fresh = await stage(p, b"fresh payload")
    new = make_response(req, at=clock.now(), payload=fresh)
    # A response id that is already taken: the backend may refuse the recording or accept it,
    # but a reader sees all of it or none of it.
    clash = make_response(req, at=clock.now(), payload=fresh, id=first.id)
    try:
        await m.record(Recording(req, [new, clash], [fresh]))
    except StoreError:
        written = False
    else:
        written = True
    assert (await m.get_response(new.id) is not None) is written
    assert (await m.payload(fresh.digest) is not None) is written
    assert (len([r async for r in m.iter_rows("requests", ids=[req.id])]) == 1) is written
    assert await m.get_response(first.id) == first
    # The store still takes writes.
    after = await record(m, p, make_request(s, "after"), b"after", at=clock.now())
    assert await m.get_response(after.id) == after


async def test_record_without_waiting_becomes_visible(
    backend: BackendPair, clock: FakeClock
) -> None:
    m, p = backend.metadata, backend.payloads
    s = make_session()
    await m.save_session(s)
    req = make_request(s)
    staged = await stage(p, b"audit")
    resp = make_response(req, at=clock.now(), payload=staged)
    m.record_later(Recording(req, [resp], [staged]))
    # Queued for the next commit: any later write that was waited for commits it too.
    await m.save_session(replace(s, status=SessionStatus.OK))
    assert await m.get_response(resp.id) == resp
    assert await m.latest_response(req.hash) == resp
    assert await m.payload(staged.digest) is not None


# -- reading --------------------------------------------------------------------------------------


async def test_latest_response_is_the_newest_ok_one(backend: BackendPair, clock: FakeClock) -> None:
    m, p = backend.metadata, backend.payloads
    s = make_session()
    await m.save_session(s)
    req, other = make_request(s, "a"), make_request(s, "b")
    t0 = clock.now()
    old = await record(m, p, req, b"old", at=t0)
    new = await record(m, p, req, b"new", at=t0 + timedelta(seconds=10))
    err = await record(m, p, req, b"err", at=t0 + timedelta(seconds=20), status=ERROR)
    # Committed last but fetched earliest: "newest" is by fetch time, not by commit.
    await record(m, p, req, b"late", at=t0 - timedelta(hours=1))
    await record(m, p, other, b"only an error", at=t0, status=ERROR)

    assert await m.latest_response(req.hash) == new
    assert await m.latest_response(req.hash, statuses=[ERROR]) == err
    assert await m.latest_response(req.hash, statuses=(OK, ERROR)) == err
    assert await m.latest_response(req.hash, statuses=[ACK]) is None
    assert await m.latest_response(other.hash) is None
    assert await m.latest_response("00" * 32) is None
    assert await m.get_response(old.id) == old  # superseded, still recorded


async def test_a_discarded_payload_is_no_answer_until_recorded_again(
    backend: BackendPair, make_pair: PairMaker, clock: FakeClock
) -> None:
    """Bytes a verified read found corrupt are discarded: their row goes, lookups skip the
    responses naming them (in this and in a store opened later), and recording the bytes again
    brings both back."""
    m, p = backend.metadata, backend.payloads
    s = make_session()
    await m.save_session(s)
    req = make_request(s, "a")
    first = await record(m, p, req, b"the body", at=clock.now())
    assert first.checksum is not None
    digest = bytes.fromhex(first.checksum)
    await m.discard_payload(digest)
    assert await m.payload(digest) is None
    assert await m.latest_response(req.hash) is None
    assert [r.row_id async for r in m.iter_dangling_references()] == [first.id]
    later = await make_pair(root=backend.root)  # another process's view
    assert await later.metadata.latest_response(req.hash) is None
    clock.advance(1)
    again = await record(m, p, req, b"the body", at=clock.now())
    assert again.checksum == first.checksum
    assert await m.latest_response(req.hash) == again
    row = await m.payload(digest)
    assert row is not None and row.size == len(b"the body")
    assert [r async for r in m.iter_dangling_references()] == []
    third = await make_pair(root=backend.root)
    assert await third.metadata.latest_response(req.hash) == again


async def test_latest_response_sees_a_response_recorded_just_before(
    backend: BackendPair, clock: FakeClock
) -> None:
    m, p = backend.metadata, backend.payloads
    s = make_session()
    await m.save_session(s)
    req = make_request(s)
    for i in range(20):
        clock.advance(1)
        resp = await record(m, p, req, f"version {i}".encode(), at=clock.now())
        assert await m.latest_response(req.hash) == resp
        assert await m.get_response(resp.id) == resp

    # Lookups racing with a commit: every one answers, and afterwards the commit is seen.
    clock.advance(1)
    found = []

    async def look() -> None:
        found.append(await m.latest_response(req.hash))

    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(look)
        newest = await record(m, p, req, b"newest", at=clock.now())
        for _ in range(5):
            tg.start_soon(look)
    assert len(found) == 10 and all(r is not None for r in found)
    assert await m.latest_response(req.hash) == newest


async def test_get_response_round_trips_every_field(backend: BackendPair, clock: FakeClock) -> None:
    m, p = backend.metadata, backend.payloads
    s = make_session()
    await m.save_session(s)
    req = make_request(s, params={"a": 1}, as_of_bucket="2026-02-28")
    staged = await stage(p, b"payload bytes")
    original = make_response(
        req,
        at=clock.now(),
        payload=staged,
        ttl_seconds=12.5,
        cache_tag="tag-1",
        attempts=3,
        attempt=2,
        sequence=7,
        transport_status=203,
        content_type="text/plain",
        encoding="latin-1",
        url="https://example.test/x?y=1",
        elapsed_ms=4.25,
        headers={"ETag": '"v1"', "X-Other": "two"},
        adapter_meta={"content_encoding": "gzip", "n": [1, 2]},
        error="partial: nothing serious",
        revalidated_from="01a2-previous",
    )
    await m.record(Recording(req, [original], [staged]))
    assert await m.get_response(original.id) == original
    assert await m.latest_response(req.hash) == original
    assert await m.get_response("no-such-response") is None


async def test_iter_responses_in_commit_order_with_each_filter(
    backend: BackendPair, clock: FakeClock
) -> None:
    m, p = backend.metadata, backend.payloads
    sa, sb = make_session("a"), make_session("b")
    await m.save_session(sa)
    await m.save_session(sb)
    qa1, qa2, qb = make_request(sa, "quote"), make_request(sa, "bars"), make_request(sb, "quote")
    t = clock.now()

    def at(seconds: int) -> datetime:
        return t + timedelta(seconds=seconds)

    # Commit order differs from fetch order on purpose.
    x1 = await record(m, p, qa1, b"x1", at=at(20))
    x2 = await record(m, p, qa2, b"x2", at=at(0), status=ERROR)
    x3 = await record(m, p, qb, b"x3", at=at(10))
    x4 = await record(m, p, qa1, b"x4", at=at(30))
    x5 = await record(m, p, qb, b"x5", at=at(5), status=ACK)
    every = [x1.id, x2.id, x3.id, x4.id, x5.id]

    assert await ids_of(m) == every
    assert (await collect(m.iter_responses()))[0] == x1
    for page_size in (1, 2, 5, 500):
        assert await ids_of(m, page_size=page_size) == every
    assert await ids_of(m, source="a") == [x1.id, x2.id, x4.id]
    assert await ids_of(m, kind="quote") == [x1.id, x3.id, x4.id, x5.id]
    assert await ids_of(m, session_id=sb.id) == [x3.id, x5.id]
    assert await ids_of(m, status=ERROR) == [x2.id]
    assert await ids_of(m, status=OK) == [x1.id, x3.id, x4.id]
    assert await ids_of(m, since=at(10)) == [x1.id, x3.id, x4.id]  # inclusive
    assert await ids_of(m, until=at(10)) == [x2.id, x5.id]  # exclusive
    assert await ids_of(m, since=at(5), until=at(21)) == [x1.id, x3.id, x5.id]
    assert await ids_of(m, source="a", kind="quote", status=OK, page_size=1) == [x1.id, x4.id]
    assert await ids_of(m, source="nobody") == []

    assert await ids_of(m, after=x2.id) == [x3.id, x4.id, x5.id]
    assert await ids_of(m, after=x2.id, page_size=1) == [x3.id, x4.id, x5.id]
    assert await ids_of(m, after=x2.id, source="a") == [x4.id]
    assert await ids_of(m, after=x5.id) == []
    assert await ids_of(m, after=None) == every
    with pytest.raises(ValueError, match="cursor"):
        await ids_of(m, after="no-such-response")


async def test_a_checkpointed_cursor_survives_pruning_its_response(
    backend: BackendPair, clock: FakeClock
) -> None:
    m, p = backend.metadata, backend.payloads
    s = make_session()
    await m.save_session(s)
    req = make_request(s)
    now = clock.now()
    old = now - timedelta(days=40)
    gone1 = await record(m, p, req, b"old 1", at=old)
    gone2 = await record(m, p, req, b"old 2", at=old)
    kept1 = await record(m, p, req, b"new 1", at=now)
    kept2 = await record(m, p, req, b"new 2", at=now)
    await m.write_checkpoint("etl", gone2.id)
    counts = await m.prune(cutoff=now - timedelta(days=30))
    assert counts.responses == 2
    assert await m.get_response(gone2.id) is None
    assert await m.read_checkpoint("etl") == gone2.id
    assert await ids_of(m, after=gone2.id) == [kept1.id, kept2.id]
    # A pruned response no checkpoint remembers is an unknown cursor.
    with pytest.raises(ValueError, match="cursor"):
        await ids_of(m, after=gone1.id)


async def test_payload_rows_by_tier(
    backend: BackendPair, clock: FakeClock, make_pair: PairMaker
) -> None:
    m, p = backend.metadata, backend.payloads
    s = make_session()
    await m.save_session(s)
    req = make_request(s)
    large = big()
    small_resp = await record(m, p, req, b"tiny", at=clock.now())
    large_resp = await record(m, p, req, large, at=clock.now())
    small_digest = bytes.fromhex(small_resp.checksum or "")
    large_digest = bytes.fromhex(large_resp.checksum or "")
    expected_small = PayloadRow(small_digest, 4, "inline", b"tiny")
    expected_large = PayloadRow(large_digest, len(large), "file", None)
    assert await m.payload(small_digest) == expected_small
    assert await m.payload(large_digest) == expected_large
    assert await m.payload(sha(b"never stored")) is None
    # Another view of the same store (nothing remembered from the writes) agrees.
    other = await make_pair(root=backend.root)
    assert await other.metadata.payload(small_digest) == expected_small
    assert await other.metadata.payload(large_digest) == expected_large


async def test_present_payloads_with_and_without_tier(
    backend: BackendPair, clock: FakeClock
) -> None:
    m, p = backend.metadata, backend.payloads
    s = make_session()
    await m.save_session(s)
    req = make_request(s)
    small = bytes.fromhex((await record(m, p, req, b"small", at=clock.now())).checksum or "")
    large = bytes.fromhex((await record(m, p, req, big(), at=clock.now())).checksum or "")
    absent = [sha(str(i).encode()) for i in range(1200)]  # more than one batch of lookups
    assert await m.present_payloads([small, large, absent[0]]) == {small, large}
    assert await m.present_payloads([small, large], tier="inline") == {small}
    assert await m.present_payloads([small, large], tier="file") == {large}
    assert await m.present_payloads(iter([*absent, large, small])) == {small, large}
    assert await m.present_payloads(absent, tier="file") == set()
    assert await m.present_payloads([]) == set()


# -- checkpoints and leases -----------------------------------------------------------------------


async def test_checkpoints_read_write_overwrite(backend: BackendPair, clock: FakeClock) -> None:
    m, p = backend.metadata, backend.payloads
    s = make_session()
    await m.save_session(s)
    req = make_request(s)
    r1 = await record(m, p, req, b"1", at=clock.now())
    r2 = await record(m, p, req, b"2", at=clock.now())
    assert await m.read_checkpoint("etl") is None
    await m.write_checkpoint("etl", r1.id)
    assert await m.read_checkpoint("etl") == r1.id
    await m.write_checkpoint("etl", r2.id)
    assert await m.read_checkpoint("etl") == r2.id
    await m.write_checkpoint("other", r1.id)
    assert (await m.read_checkpoint("etl"), await m.read_checkpoint("other")) == (r2.id, r1.id)
    with pytest.raises(ValueError, match="cursor"):
        await m.write_checkpoint("etl", "no-such-response")
    assert await m.read_checkpoint("etl") == r2.id
    assert await ids_of(m, after=await m.read_checkpoint("other")) == [r2.id]


async def test_leases(backend: BackendPair, clock: FakeClock) -> None:
    if backend.lease_clock == "server":
        pytest.skip(
            "leases expire by the database server's clock, which a test cannot move; "
            "tests/store/postgres/test_postgres_coordination.py checks these rules there"
        )
    metadata = backend.metadata
    m = metadata
    t0 = clock.now()
    a = await m.acquire_lease("job", "host-a", 30)
    assert (a.name, a.holder) == ("job", "host-a")
    assert (a.acquired_at, a.expires_at) == (t0, t0 + timedelta(seconds=30))

    with pytest.raises(LeaseHeld, match="host-a") as held:
        await m.acquire_lease("job", "host-b", 30)
    assert (held.value.name, held.value.holder, held.value.expires_at) == (
        "job",
        "host-a",
        a.expires_at,
    )
    other_job = await m.acquire_lease("other-job", "host-b", 30)  # names are independent
    assert other_job.holder == "host-b"

    clock.advance(10)
    again = await m.acquire_lease("job", "host-a", 30)  # the holder re-acquires: a renewal
    assert again.expires_at == clock.now() + timedelta(seconds=30)
    clock.advance(10)
    renewed = await m.renew_lease(again, 60)
    assert renewed.expires_at == clock.now() + timedelta(seconds=60) > again.expires_at
    assert (renewed.name, renewed.holder) == ("job", "host-a")
    clock.advance(59)  # not expired yet
    with pytest.raises(LeaseHeld, match="host-a"):
        await m.acquire_lease("job", "host-b", 30)

    await m.release_lease(renewed)
    b = await m.acquire_lease("job", "host-b", 30)
    assert b.holder == "host-b"

    # host-b stops renewing (a crashed run): once expired, host-c takes over.
    clock.advance(31)
    c = await m.acquire_lease("job", "host-c", 30)
    assert c.holder == "host-c" and c.expires_at == clock.now() + timedelta(seconds=30)
    with pytest.raises(LeaseHeld, match="host-c") as lost:
        await m.renew_lease(b, 30)
    assert lost.value.holder == "host-c"
    # The stale holder's release does not free the new holder's lease.
    await m.release_lease(b)
    with pytest.raises(LeaseHeld, match="host-c"):
        await m.acquire_lease("job", "host-d", 30)


# -- inspection -----------------------------------------------------------------------------------


async def test_resolve_session(metadata: MetadataStore) -> None:
    ids = [
        "abcd1111-0000-4000-8000-000000000001",
        "abcd2222-0000-4000-8000-000000000002",
        "ef01aaaa-0000-4000-8000-000000000003",
    ]
    for sid in ids:
        await metadata.save_session(make_session(id=sid))
    assert await metadata.resolve_session(ids[0]) == ids[0]
    assert await metadata.resolve_session("abcd1") == ids[0]
    assert await metadata.resolve_session("ef01") == ids[2]  # 4 characters are enough
    with pytest.raises(StoreError, match="ambiguous"):
        await metadata.resolve_session("abcd")
    with pytest.raises(StoreError, match=r"unknown|short"):
        await metadata.resolve_session("ef0")  # too short to be a prefix
    with pytest.raises(StoreError, match="unknown"):
        await metadata.resolve_session("ffff0000")
    for pattern in ("ab%d", "abc_", "____", "%%%%"):  # not wildcards
        with pytest.raises(StoreError, match="unknown"):
            await metadata.resolve_session(pattern)


async def test_resolve_response(backend: BackendPair, clock: FakeClock) -> None:
    m, p = backend.metadata, backend.payloads
    s = make_session()
    await m.save_session(s)
    req = make_request(s)
    a = "0a0a0a0a-1111-7000-8000-00000000aaaa"
    b = "0a0a0a0a-2222-7000-8000-00000000bbbb"
    c = "0c0c0c0c-3333-7000-8000-99990000aaaa"
    for rid in (a, b, c):
        await record(m, p, req, rid.encode(), at=clock.now(), id=rid)
    assert await m.resolve_response(a) == a
    assert await m.resolve_response("0a0a0a0a-1") == a  # a unique prefix
    assert await m.resolve_response("0c0c0c0c") == c
    assert await m.resolve_response("00000000aaaa") == a  # a unique tail
    assert await m.resolve_response("99990000aaaa") == c
    assert await m.resolve_response("0000bbbb") == b  # 8 characters are enough
    with pytest.raises(StoreError, match="ambiguous"):
        await m.resolve_response("0a0a0a0a")
    with pytest.raises(StoreError, match="ambiguous"):
        await m.resolve_response("0000aaaa")  # the tail of a and of c
    with pytest.raises(StoreError):
        await m.resolve_response("000bbbb")  # a tail of 7 characters
    with pytest.raises(StoreError, match="unknown"):
        await m.resolve_response("ffffffff-not-there")
    with pytest.raises(StoreError, match="unknown"):
        await m.resolve_response("%%%%%%%%")


async def test_iter_rows_by_table_session_and_ids(backend: BackendPair, clock: FakeClock) -> None:
    m, p = backend.metadata, backend.payloads
    s1, s2 = make_session("a"), make_session("b")
    await m.save_session(s1)
    await m.save_session(s2)
    q1, q2, q3 = make_request(s1, "one"), make_request(s1, "hit"), make_request(s2, "three")
    r1 = await record(m, p, q1, b"r1", at=clock.now())
    r2 = await record(m, p, q1, big(), at=clock.now(), attempt=2)
    await record_hit(m, q2, r1)
    r3 = await record(m, p, q3, b"r3", at=clock.now(), sent=b"uploaded")

    async def ids(table: str, **kw: object) -> list[str]:
        return [r["id"] async for r in m.iter_rows(table, **kw)]  # type: ignore[arg-type]

    assert await ids("sessions") == [s1.id, s2.id]
    assert await ids("sessions", session_id=s2.id) == [s2.id]
    assert await ids("sessions", ids=[s2.id]) == [s2.id]
    assert await ids("requests") == [q1.id, q2.id, q3.id]
    assert await ids("requests", session_id=s1.id) == [q1.id, q2.id]
    assert await ids("requests", ids=[q3.id, q1.id, "nope"]) == [q1.id, q3.id]  # recording order
    assert await ids("requests", session_id=s1.id, ids=[q3.id]) == []
    assert await ids("responses", session_id=s1.id) == [r1.id, r2.id]
    assert await ids("responses", ids=iter({r3.id, r1.id})) == [r1.id, r3.id]
    assert await ids("responses", ids=[]) == []
    assert await ids("responses", session_id="no-such-session") == []

    session_row = (await collect(m.iter_rows("sessions", ids=[s1.id])))[0]
    assert (session_row["source"], session_row["started_at"] is not None) == ("a", True)
    reqs = {r["id"]: r async for r in m.iter_rows("requests")}
    for q in (q1, q2, q3):
        row = reqs[q.id]
        assert HEX64.fullmatch(row["hash"]) and row["hash"] == q.hash
        assert (row["session_id"], row["source"], row["kind"]) == (q.session_id, q.source, q.kind)
    assert reqs[q2.id]["served_from"] == r1.id and reqs[q1.id]["served_from"] is None
    assert reqs[q3.id]["sent_checksum"] == sha(b"uploaded").hex()
    assert reqs[q1.id]["sent_checksum"] is None
    for resp in (r1, r2, r3):
        row = (await collect(m.iter_rows("responses", ids=[resp.id])))[0]
        assert HEX64.fullmatch(row["request_hash"]) and row["request_hash"] == resp.request_hash
        assert (row["request_id"], row["session_id"]) == (resp.request_id, resp.session_id)
        assert (row["checksum"], row["size_bytes"]) == (resp.checksum, resp.size_bytes)
        assert row["status"] == "ok"


async def test_iter_rows_with_more_than_500_ids(backend: BackendPair, clock: FakeClock) -> None:
    m, p = backend.metadata, backend.payloads
    n = 620
    sessions = [make_session(id=str(uuid.uuid4())) for _ in range(n)]
    async with anyio.create_task_group() as tg:
        for sess in sessions:
            tg.start_soon(m.save_session, sess)
    owner = sessions[0]
    reqs = [make_request(owner, params={"i": i}, id=str(uuid.uuid4())) for i in range(n)]
    resp_ids = [str(uuid.uuid4()) for _ in range(n)]
    async with anyio.create_task_group() as tg:
        for q, rid in zip(reqs, resp_ids, strict=True):
            tg.start_soon(partial(record, m, p, q, None, at=clock.now(), id=rid))

    for table, ids in (
        ("sessions", [x.id for x in sessions]),
        ("requests", [q.id for q in reqs]),
        ("responses", resp_ids),
    ):
        in_order = [r["id"] async for r in m.iter_rows(table)]  # type: ignore[arg-type]
        assert sorted(in_order) == sorted(ids)
        assert in_order != sorted(in_order)  # random ids: recording order is not id order
        wanted = [*reversed(ids), "no-such-id"]
        got = [r["id"] async for r in m.iter_rows(table, ids=wanted)]  # type: ignore[arg-type]
        assert got == in_order, table
        few = set(ids[::7])
        got = [r["id"] async for r in m.iter_rows(table, ids=few)]  # type: ignore[arg-type]
        assert got == [i for i in in_order if i in few], table
    got = [r["id"] async for r in m.iter_rows("requests", session_id=owner.id, ids=resp_ids)]
    assert got == []
    got = [r["id"] async for r in m.iter_rows("responses", session_id=owner.id, ids=resp_ids)]
    assert len(got) == n


async def test_count_rows(backend: BackendPair, clock: FakeClock) -> None:
    m, p = backend.metadata, backend.payloads
    assert [await m.count_rows(t) for t in EVERY_TABLE] == [0, 0, 0, 0]
    s = make_session()
    await m.save_session(s)
    req = make_request(s)
    first = await record(m, p, req, b"a", at=clock.now())
    await record(m, p, req, b"a", at=clock.now())  # the same bytes: one payload row
    await record(m, p, make_request(s), big(), at=clock.now(), sent=b"up")
    await record_hit(m, make_request(s), first)
    assert [await m.count_rows(t) for t in EVERY_TABLE] == [1, 3, 3, 3]


async def test_iter_payload_rows_pages_in_digest_order(
    backend: BackendPair, clock: FakeClock
) -> None:
    m, p = backend.metadata, backend.payloads
    s = make_session()
    await m.save_session(s)
    req = make_request(s)
    bodies = {sha(b): b for b in [f"inline body {i}".encode() for i in range(30)]}
    bodies.update({sha(b): b for b in (big(i) for i in range(3))})
    staged = [await stage(p, b) for b in bodies.values()]
    responses = [make_response(req, at=clock.now(), payload=x) for x in staged]
    await m.record(Recording(req, responses, staged))
    assert await m.count_rows("payloads") == 33

    for page_size in (1, 7, 11, 33, 256):  # 11 and 33: the last page is exactly full
        rows = await collect(m.iter_payload_rows(page_size=page_size))
        assert [r.digest for r in rows] == sorted(bodies), page_size
        for row in rows:
            data = bodies[row.digest]
            assert row.size == len(data)
            if len(data) <= INLINE_THRESHOLD:
                assert (row.tier, row.data) == ("inline", data)
            else:
                assert (row.tier, row.data) == ("file", None)


async def test_iter_dangling_references(backend: BackendPair, clock: FakeClock) -> None:
    m, p = backend.metadata, backend.payloads
    s = make_session()
    await m.save_session(s)
    await record(m, p, make_request(s), b"fine", at=clock.now(), sent=b"fine upload")
    assert await collect(m.iter_dangling_references()) == []
    # Rows naming payloads that were never stored (the rule is the writer's to keep: the
    # metadata store reports what breaks it).
    lost, lost_upload = sha(b"lost").hex(), sha(b"lost upload").hex()
    req = make_request(s, "broken")
    resp = make_response(req, at=clock.now(), checksum=lost, size=4)
    await m.record(Recording(req, [resp], sent=lost_upload))
    found = await collect(m.iter_dangling_references())
    assert sorted(found, key=lambda d: d.table) == [
        DanglingReference("requests", req.id, lost_upload),
        DanglingReference("responses", resp.id, lost),
    ]


# -- maintenance ----------------------------------------------------------------------------------


async def test_unreferenced_payloads_and_delete_payloads(
    backend: BackendPair, clock: FakeClock
) -> None:
    m, p = backend.metadata, backend.payloads
    s = make_session()
    await m.save_session(s)
    req = make_request(s)
    named = await record(m, p, req, b"named", at=clock.now(), sent=b"named upload")
    loose = [await stage(p, b"loose inline"), await stage(p, big()), await stage(p, b"comes back")]
    await m.record(Recording(req, payloads=loose))  # payload rows that no row names

    found = await m.unreferenced_payloads()
    assert sorted(found, key=lambda r: r.digest) == sorted(
        (PayloadRow(x.digest, x.size, x.tier) for x in loose), key=lambda r: r.digest
    )  # without their bytes
    assert sha(b"named") not in {r.digest for r in found}
    assert sha(b"named upload") not in {r.digest for r in found}

    # Between finding and deleting, a fetch of the same bytes commits a response naming one.
    comeback = loose[2]
    await m.record(Recording(req, [make_response(req, at=clock.now(), payload=comeback)]))
    deleted = await m.delete_payloads([r.digest for r in found] + [sha(b"named")])
    assert sorted(deleted) == sorted([loose[0].digest, loose[1].digest])
    assert await m.payload(loose[0].digest) is None  # also right after it was recorded
    assert await m.payload(loose[1].digest) is None
    assert await m.payload(comeback.digest) is not None
    assert await m.payload(sha(b"named")) is not None
    assert named.checksum == sha(b"named").hex()
    assert await m.unreferenced_payloads() == []
    assert await m.delete_payloads([loose[0].digest]) == []


async def test_prune(backend: BackendPair, clock: FakeClock) -> None:
    m, p = backend.metadata, backend.payloads
    now = clock.now()
    old, cutoff = now - timedelta(days=40), now - timedelta(days=30)
    sa, sb = make_session("a"), make_session("b")
    await m.save_session(sa)
    await m.save_session(sb)
    q_old, q_mixed, q_new = make_request(sa, "old"), make_request(sa, "mixed"), make_request(sa)
    q_hit_old, q_hit_new, q_b = make_request(sa, "h1"), make_request(sa, "h2"), make_request(sb)
    old_big = big()
    o1 = await record(m, p, q_old, b"old ok", at=old)
    o2 = await record(m, p, q_old, old_big, at=old, status=ERROR)
    m_old = await record(m, p, q_mixed, b"shared", at=old)
    m_new = await record(m, p, q_mixed, b"shared", at=now)
    n1 = await record(m, p, q_new, b"new", at=now)
    await record_hit(m, q_hit_old, o1)
    await record_hit(m, q_hit_new, n1)
    b_old = await record(m, p, q_b, b"other source", at=old)
    before = [await m.count_rows(t) for t in EVERY_TABLE]

    expected = PruneCounts(
        responses=3,
        response_bytes=6 + len(old_big) + 6,
        requests=2,  # q_old (no response left) and the cache hit served o1
        garbage_payloads=2,  # "old ok" and old_big; "shared" is still named by m_new
        garbage_bytes=6 + len(old_big),
    )
    assert await m.prune(cutoff=cutoff, source="a", dry_run=True) == expected
    assert [await m.count_rows(t) for t in EVERY_TABLE] == before
    assert await m.get_response(o1.id) == o1
    assert await m.unreferenced_payloads() == []

    assert await m.prune(cutoff=cutoff, source="a") == expected
    for gone in (o1, o2, m_old):
        assert await m.get_response(gone.id) is None
    assert await m.latest_response(q_old.hash) is None  # o1 was the cache's answer until now
    assert await m.latest_response(q_old.hash, statuses=[ERROR]) is None
    assert await m.latest_response(q_mixed.hash) == m_new
    for kept in (m_new, n1, b_old):
        assert await m.get_response(kept.id) == kept
    remaining = {r["id"] async for r in m.iter_rows("requests")}
    assert remaining == {q_mixed.id, q_new.id, q_hit_new.id, q_b.id}
    assert await m.count_rows("sessions") == 2  # sessions are kept
    assert {r.digest for r in await m.unreferenced_payloads()} == {sha(b"old ok"), sha(old_big)}
    assert await m.count_rows("payloads") == before[3]  # prune leaves payload rows to gc

    again = await m.prune(cutoff=cutoff)  # every source now
    assert (again.responses, again.response_bytes, again.requests) == (1, 12, 1)
    assert await m.get_response(b_old.id) is None
    assert await m.count_rows("sessions") == 2
    nothing = await m.prune(cutoff=cutoff)
    assert (nothing.responses, nothing.requests) == (0, 0)


async def test_prune_by_bucket(backend: BackendPair, clock: FakeClock) -> None:
    m, p = backend.metadata, backend.payloads
    now = clock.now()
    old = now - timedelta(days=40)
    s = make_session()
    await m.save_session(s)
    jan = await record(m, p, make_request(s, as_of_bucket="2026-01"), b"jan", at=old)
    feb = await record(m, p, make_request(s, as_of_bucket="2026-02"), b"feb", at=old)
    counts = await m.prune(cutoff=now, bucket="2026-01")
    assert (counts.responses, counts.requests) == (1, 1)
    assert await m.get_response(jan.id) is None and await m.get_response(feb.id) == feb
    assert (await m.prune(cutoff=old, bucket="2026-02")).responses == 0  # not before the cutoff


async def test_stats(backend: BackendPair, clock: FakeClock) -> None:
    m, p = backend.metadata, backend.payloads
    empty = await m.stats()
    assert empty.sources == []
    assert empty.tiers.get("inline", (0, 0)) == empty.tiers.get("file", (0, 0)) == (0, 0)

    a1, a2, b1 = make_session("a"), make_session("a"), make_session("b")
    for s in (a1, a2, b1):
        await m.save_session(s)
    q1, q2, q3 = make_request(a1), make_request(a1, "x"), make_request(a2)
    large = big()
    await record(m, p, q1, b"failed", at=clock.now(), status=ERROR)
    first = await record(m, p, q1, b"fetched", at=clock.now())
    await record(m, p, q2, large, at=clock.now())
    await record_hit(m, q3, first)
    await record(m, p, make_request(b1, "send"), b"ack", at=clock.now(), status=ACK, sent=b"up")

    got = await m.stats()
    assert {c.source: c for c in got.sources} == {
        "a": SourceCounts(
            "a",
            sessions=2,
            requests=3,
            cache_hits=1,
            fetched=2,
            responses=3,
            error_responses=1,
            bytes=6 + 7 + len(large),
        ),
        "b": SourceCounts(
            "b", sessions=1, requests=1, fetched=1, responses=1, error_responses=0, bytes=3
        ),
    }
    assert got.tiers["inline"] == (4, 6 + 7 + 3 + 2)
    assert got.tiers["file"] == (1, len(large))
    assert isinstance(got.size_bytes, int) and got.size_bytes >= 0


async def test_import_rows(backend: BackendPair, clock: FakeClock, make_pair: PairMaker) -> None:
    src_m, src_p = backend.metadata, backend.payloads
    s = make_session("a")
    await src_m.save_session(s)
    q1, q2 = make_request(s), make_request(s, "hit")
    large = big()
    r1 = await record(src_m, src_p, q1, b"small", at=clock.now(), sent=b"upload")
    clock.advance(1)
    r2 = await record(src_m, src_p, q1, large, at=clock.now(), attempt=2)
    await record_hit(src_m, q2, r1)
    payload_rows = await collect(src_m.iter_payload_rows())
    rows = {t: await collect(src_m.iter_rows(t)) for t in TABLES}

    dst = await make_pair()
    for row in payload_rows:  # the file tier's bytes are in the payload store first
        if row.tier == "file":
            await dst.payloads.put(row.digest, await src_p.get(row.digest, row.size))
    added = await dst.metadata.import_rows(
        iter(payload_rows), {t: iter(r) for t, r in rows.items()}
    )
    assert added == {"payloads": 3, "sessions": 1, "requests": 2, "responses": 2}
    assert {t: await collect(dst.metadata.iter_rows(t)) for t in TABLES} == rows
    assert await collect(dst.metadata.iter_payload_rows()) == payload_rows
    assert await dst.metadata.get_response(r2.id) == r2
    assert await dst.metadata.get_session(s.id) == s
    assert await dst.metadata.latest_response(q1.hash) == r2
    again = await dst.metadata.import_rows(payload_rows, rows)
    assert again == {"payloads": 0, "sessions": 0, "requests": 0, "responses": 0}

    # Payloads already stored need not come again.
    third = await make_pair()
    await third.metadata.import_rows([r for r in payload_rows if r.tier == "inline"], {})
    added = await third.metadata.import_rows([], {"responses": [rows["responses"][0]]})
    assert added["responses"] == 1 and added["payloads"] == 0


async def test_import_rows_refuses_rows_naming_absent_payloads(
    backend: BackendPair, clock: FakeClock, make_pair: PairMaker
) -> None:
    src_m, src_p = backend.metadata, backend.payloads
    s = make_session("a")
    await src_m.save_session(s)
    q1, q2 = make_request(s), make_request(s, "send")
    await record(src_m, src_p, q1, b"small", at=clock.now())
    await record(src_m, src_p, q2, b"ack", at=clock.now(), status=ACK, sent=b"the upload")
    payload_rows = {r.digest: r async for r in src_m.iter_payload_rows()}
    rows = {t: await collect(src_m.iter_rows(t)) for t in TABLES}
    dst = await make_pair()

    async def nothing_written() -> bool:
        counts = [await dst.metadata.count_rows(t) for t in EVERY_TABLE]
        return counts == [0, 0, 0, 0]

    # A response naming a payload neither imported nor stored.
    without_small = [r for d, r in payload_rows.items() if d != sha(b"small")]
    with pytest.raises(IntegrityError):
        await dst.metadata.import_rows(without_small, rows)
    assert await nothing_written()
    # A request whose sent payload is neither imported nor stored.
    without_upload = [r for d, r in payload_rows.items() if d != sha(b"the upload")]
    with pytest.raises(IntegrityError):
        await dst.metadata.import_rows(without_upload, rows)
    assert await nothing_written()
    # With every payload it goes in.
    added = await dst.metadata.import_rows(payload_rows.values(), rows)
    assert added == {"payloads": 3, "sessions": 1, "requests": 2, "responses": 2}


# -- validation outcomes (datasets) ---------------------------------------------------------------


async def test_validation_outcomes_are_kept_per_response_and_model(
    backend: BackendPair, clock: FakeClock
) -> None:
    from mxm_dataio_async.datasets import RecordError, ValidationOutcome, ValidationTotals

    m = backend.metadata
    assert await m.validations("nobody") == []
    assert await m.validation_totals() == []
    errors = (RecordError(3, "price", "Input should be a valid number"), RecordError(7, "a.b", "é"))
    first = ValidationOutcome("r1", "pkg.mod:Bar", ok=8, failed=2, errors=errors, dataset="bars")
    await m.record_validation(first)
    await m.record_validation(ValidationOutcome("r1", "pkg.mod:Quote", ok=1, failed=0))
    await m.record_validation(ValidationOutcome("r2", "pkg.mod:Bar", ok=5, failed=0))
    got = await m.validations("r1")
    assert [(v.model, v.ok, v.failed, v.dataset) for v in got] == [
        ("pkg.mod:Bar", 8, 2, "bars"),
        ("pkg.mod:Quote", 1, 0, None),
    ]
    assert got[0].errors == errors
    assert got[0].validated_at == clock.now()
    # Validating the same response again replaces its outcome for that model.
    clock.advance(5)
    await m.record_validation(ValidationOutcome("r1", "pkg.mod:Bar", ok=10, failed=0))
    again = await m.validations("r1")
    assert (again[0].ok, again[0].failed, again[0].errors) == (10, 0, ())
    assert again[0].validated_at == clock.now()
    assert await m.validation_totals() == [
        ValidationTotals("pkg.mod:Bar", 2, 15, 0),
        ValidationTotals("pkg.mod:Quote", 1, 1, 0),
    ]
