"""Fetch a large generated body through HttpAdapter (alone, or the whole pipeline); report peak RSS.

Run in a subprocess by the memory-bound tests, so the measurement is this process's own:
``python _bigbody.py {adapter|pipeline} <MiB> <store-root>`` prints one JSON line with
``baseline_kib`` (peak RSS after a warm-up fetch), ``peak_kib`` (after the big one), the body's
size and sha256, and the expected sha256.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
import time
from typing import Any

from aiohttp import web

from mxm_dataio_async._request import build_request
from mxm_dataio_async.adapters.http import HttpAdapter

BLOCK = bytes(range(256)) * 256  # 64 KiB, the same generator as tests/adapters/conftest.py
MiB = 1 << 20


async def big(request: web.Request) -> web.StreamResponse:
    size = int(request.query["size"])
    resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    resp.content_length = size
    await resp.prepare(request)
    left = size
    while left > 0:
        piece = BLOCK[: min(left, len(BLOCK))]
        await resp.write(piece)
        left -= len(piece)
    await resp.write_eof()
    return resp


def expected_sha256(size: int) -> str:
    h = hashlib.sha256()
    left = size
    while left > 0:
        piece = BLOCK[: min(left, len(BLOCK))]
        h.update(piece)
        left -= len(piece)
    return h.hexdigest()


def peak_kib() -> int:
    """This process's own peak RSS (VmHWM). Not ``ru_maxrss``: Linux carries that across
    ``execve``, so a child of a large parent (pytest) would report the parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])  # kB
    raise RuntimeError("no VmHWM in /proc/self/status")


async def run(mode: str, size: int, root: str) -> dict[str, Any]:
    app = web.Application()
    app.router.add_get("/big", big)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    out: dict[str, Any] = {}
    try:
        adapter = HttpAdapter(url)
        if mode == "adapter":
            async with adapter:

                async def fetch(n: int) -> tuple[int, str]:
                    request = build_request(
                        session_id="t", source="big", kind="k", endpoint="/big", params={"size": n}
                    )
                    result = await adapter.fetch(request)
                    assert not isinstance(result.data, bytes)
                    h = hashlib.sha256()
                    got = 0
                    async for chunk in result.data:
                        h.update(chunk)
                        got += len(chunk)
                    return got, h.hexdigest()

                await fetch(4 * MiB)  # warm-up: every code path once
                out["baseline_kib"] = peak_kib()
                started = time.perf_counter()
                out["size"], out["sha256"] = await fetch(size)
        else:
            from mxm_dataio_async._registry import Registry
            from mxm_dataio_async._session import AsyncSession
            from mxm_dataio_async._store import Store

            async with Store(root) as store, Registry() as registry:
                registry.register("big", adapter)
                async with AsyncSession(
                    "big", store=store, registry=registry, cache_mode="bypass"
                ) as s:
                    warm = await s.fetch(
                        s.request("blob", endpoint="/big", params={"size": 4 * MiB})
                    )
                    assert warm.size_bytes == 4 * MiB
                    out["baseline_kib"] = peak_kib()
                    started = time.perf_counter()
                    resp = await s.fetch(s.request("blob", endpoint="/big", params={"size": size}))
                    out["size"], out["sha256"] = resp.size_bytes, resp.checksum
        out["seconds"] = time.perf_counter() - started
        out["peak_kib"] = peak_kib()
    finally:
        await runner.cleanup()
    out["expected_sha256"] = expected_sha256(size)
    return out


def main() -> None:
    mode, mib, root = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    if mode not in ("adapter", "pipeline"):
        raise SystemExit(f"mode must be adapter or pipeline, not {mode!r}")
    print(json.dumps(asyncio.run(run(mode, mib * MiB, root))))


if __name__ == "__main__":
    main()
