"""Support for the PostgreSQL backend's tests and the contract suite's ``postgres-*`` pairs: a
schema of its own per store (so tests share the test server's database), dropped afterwards."""

from __future__ import annotations

import asyncio
import atexit
import hashlib
import os
import threading
import uuid
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar

from mxm_dataio_async._clock import Clock
from tests.conftest import service_url

T = TypeVar("T")

POSTGRES_URL: Final = "MXM_DATAIO_TEST_POSTGRES_URL"
POSTGRES_CTL: Final = "MXM_DATAIO_TEST_POSTGRES_CTL"


def postgres_url() -> str:
    """The test server's URL; skips (fails in CI) without it."""
    return service_url(POSTGRES_URL, "PostgreSQL")


def new_schema(prefix: str = "t") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:16]}"


async def drop_schemas(url: str, schemas: Sequence[str]) -> None:
    if not schemas:
        return
    import asyncpg  # type: ignore[import-untyped]

    conn = await asyncpg.connect(url)
    try:
        for schema in schemas:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


def run_blocking(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion on a loop of its own in a helper thread (callable from sync
    code that runs inside an event loop, such as a contract factory)."""
    result: list[T] = []
    errors: list[BaseException] = []

    def main() -> None:
        try:
            result.append(asyncio.run(coro))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=main, name="postgres-test-support")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return result[0]


# -- the contract suite's factory -----------------------------------------------------------------

_contract_schemas: list[tuple[str, str, str]] = []  # (test id, url, schema)


def _drop_all_left() -> None:
    by_url: dict[str, list[str]] = {}
    for _, url, schema in _contract_schemas:
        by_url.setdefault(url, []).append(schema)
    _contract_schemas.clear()
    for url, schemas in by_url.items():
        try:
            asyncio.run(drop_schemas(url, schemas))
        except Exception as exc:  # the server is gone already: nothing to clean
            print(f"could not drop test schemas {schemas}: {exc}")


atexit.register(_drop_all_left)


def contract_metadata(root: Path, clock: Clock) -> Any:
    """A ``PostgresMetadata`` for the contract suite: the schema is named after ``root`` (the same
    root gives the same stored data; a new root an empty store). Schemas made for earlier tests
    are dropped when the next test makes its first one (their stores were closed at their
    teardown), the last ones when the process exits."""
    test_id = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0]  # for the clean-up
    url = postgres_url()
    from mxm_dataio_async._store._postgres import PostgresMetadata

    schema = "contract_" + hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:20]
    marker = root / "postgres-schema"
    if not marker.exists():
        # A root seen for the first time: its schema must be empty (one left by an earlier run
        # whose temporary directory had the same path is dropped with those of earlier tests).
        stale = [s for t, _, s in _contract_schemas if t != test_id]
        run_blocking(drop_schemas(url, [*stale, schema]))
        _contract_schemas[:] = [x for x in _contract_schemas if x[0] == test_id]
        _contract_schemas.append((test_id, url, schema))
        root.mkdir(parents=True, exist_ok=True)
        marker.write_text(schema)
    return PostgresMetadata(url, schema=schema, clock=clock)
