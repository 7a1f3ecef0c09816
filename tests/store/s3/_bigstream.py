"""Stream a large generated body through ``S3Payloads.put_stream`` and read it back; report RSS.

Run in a subprocess by the memory-bound test (and the S3 benchmark), so the measurement is this
process's own: ``python _bigstream.py <s3-url> <MiB>`` prints one JSON line with
``baseline_kib`` (peak RSS after a warm-up stream through every code path), ``peak_kib`` (after
the big ``put_stream``), ``read_peak_kib`` (after reading it back with ``iter``), the stored
digest and size, the expected sha256, and the seconds each took. The endpoint and credentials
come from the AWS_* variables.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import resource
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

from mxm_dataio_async._store._s3 import S3Payloads

BLOCK = bytes(range(256)) * 256  # 64 KiB, as tests/adapters/_bigbody.py
MiB = 1 << 20


async def body(size: int) -> AsyncIterator[bytes]:
    left = size
    while left > 0:
        piece = BLOCK[: min(left, len(BLOCK))]
        left -= len(piece)
        yield piece


def expected_sha256(size: int) -> str:
    h = hashlib.sha256()
    left = size
    while left > 0:
        piece = BLOCK[: min(left, len(BLOCK))]
        h.update(piece)
        left -= len(piece)
    return h.hexdigest()


def peak_kib() -> int:
    """This process's peak RSS in KiB: VmHWM, the high-water mark of its own address space.
    (``ru_maxrss`` would not do: Linux keeps it across execve, so a child of a large parent,
    pytest or the benchmark, starts with the parent's peak and its own growth is hidden.)"""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


async def run(url: str, size: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    payloads = S3Payloads(url)
    await payloads.open()
    try:
        # Warm-up: every code path once (the multipart path, just over one part, and a ranged
        # read), but not the buffers of many parts in flight: those count as growth.
        warm = payloads.part_size + MiB
        digest, n = await payloads.put_stream(body(warm))
        async for _ in payloads.iter(digest, n):
            pass
        out["baseline_kib"] = peak_kib()

        started = time.perf_counter()
        digest, n = await payloads.put_stream(body(size))
        out["put_seconds"] = time.perf_counter() - started
        out["peak_kib"] = peak_kib()
        out["sha256"], out["size"] = digest.hex(), n

        started = time.perf_counter()
        h = hashlib.sha256()
        async for chunk in payloads.iter(digest, n):
            h.update(chunk)
        out["read_seconds"] = time.perf_counter() - started
        out["read_peak_kib"] = peak_kib()
        out["read_sha256"] = h.hexdigest()
        out["leftovers"] = [o.location async for o in payloads.leftovers(0)]
    finally:
        await payloads.aclose()
    out["expected_sha256"] = expected_sha256(size)
    return out


def main() -> None:
    url, mib = sys.argv[1], int(sys.argv[2])
    print(json.dumps(asyncio.run(run(url, mib * MiB))))


if __name__ == "__main__":
    main()
