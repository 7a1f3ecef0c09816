"""HTTP benchmark: mxm-dataio-async side by side with its ceiling and its peer.

    python benchmarks/http_bench.py             # full run (~5 minutes on 2 cores)
    python benchmarks/http_bench.py --quick     # smoke run (~15 seconds)

One loopback aiohttp server (its own process, 127.0.0.1) serves 1 KiB, 32 KiB and 1 MiB bodies.
For each size, with the same worker pool and concurrency, in interleaved repeats:

- ``raw``:  aiohttp, one shared ClientSession, ``resp.read()``: the ceiling, no cache;
- ``peer``: aiohttp-client-cache, SQLite backend: misses into a fresh cache, then hits;
- ``ours``: HttpAdapter + AsyncSession + Store, default cache mode, full durable recording:
  misses (``fetch`` + ``read``), then hits in a new session on the same store.

Plus the in-process pipeline (``mock``): MockAdapter, 1 KiB, ``fetch_many(concurrency=64)``.
Each trial runs in a fresh child process (its own heap, its own CPU clock). Medians of the repeats
are printed (rich table and Markdown) and written, with every run, to benchmarks/results/http.json.
Nothing here is asserted: targets are reported PASS/MISS.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from _common import (
    Phase,
    Trials,
    machine,
    measured,
    median,
    pin,
    placement,
    run,
    trial_main,
    uvloop_available,
)
from _server import SIZES, ServerProcess, body, distinct

RESULTS = Path(__file__).resolve().parent / "results"
CLIENTS = ("raw", "peer", "ours")
# The in-process trial, as is and with gc.freeze() after the imports (what the CLI does: the
# objects of the imports are left out of every full collection, the loop's longest stalls).
MOCKS = ("mock", "mock+freeze")
LABELS = {1024: "1 KiB", 32 * 1024: "32 KiB", 1024 * 1024: "1 MiB"}


# -- the clients (each runs inside a trial child process) ----------------------------------------


async def trial_raw(port: int, size: int, n: int, concurrency: int) -> dict[str, Phase]:
    import aiohttp

    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as http:

        async def one(i: int) -> tuple[int, bool]:
            async with http.get(f"{base}/bytes/{size}/{i}") as resp:
                data = await resp.read()
                if resp.status != 200 or len(data) != size:
                    raise ValueError(f"status {resp.status}, {len(data)} bytes")
                return len(data), False

        return {"miss": await measured(port, one, n, concurrency)}


async def trial_peer(port: int, size: int, n: int, concurrency: int) -> dict[str, Phase]:
    from aiohttp_client_cache.backends.sqlite import SQLiteBackend
    from aiohttp_client_cache.session import CachedSession

    base = f"http://127.0.0.1:{port}"
    phases: dict[str, Phase] = {}
    with tempfile.TemporaryDirectory() as tmp:
        # The backend's defaults (no expiry, fast_save=False), as a user would start.
        backend = SQLiteBackend(cache_name=str(Path(tmp) / "peer.sqlite"))
        async with CachedSession(cache=backend) as http:

            async def one(i: int) -> tuple[int, bool]:
                async with http.get(f"{base}/bytes/{size}/{i}") as resp:
                    data = await resp.read()
                    if resp.status != 200 or len(data) != size:
                        raise ValueError(f"status {resp.status}, {len(data)} bytes")
                    return len(data), bool(getattr(resp, "from_cache", False))

            for phase in ("miss", "hit"):
                phases[phase] = await measured(port, one, n, concurrency)
    return phases


async def trial_ours(
    port: int, size: int, n: int, concurrency: int, only: str | None = None
) -> dict[str, Phase]:
    """``only="miss"`` stops after the misses (for profiling them alone)."""
    import mxm_dataio_async as dio

    phases: dict[str, Phase] = {}
    with tempfile.TemporaryDirectory() as tmp:
        async with dio.Store(tmp) as store, dio.Registry() as registry:
            registry.register("bench", dio.HttpAdapter(base_url=f"http://127.0.0.1:{port}"))
            for phase in ("miss", "hit") if only is None else (only,):
                # A new session per phase: hits come from the store, not from session memory.
                async with dio.AsyncSession("bench", store=store, registry=registry) as s:

                    async def one(i: int, s: dio.AsyncSession = s) -> tuple[int, bool]:
                        resp = await s.fetch(s.request("bytes", endpoint=f"/bytes/{size}/{i}"))
                        data = await s.read(resp)
                        if resp.status is not dio.ResponseStatus.OK or len(data) != size:
                            raise ValueError(f"status {resp.status}, {len(data)} bytes")
                        return len(data), resp.from_cache

                    phases[phase] = await measured(port, one, n, concurrency)
    return phases


class _LoopGaps:
    """The longest delay of a task that wakes every millisecond, beyond that millisecond: how
    long the event loop was kept from everything else (a stall); and the longest garbage
    collection meanwhile, since a full collection stalls the loop too (22-27 ms measured here:
    the worst gaps were those)."""

    def __init__(self) -> None:
        self.worst = 0.0
        self.worst_gc = 0.0
        self._gc_started = 0.0

    def gc_callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            self.worst_gc = max(self.worst_gc, time.perf_counter() - self._gc_started)

    # A tick every millisecond, not every turn of the loop: a task that only yields is one more
    # handle in every turn, and cost the mock trial 7-9% of its throughput (4 pairs, measured).
    TICK = 0.001

    async def run(self) -> None:
        tick = self.TICK
        last = time.perf_counter()
        while True:
            await asyncio.sleep(tick)
            now = time.perf_counter()
            self.worst = max(self.worst, now - last - tick)
            last = now


async def trial_mock(
    n: int, concurrency: int, *, checkpoint_off_commit: bool = True
) -> dict[str, Phase]:
    """The in-process pipeline: no network, every fetch recorded (miss) or served (hit).
    ``checkpoint_off_commit=False`` lets SQLite checkpoint inside commits (as before)."""
    import gc

    import mxm_dataio_async as dio
    from mxm_dataio_async._store._sqlite._checkpoint import settings

    settings.off_commit = checkpoint_off_commit

    payload = body(1024)
    phases: dict[str, Phase] = {}
    with tempfile.TemporaryDirectory() as tmp:
        async with dio.Store(tmp) as store, dio.Registry() as registry:
            # a distinct body per request, as the server's (a payload row each)
            registry.register("mock", dio.MockAdapter(lambda r: distinct(payload, str(r.params))))
            for phase in ("miss", "hit"):
                async with dio.AsyncSession("mock", store=store, registry=registry) as s:
                    ok = errors = cached = size = 0
                    first_error: str | None = None
                    gc.collect()
                    gaps = _LoopGaps()
                    gc.callbacks.append(gaps.gc_callback)
                    ticker = asyncio.get_running_loop().create_task(gaps.run())
                    writer = getattr(store.metadata, "_writer", None)
                    if writer is not None:
                        writer.slowest_commit = 0.0
                    wall0, cpu0 = time.perf_counter(), time.process_time()
                    requests = (s.request("k", params={"i": i}) for i in range(n))
                    async for outcome in s.fetch_many(requests, concurrency=concurrency):
                        if outcome.ok and outcome.response is not None:
                            ok += 1
                            cached += outcome.response.from_cache
                            size += outcome.response.size_bytes
                        else:
                            errors += 1
                            first_error = first_error or repr(outcome.error)
                    seconds, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
                    ticker.cancel()
                    gc.callbacks.remove(gaps.gc_callback)
                phases[phase] = Phase(
                    requests=n,
                    ok=ok,
                    errors=errors,
                    from_cache=cached,
                    bytes=size,
                    seconds=round(seconds, 4),
                    cpu_s=round(cpu, 4),
                    p50_ms=None,
                    p99_ms=None,
                    first_error=first_error,
                    max_gap_ms=round(gaps.worst * 1e3, 3),
                    max_gc_ms=round(gaps.worst_gc * 1e3, 3),
                    slowest_commit_ms=None
                    if writer is None
                    else round(writer.slowest_commit * 1e3, 3),
                )
    return phases


def _trial(spec: dict[str, Any]) -> dict[str, Any]:
    client, loop = spec["client"], spec["loop"]
    if client == "mock+freeze":
        import gc

        import mxm_dataio_async  # noqa: F401  (imported before the freeze, as by the CLI)

        gc.freeze()
    if client in MOCKS:
        off_commit = spec.get("checkpoint_off_commit", True)
        phases = run(
            trial_mock(spec["n"], spec["concurrency"], checkpoint_off_commit=off_commit), loop
        )
    elif client == "ours":
        args = (spec["port"], spec["size"], spec["n"], spec["concurrency"], spec.get("only"))
        phases = run(trial_ours(*args), loop)
    else:
        fn = {"raw": trial_raw, "peer": trial_peer}[client]
        phases = run(fn(spec["port"], spec["size"], spec["n"], spec["concurrency"]), loop)
    return {name: p.as_dict() for name, p in phases.items()}


# -- the driver ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Config:
    loops: list[str]
    sizes: list[int]
    clients: list[str]
    small: int
    large: int
    mock: int
    concurrency: int
    repeat: int

    def requests_for(self, size: int) -> int:
        return self.large if size >= 1024 * 1024 else self.small


def _run_all(
    cfg: Config, port: int, trials: Trials, say: Callable[[str], None]
) -> list[dict[str, Any]]:
    """Every trial, interleaved: for each loop and repeat, each size raw, peer, ours; then mock.
    A trial whose core was slowed meanwhile is run again (``Trials``)."""
    runs: list[dict[str, Any]] = []
    for loop in cfg.loops:
        for rep in range(1, cfg.repeat + 1):
            specs: list[dict[str, Any]] = [
                {"client": c, "size": size, "n": cfg.requests_for(size)}
                for size in cfg.sizes
                for c in cfg.clients
            ]
            if cfg.mock:
                specs += [{"client": c, "size": 1024, "n": cfg.mock} for c in MOCKS]
            for spec in specs:
                spec |= {"loop": loop, "port": port, "concurrency": cfg.concurrency}
                phases, info = trials.run(spec, timeout=900)
                for phase, fig in phases.items():
                    runs.append(
                        {"loop": loop, "repeat": rep, "client": spec["client"]}
                        | {"size": spec["size"], "phase": phase}
                        | fig
                        | info
                    )
                shown = "  ".join(
                    f"{ph} {fig['per_s']:,.0f}/s"
                    + (f" [{fig['errors']} errors]" if fig["errors"] else "")
                    for ph, fig in phases.items()
                )
                again = f"  (run {info['tries']} times: a slowed core)" if info["tries"] > 1 else ""
                say(
                    f"{loop:<7} run {rep}/{cfg.repeat}  {spec['client']:<4} "
                    f"{LABELS[spec['size']]:>6}  {shown}{again}"
                )
    return runs


_MEDIAN_FIELDS = (
    "per_s",
    "p50_ms",
    "p99_ms",
    "cpu_s",
    "cpu_us_per_req",
    "cpu_util",
    "seconds",
    "server_cpu_s",
    "max_gap_ms",
    "max_gc_ms",
    "slowest_commit_ms",
)


def _medians(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str, int, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["loop"], r["client"], r["size"], r["phase"]), []).append(r)
    out = []
    for (loop, client, size, phase), rs in groups.items():
        row: dict[str, Any] = {"loop": loop, "client": client, "size": size, "phase": phase}
        for field in _MEDIAN_FIELDS:
            values = [r[field] for r in rs if r.get(field) is not None]
            m = median(values)
            row[field] = round(m, 3) if m is not None else None
        row["requests"] = rs[0]["requests"]
        row["runs"] = len(rs)
        row["errors"] = sum(r["errors"] for r in rs)
        row["from_cache"] = statistics.median(r["from_cache"] for r in rs)
        upstream = [r["upstream"] for r in rs if r.get("upstream") is not None]
        row["upstream"] = statistics.median(upstream) if upstream else None
        row["per_s_runs"] = [r["per_s"] for r in rs]
        out.append(row)
    return out


def _find(
    medians: list[dict[str, Any]], loop: str, client: str, size: int, phase: str
) -> dict[str, Any] | None:
    for m in medians:
        if (m["loop"], m["client"], m["size"], m["phase"]) == (loop, client, size, phase):
            return m
    return None


def _ratio(top: dict[str, Any] | None, bottom: dict[str, Any] | None, field: str) -> float | None:
    if top is None or bottom is None or not top[field] or not bottom[field]:
        return None
    return round(float(top[field]) / float(bottom[field]), 3)


def _add_ratios(medians: list[dict[str, Any]]) -> None:
    """On each ``ours`` row: its median req/s over raw's (misses) and over peer's (same phase).

    The ``_cpu`` variants compare CPU per request instead (theirs / ours, so above 1 is still
    better for ours): what the ratio would be if every client had a whole core to itself. They
    hold still when the machine is busy, which the wall-clock ratios do not.
    """
    for m in medians:
        if m["client"] in MOCKS:
            m["per_cpu_s"] = round(1e6 / m["cpu_us_per_req"]) if m["cpu_us_per_req"] else None
        if m["client"] != "ours":
            continue
        raw = _find(medians, m["loop"], "raw", m["size"], "miss")
        peer = _find(medians, m["loop"], "peer", m["size"], m["phase"])
        m["ours_over_raw"] = _ratio(m, raw, "per_s")
        m["ours_over_peer"] = _ratio(m, peer, "per_s")
        m["ours_over_raw_cpu"] = _ratio(raw, m, "cpu_us_per_req")
        m["ours_over_peer_cpu"] = _ratio(peer, m, "cpu_us_per_req")


# (name, client, size, phase, figure, the same by CPU per request, threshold per loop): the
# targets of the performance issue (#19).
TARGETS: list[tuple[str, str, int, str, str, str, dict[str, float]]] = [
    ("misses 1 KiB ours/raw", "ours", 1024, "miss", "ours_over_raw", "ours_over_raw_cpu",
     {"asyncio": 0.45, "uvloop": 0.5}),
    ("misses 1 KiB ours/peer", "ours", 1024, "miss", "ours_over_peer", "ours_over_peer_cpu",
     {"asyncio": 4.5, "uvloop": 4.5}),
    ("hits 1 KiB ours/peer", "ours", 1024, "hit", "ours_over_peer", "ours_over_peer_cpu",
     {"asyncio": 4.0, "uvloop": 4.0}),
    ("hits 1 KiB ours/raw", "ours", 1024, "hit", "ours_over_raw", "ours_over_raw_cpu",
     {"asyncio": 1.8, "uvloop": 1.8}),
    ("misses 32 KiB ours/raw", "ours", 32768, "miss", "ours_over_raw", "ours_over_raw_cpu",
     {"asyncio": 0.4, "uvloop": 0.4}),
    ("in-process recorded fetches/s (mock)", "mock", 1024, "miss", "per_s", "per_cpu_s",
     {"asyncio": 12_000.0, "uvloop": 12_000.0}),
]  # fmt: skip


def _targets(medians: list[dict[str, Any]], loops: list[str]) -> list[dict[str, Any]]:
    out = []
    for loop in loops:
        for name, client, size, phase, figure, by_cpu, thresholds in TARGETS:
            threshold = thresholds[loop]
            m = _find(medians, loop, client, size, phase)
            value = m.get(figure) if m is not None else None
            out.append(
                {
                    "loop": loop,
                    "target": name,
                    "threshold": threshold,
                    "value": value,
                    "by_cpu": m.get(by_cpu) if m is not None else None,
                    "verdict": "n/a" if value is None else "PASS" if value >= threshold else "MISS",
                }
            )
    return out


# -- output --------------------------------------------------------------------------------------

_COLUMNS = ("size", "client", "phase", "req/s", "p50 ms", "p99 ms", "CPU s", "CPU µs/req")
# ours over the other by req/s, and by CPU per request (theirs/ours: above 1 is better for ours)
_RATIOS = ("ours/raw", "ours/raw CPU", "ours/peer", "ours/peer CPU")


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _cells(m: dict[str, Any]) -> list[str]:
    return [
        LABELS[m["size"]] if m["client"] not in MOCKS else "1 KiB",
        m["client"],
        m["phase"],
        _fmt(m["per_s"], ",.0f"),
        _fmt(m["p50_ms"], ".2f"),
        _fmt(m["p99_ms"], ".2f"),
        _fmt(m["cpu_s"], ".2f"),
        _fmt(m["cpu_us_per_req"], ",.0f"),
        _fmt(m.get("ours_over_raw"), ".2f"),
        _fmt(m.get("ours_over_raw_cpu"), ".2f"),
        _fmt(m.get("ours_over_peer"), ".2f"),
        _fmt(m.get("ours_over_peer_cpu"), ".2f"),
    ]


def _ordered(medians: list[dict[str, Any]], loop: str) -> list[dict[str, Any]]:
    order = {c: i for i, c in enumerate((*CLIENTS, *MOCKS))}
    rows = [m for m in medians if m["loop"] == loop]
    return sorted(
        rows,
        key=lambda m: (m["client"] in MOCKS, m["size"], m["phase"] == "hit", order[m["client"]]),
    )


def _print_rich(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 104))  # no truncated columns when piped
    medians, cfg = report["medians"], report["config"]
    for loop in cfg["loops"]:
        table = Table(
            title=f"{loop}: medians of {cfg['repeat']} runs, concurrency {cfg['concurrency']}",
            title_justify="left",
            pad_edge=False,
            box=None,
            header_style="bold",
        )
        for col in (*_COLUMNS, *_RATIOS):
            table.add_column(col, justify="left" if col in ("size", "client", "phase") else "right")
        last_size = None
        for m in _ordered(medians, loop):
            if last_size is not None and (m["size"], m["client"] in MOCKS) != last_size:
                table.add_section()
            last_size = (m["size"], m["client"] in MOCKS)
            table.add_row(*_cells(m), style="bold" if m["client"] == "ours" else None)
        console.print(table)
        console.print()
    targets = Table(title="targets", title_justify="left", box=None, header_style="bold")
    for col in ("loop", "target", "value", "needs", "verdict", "by CPU"):
        targets.add_column(col, justify="left" if col in ("loop", "target", "verdict") else "right")
    for t in report["targets"]:
        colour = {"PASS": "green", "MISS": "red"}.get(t["verdict"], "yellow")
        spec = ",.0f" if t["threshold"] >= 100 else ".2f"
        targets.add_row(
            t["loop"],
            t["target"],
            _fmt(t["value"], spec),
            f">= {format(t['threshold'], spec)}",
            f"[{colour}]{t['verdict']}[/]",
            _fmt(t["by_cpu"], spec),
        )
    console.print(targets)
    for m in medians:
        if m["errors"] or (m["phase"] == "hit" and m["upstream"]):
            console.print(
                f"[yellow]warning[/]: {m['loop']} {m['client']} {LABELS[m['size']]} {m['phase']}:"
                f" {m['errors']} errors, {m['upstream']} upstream requests"
            )
        if m["client"] not in MOCKS and m["cpu_util"] is not None and m["cpu_util"] < 0.85:
            console.print(
                f"[yellow]note[/]: {m['loop']} {m['client']} {LABELS[m['size']]} {m['phase']}: the"
                f" client used {m['cpu_util']:.0%} of a core (a busy machine, or waiting on I/O);"
                " its req/s understates it, its CPU µs/req does not"
            )
    console.print(
        "by CPU: the same ratio from CPU µs per request (theirs/ours), or fetches per CPU second:"
        " what it would be with a core to itself, steady on a busy machine"
    )


def markdown(report: dict[str, Any]) -> str:
    """README-ready tables: one per loop, then the targets."""
    lines: list[str] = []
    m0 = report["machine"]
    cfg = report["config"]
    lines.append(
        f"Medians of {cfg['repeat']} interleaved runs, concurrency {cfg['concurrency']}; "
        f"{m0['cores']} cores ({m0['cpu_model']}), Python {m0['python']}, {m0['date'][:10]}."
    )
    for loop in cfg["loops"]:
        lines += ["", f"**{loop}**", ""]
        header = (*_COLUMNS, *_RATIOS)
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join("---" if i < 3 else "--:" for i in range(len(header))) + "|")
        for m in _ordered(report["medians"], loop):
            cells = _cells(m)
            if m["client"] == "ours":
                cells = [f"**{c}**" if c != "-" else c for c in cells]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| loop | target | value | needs | | by CPU |", "|---|---|--:|--:|---|--:|"]
    for t in report["targets"]:
        spec = ",.0f" if t["threshold"] >= 100 else ".2f"
        lines.append(
            f"| {t['loop']} | {t['target']} | {_fmt(t['value'], spec)} | "
            f">= {format(t['threshold'], spec)} | {t['verdict']} | {_fmt(t['by_cpu'], spec)} |"
        )
    for m in report["medians"]:
        if m["client"] in MOCKS and m["phase"] == "miss" and m.get("max_gap_ms") is not None:
            lines.append(
                f"\n{m['loop']}, {m['client']} misses: worst event-loop gap "
                f"{m['max_gap_ms']:.1f} ms "
                f"(longest garbage collection {_fmt(m.get('max_gc_ms'), '.1f')} ms), slowest "
                f"store commit {_fmt(m.get('slowest_commit_ms'), '.1f')} ms"
            )
    return "\n".join(lines)


# -- command line --------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: few requests, 1 repeat")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved repeats (medians)")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight")
    parser.add_argument("--requests", type=int, default=10_000, help="per phase, 1 and 32 KiB")
    parser.add_argument("--requests-large", type=int, default=1000, help="per phase, 1 MiB")
    parser.add_argument("--mock-requests", type=int, default=20_000, help="0 skips the mock run")
    parser.add_argument("--loop", choices=["asyncio", "uvloop", "both"], default="both")
    parser.add_argument("--size", type=int, choices=SIZES, action="append", help="repeatable")
    parser.add_argument("--client", choices=CLIENTS, action="append", help="repeatable")
    parser.add_argument("--server-lifetime", type=float, default=1800.0, help="seconds")
    parser.add_argument("--out", type=Path, help="default results/http.json (--quick: http-quick)")
    parser.add_argument("--trial", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trial:
        trial_main(_trial, args.trial)
        return

    if args.quick:
        args.repeat, args.requests, args.requests_large = 1, 1000, 60
        args.mock_requests = min(args.mock_requests, 3000)
    loops = ["asyncio", "uvloop"] if args.loop == "both" else [args.loop]
    if not uvloop_available():
        if args.loop == "uvloop":
            raise SystemExit("uvloop is not installed: pip install -e '.[bench]'")
        loops = ["asyncio"]
    cfg = Config(
        loops=loops,
        sizes=sorted(args.size or SIZES),
        clients=[c for c in CLIENTS if c in (args.client or CLIENTS)],
        small=args.requests,
        large=args.requests_large,
        mock=args.mock_requests,
        concurrency=args.concurrency,
        repeat=args.repeat,
    )
    out = args.out or RESULTS / ("http-quick.json" if args.quick else "http.json")

    from rich.console import Console

    console = Console()
    report: dict[str, Any] = {"machine": machine(), "config": {}}
    started = time.perf_counter()
    server_core, client_core = placement()
    with ServerProcess(lifetime=args.server_lifetime) as server:
        pin(client_core)  # the driver calibrates (and its trials run) on the client's core
        trials = Trials(__file__)
        report["config"] = {
            **asdict(cfg),
            "server": {
                "loop": server.loop if uvloop_available() else "asyncio",
                "host": "127.0.0.1",
                "core": server_core,
            },
            "client_core": client_core,
        }
        runs = _run_all(cfg, server.port, trials, lambda line: console.print(line, highlight=False))
        report["config"]["reruns_on_a_slowed_core"] = trials.reruns
    medians = _medians(runs)
    _add_ratios(medians)
    report |= {
        "seconds": round(time.perf_counter() - started, 1),
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        "medians": medians,
        "targets": _targets(medians, cfg.loops),
        "runs": runs,
    }
    console.print()
    _print_rich(report)
    console.print(f"\n{report['seconds']:.0f} s in all; written to {out}\n")
    print(markdown(report))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
