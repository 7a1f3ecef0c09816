"""The loopback HTTP server of the benchmarks, run in its own process.

``/bytes/{size}/{n}`` answers ``size`` deterministic bytes, distinct for each ``n``
(``distinct``: the first 16 bytes are a hash of ``n``, the rest precomputed), after ``?delay=S``
seconds if asked: the first pass over a fresh cache is all misses, and a content-addressed store
keeps a payload per URL, as real pages need. (Until 2026-11-30 every URL of a size got the same
bytes, which this library's store wrote once and the peer once per URL: that flattered our
misses.) ``/stats`` answers the requests served and the server's own CPU seconds, so a trial can
tell how many requests reached upstream and whether the server, rather than the client, was the
limit.

The process binds 127.0.0.1 on port 0, prints ``PORT <n>`` on stdout, and exits by itself after
``--lifetime`` seconds or as soon as its parent process is gone.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Self

from _common import placement
from aiohttp import web

SIZES = (1024, 32 * 1024, 1024 * 1024)


def body(size: int) -> bytes:
    """The deterministic body of ``size`` bytes (seeded random: nothing compresses it)."""
    return random.Random(size).randbytes(size)


def distinct(data: bytes, key: str) -> bytes:
    """``data`` made distinct for ``key``: its first 16 bytes replaced by a hash of the key."""
    return hashlib.blake2b(key.encode(), digest_size=16).digest() + data[16:]


def _app(bodies: dict[int, bytes]) -> web.Application:
    served = [0]

    async def serve_bytes(request: web.Request) -> web.Response:
        data = bodies.get(int(request.match_info["size"]))
        if data is None:
            raise web.HTTPNotFound(text=f"sizes served: {sorted(bodies)}")
        served[0] += 1
        delay = float(request.query.get("delay", "0"))
        if delay > 0:  # a latency-bound upstream (benchmarks/workers.py)
            await asyncio.sleep(delay)
        data = distinct(data, request.match_info["n"])
        return web.Response(body=data, content_type="application/octet-stream")

    async def stats(request: web.Request) -> web.Response:
        return web.json_response({"requests": served[0], "cpu_s": time.process_time()})

    app = web.Application()
    app.router.add_get("/bytes/{size}/{n}", serve_bytes)
    app.router.add_get("/stats", stats)
    return app


async def _serve(lifetime: float, parent: int) -> None:
    bodies = {size: body(size) for size in SIZES}
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    runner = web.AppRunner(_app(bodies), access_log=None)
    await runner.setup()
    try:
        await web.SockSite(runner, sock, backlog=1024).start()
        print(f"PORT {sock.getsockname()[1]}", flush=True)
        deadline = time.monotonic() + lifetime
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        # Polling the parent is portable and costs nothing at this rate; a dead parent re-parents
        # us (getppid changes), so no benchmark run can leave a server behind.
        def watch() -> None:
            if time.monotonic() >= deadline or os.getppid() != parent:
                stop.set()
            else:
                loop.call_later(0.5, watch)

        watch()
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description="loopback benchmark server (127.0.0.1 only)")
    parser.add_argument("--lifetime", type=float, default=900.0, help="seconds before exiting")
    parser.add_argument("--parent", type=int, default=os.getppid(), help="exit when it is gone")
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="uvloop")
    parser.add_argument("--cpu", type=int, help="the core to run on (default: any)")
    args = parser.parse_args()
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    factory = None
    if args.loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(_serve(args.lifetime, args.parent))


class ServerProcess:
    """The server as a child process: ``with ServerProcess() as srv: srv.port``."""

    def __init__(self, *, lifetime: float = 900.0, loop: str = "uvloop") -> None:
        self.lifetime = lifetime
        self.loop = loop
        self.port = 0
        self._proc: subprocess.Popen[str] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--lifetime",
            str(self.lifetime),
            "--parent",
            str(os.getpid()),
            "--loop",
            self.loop,
        ]
        core = placement()[0]  # a core of its own: the client's trials run on another
        if core is not None:
            cmd += ["--cpu", str(core)]
        self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()  # the server prints its port at once, or dies
        if not line.startswith("PORT "):
            self._stop()
            raise RuntimeError(f"benchmark server failed to start (said {line!r})")
        self.port = int(line.split()[1])
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop()

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


if __name__ == "__main__":
    main()
