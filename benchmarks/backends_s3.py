"""S3 payload-store figures: S3Payloads against the S3 server in the AWS_* variables (SeaweedFS
from ``scripts/services`` or ``.ci/services.sh``).

    . /tmp/mxm-services.env                     # or: source scripts/services
    python benchmarks/backends_s3.py            # ~30 seconds on 2 cores
    python benchmarks/backends_s3.py --repeat 5 --large 400 --out results/backends_s3.json

One process, ``--concurrency`` (16) operations in flight, through the PayloadStore protocol:

- ``put 1 MiB``: ``put(digest, data)`` of distinct 1 MiB payloads (create-only PUTs; the sha256 is
  computed beforehand, as ``Store.stage`` does): MB/s.
- ``get 1 MiB``: verified ``get`` of the same objects (sha256 checked): MB/s.
- ``put 1 KiB``: ``put`` of distinct 1 KiB payloads: puts/s (in the store they stay inline; this
  is the cost per object).
- ``put_stream 256 MiB``: a generated body streamed through ``put_stream`` in a child process
  (``tests/store/s3/_bigstream.py``): peak-RSS growth (VmHWM) over a baseline that streamed one
  part's worth, the peak itself, and MB/s; then ``iter`` of it back (verified), MB/s.

Each trial writes under a fresh key prefix and deletes it afterwards. The table shows the medians
of ``--repeat`` (3) trials, with the targets (1 MiB puts >= 60 MB/s; < 64 MiB RSS growth).
Nothing here is asserted: these are measurements.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from _common import drive, machine

from mxm_dataio_async._store._s3 import S3Payloads

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20
MB = 1e6


def payload(i: int, size: int, base: bytes) -> bytes:
    """Distinct bytes per index (so every put writes a new object)."""
    return base[: size - 8] + i.to_bytes(8, "big")


async def cleanup(url: str) -> None:
    store = S3Payloads(url)
    async for obj in store.list():
        await store.delete(obj)
    async for obj in store.leftovers(0):
        await store.delete(obj)
    await store.aclose()


async def phase(
    url: str, count: int, size: int, concurrency: int, *, read_back: bool
) -> dict[str, float]:
    base = os.urandom(size)
    bodies = [payload(i, size, base) for i in range(count)]
    digests = [hashlib.sha256(b).digest() for b in bodies]
    store = S3Payloads(url)
    await store.open()
    out: dict[str, float] = {}

    def op(call: Callable[[int], Awaitable[Any]]) -> Callable[[int], Awaitable[tuple[int, bool]]]:
        async def one(i: int) -> tuple[int, bool]:
            await call(i)
            return size, False

        return one

    try:
        put = await drive(op(lambda i: store.put(digests[i], bodies[i])), count, concurrency)
        if put.errors:
            raise SystemExit(f"put failed: {put.first_error}")
        out["put_per_s"] = put.per_s
        out["put_mb_s"] = put.bytes / put.seconds / MB
        out["put_cpu_us"] = put.cpu_us_per_req
        if read_back:
            get = await drive(op(lambda i: store.get(digests[i], size)), count, concurrency)
            if get.errors:
                raise SystemExit(f"get failed: {get.first_error}")
            out["get_per_s"] = get.per_s
            out["get_mb_s"] = get.bytes / get.seconds / MB
    finally:
        await store.aclose()
    return out


def big_stream(url: str, mib: int) -> dict[str, float]:
    script = REPO / "tests" / "store" / "s3" / "_bigstream.py"
    proc = subprocess.run(
        [sys.executable, str(script), url, str(mib)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"_bigstream.py failed ({proc.returncode}): {proc.stderr[-2000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if out["sha256"] != out["expected_sha256"]:
        raise SystemExit("the streamed body did not store its bytes")
    return {
        "rss_growth_mib": (out["peak_kib"] - out["baseline_kib"]) / 1024,
        "rss_peak_mib": out["peak_kib"] / 1024,
        "stream_mb_s": mib * MiB / out["put_seconds"] / MB,
        "stream_read_mb_s": mib * MiB / out["read_seconds"] / MB,
    }


def trial(args: argparse.Namespace, base_url: str) -> dict[str, float]:
    url = f"{base_url.rstrip('/')}/bench-{uuid.uuid4().hex[:12]}"
    figures: dict[str, float] = {}
    try:
        large = asyncio.run(phase(url, args.large, MiB, args.concurrency, read_back=True))
        figures.update({f"1mib_{k}": v for k, v in large.items()})
        small = asyncio.run(phase(url, args.small, 1024, args.concurrency, read_back=False))
        figures.update({f"1kib_{k}": v for k, v in small.items()})
        if args.stream_mib:
            figures.update(big_stream(url, args.stream_mib))
    finally:
        asyncio.run(cleanup(url))
    return figures


ROWS = [
    ("put 1 MiB", "1mib_put_mb_s", "MB/s", ">= 60 MB/s", lambda v: v >= 60),
    ("get 1 MiB (verified)", "1mib_get_mb_s", "MB/s", "", None),
    ("put 1 MiB: client CPU", "1mib_put_cpu_us", "us/put", "", None),
    ("put 1 KiB", "1kib_put_per_s", "puts/s", "", None),
    ("put 1 KiB: client CPU", "1kib_put_cpu_us", "us/put", "", None),
    ("put_stream 256 MiB: RSS growth", "rss_growth_mib", "MiB", "< 64 MiB", lambda v: v < 64),
    ("put_stream 256 MiB: peak RSS", "rss_peak_mib", "MiB", "", None),
    ("put_stream 256 MiB", "stream_mb_s", "MB/s", "", None),
    ("iter 256 MiB (verified)", "stream_read_mb_s", "MB/s", "", None),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="trials (the table shows medians)")
    parser.add_argument("--concurrency", type=int, default=16, help="operations in flight")
    parser.add_argument("--large", type=int, default=200, help="1 MiB payloads per trial")
    parser.add_argument("--small", type=int, default=2000, help="1 KiB payloads per trial")
    parser.add_argument("--stream-mib", type=int, default=256, help="streamed body (0: skip)")
    parser.add_argument("--url", default=os.environ.get("MXM_DATAIO_TEST_S3_URL"))
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args()
    if not args.url or not os.environ.get("AWS_ENDPOINT_URL"):
        raise SystemExit(
            "no S3 server: source /tmp/mxm-services.env (scripts/services) or pass --url with "
            "the AWS_* variables set"
        )
    runs = []
    for n in range(args.repeat):
        started = time.perf_counter()
        runs.append(trial(args, args.url))
        shown = ", ".join(f"{k}={v:.1f}" for k, v in runs[-1].items())
        print(f"trial {n + 1}/{args.repeat} ({time.perf_counter() - started:.0f} s): {shown}")
    medians = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    print(f"\nS3Payloads -> {endpoint}, concurrency {args.concurrency}, medians of {args.repeat}\n")
    print(f"| {'figure':32} | {'median':>10} | {'unit':7} | {'target':10} |      |")
    print(f"|{'-' * 34}|{'-' * 12}|{'-' * 9}|{'-' * 12}|------|")
    for label, key, unit, target, ok in ROWS:
        if key not in medians:
            continue
        verdict = "" if ok is None else ("PASS" if ok(medians[key]) else "MISS")
        print(f"| {label:32} | {medians[key]:10.1f} | {unit:7} | {target:10} | {verdict:4} |")
    if args.out:
        record = {"machine": machine(), "config": vars(args), "runs": runs, "medians": medians}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2, default=str))


if __name__ == "__main__":
    main()
