from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from mxm_dataio_async._exceptions import IntegrityError, StoreClosedError, StoreError
from mxm_dataio_async._models import (
    CacheMode,
    Request,
    Response,
    ResponseStatus,
    Session,
    new_id,
    utcnow,
)
from mxm_dataio_async._request import build_request
from mxm_dataio_async._store import DB_NAME, Recording, SqliteMetadata, Store
from mxm_dataio_async._store._local import LocalPayloads
from mxm_dataio_async._store._sqlite._schema import SCHEMA_VERSION
from mxm_dataio_async._store._store import HASH_ON_LOOP_MAX

pytestmark = pytest.mark.anyio


def _session(source: str = "src") -> Session:
    return Session(id=new_id(), source=source, as_of=None, started_at=utcnow())


def _response(req: Request, checksum: str, size: int, **kw: object) -> Response:
    fields: dict[str, object] = {
        "id": new_id(),
        "request_id": req.id,
        "request_hash": req.hash,
        "session_id": req.session_id,
        "status": ResponseStatus.OK,
        "checksum": checksum,
        "size_bytes": size,
        "fetched_at": utcnow(),
        "cache_mode": CacheMode.DEFAULT,
        "ttl_seconds": None,
        "as_of_bucket": None,
        "cache_tag": None,
    }
    fields.update(kw)
    return Response(**fields)  # type: ignore[arg-type]


async def _put(store: Store, req: Request, data: bytes, **kw: object) -> Response:
    staged = await store.stage(data)
    resp = _response(req, staged.checksum, staged.size, **kw)
    await store.metadata.record(Recording(req, [resp], [staged]))
    return resp


async def test_creates_schema_with_wal_and_version(tmp_path: Path) -> None:
    async with Store(tmp_path / "s"):
        pass
    conn = sqlite3.connect(tmp_path / "s" / DB_NAME)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"sessions", "requests", "responses", "payloads"} <= tables
    plan = conn.execute(
        "EXPLAIN QUERY PLAN SELECT id FROM responses WHERE request_hash = ? AND status = 'ok' "
        "ORDER BY fetched_at DESC LIMIT 1",
        (b"x" * 32,),
    ).fetchall()
    assert "ix_responses_usable" in str(plan)


async def test_inline_and_file_tiers_roundtrip_and_dedupe(tmp_path: Path) -> None:
    async with Store(tmp_path, inline_threshold=1024) as store:
        s = _session()
        await store.metadata.save_session(s)
        req = build_request(session_id=s.id, source="src", kind="k")
        small = await _put(store, req, b"small")
        big_bytes = os.urandom(5000)
        big = await _put(store, req, big_bytes)
        again = await _put(store, req, big_bytes)  # same content: stored once
        assert await store.read(small) == b"small"
        assert await store.read(big) == big_bytes
        assert await store.read(again) == big_bytes
        files = [p for p in (tmp_path / "payloads").rglob("*") if p.is_file()]
        assert [f.name for f in files] == [big.checksum]
        chunks = [c async for c in store.iter_payload(big, chunk_size=1000)]
        assert b"".join(chunks) == big_bytes and len(chunks) == 5
        out = await store.export_payload(big, tmp_path / "exported.bin")
        assert out.read_bytes() == big_bytes
    conn = sqlite3.connect(tmp_path / DB_NAME)
    tiers = dict(conn.execute("SELECT tier, count(*) FROM payloads GROUP BY tier").fetchall())
    assert tiers == {"inline": 1, "file": 1}


async def test_streamed_payload_spills_to_file(tmp_path: Path) -> None:
    chunks = [os.urandom(1000) for _ in range(10)]
    closed = []

    async def gen() -> AsyncIterator[bytes]:
        try:
            for c in chunks:
                yield c
        finally:
            closed.append(True)

    async with Store(tmp_path, inline_threshold=2500) as store:
        staged = await store.stage(gen())
        assert staged.tier == "file" and staged.size == 10_000 and staged.data is None
        assert (
            tmp_path / "payloads" / staged.checksum[:2] / staged.checksum[2:4] / staged.checksum
        ).read_bytes() == b"".join(chunks)
        assert closed == [True]
        small = await store.stage(gen())
        assert small.tier == "file"

        async def tiny() -> AsyncIterator[bytes]:
            yield b"ab"
            yield b"cd"

        t = await store.stage(tiny())
        assert t.tier == "inline" and t.data == b"abcd"
    assert list((tmp_path / "tmp").iterdir()) == []


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
async def test_a_large_payload_in_memory_is_hashed_off_the_event_loop(
    tmp_path: Path, kind: Any
) -> None:
    """sha256 takes ~0.5 ms a MiB: done in the loop, it would stall every other fetch. Other
    tasks run while a body above HASH_ON_LOOP_MAX is hashed; a smaller one costs no hop."""
    ticks = 0
    seen: list[tuple[int, int]] = []  # (size, ticks) as each payload reached the payload store

    class Watching(LocalPayloads):
        async def put(self, digest: bytes, data: bytes) -> None:
            seen.append((len(data), ticks))
            await super().put(digest, data)

    async def ticking() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await anyio.lowlevel.checkpoint()

    large = os.urandom(HASH_ON_LOOP_MAX + 1)
    small = os.urandom(HASH_ON_LOOP_MAX)
    async with (
        Store(tmp_path, inline_threshold=1024, payloads=Watching(tmp_path)) as store,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(ticking)
        await anyio.lowlevel.checkpoint()
        before = ticks
        staged = await store.stage(kind(large))
        between = ticks
        small_staged = await store.stage(kind(small))
        tg.cancel_scope.cancel()
        assert staged.checksum == hashlib.sha256(large).hexdigest()
        assert (staged.size, staged.tier) == (len(large), "file")
        assert await store.payloads.get(staged.digest, staged.size) == large
        assert small_staged.checksum == hashlib.sha256(small).hexdigest()
    assert seen[0][0] == len(large) and seen[0][1] > before  # the loop ran on while it hashed
    assert seen[1] == (len(small), between)  # hashed in place: nothing ran before its put


async def test_failed_stream_leaves_no_temp_file(tmp_path: Path) -> None:
    async def broken() -> AsyncIterator[bytes]:
        yield os.urandom(5000)
        raise ConnectionResetError("peer went away")

    async with Store(tmp_path, inline_threshold=100) as store:
        with pytest.raises(ConnectionResetError):
            await store.stage(broken())
    assert list((tmp_path / "tmp").iterdir()) == []
    assert [p for p in (tmp_path / "payloads").rglob("*") if p.is_file()] == []


async def test_corrupt_payloads_raise_integrity_error(tmp_path: Path) -> None:
    async with Store(tmp_path, inline_threshold=100) as store:
        s = _session()
        await store.metadata.save_session(s)
        req = build_request(session_id=s.id, source="src", kind="k")
        inline = await _put(store, req, b"inline bytes")
        big = await _put(store, req, b"x" * 1000)
    conn = sqlite3.connect(tmp_path / DB_NAME)
    conn.execute("UPDATE payloads SET data = ? WHERE tier = 'inline'", (b"tampered!!!!",))
    conn.commit()
    conn.close()
    path = next(p for p in (tmp_path / "payloads").rglob("*") if p.is_file())
    path.write_bytes(b"y" * 1000)
    async with Store(tmp_path, inline_threshold=100, read_only=True) as view:
        with pytest.raises(IntegrityError, match="corrupt"):
            await view.read(big)
        with pytest.raises(IntegrityError, match="corrupt"):
            _ = [c async for c in view.iter_payload(big)]
    assert path.exists()  # a read-only store reports, and changes nothing
    async with Store(tmp_path, inline_threshold=100) as store:
        with pytest.raises(IntegrityError, match=r"corrupt.*discarded"):
            await store.read(inline)
        with pytest.raises(IntegrityError, match=r"corrupt.*discarded"):
            await store.read(big)
        assert not path.exists()  # the bad copy is gone: a fetch stores the bytes afresh
        with pytest.raises(IntegrityError, match="not in the store"):
            _ = [c async for c in store.iter_payload(big)]
        with pytest.raises(IntegrityError, match="not in the store"):
            await store.read("ab" * 32)


async def test_a_hit_reads_the_payload_fetched_with_its_lookup(tmp_path: Path) -> None:
    # The lookup that finds a response reads its inline payload in the same hop; read() then
    # needs no query of its own, and still verifies the bytes (they come from storage).
    async with Store(tmp_path, inline_threshold=100) as store:
        s = _session()
        await store.metadata.save_session(s)
        small = build_request(session_id=s.id, source="src", kind="small")
        large = build_request(session_id=s.id, source="src", kind="large")
        await _put(store, small, b"inline bytes")
        await _put(store, large, b"x" * 1000)  # a file: nothing to prefetch
    async with Store(tmp_path, inline_threshold=100) as store:
        metadata = store.metadata
        assert isinstance(metadata, SqliteMetadata)
        reader = metadata._batch_reader
        assert reader is not None
        memory = metadata._memory
        hit = await store.latest_response(small.hash)
        assert hit is not None and hit.checksum is not None
        digest = bytes.fromhex(hit.checksum)
        assert memory.prefetched.get(digest) == b"inline bytes"
        big = await store.latest_response(large.hash)
        assert big is not None and big.checksum is not None
        assert memory.prefetched.get(bytes.fromhex(big.checksum)) is None
        queries = reader.batches
        assert await store.read(hit) == b"inline bytes"
        assert reader.batches == queries  # served from the prefetch: no query
        # bytes from the prefetch are verified like any stored bytes
        memory.prefetched.put(digest, b"tampered!!!!")
        with pytest.raises(IntegrityError, match=r"corrupt.*discarded"):
            await store.read(hit)
        assert memory.prefetched.get(digest) is None  # discarding forgets them
        # deleting payload rows forgets what was prefetched
        memory.prefetched.put(b"k" * 32, b"anything")
        await metadata.delete_payloads([])
        assert len(memory.prefetched) == 0


async def test_a_lookup_finds_a_response_committed_after_its_query_ran(tmp_path: Path) -> None:
    # The batched lookup's snapshot may predate a commit that lands before the lookup returns:
    # the response committed meanwhile answers it, and nothing is kept once no lookup runs.
    async with Store(tmp_path) as store:
        metadata = store.metadata
        assert isinstance(metadata, SqliteMetadata)
        reader = metadata._batch_reader
        assert reader is not None
        s = _session()
        await metadata.save_session(s)
        req = build_request(session_id=s.id, source="src", kind="raced")
        recorded: list[Response] = []
        latest = reader.latest

        async def commit_after_the_query(key: bytes) -> tuple[Any, ...] | None:
            row = await latest(key)  # the query has run: it found nothing
            assert row is None
            recorded.append(await _put(store, req, b"recorded meanwhile"))
            return row

        reader.latest = commit_after_the_query  # type: ignore[method-assign, assignment]
        found = await metadata.latest_response(req.hash)
        assert found is not None and found.id == recorded[0].id
        assert len(metadata._window) == 0
        # A commit before the lookup began is the query's to find, not the window's.
        reader.latest = latest  # type: ignore[method-assign]
        again = await metadata.latest_response(req.hash)
        assert again is not None and again.id == recorded[0].id


async def test_reading_in_a_loop_over_iter_responses_reads_ahead(tmp_path: Path) -> None:
    # The documented loop: one query brings a payload and those after it on the page (up to
    # AHEAD_BYTES), not one query per read; what is read ahead is verified like stored bytes.
    from mxm_dataio_async._store import _memory

    bodies = [os.urandom(700) + bytes([i % 256]) for i in range(120)]
    async with Store(tmp_path, inline_threshold=1024) as store:
        s = _session()
        await store.metadata.save_session(s)
        for i, body in enumerate(bodies):
            await _put(store, build_request(session_id=s.id, source="src", kind=f"k{i}"), body)
        await _put(store, build_request(session_id=s.id, source="src", kind="file"), b"f" * 2000)
    conn = sqlite3.connect(tmp_path / DB_NAME)  # the 100th inline payload, damaged in place
    damaged = hashlib.sha256(bodies[99]).digest()
    conn.execute("UPDATE payloads SET data = ? WHERE sha256 = ?", (b"x" * 701, damaged))
    conn.commit()
    conn.close()
    async with Store(tmp_path, inline_threshold=1024) as store:
        metadata = store.metadata
        assert isinstance(metadata, SqliteMetadata)
        queries: list[str] = []
        fetchall = metadata._fetchall

        async def counted(sql: str, params: Any = ()) -> list[Any]:
            queries.append(sql)
            return await fetchall(sql, params)

        metadata._fetchall = counted  # type: ignore[method-assign]
        got: list[bytes] = []
        async for resp in store.iter_responses(page_size=50):
            if resp.checksum == damaged.hex():
                with pytest.raises(IntegrityError, match="corrupt"):
                    await store.read(resp)
                got.append(b"damaged")
            else:
                got.append(await store.read(resp))
    assert got == [*bodies[:99], b"damaged", *bodies[100:], b"f" * 2000]
    ahead = [q for q in queries if "FROM payloads" in q]
    pages = [q for q in queries if "FROM responses" in q]
    assert len(pages) == 3  # 121 responses, 50 a page
    # one read-ahead per page (701 bytes x 50 is under AHEAD_BYTES), not one per read
    assert len(ahead) == 3, queries
    assert _memory.AHEAD_BYTES > 50 * 701


async def test_read_ahead_of_a_payload_many_responses_share(tmp_path: Path) -> None:
    # Identical bodies share one payload row: a page of 50 responses naming it costs one
    # read-ahead query, not one per read (nor a query of 50 copies of one key).
    shared, other = os.urandom(600), os.urandom(600)
    async with Store(tmp_path, inline_threshold=1024) as store:
        s = _session()
        await store.metadata.save_session(s)
        for i in range(100):
            body = other if i == 70 else shared
            await _put(store, build_request(session_id=s.id, source="src", kind=f"k{i}"), body)
    async with Store(tmp_path, inline_threshold=1024) as store:
        metadata = store.metadata
        assert isinstance(metadata, SqliteMetadata)
        reader = metadata._batch_reader
        assert reader is not None
        queries: list[tuple[str, Any]] = []
        fetchall = metadata._fetchall

        async def counted(sql: str, params: Any = ()) -> list[Any]:
            queries.append((sql, params))
            return await fetchall(sql, params)

        metadata._fetchall = counted  # type: ignore[method-assign]
        before = reader.batches
        got = [await store.read(r) async for r in store.iter_responses(page_size=50)]
    assert got == [other if i == 70 else shared for i in range(100)]
    ahead = [params for sql, params in queries if "FROM payloads" in sql]
    # page 1: the shared one; page 2: the other (the shared one is in memory already)
    assert [len(p) for p in ahead] == [1, 1]
    assert reader.batches == before  # no read went to the batched reader


async def test_lookup_and_iteration(tmp_path: Path) -> None:
    async with Store(tmp_path) as store:
        s1, s2 = _session("a"), _session("b")
        await store.metadata.save_session(s1)
        await store.metadata.save_session(s2)
        r1 = build_request(session_id=s1.id, source="a", kind="quote")
        r2 = build_request(session_id=s2.id, source="b", kind="bars")
        old = await _put(store, r1, b"old", fetched_at=utcnow() - timedelta(hours=2))
        new = await _put(store, r1, b"new")
        await _put(store, r1, b"err", status=ResponseStatus.ERROR)
        await _put(store, r2, b"other")
        latest = await store.latest_response(r1.hash)
        assert latest is not None and latest.id == new.id
        assert latest.fetched_at == new.fetched_at and latest.checksum == new.checksum
        errs = await store.latest_response(r1.hash, statuses=[ResponseStatus.ERROR])
        assert errs is not None and errs.status is ResponseStatus.ERROR
        assert await store.latest_response("00" * 32) is None
        got = await store.get_response(old.id)
        assert got == old
        assert await store.get_response("nope") is None
        assert [x.id async for x in store.iter_responses(source="a", status="ok")] == [
            old.id,
            new.id,
        ]
        assert len([x async for x in store.iter_responses(kind="bars")]) == 1
        assert len([x async for x in store.iter_responses(session_id=s1.id)]) == 3
        recent = [
            x.id
            async for x in store.iter_responses(since=utcnow() - timedelta(hours=1), source="a")
        ]
        assert old.id not in recent and new.id in recent
        early = [x.id async for x in store.iter_responses(until=utcnow() - timedelta(hours=1))]
        assert early == [old.id]
        paged = [x.id async for x in store.iter_responses(page_size=1)]
        assert len(paged) == 4
        with pytest.raises(ValueError, match="timezone-aware"):
            _ = [x async for x in store.iter_responses(since=datetime(2020, 1, 1))]
        sessions = await store.list_sessions()
        assert {x.id for x in sessions} == {s1.id, s2.id}
        assert [x.id for x in await store.list_sessions(source="b")] == [s2.id]
        assert (await store.get_session(s1.id)) == s1


async def test_group_commit_batches_concurrent_writes(tmp_path: Path) -> None:
    async with Store(tmp_path) as store:
        s = _session()
        await store.metadata.save_session(s)
        req = build_request(session_id=s.id, source="src", kind="k")
        async with anyio.create_task_group() as tg:
            for i in range(300):
                tg.start_soon(_put, store, req, str(i).encode())
        assert isinstance(store.metadata, SqliteMetadata)
        writer = store.metadata._writer  # the SQLite backend's group-commit writer
        assert writer is not None
        assert writer.jobs == 301
        assert writer.batches < 100  # many rows per transaction
        assert len([x async for x in store.iter_responses()]) == 300


async def test_lifecycle_errors(tmp_path: Path) -> None:
    store = Store(tmp_path)
    with pytest.raises(StoreClosedError, match="not open yet"):
        await store.read("00" * 32)
    async with store:
        assert store.is_open
    with pytest.raises(StoreClosedError, match="was closed"):
        await store.list_sessions()
    await store.aclose()  # twice is fine
    with pytest.raises(StoreClosedError, match="create a new Store"):
        await store.open()


async def test_not_writable_root(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        # root ignores permission bits; a path under a regular file cannot be created by anyone.
        (tmp_path / "file").write_text("x")
        bad = tmp_path / "file" / "store"
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        bad = ro / "store"
    with pytest.raises(StoreError, match="cannot create store root"):
        async with Store(bad):
            pass


async def test_not_sqlite_file(tmp_path: Path) -> None:
    (tmp_path / DB_NAME).write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="not an SQLite database"):
        async with Store(tmp_path):
            pass


async def test_newer_schema_refused(tmp_path: Path) -> None:
    async with Store(tmp_path):
        pass
    conn = sqlite3.connect(tmp_path / DB_NAME)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="newer than this release"):
        async with Store(tmp_path):
            pass


async def test_temp_leftovers_of_dead_processes_removed(tmp_path: Path) -> None:
    async with Store(tmp_path):
        pass
    dead = tmp_path / "tmp" / "999999999-abc.part"
    dead.write_bytes(b"partial")
    async with Store(tmp_path) as store:
        assert store.temp_files_removed == 1
    assert not dead.exists()


async def test_reopen_from_new_process(tmp_path: Path) -> None:
    async with Store(tmp_path, inline_threshold=10) as store:
        s = _session()
        await store.metadata.save_session(s)
        req = build_request(session_id=s.id, source="src", kind="k", params={"p": 1})
        a = await _put(store, req, b"payload-in-a-file")
        b = await _put(store, req, b"inline")
    script = textwrap.dedent(
        f"""
        import anyio
        from mxm_dataio_async._store import Store

        async def main():
            async with Store({str(tmp_path)!r}) as store:
                latest = await store.latest_response({req.hash!r})
                print(latest.id)
                print((await store.read({a.checksum!r})).decode())
                print((await store.read({b.checksum!r})).decode())
                print(len(await store.list_sessions()))

        anyio.run(main)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.split() == [b.id, "payload-in-a-file", "inline", "1"]


async def test_bad_constructor_args(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="inline_threshold"):
        Store(tmp_path, inline_threshold=-1)
    with pytest.raises(TypeError, match="inline_threshold"):
        Store(tmp_path, inline_threshold=1.5)  # type: ignore[arg-type]
    assert "state=unopened" in repr(Store(tmp_path))
    assert datetime.now(UTC).tzinfo is UTC


async def test_public_per_statement_commit_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mxm_dataio_async._store._sqlite import _writer

    monkeypatch.setattr(_writer, "ONE_HOP_COMMIT", False)
    async with Store(tmp_path) as store:
        s = _session()
        await store.metadata.save_session(s)
        req = build_request(session_id=s.id, source="src", kind="k")
        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(_put, store, req, str(i).encode())
        assert len([x async for x in store.iter_responses()]) == 50


async def test_lookups_never_see_a_transaction_that_rolls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lookups share the writer's connection. On the per-statement commit path a transaction
    spans several calls on it; a lookup queued meanwhile waits for its end, so it never answers
    with rows that are then rolled back."""
    from mxm_dataio_async._store._sqlite import _writer

    monkeypatch.setattr(_writer, "ONE_HOP_COMMIT", False)
    async with Store(tmp_path) as store:
        s = _session()
        await store.metadata.save_session(s)
        req = build_request(session_id=s.id, source="src", kind="k")
        metadata = store.metadata
        assert isinstance(metadata, SqliteMetadata) and metadata._writer is not None
        conn = metadata._writer.conn
        inside, asked = anyio.Event(), anyio.Event()
        looked: list[Response | None] = []
        execute = conn.execute

        async def failing_commit(sql: str, *args: Any) -> Any:
            if sql == "COMMIT":
                inside.set()
                with anyio.fail_after(30):  # a bound, not a timing assertion
                    while not metadata._batch_reader._latest:  # type: ignore[union-attr]
                        await anyio.lowlevel.checkpoint()
                for _ in range(20):  # give a lookup that does not wait every chance to run
                    await anyio.lowlevel.checkpoint()
                raise sqlite3.OperationalError("disk I/O error")
            return await execute(sql, *args)

        monkeypatch.setattr(conn, "execute", failing_commit)

        async def look() -> None:
            await inside.wait()
            lookup = store.latest_response(req.hash)
            asked.set()
            looked.append(await lookup)

        async with anyio.create_task_group() as tg:
            tg.start_soon(look)
            with pytest.raises(StoreError, match="disk I/O"):
                await _put(store, req, b"rolled back")
        monkeypatch.setattr(conn, "execute", execute)
        assert looked == [None]
        assert await store.latest_response(req.hash) is None


async def test_batched_reads_answer_each_caller(tmp_path: Path) -> None:
    async with Store(tmp_path) as store:
        s = _session()
        await store.metadata.save_session(s)
        reqs = [
            build_request(session_id=s.id, source="src", kind="k", params={"i": i})
            for i in range(20)
        ]
        stored = {r.hash: await _put(store, r, f"body{i}".encode()) for i, r in enumerate(reqs)}
        found: dict[str, Response | None] = {}
        bodies: dict[str, bytes] = {}

        async def look(r: Request) -> None:
            found[r.hash] = await store.latest_response(r.hash)
            resp = found[r.hash]
            assert resp is not None
            bodies[r.hash] = await store.read(resp)

        missing = build_request(session_id=s.id, source="src", kind="absent")
        async with anyio.create_task_group() as tg:
            for r in reqs * 3:  # duplicates in the same batch get the same answer
                tg.start_soon(look, r)
            tg.start_soon(lambda: store.latest_response(missing.hash))
        assert {h: r.id for h, r in found.items() if r} == {h: r.id for h, r in stored.items()}
        assert bodies == {r.hash: f"body{i}".encode() for i, r in enumerate(reqs)}
        assert await store.latest_response(missing.hash) is None
        assert isinstance(store.metadata, SqliteMetadata)
        reader = store.metadata._batch_reader
        assert reader is not None and reader.batches < 40


async def test_text_with_lone_surrogates_is_stored_escaped(tmp_path: Path) -> None:
    """Undecodable header bytes arrive as lone surrogates: they must not kill the writer."""
    async with Store(tmp_path) as store:
        s = _session()
        await store.metadata.save_session(s)
        req = build_request(session_id=s.id, source="src", kind="k")
        resp = await _put(
            store,
            req,
            b"body",
            content_type="text/\udcff",
            headers={"X-Odd": "caf\udce9"},
            error="bad \ud800",
        )
        got = await store.get_response(resp.id)
        assert got is not None
        assert got.content_type == "text/\\udcff"
        assert got.headers == {"X-Odd": "caf\udce9"}  # ASCII JSON round-trips surrogates exactly
        assert got.error == "bad \\ud800"
        # The writer is still alive.
        await _put(store, req, b"after")
        assert len([x async for x in store.iter_responses()]) == 2


async def test_an_unbindable_row_fails_its_job_only(tmp_path: Path) -> None:
    async with Store(tmp_path) as store:
        s = _session()
        await store.metadata.save_session(s)
        req = build_request(session_id=s.id, source="src", kind="k")
        bad_staged = await store.stage(b"bad")
        bad = _response(req, bad_staged.checksum, bad_staged.size, elapsed_ms=object())
        results: list[BaseException | None] = []

        async def record_bad() -> None:
            try:
                await store.metadata.record(Recording(req, [bad], [bad_staged]))
                results.append(None)
            except StoreError as exc:
                results.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(record_bad)
            tg.start_soon(_put, store, req, b"good")  # same batch, committed all the same
        assert isinstance(results[0], StoreError)
        assert "cannot commit" in str(results[0])
        assert [x.checksum async for x in store.iter_responses()] == [
            hashlib.sha256(b"good").hexdigest()
        ]


async def test_every_response_field_round_trips(tmp_path: Path) -> None:
    # Each field gets a value of its own, so a column read into the wrong field shows up.
    req = build_request(session_id="s1", source="src", kind="k", params={"a": 1})
    async with Store(tmp_path / "s") as store:
        staged = await store.stage(b"payload bytes")
        original = _response(
            req,
            staged.checksum,
            staged.size,
            cache_mode=CacheMode.REVALIDATE,
            ttl_seconds=12.5,
            as_of_bucket="2026-11-23",
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
        await store.metadata.record(Recording(req, [original], [staged]))
        by_id = await store.get_response(original.id)
        latest = await store.latest_response(req.hash)
    assert by_id == original and latest == original  # eq compares every field (not payload)
    assert by_id is not None and by_id.from_cache is False
    assert by_id.status is ResponseStatus.OK and by_id.cache_mode is CacheMode.REVALIDATE


def test_served_from_cache_is_replace_with_from_cache() -> None:
    from dataclasses import fields, replace

    from mxm_dataio_async._models import served_from_cache

    req = build_request(session_id="s1", source="src", kind="k")
    original = _response(req, "ab" * 32, 3, headers={"A": "b"}, sequence=4, error="e")
    served = served_from_cache(original)
    assert served == replace(original, from_cache=True) and served.from_cache is True
    assert original.from_cache is False  # the original is untouched
    for f in fields(Response):
        if f.name != "from_cache":
            assert getattr(served, f.name) is getattr(original, f.name)
