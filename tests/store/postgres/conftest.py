"""Fixtures of the PostgreSQL backend's tests: the test server (``postgres_url``, skipped without
it, a failure in CI), a fresh schema per test (dropped at teardown), and stores in it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from contextlib import AsyncExitStack
from typing import Any, Protocol

import pytest

from tests.store.postgres._support import drop_schemas, new_schema

pytest.importorskip("asyncpg", reason="the postgres extra (asyncpg) is not installed")

from mxm_dataio_async._store._postgres import PostgresMetadata


class MetadataMaker(Protocol):
    def __call__(self, **options: Any) -> Awaitable[PostgresMetadata]:
        """An open PostgresMetadata on the test's schema (``opened=False``: not opened)."""
        ...


@pytest.fixture
async def pg_schema(postgres_url: str) -> AsyncIterator[str]:
    """A schema name no other test uses; dropped (with everything in it) at teardown."""
    schema = new_schema()
    try:
        yield schema
    finally:
        await drop_schemas(postgres_url, [schema])


@pytest.fixture
async def make_metadata(postgres_url: str, pg_schema: str) -> AsyncIterator[MetadataMaker]:
    async with AsyncExitStack() as stack:

        async def make(*, opened: bool = True, **options: Any) -> PostgresMetadata:
            options.setdefault("schema", pg_schema)
            metadata = PostgresMetadata(postgres_url, **options)
            stack.push_async_callback(metadata.aclose)
            if opened:
                await metadata.open()
            return metadata

        yield make
