"""The global rate of a ``RedisRateGate`` shared by worker processes (issue 16's target).

Target: the global rate within 2% of the limit at 100/s and at 1,000/s with 4 processes x 8
tasks, and each process's share within 5% of an even split.

Each trial starts 4 worker processes (``tests/redis/_worker.py rate``, the same worker the
multi-process test uses), each with 8 tasks taking slots of one source's gate on a fresh key
prefix, all from one wall-clock instant, for ``--seconds``. From the grants' timestamps in
[start, start + seconds): the global rate and its error against the limit, each process's share
and the largest deviation from an even split, the busiest 1-second window (GCRA allows at most
the rate plus the one burst grant), and Redis' own count of script calls per grant (``INFO
commandstats``; a grant that had to wait costs a second, cooldown re-check, call). Trials
alternate 100/s and 1,000/s, ``--repeat`` times; the table shows medians.

    . /tmp/mxm-services.env        # or: --url redis://127.0.0.1:6379/0
    python benchmarks/redis_rate.py                  # ~1.5 minutes
    python benchmarks/redis_rate.py --seconds 3 --repeat 1   # smoke run
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import redis
from _common import machine

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
PROCESSES = 4
TASKS = 8


def _script_calls(client: redis.Redis) -> int:
    stats = client.info("commandstats")
    return sum(
        int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("evalsha", "eval")
    )


def trial(url: str, rate: float, seconds: float) -> dict[str, Any]:
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    cmd = [sys.executable, "-m", "tests.redis._worker", "rate", url, prefix]
    workers = [
        subprocess.Popen(
            [*cmd, str(rate), str(TASKS), str(seconds)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(PROCESSES)
    ]
    client = redis.Redis.from_url(url)
    try:
        for w in workers:
            assert w.stdout is not None
            line = w.stdout.readline()
            if line != "ready\n":
                raise RuntimeError(f"worker not ready: {line!r}")
        calls_before = _script_calls(client)
        start = time.time() + 0.3
        for w in workers:
            assert w.stdin is not None
            w.stdin.write(f"{start!r}\n")
            w.stdin.flush()
        outputs = [w.communicate(timeout=seconds + 120) for w in workers]
        calls = _script_calls(client) - calls_before
        for key in client.scan_iter(match=f"mxm:{prefix}:*"):
            client.delete(key)
    finally:
        for w in workers:
            w.kill()
        client.close()
    for w, (_, err) in zip(workers, outputs, strict=True):
        if w.returncode != 0:
            raise RuntimeError(f"worker failed: {err}")
    stamps = [json.loads(out.splitlines()[-1])["grants"] for out, _ in outputs]
    counted = [[t for t in g if start <= t < start + seconds] for g in stamps]
    every = sorted(t for g in counted for t in g)
    granted = sum(len(g) for g in stamps)
    shares = [len(g) for g in counted]
    even = len(every) / PROCESSES
    return {
        "limit_per_s": rate,
        "seconds": seconds,
        "grants": len(every),
        "rate_per_s": round(len(every) / seconds, 2),
        "rate_error_pct": round((len(every) / seconds - rate) / rate * 100, 3),
        "shares": shares,
        "share_max_deviation_pct": round(max(abs(s - even) for s in shares) / even * 100, 2),
        "busiest_second": max(bisect.bisect_left(every, t + 1.0) - i for i, t in enumerate(every)),
        "script_calls_per_grant": round(calls / granted, 3) if granted else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=os.environ.get("MXM_DATAIO_TEST_REDIS_URL"))
    parser.add_argument("--rates", type=float, nargs="+", default=[100.0, 1000.0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "redis_rate.json")
    args = parser.parse_args()
    if not args.url:
        raise SystemExit("no Redis: pass --url redis://host:port/0 or start scripts/services")
    runs: list[dict[str, Any]] = []
    for n in range(args.repeat):
        for rate in args.rates:
            run = trial(args.url, rate, args.seconds)
            runs.append(run)
            print(
                f"[{n + 1}/{args.repeat}] {rate:>6g}/s: {run['rate_per_s']:>8.2f}/s "
                f"({run['rate_error_pct']:+.3f}%), shares {run['shares']} "
                f"(max {run['share_max_deviation_pct']}% off even), busiest second "
                f"{run['busiest_second']}, {run['script_calls_per_grant']} script calls/grant",
                flush=True,
            )
    medians = []
    for rate in args.rates:
        mine = [r for r in runs if r["limit_per_s"] == rate]
        errors = [abs(r["rate_error_pct"]) for r in mine]
        deviations = [r["share_max_deviation_pct"] for r in mine]
        medians.append(
            {
                "limit_per_s": rate,
                "rate_per_s": statistics.median(r["rate_per_s"] for r in mine),
                "abs_rate_error_pct": statistics.median(errors),
                "worst_abs_rate_error_pct": max(errors),
                "share_max_deviation_pct": statistics.median(deviations),
                "worst_share_deviation_pct": max(deviations),
                "busiest_second": max(r["busiest_second"] for r in mine),
                "script_calls_per_grant": statistics.median(
                    r["script_calls_per_grant"] for r in mine
                ),
                "rate_target_met": max(errors) <= 2.0,
                "share_target_met": max(deviations) <= 5.0,
            }
        )
    print(
        f"\n{PROCESSES} processes x {TASKS} tasks, {args.seconds:g} s per trial, "
        f"medians of {args.repeat}"
    )
    print(
        "| limit/s | measured/s | rate error | worst | share off even | worst | busiest 1 s "
        "| script calls/grant | target |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for m in medians:
        met = "PASS" if m["rate_target_met"] and m["share_target_met"] else "MISS"
        print(
            f"| {m['limit_per_s']:g} | {m['rate_per_s']:.2f} | {m['abs_rate_error_pct']:.3f}% "
            f"| {m['worst_abs_rate_error_pct']:.3f}% | {m['share_max_deviation_pct']:.2f}% "
            f"| {m['worst_share_deviation_pct']:.2f}% | {m['busiest_second']} "
            f"| {m['script_calls_per_grant']} | {met} |"
        )
    report = {
        "machine": machine(),
        "config": {
            "processes": PROCESSES,
            "tasks": TASKS,
            "seconds": args.seconds,
            "repeat": args.repeat,
            "rates": args.rates,
        },
        "medians": medians,
        "runs": runs,
    }
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
