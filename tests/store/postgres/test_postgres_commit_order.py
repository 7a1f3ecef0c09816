"""Commit order with many writers: a consumer that resumes ``iter_responses(after=checkpoint)``
sees every response exactly once, including those of a transaction that started before others
and committed after them (numbered earlier, visible later: a consumer ordering by number would
skip them)."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import anyio
import asyncpg  # type: ignore[import-untyped]
import pytest

from mxm_dataio_async._models import Session
from mxm_dataio_async._store._postgres import PostgresMetadata
from mxm_dataio_async._store._postgres._rows import request_row, response_row
from mxm_dataio_async._store._postgres._writer import RECORD_SQL, Job, batch_args
from mxm_dataio_async._store._protocols import Recording, StagedPayload
from tests.store.contract._helpers import make_request, make_response, make_session, sha
from tests.store.postgres.conftest import MetadataMaker

pytestmark = pytest.mark.anyio

FAST_WRITERS = 4
FAST_EACH = 120
SLOW_WRITERS = 2
SLOW_EACH = 4


def recording(session: Session, i: int, tag: str) -> Recording:
    req = make_request(session, tag, params={"i": i})
    data = f"{tag} {i}".encode()
    staged = StagedPayload(sha(data), len(data), "inline", data)
    resp = make_response(req, at=datetime.now(UTC), payload=staged)
    return Recording(req, [resp], [staged])


async def test_a_checkpointed_consumer_sees_every_response_once_with_concurrent_writers(
    postgres_url: str, pg_schema: str, make_metadata: MetadataMaker
) -> None:
    # 4 group-commit writers over a pool of 5 connections, plus 2 "slow" transactions in flight at
    # a time on connections of their own; the consumer uses another store (another process).
    writer = await make_metadata(pool_size=FAST_WRITERS + 1)
    session = make_session("src")
    await writer.save_session(session)
    expected: set[str] = set()
    fast_commits = 0
    writers_left = FAST_WRITERS + SLOW_WRITERS
    slow_left = SLOW_WRITERS
    overtaken = 0  # slow transactions that committed after rows numbered later had committed

    async def fast(w: int) -> None:
        nonlocal fast_commits, writers_left
        rng = random.Random(w)
        i = 0
        while i < FAST_EACH or slow_left:  # (until the slow writers are done too)
            rec = recording(session, i, f"fast{w}")
            await writer.record(rec)
            expected.add(rec.responses[0].id)
            fast_commits += 1
            i += 1
            await anyio.sleep(rng.random() * 0.003)
        writers_left -= 1

    async def slow(w: int) -> None:
        # The library's own insert statement, in a transaction held open until rows inserted
        # after its own have committed: as a writer in another process that stalls before COMMIT.
        nonlocal writers_left, slow_left, overtaken
        conn = await asyncpg.connect(postgres_url, server_settings={"search_path": pg_schema})
        watcher = await asyncpg.connect(postgres_url, server_settings={"search_path": pg_schema})
        try:
            for i in range(SLOW_EACH):
                rec = recording(session, i, f"slow{w}")
                job = Job(
                    payloads=[
                        (p.digest, p.size, p.tier, p.data, datetime.now(UTC)) for p in rec.payloads
                    ],
                    requests=[request_row(rec.request, None, None)],
                    responses=[response_row(rec.request, r) for r in rec.responses],
                )
                _, args, _ = batch_args([job])
                assert args is not None
                async with conn.transaction():
                    await conn.execute(RECORD_SQL, *args)
                    mine = await conn.fetchval(
                        "SELECT pos FROM responses WHERE id = $1", rec.responses[0].id
                    )
                    target = fast_commits + 5
                    with anyio.fail_after(30):
                        while fast_commits < target:  # noqa: ASYNC110 (a counter, polled)
                            await anyio.sleep(0.001)
                    later = await watcher.fetchval(
                        "SELECT count(*) FROM responses WHERE pos > $1", mine
                    )
                    overtaken += later > 0
                expected.add(rec.responses[0].id)
                await anyio.sleep(0.01)
        finally:
            await conn.close()
            await watcher.close()
            writers_left -= 1
            slow_left -= 1

    seen: list[str] = []

    async def consume() -> None:
        consumer: PostgresMetadata | None = None
        rounds = 0
        try:
            while True:
                if (
                    consumer is None or rounds % 10 == 9
                ):  # a consumer restarting from its checkpoint
                    if consumer is not None:
                        await consumer.aclose()
                    consumer = PostgresMetadata(postgres_url, schema=pg_schema, pool_size=2)
                    await consumer.open()
                rounds += 1
                finished = writers_left == 0 and expected <= set(seen)
                cursor = await consumer.read_checkpoint("etl")
                async for resp in consumer.iter_responses(after=cursor, page_size=7):
                    seen.append(resp.id)
                    await consumer.write_checkpoint("etl", resp.id)
                if finished:
                    return  # one more full pass after everything was seen: nothing came twice
                await anyio.sleep(0.002)
        finally:
            if consumer is not None:
                await consumer.aclose()

    with anyio.fail_after(90):  # a bound, not a timing assertion: a skipped row never arrives
        async with anyio.create_task_group() as tg:
            for w in range(FAST_WRITERS):
                tg.start_soon(fast, w)
            for w in range(SLOW_WRITERS):
                tg.start_soon(slow, w)
            tg.start_soon(consume)

    assert len(expected) >= FAST_WRITERS * FAST_EACH + SLOW_WRITERS * SLOW_EACH
    assert len(seen) == len(set(seen)), "a response was delivered twice"
    assert set(seen) == expected
    # The hazard happened: every slow row committed after rows numbered after it had.
    assert overtaken == SLOW_WRITERS * SLOW_EACH
    # And the consumer's order is the log's (txid, pos) order, not the numbering.
    conn = await asyncpg.connect(postgres_url, server_settings={"search_path": pg_schema})
    try:
        rows = await conn.fetch("SELECT id FROM responses ORDER BY txid, pos")
    finally:
        await conn.close()
    assert [r[0] for r in rows] == seen


async def test_iter_responses_sees_a_response_recorded_while_an_older_transaction_runs(
    postgres_url: str, pg_schema: str, make_metadata: MetadataMaker
) -> None:
    """Read-your-writes: a response recorded (and committed) while an older transaction is still
    open is above the horizon; iter_responses waits for that transaction (up to busy_timeout)
    rather than leave the response out, then reads on."""
    m = await make_metadata(busy_timeout=30)
    session = make_session("src")
    await m.save_session(session)
    older = await asyncpg.connect(postgres_url, server_settings={"search_path": pg_schema})
    try:
        tx = older.transaction()
        await tx.start()
        await older.fetchval("SELECT pg_current_xact_id()")  # holds a transaction id from now on
        rec = recording(session, 0, "newer")
        await m.record(rec)
        got: list[str] = []

        async def read() -> None:
            got.extend([r.id async for r in m.iter_responses()])

        async with anyio.create_task_group() as tg:
            tg.start_soon(read)
            await anyio.sleep(0.2)
            assert got == []  # still waiting for the older transaction: nothing skipped past it
            await tx.commit()
        assert got == [rec.responses[0].id]
    finally:
        await older.close()


async def test_iter_responses_gives_up_waiting_after_busy_timeout_and_skips_nothing(
    postgres_url: str, pg_schema: str, make_metadata: MetadataMaker
) -> None:
    m = await make_metadata(busy_timeout=0.2)
    session = make_session("src")
    await m.save_session(session)
    first = recording(session, 0, "first")
    await m.record(first)
    older = await asyncpg.connect(postgres_url, server_settings={"search_path": pg_schema})
    try:
        async with older.transaction():
            await older.fetchval("SELECT pg_current_xact_id()")
            second = recording(session, 1, "second")
            await m.record(second)
            # Committed, but above a transaction still open: not yet in the log's order.
            assert [r.id async for r in m.iter_responses()] == [first.responses[0].id]
            await m.write_checkpoint("etl", first.responses[0].id)
        after = await m.read_checkpoint("etl")
        assert [r.id async for r in m.iter_responses(after=after)] == [second.responses[0].id]
    finally:
        await older.close()
