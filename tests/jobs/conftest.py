"""A loopback aiohttp server in its own thread (so sync CLI tests and async API tests can share
it), job files written into tmp dirs, and the CLI run as a real process."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

ROOT_DIR = Path(__file__).resolve().parents[2]


def _open_gate() -> threading.Event:
    gate = threading.Event()
    gate.set()
    return gate


@dataclass
class JobServer:
    """Counts every request by path and query; ``delay`` slows answers, ``fail`` symbols 404;
    ``pause()`` holds every answer (requests are still counted on arrival) until ``resume()``.
    ``arrivals`` has each item request's ``time.monotonic()`` on arrival; an item path in
    ``throttle`` is answered once with 429 and ``Retry-After`` of that many seconds."""

    url: str = ""
    hits: Counter[str] = field(default_factory=Counter)
    auth: list[str | None] = field(default_factory=list)
    delay: float = 0.0
    fail: set[str] = field(default_factory=set)
    gate: threading.Event = field(default_factory=_open_gate)
    arrivals: list[tuple[float, str]] = field(default_factory=list)
    throttle: dict[str, int] = field(default_factory=dict)
    throttled: list[tuple[float, str]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.hits.values())

    def pause(self) -> None:
        self.gate.clear()

    def resume(self) -> None:
        self.gate.set()

    async def answer(self) -> None:
        """Wait while paused, then for ``delay`` (on the server's loop)."""
        while not self.gate.is_set():  # noqa: ASYNC110 - set from the test's thread
            await asyncio.sleep(0.005)
        if self.delay:
            await asyncio.sleep(self.delay)


def _app(srv: JobServer) -> web.Application:
    async def bars(request: web.Request) -> web.Response:
        srv.hits[request.path_qs] += 1
        srv.auth.append(request.headers.get("Authorization"))
        await srv.answer()
        symbol = request.match_info["symbol"]
        if symbol in srv.fail:
            return web.Response(status=404, text=f"no such symbol {symbol}")
        return web.json_response({"symbol": symbol, "query": dict(request.query)})

    async def item(request: web.Request) -> web.Response:
        srv.arrivals.append((time.monotonic(), request.path_qs))
        srv.hits[request.path_qs] += 1
        retry_after = srv.throttle.pop(request.path_qs, None)
        if retry_after is not None:
            srv.throttled.append((time.monotonic(), request.path_qs))
            return web.Response(status=429, headers={"Retry-After": str(retry_after)})
        await srv.answer()
        return web.json_response({"item": request.match_info["n"]})

    app = web.Application()
    app.router.add_get("/bars/{symbol}", bars)
    app.router.add_get("/items/{n}", item)
    return app


@pytest.fixture
def job_server() -> Iterator[JobServer]:
    srv = JobServer()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="job-server", daemon=True)
    thread.start()

    async def start() -> web.AppRunner:
        runner = web.AppRunner(_app(srv), shutdown_timeout=0.5, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        srv.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        return runner

    runner = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        yield srv
    finally:
        srv.resume()  # a test that failed while paused must not hold the answers forever
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def write_job(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def bars_job(
    url: str,
    *,
    name: str = "prices_daily",
    symbols: list[str] | None = None,
    start: str = "2024-01-01",
    end: str = "2024-03-31",
    chunk: str = "1mo",
    **extra: Any,
) -> dict[str, Any]:
    """The README's example job against the loopback server."""
    return {
        "job": name,
        "store": "./dataio",
        "sources": {
            "prices": {
                "adapter": "http",
                "base_url": url,
                "headers": {"Authorization": "Bearer ${PRICES_TOKEN}"},
                "max_concurrency": 8,
                "retry": {"max_attempts": 2, "base_delay": 0.01, "max_delay": 0.05},
            }
        },
        "requests": [
            {
                "source": "prices",
                "kind": "bars",
                "endpoint": "/bars/{symbol}",
                "params": {"start": "{start}", "end": "{end}"},
                "expand": {
                    "symbol": symbols or ["CSPX.L", "VWRL.L", "EQQQ.L"],
                    "dates": {"start": start, "end": end, "chunk": chunk},
                },
            }
        ],
        "concurrency": 16,
        **extra,
    }


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MXM_DATAIO_ROOT", None)
    env.update({"PRICES_TOKEN": "s3cr3t-token", "COLUMNS": "200"}, **extra)
    return env


def cli_process(*args: str, cwd: Path | None = None, **env: str) -> subprocess.Popen[str]:
    """``mxm-dataio ARGS`` in its own process (stdout and stderr piped)."""
    return subprocess.Popen(
        [sys.executable, "-m", "mxm_dataio_async", *args],
        cwd=cwd or ROOT_DIR,
        env=cli_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def cli(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mxm_dataio_async", *args],
        cwd=ROOT_DIR,
        env=cli_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The token the example jobs use, no inherited store root, and a job without ``store:``
    writing its ./dataio into the test's tmp dir rather than the repository."""
    monkeypatch.setenv("PRICES_TOKEN", "s3cr3t-token")
    monkeypatch.delenv("MXM_DATAIO_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
