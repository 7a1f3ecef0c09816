"""What every benchmark client shares: the worker pool that drives it, the figures of one phase,
the event loop it runs on, and the description of the machine."""

from __future__ import annotations

import asyncio
import gc
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

One = Callable[[int], Awaitable[tuple[int, bool]]]
"""One request of a phase: given its index, returns (body bytes, served from cache)."""


@dataclass(frozen=True, slots=True)
class Phase:
    """The figures of one phase of one client: ``requests`` issued, ``concurrency`` in flight."""

    requests: int
    ok: int
    errors: int
    from_cache: int
    bytes: int
    seconds: float
    cpu_s: float
    p50_ms: float | None
    p99_ms: float | None
    first_error: str | None = None
    upstream: int | None = None
    server_cpu_s: float | None = None

    @property
    def per_s(self) -> float:
        return self.ok / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_us_per_req(self) -> float:
        return self.cpu_s / self.ok * 1e6 if self.ok else 0.0

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["per_s"] = round(self.per_s, 1)
        out["cpu_us_per_req"] = round(self.cpu_us_per_req, 1)
        out["cpu_util"] = round(self.cpu_s / self.seconds, 3) if self.seconds > 0 else None
        return out


def quantile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank quantile of an already sorted list."""
    index = min(len(sorted_values) - 1, max(0, round(q * len(sorted_values)) - 1))
    return sorted_values[index]


async def drive(one: One, requests: int, concurrency: int) -> Phase:
    """Run ``one(0..requests-1)`` with exactly ``concurrency`` in flight (a pool of workers, each
    taking the next index when its previous request is done), timing each request."""
    latencies: list[float] = []
    errors: list[str] = []
    totals = [0, 0]  # bytes, from_cache
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < requests:
            i = next_index
            next_index += 1
            t0 = time.perf_counter()
            try:
                size, cached = await one(i)
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            latencies.append(time.perf_counter() - t0)
            totals[0] += size
            totals[1] += cached

    gc.collect()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    async with asyncio.TaskGroup() as tg:
        for _ in range(min(concurrency, requests)):
            tg.create_task(worker())
    seconds, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    latencies.sort()
    return Phase(
        requests=requests,
        ok=len(latencies),
        errors=len(errors),
        from_cache=totals[1],
        bytes=totals[0],
        seconds=round(seconds, 4),
        cpu_s=round(cpu, 4),
        p50_ms=round(quantile(latencies, 0.50) * 1000, 3) if latencies else None,
        p99_ms=round(quantile(latencies, 0.99) * 1000, 3) if latencies else None,
        first_error=errors[0] if errors else None,
    )


async def server_stats(port: int) -> dict[str, float]:
    """The loopback server's counters: requests served and its CPU seconds (untimed)."""
    import aiohttp

    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}/stats") as resp,
    ):
        out: dict[str, float] = await resp.json()
    return out


async def measured(port: int, one: One, requests: int, concurrency: int) -> Phase:
    """``drive`` plus how many requests reached the server and the server's CPU meanwhile."""
    before = await server_stats(port)
    phase = await drive(one, requests, concurrency)
    after = await server_stats(port)
    return replace(
        phase,
        upstream=int(after["requests"] - before["requests"]),
        server_cpu_s=round(after["cpu_s"] - before["cpu_s"], 4),
    )


def uvloop_available() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def run(main: Coroutine[Any, Any, T], loop: str) -> T:
    """Run ``main`` on a fresh loop: ``"asyncio"`` (the default loop) or ``"uvloop"``."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git_revision() -> str | None:
    repo = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--", "mxm_dataio_async"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}+dirty" if dirty else head


def machine() -> dict[str, Any]:
    """Cores, CPU model, Python, the versions measured, the load when the run started."""
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cores": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "mxm_dataio_async_revision": _git_revision(),
        "versions": {
            name: _version(name)
            for name in (
                "mxm-dataio-async",
                "aiohttp",
                "aiohttp-client-cache",
                "aiosqlite",
                "uvloop",
            )
        },
    }
