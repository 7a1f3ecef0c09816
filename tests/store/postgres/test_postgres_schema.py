"""Opening a PostgreSQL store: the schema is created and migrated by the library, once, under an
advisory lock; a newer schema is refused; ``create=False`` and ``read_only=True`` create nothing
and write nothing; the URL's password never shows; errors say what to do."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import asyncpg  # type: ignore[import-untyped]
import pytest

import mxm_dataio_async as dio
from mxm_dataio_async._exceptions import StoreError, UsageError
from mxm_dataio_async._models import Session
from mxm_dataio_async._store import LocalPayloads, Store
from mxm_dataio_async._store._postgres import SCHEMA_VERSION, PostgresMetadata, _schema
from mxm_dataio_async._store._protocols import Lease, Recording
from tests.store.contract._helpers import make_request, make_response, make_session
from tests.store.postgres.conftest import MetadataMaker

pytestmark = pytest.mark.anyio

TABLES = {
    "schema_version",
    "sessions",
    "requests",
    "responses",
    "payloads",
    "checkpoints",
    "leases",
    "bad_payloads",
    "job_runs",
    "job_chunks",
    "job_done",
    "job_workers",
    "validations",
}


async def tables_of(url: str, schema: str) -> set[str]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = $1", schema)
    finally:
        await conn.close()
    return {r[0] for r in rows}


async def sql(url: str, schema: str, query: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url, server_settings={"search_path": schema})
    try:
        return list(await conn.fetch(query))
    finally:
        await conn.close()


async def open_at_once(
    n: int, url: str, schema: str, session: Session, **options: Any
) -> list[int]:
    """Open ``n`` stores on ``schema`` at once (each in a task of its own, as processes would),
    save ``session`` through each; returns how many migration steps each open ran."""
    steps: list[int] = []
    ready = anyio.Event()

    async def one() -> None:
        m = PostgresMetadata(url, schema=schema, **options)
        await ready.wait()
        await m.open()
        try:
            steps.append(m.migrations_run)
            await m.save_session(session)
        finally:
            await m.aclose()

    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(one)
        await anyio.sleep(0.05)  # (all waiting on the event: they start together)
        ready.set()
    return steps


async def test_concurrent_opens_create_the_schema_exactly_once(
    postgres_url: str, pg_schema: str, make_metadata: MetadataMaker
) -> None:
    session = make_session()
    steps = await open_at_once(4, postgres_url, pg_schema, session)
    # One opener ran every migration step; the others waited on the lock and found it done.
    assert sorted(steps) == [0, 0, 0, SCHEMA_VERSION]
    assert await tables_of(postgres_url, pg_schema) == TABLES
    rows = await sql(postgres_url, pg_schema, "SELECT version FROM schema_version")
    assert [r[0] for r in rows] == [SCHEMA_VERSION]
    again = await make_metadata()
    assert again.migrations_run == 0
    assert await again.get_session(session.id) == session  # all four wrote to the one schema


async def test_the_tables_have_the_sqlite_names_and_postgres_types(
    postgres_url: str, pg_schema: str, make_metadata: MetadataMaker
) -> None:
    await make_metadata()
    rows = await sql(
        postgres_url,
        pg_schema,
        "SELECT table_name, column_name, data_type FROM information_schema.columns "
        f"WHERE table_schema = '{pg_schema}'",
    )
    types = {(r[0], r[1]): r[2] for r in rows}
    assert types["requests", "hash"] == types["responses", "request_hash"] == "bytea"
    assert types["payloads", "sha256"] == types["payloads", "data"] == "bytea"
    for column in ("params", "body", "headers"):
        assert types["requests", column] == "jsonb"
    assert types["responses", "headers"] == types["responses", "adapter_meta"] == "jsonb"
    assert types["responses", "fetched_at"] == "timestamp with time zone"
    assert types["responses", "txid"] == "xid8"
    index = await sql(
        postgres_url,
        pg_schema,
        f"SELECT indexdef FROM pg_indexes WHERE schemaname = '{pg_schema}' "
        "AND indexname = 'ix_responses_usable'",
    )
    assert "(request_hash, fetched_at) WHERE (status = 'ok'::text)" in index[0][0]


async def test_a_newer_schema_is_refused(
    postgres_url: str, pg_schema: str, make_metadata: MetadataMaker
) -> None:
    m = await make_metadata()
    await m.aclose()
    await sql(postgres_url, pg_schema, f"UPDATE schema_version SET version = {SCHEMA_VERSION + 1}")
    for options in ({}, {"read_only": True}, {"create": False}):
        with pytest.raises(StoreError, match=r"newer than this release supports.*upgrade"):
            await make_metadata(**options)


async def test_an_older_schema_is_migrated_once_and_not_by_a_read_only_open(
    postgres_url: str,
    pg_schema: str,
    make_metadata: MetadataMaker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await (await make_metadata()).aclose()  # a store at today's version

    async def add_a_column(conn: object) -> None:  # the next release's migration
        await conn.execute("ALTER TABLE sessions ADD COLUMN note text")  # type: ignore[attr-defined]

    monkeypatch.setattr(_schema, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    monkeypatch.setitem(_schema.MIGRATIONS, SCHEMA_VERSION, add_a_column)
    with pytest.raises(StoreError, match="open it once writable"):
        await make_metadata(read_only=True)
    steps = await open_at_once(3, postgres_url, pg_schema, make_session(), create=False)
    assert sorted(steps) == [0, 0, 1]
    rows = await sql(postgres_url, pg_schema, "SELECT version FROM schema_version")
    assert [r[0] for r in rows] == [SCHEMA_VERSION + 1]
    columns = await sql(
        postgres_url,
        pg_schema,
        "SELECT column_name FROM information_schema.columns "
        f"WHERE table_schema = '{pg_schema}' AND table_name = 'sessions'",
    )
    assert "note" in {r[0] for r in columns}


async def test_create_false_and_read_only_create_nothing(
    postgres_url: str, pg_schema: str, make_metadata: MetadataMaker
) -> None:
    for options in ({"create": False}, {"read_only": True}):
        with pytest.raises(StoreError, match=f"no store at .*schema={pg_schema}"):
            await make_metadata(**options)
    assert await tables_of(postgres_url, pg_schema) == set()


async def test_read_only_refuses_every_write_and_reads(
    postgres_url: str, pg_schema: str, make_metadata: MetadataMaker
) -> None:
    writer = await make_metadata()
    session = make_session()
    await writer.save_session(session)
    req = make_request(session)
    resp = make_response(req, at=datetime.now(UTC))
    await writer.record(Recording(req, [resp]))

    m = await make_metadata(read_only=True)
    assert await m.get_session(session.id) == session
    assert await m.latest_response(req.hash) == resp
    assert [r.id async for r in m.iter_responses()] == [resp.id]
    lease = Lease("job", "me", datetime.now(UTC), datetime.now(UTC))
    refused = [
        m.save_session(session),
        m.record(Recording(req, [resp])),
        m.write_checkpoint("etl", resp.id),
        m.acquire_lease("job", "me", 30),
        m.renew_lease(lease, 30),
        m.release_lease(lease),
        m.delete_payloads([]),
        m.prune(cutoff=datetime.now(UTC)),
        m.import_rows([], {}),
    ]
    for call in refused:
        with pytest.raises(UsageError, match="read-only"):
            await call
    with pytest.raises(UsageError, match="read-only"):
        m.record_later(Recording(req, [resp]))
    assert await m.count_rows("responses") == 1


async def test_location_schema_option_and_bad_names(postgres_url: str, pg_schema: str) -> None:
    m = PostgresMetadata(f"{postgres_url}?schema={pg_schema}")
    assert m.schema == pg_schema
    assert ":dataio@" not in m.location and "dataio@" in m.location
    assert m.location.endswith(f"?schema={pg_schema}")
    assert PostgresMetadata(postgres_url).location.endswith("/postgres")  # public: no option
    hidden = PostgresMetadata("postgresql://u@h/db?password=secret&sslmode=disable")
    assert "secret" not in hidden.location and "sslmode=disable" in hidden.location
    assert PostgresMetadata(postgres_url, schema=pg_schema).location == m.location
    with pytest.raises(ValueError, match="given twice"):
        PostgresMetadata(f"{postgres_url}?schema=a", schema="b")
    for bad in ("Upper", "with space", "x" * 64, "semi;colon", ""):
        with pytest.raises(ValueError, match="lowercase SQL name"):
            PostgresMetadata(postgres_url, schema=bad)
    with pytest.raises(ValueError, match="pool_size"):
        PostgresMetadata(postgres_url, pool_size=0)


async def test_login_and_database_errors_say_what_to_do(postgres_url: str) -> None:
    wrong_password = postgres_url.replace("dataio:dataio@", "dataio:wrong@")
    with pytest.raises(StoreError, match=r"refused the login.*check the user and password") as e:
        await PostgresMetadata(wrong_password, busy_timeout=0).open()
    assert "wrong" not in str(e.value)
    no_db = postgres_url.rsplit("/", 1)[0] + "/no_such_database"
    with pytest.raises(StoreError, match=r"database does not exist.*createdb"):
        await PostgresMetadata(no_db, busy_timeout=0).open()


async def test_a_closed_store_says_so(make_metadata: MetadataMaker) -> None:
    m = await make_metadata()
    await m.aclose()
    await m.aclose()  # twice is fine
    with pytest.raises(dio.StoreClosedError, match="was closed"):
        await m.get_session("x")
    with pytest.raises(UsageError, match="closed"):
        await m.open()


async def test_store_opens_a_postgresql_url(
    postgres_url: str, pg_schema: str, tmp_path: Path
) -> None:
    """``Store("postgresql://...?schema=x", payloads=folder)`` picks this backend."""
    async with Store(f"{postgres_url}?schema={pg_schema}", payloads=tmp_path / "p") as store:
        assert isinstance(store.metadata, PostgresMetadata)
        assert isinstance(store.payloads, LocalPayloads)
        assert ":dataio@" not in store.location
        async with dio.Registry() as registry:
            registry.register("m", dio.MockAdapter(lambda r: b"x" * 100_000))
            async with dio.AsyncSession("m", store=store, registry=registry) as s:
                resp = await s.fetch(s.request("k"))
                assert await s.read(resp) == b"x" * 100_000
        assert (await store.verify()).ok


def test_importing_the_package_does_not_import_asyncpg() -> None:
    code = (
        "import sys, mxm_dataio_async, mxm_dataio_async.store; "
        "assert 'asyncpg' not in sys.modules, 'asyncpg imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_without_asyncpg_the_error_names_the_extra() -> None:
    code = (
        "import sys; sys.modules['asyncpg'] = None\n"
        "try:\n"
        "    import mxm_dataio_async._store._postgres\n"
        "except ImportError as exc:\n"
        "    assert 'mxm-dataio-async[postgres]' in str(exc), exc\n"
        "else:\n"
        "    raise SystemExit('imported without asyncpg')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
