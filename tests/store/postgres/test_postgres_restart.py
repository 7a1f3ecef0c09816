"""PostgreSQL restarted in the middle of a run: each fetch through ``AsyncSession`` either fails
with ``StoreError`` or succeeds (its writes ride out the restart), nothing is half-written, and the
store works again afterwards. Runs the real server's ``pg_ctl restart`` (tests/conftest.py's
services; ``MXM_DATAIO_TEST_POSTGRES_CTL``)."""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import anyio.lowlevel
import anyio.to_thread
import asyncpg  # type: ignore[import-untyped]
import pytest

import mxm_dataio_async as dio
from mxm_dataio_async._models import Request
from mxm_dataio_async._store import LocalPayloads, Store
from mxm_dataio_async._store._postgres import PostgresMetadata
from mxm_dataio_async._store._verify import ProblemKind
from tests.conftest import service_url
from tests.store.postgres._support import POSTGRES_CTL

pytestmark = pytest.mark.anyio

INLINE_THRESHOLD = 2048


def restart_server() -> None:
    """``pg_ctl restart -m fast``, logging where the services script's server logs (the restarted
    postmaster must not inherit our pipes)."""
    ctl = shlex.split(service_url(POSTGRES_CTL, "PostgreSQL control (pg_ctl)"))
    extra: list[str] = []
    if "-D" in ctl:
        log = Path(ctl[ctl.index("-D") + 1]).parent / "log"
        if log.is_file():
            extra = ["-l", str(log)]
    subprocess.run(
        [*ctl, "restart", "-m", "fast", *extra],
        check=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=120,
    )


def handler(req: Request) -> bytes:
    i = req.params["i"]
    assert isinstance(i, int)
    size = 5000 if i % 7 == 0 else 1024  # some above the inline threshold: the file tier too
    return i.to_bytes(8, "big") * (size // 8)


async def check_nothing_half_written(postgres_url: str, schema: str, store: Store) -> int:
    """Every response has its request row and the payload row it names; verify() is clean.
    Returns how many responses there are."""
    conn = await asyncpg.connect(postgres_url, server_settings={"search_path": schema})
    try:
        orphans = await conn.fetchval(
            "SELECT count(*) FROM responses r "
            "WHERE NOT EXISTS (SELECT 1 FROM requests q WHERE q.id = r.request_id)"
        )
        unnamed = await conn.fetchval(
            "SELECT count(*) FROM responses r WHERE r.checksum IS NOT NULL AND NOT EXISTS "
            "(SELECT 1 FROM payloads p WHERE encode(p.sha256, 'hex') = r.checksum)"
        )
        inline_missing = await conn.fetchval(
            "SELECT count(*) FROM payloads WHERE tier = 'inline' AND data IS NULL"
        )
        responses = await conn.fetchval("SELECT count(*) FROM responses")
    finally:
        await conn.close()
    assert (orphans, unnamed, inline_missing) == (0, 0, 0)
    report = await store.verify()
    # A failed fetch may leave its staged file-tier payload with no row naming it (the rule: bytes
    # before rows, never a row without its bytes); gc removes those, then verify is clean.
    assert all(p.kind is ProblemKind.ORPHAN_FILE for p in report.problems), report.problems
    await store.gc(grace=0)
    report = await store.verify()
    assert report.ok, report.problems
    return int(responses)


@pytest.mark.parametrize(
    "busy_timeout", [0.0, 20.0], ids=["fail-fast", "retry-through-the-restart"]
)
async def test_a_restart_mid_run_fails_or_recovers_fetches_and_writes_nothing_half(
    postgres_url: str, pg_schema: str, tmp_path: Path, busy_timeout: float
) -> None:
    metadata = PostgresMetadata(postgres_url, schema=pg_schema, busy_timeout=busy_timeout)
    store = Store(
        metadata=metadata,
        payloads=LocalPayloads(tmp_path / "objects"),
        inline_threshold=INLINE_THRESHOLD,
    )
    ok: list[dio.Response] = []
    failed: list[BaseException] = []
    restarted = anyio.Event()

    with anyio.fail_after(120):  # a bound, not a timing assertion: nothing may hang
        async with store, dio.Registry() as registry:
            registry.register("m", dio.MockAdapter(handler))
            async with dio.AsyncSession("m", store=store, registry=registry) as s:

                async def requests() -> AsyncIterator[Request]:
                    i = 0
                    after = 0
                    while after < 300:  # fetch on until 300 more after the restart
                        yield s.request("k", params={"i": i})
                        i += 1
                        after += restarted.is_set()
                        await anyio.lowlevel.checkpoint()

                async def fetch_all() -> None:
                    async for outcome in s.fetch_many(requests(), concurrency=32):
                        if outcome.response is not None:
                            ok.append(outcome.response)
                        else:
                            assert outcome.error is not None
                            failed.append(outcome.error)

                async with anyio.create_task_group() as tg:
                    tg.start_soon(fetch_all)
                    while len(ok) < 200:  # noqa: ASYNC110 (a list filled by the fetches)
                        await anyio.sleep(0.01)
                    await anyio.to_thread.run_sync(restart_server)
                    restarted.set()

                # Every fetch either failed with the store's error or was recorded.
                assert all(isinstance(e, dio.StoreError) for e in failed), failed[:3]
                if busy_timeout == 0:
                    assert failed, "no fetch met the restart"
                    assert any("unreachable or the connection was lost" in str(e) for e in failed)
                else:
                    assert failed == []  # every write and lookup rode out the restart
                # The store works again: a fetch after the restart, and reading what was recorded.
                later = await s.fetch(s.request("k", params={"i": 10**6}))
                assert await s.read(later) == handler(s.request("k", params={"i": 10**6}))
                for resp in ok[:: max(1, len(ok) // 50)]:
                    i = int.from_bytes((await s.read(resp))[:8], "big")
                    assert len(await s.read(resp)) == (5000 if i % 7 == 0 else 1024)
        # Reopened (another process, later): everything recorded is whole.
        async with Store(
            metadata=PostgresMetadata(postgres_url, schema=pg_schema),
            payloads=LocalPayloads(tmp_path / "objects"),
            inline_threshold=INLINE_THRESHOLD,
        ) as again:
            stored = await check_nothing_half_written(postgres_url, pg_schema, again)
            assert stored >= len(ok) + 1
            for resp in ok:
                assert await again.get_response(resp.id) == resp


async def test_an_unreachable_server_is_a_store_error_that_says_what_to_do() -> None:
    unreachable = "postgresql://dataio:dataio@127.0.0.1:9/postgres"  # discard port: refused
    metadata = PostgresMetadata(unreachable, busy_timeout=0)
    with pytest.raises(dio.StoreError, match=r"unreachable.*check that the server is running"):
        await metadata.open()
    await metadata.aclose()
