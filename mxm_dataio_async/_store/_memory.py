"""The inline payloads a metadata store can hand to ``read()`` without a query of their own.

Every read that is a query costs a hop to SQLite's thread, or a round trip to PostgreSQL (~0.2 ms
here when nothing else is batched with it), so both backends keep three kinds of bytes in memory,
all bounded:

- ``committed``: payloads this process staged (hashing them on arrival) and committed: a read
  right after a fetch. These are *verified*: the store hashed these very bytes.
- ``prefetched``: payloads read along with the cache lookup that found their response (the
  batched reader does it in the lookup's hop), or read ahead by a loop over ``iter_responses``.
  These are stored bytes, *unverified*: ``Store.read`` hashes them as it hashes any bytes read
  back (the batched readers: ``_sqlite/_reader.py``, ``_postgres/_reader.py``).
- read-ahead: for each page ``iter_responses`` yields, the inline-sized payloads in order; the
  first read of one reads it and the following ones (up to ``AHEAD_BYTES``) in one query, so the
  documented loop ``async for r in store.iter_responses(): await store.read(r)`` costs a query per
  megabyte, not per response.

Deleting or discarding payload rows forgets all of it (``forget``). A program that fetches
without reading (a job re-run to refresh nothing, a cache warm-up) would pay for bytes it never
uses: when fewer than one in ten of the last ``_SAMPLE`` prefetched payloads was read, lookups stop
prefetching for the next ``_PAUSE`` batches, then try again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from mxm_dataio_async._recent import Recent
from mxm_dataio_async._store._protocols import PayloadRow

__all__ = ["AHEAD_BYTES", "CHECKSUM_AT", "PREFETCH_MAX", "SIZE_AT", "PayloadMemory"]

#: Inline payloads up to this size are read with the lookup or page that names them (0: none;
#: ``benchmarks/hits.py`` compares both).
PREFETCH_MAX = 64 * 1024
#: How many bytes one read-ahead query brings (within ``prefetched``'s bound, so none is dropped
#: before it is read).
AHEAD_BYTES: Final = 1024 * 1024

#: Where a response row (``RESPONSE_COLUMNS``, the same in both backends) holds its payload's
#: checksum and size.
CHECKSUM_AT: Final = 7
SIZE_AT: Final = 8

_ITEMS: Final = 4096
_BYTES: Final = 4 * 1024 * 1024
_SAMPLE: Final = 1024  # prefetched payloads between two looks at how many were read
_PAUSE: Final = 256  # lookup batches without prefetch after a look that found them unread


_NOT_INLINE: Final[tuple[list[tuple[bytes, int]], int]] = ([], 0)


class PayloadMemory:
    """Bytes by sha256 that ``payload()`` answers from memory (see the module's docstring)."""

    __slots__ = ("_ahead", "_offered", "_paused", "_taken", "committed", "prefetched")

    def __init__(self) -> None:
        self.committed: Recent[bytes, bytes] = Recent(_ITEMS, max_weight=_BYTES, weigh=len)
        self.prefetched: Recent[bytes, bytes] = Recent(_ITEMS, max_weight=_BYTES, weigh=len)
        self._ahead: Recent[bytes, tuple[list[tuple[bytes, int]], int]] = Recent(_ITEMS)
        self._offered = self._taken = self._paused = 0

    def lookup_limit(self) -> int:
        """The largest payload a lookup batch should read along (0: none), asked per batch."""
        if self._paused:
            self._paused -= 1
            return 0
        return PREFETCH_MAX

    def found(self, rows: Sequence[Any]) -> None:
        """Keep the ``(sha256, data)`` rows a lookup read along; pause when they go unread."""
        prefetched = self.prefetched
        for sha, blob in rows:
            prefetched.put(bytes(sha), bytes(blob))
        self._offered += len(rows)
        if self._offered >= _SAMPLE:
            if self._taken * 10 < self._offered:
                self._paused = _PAUSE
            self._offered = self._taken = 0

    def row(self, digest: bytes) -> PayloadRow | None:
        """The payload as an inline row if it is in memory, else None."""
        data = self.committed.get(digest)
        if data is not None:  # hashed on arrival by this process, then committed
            return PayloadRow(digest, len(data), "inline", data, verified=True)
        data = self.prefetched.get(digest)
        if data is not None:
            self._taken += 1
            return PayloadRow(digest, len(data), "inline", data)
        return None

    def page(self, rows: Sequence[Any], *, offset: int = 0) -> None:
        """Remember the inline-sized payloads a page of response rows names, in order
        (``offset``: columns before the response's own, such as SQLite's rowid)."""
        checksum_at, size_at = CHECKSUM_AT + offset, SIZE_AT + offset
        limit = PREFETCH_MAX
        if limit <= 0:
            return
        page: list[tuple[bytes, int]] = []
        seen: set[str] = set()  # identical bodies share a payload: each is read once
        ahead = self._ahead
        for row in rows:
            checksum, size = row[checksum_at], row[size_at]
            if checksum is not None and size <= limit and checksum not in seen:
                seen.add(checksum)
                digest = bytes.fromhex(checksum)
                ahead.put(digest, (page, len(page)))
                page.append((digest, size))

    def ahead_of(self, digest: bytes) -> list[bytes]:
        """The payloads to read with ``digest``: it and those after it on its page, up to
        ``AHEAD_BYTES``; empty if no page named it lately."""
        found = self._ahead.get(digest)
        if found is None:
            return []
        page, at = found
        wanted: list[bytes] = []
        total = 0
        for later, size in page[at:]:
            if wanted and total + size > AHEAD_BYTES:
                break
            wanted.append(later)
            total += size
        return wanted

    def keep(self, rows: Sequence[Any], digest: bytes, wanted: Sequence[bytes]) -> bytes | None:
        """Keep the ``(sha256, data)`` rows read ahead for ``wanted``; the bytes of ``digest``
        among them. A wanted payload that is not inline (a file, or gone) is not asked again."""
        data = None
        prefetched = self.prefetched
        found: set[bytes] = set()
        for sha, blob in rows:
            key, got = bytes(sha), bytes(blob)
            found.add(key)
            if key == digest:
                data = got
            prefetched.put(key, got)  # this one too: other responses may name the same bytes
        if len(found) < len(wanted):
            for key in wanted:
                if key not in found:
                    self._ahead.put(key, _NOT_INLINE)
        return data

    def forget(self) -> None:
        """Payload rows are being deleted: serve none of them from memory any more."""
        self.committed.clear()
        self.prefetched.clear()
        self._ahead.clear()
