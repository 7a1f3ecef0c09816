"""Values and rows: what PostgreSQL's types are stricter about round-trips anyway, ``iter_rows``
yields exactly the SQLite backend's dicts (bundles move between the two), and the group commit
keeps its promises (a bad row fails only its own job; a waited write commits what was queued
before it, although batches commit on several connections)."""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import asyncpg  # type: ignore[import-untyped]
import pytest

from mxm_dataio_async._exceptions import StoreError
from mxm_dataio_async._identity import canonical_json
from mxm_dataio_async._models import Request, Response, Session
from mxm_dataio_async._store import LocalPayloads, SqliteMetadata, Store
from mxm_dataio_async._store._protocols import TABLES, MetadataStore, Recording, StagedPayload
from mxm_dataio_async._store._sqlite._sql import json_text
from tests.store.contract._helpers import make_request, make_response, make_session, sha
from tests.store.postgres._support import drop_schemas
from tests.store.postgres.conftest import MetadataMaker

pytestmark = pytest.mark.anyio

T0 = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)

# Strings and numbers jsonb cannot hold as given (NUL, lone surrogates, NaN; 1e300 it would print
# as an integer), and one that looks like the backend's own wrapper.
AWKWARD_PARAMS: dict[str, Any] = {
    "\ud800": "a\udfffb",
    "nul": "x\x00y",
    "big": 1e300,
    "tiny": 5e-324,
    "emoji": "\U0001f600",
    "$mxm_json": "not the wrapper",
    "nested": {"b": [1, 2.5, None, True], "a": "z"},
}


def staged(data: bytes) -> StagedPayload:
    return StagedPayload(sha(data), len(data), "inline", data)


def recorded(
    session: Session, i: int, *, params: dict[str, Any] | None = None, **kw: Any
) -> tuple[Request, Response, Recording]:
    req = make_request(session, "k", params=params if params is not None else {"i": i})
    body = staged(f"body {i}".encode())
    resp = make_response(req, at=T0 + timedelta(seconds=i), payload=body, **kw)
    return req, resp, Recording(req, [resp], [body])


async def test_awkward_values_round_trip(
    postgres_url: str, pg_schema: str, make_metadata: MetadataMaker
) -> None:
    m = await make_metadata()
    session = make_session("s\udce9rc")  # a lone surrogate: escaped, as the SQLite backend does
    await m.save_session(session)
    req = make_request(
        session, "k", params=AWKWARD_PARAMS, body={"b": "\udc80"}, headers={"X-Raw": "caf\udce9"}
    )
    body = staged(b"x")
    resp = make_response(
        req,
        at=T0,
        payload=body,
        headers={"ETag": '"v1"', "Content-Disposition": "attachment; filename=caf\udce9.txt"},
        adapter_meta={"nan": math.nan, "inf": -math.inf, "big": 1e300, "z": -0.0, "n": [1, 2]},
        error="partial\x00",
    )
    await m.record(Recording(req, [resp], [body]))

    got = await m.get_response(resp.id)
    assert got is not None
    assert got.headers == resp.headers
    assert json_text(got.adapter_meta) == json_text(resp.adapter_meta)  # NaN != NaN: as text
    assert got.error == "partial\\x00"  # text columns cannot hold NUL: escaped, as surrogates
    assert replace(got, adapter_meta=None, error=None) == replace(
        resp, adapter_meta=None, error=None
    )
    assert got.fetched_at == T0  # microseconds kept
    [row] = [r async for r in m.iter_rows("requests")]
    assert row["params"] == canonical_json(req.params)  # the SQLite backend's exact text
    assert json.loads(row["params"]) == req.params
    assert row["body"] == canonical_json(req.body)
    assert json.loads(row["headers"]) == dict(req.headers)
    assert row["created_at"] == req.created_at.astimezone(UTC).isoformat(timespec="microseconds")
    assert (await m.get_session(session.id)) == replace(session, source="s\\udce9rc")

    # Ordinary documents stay ordinary jsonb, queryable in SQL.
    plain_req, _, plain = recorded(session, 1, params={"symbol": "X", "n": 3})
    await m.record(plain)
    conn = await asyncpg.connect(postgres_url, server_settings={"search_path": pg_schema})
    try:
        found = await conn.fetchval(
            'SELECT id FROM requests WHERE params @> \'{"symbol": "X"}\'::jsonb'
        )
    finally:
        await conn.close()
    assert found == plain_req.id


async def same_rows(a: MetadataStore, b: MetadataStore) -> None:
    for table in TABLES:
        rows_a = [r async for r in a.iter_rows(table)]
        rows_b = [r async for r in b.iter_rows(table)]
        assert rows_a == rows_b, table
    assert [p async for p in a.iter_payload_rows()] == [p async for p in b.iter_payload_rows()]


async def test_iter_rows_are_the_sqlite_backends_dicts_and_bundles_move_both_ways(
    postgres_url: str, make_metadata: MetadataMaker, tmp_path: Path
) -> None:
    pg = await make_metadata()
    lite = SqliteMetadata(tmp_path / "lite")
    await lite.open()
    try:
        session = make_session("src", at=T0)
        ended = replace(session, ended_at=T0 + timedelta(minutes=5), requests=3, bytes_fetched=9)
        recordings = [
            recorded(session, 0, params={"a": [1, 2.5], "b": None}, ttl_seconds=60)[2],
            recorded(session, 1, params=AWKWARD_PARAMS)[2],
            # Headers and adapter_meta in jsonb's key order (shorter keys first), so even their
            # JSON text is the same (jsonb keeps values, not key order).
            recorded(
                session,
                2,
                headers={"ETag": '"x"', "X-Other": "2"},
                adapter_meta={"n": [1], "content_encoding": "gzip"},
                elapsed_ms=1.5,
                transport_status=200,
            )[2],
        ]
        hit = make_request(session, "hit")
        for m in (pg, lite):
            await m.save_session(session)
            for rec in recordings:
                await m.record(rec)
            await m.record(Recording(hit, served_from=recordings[0].responses[0].id))
            await m.save_session(ended)
        await same_rows(pg, lite)
    finally:
        await lite.aclose()

    # A bundle exported from either backend imports into the other as the same rows.
    async with (
        Store(metadata=pg, payloads=LocalPayloads(tmp_path / "pg-objects")) as pg_store,
        Store(tmp_path / "lite") as lite_store,
    ):
        await pg_store.export_session(session.id, tmp_path / "from-pg.tar")
        await lite_store.export_session(session.id, tmp_path / "from-lite.tar")
        async with Store(tmp_path / "fresh-lite") as into_lite:
            report = await into_lite.import_bundle(tmp_path / "from-pg.tar")
            assert (report.sessions, report.requests, report.responses) == (1, 4, 3)
            await same_rows(into_lite.metadata, lite_store.metadata)
        fresh_pg = await make_metadata(schema=f"{pg.schema}_b")
        try:
            async with Store(
                metadata=fresh_pg, payloads=LocalPayloads(tmp_path / "fresh-pg")
            ) as into_pg:
                report = await into_pg.import_bundle(tmp_path / "from-lite.tar")
                assert (report.sessions, report.requests, report.responses) == (1, 4, 3)
                await same_rows(into_pg.metadata, pg_store.metadata)
        finally:
            await drop_schemas(postgres_url, [fresh_pg.schema])


async def test_a_bad_row_fails_only_its_own_job(make_metadata: MetadataMaker) -> None:
    m = await make_metadata()
    session = make_session()
    await m.save_session(session)
    first_req, first, first_rec = recorded(session, 0)
    await m.record(first_rec)
    good = [recorded(session, i) for i in range(1, 21)]
    clash_req, _, _ = recorded(session, 100)
    clash = make_response(clash_req, at=T0, id=first.id)  # a response id already stored
    huge_req, huge, _ = recorded(session, 101)
    huge = replace(huge, size_bytes=2**70)  # does not fit a bigint
    jobs = [g[2] for g in good[:10]]
    jobs += [Recording(clash_req, [clash]), Recording(huge_req, [huge])]
    jobs += [g[2] for g in good[10:]]
    # Submitted in one go: they share a batch, which fails, and is then committed job by job.
    results = await asyncio.gather(*(m.record(r) for r in jobs), return_exceptions=True)
    assert isinstance(results[10], StoreError) and "already stored" in str(results[10])
    assert isinstance(results[11], StoreError)
    assert [r for i, r in enumerate(results) if i not in (10, 11)] == [None] * 20
    for _, resp, _ in good:
        assert await m.get_response(resp.id) == resp
    assert await m.get_response(first.id) == first
    assert await m.get_response(huge.id) is None
    stored = {r["id"] async for r in m.iter_rows("requests")}
    assert clash_req.id not in stored and huge_req.id not in stored  # all of the job, or none
    assert first_req.id in stored


async def test_a_waited_write_commits_what_was_queued_before_it(
    make_metadata: MetadataMaker,
) -> None:
    """Batches commit on several connections (a later, smaller one may land first), yet once
    record() returns, every record_later() queued before it is committed too."""
    m = await make_metadata(pool_size=4)
    session = make_session()
    await m.save_session(session)
    for round_ in range(40):
        queued = [recorded(session, round_ * 1000 + i)[2] for i in range(60)]
        for rec in queued:
            m.record_later(rec)
        await anyio.lowlevel.checkpoint()  # a writer takes the queued batch...
        _, marker, rec = recorded(session, round_ * 1000 + 999)
        await m.record(rec)  # ...and another this one, alone
        ids = [r.responses[0].id for r in queued]
        found = {r["id"] async for r in m.iter_rows("responses", ids=ids)}
        assert found == set(ids), round_
        assert await m.get_response(marker.id) == marker


async def test_payloads_committed_here_are_served_from_memory_verified(
    make_metadata: MetadataMaker,
) -> None:
    m = await make_metadata()
    other = await make_metadata()
    session = make_session()
    await m.save_session(session)
    rec = recorded(session, 0)[2]
    await m.record(rec)
    digest = rec.payloads[0].digest
    mine = await m.payload(digest)
    theirs = await other.payload(digest)
    assert mine is not None and theirs is not None
    assert (mine.verified, theirs.verified) == (True, False)  # bytes read back are re-hashed
    assert mine == theirs
    # gc deleting payload rows clears the memory (here: nothing is deleted, the row is named).
    assert await m.delete_payloads([digest]) == []
    assert (await m.payload(digest)).verified is False  # type: ignore[union-attr]
