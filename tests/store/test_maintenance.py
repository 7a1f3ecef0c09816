"""Store.verify / gc / prune / stats / export_session / import_bundle, through the Store API."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
import tracemalloc
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import pytest

import mxm_dataio_async as dio
from mxm_dataio_async._durations import parse_duration
from mxm_dataio_async._store._cleanup import GcReport, PruneReport, prune
from mxm_dataio_async._store._verify import ProblemKind, VerifyReport

pytestmark = pytest.mark.anyio

ROOT_DIR = Path(__file__).resolve().parents[2]


def body(req: dio.Request) -> bytes:
    n = int(str(req.endpoint).rsplit("/", 1)[1])
    return (f"payload {n} " * (2 if n % 2 else 40)).encode()  # odd: inline, even: file tier


async def fill(store: dio.Store, n: int = 6, source: str = "src", bucket: str | None = None) -> str:
    async with dio.Registry() as registry:
        registry.register(
            source,
            dio.MockAdapter(body, send_handler=lambda req, data: b"ack:" + data[:8]),
        )
        async with dio.AsyncSession(
            source, store=store, registry=registry, as_of_bucket=bucket
        ) as s:
            for i in range(n):
                await s.fetch(s.request("k", endpoint=f"/x/{i}"))
            await s.send(s.request("up", endpoint="/up", method="POST"), b"sent bytes " * 20)
            return s.session.id


def sql(root: Path, statement: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    with closing(sqlite3.connect(root / "dataio.sqlite")) as conn:
        rows = conn.execute(statement, params).fetchall()
        conn.commit()
    return rows


def backdate(root: Path, where: str, days: int = 40) -> None:
    when = (datetime.now(UTC) - timedelta(days=days)).isoformat(timespec="microseconds")
    sql(root, f"UPDATE responses SET fetched_at = ? WHERE {where}", (when,))


def file_payloads(root: Path) -> list[Path]:
    return sorted(p for p in (root / "payloads").rglob("*") if p.is_file())


def make_old(path: Path, seconds: float = 7200) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


async def test_verify_report_and_progress(tmp_path: Path) -> None:
    async with dio.Store(tmp_path, inline_threshold=100) as store:
        await fill(store)
        events: list[tuple[str, int, int | None]] = []
        report = await store.verify(on_progress=lambda *e: events.append(e))
        assert isinstance(report, VerifyReport)
        assert report.ok and report.exit_code == 0 and report.problems == []
        # 6 fetched bodies + the sent payload + the ack.
        assert (report.payloads, report.responses, report.requests) == (8, 7, 7)
        assert report.files == len(file_payloads(tmp_path)) == 4
        assert {e[0] for e in events} == {"payloads", "responses", "requests", "files"}
        assert events[-1] == ("files", 4, 4)
        assert ("payloads", 8, 8) in events

        inline = sql(tmp_path, "SELECT sha256 FROM payloads WHERE tier = 'inline' LIMIT 1")[0][0]
        sql(tmp_path, "UPDATE payloads SET data = x'00' WHERE sha256 = ?", (inline,))
        file_payloads(tmp_path)[0].write_bytes(b"changed")
        file_payloads(tmp_path)[1].unlink()
        sql(
            tmp_path,
            "UPDATE requests SET sent_checksum = ? WHERE sent_checksum IS NOT NULL",
            ("0" * 64,),
        )
        (tmp_path / "tmp" / "leftover.part").write_bytes(b"?")
        (tmp_path / "payloads" / "stray.txt").write_bytes(b"?")
        report = await store.verify()
        assert not report.ok and report.exit_code == 1
        assert len(report.corrupt_payloads) == 2 and len(report.missing_payloads) == 1
        sender = sql(tmp_path, "SELECT id FROM requests WHERE sent_checksum IS NOT NULL")[0][0]
        assert [p.row for p in report.missing_references] == [f"request {sender}"]
        assert [p.path for p in report.temp_leftovers] == [tmp_path / "tmp" / "leftover.part"]
        assert [p.path for p in report.orphan_files] == [tmp_path / "payloads" / "stray.txt"]
        assert {p.kind for p in report.problems} == set(ProblemKind)
        assert all(p.detail for p in report.problems)


async def test_verify_streams_a_large_payload_in_bounded_memory(tmp_path: Path) -> None:
    big = [os.urandom(24 * 1024 * 1024)]
    async with dio.Store(tmp_path, inline_threshold=1024) as store, dio.Registry() as registry:
        registry.register("big", dio.MockAdapter(lambda req: big[0]))
        async with dio.AsyncSession("big", store=store, registry=registry) as s:
            await s.fetch(s.request("k"))
        big.clear()
        tracemalloc.start()
        try:
            report = await store.verify()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert report.ok and report.bytes == 24 * 1024 * 1024
        assert peak < 4 * 1024 * 1024, peak


async def test_verify_reports_temp_files_of_live_processes_as_in_progress(tmp_path: Path) -> None:
    async with dio.Store(tmp_path) as store:
        (tmp_path / "tmp" / f"{os.getpid()}-abc.part").write_bytes(b"being written")
        (tmp_path / "tmp" / "4194304999-dead.part").write_bytes(b"crashed")
        report = await store.verify()
        assert [p.path.name for p in report.temp_leftovers if p.path] == ["4194304999-dead.part"]


async def test_gc_keeps_referenced_payloads_including_sent_ones(tmp_path: Path) -> None:
    async with dio.Store(tmp_path, inline_threshold=100) as store:
        session_id = await fill(store)
        unreferenced = os.urandom(32)
        sql(
            tmp_path,
            "INSERT INTO payloads VALUES (?, 3, 'inline', x'010203', '2024-01-01T00:00:00+00:00')",
            (unreferenced,),
        )
        before = file_payloads(tmp_path)
        report = await store.gc(grace=0)
        assert isinstance(report, GcReport)
        assert (report.payload_rows, report.payload_bytes, report.payload_files) == (1, 3, [])
        assert file_payloads(tmp_path) == before
        assert sql(tmp_path, "SELECT count(*) FROM payloads")[0][0] == 8
        assert (await store.verify()).ok
        async for resp in store.iter_responses(session_id=session_id):
            assert resp.checksum is not None
            await store.read(resp)
        sent = sql(tmp_path, "SELECT sent_checksum FROM requests WHERE sent_checksum IS NOT NULL")
        assert await store.read(str(sent[0][0])) == b"sent bytes " * 20


async def test_gc_grace_protects_young_files(tmp_path: Path) -> None:
    async with dio.Store(tmp_path, inline_threshold=100) as store:
        await fill(store)
        young = tmp_path / "payloads" / "aa" / "bb" / ("aabb" + "0" * 60)
        young.parent.mkdir(parents=True)
        young.write_bytes(b"a file whose row has not committed yet")
        old = tmp_path / "payloads" / "cc" / "dd" / ("ccdd" + "0" * 60)
        old.parent.mkdir(parents=True)
        old.write_bytes(b"a crashed write")
        make_old(old)
        dry = await store.gc(dry_run=True)  # default grace: one hour
        assert dry.orphan_files == [old] and dry.kept_recent == 1 and old.exists()
        report = await store.gc(grace="30min")
        assert report.orphan_files == [old] and report.orphan_bytes == len(b"a crashed write")
        assert not old.exists() and young.exists()
        assert (await store.gc(grace=timedelta(0))).orphan_files == [young]


async def test_prune_then_gc(tmp_path: Path) -> None:
    async with dio.Store(tmp_path, inline_threshold=100) as store:
        await fill(store, source="a", bucket="b1")
        await fill(store, source="a", bucket="b2")
        keep = await fill(store, source="c")
        backdate(tmp_path, "1")
        sql(
            tmp_path,
            "UPDATE responses SET fetched_at = ? WHERE session_id = ?",
            (datetime.now(UTC).isoformat(timespec="microseconds"), keep),
        )
        dry = await store.prune(older_than="30d", source="a", bucket="b1", dry_run=True)
        assert isinstance(dry, PruneReport) and dry.dry_run
        assert (dry.responses, dry.requests) == (7, 7)
        assert sql(tmp_path, "SELECT count(*) FROM responses")[0][0] == 21
        # Payloads shared between buckets (same bytes) stay referenced: only b1's ack and... none.
        assert dry.garbage_payloads == 0
        report = await store.prune(older_than=timedelta(days=30), source="a")
        assert (report.responses, report.requests) == (14, 14)
        assert report.garbage_payloads == 0  # source c's responses name the same bytes
        assert sql(tmp_path, "SELECT DISTINCT source FROM responses") == [("c",)]
        assert sql(tmp_path, "SELECT count(*) FROM sessions")[0][0] == 3
        await store.prune(older_than=0)  # everything, now
        gone = await store.gc(grace=0)
        assert gone.payload_rows == 8 and len(gone.payload_files) == 4
        assert file_payloads(tmp_path) == []
        assert sql(tmp_path, "SELECT count(*) FROM requests")[0][0] == 0
        assert (await store.verify()).ok
        with pytest.raises(ValueError, match="invalid duration"):
            await store.prune(older_than="soon")
        with pytest.raises(ValueError, match="negative"):
            await store.prune(older_than=-1)


async def test_prune_now_must_be_aware(tmp_path: Path) -> None:
    async with dio.Store(tmp_path):
        pass
    async with dio.Store(tmp_path, create=False) as store:
        with pytest.raises(ValueError, match="timezone-aware"):
            await prune(store.metadata, older_than=1, now=datetime(2024, 1, 1))


async def test_stats(tmp_path: Path) -> None:
    async with dio.Store(tmp_path, inline_threshold=100) as store:
        await fill(store, source="a")
        async with dio.Registry() as registry:
            registry.register("a", dio.MockAdapter(body))
            async with dio.AsyncSession("a", store=store, registry=registry) as s:
                for i in range(3):
                    await s.fetch(s.request("k", endpoint=f"/x/{i}"))  # cache hits
        st = await store.stats()
        (a,) = st.sources
        assert (a.source, a.sessions, a.requests, a.cache_hits, a.fetched) == ("a", 2, 10, 3, 7)
        assert a.hit_rate == pytest.approx(3 / 10) and a.error_rate == 0
        assert (st.inline_payloads, st.file_payloads) == (4, 4)
        assert st.totals.requests == 10 and st.db_bytes > 0


async def test_bundle_through_the_store_api(tmp_path: Path) -> None:
    async with dio.Store(tmp_path / "a", inline_threshold=100) as a:
        session_id = await fill(a)
        exported = await a.export_session(session_id, tmp_path / "s.tar")
        assert (exported.requests, exported.responses, exported.payloads) == (7, 7, 8)
    async with dio.Store(tmp_path / "b", inline_threshold=10_000) as b:
        first = await b.import_bundle(tmp_path / "s.tar")
        assert (first.sessions, first.requests, first.responses, first.payloads) == (1, 7, 7, 8)
        assert first.files_written == 0  # this store keeps them all inline
        second = await b.import_bundle(tmp_path / "s.tar")
        assert second.added == 0
        assert (await b.verify()).ok
        session = await b.get_session(session_id)
        assert session is not None and session.requests == 7
    async with dio.Store(tmp_path / "b", read_only=True) as b:
        assert await b.resolve_session(session_id[:6]) == session_id


async def test_export_refuses_a_corrupt_payload(tmp_path: Path) -> None:
    async with dio.Store(tmp_path, inline_threshold=100) as store:
        session_id = await fill(store)
        file_payloads(tmp_path)[0].write_bytes(b"x" * 10)
        with pytest.raises(dio.IntegrityError, match="corrupt"):
            await store.export_session(session_id, tmp_path / "out.tar")
        assert not (tmp_path / "out.tar").exists()
        assert not (tmp_path / "out.tar.part").exists()


def test_parse_duration() -> None:
    assert parse_duration("30d") == timedelta(days=30)
    assert parse_duration("12h") == timedelta(hours=12)
    assert parse_duration("90min") == timedelta(minutes=90)
    assert parse_duration("2w") == timedelta(weeks=2)
    assert parse_duration("1d12h") == timedelta(days=1, hours=12)
    assert parse_duration(" 45 ") == timedelta(seconds=45)
    assert parse_duration("1.5h") == timedelta(minutes=90)
    for bad in ("", "d", "30x", "-1d", "1d 2h", "h1", "90m", "1M"):
        with pytest.raises(ValueError, match="invalid duration"):
            parse_duration(bad)


async def test_session_ids_and_prefixes(tmp_path: Path) -> None:
    async with dio.Store(tmp_path) as store:
        for suffix in ("1111", "2222", "3333"):
            await store.metadata.save_session(
                dio.Session(
                    id=f"abcd-{suffix}", source="s", as_of=None, started_at=datetime.now(UTC)
                )
            )
    async with dio.Store(tmp_path, read_only=True) as store:
        assert await store.resolve_session("abcd-2222") == "abcd-2222"
        assert await store.resolve_session("abcd-3") == "abcd-3333"
        with pytest.raises(dio.StoreError, match="ambiguous"):
            await store.resolve_session("abcd")
        with pytest.raises(dio.StoreError, match="unknown session"):
            await store.resolve_session("abc")  # too short to be taken as a prefix
        with pytest.raises(dio.StoreError, match="unknown session"):
            await store.resolve_session("zzzzzzzz")


async def test_maintenance_needs_an_existing_store(tmp_path: Path) -> None:
    for mode in ({"read_only": True}, {"create": False}):
        with pytest.raises(dio.StoreError, match="no store at"):
            async with dio.Store(tmp_path / "missing", **mode):  # type: ignore[arg-type]
                pass
        assert not (tmp_path / "missing").exists()
    async with dio.Store(tmp_path / "s") as store:
        await store.aclose()
        with pytest.raises(dio.StoreClosedError):
            await store.verify()


async def test_gc_and_prune_beside_a_writer_in_another_process(tmp_path: Path) -> None:
    """A live ingestion in another process while prune and gc run: nothing it writes is lost."""
    root = tmp_path / "store"

    def child(start: int, stop: int) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "tests.store._ingest_child", str(root), str(start), str(stop)],
            cwd=ROOT_DIR,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    first = child(0, 700)
    assert first.communicate(timeout=120)[0].strip().endswith("calls=700")
    backdate(root, "1")  # the first run is old: prune takes it
    second = child(10_000, 13_000)
    pruned = rounds = 0
    async with dio.Store(root, inline_threshold=512) as store:
        while second.poll() is None or rounds == 0:
            report = await store.prune(older_than="30d")
            pruned += report.responses
            await store.gc(grace=60)
            rounds += 1
            await anyio.sleep(0.02)
        out, err = second.communicate(timeout=120)
        assert second.returncode == 0 and "locked" not in out + err, (out, err)
        assert pruned == 700 and rounds >= 1
        await store.gc(grace=60)
        check = await store.verify(grace=60)
        assert check.ok, check.problems
        rows = sql(root, "SELECT count(*), count(DISTINCT request_hash) FROM responses")
        assert rows == [(3000, 3000)]
        async for resp in store.iter_responses():
            await store.read(resp)
