"""Engine figures: limiter precision, coalescing, fetch_many memory, and the event loop's worst
gap while large bodies are staged.

    python benchmarks/engine.py                 # all four, default sizes (~3 minutes)
    python benchmarks/engine.py --only limiter --seconds 10
    python benchmarks/engine.py --only bulk --requests 1000000

Each figure runs in its own subprocess so peak RSS is that figure's alone. Results are printed and
written to benchmarks/results/engine.json. Nothing here is asserted: these are measurements.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio

import mxm_dataio_async as dio
from mxm_dataio_async.store import SourceLimiter

RESULTS = Path(__file__).parent / "results"


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- limiter precision ---------------------------------------------------------------------------


class _Grants:
    """Grants counted with the time of the first and the last: the rate between them excludes
    the initial burst token and the drain after the deadline."""

    def __init__(self) -> None:
        self.count = 0
        self.first = 0.0
        self.last = 0.0

    def add(self) -> None:
        now = time.monotonic()
        if not self.count:
            self.first = now
        self.last = now
        self.count += 1

    @property
    def rate(self) -> float:
        span = self.last - self.first
        return (self.count - 1) / span if span > 0 else 0.0


async def _drive(limiter: SourceLimiter, stop_at: float, workers: int, grants: _Grants) -> None:
    async def worker() -> None:
        while time.monotonic() < stop_at:
            async with limiter.slot():
                grants.add()

    async with anyio.create_task_group() as tg:
        for _ in range(workers):
            tg.start_soon(worker)


async def limiter_precision(seconds: float) -> dict[str, Any]:
    """One source at 1,000/s and 100 sources at 10/s each, driven flat out for ``seconds``."""
    out: dict[str, Any] = {}
    limiter = SourceLimiter(dio.RateLimit(1000, per=1.0, burst=1))
    grants = _Grants()
    await _drive(limiter, time.monotonic() + seconds, 64, grants)
    out["one_source"] = {
        "configured_per_s": 1000,
        "achieved_per_s": round(grants.rate, 2),
        "error_pct": round(abs(grants.rate - 1000) / 1000 * 100, 3),
        "grants": grants.count,
        "seconds": round(grants.last - grants.first, 3),
    }
    limiters = [SourceLimiter(dio.RateLimit(10, per=1.0, burst=1)) for _ in range(100)]
    per_source = [_Grants() for _ in limiters]
    stop_at = time.monotonic() + seconds
    async with anyio.create_task_group() as tg:
        for lim, g in zip(limiters, per_source, strict=True):
            tg.start_soon(_drive, lim, stop_at, 4, g)
    rates = [g.rate for g in per_source]
    out["hundred_sources"] = {
        "configured_per_s_each": 10,
        "achieved_total_per_s": round(sum(rates), 2),
        "worst_source_error_pct": round(max(abs(r - 10) / 10 * 100 for r in rates), 3),
        "median_source_per_s": round(statistics.median(rates), 3),
    }
    # Through the whole pipeline: a session fetching distinct requests (bypass: every one real).
    with tempfile.TemporaryDirectory() as tmp:
        reg = dio.Registry()
        reg.register("m", dio.MockAdapter(lambda r: b"x" * 1024), rate_limit=dio.RateLimit(1000))
        async with dio.AsyncSession("m", root=tmp, registry=reg, cache_mode="bypass") as s:
            n = int(1000 * seconds)
            served = _Grants()
            async for outcome in s.fetch_many(
                (s.request("k", params={"i": i}) for i in range(n)), concurrency=64
            ):
                if outcome.ok:
                    served.add()
        out["session_pipeline"] = {
            "configured_per_s": 1000,
            "achieved_per_s": round(served.rate, 2),
            "error_pct": round(abs(served.rate - 1000) / 1000 * 100, 3),
            "requests": served.count,
            "seconds": round(served.last - served.first, 3),
        }
    return out


# -- coalescing ----------------------------------------------------------------------------------


async def coalescing(callers: int, upstream_ms: float) -> dict[str, Any]:
    """``callers`` concurrent fetches of one request; the adapter takes ``upstream_ms``."""
    calls = 0

    async def slow(req: dio.Request) -> bytes:
        nonlocal calls
        calls += 1
        await anyio.sleep(upstream_ms / 1000)
        return b"x" * 1024

    with tempfile.TemporaryDirectory() as tmp:
        reg = dio.Registry()
        reg.register("m", dio.MockAdapter(slow))
        async with dio.AsyncSession("m", root=tmp, registry=reg) as s:
            reqs = [s.request("k", params={"same": True}) for _ in range(callers)]
            served: list[float] = []
            start = time.perf_counter()

            async def one(r: dio.Request) -> None:
                await s.fetch(r)
                served.append(time.perf_counter() - start)

            async with anyio.create_task_group() as tg:
                for r in reqs:
                    tg.start_soon(one, r)
            total = time.perf_counter() - start
        one_session_calls, calls = calls, 0
        # The web-app shape: a session per incoming call, all on one Store and Registry.
        async with dio.Store(tmp + "/per-caller") as store:

            async def own_session() -> None:
                async with dio.AsyncSession("m", store=store, registry=reg) as s:
                    await s.fetch(s.request("k", params={"same": "per caller"}))

            async with anyio.create_task_group() as tg:
                for _ in range(min(callers, 200)):
                    tg.start_soon(own_session)
    return {
        "callers": callers,
        "adapter_calls": one_session_calls,
        "sessions": min(callers, 200),
        "sessions_adapter_calls": calls,
        "upstream_ms": upstream_ms,
        "time_to_serve_all_ms": round(total * 1000, 1),
        "overhead_beyond_upstream_ms": round(total * 1000 - upstream_ms, 1),
        "p50_ms": round(statistics.median(served) * 1000, 1),
    }


# -- fetch_many memory ---------------------------------------------------------------------------


async def bulk_memory(requests: int, cache_mode: str) -> dict[str, Any]:
    """A lazy generator of ``requests`` through fetch_many; RSS sampled along the way."""
    samples: list[tuple[int, float]] = []
    baseline = _rss_mib()
    with tempfile.TemporaryDirectory() as tmp:
        reg = dio.Registry()
        # a distinct 1 KiB body per request: with one body for all, the store writes it once
        reg.register("m", dio.MockAdapter(lambda r: str(r.params["i"]).encode().ljust(1024, b"x")))
        async with dio.AsyncSession("m", root=tmp, registry=reg, cache_mode=cache_mode) as s:

            def gen() -> Iterator[dio.Request]:
                for i in range(requests):
                    yield s.request("k", params={"i": i})

            start = time.perf_counter()
            done = 0
            step = max(requests // 20, 1)
            async for outcome in s.fetch_many(gen(), concurrency=64):
                done += outcome.ok
                if done % step == 0:
                    samples.append((done, round(_rss_mib(), 1)))
            elapsed = time.perf_counter() - start
    rss = [m for _, m in samples]
    return {
        "requests": requests,
        "ok": done,
        "cache_mode": cache_mode,
        "seconds": round(elapsed, 1),
        "per_s": round(done / elapsed),
        "rss_baseline_mib": round(baseline, 1),
        "rss_first_sample_mib": rss[0] if rss else None,
        "rss_last_sample_mib": rss[-1] if rss else None,
        "rss_peak_mib": round(_peak_rss_mib(), 1),
        "samples": samples,
    }


async def stage_gaps(mib: int, payloads: int) -> dict[str, Any]:
    """The event loop's worst gap while ``payloads`` in-memory bodies of ``mib`` MiB are staged,
    with their sha256 computed in a worker thread (the store's way above ``HASH_ON_LOOP_MAX``)
    and on the loop (that bound raised above the body: the store's way before)."""
    from mxm_dataio_async._store import _store

    bodies = [os.urandom(mib << 20) for _ in range(payloads)]
    bound = _store.HASH_ON_LOOP_MAX
    out: dict[str, Any] = {"mib": mib, "payloads": payloads}
    for where, limit in (("thread", bound), ("loop", 1 << 40)):
        setattr(_store, "HASH_ON_LOOP_MAX", limit)  # noqa: B010  (a Final, changed for this run)
        worst = 0.0

        async def ticking() -> None:
            nonlocal worst
            last = time.perf_counter()
            while True:
                await anyio.sleep(0.001)
                now = time.perf_counter()
                worst, last = max(worst, now - last - 0.001), now

        with tempfile.TemporaryDirectory() as tmp:
            async with dio.Store(tmp) as store, anyio.create_task_group() as tg:
                tg.start_soon(ticking)
                await anyio.sleep(0.01)
                for body in bodies:
                    await store.stage(body)
                tg.cancel_scope.cancel()
        out[f"worst_gap_ms_{where}"] = round(worst * 1e3, 1)
    setattr(_store, "HASH_ON_LOOP_MAX", bound)  # noqa: B010
    return out


# -- driver --------------------------------------------------------------------------------------


def _child(name: str, args: argparse.Namespace) -> dict[str, Any]:
    if name == "limiter":
        return anyio.run(limiter_precision, args.seconds)
    if name == "coalesce":
        return anyio.run(coalescing, args.callers, args.upstream_ms)
    if name == "bulk":
        return anyio.run(bulk_memory, args.requests, args.bulk_mode)
    if name == "stage":
        return anyio.run(stage_gaps, args.stage_mib, args.stage_payloads)
    raise SystemExit(f"unknown figure {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["limiter", "coalesce", "bulk", "stage"], action="append")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--callers", type=int, default=10_000)
    parser.add_argument("--upstream-ms", type=float, default=50.0)
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--bulk-mode", default="never", choices=["never", "default", "bypass"])
    parser.add_argument("--stage-mib", type=int, default=64, help="MiB per staged body")
    parser.add_argument("--stage-payloads", type=int, default=5)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args)))
        return
    figures = args.only or ["limiter", "coalesce", "bulk", "stage"]
    report: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
    }
    for name in figures:
        cmd = [sys.executable, __file__, "--child", name, *_own_args(args)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        report[name] = json.loads(out.stdout.strip().splitlines()[-1])
        shown = {k: v for k, v in report[name].items() if k != "samples"}
        print(f"{name}: {json.dumps(shown, indent=2)}", flush=True)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "engine.json"
    # Keep the figures of earlier runs that this one did not redo.
    previous = json.loads(path.read_text()) if path.exists() else {}
    previous.update(report)
    path.write_text(json.dumps(previous, indent=2) + "\n")


def _own_args(args: argparse.Namespace) -> list[str]:
    return [
        "--seconds",
        str(args.seconds),
        "--callers",
        str(args.callers),
        "--upstream-ms",
        str(args.upstream_ms),
        "--requests",
        str(args.requests),
        "--bulk-mode",
        args.bulk_mode,
        "--stage-mib",
        str(args.stage_mib),
        "--stage-payloads",
        str(args.stage_payloads),
    ]


if __name__ == "__main__":
    main()
