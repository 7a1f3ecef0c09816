"""A counting HTTP upstream, run as a program inside a namespace (``Network.start_upstream``).

Any path answers 200 with JSON ``{"path": ..., "hit": n}``; ``?status=N`` answers N instead and
``?delay=S`` waits S seconds first. Each request's path and query is appended, on arrival, as a
line to the ``--hits`` file, which the test reads (the file system is shared across namespaces).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal

from aiohttp import web


def make_app(hits_path: str) -> web.Application:
    hits = open(hits_path, "a", buffering=1)  # noqa: SIM115 - open for the app's lifetime
    count = 0

    async def handle(request: web.Request) -> web.Response:
        nonlocal count
        count += 1
        n = count
        hits.write(request.path_qs + "\n")
        delay = float(request.query.get("delay", "0"))
        if delay > 0:
            await asyncio.sleep(delay)
        status = int(request.query.get("status", "200"))
        body = json.dumps({"path": request.path_qs, "hit": n})
        return web.Response(status=status, text=body, content_type="application/json")

    async def close_hits(app: web.Application) -> None:
        hits.close()

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    app.on_cleanup.append(close_hits)
    return app


async def serve(address: str, port: int, hits_path: str) -> None:
    runner = web.AppRunner(make_app(hits_path), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, address, port).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--hits", required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.address, args.port, args.hits))


if __name__ == "__main__":
    main()
