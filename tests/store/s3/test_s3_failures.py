"""The S3 backend's failure tests: puts racing on the same sha256, S3 unavailable under a session
(from the start, and going away mid-run), and credentials that never reach a row or a message."""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import anyio
import anyio.lowlevel
import obstore as obs
import pytest
from obstore.store import S3Store

import mxm_dataio_async as dio
from mxm_dataio_async._models import AdapterResult, Request, ResponseStatus
from mxm_dataio_async._store._s3 import S3Payloads
from mxm_dataio_async.store import DEFAULT_INLINE_THRESHOLD
from tests.store.s3.conftest import HiddenUploads, RecordingS3Payloads, TcpProxy

pytestmark = pytest.mark.anyio

MiB = 1 << 20
LARGE = DEFAULT_INLINE_THRESHOLD * 2  # a body that goes to S3


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


async def chunks_of(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]
        await anyio.lowlevel.checkpoint()


async def all_keys(raw: S3Store) -> list[str]:
    found: list[str] = [m["path"] async for page in obs.list(raw, None) for m in page]
    return sorted(found)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# -- (a) puts racing on the same sha256 ------------------------------------------------------------


@pytest.mark.parametrize("size", [300_000, 9 * MiB + 1], ids=["buffered", "multipart"])
async def test_puts_and_streams_racing_on_the_same_sha256(
    bucket_url: str,
    raw: S3Store,
    hidden_uploads: HiddenUploads,
    size: int,
) -> None:
    data = os.urandom(size)
    digest = sha(data)
    # Two clients (separate connection pools), as two processes would race.
    writers = [RecordingS3Payloads(bucket_url), RecordingS3Payloads(bucket_url)]
    for w in writers:
        await w.open()
    streamed: list[tuple[bytes, int]] = []

    async def put(w: S3Payloads) -> None:
        await w.put(digest, data)

    async def stream(w: S3Payloads) -> None:
        streamed.append(await w.put_stream(chunks_of(data, 256 * 1024)))

    async with anyio.create_task_group() as tg:
        for i in range(8):
            tg.start_soon(put, writers[i % 2])
            tg.start_soon(stream, writers[(i + 1) % 2])
    assert streamed == [(digest, size)] * 8  # every writer succeeded
    hx = digest.hex()
    assert await all_keys(raw) == [f"{hx[:2]}/{hx[2:4]}/{hx}"]  # one object, no temporaries
    assert await writers[0].get(digest, size) == data
    assert b"".join([c async for c in writers[1].iter(digest, size)]) == data
    assert [o async for o in writers[0].leftovers(0)] == []
    temps = [t for w in writers for t in w.temps]
    assert len(temps) == (8 if size > writers[0].part_size else 0)
    assert hidden_uploads([*temps, writers[0].key_for(digest)]) == []
    for w in writers:
        await w.aclose()


# -- (b) S3 unavailable under a session ------------------------------------------------------------


def registry(
    bodies: list[bytes], *, streamed: Callable[[bytes], AsyncIterator[bytes]] | None = None
) -> dio.Registry:
    """A source answering request ``i`` with ``bodies[i]`` (streamed if ``streamed``)."""

    def handler(req: Request) -> bytes | AdapterResult:
        i = req.params["i"]
        assert isinstance(i, int)
        if streamed is not None and req.kind == "stream":
            return AdapterResult(data=streamed(bodies[i]))
        return bodies[i]

    reg = dio.Registry()
    reg.register("m", dio.MockAdapter(handler))
    return reg


async def check_rows(root: Path, bucket_url: str, stored: list[bytes], lost: list[bytes]) -> None:
    """Reopen with S3 reachable: every response row names bytes that are there (and verify),
    none names the bytes that could not be stored, the session ended."""
    async with dio.Store(root, payloads=S3Payloads(bucket_url)) as store:
        report = await store.verify()
        assert report.missing_payloads == report.missing_references == []
        assert report.corrupt_payloads == []
        responses = [r async for r in store.iter_responses()]
        assert sorted(r.checksum or "" for r in responses) == sorted(sha(b).hex() for b in stored)
        assert all(r.status is ResponseStatus.OK for r in responses)
        for resp, body in zip(responses, stored, strict=True):
            assert await store.read(resp) == body
        for body in lost:
            with pytest.raises(dio.IntegrityError, match="not in the store"):
                await store.read(sha(body).hex())
        (session,) = await store.list_sessions()
        assert session.ended_at is not None and session.errors == 1


async def test_s3_unreachable_from_the_start(tmp_path: Path, bucket_url: str) -> None:
    small, large = os.urandom(1000), os.urandom(LARGE)
    dead = f"http://127.0.0.1:{closed_port()}"
    payloads = S3Payloads(bucket_url, options={"endpoint": dead, "max_retries": "0"})
    with anyio.fail_after(60):  # a bound, not a timing assertion: nothing may hang
        async with dio.Store(tmp_path / "store", payloads=payloads) as store:
            async with dio.AsyncSession("m", store=store, registry=registry([small, large])) as s:
                ok = await s.fetch(s.request("k", params={"i": 0}))  # inline: no S3 needed
                assert ok.ok and ok.checksum == sha(small).hex()
                with pytest.raises(dio.StoreError, match=f"cannot reach the S3 endpoint {dead}"):
                    await s.fetch(s.request("k", params={"i": 1}))
                assert s.session.errors == 1
    await check_rows(tmp_path / "store", bucket_url, [small], [large])


async def test_s3_going_away_mid_session(tmp_path: Path, bucket_url: str, proxy: TcpProxy) -> None:
    first, second, third = os.urandom(LARGE), os.urandom(LARGE), os.urandom(12 * MiB)

    async def streamed(body: bytes) -> AsyncIterator[bytes]:
        for i in range(0, len(body), MiB):
            yield body[i : i + MiB]
            if i == 9 * MiB:
                await proxy.close()  # S3 goes away while the body is being uploaded
            await anyio.lowlevel.checkpoint()

    payloads = S3Payloads(bucket_url, options={"endpoint": proxy.url, "max_retries": "1"})
    reg = registry([first, second, third], streamed=streamed)
    with anyio.fail_after(60):
        async with dio.Store(tmp_path / "store", payloads=payloads) as store:
            async with dio.AsyncSession("m", store=store, registry=reg) as s:
                ok = await s.fetch(s.request("k", params={"i": 0}))  # stored in S3
                assert ok.ok
                with pytest.raises(dio.StoreError, match="cannot reach the S3 endpoint"):
                    await s.fetch(s.request("stream", params={"i": 2}))
                with pytest.raises(dio.StoreError, match="cannot reach the S3 endpoint"):
                    await s.fetch(s.request("k", params={"i": 1}))
                assert s.session.errors == 2
    # The streamed write could not clean up after itself with S3 away: its temporary is an
    # interrupted write that leftovers() (so verify) reports, and gc or a writer's open() removes.
    # (A writer's open() would remove it at once: open this one as it is.)
    payloads = S3Payloads(bucket_url, create=False)
    async with dio.Store(tmp_path / "store", payloads=payloads) as store:
        report = await store.verify()
        assert [p.kind for p in report.problems] == ["temp_leftover"]
        assert "/tmp/" in report.problems[0].detail
        gc = await store.gc(grace=0)
        assert (len(gc.temp_files), gc.temp_bytes) == (1, 0)  # the marker: never completed
        assert (await store.verify()).ok
        (session,) = await store.list_sessions()
        assert session.ended_at is not None and session.errors == 2
        responses = [r async for r in store.iter_responses()]
        assert [r.checksum for r in responses] == [sha(first).hex()]
        assert await store.read(responses[0]) == first


# -- (d) credentials -------------------------------------------------------------------------------


async def test_credentials_never_reach_a_row_a_location_or_a_message(
    tmp_path: Path, bucket_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    key_id = os.environ["AWS_ACCESS_KEY_ID"]
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    wrong = "wrong-" + secret[::-1]
    # The URL's options are the only source of the secret here.
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    with_secret = f"{bucket_url}?access_key_id={key_id}&secret_access_key={secret}"
    bodies = [os.urandom(1000), os.urandom(LARGE), os.urandom(9 * MiB + 5)]

    async def streamed(body: bytes) -> AsyncIterator[bytes]:
        for i in range(0, len(body), MiB):
            yield body[i : i + MiB]

    texts: list[str] = []
    root = tmp_path / "store"
    async with dio.Store(root, payloads=with_secret) as store:  # the URL form of the issue
        assert isinstance(store.payloads, S3Payloads)
        texts += [repr(store), store.payloads.location, repr(store.payloads)]
        reg = registry(bodies, streamed=streamed)
        async with dio.AsyncSession("m", store=store, registry=reg) as s:
            for i, kind in enumerate(("k", "k", "stream")):
                resp = await s.fetch(s.request(kind, params={"i": i}))
                assert await store.read(resp) == bodies[i]
            texts += [repr(s)]
        texts += [o.location async for o in store.payloads.list()]
        texts += [str((await store.verify()).to_json()), str((await store.gc(grace=0)).to_json())]
        texts += [str(row) async for row in store.iter_rows("sessions")]
        texts += [str(row) async for row in store.iter_rows("requests")]
        texts += [str(row) async for row in store.iter_rows("responses")]

    # A refused secret is not echoed either.
    refused = S3Payloads(f"{bucket_url}?access_key_id={key_id}&secret_access_key={wrong}")
    with pytest.raises(dio.StoreError, match="access denied") as caught:
        await refused.put(sha(b"x"), b"x")
    texts += [str(caught.value), repr(refused), refused.location]
    await refused.aclose()

    for text in texts:
        assert secret not in text and wrong not in text, text
    for path in root.rglob("*"):  # the database, its WAL, anything else written
        if path.is_file():
            raw_bytes = path.read_bytes()
            assert secret.encode() not in raw_bytes and wrong.encode() not in raw_bytes, path
