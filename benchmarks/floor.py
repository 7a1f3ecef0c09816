"""The floor under a recorded miss: what SQLite itself costs, and what writing new bytes costs here.

    python benchmarks/floor.py                  # ~1 minute
    python benchmarks/floor.py --requests 5000 --repeat 1

No Python of ours is timed here, only the work any durable recorder with this schema has to do:

- **SQLite's own work per miss.** The mock pipeline records ``--requests`` fetches (a distinct
  body each) while the writer's batches are captured as they are committed; the same batches are
  then replayed, one thread, no event loop, into a fresh store's database with the writer's
  settings (WAL, ``synchronous=NORMAL``, no automatic checkpoint) and a PASSIVE checkpoint from a
  second connection every ``--checkpoint-every`` batches, finished by the writer once the log
  passes ``RESTART_PAGES``, as ``_store/_sqlite/_checkpoint.py`` does. CPU per miss (user + system)
  for the transactions and for the checkpoints, and the log frames each miss writes.
- **Writing new bytes on this machine.** 1 MiB written into new files against the same MiB
  written over a file already in the page cache: on this VM (a balloon device returns freed
  memory to the host) each page the kernel takes afresh costs far more than the copy.
- **The floor.** raw aiohttp's CPU per request (``results/http.json``, when present) plus the
  SQLite work plus sha256 of the body: the best ratio to raw a recorder with this schema could
  reach on one client core if none of its own Python cost anything.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import resource
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import machine, pin, placement

HERE = Path(__file__).parent


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def capture(requests: int, size: int) -> list[list[tuple[str, list[tuple[Any, ...]]]]]:
    """The writer's batches (statement, rows) for ``requests`` mock misses of ``size`` bytes."""
    import mxm_dataio_async as dio
    from mxm_dataio_async._store._sqlite import _writer

    captured: list[list[tuple[str, list[tuple[Any, ...]]]]] = []
    commit = _writer._transaction_sync

    def capturing(
        conn: sqlite3.Connection, batches: list[tuple[str, list[Any]]], finish: bool = False
    ) -> None:
        captured.append([(sql, [tuple(row) for row in rows]) for sql, rows in batches])
        commit(conn, batches, finish)

    async def record(root: str) -> None:
        body = bytes(range(256)) * (size // 256)
        async with dio.Store(root) as store, dio.Registry() as registry:
            # A distinct body per request, as the benchmark server's: a payload row each.
            registry.register("m", dio.MockAdapter(lambda r: repr(r.params).encode() + body))
            async with dio.AsyncSession("m", store=store, registry=registry) as s:
                wanted = (s.request("k", params={"i": i}) for i in range(requests))
                async for outcome in s.fetch_many(wanted, concurrency=64):
                    if not outcome.ok:
                        raise RuntimeError(f"mock fetch failed: {outcome.error!r}")

    _writer._transaction_sync = capturing
    try:
        with tempfile.TemporaryDirectory() as root:
            asyncio.run(record(root))
    finally:
        _writer._transaction_sync = commit
    return captured


def replay(batches: list[Any], misses: int, every: int | None) -> dict[str, float]:
    """CPU per miss of committing ``batches`` and checkpointing them, as the store does
    (``every=None``: never, so that the log ends up holding every frame written)."""
    import mxm_dataio_async as dio
    from mxm_dataio_async._store._sqlite._checkpoint import RESTART_PAGES
    from mxm_dataio_async._store._sqlite._schema import DB_NAME
    from mxm_dataio_async._store._sqlite._writer import _transaction_sync

    async def create(root: str) -> None:
        async with dio.Store(root):
            pass

    with tempfile.TemporaryDirectory() as root:
        asyncio.run(create(root))
        db = os.path.join(root, DB_NAME)
        writer = sqlite3.connect(db, isolation_level=None)
        checkpointer = sqlite3.connect(db, isolation_level=None)
        for conn in (writer, checkpointer):
            conn.execute("PRAGMA synchronous=NORMAL")
        writer.execute("PRAGMA wal_autocheckpoint=0")
        tx = ckpt = 0.0
        finish = False
        for i, batch in enumerate(batches):
            c0 = _cpu()
            _transaction_sync(writer, batch, finish)
            tx += _cpu() - c0
            finish = False
            if every is not None and i % every == every - 1:
                c0 = _cpu()
                _, logged, _ = checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                ckpt += _cpu() - c0
                finish = logged > RESTART_PAGES
        frames = checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1]
        writer.close()
        checkpointer.close()
    return {
        "transactions_us": tx / misses * 1e6,
        "checkpoints_us": ckpt / misses * 1e6,
        "sqlite_us": (tx + ckpt) / misses * 1e6,
        "log_frames": frames / misses,  # meaningful for every=None only
    }


def page_costs(mib: int) -> dict[str, float]:
    """CPU per MiB written into new files, and over one file already in the page cache."""
    data = os.urandom(1 << 20)
    with tempfile.TemporaryDirectory() as root:
        c0 = _cpu()
        for i in range(mib):
            with open(os.path.join(root, f"new-{i}"), "wb") as f:
                f.write(data)
        new = (_cpu() - c0) / mib
        fd = os.open(os.path.join(root, "same"), os.O_WRONLY | os.O_CREAT)
        try:
            os.pwrite(fd, data, 0)
            c0 = _cpu()
            for _ in range(mib):
                os.pwrite(fd, data, 0)
            same = (_cpu() - c0) / mib
        finally:
            os.close(fd)
    return {"new_pages_us_per_mib": new * 1e6, "cached_pages_us_per_mib": same * 1e6}


def sha256_us(size: int) -> float:
    data = os.urandom(size)
    runs = max(10, 2_000_000 // size)
    t0 = time.perf_counter()
    for _ in range(runs):
        hashlib.sha256(data).digest()
    return (time.perf_counter() - t0) / runs * 1e6


def raw_cpu_us(size: int) -> float | None:
    """raw aiohttp's CPU per request on asyncio from the last full ``http_bench.py`` run."""
    try:
        report = json.loads((HERE / "results/http.json").read_text())
    except (OSError, ValueError):
        return None
    for row in report.get("medians", []):
        if (row["loop"], row["client"], row["size"], row["phase"]) == (
            "asyncio",
            "raw",
            size,
            "miss",
        ):
            return float(row["cpu_us_per_req"])
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--checkpoint-every", type=int, default=4, help="batches")
    parser.add_argument("--size", type=int, action="append", help="bytes (default 1024, 32768)")
    parser.add_argument("--out", type=Path, default=HERE / "results/floor.json")
    args = parser.parse_args()
    pin(placement()[1])  # the client's core, as every trial of the other benchmarks
    rows = []
    for size in args.size or [1024, 32768]:
        batches = capture(args.requests, size)
        runs = [replay(batches, args.requests, args.checkpoint_every) for _ in range(args.repeat)]
        sqlite = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        sqlite["log_frames"] = replay(batches, args.requests, None)["log_frames"]
        sha = sha256_us(size)
        raw = raw_cpu_us(size)
        floor = None if raw is None else raw / (raw + sqlite["sqlite_us"] + sha)
        rows.append({"size": size, **sqlite, "sha256_us": sha, "raw_cpu_us": raw, "floor": floor})
    pages = page_costs(256)
    print(
        f"medians of {args.repeat}, {args.requests} misses, a checkpoint every "
        f"{args.checkpoint_every} batches\n"
    )
    print(
        "| body | SQLite transactions µs | checkpoints µs | log frames (4 KiB) | sha256 µs "
        "| raw aiohttp µs | best ratio to raw |\n|---|--:|--:|--:|--:|--:|--:|"
    )
    for r in rows:
        raw_text = "" if r["raw_cpu_us"] is None else f"{r['raw_cpu_us']:.0f}"
        floor_text = "" if r["floor"] is None else f"{r['floor']:.2f}x"
        print(
            f"| {r['size'] // 1024} KiB | {r['transactions_us']:.1f} | {r['checkpoints_us']:.1f} "
            f"| {r['log_frames']:.2f} | {r['sha256_us']:.1f} | {raw_text} | {floor_text} |"
        )
    print(
        f"\nwriting 1 MiB: {pages['new_pages_us_per_mib']:,.0f} µs CPU into new files, "
        f"{pages['cached_pages_us_per_mib']:,.0f} µs over pages already cached"
    )
    report = {
        "machine": machine(),
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "sqlite": rows,
        "pages": pages,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
