"""The work queue of a run shared by many workers, on a real PostgreSQL: runs, idempotent plans,
claims that never hand one chunk out twice, leases on the server's clock, and the fence that keeps a
stale worker from recording anything (``_store/_work.py``)."""

from __future__ import annotations

import anyio
import asyncpg  # type: ignore[import-untyped]
import pytest

from mxm_dataio_async._exceptions import ClaimLost, RunMismatch
from mxm_dataio_async._models import ResponseStatus
from mxm_dataio_async._store._postgres import PostgresMetadata
from mxm_dataio_async._store._protocols import Recording
from mxm_dataio_async._store._work import Claim, Mark, WorkQueue
from tests.store.contract._helpers import START, make_request, make_response, make_session
from tests.store.postgres.conftest import MetadataMaker
from tests.store.postgres.test_postgres_coordination import server_now, wait_until_server_passes

pytestmark = pytest.mark.anyio

HASH = "c0ffee" * 10 + "c0ff"


async def new_run(
    m: PostgresMetadata, run: str = "r1", *, total: int = 10, chunk_size: int = 4
) -> WorkQueue:
    q = m.work
    info = await q.open_run(run, job="job", config_hash=HASH, total=total, chunk_size=chunk_size)
    assert (info.total, info.chunk_size, info.planned) == (total, chunk_size, False)
    return q


async def rows(url: str, schema: str, sql: str) -> list[tuple[object, ...]]:
    conn = await asyncpg.connect(url, server_settings={"search_path": schema})
    try:
        return [tuple(r) for r in await conn.fetch(sql)]
    finally:
        await conn.close()


async def test_a_plan_is_enqueued_once_in_chunks(make_metadata: MetadataMaker) -> None:
    m = await make_metadata()
    q = await new_run(m, total=10, chunk_size=4)
    assert await q.enqueue("r1") == 3
    assert await q.enqueue("r1") == 0  # idempotent: a second planner adds nothing
    claims = await q.claim("r1", "w1", n=10, ttl=30, max_attempts=3)
    assert [(c.chunk, c.first, c.stop, c.attempt) for c in claims] == [
        (0, 0, 4, 1),
        (1, 4, 8, 1),
        (2, 8, 10, 1),
    ]
    assert await q.claim("r1", "w2", n=10, ttl=30, max_attempts=3) == []  # all held
    status = await q.run_status("r1")
    assert status.run.planned and not status.complete
    assert status.chunks == {"claimed": 3}


async def test_joining_a_run_with_another_configuration_is_refused(
    make_metadata: MetadataMaker,
) -> None:
    m = await make_metadata()
    await new_run(m, total=10)
    q = m.work
    again = await q.open_run("r1", job="job", config_hash=HASH, total=10, chunk_size=4)
    assert again.id == "r1"  # the same configuration joins
    with pytest.raises(RunMismatch, match="another configuration") as info:
        await q.open_run("r1", job="job", config_hash="f" * 64, total=10, chunk_size=4)
    assert "--run" in str(info.value)
    with pytest.raises(RunMismatch):
        await q.open_run("r1", job="job", config_hash=HASH, total=11, chunk_size=4)


async def test_concurrent_claimers_never_get_one_chunk_twice(
    make_metadata: MetadataMaker,
) -> None:
    m = await make_metadata()
    q = await new_run(m, total=400, chunk_size=2)
    await q.enqueue("r1")
    got: dict[str, list[int]] = {}

    async def worker(name: str) -> None:
        mine = got.setdefault(name, [])
        while True:
            claims = await q.claim("r1", name, n=3, ttl=30, max_attempts=3)
            if not claims:
                return
            mine.extend(c.chunk for c in claims)

    async with anyio.create_task_group() as tg:
        for i in range(8):
            tg.start_soon(worker, f"w{i}")
    everything = [c for chunks in got.values() for c in chunks]
    assert sorted(everything) == list(range(200))  # each chunk once, none lost
    assert sum(1 for chunks in got.values() if chunks) > 1  # shared, not one worker's


async def test_an_expired_claim_is_taken_over_and_its_holder_fenced_out(
    postgres_url: str, pg_schema: str, make_metadata: MetadataMaker
) -> None:
    m = await make_metadata()
    q = await new_run(m, total=4, chunk_size=4)
    await q.enqueue("r1")
    (stale,) = await q.claim("r1", "paused", n=1, ttl=0.3, max_attempts=3)
    session = make_session("src")
    await m.save_session(session)
    await wait_until_server_passes(postgres_url, stale.lease_until)
    assert await q.extend("r1", "paused", 30, [0]) == set()  # an expired lease is not revived
    (fresh,) = await q.claim("r1", "alive", n=1, ttl=30, max_attempts=3)
    assert (fresh.chunk, fresh.attempt) == (stale.chunk, 2)

    # The stale worker wakes up and tries to record: nothing of it is written.
    req = make_request(session, params={"i": 0})
    late = make_response(req, at=START, checksum=None, size=0, status=ResponseStatus.OK)
    with pytest.raises(ClaimLost, match="chunk 0 of run 'r1'"):
        await m.record(Recording(req, (late,), fence=stale.fence(0, "src")))
    with pytest.raises(ClaimLost):
        await q.complete(stale, [])
    with pytest.raises(ClaimLost):
        await q.release(stale, "boom", max_attempts=3)

    # The live one records under its claim: the response and its index, in one transaction.
    ok = make_response(req, at=START, checksum=None, size=0, status=ResponseStatus.OK)
    await m.record(Recording(req, (ok,), fence=fresh.fence(0, "src")))
    assert await rows(postgres_url, pg_schema, "SELECT id FROM responses") == [(ok.id,)]
    assert await rows(
        postgres_url, pg_schema, "SELECT idx, source, response_id, outcome FROM job_done"
    ) == [(0, "src", ok.id, "fetched")]
    await q.complete(fresh, [Mark(1, "src", "served-1"), Mark(2, "src"), Mark(0, "src")])
    await q.complete(fresh, [])  # a retry of a completion that landed is no error
    done = await rows(postgres_url, pg_schema, "SELECT idx, outcome FROM job_done ORDER BY idx")
    assert done == [(0, "fetched"), (1, "cached"), (2, "failed")]  # 0 kept its first mark
    status = await q.run_status("r1")
    assert status.complete and status.chunks == {"done": 1} and status.done == 3


async def test_a_batch_commits_its_valid_claims_and_fences_out_the_others(
    postgres_url: str, pg_schema: str, make_metadata: MetadataMaker
) -> None:
    """Group commit puts several workers' rows in one transaction: a lost claim fails only its
    own rows."""
    m = await make_metadata()
    q = await new_run(m, total=8, chunk_size=4)
    await q.enqueue("r1")
    held, lost = await q.claim("r1", "w", n=2, ttl=30, max_attempts=3)
    gone = Claim(
        lost.run_id, lost.chunk, "someone-else", lost.first, lost.stop, 1, lost.lease_until
    )
    session = make_session("src")
    await m.save_session(session)
    requests = [make_request(session, params={"i": i}) for i in range(4)]
    recordings = [
        Recording(r, (make_response(r, at=START, checksum=None, size=0),), fence=f)
        for r, f in zip(
            requests,
            [held.fence(0, "src"), gone.fence(4, "src"), None, held.fence(1, "src")],
            strict=True,
        )
    ]
    outcomes = await _record_all(m, recordings)
    assert [type(o).__name__ if o else None for o in outcomes] == [None, "ClaimLost", None, None]
    written = {
        r[0] for r in await rows(postgres_url, pg_schema, "SELECT request_id FROM responses")
    }
    assert written == {requests[0].id, requests[2].id, requests[3].id}
    marked = await rows(postgres_url, pg_schema, "SELECT idx FROM job_done ORDER BY idx")
    assert marked == [(0,), (1,)]


async def _record_all(
    m: PostgresMetadata, recordings: list[Recording]
) -> list[BaseException | None]:
    outcomes: list[BaseException | None] = [None] * len(recordings)

    async def one(i: int) -> None:
        try:
            await m.record(recordings[i])
        except ClaimLost as exc:
            outcomes[i] = exc

    async with anyio.create_task_group() as tg:  # queued together: one batch
        for i in range(len(recordings)):
            tg.start_soon(one, i)
    return outcomes


async def test_a_chunk_that_keeps_failing_is_dead(
    postgres_url: str, make_metadata: MetadataMaker
) -> None:
    m = await make_metadata()
    q = await new_run(m, total=4, chunk_size=4)
    await q.enqueue("r1")
    for attempt in (1, 2):
        (c,) = await q.claim("r1", "w", n=1, ttl=30, max_attempts=3)
        assert c.attempt == attempt
        assert await q.release(c, f"failure {attempt}", max_attempts=3) == "pending"
    (c,) = await q.claim("r1", "w", n=1, ttl=30, max_attempts=3)
    assert await q.release(c, "failure 3", max_attempts=3) == "dead"
    assert await q.claim("r1", "w", n=1, ttl=30, max_attempts=3) == []
    status = await q.run_status("r1")
    assert status.complete and status.chunks == {"dead": 1}
    assert status.dead_chunks == [(0, 3, "failure 3")]

    # A chunk whose holders die (leases expire) is dead after max_attempts claims too.
    q2 = await new_run(m, "r2", total=4, chunk_size=4)
    await q2.enqueue("r2")
    for _ in range(2):
        (c,) = await q2.claim("r2", "dies", n=1, ttl=0.2, max_attempts=2)
        await wait_until_server_passes(postgres_url, c.lease_until)
    assert await q2.claim("r2", "w", n=1, ttl=30, max_attempts=2) == []
    (dead,) = (await q2.run_status("r2")).dead_chunks
    assert dead[:2] == (0, 2) and "lease expired" in (dead[2] or "")


async def test_status_shows_workers_and_rates(
    postgres_url: str, make_metadata: MetadataMaker
) -> None:
    m = await make_metadata()
    q = await new_run(m, total=8, chunk_size=4)
    await q.enqueue("r1")
    await q.worker_seen("r1", "w1", host="h1", pid=11)
    await q.worker_seen("r1", "w2", host="h2", pid=22)
    (c,) = await q.claim("r1", "w1", n=1, ttl=30, max_attempts=3)
    session = make_session("api")
    await m.save_session(session)
    for i in range(3):
        req = make_request(session, params={"i": i})
        resp = make_response(req, at=START, checksum=None, size=0)
        await m.record(Recording(req, (resp,), fence=c.fence(i, "api")))
    before = await server_now(postgres_url)
    status = await q.run_status("r1", window=60, ttl=30)
    assert [(w.name, w.host, w.pid, w.alive, w.chunks) for w in status.workers] == [
        ("w1", "h1", 11, True, 1),
        ("w2", "h2", 22, True, 0),
    ]
    assert status.rates == {"api": 3 / 60} and status.per_source_done == {"api": 3}
    assert all(w.seen_at <= before for w in status.workers)
    as_json = status.to_json()
    assert as_json["chunks"] == {"pending": 1, "claimed": 1, "done": 0, "dead": 0}
    await q.finish_run("r1")
    assert (await q.run_status("r1")).run.finished_at is not None


async def test_sqlite_has_no_work_queue(tmp_path: object) -> None:
    from pathlib import Path

    from mxm_dataio_async._exceptions import UsageError
    from mxm_dataio_async._store import Store

    assert isinstance(tmp_path, Path)
    async with Store(tmp_path) as store:
        with pytest.raises(UsageError, match="needs a PostgreSQL store"):
            _ = store.work


async def test_a_worker_stopped_inside_its_fenced_commit_does_not_keep_its_chunk(
    postgres_url: str, make_metadata: MetadataMaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker paused (SIGSTOP) or cut off in the middle of its fenced commit leaves a
    transaction holding its chunk's row FOR SHARE: SKIP LOCKED claims would pass that chunk over
    for as long as the process stays stopped. The writer's transactions tell the server to end
    them when left idle for ``busy_timeout``, and the chunk becomes claimable."""
    from asyncpg.connection import Connection  # type: ignore[import-untyped]

    from mxm_dataio_async._store._postgres._fence import DONE_SQL

    m = await make_metadata(busy_timeout=1.0)
    q = await new_run(m, total=4, chunk_size=4)
    await q.enqueue("r1")
    (claim,) = await q.claim("r1", "w1", n=1, ttl=0.2, max_attempts=3)
    session = make_session("src")
    await m.save_session(session)
    stalled, resumed = anyio.Event(), anyio.Event()
    execute = Connection.execute

    async def stop_before_done(self: Connection, query: str, *args: object, **kw: object) -> str:
        if query == DONE_SQL and not resumed.is_set():  # the claim is locked FOR SHARE by now:
            stalled.set()  # the process "stops" here (SIGSTOP) until the test resumes it
            await resumed.wait()
        return await execute(self, query, *args, **kw)  # type: ignore[no-any-return]

    monkeypatch.setattr(Connection, "execute", stop_before_done)
    req = make_request(session, params={"i": 0})
    resp = make_response(req, at=START, checksum=None, size=0, status=ResponseStatus.OK)
    outcome: list[BaseException] = []

    async def record() -> None:
        try:
            await m.record(Recording(req, (resp,), fence=claim.fence(0, "src")))
        except Exception as exc:  # the server ended the stalled transaction
            outcome.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(record)
        await stalled.wait()
        await wait_until_server_passes(postgres_url, claim.lease_until)
        try:
            with anyio.fail_after(20):  # a bound: the server ends the transaction after 1 s
                while not (taken := await q.claim("r1", "w2", n=1, ttl=30, max_attempts=3)):  # noqa: ASYNC110
                    await anyio.sleep(0.05)
        finally:
            resumed.set()  # the stopped worker goes on: its transaction is gone, its claim too
    assert [c.chunk for c in taken] == [claim.chunk]
    assert len(outcome) == 1 and isinstance(outcome[0], ClaimLost), outcome
    assert await rows(postgres_url, m.schema, "SELECT id FROM responses") == []
