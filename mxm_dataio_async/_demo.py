"""The demo ingestion: a loopback server, a full recorded pass, then a pass served from cache."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from mxm_dataio_async._registry import Registry
from mxm_dataio_async._retry import RetryPolicy
from mxm_dataio_async._session import AsyncSession
from mxm_dataio_async._store import Store
from mxm_dataio_async.adapters.http import HttpAdapter

__all__ = ["DemoPass", "DemoSummary", "run_demo"]


@dataclass(frozen=True, slots=True)
class DemoPass:
    name: str
    requests: int
    fetched: int
    from_cache: int
    failed: int
    seconds: float
    bytes: int

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True, slots=True)
class DemoSummary:
    root: Path | str
    passes: list[DemoPass]
    upstream_hits: int
    verified: int
    db_bytes: int


def _app(counter: list[int]) -> web.Application:
    async def item(request: web.Request) -> web.Response:
        counter[0] += 1
        n = int(request.match_info["n"])
        body = {
            "id": n,
            "symbol": f"SYM{n:04d}",
            "price": round(100 + n * 0.25, 2),
            "history": [round(100 + n * 0.25 - i * 0.01, 2) for i in range(80)],
        }
        return web.json_response(body)

    app = web.Application()
    app.router.add_get("/items/{n}", item)
    return app


async def run_demo(
    root: str | Path,
    *,
    payloads: str | Path | None = None,
    count: int = 300,
    concurrency: int = 32,
    on_progress: Callable[[str, int], None] | None = None,
) -> DemoSummary:
    """Serve ``count`` JSON items on 127.0.0.1, ingest them twice into ``root``, verify them all."""
    counter = [0]
    runner = web.AppRunner(_app(counter), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        passes: list[DemoPass] = []
        verified = 0
        async with Store(root, payloads=payloads) as store, Registry() as registry:
            registry.register(
                "demo",
                HttpAdapter(base_url=f"http://127.0.0.1:{port}"),
                max_concurrency=concurrency,
                retry=RetryPolicy(max_attempts=3, base_delay=0.05),
            )
            for name in ("pass 1", "pass 2"):
                fetched = cached = failed = nbytes = 0
                started = time.perf_counter()
                async with AsyncSession("demo", store=store, registry=registry) as s:
                    reqs = (s.request("item", endpoint=f"/items/{n}") for n in range(count))
                    async for outcome in s.fetch_many(reqs, concurrency=concurrency):
                        if outcome.response is None:
                            failed += 1
                        elif outcome.response.from_cache:
                            cached += 1
                        else:
                            fetched += 1
                            nbytes += outcome.response.size_bytes
                        if on_progress is not None:
                            on_progress(name, 1)
                passes.append(
                    DemoPass(
                        name, count, fetched, cached, failed, time.perf_counter() - started, nbytes
                    )
                )
            async for resp in store.iter_responses(source="demo", status="ok"):
                data = await store.read(resp)  # verified against its sha256
                json.loads(data)
                verified += 1
            db_bytes = (await store.stats()).db_bytes
        where = store.root if store.root is not None else store.location
        return DemoSummary(where, passes, counter[0], verified, db_bytes)
    finally:
        await runner.cleanup()
