"""Recorded fetches/s through each storage backend, side by side in one run.

    . /tmp/mxm-services.env            # or: scripts/services /tmp/mxm-services.env &
    python benchmarks/backends.py      # ~3 minutes on 2 cores
    python benchmarks/backends.py --repeat 5 --requests 20000

Backends: ``sqlite-local`` (the embedded default) always; ``postgres-local`` (PostgreSQL metadata,
payload files) and ``postgres-s3`` (PostgreSQL + S3) when ``MXM_DATAIO_TEST_POSTGRES_URL`` and
``MXM_DATAIO_TEST_S3_URL`` name servers (``scripts/services`` starts both). Workloads, each a
fresh store: the mock adapter at 1 KiB (the library's own cost), HTTP 1 KiB from a loopback
aiohttp server, and HTTP 1 MiB (above the inline threshold: the payload store's path). Every
fetch is a recorded miss (default cache mode, durable before it returns). Trials are interleaved
across backends (sqlite, postgres, s3, sqlite, ...), medians reported with the ratio to SQLite.
Results go to ``benchmarks/results/backends.json``. Measurements only: nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from _common import machine
from _server import ServerProcess, body, distinct

import mxm_dataio_async as dio

RESULTS = Path(__file__).parent / "results"
BACKENDS = ("sqlite-local", "postgres-local", "postgres-s3")


def available() -> list[str]:
    pg, s3 = (
        os.environ.get("MXM_DATAIO_TEST_POSTGRES_URL"),
        os.environ.get("MXM_DATAIO_TEST_S3_URL"),
    )
    return [b for b in BACKENDS if (b == "sqlite-local") or (pg and (b != "postgres-s3" or s3))]


@asynccontextmanager
async def open_store(backend: str, tmp: Path) -> AsyncIterator[dio.Store]:
    """A fresh, empty store of ``backend`` (a new PostgreSQL schema, a new S3 prefix)."""
    if backend == "sqlite-local":
        async with dio.Store(tmp / "store") as store:
            yield store
        return
    import asyncpg  # type: ignore[import-untyped]  # the postgres extra; no type stubs

    url = os.environ["MXM_DATAIO_TEST_POSTGRES_URL"]
    schema = f"bench_{secrets.token_hex(4)}"
    payloads: str | Path = tmp / "objects"
    if backend == "postgres-s3":
        payloads = f"{os.environ['MXM_DATAIO_TEST_S3_URL'].rstrip('/')}/bench-{schema}"
    sep = "&" if "?" in url else "?"
    try:
        async with dio.Store(f"{url}{sep}schema={schema}", payloads=payloads) as store:
            yield store
    finally:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        finally:
            await conn.close()


async def one_trial(backend: str, workload: str, n: int, concurrency: int, port: int) -> float:
    """Recorded fetches per second of one workload into a fresh store of ``backend``."""
    with tempfile.TemporaryDirectory() as tmp:
        async with open_store(backend, Path(tmp)) as store, dio.Registry() as registry:
            if workload == "mock 1 KiB":
                payload = body(1024)
                registry.register("b", dio.MockAdapter(lambda r: distinct(payload, str(r.params))))

                def make(s: dio.AsyncSession, i: int) -> dio.Request:
                    return s.request("k", params={"i": i})

            else:
                size = 1024 if workload == "http 1 KiB" else 1 << 20
                registry.register("b", dio.HttpAdapter(base_url=f"http://127.0.0.1:{port}"))
                tag = secrets.token_hex(4)

                def make(s: dio.AsyncSession, i: int) -> dio.Request:
                    return s.request("b", endpoint=f"/bytes/{size}/{tag}{i}")

            async with dio.AsyncSession("b", store=store, registry=registry) as s:
                started = time.perf_counter()
                ok = 0
                requests = (make(s, i) for i in range(n))
                async for outcome in s.fetch_many(requests, concurrency=concurrency):
                    if not outcome.ok:
                        raise RuntimeError(f"{backend} {workload}: {outcome.error!r}")
                    ok += 1
                return ok / (time.perf_counter() - started)


async def lookups(backend: str, n: int) -> float:
    """Batched latest-response lookups per second (every hash stored, 64 in flight)."""
    with tempfile.TemporaryDirectory() as tmp:
        async with open_store(backend, Path(tmp)) as store, dio.Registry() as registry:
            registry.register("b", dio.MockAdapter(lambda r: b"x" * 100))
            async with dio.AsyncSession("b", store=store, registry=registry) as s:
                hashes = []
                requests = [s.request("k", params={"i": i}) for i in range(n)]
                async for outcome in s.fetch_many(requests, concurrency=64):
                    assert outcome.response is not None
                    hashes.append(outcome.response.request_hash)
            queue = iter(hashes)

            async def worker() -> None:
                for h in queue:
                    assert await store.metadata.latest_response(h) is not None

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(64)))
            return n / (time.perf_counter() - started)


Trial = Callable[[], Awaitable[float]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--requests", type=int, default=10_000, help="per 1 KiB trial")
    parser.add_argument("--requests-large", type=int, default=300, help="per 1 MiB trial")
    parser.add_argument("--concurrency", type=int, default=64)
    opts = parser.parse_args()
    backends = available()
    workloads = ("mock 1 KiB", "http 1 KiB", "http 1 MiB", "lookups")
    figures: dict[tuple[str, str], list[float]] = {}
    with ServerProcess(lifetime=3600) as server:
        for round_ in range(opts.repeat):
            for workload in workloads:
                for backend in backends:
                    if workload == "lookups":
                        value = asyncio.run(lookups(backend, opts.requests))
                    else:
                        n = opts.requests_large if workload == "http 1 MiB" else opts.requests
                        value = asyncio.run(
                            one_trial(backend, workload, n, opts.concurrency, server.port)
                        )
                    figures.setdefault((workload, backend), []).append(value)
                    print(f"round {round_ + 1}: {workload:<11} {backend:<15} {value:>9,.0f}/s")
    rows: list[dict[str, Any]] = []
    print("\n| workload | backend | per s | vs sqlite |\n|---|---|--:|--:|")
    for workload in workloads:
        base = statistics.median(figures[(workload, "sqlite-local")])
        for backend in backends:
            runs = figures[(workload, backend)]
            med = statistics.median(runs)
            rows.append({"workload": workload, "backend": backend, "per_s": round(med, 1),
                         "over_sqlite": round(med / base, 3), "runs": runs})  # fmt: skip
            mb = med * (1 << 20) / 1e6  # 1 MiB bodies: fetches/s -> MB/s
            extra = f" ({mb:.0f} MB/s)" if workload == "http 1 MiB" else ""
            print(f"| {workload} | {backend} | {med:,.0f}{extra} | {med / base:.2f} |")
    print(f"(medians of {opts.repeat}; recorded fetches/s; lookups are hashes/s)")
    RESULTS.mkdir(exist_ok=True)
    report = {"machine": machine(), "options": vars(opts), "rows": rows}
    (RESULTS / "backends.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
