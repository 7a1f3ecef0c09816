"""Where a recorded miss spends its time: the same 1 KiB fetches, one layer added per rung.

    python benchmarks/ladder.py                 # ~2 minutes: 8 rungs x 3 interleaved repeats
    python benchmarks/ladder.py --repeat 1 --requests 3000

Every rung runs the same worker pool (``--concurrency``, default 64) against the loopback server
of ``http_bench.py``, each trial in a fresh process, and reports req/s and the client's CPU per
request (all threads); the step column is what the rung adds to the one before:

| rung | what one request does |
|---|---|
| raw | aiohttp ``get`` + ``read`` on one shared session: the ceiling |
| adapter | ``session.request(...)`` (identity) + ``HttpAdapter.fetch`` |
| never | ``session.fetch`` with ``cache_mode="never"``: the pipeline, no store |
| record, no SQLite | ``bypass``: stage + rows + group commit, the commit resolved on the loop |
| record, hop only | ``bypass``: the commit hops to SQLite's thread and does nothing there |
| record | ``bypass``: full durable recording, no cache lookup |
| lookup + record | the default mode: cache lookup (a miss), then recording |
| + read | the benchmark's miss: the above and ``read()`` of the bytes |

The two middle rungs stub the store's commit (private hooks, for this measurement only): their
responses are not stored, so they skip ``read()``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from _common import Trials, machine, pin, placement, run, trial_main
from _server import ServerProcess

RUNGS: dict[str, str] = {
    "raw": "raw aiohttp",
    "adapter": "adapter (identity + HttpAdapter)",
    "never": "session, never mode (no store)",
    "nosql": "record, no SQLite (commit on the loop)",
    "hop": "record, hop only (empty commit in SQLite's thread)",
    "bypass": "record (bypass: no lookup)",
    "default": "lookup + record (default mode)",
    "read": "lookup + record + read (the benchmark's miss)",
}


def _stub_commit(rung: str) -> None:
    """Replace the store's commit for the two middle rungs (nothing is written)."""
    from mxm_dataio_async._store._sqlite import _writer

    if rung == "nosql":

        async def resolved_at_once(self: object, batches: object) -> None:
            return None

        setattr(_writer.Writer, "_transaction", resolved_at_once)  # noqa: B010
    elif rung == "hop":

        def empty(conn: object, batches: object, finish: bool = False) -> None:
            return None

        setattr(_writer, "_transaction_sync", empty)  # noqa: B010


async def _drive(one: Callable[[int], Awaitable[None]], n: int, concurrency: int) -> dict[str, Any]:
    indexes = iter(range(n))

    async def worker() -> None:
        for i in indexes:
            await one(i)

    wall0, cpu0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {"per_s": n / wall, "cpu_us": cpu / n * 1e6}


async def trial(rung: str, port: int, n: int, concurrency: int, tag: str) -> dict[str, Any]:
    import mxm_dataio_async as dio

    _stub_commit(rung)
    base = f"http://127.0.0.1:{port}"
    if rung == "raw":
        async with aiohttp.ClientSession() as client:

            async def raw(i: int) -> None:
                async with client.get(f"{base}/bytes/1024/{tag}{i}") as resp:
                    await resp.read()

            return await _drive(raw, n, concurrency)
    mode = {"never": "never", "nosql": "bypass", "hop": "bypass", "bypass": "bypass"}.get(
        rung, "default"
    )
    adapter = dio.HttpAdapter(base_url=base)
    with tempfile.TemporaryDirectory() as tmp:
        async with dio.Store(tmp) as store, dio.Registry() as registry:
            registry.register("bench", adapter)
            async with dio.AsyncSession("bench", store=store, registry=registry) as s:

                async def one(i: int) -> None:
                    request = s.request("b", endpoint=f"/bytes/1024/{tag}{i}", cache_mode=mode)
                    if rung == "adapter":
                        await adapter.fetch(request)
                        return
                    response = await s.fetch(request)
                    if rung in ("never", "read"):
                        await s.read(response)

                return await _drive(one, n, concurrency)


def _trial(spec: dict[str, Any]) -> dict[str, Any]:
    coro = trial(spec["rung"], spec["port"], spec["n"], spec["concurrency"], spec["tag"])
    result: dict[str, Any] = run(coro, spec["loop"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results/ladder.json")
    parser.add_argument("--trial", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trial:
        trial_main(_trial, args.trial)
        return

    runs: dict[str, list[dict[str, Any]]] = {rung: [] for rung in RUNGS}
    with ServerProcess(lifetime=1800) as server:
        pin(placement()[1])  # the driver calibrates (and its trials run) on the client's core
        trials = Trials(__file__)
        for r in range(args.repeat):
            for rung in RUNGS:  # interleaved: drift on a shared machine hits every rung alike
                spec = {
                    "rung": rung,
                    "port": server.port,
                    "n": args.requests,
                    "concurrency": args.concurrency,
                    "loop": args.loop,
                    "tag": f"{rung}-{r}-",
                }
                result, info = trials.run(spec, timeout=600)
                runs[rung].append(result | info)
                again = f"  (run {info['tries']} times: a slowed core)" if info["tries"] > 1 else ""
                print(f"run {r + 1}/{args.repeat}  {rung:8s} {result['per_s']:9,.0f}/s{again}")
    rows = []
    previous: float | None = None
    for rung, label in RUNGS.items():
        per_s = statistics.median(x["per_s"] for x in runs[rung])
        cpu = statistics.median(x["cpu_us"] for x in runs[rung])
        step = None if previous is None else cpu - previous
        rows.append({"rung": rung, "label": label, "per_s": per_s, "cpu_us": cpu, "step_us": step})
        previous = cpu
    print(f"\nmedians of {args.repeat}, {args.requests} requests, concurrency {args.concurrency}")
    print("| rung | req/s | client CPU µs/req | step µs |\n|---|--:|--:|--:|")
    for row in rows:
        step = "" if row["step_us"] is None else f"{row['step_us']:+.0f}"
        print(f"| {row['label']} | {row['per_s']:,.0f} | {row['cpu_us']:.0f} | {step} |")
    config = {k: v for k, v in vars(args).items() if k not in ("trial", "out")}
    config["reruns_on_a_slowed_core"] = trials.reruns
    report = {"machine": machine(), "config": config, "medians": rows, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
