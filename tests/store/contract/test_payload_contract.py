"""The :class:`PayloadStore` contract: content-addressed bytes, put once, read verified."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import anyio
import anyio.lowlevel
import pytest

from mxm_dataio_async._exceptions import IntegrityError
from mxm_dataio_async._store._protocols import PayloadStore, StoredObject
from tests.store.contract._helpers import (
    collect,
    make_leftover,
    make_stray,
    overwrite_object,
    pieces_left,
    sha,
)
from tests.store.contract.conftest import PairMaker

pytestmark = pytest.mark.anyio


async def chunks_of(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]
        await anyio.lowlevel.checkpoint()


async def listed(payloads: PayloadStore) -> dict[bytes | None, list[StoredObject]]:
    by_digest: dict[bytes | None, list[StoredObject]] = {}
    async for obj in payloads.list():
        by_digest.setdefault(obj.digest, []).append(obj)
    return by_digest


async def test_open_of_a_fresh_store(make_pair: PairMaker) -> None:
    pair = await make_pair(opened=False)
    await pair.metadata.open()
    assert await pair.payloads.open() == 0  # nothing left over to remove
    assert await collect(pair.payloads.list()) == []
    assert await collect(pair.payloads.leftovers(0)) == []


async def test_put_then_get_exact_bytes(payloads: PayloadStore) -> None:
    data = os.urandom(300_000)
    digest = sha(data)
    assert await payloads.stat(digest) is None
    await payloads.put(digest, data)
    assert await payloads.get(digest, len(data)) == data
    assert b"".join(await collect(payloads.iter(digest, len(data)))) == data
    chunks = await collect(payloads.iter(digest, len(data), chunk_size=64 * 1024))
    assert b"".join(chunks) == data
    empty = b""
    await payloads.put(sha(empty), empty)
    assert await payloads.get(sha(empty), 0) == b""


async def test_get_of_a_missing_object_or_a_wrong_size_is_an_integrity_error(
    payloads: PayloadStore,
) -> None:
    data = b"some payload bytes"
    with pytest.raises(IntegrityError):
        await payloads.get(sha(data), len(data))
    with pytest.raises(IntegrityError):
        await collect(payloads.iter(sha(data), len(data)))
    await payloads.put(sha(data), data)
    with pytest.raises(IntegrityError):
        await payloads.get(sha(data), len(data) + 1)  # the row says another size
    with pytest.raises(IntegrityError):
        await collect(payloads.iter(sha(data), len(data) - 1))


async def test_put_twice_is_a_no_op(payloads: PayloadStore) -> None:
    data = os.urandom(5000)
    await payloads.put(sha(data), data)
    first = await payloads.stat(sha(data))
    await payloads.put(sha(data), data)
    digest, size = await payloads.put_stream(chunks_of(data, 1000))  # the same bytes streamed
    assert (digest, size) == (sha(data), len(data))
    objects = await listed(payloads)
    assert list(objects) == [sha(data)] and len(objects[sha(data)]) == 1
    again = await payloads.stat(sha(data))
    assert first is not None and again is not None
    assert (again.location, again.size) == (first.location, first.size)
    assert await payloads.get(sha(data), len(data)) == data


async def test_put_stream_returns_digest_and_size(payloads: PayloadStore) -> None:
    data = os.urandom(1_000_003)
    digest, size = await payloads.put_stream(chunks_of(data, 64 * 1024))
    assert (digest, size) == (sha(data), len(data))
    assert await payloads.get(digest, size) == data
    obj = await payloads.stat(digest)
    assert obj is not None and (obj.digest, obj.size) == (digest, size)

    async def with_empty_chunks() -> AsyncIterator[bytes]:
        for part in (b"", b"ab", b"", b"cd", b""):
            yield part

    assert await payloads.put_stream(with_empty_chunks()) == (sha(b"abcd"), 4)
    assert await payloads.get(sha(b"abcd"), 4) == b"abcd"

    async def nothing() -> AsyncIterator[bytes]:
        empty: list[bytes] = []
        for chunk in empty:
            yield chunk

    assert await payloads.put_stream(nothing()) == (sha(b""), 0)
    assert await payloads.get(sha(b""), 0) == b""


async def test_a_failing_stream_leaves_nothing_behind(payloads: PayloadStore) -> None:
    class PeerWentAway(ConnectionResetError):
        pass

    head = os.urandom(200_000)

    async def broken() -> AsyncIterator[bytes]:
        yield head[:100_000]
        yield head[100_000:]
        raise PeerWentAway("connection reset mid-body")

    with pytest.raises(PeerWentAway):
        await payloads.put_stream(broken())
    assert await collect(payloads.list()) == []
    assert await payloads.stat(sha(head)) is None
    assert await collect(payloads.leftovers(0)) == []
    assert pieces_left(payloads) == []
    # The store still works.
    assert await payloads.put_stream(chunks_of(head, 50_000)) == (sha(head), len(head))
    assert await payloads.get(sha(head), len(head)) == head


async def test_corrupt_objects_raise_integrity_error(payloads: PayloadStore) -> None:
    data = os.urandom(100_000)
    digest = sha(data)
    await payloads.put(digest, data)
    for damaged in (
        bytes([data[0] ^ 1]) + data[1:],  # same size, one bit flipped
        data[:-1],  # truncated
        data + b"!",  # longer
    ):
        await overwrite_object(payloads, digest, damaged)
        with pytest.raises(IntegrityError):
            await payloads.get(digest, len(data))
        with pytest.raises(IntegrityError):
            await collect(payloads.iter(digest, len(data), chunk_size=8192))
    # Deleting the corrupt object and putting the bytes again repairs it.
    assert await payloads.delete(digest)
    await payloads.put(digest, data)
    assert await payloads.get(digest, len(data)) == data


async def test_stat(payloads: PayloadStore) -> None:
    data = b"x" * 4096
    assert await payloads.stat(sha(data)) is None
    await payloads.put(sha(data), data)
    obj = await payloads.stat(sha(data))
    assert obj is not None
    assert (obj.digest, obj.size) == (sha(data), 4096)
    assert isinstance(obj.location, str) and obj.location
    assert obj.age >= 0
    assert await payloads.stat(sha(b"other")) is None


async def test_list_includes_every_object(payloads: PayloadStore) -> None:
    bodies = [os.urandom(64) + str(i).encode() for i in range(520)]  # more than one page
    async with anyio.create_task_group() as tg:
        for body in bodies:
            tg.start_soon(payloads.put, sha(body), body)
    objects = await listed(payloads)
    assert set(objects) == {sha(b) for b in bodies}
    assert all(len(found) == 1 for found in objects.values())
    for body in bodies[:20]:
        (obj,) = objects[sha(body)]
        assert obj.size == len(body) and obj.location and obj.age >= 0
        stat = await payloads.stat(sha(body))
        assert stat is not None and stat.location == obj.location


async def test_list_reports_strays_without_a_digest(payloads: PayloadStore) -> None:
    await payloads.put(sha(b"proper"), b"proper")
    make_stray(payloads, b"stray bytes")
    objects = await listed(payloads)
    assert set(objects) == {sha(b"proper"), None}
    (stray,) = objects[None]
    assert stray.size == len(b"stray bytes")
    assert await payloads.delete(stray)
    assert set(await listed(payloads)) == {sha(b"proper")}


async def test_leftovers(payloads: PayloadStore) -> None:
    assert await collect(payloads.leftovers(0)) == []
    old = make_leftover(payloads, b"old piece", age=7200)
    young = make_leftover(payloads, b"young piece")
    found = {o.location: o for o in await collect(payloads.leftovers(0))}
    assert set(found) == {str(old), str(young)}
    assert found[str(old)].size == len(b"old piece") and found[str(old)].digest is None
    (aged,) = await collect(payloads.leftovers(3600))  # younger pieces may be in progress
    assert aged.location == str(old)
    assert await collect(payloads.list()) == []  # leftovers are not objects
    assert await payloads.delete(aged)
    assert not await payloads.delete(aged)
    assert [o.location for o in await collect(payloads.leftovers(0))] == [str(young)]


async def test_open_removes_leftovers_of_dead_writers(make_pair: PairMaker) -> None:
    first = await make_pair()
    await first.payloads.put(sha(b"kept"), b"kept")
    make_leftover(first.payloads)
    make_leftover(first.payloads)
    again = await make_pair(root=first.root, opened=False)
    assert await again.payloads.open() == 2
    assert await collect(again.payloads.leftovers(0)) == []
    assert await again.payloads.get(sha(b"kept"), 4) == b"kept"


async def test_delete_by_digest_and_by_object(payloads: PayloadStore) -> None:
    a, b = b"first object", b"second object"
    await payloads.put(sha(a), a)
    await payloads.put(sha(b), b)
    assert await payloads.delete(sha(a)) is True
    assert await payloads.stat(sha(a)) is None
    with pytest.raises(IntegrityError):
        await payloads.get(sha(a), len(a))
    assert await payloads.delete(sha(a)) is False

    (obj,) = await collect(payloads.list())
    assert obj.digest == sha(b)
    assert await payloads.delete(obj) is True
    assert await payloads.stat(sha(b)) is None
    assert await payloads.delete(obj) is False
    assert await collect(payloads.list()) == []
    assert await payloads.delete(sha(b"never stored")) is False
    # Deleted bytes can be put again.
    await payloads.put(sha(a), a)
    assert await payloads.get(sha(a), len(a)) == a
