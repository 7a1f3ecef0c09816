"""Old commit against the work tree, side by side in one run: the figures of ``http_bench.py``
(our client and the mock pipeline) and ``engine.py``, with the ratio new/old for each.

    python benchmarks/versus.py 6232c75                 # ~10 minutes on 2 cores
    python benchmarks/versus.py HEAD~3 --rounds 5 --requests 10000

The old commit is checked out into a temporary git worktree. Each round runs the old and the new
tree's own benchmark scripts (each against its own package, through PYTHONPATH), alternating which
goes first, so drift on a shared machine hits both alike; the table shows medians over the rounds.
Results go to ``benchmarks/results/versus.json``. Measurements only: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import machine

HERE = Path(__file__).resolve().parent
NEW = HERE.parent
RESULTS = HERE / "results"


def _http_figures(report: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for row in report["medians"]:
        if row["client"] not in ("ours", "mock"):
            continue
        name = f"{row['loop']} {row['client']} {row['size'] // 1024} KiB {row['phase']}"
        out[f"{name} req/s"] = row["per_s"]
        out[f"{name} CPU µs/req"] = row["cpu_us_per_req"]
    return out


def _engine_figures(report: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    if "bulk" in report:
        out["fetch_many recorded/s"] = report["bulk"]["per_s"]
        out["fetch_many peak RSS MiB"] = report["bulk"]["rss_peak_mib"]
    if "coalesce" in report:
        c = report["coalesce"]
        out["coalesce: 10,000 identical fetches, ms to serve all"] = c["time_to_serve_all_ms"]
        out["coalesce: adapter calls (one session)"] = c["adapter_calls"]
        if "sessions_adapter_calls" in c:  # figures the old tree may not have
            out["coalesce: adapter calls (a session per caller)"] = c["sessions_adapter_calls"]
    if "limiter" in report:
        out["limiter 1,000/s error %"] = report["limiter"]["one_source"]["error_pct"]
    return out


def _run(tree: Path, args: list[str], env: dict[str, str]) -> None:
    subprocess.run(
        [sys.executable, *args], cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL
    )


def _one_round(tree: Path, work: Path, tag: str, opts: argparse.Namespace) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    http_out = work / f"http-{tag}.json"
    _run(
        tree,
        [
            str(tree / "benchmarks" / "http_bench.py"),
            "--client", "ours", "--size", "1024", "--repeat", "1", "--loop", "asyncio",
            "--requests", str(opts.requests), "--mock-requests", str(opts.mock_requests),
            "--out", str(http_out),
        ],
        env,
    )  # fmt: skip
    figures = _http_figures(json.loads(http_out.read_text()))
    engine_json = tree / "benchmarks" / "results" / "engine.json"
    saved = engine_json.read_bytes() if engine_json.exists() else None
    try:
        _run(
            tree,
            [
                str(tree / "benchmarks" / "engine.py"),
                "--seconds", str(opts.limiter_seconds),
                "--requests", str(opts.bulk_requests), "--bulk-mode", "default",
            ],
            env,
        )  # fmt: skip
        figures |= _engine_figures(json.loads(engine_json.read_text()))
    finally:  # engine.py writes into its tree: leave the committed file as it was
        if saved is not None:
            engine_json.write_bytes(saved)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old", help="the commit to compare against (any git revision)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=10_000, help="HTTP requests per phase")
    parser.add_argument("--mock-requests", type=int, default=20_000)
    parser.add_argument("--bulk-requests", type=int, default=200_000)
    parser.add_argument("--limiter-seconds", type=float, default=5.0)
    opts = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="versus-"))
    old = work / "old"
    subprocess.run(
        ["git", "-C", str(NEW), "worktree", "add", "--detach", str(old), opts.old],
        check=True,
        capture_output=True,
    )
    runs: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
    try:
        for i in range(opts.rounds):
            order = [("old", old), ("new", NEW)]
            if i % 2:
                order.reverse()
            for name, tree in order:
                print(f"round {i + 1}/{opts.rounds}: {name}", flush=True)
                runs[name].append(_one_round(tree, work, f"{name}-{i}", opts))
    finally:
        subprocess.run(
            ["git", "-C", str(NEW), "worktree", "remove", "--force", str(old)], check=False
        )
        shutil.rmtree(work, ignore_errors=True)
    rows = []
    for figure in runs["new"][0]:
        olds = [r[figure] for r in runs["old"] if figure in r]
        news = [r[figure] for r in runs["new"] if figure in r]
        if not olds or not news:
            continue
        o, n = statistics.median(olds), statistics.median(news)
        rows.append({"figure": figure, "old": o, "new": n, "new_over_old": n / o if o else None})
    print(f"\n| figure | old {opts.old} | new | new/old |\n|---|--:|--:|--:|")
    for r in rows:
        ratio = "-" if r["new_over_old"] is None else f"{r['new_over_old']:.3f}"
        print(f"| {r['figure']} | {r['old']:,.1f} | {r['new']:,.1f} | {ratio} |")
    print(
        "(medians of",
        opts.rounds,
        "alternating rounds; for µs, RSS, ms and error, lower is better)",
    )
    RESULTS.mkdir(exist_ok=True)
    report = {
        "machine": machine(),
        "old": opts.old,
        "options": vars(opts),
        "rows": rows,
        "runs": runs,
    }
    (RESULTS / "versus.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
