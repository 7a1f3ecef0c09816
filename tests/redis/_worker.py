"""One worker process of the multi-process Redis tests (and ``benchmarks/redis_rate.py``).

    python -m tests.redis._worker rate URL PREFIX RATE TASKS SECONDS
    python -m tests.redis._worker fetch URL PREFIX BASE STORE WORKER COUNT RATE
    python -m tests.redis._worker coalesce URL PREFIX BASE STORE ENDPOINT FLIGHT_TTL

Each prints ``ready`` once it is connected, waits for one line on stdin (``rate``: the wall-clock
time to start at; the others start at once), runs, and prints one line of JSON:

- ``rate``: TASKS tasks take slots of one ``RedisRateGate`` (source ``shared``, ``RateLimit(RATE)``)
  until SECONDS after the start; ``{"grants": [wall-clock time of each grant]}``.
- ``fetch``: an ``AsyncSession`` on a ``Registry(redis=...)`` fetches ``BASE/item/WORKER/n`` for
  n < COUNT (rate RATE/s for every worker together, 4 at once per worker, retries honouring
  Retry-After); ``{"ok": n, "failed": [...]}``.
- ``coalesce``: one fetch of ``BASE + ENDPOINT`` into the store STORE (shared with the other
  workers); ``{"own": request id, "got": the response's request id, "id", "checksum"}``.
"""

from __future__ import annotations

import json
import sys
import time

import anyio
import anyio.to_thread

import mxm_dataio_async as dio
from mxm_dataio_async.redis import RedisCoordination, RedisRateGate


async def started() -> str:
    print("ready", flush=True)
    line: str = await anyio.to_thread.run_sync(sys.stdin.readline)
    return line.strip()


async def rate(url: str, prefix: str, per_second: float, tasks: int, seconds: float) -> object:
    async with RedisCoordination(url, prefix=prefix) as redis:
        gate = RedisRateGate(redis, "shared", dio.RateLimit(per_second))
        await redis.client.ping()
        start = float(await started())
        await anyio.sleep(max(0.0, start - time.time()))
        stop = start + seconds
        grants: list[float] = []

        async def take() -> None:
            while time.time() < stop:
                async with gate.slot():
                    grants.append(time.time())

        async with anyio.create_task_group() as tg:
            for _ in range(tasks):
                tg.start_soon(take)
    return {"grants": grants}


async def fetch(
    url: str, prefix: str, base: str, store: str, worker: str, count: int, per_second: float
) -> object:
    registry = dio.Registry(redis=RedisCoordination(url, prefix=prefix))
    registry.register(
        "api",
        dio.HttpAdapter(base_url=base),
        rate_limit=dio.RateLimit(per_second),
        max_concurrency=4,
        retry=dio.RetryPolicy(max_attempts=3, base_delay=0.05, jitter=0.0),
    )
    async with (
        dio.Store(store) as st,
        registry,
        dio.AsyncSession("api", store=st, registry=registry, cache_mode="bypass") as s,
    ):
        await started()
        requests = [s.request("item", endpoint=f"/item/{worker}/{n}") for n in range(count)]
        ok, failed = 0, []
        async for outcome in s.fetch_many(requests, concurrency=8):
            if outcome.ok:
                ok += 1
            else:
                failed.append(repr(outcome.error))
    return {"ok": ok, "failed": failed}


async def coalesce(
    url: str, prefix: str, base: str, store: str, endpoint: str, flight_ttl: float
) -> object:
    registry = dio.Registry(redis=RedisCoordination(url, prefix=prefix, flight_ttl=flight_ttl))
    registry.register("api", dio.HttpAdapter(base_url=base))
    async with (
        dio.Store(store) as st,
        registry,
        dio.AsyncSession("api", store=st, registry=registry) as s,
    ):
        request = s.request("item", endpoint=endpoint)
        await started()
        response = await s.fetch(request)
    return {
        "own": request.id,
        "got": response.request_id,
        "id": response.id,
        "checksum": response.checksum,
    }


def main(argv: list[str]) -> None:
    mode, url, prefix, *rest = argv
    result: object
    if mode == "rate":
        result = anyio.run(rate, url, prefix, float(rest[0]), int(rest[1]), float(rest[2]))
    elif mode == "fetch":
        base, store, worker, count, per_second = rest
        result = anyio.run(fetch, url, prefix, base, store, worker, int(count), float(per_second))
    elif mode == "coalesce":
        base, store, endpoint, ttl = rest
        result = anyio.run(coalesce, url, prefix, base, store, endpoint, float(ttl))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
