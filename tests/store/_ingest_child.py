"""A bulk ingestion run in its own process, for crash and multi-process tests.

    python -m tests.store._ingest_child ROOT START STOP [--shared K]

Fetches requests ``i`` in [START, STOP) (plus, with --shared, the K requests shared by every
process) through a MockAdapter whose bodies are a deterministic function of ``i``; every seventh
body is large enough for the file tier. Prints ``ready`` once the session is open and
``done calls=N`` at the end, N being how many adapter calls this run made.
"""

from __future__ import annotations

import hashlib
import sys

import anyio

import mxm_dataio_async as dio

INLINE_THRESHOLD = 512


def body(i: int) -> bytes:
    seed = hashlib.sha256(str(i).encode()).digest()
    return seed * (80 if i % 7 == 0 else 3)  # 2,560 bytes (file tier) or 96 bytes (inline)


async def main(root: str, start: int, stop: int, shared: int) -> int:
    calls = 0

    def handler(req: dio.Request) -> bytes:
        nonlocal calls
        calls += 1
        i = req.params["i"]
        assert isinstance(i, int)
        return body(i)

    registry = dio.Registry()
    registry.register("ingest", dio.MockAdapter(handler))
    wanted = list(range(start, stop)) + [-(k + 1) for k in range(shared)]
    async with dio.Store(root, inline_threshold=INLINE_THRESHOLD) as store:
        async with dio.AsyncSession("ingest", store=store, registry=registry) as s:
            print("ready", flush=True)
            reqs = (s.request("item", params={"i": i}) for i in wanted)
            async for outcome in s.fetch_many(reqs, concurrency=32):
                if not outcome.ok:
                    print(f"error {outcome.error!r}", flush=True)
                    return 2
    print(f"done calls={calls}", flush=True)
    return 0


if __name__ == "__main__":
    args = sys.argv[1:]
    shared = 0
    if "--shared" in args:
        k = args.index("--shared")
        shared = int(args[k + 1])
        del args[k : k + 2]
    sys.exit(anyio.run(main, args[0], int(args[1]), int(args[2]), shared))
