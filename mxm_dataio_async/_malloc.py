"""glibc's malloc and the event loop's socket reads.

asyncio's selector transports read with ``sock.recv(262144)``: every read allocates a 256 KiB bytes
object and shrinks it to what arrived. glibc serves allocations above its ``M_MMAP_THRESHOLD``
(128 KiB at start) with a fresh ``mmap``, and the shrink keeps such a chunk mapped; so until the
process happens to free a mapped chunk of 256 KiB or more (which raises the threshold to that size,
glibc's "dynamic mmap threshold", see mallopt(3)), each read costs ``mmap`` + ``mremap`` +
``munmap`` and a page fault: 10,000 of each for 10,000 1 KiB responses, 13-23 µs of client CPU a
request on this machine (side by side, HttpAdapter at 64 in flight: 84-92 µs a request against
69-71 µs). Whether a process is in that state depends on what it freed before, so the same
program was fast in one run and slow in the next.

:func:`settle_malloc` allocates and frees one 1 MiB buffer, once per process: the threshold
then stands at 1 MiB and the trim threshold at 2 MiB (the heap may keep up to that much free
memory at its top), and the reads come from the heap. The same happens in any process that once
used a buffer of that size; elsewhere than glibc it is one short-lived allocation, nothing more.
``AsyncSession`` and ``HttpAdapter`` call it when they start.
"""

from __future__ import annotations

from typing import Final

__all__ = ["settle_malloc"]

#: Above asyncio's 256 KiB reads (and aiohttp's 64 KiB read buffer), below glibc's 32 MiB cap.
SETTLE_BYTES: Final = 1 << 20

_settled = False


def settle_malloc() -> None:
    """Let glibc's malloc serve socket-read buffers from its heap (once per process)."""
    global _settled
    if _settled:
        return
    _settled = True
    buffer = bytearray(SETTLE_BYTES)  # mapped (above the 128 KiB threshold), then unmapped:
    del buffer  # freeing it raises the threshold to its size
