"""The SQLite store's memory of payloads: what it serves, and when lookups stop prefetching."""

from __future__ import annotations

import hashlib

from mxm_dataio_async._store import _memory
from mxm_dataio_async._store._memory import PayloadMemory


def _rows(start: int, n: int) -> list[tuple[bytes, bytes]]:
    return [(hashlib.sha256(b"%d" % i).digest(), b"%d" % i) for i in range(start, start + n)]


def test_committed_bytes_are_verified_and_prefetched_ones_are_not() -> None:
    memory = PayloadMemory()
    committed, prefetched = _rows(0, 1)[0], _rows(1, 1)[0]
    memory.committed.put(*committed)
    memory.found([prefetched])
    row = memory.row(committed[0])
    assert row is not None and row.verified and row.data == committed[1]
    row = memory.row(prefetched[0])
    assert row is not None and not row.verified and row.data == prefetched[1]
    assert memory.row(b"\0" * 32) is None
    memory.forget()
    assert memory.row(committed[0]) is None and memory.row(prefetched[0]) is None


def test_lookups_stop_prefetching_what_nobody_reads_and_try_again_later() -> None:
    memory = PayloadMemory()
    assert memory.lookup_limit() == _memory.PREFETCH_MAX
    unread = _rows(0, _memory._SAMPLE)
    memory.found(unread)  # a whole sample prefetched, none read
    assert [memory.lookup_limit() for _ in range(_memory._PAUSE)] == [0] * _memory._PAUSE
    assert memory.lookup_limit() == _memory.PREFETCH_MAX  # paused for a while, not for good


def test_lookups_keep_prefetching_what_is_read() -> None:
    memory = PayloadMemory()
    for start in range(0, 4 * _memory._SAMPLE, 64):  # batches of 64, each read after
        rows = _rows(start, 64)
        assert memory.lookup_limit() == _memory.PREFETCH_MAX
        memory.found(rows)
        for digest, _ in rows[:8]:  # one in eight read: enough to keep it on
            assert memory.row(digest) is not None
    assert memory.lookup_limit() == _memory.PREFETCH_MAX
