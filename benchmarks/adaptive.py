"""Adaptive throttling (AIMD) against an upstream that allows 20 requests/s (issue 17's target).

The upstream is a loopback aiohttp server (in its own process) with a token bucket of 20/s and
a burst of 2: a request beyond it is answered ``429`` with ``Retry-After: 1``, as an API's rate
limiter does. The client does not know the allowance: its source is configured with a higher
ceiling (``--ceiling``, 30/s by default) and fetches ``--requests`` distinct URLs, 8 at a time,
recording every answer in a fresh SQLite store, with retries honouring ``Retry-After``.

Two modes, alternating, ``--repeat`` times each:

- ``cooldown``: today's behaviour, ``RateLimit(ceiling)``: a 429's Retry-After pauses the whole
  source, then the refilled burst hits the upstream again at once.
- ``adaptive``: ``RateLimit(ceiling, adaptive=True)``: a 429 lowers the rate (x0.9, once per
  round trip), successes raise it back (+1/40 of the ceiling per second); no source-wide pause
  for a Retry-After within the limit's period.

Reported: the achieved rate (answers accepted by the upstream per second of the run, which ends
when the last request is recorded), its share of the allowed 20/s, and the 429s the upstream
sent. Target: >= 95% of 20/s, with fewer 429s than ``cooldown``.

    python benchmarks/adaptive.py                 # ~1.5 minutes
    python benchmarks/adaptive.py --requests 200 --repeat 1   # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from aiohttp import ClientSession, web

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mxm_dataio_async as dio  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ALLOWED = 20.0  # the upstream's rate, requests per second
BURST = 2.0  # the upstream's bucket


def _serve(port_out: Any, stop: Any) -> None:
    """The upstream, in a process of its own: a token bucket of ALLOWED/s, BURST deep."""

    async def main() -> None:
        tokens, last = BURST, time.monotonic()
        counts = {"ok": 0, "429": 0}

        async def item(request: web.Request) -> web.Response:
            nonlocal tokens, last
            now = time.monotonic()
            tokens = min(BURST, tokens + (now - last) * ALLOWED)
            last = now
            if tokens < 1.0:
                counts["429"] += 1
                return web.Response(status=429, headers={"Retry-After": "1"})
            tokens -= 1.0
            counts["ok"] += 1
            return web.Response(body=b'{"ok": true}', content_type="application/json")

        async def stats(request: web.Request) -> web.Response:
            return web.json_response(counts)

        async def reset(request: web.Request) -> web.Response:
            nonlocal tokens, last
            counts.update({"ok": 0, "429": 0})
            tokens, last = BURST, time.monotonic()
            return web.json_response(counts)

        app = web.Application()
        app.router.add_get("/items/{n}", item)
        app.router.add_get("/stats", stats)
        app.router.add_post("/reset", reset)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port_out.put(runner.addresses[0][1])
        while not stop.is_set():  # noqa: ASYNC110 - set from the parent process
            await asyncio.sleep(0.1)
        await runner.cleanup()

    asyncio.run(main())


async def trial(url: str, mode: str, ceiling: float, requests: int) -> dict[str, Any]:
    async with ClientSession() as http:
        await http.post(f"{url}/reset")
    rate_limit = dio.RateLimit(ceiling, adaptive=mode == "adaptive")
    retry = dio.RetryPolicy(max_attempts=20, base_delay=0.05, max_delay=2.0)
    with tempfile.TemporaryDirectory() as root:
        async with dio.Registry() as registry:
            registry.register(
                "api", dio.HttpAdapter(base_url=url), rate_limit=rate_limit, retry=retry
            )
            async with dio.AsyncSession("api", root=root, registry=registry) as s:
                reqs = [s.request("item", endpoint=f"/items/{n}") for n in range(requests)]
                started = time.monotonic()
                failed = 0
                async for outcome in s.fetch_many(reqs, concurrency=8):
                    failed += not outcome.ok
                elapsed = time.monotonic() - started
                final_rate = registry.gate("api").statistics().rate
    async with ClientSession() as http:
        counts = await (await http.get(f"{url}/stats")).json()
    achieved = counts["ok"] / elapsed
    return {
        "mode": mode,
        "ceiling": ceiling,
        "requests": requests,
        "failed": failed,
        "seconds": round(elapsed, 2),
        "achieved_per_s": round(achieved, 2),
        "share_of_allowed": round(achieved / ALLOWED, 4),
        "upstream_429s": counts["429"],
        "final_rate": None if final_rate is None else round(final_rate, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--ceiling", type=float, default=30.0)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--modes", default="cooldown,adaptive")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    ctx = multiprocessing.get_context("spawn")
    port_q, stop = ctx.Queue(), ctx.Event()
    server = ctx.Process(target=_serve, args=(port_q, stop), daemon=True)
    server.start()
    url = f"http://127.0.0.1:{port_q.get(timeout=30)}"
    modes = args.modes.split(",")
    trials: list[dict[str, Any]] = []
    try:
        for _ in range(args.repeat):
            for mode in modes:
                result = asyncio.run(trial(url, mode, args.ceiling, args.requests))
                print(json.dumps(result), flush=True)
                trials.append(result)
    finally:
        stop.set()
        server.join(10)
    summary = {}
    for mode in modes:
        runs = [t for t in trials if t["mode"] == mode]
        summary[mode] = {
            "achieved_per_s": statistics.median(t["achieved_per_s"] for t in runs),
            "share_of_allowed": statistics.median(t["share_of_allowed"] for t in runs),
            "upstream_429s": statistics.median(t["upstream_429s"] for t in runs),
        }
    print(f"\nupstream allows {ALLOWED:g}/s (burst {BURST:g}); client ceiling {args.ceiling:g}/s")
    print(f"{'mode':10} {'achieved/s':>10} {'of 20/s':>8} {'429s':>6}")
    for mode, row in summary.items():
        print(
            f"{mode:10} {row['achieved_per_s']:10.2f} {row['share_of_allowed']:8.1%} "
            f"{row['upstream_429s']:6.0f}"
        )
    if not args.no_save:
        RESULTS.mkdir(exist_ok=True)
        out = {"allowed": ALLOWED, "burst": BURST, "args": vars(args), "summary": summary}
        out["trials"] = trials
        (RESULTS / "adaptive.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
