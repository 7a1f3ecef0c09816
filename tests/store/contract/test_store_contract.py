"""The ``Store`` facade over a backend pair: staging, verified reads, verify, gc and bundles."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Self

import anyio
import anyio.lowlevel
import pytest

from mxm_dataio_async._clock import FakeClock
from mxm_dataio_async._exceptions import IntegrityError
from mxm_dataio_async._models import Request, Response, ResponseStatus
from mxm_dataio_async._store import Store
from mxm_dataio_async._store._protocols import TABLES, Recording
from mxm_dataio_async._store._verify import ProblemKind
from tests.store.contract._helpers import (
    INLINE_THRESHOLD,
    collect,
    make_leftover,
    make_request,
    make_response,
    make_session,
    make_stray,
    overwrite_object,
    record_hit,
    sha,
)
from tests.store.contract.conftest import StoreMaker

pytestmark = pytest.mark.anyio


class Source:
    """An async iterator of chunks that remembers being closed (a response body)."""

    def __init__(self, *chunks: bytes, fail: BaseException | None = None) -> None:
        self._chunks = list(chunks)
        self._fail = fail
        self.closed = 0

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> bytes:
        await anyio.lowlevel.checkpoint()
        if self._chunks:
            return self._chunks.pop(0)
        if self._fail is not None:
            raise self._fail
        raise StopAsyncIteration

    async def aclose(self) -> None:
        self.closed += 1


async def fetch(
    store: Store,
    req: Request,
    data: bytes,
    *,
    at: datetime,
    sent: bytes | None = None,
    **kw: Any,
) -> Response:
    """What the recorder does for one fetch: stage the body (and upload), then record."""
    staged = [await store.stage(data)]
    if sent is not None:
        staged.append(await store.stage(sent))
    resp = make_response(req, at=at, payload=staged[0], **kw)
    await store.metadata.record(
        Recording(req, [resp], staged, sent=None if sent is None else staged[1].checksum)
    )
    return resp


# -- staging --------------------------------------------------------------------------------------


async def test_stage_splits_bytes_by_inline_threshold(store: Store) -> None:
    assert store.inline_threshold == INLINE_THRESHOLD
    at_threshold = os.urandom(INLINE_THRESHOLD)
    above = os.urandom(INLINE_THRESHOLD + 1)

    empty = await store.stage(b"")
    assert (empty.digest, empty.size, empty.tier, empty.data) == (sha(b""), 0, "inline", b"")
    inline = await store.stage(at_threshold)
    assert (inline.tier, inline.data, inline.size) == ("inline", at_threshold, INLINE_THRESHOLD)
    assert inline.checksum == sha(at_threshold).hex()
    assert await store.payloads.stat(inline.digest) is None  # inline bytes go with their rows

    spilled = await store.stage(above)
    assert (spilled.tier, spilled.data, spilled.size) == ("file", None, INLINE_THRESHOLD + 1)
    assert spilled.digest == sha(above)
    assert await store.payloads.get(spilled.digest, spilled.size) == above  # durable already
    # Staging writes no row: record() does.
    assert await store.metadata.count_rows("payloads") == 0


async def test_stage_splits_streams_by_inline_threshold_and_closes_them(store: Store) -> None:
    small = Source(b"ab", b"", b"cd")
    staged = await store.stage(small)
    assert (staged.tier, staged.data, staged.digest) == ("inline", b"abcd", sha(b"abcd"))
    assert small.closed == 1

    chunks = [os.urandom(1000) for _ in range(10)]
    body = b"".join(chunks)
    large = Source(*chunks)
    staged = await store.stage(large)
    assert (staged.tier, staged.data, staged.size, staged.digest) == (
        "file",
        None,
        len(body),
        sha(body),
    )
    assert large.closed == 1
    assert await store.payloads.get(staged.digest, staged.size) == body

    # Over the threshold only with its last chunk.
    edge = Source(b"x" * INLINE_THRESHOLD, b"y")
    staged = await store.stage(edge)
    assert (staged.tier, staged.size) == ("file", INLINE_THRESHOLD + 1)
    assert edge.closed == 1

    async def generated() -> AsyncIterator[bytes]:
        yield b"g" * 600
        yield b"h" * 600

    staged = await store.stage(generated())
    assert staged.tier == "file"
    assert await store.payloads.get(staged.digest, 1200) == b"g" * 600 + b"h" * 600


async def test_stage_of_a_failing_stream_stores_nothing(store: Store) -> None:
    broken = Source(os.urandom(3000), os.urandom(3000), fail=ConnectionResetError("reset"))
    with pytest.raises(ConnectionResetError):
        await store.stage(broken)
    assert broken.closed == 1
    assert await collect(store.payloads.list()) == []
    assert await collect(store.payloads.leftovers(0)) == []


# -- verified reads -------------------------------------------------------------------------------


async def test_read_iter_payload_and_export_payload(
    store: Store, clock: FakeClock, tmp_path: Path
) -> None:
    s = make_session()
    await store.metadata.save_session(s)
    req = make_request(s)
    small_data, large_data = b"small body", os.urandom(5000)
    small = await fetch(store, req, small_data, at=clock.now())
    large = await fetch(store, req, large_data, at=clock.now())
    for resp, data in ((small, small_data), (large, large_data)):
        assert await store.read(resp) == data
        assert await store.read(resp.checksum or "") == data
        chunks = await collect(store.iter_payload(resp, chunk_size=1000))
        assert b"".join(chunks) == data and all(len(c) <= 1000 for c in chunks)
        out = await store.export_payload(resp, tmp_path / f"{resp.id}.bin")
        assert out.read_bytes() == data
    assert len(await collect(store.iter_payload(large, chunk_size=1000))) >= 5

    with pytest.raises(IntegrityError, match="not in the store"):
        await store.read(sha(b"never stored").hex())
    with pytest.raises(IntegrityError):
        await collect(store.iter_payload(sha(b"never stored").hex()))
    without = make_response(req, at=clock.now(), status=ResponseStatus.ERROR)
    with pytest.raises(IntegrityError):
        await store.read(without)
    with pytest.raises(ValueError, match="sha256"):
        await store.read("not-a-checksum")


async def test_reads_of_a_corrupt_object_fail_and_export_nothing(
    store: Store, clock: FakeClock, tmp_path: Path
) -> None:
    s = make_session()
    await store.metadata.save_session(s)
    data = os.urandom(5000)
    resp = await fetch(store, make_request(s), data, at=clock.now())
    await overwrite_object(store.payloads, sha(data), os.urandom(5000))
    with pytest.raises(IntegrityError):
        await store.read(resp)
    with pytest.raises(IntegrityError):
        await collect(store.iter_payload(resp, chunk_size=1000))
    out = tmp_path / "exported.bin"
    with pytest.raises(IntegrityError):
        await store.export_payload(resp, out)
    assert sorted(tmp_path.glob("exported*")) == []  # neither the file nor a partial one


# -- verify ---------------------------------------------------------------------------------------


async def fill(store: Store, clock: FakeClock) -> dict[str, Response]:
    """A small store: inline and file payloads, an upload, an error and a cache hit."""
    s = make_session()
    await store.metadata.save_session(s)
    q1, q2, q3 = make_request(s), make_request(s, "send"), make_request(s, "hit")
    got = {
        "inline": await fetch(store, q1, b"inline body", at=clock.now()),
        "file": await fetch(store, q1, os.urandom(4000), at=clock.now()),
        "ack": await fetch(store, q2, b"ack", at=clock.now(), sent=os.urandom(3000),
                           status=ResponseStatus.ACK),
        "error": await fetch(store, q1, b"502 body", at=clock.now(),
                             status=ResponseStatus.ERROR),
    }  # fmt: skip
    await record_hit(store.metadata, q3, got["inline"])
    return got


async def test_verify_is_clean_on_a_good_store(store: Store, clock: FakeClock) -> None:
    assert (await store.verify()).ok
    await fill(store, clock)
    report = await store.verify()
    assert report.ok and report.exit_code == 0 and report.problems == []
    assert (report.payloads, report.responses, report.requests, report.files) == (5, 4, 3, 2)


async def test_verify_reports_damage_done_through_the_protocols(
    store: Store, clock: FakeClock
) -> None:
    got = await fill(store, clock)
    # A payload's object is deleted.
    lost = got["file"].checksum or ""
    assert await store.payloads.delete(bytes.fromhex(lost))
    # A response names a payload that was never stored.
    s = make_session()
    await store.metadata.save_session(s)
    req = make_request(s, "broken")
    dangling = make_response(req, at=clock.now(), checksum=sha(b"never").hex(), size=5)
    await store.metadata.record(Recording(req, [dangling]))
    # An object no payload row names.
    orphan = os.urandom(2000)
    await store.payloads.put(sha(orphan), orphan)

    report = await store.verify()
    assert not report.ok and report.exit_code == 1
    assert sorted(p.kind for p in report.problems) == sorted(
        [ProblemKind.MISSING_PAYLOAD, ProblemKind.MISSING_REFERENCE, ProblemKind.ORPHAN_FILE]
    )
    assert [p.checksum for p in report.missing_payloads] == [lost]
    (ref,) = report.missing_references
    assert ref.checksum == sha(b"never").hex() and dangling.id in (ref.row or "")
    (orph,) = report.orphan_files
    stored = await store.payloads.stat(sha(orphan))
    assert stored is not None and str(orph.path) == stored.location
    # A young object may be a write about to commit: not an orphan within the grace period.
    young = await store.verify(grace=3600)
    assert young.orphan_files == [] and len(young.problems) == 2


async def test_verify_reports_corruption_strays_and_leftovers(
    store: Store, clock: FakeClock
) -> None:
    got = await fill(store, clock)
    corrupt = got["file"]
    await overwrite_object(store.payloads, bytes.fromhex(corrupt.checksum or ""), b"garbage")
    stray = make_stray(store.payloads)
    leftover = make_leftover(store.payloads)
    report = await store.verify()
    assert [p.checksum for p in report.corrupt_payloads] == [corrupt.checksum]
    assert [p.path for p in report.orphan_files] == [stray]
    assert [p.path for p in report.temp_leftovers] == [leftover]
    assert report.missing_payloads == report.missing_references == []


# -- gc -------------------------------------------------------------------------------------------


async def test_gc_removes_unreferenced_payloads_and_keeps_referenced_ones(
    store: Store, clock: FakeClock
) -> None:
    s = make_session()
    await store.metadata.save_session(s)
    req = make_request(s)
    now = clock.now()
    old = now - timedelta(days=40)
    keep_small, keep_large = b"kept", os.urandom(3000)
    drop_small, drop_large = b"dropped", os.urandom(4000)
    kept = [
        await fetch(store, req, keep_small, at=now),
        await fetch(store, req, keep_large, at=now),
    ]
    await fetch(store, req, drop_small, at=old)
    await fetch(store, req, drop_large, at=old)
    pruned = await store.prune(older_than="30d")
    assert (pruned.responses, pruned.garbage_payloads) == (2, 2)
    orphan = os.urandom(2500)
    await store.payloads.put(sha(orphan), orphan)
    large_obj = await store.payloads.stat(sha(drop_large))
    orphan_obj = await store.payloads.stat(sha(orphan))
    assert large_obj is not None and orphan_obj is not None

    dry = await store.gc(dry_run=True, grace=0)
    assert dry.dry_run and (dry.payload_rows, dry.payload_bytes) == (2, 7 + 4000)
    assert len(dry.orphan_files) == 1
    assert len(await store.metadata.unreferenced_payloads()) == 2  # nothing changed
    assert await store.payloads.stat(sha(drop_large)) is not None

    # Default grace: the objects were just written, a fetch may still be committing them (an
    # inline payload has no object: its row goes at once).
    careful = await store.gc()
    assert careful.kept_recent == 2 and careful.payload_files == careful.orphan_files == []
    assert (careful.payload_rows, careful.payload_bytes) == (1, 7)
    assert await store.metadata.payload(sha(drop_large)) is not None
    assert await store.payloads.stat(sha(drop_large)) is not None
    assert await store.payloads.stat(sha(orphan)) is not None

    report = await store.gc(grace=0)
    assert (report.payload_rows, report.payload_bytes) == (1, 4000)
    assert [str(p) for p in report.payload_files] == [large_obj.location]
    assert [str(p) for p in report.orphan_files] == [orphan_obj.location]
    assert report.orphan_bytes == 2500
    for gone in (drop_small, drop_large):
        assert await store.metadata.payload(sha(gone)) is None
    assert await store.payloads.stat(sha(drop_large)) is None
    assert await store.payloads.stat(sha(orphan)) is None
    assert await store.read(kept[0]) == keep_small
    assert await store.read(kept[1]) == keep_large
    assert (await store.verify()).ok
    again = await store.gc(grace=0)
    assert (again.payload_rows, again.orphan_files, again.freed_bytes) == (0, [], 0)


# -- bundles and persistence ----------------------------------------------------------------------


async def test_export_session_then_import_bundle_round_trips(
    store: Store, make_store: StoreMaker, clock: FakeClock, tmp_path: Path
) -> None:
    got = await fill(store, clock)
    session_id = got["inline"].session_id
    # A second session whose only request was served from the first one's response.
    s2 = make_session("src")
    await store.metadata.save_session(s2)
    await record_hit(store.metadata, make_request(s2, "again"), got["file"])

    bundle = tmp_path / "session.tar"
    exported = await store.export_session(session_id[:8], bundle)
    assert exported.session_id == session_id
    assert (exported.sessions, exported.requests, exported.responses) == (1, 3, 4)
    assert exported.payloads == 5

    dst = await make_store()
    imported = await dst.import_bundle(bundle)
    assert imported.session_id == session_id
    assert (imported.sessions, imported.requests, imported.responses) == (1, 3, 4)
    assert imported.payloads == 5
    for table in TABLES:
        mine = await collect(store.metadata.iter_rows(table, session_id=session_id))
        theirs = await collect(dst.metadata.iter_rows(table, session_id=session_id))
        assert theirs == mine, table
    for resp in got.values():
        assert await dst.get_response(resp.id) == resp
        assert await dst.read(resp) == await store.read(resp)
    assert await dst.get_session(session_id) == await store.get_session(session_id)
    assert (await dst.verify()).ok
    again = await dst.import_bundle(bundle)
    assert again.added == 0 and again.files_written == 0

    # The cache-hit session carries the response it was served, with its request and session.
    hit_bundle = tmp_path / "hits.tar.gz"
    await store.export_session(s2.id, hit_bundle)
    third = await make_store()
    hits = await third.import_bundle(hit_bundle)
    assert (hits.sessions, hits.requests, hits.responses, hits.payloads) == (2, 2, 1, 1)
    assert await third.read(got["file"]) == await store.read(got["file"])
    assert (await third.verify()).ok


def _reader_batches(store: Store) -> int:
    """How many batches the store's batched reader has queried (each backend keeps the count)."""
    reader = getattr(store.metadata, "_batch_reader", None) or store.metadata._reader  # type: ignore[attr-defined]
    batches: int = reader.batches
    return batches


async def test_reads_after_lookups_and_in_a_loop_come_from_memory_of_stored_bytes(
    make_store: StoreMaker, clock: FakeClock, tmp_path: Path
) -> None:
    # A store opened afresh (nothing committed in this process): the lookup that finds a
    # response brings its inline payload, and a loop over iter_responses reads ahead; every read
    # returns the exact bytes, and the reads after lookups need no query of their own.
    root = tmp_path / "reopened"
    first = await make_store(root=root)
    s = make_session()
    await first.metadata.save_session(s)
    bodies = {}
    for i in range(40):
        req = make_request(s, kind=f"k{i}")
        data = os.urandom(100 + i) if i % 10 else os.urandom(INLINE_THRESHOLD + 10)  # some files
        bodies[req.hash] = (await fetch(first, req, data, at=clock.now()), data)
    await first.aclose()

    second = await make_store(root=root)
    for request_hash, (written, data) in bodies.items():
        found = await second.latest_response(request_hash)
        assert found is not None and found.id == written.id
        before = _reader_batches(second)
        assert await second.read(found) == data
        if len(data) <= INLINE_THRESHOLD:  # inline: brought by the lookup
            assert _reader_batches(second) == before
    await second.aclose()

    third = await make_store(root=root)
    by_id = {written.id: data for written, data in bodies.values()}
    read = {r.id: await third.read(r) async for r in third.iter_responses(page_size=16)}
    assert read == by_id


async def test_close_commits_queued_records_and_a_reopened_store_has_everything(
    make_store: StoreMaker, clock: FakeClock, tmp_path: Path
) -> None:
    root = tmp_path / "persistent"
    first = await make_store(root=root)
    s = make_session()
    await first.metadata.save_session(s)
    req = make_request(s)
    written = await fetch(first, req, os.urandom(3000), at=clock.now())
    staged = await first.stage(b"audit only")
    queued = make_response(req, at=clock.now(), payload=staged)
    first.metadata.record_later(Recording(req, [queued], [staged]))
    await first.aclose()

    second = await make_store(root=root)
    assert await second.get_response(written.id) == written
    assert await second.get_response(queued.id) == queued
    assert await second.read(queued) == b"audit only"
    assert len(await second.read(written)) == 3000
    assert [x.id for x in await second.list_sessions()] == [s.id]
