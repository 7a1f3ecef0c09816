"""What every benchmark client shares: the worker pool that drives it, the figures of one phase,
the event loop it runs on, and the description of the machine."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, Final, TypeVar

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
    max_gap_ms: float | None = None
    """The longest the event loop went without a turn (in-process trials)."""
    max_gc_ms: float | None = None
    """The longest garbage collection in the same trial (a cause of loop gaps)."""
    slowest_commit_ms: float | None = None
    """The store's longest commit (in-process trials)."""

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
        "cores_server_client": list(placement()),
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


# -- where trials run, and whether their core ran at full speed --------------------------------

SLOWED: Final = 1.25
"""A trial whose calibration loop took this much longer than the fastest seen ran on a slowed
core (the host throttles vCPUs at random here): it is run again."""


def placement() -> tuple[int | None, int | None]:
    """(server core, client core): the first two cores this process may run on, so that the
    loopback server and the client never share one; ``(None, None)`` with fewer than two."""
    try:
        cores = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return None, None
    return (cores[0], cores[1]) if len(cores) >= 2 else (None, None)


def pin(core: int | None) -> None:
    """Run this process (and the threads and children it starts from now on) on ``core``."""
    if core is not None:
        os.sched_setaffinity(0, {core})


def calibration_ms() -> float:
    """How long a fixed pure-Python loop takes on this core now (best of three), in ms."""
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        x = 0
        for i in range(200_000):
            x = (x + i * i) % 1_000_003
        best = min(best, time.perf_counter() - t0)
    return round(best * 1000, 3)


def trial_main(run_trial: Callable[[dict[str, Any]], Any], spec_json: str) -> None:
    """A trial child's body: on the client core, calibrated before and after; prints one JSON
    line, ``{"result": ..., "calibration_ms": [before, after], "core": n}``."""
    core = placement()[1]
    pin(core)
    # Every client starts from the same malloc state: one 1 MiB buffer allocated and freed, as
    # mxm_dataio_async's settle_malloc() does. Without it, whether asyncio's 256 KiB socket reads
    # cost an mmap each depended on what the process had freed before (13-23 us a request, in
    # raw aiohttp's trials as in ours): the same client was fast in one trial, slow in the next.
    settle = bytearray(1 << 20)
    del settle
    before = calibration_ms()
    result = run_trial(json.loads(spec_json))
    after = calibration_ms()
    print(json.dumps({"result": result, "calibration_ms": [before, after], "core": core}))


class Trials:
    """Runs trial children (``script --trial SPEC``) and reruns one whose core was slowed.

    The fastest calibration seen so far (the driver's own at the start included, on the client
    core) is the yardstick; a trial whose calibration before or after it is more than ``SLOWED``
    times that is run again, up to ``tries`` times, and the last run is kept either way (marked).
    """

    def __init__(self, script: str | Path, *, tries: int = 3) -> None:
        self.script = str(Path(script).resolve())
        self.tries = tries
        self.best = calibration_ms()
        self.reruns = 0

    def run(self, spec: dict[str, Any], *, timeout: float = 900.0) -> tuple[Any, dict[str, Any]]:
        """The trial's result, and ``{"calibration_ms", "slowed", "tries"}`` about its run."""
        for attempt in range(1, self.tries + 1):
            cmd = [sys.executable, self.script, "--trial", json.dumps(spec)]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"trial {spec} failed:\n{proc.stderr[-4000:]}")
            out = json.loads(proc.stdout.strip().splitlines()[-1])
            calibration = [float(x) for x in out["calibration_ms"]]
            self.best = min(self.best, *calibration)
            slowed = max(calibration) > self.best * SLOWED
            if not slowed or attempt == self.tries:
                info = {"calibration_ms": calibration, "slowed": slowed, "tries": attempt}
                return out["result"], info
            self.reruns += 1
        raise AssertionError("unreachable")
