"""S3Payloads beyond the contract suite: its URL and options, its key layout, the multipart path
of put_stream (a failing source, a cancelled write: nothing left, no hidden upload), damage the
contract's helpers cannot do to an S3 object (corruption, strays, dead writers' temporaries),
errors that say what to check, and obstore staying optional."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.lowlevel
import obstore as obs
import pytest
from obstore.store import S3Store

from mxm_dataio_async._exceptions import IntegrityError, StoreError
from mxm_dataio_async._store._s3 import S3Payloads
from mxm_dataio_async._store._s3._client import host as _host
from tests.store.s3.conftest import HiddenUploads, RecordingS3Payloads, TcpProxy, split_url

pytestmark = pytest.mark.anyio
T = TypeVar("T")

MiB = 1 << 20
REPO = Path(__file__).resolve().parents[3]


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


async def chunks_of(data: bytes, size: int = 256 * 1024) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]
        await anyio.lowlevel.checkpoint()


async def keys(raw: S3Store) -> list[str]:
    found: list[str] = [m["path"] async for page in obs.list(raw, None) for m in page]
    return sorted(found)


# -- URL, options, keys ----------------------------------------------------------------------------


async def test_location_key_layout_and_listing(payloads: S3Payloads, raw: S3Store) -> None:
    bucket, prefix = split_url(payloads.location)
    assert payloads.location == f"s3://{bucket}/{prefix}"
    data = os.urandom(3000)
    hx = sha(data).hex()
    await payloads.put(sha(data), data)
    assert await keys(raw) == [f"{hx[:2]}/{hx[2:4]}/{hx}"]  # <prefix>/ab/cd/<sha256>
    obj = await payloads.stat(sha(data))
    assert obj is not None
    assert obj.location == f"{bucket}/{prefix}/{hx[:2]}/{hx[2:4]}/{hx}"
    assert str(Path(obj.location)) == obj.location  # reports carry it through Path
    assert [o.location for o in await _collect(payloads.list())] == [obj.location]


async def test_query_options_override_the_environment_and_options_override_the_query(
    bucket_url: str,
) -> None:
    closed = _closed_port()
    bad = f"http://127.0.0.1:{closed}"
    good = os.environ["AWS_ENDPOINT_URL"]
    data = os.urandom(2000)

    unreachable = S3Payloads(f"{bucket_url}?endpoint={bad}&max_retries=0")
    with pytest.raises(StoreError, match=f"cannot reach the S3 endpoint {bad}"):
        await unreachable.put(sha(data), data)
    assert unreachable.location == bucket_url  # without the query

    fixed = S3Payloads(f"{bucket_url}?endpoint={bad}&max_retries=0", options={"endpoint": good})
    await fixed.put(sha(data), data)
    assert await fixed.get(sha(data), len(data)) == data
    await fixed.aclose()
    await unreachable.aclose()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("https://bucket/prefix", "s3://bucket/prefix"),
        ("s3:///prefix", "no bucket"),
        ("s3://AKIA:SECRETVALUE@bucket/prefix", "credentials do not belong"),
        ("s3://bucket/a/../b", r"'\.\.'"),
        ("s3://bucket/p?frobnicate=1", "unknown S3 option"),
        ("s3://bucket/p?max_retries=many", "max_retries"),
        ("s3://bucket/p?bucket=other", "not an option"),
    ],
)
def test_invalid_urls_are_refused_without_echoing_secrets(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        S3Payloads(url)
    assert "SECRETVALUE" not in str(caught.value)


# -- the streamed (multipart) path -----------------------------------------------------------------


async def test_large_streams_go_through_a_temporary_and_leave_nothing(
    bucket_url: str, raw: S3Store, hidden_uploads: HiddenUploads
) -> None:
    payloads = RecordingS3Payloads(bucket_url)
    await payloads.open()
    data = os.urandom(20 * MiB + 12345)  # three parts
    digest, size = await payloads.put_stream(chunks_of(data, 64 * 1024))
    assert (digest, size) == (sha(data), len(data))
    assert len(payloads.temps) == 1  # it took the multipart path
    hx = digest.hex()
    assert await keys(raw) == [f"{hx[:2]}/{hx[2:4]}/{hx}"]  # the temporary is gone
    assert await payloads.get(digest, size) == data
    payloads.read_window = 3 * MiB  # read back in ranges
    assert b"".join(await _collect(payloads.iter(digest, size))) == data
    assert hidden_uploads([*payloads.temps, payloads.key_for(digest)]) == []
    # The same bytes streamed again: found at its content address, nothing copied.
    assert await payloads.put_stream(chunks_of(data, MiB)) == (digest, size)
    assert await keys(raw) == [f"{hx[:2]}/{hx[2:4]}/{hx}"]
    await payloads.aclose()


async def test_a_source_failing_mid_upload_raises_its_own_error_and_leaves_nothing(
    bucket_url: str, raw: S3Store, hidden_uploads: HiddenUploads
) -> None:
    class PeerWentAway(ConnectionResetError):
        pass

    payloads = RecordingS3Payloads(bucket_url)
    await payloads.open()
    block = os.urandom(MiB)

    async def broken() -> AsyncIterator[bytes]:
        for _ in range(20):  # two parts uploaded, the third under way
            yield block
        raise PeerWentAway("connection reset mid-body")

    with pytest.raises(PeerWentAway):
        await payloads.put_stream(broken())
    assert len(payloads.temps) == 1
    assert await keys(raw) == []  # neither the object, nor the temporary, nor its marker
    assert await _collect(payloads.leftovers(0)) == []
    assert hidden_uploads(payloads.temps) == []  # obstore aborted the multipart upload
    await payloads.aclose()


async def test_a_cancelled_upload_leaves_nothing(
    bucket_url: str, raw: S3Store, hidden_uploads: HiddenUploads
) -> None:
    payloads = RecordingS3Payloads(bucket_url)
    await payloads.open()
    block = os.urandom(MiB)
    sent = anyio.Event()

    async def endless() -> AsyncIterator[bytes]:
        n = 0
        while True:
            yield block
            n += 1
            if n == 20:
                sent.set()
            await anyio.sleep(0.001)

    async with anyio.create_task_group() as tg:
        tg.start_soon(payloads.put_stream, endless())
        await sent.wait()
        tg.cancel_scope.cancel()
    assert len(payloads.temps) == 1
    assert await keys(raw) == []
    assert await _collect(payloads.leftovers(0)) == []
    assert hidden_uploads(payloads.temps) == []
    await payloads.aclose()


async def test_cancelled_while_the_last_parts_upload_leaves_nothing(
    bucket_url: str, raw: S3Store, hidden_uploads: HiddenUploads
) -> None:
    finishing = anyio.Event()

    class Watched(RecordingS3Payloads):
        async def _io(self, call: Awaitable[T], action: str, key: str, **kw: bool) -> T:
            if action == "upload payload to":  # the source is done; the upload completes
                finishing.set()
            return await super()._io(call, action, key, **kw)

    payloads = Watched(bucket_url)
    await payloads.open()
    data = os.urandom(3 * payloads.part_size)
    async with anyio.create_task_group() as tg:
        tg.start_soon(payloads.put_stream, chunks_of(data, MiB))
        await finishing.wait()
        tg.cancel_scope.cancel()
    assert len(payloads.temps) == 1
    # Cancelling never drops obstore's upload half-way: it completes, and its temporary goes.
    assert hidden_uploads(payloads.temps) == []
    assert await keys(raw) == []
    await payloads.aclose()


async def test_s3_failing_mid_upload_is_a_store_error_and_leaves_a_findable_marker(
    bucket_url: str, proxy: TcpProxy
) -> None:
    payloads = S3Payloads(bucket_url, options={"endpoint": proxy.url, "max_retries": "1"})
    await payloads.open()
    block = os.urandom(MiB)
    pulled = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal pulled
        while True:
            yield block
            pulled += 1
            if pulled == 12:
                await proxy.close()  # S3 goes away while parts are being uploaded

    with anyio.fail_after(60), pytest.raises(StoreError, match="cannot reach the S3 endpoint"):
        await payloads.put_stream(body())
    await payloads.aclose()
    # The temporary could not be removed while S3 was away: leftovers() finds its marker.
    direct = S3Payloads(bucket_url)
    assert await _collect(direct.list()) == []
    (left,) = await _collect(direct.leftovers(0))
    assert left.size == 0 and f"/tmp/{_host()}/{os.getpid()}-" in left.location
    assert await direct.delete(left)
    await direct.aclose()


# -- damage the contract's helpers cannot do -------------------------------------------------------


async def test_corrupt_objects_raise_integrity_error(payloads: S3Payloads, raw: S3Store) -> None:
    data = os.urandom(100_000)
    digest = sha(data)
    await payloads.put(digest, data)
    for damaged in (bytes([data[0] ^ 1]) + data[1:], data[:-1], data + b"!"):
        await obs.put_async(raw, payloads.key_for(digest), damaged)
        with pytest.raises(IntegrityError, match="corrupt"):
            await payloads.get(digest, len(data))
        with pytest.raises(IntegrityError, match="corrupt"):
            await _collect(payloads.iter(digest, len(data), chunk_size=8192))
        payloads.read_window = 16 * 1024  # the same, read in ranges
        with pytest.raises(IntegrityError, match="corrupt"):
            await _collect(payloads.iter(digest, len(data), chunk_size=8192))
        payloads.read_window = 8 * MiB
    # A put of the right bytes over a corrupt object does not repair it (create-only) ...
    await payloads.put(digest, data)
    with pytest.raises(IntegrityError):
        await payloads.get(digest, len(data))
    # ... deleting it first does.
    assert await payloads.delete(digest)
    await payloads.put(digest, data)
    assert await payloads.get(digest, len(data)) == data


async def test_a_streamed_put_replaces_an_object_of_the_wrong_size(
    payloads: S3Payloads, raw: S3Store
) -> None:
    data = os.urandom(payloads.part_size + 4321)  # the multipart path
    digest = sha(data)
    await obs.put_async(raw, payloads.key_for(digest), data[:-1])  # truncated at its address
    assert await payloads.put_stream(chunks_of(data, MiB)) == (digest, len(data))
    assert await payloads.get(digest, len(data)) == data
    assert [o.digest for o in await _collect(payloads.list())] == [digest]


async def test_strays_are_listed_without_a_digest(payloads: S3Payloads, raw: S3Store) -> None:
    await payloads.put(sha(b"proper"), b"proper")
    good = sha(b"misplaced").hex()
    await obs.put_async(raw, "00/00/not-a-digest.bin", b"stray bytes")
    await obs.put_async(raw, f"ff/ff/{good}", b"misplaced")  # a content address, wrong folder
    objects = await _collect(payloads.list())
    assert sorted(o.digest is None for o in objects) == [False, True, True]
    strays = [o for o in objects if o.digest is None]
    assert sorted(o.size for o in strays) == [len(b"misplaced"), len(b"stray bytes")]
    for stray in strays:
        assert await payloads.delete(stray)
        assert not await payloads.delete(stray)
    assert [o.digest for o in await _collect(payloads.list())] == [sha(b"proper")]
    outsider = type(strays[0])("elsewhere/ab/cd/x", 1, 0.0)
    with pytest.raises(ValueError, match="not in this payload store"):
        await payloads.delete(outsider)


async def test_leftovers_are_temporaries_of_dead_writers(
    bucket_url: str, payloads: S3Payloads, raw: S3Store
) -> None:
    here = _host()
    dead = f"tmp/{here}/999999999-{uuid.uuid4().hex}"  # no such pid: its writer is dead
    alive = f"tmp/{here}/{os.getppid()}-{uuid.uuid4().hex}"  # a running process's
    remote = f"tmp/another-host/12-{uuid.uuid4().hex}"  # judged by age alone
    for key, body in ((dead, b"half a payload"), (alive, b"in progress"), (remote, b"r")):
        await obs.put_async(raw, key, body)
    found = {o.location: o for o in await _collect(payloads.leftovers(0))}
    bucket, prefix = split_url(bucket_url)
    assert set(found) == {f"{bucket}/{prefix}/{dead}", f"{bucket}/{prefix}/{remote}"}
    assert all(o.digest is None for o in found.values())
    assert found[f"{bucket}/{prefix}/{dead}"].size == len(b"half a payload")
    assert await _collect(payloads.leftovers(3600)) == []  # all of them are young
    assert await _collect(payloads.list()) == []  # leftovers are not objects
    target = found[f"{bucket}/{prefix}/{remote}"]
    assert await payloads.delete(target)
    assert not await payloads.delete(target)

    # A writer opening the store removes its host's dead writers' temporaries at once.
    again = S3Payloads(bucket_url)
    assert await again.open() == 1
    assert await keys(raw) == [alive]
    read_only = S3Payloads(bucket_url, create=False)
    await obs.put_async(raw, dead, b"again")
    assert await read_only.open() == 0  # opened as it is
    assert sorted(await keys(raw)) == sorted([alive, dead])
    await again.aclose()
    await read_only.aclose()


async def test_a_killed_writer_leaves_a_leftover_that_open_and_delete_remove(
    bucket_url: str, raw: S3Store, hidden_uploads: HiddenUploads
) -> None:
    script = (
        "import asyncio, os, sys\n"
        "from mxm_dataio_async._store._s3 import S3Payloads\n"
        "async def body():\n"
        "    block = os.urandom(1 << 20)\n"
        "    for i in range(10_000):\n"
        "        yield block\n"
        "        if i == 12:\n"
        "            print('streaming', flush=True)\n"
        "        await asyncio.sleep(0.01)\n"
        "async def main():\n"
        "    p = S3Payloads(sys.argv[1])\n"
        "    await p.put_stream(body())\n"
        "asyncio.run(main())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with subprocess.Popen(
        [sys.executable, "-c", script, bucket_url], stdout=subprocess.PIPE, text=True, env=env
    ) as child:
        try:
            assert child.stdout is not None
            with anyio.fail_after(60):
                line = await anyio.to_thread.run_sync(child.stdout.readline)
            assert line.strip() == "streaming"
        finally:
            child.kill()
    payloads = S3Payloads(bucket_url, create=False)
    await payloads.open()
    (left,) = await _collect(payloads.leftovers(0))  # the marker of the interrupted upload
    assert f"/tmp/{_host()}/{child.pid}-" in left.location
    assert await _collect(payloads.list()) == []
    assert await payloads.delete(left)
    assert await _collect(payloads.leftovers(0)) == []
    await payloads.aclose()
    # What S3 keeps out of every listing: the parts of the killed upload (a bucket lifecycle
    # rule, or the server's tools, remove them; see the module docstring).
    bucket, prefix = split_url(bucket_url)
    temp_key = left.location.removeprefix(f"{bucket}/{prefix}/")
    assert hidden_uploads([temp_key]) == [temp_key]
    hidden_uploads.purge([temp_key])
    assert hidden_uploads([temp_key]) == []


# -- errors ----------------------------------------------------------------------------------------


async def test_errors_say_what_to_check(bucket_url: str) -> None:
    data = os.urandom(2000)
    denied = S3Payloads(bucket_url, options={"secret_access_key": "not-the-secret-key"})
    with pytest.raises(StoreError, match=r"access denied.*check the credentials") as caught:
        await denied.open()  # refused credentials fail at once
    assert "not-the-secret-key" not in str(caught.value)
    with pytest.raises(StoreError, match="access denied"):
        await denied.put(sha(data), data)

    _, prefix = split_url(bucket_url)
    missing = S3Payloads(f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/{prefix}")
    with pytest.raises(StoreError, match="does not exist"):
        await missing.open()

    port = _closed_port()
    gone = S3Payloads(
        bucket_url, options={"endpoint": f"http://127.0.0.1:{port}", "max_retries": "0"}
    )
    assert await gone.open() == 0  # an unreachable server does not stop the store opening
    calls: list[Callable[[], Awaitable[Any]]] = [
        lambda: gone.put(sha(data), data),
        lambda: gone.get(sha(data), len(data)),
        lambda: gone.stat(sha(data)),
        lambda: gone.delete(sha(data)),
        lambda: _collect(gone.list()),
        lambda: _collect(gone.leftovers(0)),
        lambda: _collect(gone.iter(sha(data), len(data))),
        lambda: gone.put_stream(chunks_of(os.urandom(9 * MiB), MiB)),
    ]
    for call in calls:
        with pytest.raises(
            StoreError, match=f"cannot reach the S3 endpoint http://127.0.0.1:{port}"
        ):
            await call()

    plain = S3Payloads(
        bucket_url, options={"allow_http": "false", "endpoint": os.environ["AWS_ENDPOINT_URL"]}
    )
    with pytest.raises(StoreError, match="allow_http"):
        await plain.put(sha(data), data)
    for p in (denied, missing, gone, plain):
        await p.aclose()


def test_obstore_stays_optional() -> None:
    script = (
        "import sys\n"
        "import mxm_dataio_async, mxm_dataio_async.store, mxm_dataio_async._store\n"
        "assert 'obstore' not in sys.modules, 'importing the package imported obstore'\n"
        "sys.modules['obstore'] = None  # as if the s3 extra were not installed\n"
        "from mxm_dataio_async._store._s3 import S3Payloads\n"
        "try:\n"
        "    S3Payloads('s3://bucket/prefix')\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "mxm-dataio-async[s3]" in done.stdout


# -- helpers ---------------------------------------------------------------------------------------


async def _collect(items: AsyncIterator[T]) -> list[T]:
    return [x async for x in items]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port
