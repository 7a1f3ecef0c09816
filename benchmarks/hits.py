"""Reading back what a store holds, opened afresh (a second run of a scrape): hits and a loop.

    python benchmarks/hits.py                  # ~1 minute: 3 shapes x 2 variants x 3 repeats
    python benchmarks/hits.py --repeat 5 --requests 20000
    python benchmarks/hits.py --postgres postgresql://user@host/db   # metadata in PostgreSQL

A first process records ``--requests`` 1 KiB responses from the loopback server; every trial then
opens that store in a fresh process (nothing in memory) and fetches them all again, each a hit,
with ``concurrency`` in flight, reading every payload:

- ``workers``: each of the workers fetches, then reads (``await s.read(await s.fetch(r))``);
- ``in order``: ``async for outcome in s.fetch_many(...)``, and the consumer reads each payload as
  it comes, one after the other (the usual shape of a loop over results);
- ``iter_responses``: no fetch, the store's documented loop ``async for r in
  store.iter_responses(): await store.read(r)``.

Each shape runs with the payload prefetch (the lookup that finds a response reads its inline
payload in the same hop to SQLite's thread; a read in a loop over ``iter_responses`` reads the
next payloads of the page with it) and without it (``PREFETCH_MAX = 0``: every read is a query of
its own), interleaved, and reports reads/s and client CPU per read. With ``--postgres URL`` the
metadata (and inline payloads) live in a fresh schema of that database, dropped at the end, and
the payload files in a temporary folder.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from _common import Trials, machine, pin, placement, run, trial_main
from _server import ServerProcess

SHAPES = ("workers", "in order", "iter_responses")
VARIANTS = ("prefetch", "no prefetch")


def _store(root: str, postgres: str | None, schema: str) -> Any:
    """The store of the run: a folder, or a PostgreSQL schema with the payload files in root."""
    import mxm_dataio_async as dio

    if postgres is None:
        return dio.Store(root)
    from mxm_dataio_async._store import LocalPayloads
    from mxm_dataio_async._store._postgres import PostgresMetadata

    metadata = PostgresMetadata(postgres, schema=schema)
    return dio.Store(metadata=metadata, payloads=LocalPayloads(Path(root) / "objects"))


async def _drop(postgres: str, schema: str) -> None:
    import asyncpg  # type: ignore[import-untyped]

    conn = await asyncpg.connect(postgres)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


async def record(
    root: str, port: int, n: int, concurrency: int, postgres: str | None, schema: str
) -> None:
    import mxm_dataio_async as dio

    async with _store(root, postgres, schema) as store, dio.Registry() as registry:
        registry.register("bench", dio.HttpAdapter(base_url=f"http://127.0.0.1:{port}"))
        async with dio.AsyncSession("bench", store=store, registry=registry) as s:
            requests = (s.request("b", endpoint=f"/bytes/1024/{i}") for i in range(n))
            async for outcome in s.fetch_many(requests, concurrency=concurrency):
                if not outcome.ok:
                    raise RuntimeError(f"recording failed: {outcome.error!r}")


async def trial(spec: dict[str, Any]) -> dict[str, Any]:
    import mxm_dataio_async as dio
    from mxm_dataio_async._store import _memory

    if spec["variant"] == "no prefetch":
        _memory.PREFETCH_MAX = 0
    n, concurrency = spec["n"], spec["concurrency"]
    opened = _store(spec["root"], spec["postgres"], spec["schema"])
    if spec["shape"] == "iter_responses":
        async with opened as store:
            read = 0
            wall0, cpu0 = time.perf_counter(), time.process_time()
            async for response in store.iter_responses():
                read += len(await store.read(response))
            wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        if read != n * 1024:
            raise RuntimeError(f"read {read} bytes, expected {n * 1024}")
        return {"per_s": n / wall, "cpu_us": cpu / n * 1e6}
    async with opened as store, dio.Registry() as registry:
        registry.register("bench", dio.HttpAdapter(base_url=f"http://127.0.0.1:{spec['port']}"))
        async with dio.AsyncSession("bench", store=store, registry=registry) as s:
            requests = [s.request("b", endpoint=f"/bytes/1024/{i}") for i in range(n)]
            read = 0
            wall0, cpu0 = time.perf_counter(), time.process_time()
            if spec["shape"] == "workers":
                pending = iter(requests)

                async def worker() -> int:
                    got = 0
                    for request in pending:
                        response = await s.fetch(request)
                        assert response.from_cache
                        got += len(await s.read(response))
                    return got

                read = sum(await asyncio.gather(*(worker() for _ in range(concurrency))))
            else:
                async for outcome in s.fetch_many(requests, concurrency=concurrency):
                    assert outcome.response is not None and outcome.response.from_cache
                    read += len(await s.read(outcome.response))
            wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    if read != n * 1024:
        raise RuntimeError(f"read {read} bytes, expected {n * 1024}")
    return {"per_s": n / wall, "cpu_us": cpu / n * 1e6}


def _trial(spec: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = run(trial(spec), spec["loop"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--postgres", help="a PostgreSQL URL: the metadata there, not in SQLite")
    parser.add_argument("--out", type=Path, help="default results/hits.json (hits-pg.json)")
    parser.add_argument("--trial", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trial:
        trial_main(_trial, args.trial)
        return

    runs: dict[str, list[dict[str, Any]]] = {f"{s} / {v}": [] for s in SHAPES for v in VARIANTS}
    out = args.out or Path(__file__).parent / "results" / (
        "hits-pg.json" if args.postgres else "hits.json"
    )
    root = tempfile.mkdtemp(prefix="mxm-hits-")
    schema = f"hits_{uuid.uuid4().hex[:12]}"
    try:
        with ServerProcess(lifetime=1800) as server:
            n, concurrency = args.requests, args.concurrency
            run(record(root, server.port, n, concurrency, args.postgres, schema), args.loop)
            pin(placement()[1])  # the driver calibrates (and its trials run) on the client's core
            trials = Trials(__file__)
            for r in range(args.repeat):
                for shape in SHAPES:  # interleaved: drift on a shared machine hits all alike
                    for variant in VARIANTS:
                        spec = {
                            "shape": shape,
                            "variant": variant,
                            "root": root,
                            "postgres": args.postgres,
                            "schema": schema,
                            "port": server.port,
                            "n": args.requests,
                            "concurrency": args.concurrency,
                            "loop": args.loop,
                        }
                        result, info = trials.run(spec, timeout=600)
                        runs[f"{shape} / {variant}"].append(result | info)
                        print(
                            f"run {r + 1}/{args.repeat}  {shape:14s} {variant:11s} "
                            f"{result['per_s']:9,.0f}/s {result['cpu_us']:6.1f} µs"
                        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if args.postgres:
            run(_drop(args.postgres, schema), args.loop)
    rows = []
    for shape in SHAPES:
        with_, without = (runs[f"{shape} / {v}"] for v in VARIANTS)
        row: dict[str, Any] = {"shape": shape}
        for name, got in (("prefetch", with_), ("no_prefetch", without)):
            row[f"{name}_per_s"] = statistics.median(x["per_s"] for x in got)
            row[f"{name}_cpu_us"] = statistics.median(x["cpu_us"] for x in got)
        row["speedup"] = row["prefetch_per_s"] / row["no_prefetch_per_s"]
        rows.append(row)
    print(f"\nmedians of {args.repeat}, {args.requests} reads, concurrency {args.concurrency}")
    print("| read | prefetch reads/s | µs/read | without reads/s | µs/read | ratio |")
    print("|---|--:|--:|--:|--:|--:|")
    for row in rows:
        print(
            f"| {row['shape']} | {row['prefetch_per_s']:,.0f} | {row['prefetch_cpu_us']:.0f} "
            f"| {row['no_prefetch_per_s']:,.0f} | {row['no_prefetch_cpu_us']:.0f} "
            f"| {row['speedup']:.2f}x |"
        )
    config = {k: v for k, v in vars(args).items() if k not in ("trial", "out", "postgres")}
    config["metadata"] = "postgresql" if args.postgres else "sqlite"
    config["reruns_on_a_slowed_core"] = trials.reruns
    report = {"machine": machine(), "config": config, "medians": rows, "runs": runs}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
