"""PostgreSQL metadata against SQLite, side by side in one run: recorded fetches through
``AsyncSession``, raw ``record()`` and batched cache lookups.

Measurements, not tests. Three kinds of trial, each for both backends, interleaved (sqlite,
postgres, sqlite, ... for every repeat), each trial in a fresh child process:

- ``session``: ``AsyncSession`` + ``MockAdapter`` answering 1 KiB of its own to each request,
  ``fetch_many(concurrency=64)`` of distinct requests into a fresh store (``miss``: every fetch
  recorded: request + response + 1 KiB inline payload), then the same requests in a new session
  (``hit``: served from the store).
  Payloads above the inline threshold would go to ``LocalPayloads`` in both cases; 1 KiB is inline.
- ``record``: ``record()`` of prebuilt recordings (request + response + 1 KiB inline payload), 256
  in flight: what the metadata store itself commits per second (PostgreSQL: ``--pool`` connections).
- ``lookup``: ``latest_response()`` of random stored hashes, 256 in flight: batched lookups/s.

Prints every trial as it goes, then the medians of ``--repeat`` runs and postgres/sqlite ratios.

    . /tmp/mxm-services.env   # or any server: --url postgresql://user:pw@host/db
    python benchmarks/backends_pg.py               # ~1-2 minutes on 2 cores
    python benchmarks/backends_pg.py --quick       # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from _common import machine, run

BACKENDS = ("sqlite", "postgres")
KINDS = ("session", "record", "lookup")
PAYLOAD = 1024


@asynccontextmanager
async def metadata_store(backend: str, url: str, pool: int, tmp: str) -> AsyncIterator[Any]:
    """An open metadata store of ``backend`` (PostgreSQL: a fresh schema, dropped after)."""
    if backend == "sqlite":
        from mxm_dataio_async._store import SqliteMetadata

        m: Any = SqliteMetadata(Path(tmp) / "meta")
        await m.open()
        try:
            yield m
        finally:
            await m.aclose()
        return
    import asyncpg  # type: ignore[import-untyped]

    from mxm_dataio_async._store._postgres import PostgresMetadata

    schema = f"bench_{uuid.uuid4().hex[:12]}"
    m = PostgresMetadata(url, schema=schema, pool_size=pool)
    await m.open()
    try:
        yield m
    finally:
        await m.aclose()
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()


def body(i: int) -> bytes:
    return i.to_bytes(8, "big") * (PAYLOAD // 8)


def recordings(n: int) -> list[Any]:
    """``n`` recordings of distinct requests: a request, an OK response, a 1 KiB inline payload."""
    from mxm_dataio_async._models import CacheMode, Response, ResponseStatus, new_id
    from mxm_dataio_async._request import build_request
    from mxm_dataio_async._store._protocols import Recording, StagedPayload

    session_id = str(uuid.uuid4())
    now = datetime.now(UTC)
    out = []
    for i in range(n):
        req = build_request(session_id=session_id, source="bench", kind="k", params={"i": i})
        data = body(i)
        staged = StagedPayload(hashlib.sha256(data).digest(), len(data), "inline", data)
        resp = Response(
            new_id(),
            req.id,
            req.hash,
            session_id,
            ResponseStatus.OK,
            staged.checksum,
            len(data),
            now,
            CacheMode.DEFAULT,
            None,
            None,
            None,
        )
        out.append(Recording(req, [resp], [staged]))
    return out


async def in_flight(n: int, concurrency: int, one: Callable[[int], Any]) -> float:
    """Run ``one(0..n-1)`` with ``concurrency`` in flight; returns the wall seconds."""
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < n:
            i = next_index
            next_index += 1
            await one(i)

    t0 = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        for _ in range(min(concurrency, n)):
            tg.create_task(worker())
    return time.perf_counter() - t0


async def trial_session(backend: str, url: str, pool: int, n: int) -> dict[str, float]:
    import mxm_dataio_async as dio
    from mxm_dataio_async._store import LocalPayloads, Store

    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        async with metadata_store(backend, url, pool, tmp) as m:
            store = Store(metadata=m, payloads=LocalPayloads(Path(tmp) / "objects"))
            async with store, dio.Registry() as registry:
                # a distinct body per request (its identity, 16 times): a payload row each
                registry.register("mock", dio.MockAdapter(lambda r: r.hash.encode() * 16))
                for phase in ("miss", "hit"):
                    async with dio.AsyncSession("mock", store=store, registry=registry) as s:
                        ok = 0
                        wall0, cpu0 = time.perf_counter(), time.process_time()
                        requests = (s.request("k", params={"i": i}) for i in range(n))
                        async for outcome in s.fetch_many(requests, concurrency=64):
                            if not outcome.ok:
                                raise RuntimeError(f"fetch failed: {outcome.error!r}")
                            ok += 1
                        seconds = time.perf_counter() - wall0
                        cpu = time.process_time() - cpu0
                    out[f"{phase}_per_s"] = ok / seconds
                    out[f"{phase}_cpu_us"] = cpu / ok * 1e6
    return out


async def trial_record(backend: str, url: str, pool: int, n: int) -> dict[str, float]:
    recs = recordings(n)
    with tempfile.TemporaryDirectory() as tmp:
        async with metadata_store(backend, url, pool, tmp) as m:
            cpu0 = time.process_time()
            seconds = await in_flight(n, 256, lambda i: m.record(recs[i]))
            cpu = time.process_time() - cpu0
            assert await m.count_rows("responses") == n
    return {"per_s": n / seconds, "cpu_us": cpu / n * 1e6}


async def trial_lookup(backend: str, url: str, pool: int, n: int) -> dict[str, float]:
    recs = recordings(n)
    hashes = [r.request.hash for r in recs]
    random.Random(7).shuffle(hashes)
    with tempfile.TemporaryDirectory() as tmp:
        async with metadata_store(backend, url, pool, tmp) as m:
            await in_flight(n, 256, lambda i: m.record(recs[i]))
            found = 0

            async def one(i: int) -> None:
                nonlocal found
                response = await m.latest_response(hashes[i])
                found += response is not None

            cpu0 = time.process_time()
            seconds = await in_flight(n, 256, one)
            cpu = time.process_time() - cpu0
            assert found == n, found
    return {"per_s": n / seconds, "cpu_us": cpu / n * 1e6}


TRIALS = {"session": trial_session, "record": trial_record, "lookup": trial_lookup}


def _trial(spec: dict[str, Any]) -> dict[str, float]:
    fn = TRIALS[spec["kind"]]
    return run(fn(spec["backend"], spec["url"], spec["pool"], spec["n"]), spec["loop"])


def _spawn(spec: dict[str, Any]) -> dict[str, float]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--trial", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"trial {spec} failed:\n{proc.stderr[-4000:]}")
    out: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--url", default=os.environ.get("MXM_DATAIO_TEST_POSTGRES_URL"))
    parser.add_argument("--repeat", type=int, default=3, help="interleaved repeats (medians)")
    parser.add_argument("--pool", type=int, default=4, help="PostgreSQL connections")
    parser.add_argument("--fetches", type=int, default=20_000, help="per session phase")
    parser.add_argument("--rows", type=int, default=40_000, help="recordings per record trial")
    parser.add_argument("--lookups", type=int, default=50_000, help="hashes per lookup trial")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--kind", action="append", choices=KINDS, help="repeatable; default all")
    parser.add_argument("--quick", action="store_true", help="smoke run: small, 1 repeat")
    parser.add_argument("--out", type=Path, help="write every run and the medians as JSON")
    parser.add_argument("--trial", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trial:
        print(json.dumps(_trial(json.loads(args.trial))))
        return
    if not args.url:
        parser.error("no PostgreSQL: pass --url or set MXM_DATAIO_TEST_POSTGRES_URL")
    if args.quick:
        args.repeat, args.fetches, args.rows, args.lookups = 1, 2000, 4000, 5000
    sizes = {"session": args.fetches, "record": args.rows, "lookup": args.lookups}
    kinds = args.kind or list(KINDS)
    about = machine()
    print(
        f"{about['cores']} cores, {about['cpu_model']}, Python {about['python']}, "
        f"loop {args.loop}, PostgreSQL pool {args.pool}"
    )
    runs: list[dict[str, Any]] = []
    started = time.perf_counter()
    for rep in range(args.repeat):
        for kind in kinds:
            for backend in BACKENDS:
                spec = {
                    "kind": kind,
                    "backend": backend,
                    "url": args.url,
                    "pool": args.pool,
                    "n": sizes[kind],
                    "loop": args.loop,
                }
                figures = _spawn(spec)
                runs.append({"repeat": rep, "kind": kind, "backend": backend} | figures)
                shown = ", ".join(f"{k} {v:,.0f}" for k, v in figures.items())
                print(f"  run {rep + 1}: {kind:8} {backend:9} {shown}", flush=True)
    medians: dict[str, dict[str, dict[str, float]]] = {}
    for kind in kinds:
        for backend in BACKENDS:
            mine = [r for r in runs if r["kind"] == kind and r["backend"] == backend]
            keys = [k for k in mine[0] if k not in ("repeat", "kind", "backend")]
            medians.setdefault(kind, {})[backend] = {
                k: statistics.median(r[k] for r in mine) for k in keys
            }
    print(f"\nmedians of {args.repeat} ({time.perf_counter() - started:.0f} s):")
    print(f"  {'measure':28} {'sqlite':>10} {'postgres':>10} {'pg/sqlite':>10}")
    labels = {
        ("session", "miss_per_s"): "recorded fetches/s (session)",
        ("session", "hit_per_s"): "cache hits/s (session)",
        ("record", "per_s"): "record() rows/s",
        ("lookup", "per_s"): "batched lookups hashes/s",
        ("session", "miss_cpu_us"): "client CPU us/recorded fetch",
        ("record", "cpu_us"): "client CPU us/record()",
        ("lookup", "cpu_us"): "client CPU us/lookup",
    }
    for (kind, key), label in labels.items():
        if kind not in medians:
            continue
        lite, pg = medians[kind]["sqlite"][key], medians[kind]["postgres"][key]
        print(f"  {label:28} {lite:10,.0f} {pg:10,.0f} {pg / lite:10.2f}")
    if args.out:
        args.out.write_text(
            json.dumps(
                {"machine": about, "config": vars(args) | {"out": str(args.out)}}
                | {"medians": medians, "runs": runs},
                indent=2,
                default=str,
            )
        )


if __name__ == "__main__":
    main()
