"""The floor under a recorded fetch: what SQLite itself costs, and what writing new bytes costs.

    python benchmarks/floor.py                  # ~2 minutes
    python benchmarks/floor.py --requests 5000 --repeat 1

No Python of ours is timed here, only the work any durable recorder with this schema has to do:

- **SQLite's own work per fetch.** The mock pipeline records ``--requests`` fetches (a distinct
  body each), then serves them again in a new session, while everything asked of SQLite's thread
  is captured: the writer's transactions and the batched cache lookups (with the payloads they
  read along). The same calls are then replayed, one thread, no event loop, into a fresh store's
  database with the writer's settings (WAL, ``synchronous=NORMAL``, no automatic checkpoint) and a
  PASSIVE checkpoint from a second connection every ``--checkpoint-every`` commits, finished by
  the writer once the log passes ``RESTART_PAGES``, as ``_store/_sqlite/_checkpoint.py`` does.
  CPU per fetch (user + system) for the lookups, the transactions and the checkpoints, and the
  log frames each fetch writes.
- **Writing new bytes on this machine.** 1 MiB written into new files against the same MiB
  written over a file already in the page cache: on this VM (a balloon device returns freed
  memory to the host) each page the kernel takes afresh costs far more than the copy.
- **The floor.** For a miss, raw aiohttp's CPU per request (``results/http.json``, when present)
  plus SQLite's work plus sha256 of the body; for a hit, SQLite's work plus the sha256 that
  verifies the bytes read: the best ratio to raw a recorder with this schema could reach on one
  client core if none of its own Python cost anything.
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _common import machine, pin, placement

HERE = Path(__file__).parent


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


Event = tuple[Any, ...]  # ("commit", batches) or ("lookup", sql, keys, limit), in order


def capture(requests: int, size: int) -> dict[str, list[Event]]:
    """What SQLite's thread was asked to do while ``requests`` mock fetches of ``size`` bytes
    were recorded (``miss``) and then served in a new session (``hit``): the writer's
    transactions and the batched lookups, in order."""
    import mxm_dataio_async as dio
    from mxm_dataio_async._store._sqlite import _reader, _writer

    phases: dict[str, list[Event]] = {"miss": [], "hit": []}
    events = phases["miss"]
    commit, lookup = _writer._transaction_sync, _reader._latest_sync

    def committing(
        conn: sqlite3.Connection, batches: list[tuple[str, list[Any]]], finish: bool = False
    ) -> None:
        events.append(("commit", [(sql, [tuple(row) for row in rows]) for sql, rows in batches]))
        commit(conn, batches, finish)

    def looking_up(
        conn: sqlite3.Connection, sql: str, keys: Sequence[bytes], limit: int
    ) -> tuple[list[Any], list[Any]]:
        events.append(("lookup", sql, list(keys), limit))
        return lookup(conn, sql, keys, limit)

    async def record(root: str) -> None:
        nonlocal events
        body = bytes(range(256)) * (size // 256)
        async with dio.Store(root) as store, dio.Registry() as registry:
            # A distinct body per request, as the benchmark server's: a payload row each.
            registry.register("m", dio.MockAdapter(lambda r: repr(r.params).encode() + body))
            for phase in ("miss", "hit"):
                events = phases[phase]
                async with dio.AsyncSession("m", store=store, registry=registry) as s:
                    wanted = (s.request("k", params={"i": i}) for i in range(requests))
                    async for outcome in s.fetch_many(wanted, concurrency=64):
                        if not outcome.ok or outcome.response is None:
                            raise RuntimeError(f"mock fetch failed: {outcome.error!r}")
                        await s.read(outcome.response)

    _writer._transaction_sync, _reader._latest_sync = committing, looking_up
    try:
        with tempfile.TemporaryDirectory() as root:
            asyncio.run(record(root))
    finally:
        _writer._transaction_sync, _reader._latest_sync = commit, lookup
    return phases


def replay(
    phases: dict[str, list[Event]], requests: int, every: int | None
) -> dict[str, dict[str, float]]:
    """CPU per fetch of the lookups, the transactions and the checkpoints, phase by phase, in a
    fresh database as the store runs them (``every=None``: no checkpoints, so that the log ends
    up holding every frame written)."""
    import mxm_dataio_async as dio
    from mxm_dataio_async._store._sqlite._checkpoint import RESTART_PAGES
    from mxm_dataio_async._store._sqlite._reader import _latest_sync
    from mxm_dataio_async._store._sqlite._schema import DB_NAME
    from mxm_dataio_async._store._sqlite._writer import _transaction_sync

    async def create(root: str) -> None:
        async with dio.Store(root):
            pass

    out: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as root:
        asyncio.run(create(root))
        db = os.path.join(root, DB_NAME)
        writer = sqlite3.connect(db, isolation_level=None)
        checkpointer = sqlite3.connect(db, isolation_level=None)
        for conn in (writer, checkpointer):
            conn.execute("PRAGMA synchronous=NORMAL")
        writer.execute("PRAGMA wal_autocheckpoint=0")
        finish = False
        for phase, events in phases.items():
            spent = {"lookup": 0.0, "commit": 0.0, "checkpoint": 0.0}
            commits = frames = 0
            for event in events:
                c0 = _cpu()
                if event[0] == "lookup":
                    _latest_sync(writer, *event[1:])
                    spent["lookup"] += _cpu() - c0
                    continue
                _transaction_sync(writer, event[1], finish)
                spent["commit"] += _cpu() - c0
                finish = False
                commits += 1
                if every is not None and commits % every == 0:
                    c0 = _cpu()
                    row = checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    spent["checkpoint"] += _cpu() - c0
                    finish = row[1] > RESTART_PAGES
            if every is None:  # nothing checkpointed: the log holds what this phase wrote
                frames = checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1]
                checkpointer.execute(
                    "PRAGMA wal_checkpoint(TRUNCATE)"
                ).fetchone()  # log starts empty
            out[phase] = {f"{k}_us": v / requests * 1e6 for k, v in spent.items()}
            out[phase]["sqlite_us"] = sum(spent.values()) / requests * 1e6
            out[phase]["log_frames"] = frames / requests
        writer.close()
        checkpointer.close()
    return out


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
        phases = capture(args.requests, size)
        runs = [replay(phases, args.requests, args.checkpoint_every) for _ in range(args.repeat)]
        frames = replay(phases, args.requests, None)
        sha = sha256_us(size)
        raw = raw_cpu_us(size)
        for phase in phases:
            sqlite = {k: statistics.median(r[phase][k] for r in runs) for k in runs[0][phase]}
            sqlite["log_frames"] = frames[phase]["log_frames"]
            # A miss is raw's work and more; a hit replaces it (what the 1.8x target compares).
            spent = sqlite["sqlite_us"] + sha + ((raw or 0.0) if phase == "miss" else 0.0)
            floor = None if raw is None else raw / spent
            rows.append(
                {
                    "size": size,
                    "phase": phase,
                    **sqlite,
                    "sha256_us": sha,
                    "raw_cpu_us": raw,
                    "floor": floor,
                }
            )
    pages = page_costs(256)
    print(
        f"CPU per fetch, medians of {args.repeat}, {args.requests} fetches, a checkpoint every "
        f"{args.checkpoint_every} commits\n"
    )
    print(
        "| body | fetch | lookups µs | transactions µs | checkpoints µs | SQLite µs | log frames "
        "| sha256 µs | raw aiohttp µs | best ratio to raw |\n"
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|"
    )
    for r in rows:
        raw_text = "" if r["raw_cpu_us"] is None else f"{r['raw_cpu_us']:.0f}"
        floor_text = "" if r["floor"] is None else f"{r['floor']:.2f}x"
        print(
            f"| {r['size'] // 1024} KiB | {r['phase']} | {r['lookup_us']:.1f} "
            f"| {r['commit_us']:.1f} | {r['checkpoint_us']:.1f} | {r['sqlite_us']:.1f} "
            f"| {r['log_frames']:.2f} "
            f"| {r['sha256_us']:.1f} | {raw_text} | {floor_text} |"
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
