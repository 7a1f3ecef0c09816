"""Workers sharing a run through PostgreSQL: how throughput scales with workers against a
latency-bound upstream, and what the work queue costs per request.

    . /tmp/mxm-services.env            # or: scripts/services /tmp/mxm-services.env &
    python benchmarks/workers.py       # ~2 minutes on 2 cores

- **Scaling**: one job of ``--requests`` fetches (1 KiB) from a loopback upstream that answers
  after ``--delay`` seconds (50 ms), run by 1 and by 4 worker processes (``mxm-dataio worker``,
  each ``--concurrency`` requests in flight), each trial on a fresh store (a new PostgreSQL
  schema). Throughput is requests / seconds from the first to the last recorded answer (the
  ``job_done`` marks, on the server's clock), so the processes' start-up is not counted; the
  wall time of the whole run is reported beside it. Target: >= 3.6x at 4 workers vs 1.
- **Claim overhead**: the same job with an upstream that answers at once, run by ``run_job`` (one
  process, no queue) and by ``run_worker`` (one worker: claims, leases, fenced commits, marks), in
  one process each, interleaved; the difference in seconds per request. Target: <= 0.25 ms per
  request at chunk size 64.

Trials are interleaved, medians of ``--repeat`` reported; results go to
``benchmarks/results/workers.json``. Measurements only: nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from _common import machine
from _server import ServerProcess

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parents[1]


def job_file(folder: Path, port: int, n: int, delay: float, concurrency: int) -> Path:
    tag = secrets.token_hex(4)
    data = {
        "job": "bench",
        "sources": {
            "up": {
                "adapter": "http",
                "base_url": f"http://127.0.0.1:{port}",
                "retry": {"max_attempts": 1},
            }
        },
        "requests": [
            {
                "source": "up",
                "kind": "b",
                "endpoint": "/bytes/1024/" + tag + "{i}",
                "params": {"delay": str(delay)} if delay else {},
                "expand": {"i": list(range(n))},
            }
        ],
        "concurrency": concurrency,
        "lease_ttl": 30,
    }
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


class Schema:
    """A fresh schema on the benchmark's PostgreSQL, dropped afterwards."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.name = f"bench_{secrets.token_hex(4)}"

    @property
    def store(self) -> str:
        return f"{self.url}{'&' if '?' in self.url else '?'}schema={self.name}"

    async def fetchval(self, sql: str) -> Any:
        import asyncpg  # type: ignore[import-untyped]

        conn = await asyncpg.connect(self.url, server_settings={"search_path": self.name})
        try:
            return await conn.fetchval(sql)
        finally:
            await conn.close()

    def drop(self) -> None:
        async def go() -> None:
            import asyncpg

            conn = await asyncpg.connect(self.url)
            try:
                await conn.execute(f"DROP SCHEMA IF EXISTS {self.name} CASCADE")
            finally:
                await conn.close()

        asyncio.run(go())


def scaling_trial(url: str, port: int, workers: int, opts: argparse.Namespace) -> dict[str, float]:
    schema = Schema(url)
    with tempfile.TemporaryDirectory() as tmp:
        job = job_file(Path(tmp), port, opts.requests, opts.delay, opts.concurrency)
        cmd = [
            sys.executable, "-m", "mxm_dataio_async", "worker", str(job), "--store", schema.store,
            "--payloads", str(Path(tmp) / "payloads"), "--chunk-size", str(opts.chunk_size),
            "--json",
        ]  # fmt: skip
        started = time.perf_counter()
        procs = [
            subprocess.Popen(
                cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            for _ in range(workers)
        ]
        for proc in procs:
            _, err = proc.communicate(timeout=600)
            if proc.returncode != 0:
                raise RuntimeError(f"worker failed: {err[-2000:]}")
        wall = time.perf_counter() - started
        try:
            done = int(asyncio.run(schema.fetchval("SELECT count(*) FROM job_done")))
            span = float(
                asyncio.run(
                    schema.fetchval(
                        "SELECT extract(epoch FROM max(done_at) - min(done_at)) FROM job_done"
                    )
                )
            )
        finally:
            schema.drop()
    if done != opts.requests:
        raise RuntimeError(f"{done} of {opts.requests} requests done")
    return {"per_s": done / span, "wall_s": wall, "per_s_wall": done / wall}


async def overhead_trial(url: str, port: int, mode: str, opts: argparse.Namespace) -> float:
    """Seconds per request of the whole run (``run_job`` or one ``run_worker``), in-process."""
    from mxm_dataio_async.jobs import load_job, run_job, run_worker

    schema = Schema(url)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            job = load_job(job_file(Path(tmp), port, opts.overhead_requests, 0.0, 64))
            payloads = Path(tmp) / "payloads"
            started = time.perf_counter()
            if mode == "run_job":
                summary = await run_job(job, root=schema.store, payloads=payloads)
                assert summary.fetched == opts.overhead_requests, summary
            else:
                result = await run_worker(
                    job, store=schema.store, payloads=payloads, chunk_size=opts.chunk_size
                )
                assert result.fetched == opts.overhead_requests and result.complete, result
            per: float = (time.perf_counter() - started) / opts.overhead_requests
            return per
    finally:
        await asyncio.to_thread(schema.drop)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", default=os.environ.get("MXM_DATAIO_TEST_POSTGRES_URL"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--requests", type=int, default=3000, help="per scaling trial")
    parser.add_argument("--delay", type=float, default=0.05, help="upstream latency, seconds")
    parser.add_argument("--concurrency", type=int, default=8, help="per worker")
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--overhead-requests", type=int, default=5000)
    parser.add_argument("--only", choices=("scaling", "overhead"), help="one of the two parts")
    opts = parser.parse_args()
    if not opts.store:
        raise SystemExit("needs PostgreSQL: --store URL or MXM_DATAIO_TEST_POSTGRES_URL")
    scaling: dict[int, list[dict[str, float]]] = {1: [], 4: []}
    overhead: dict[str, list[float]] = {"run_job": [], "run_worker": []}
    with ServerProcess(lifetime=3600) as server:
        for round_ in range(opts.repeat):
            for workers in (1, 4) if opts.only != "overhead" else ():
                fig = scaling_trial(opts.store, server.port, workers, opts)
                scaling[workers].append(fig)
                print(
                    f"round {round_ + 1}: {workers} worker(s) {fig['per_s']:7,.0f}/s "
                    f"(wall {fig['wall_s']:.1f}s)",
                    flush=True,
                )
            for mode in overhead if opts.only != "scaling" else ():
                per = asyncio.run(overhead_trial(opts.store, server.port, mode, opts))
                overhead[mode].append(per)
                print(f"round {round_ + 1}: {mode:<10} {per * 1e3:6.3f} ms/request", flush=True)
    report: dict[str, Any] = {
        "machine": machine(),
        "options": vars(opts) | {"store": "(PostgreSQL)"},
    }
    print(f"\nmedians of {opts.repeat}; upstream latency {opts.delay * 1e3:.0f} ms, "
          f"{opts.concurrency} in flight per worker, chunks of {opts.chunk_size}")  # fmt: skip
    if opts.only != "overhead":
        med = {w: statistics.median(f["per_s"] for f in figs) for w, figs in scaling.items()}
        wall = {w: statistics.median(f["wall_s"] for f in figs) for w, figs in scaling.items()}
        speedup = med[4] / med[1]
        print("| workers | req/s (first to last answer) | wall s (with start-up) |\n|--:|--:|--:|")
        for w in (1, 4):
            print(f"| {w} | {med[w]:,.0f} | {wall[w]:.1f} |")
        print(f"speed-up at 4 workers: {speedup:.2f}x (target >= 3.6x)")
        report["scaling"] = {str(w): figs for w, figs in scaling.items()}
        report["speedup_4_over_1"] = round(speedup, 3)
    if opts.only != "scaling":
        per_job = statistics.median(overhead["run_job"])
        per_worker = statistics.median(overhead["run_worker"])
        claim_ms = (per_worker - per_job) * 1e3
        print(
            f"claim overhead: {claim_ms:.3f} ms/request (run_worker {per_worker * 1e3:.3f} vs "
            f"run_job {per_job * 1e3:.3f}; target <= 0.25)"
        )
        report["overhead_ms_per_request"] = {
            k: [round(v * 1e3, 4) for v in vs] for k, vs in overhead.items()
        }
        report["claim_overhead_ms"] = round(claim_ms, 4)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "workers.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
