"""Leases on PostgreSQL are decided by the server's clock (``now()``), not the holders': the
contract's lease rules (tests/store/contract, test_leases, which advances a FakeClock and is
skipped here) checked with real, short TTLs, plus holders whose clocks are far off."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import asyncpg  # type: ignore[import-untyped]
import pytest

from mxm_dataio_async._clock import FakeClock
from mxm_dataio_async._exceptions import LeaseHeld
from mxm_dataio_async._store import LocalPayloads, Store
from tests.store.postgres.conftest import MetadataMaker

pytestmark = pytest.mark.anyio

TTL = 0.3  # seconds: long enough for the statements below, short enough to wait out


async def server_now(url: str) -> datetime:
    conn = await asyncpg.connect(url)
    try:
        now: datetime = await conn.fetchval("SELECT clock_timestamp()")
    finally:
        await conn.close()
    return now


async def wait_until_server_passes(url: str, moment: datetime) -> None:
    """Sleep until the server's clock is past ``moment`` (expiry is its decision, not ours)."""
    with anyio.fail_after(30):
        while await server_now(url) <= moment:  # noqa: ASYNC110 (the server's clock, polled)
            await anyio.sleep(0.02)


async def test_leases_follow_the_contract_on_the_servers_clock(
    postgres_url: str, make_metadata: MetadataMaker
) -> None:
    m = await make_metadata()
    before = await server_now(postgres_url)
    a = await m.acquire_lease("job", "host-a", 30)
    after = await server_now(postgres_url)
    assert (a.name, a.holder) == ("job", "host-a")
    assert before <= a.acquired_at <= after  # the server's time, not the store's clock
    assert a.expires_at == a.acquired_at + timedelta(seconds=30)

    with pytest.raises(LeaseHeld, match="host-a") as held:
        await m.acquire_lease("job", "host-b", 30)
    assert (held.value.name, held.value.holder, held.value.expires_at) == (
        "job",
        "host-a",
        a.expires_at,
    )
    other_job = await m.acquire_lease("other-job", "host-b", 30)  # names are independent
    assert other_job.holder == "host-b"

    again = await m.acquire_lease("job", "host-a", 30)  # the holder re-acquires: a renewal
    assert again.expires_at > a.expires_at
    renewed = await m.renew_lease(again, 60)
    assert renewed.expires_at > again.expires_at
    assert (renewed.name, renewed.holder, renewed.acquired_at) == (
        "job",
        "host-a",
        again.acquired_at,
    )
    with pytest.raises(LeaseHeld, match="host-a"):
        await m.acquire_lease("job", "host-b", 30)

    await m.release_lease(renewed)
    b = await m.acquire_lease("job", "host-b", TTL)
    assert b.holder == "host-b"
    with pytest.raises(LeaseHeld, match="host-b"):
        await m.acquire_lease("job", "host-c", 30)

    # host-b stops renewing (a crashed run): once the server's clock passes its expiry, host-c
    # takes over.
    await wait_until_server_passes(postgres_url, b.expires_at)
    c = await m.acquire_lease("job", "host-c", 30)
    assert c.holder == "host-c" and c.expires_at == c.acquired_at + timedelta(seconds=30)
    with pytest.raises(LeaseHeld, match="host-c") as lost:
        await m.renew_lease(b, 30)
    assert lost.value.holder == "host-c"
    # The stale holder's release does not free the new holder's lease.
    await m.release_lease(b)
    with pytest.raises(LeaseHeld, match="host-c"):
        await m.acquire_lease("job", "host-d", 30)


async def test_a_holder_with_a_fast_clock_cannot_take_a_live_lease(
    postgres_url: str, make_metadata: MetadataMaker
) -> None:
    """On SQLite a holder whose clock runs a day ahead sees every lease expired; here the server
    decides, so skewed hosts agree."""
    past = await make_metadata(clock=FakeClock(datetime(2001, 1, 1, tzinfo=UTC)))
    future = await make_metadata(clock=FakeClock(datetime(2100, 1, 1, tzinfo=UTC)))
    held = await past.acquire_lease("job", "slow-clock-host", 60)
    assert held.acquired_at.year >= 2026  # the server's year, not 2001
    with pytest.raises(LeaseHeld, match="slow-clock-host"):
        await future.acquire_lease("job", "fast-clock-host", 60)
    short = await future.acquire_lease("other", "fast-clock-host", TTL)
    assert short.expires_at.year < 2100
    with pytest.raises(LeaseHeld):
        await past.acquire_lease("other", "slow-clock-host", 60)
    await wait_until_server_passes(postgres_url, short.expires_at)
    assert (await past.acquire_lease("other", "slow-clock-host", 60)).holder == "slow-clock-host"


async def test_store_lease_heartbeat_keeps_a_server_clock_lease(
    postgres_url: str, tmp_path: Path, make_metadata: MetadataMaker
) -> None:
    """``Store.lease`` renews every ttl/3 (by the store's clock); the lease stays held past its
    first TTL on the server's clock, and is released at the end."""
    metadata = await make_metadata(opened=False)
    other = await make_metadata()
    async with Store(metadata=metadata, payloads=LocalPayloads(tmp_path / "p")) as store:
        async with store.lease("job", ttl=TTL, holder="runner") as first:
            await wait_until_server_passes(postgres_url, first.expires_at)
            with pytest.raises(LeaseHeld, match="runner"):
                await other.acquire_lease("job", "intruder", TTL)
        taken = await other.acquire_lease("job", "next", TTL)
        assert taken.holder == "next"
