"""The ``run`` command: an ingestion job from its file, with its progress display, signals and
summary (shared with ``worker`` in ``_workers.py``)."""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Protocol, TypeVar

import anyio
import typer
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from mxm_dataio_async._cli._common import (
    JsonOption,
    RedisOption,
    VerboseOption,
    _errors,
    _print_json,
    _run,
    app,
    console,
    err_console,
    show_logs,
)

if TYPE_CHECKING:
    from mxm_dataio_async.jobs import JobPlan, JobSummary, SourceSummary

T = TypeVar("T")

EXIT_FAILED, EXIT_INVALID_JOB, EXIT_LEASE_HELD, EXIT_INTERRUPTED = 1, 2, 3, 130


class _RateColumn(ProgressColumn):
    """Finished requests per second (rich's own speed estimate over the last 30 s)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("-/s" if speed is None else f"{speed:,.0f}/s", style="progress.data.speed")


def _job_progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("cached {task.fields[cached]}"),
        TextColumn("failed {task.fields[failed]}"),
        TextColumn("{task.fields[ops]}"),
        _RateColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=False,
    )


class _Interrupt:
    """A stop request from Ctrl-C or SIGTERM: ``event`` is set, ``reason()`` says which."""

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.signal: signal.Signals | None = None

    def reason(self) -> str:
        return "interrupted" if self.signal is None else f"interrupted ({self.signal.name})"


async def _on_signals(
    fn: Callable[[_Interrupt], Awaitable[T]], *, cancel: bool
) -> tuple[T | None, bool]:
    """Run ``fn(interrupt)``; Ctrl-C (or SIGTERM) sets ``interrupt.event`` (and with
    ``cancel=True`` also cancels ``fn``). Returns ``(result, interrupted)``. A second Ctrl-C
    interrupts at once."""
    interrupt = _Interrupt()
    outcome: list[T] = []
    failure: list[Exception] = []
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    interrupt.signal = signal.Signals(signum)
                    interrupt.event.set()
                    if cancel:
                        tg.cancel_scope.cancel()
                    return  # the default handler is back: a second Ctrl-C raises at once

        tg.start_soon(watch)
        try:
            outcome.append(await fn(interrupt))
        except Exception as exc:  # re-raised below, not wrapped in an ExceptionGroup
            failure.append(exc)
        finally:
            tg.cancel_scope.cancel()
    if failure:
        raise failure[0]
    return (outcome[0] if outcome else None), interrupt.event.is_set()


def _plan_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str, separators=(",", ":"))


class _Summary(Protocol):
    @property
    def interrupted(self) -> bool: ...

    def to_json(self) -> dict[str, Any]: ...


_S = TypeVar("_S", bound=_Summary)


def _report(
    summary: _S | None,
    interrupted: bool,
    as_json: bool,
    show: Callable[[_S], None],
    resume: str,
) -> _S:
    """Print a run's (or a worker's) summary; exit 130 if it was interrupted, saying how
    to ``resume``; else return it."""
    if summary is not None:
        if as_json:
            _print_json(summary.to_json())
        else:
            show(summary)
    if interrupted or summary is None or summary.interrupted:
        err_console.print(
            f"[yellow]interrupted:[/yellow] what was recorded is kept; {resume}", soft_wrap=True
        )
        raise typer.Exit(EXIT_INTERRUPTED)
    return summary


def _print_dry_run(plan: JobPlan, store_root: str | Path, show: int, as_json: bool) -> None:
    import itertools

    first = [p.to_json() for p in itertools.islice(plan, show)]
    per_source = {name: plan.count(name) for name in plan.sources}
    if as_json:
        _print_json(
            {
                "job": plan.config.job,
                "store": str(store_root),
                "total": plan.total,
                "sources": per_source,
                "first": first,
            }
        )
        return
    counts = ", ".join(f"{name}: {n:,}" for name, n in per_source.items())
    console.print(
        f"job {escape(plan.config.job)}: {plan.total:,} requests ({escape(counts)}) "
        f"into {escape(str(store_root))}; dry run, nothing called",
        soft_wrap=True,
    )
    if not first:
        return
    table = Table(title=f"first {len(first)}")
    for col in ("#", "source", "kind", "method", "endpoint", "params", "as_of_bucket", "cache"):
        table.add_column(col, overflow="fold")
    for i, r in enumerate(first):
        table.add_row(
            str(i + 1),
            escape(r["source"]),
            escape(r["kind"]),
            r["method"],
            escape(r["endpoint"] or ""),
            escape(_plan_json(r["params"]) if r["params"] else ""),
            escape(r["as_of_bucket"] or ""),
            r["cache_mode"],
        )
    console.print(table)


def _print_summary(summary: JobSummary) -> None:
    table = Table(title=f"job {escape(summary.job)} into {escape(str(summary.root))}")
    columns = ("source", "requests", "fetched", "from cache", "failed", "req/s", "elapsed",
               "session")  # fmt: skip
    for col in columns:
        table.add_column(col, justify="left" if col in ("source", "session") else "right")
    for s in summary.sources.values():
        rate = s.done / s.elapsed if s.elapsed > 0 else 0.0
        table.add_row(
            escape(s.source),
            f"{s.total:,}" if s.total is not None else "?",
            f"{s.fetched:,}",
            f"{s.from_cache:,}",
            f"{s.failed:,}",
            f"{rate:,.0f}",
            f"{s.elapsed:,.1f}s",
            s.session_id or "",
        )
    console.print(table)
    for s in summary.sources.values():
        for line in s.errors[:10]:
            err_console.print(
                f"[red]failed[/red] {escape(s.source)}: {escape(line)}", soft_wrap=True
            )
        if s.failed > 10:
            err_console.print(f"... and {s.failed - 10:,} more failures of {escape(s.source)}")
    verdict = "ok" if summary.ok else f"{summary.failed:,} failed"
    console.print(
        f"{summary.done:,} of {summary.total:,} requests: {summary.fetched:,} fetched, "
        f"{summary.from_cache:,} from cache, {verdict}, in {summary.elapsed:,.1f}s",
        soft_wrap=True,
    )
    if summary.records_parsed or summary.datasets:
        console.print(
            f"records: {summary.records_parsed:,} parsed, {summary.records_failed:,} failed, "
            f"{summary.records_added:,} added",
            soft_wrap=True,
        )
    for d in summary.datasets:
        if d.error is not None:
            err_console.print(
                f"[red]not published[/red] {escape(d.name)}: {escape(d.error)}", soft_wrap=True
            )
        else:
            shown = f"version {d.version}" if d.version is not None else "empty"
            console.print(
                f"dataset {escape(d.name)}: {d.added:,} added, {d.changed:,} changed, {shown}"
                + ("" if d.published else " (nothing new)"),
                soft_wrap=True,
            )


@app.command("run")
def run_command(
    job_file: Annotated[Path, typer.Argument(help="The job file (YAML); see the README, Jobs.")],
    root: Annotated[
        Path | None,
        typer.Option(
            "--root",
            help="Store directory (default: the job's store:, else $MXM_DATAIO_STORE, "
            "else $MXM_DATAIO_ROOT, else ./dataio).",
        ),
    ] = None,
    store_url: Annotated[
        str | None,
        typer.Option(
            "--store",
            help="The store: a folder or postgresql://user@host:port/db (default as --root).",
        ),
    ] = None,
    payloads_url: Annotated[
        str | None,
        typer.Option(
            "--payloads",
            help="Where large payloads live: a folder or s3://bucket/prefix (default: the "
            "job's payloads:, else $MXM_DATAIO_PAYLOADS, else the store's folder).",
        ),
    ] = None,
    redis_url: RedisOption = None,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Count the requests, list the first ones; call nothing."),
    ] = False,
    limit: Annotated[
        int | None, typer.Option(min=0, help="Only the first N requests, in file order.")
    ] = None,
    only: Annotated[
        list[str] | None, typer.Option("--only", help="Only this source (repeatable).")
    ] = None,
    wait: Annotated[
        bool,
        typer.Option("--wait", help="If this job is running already, wait for it (else refuse)."),
    ] = False,
    allow_failures: Annotated[
        bool, typer.Option("--allow-failures", help="Exit 0 even if some requests failed.")
    ] = False,
    show: Annotated[int, typer.Option(min=0, help="--dry-run: how many requests to list.")] = 10,
    as_json: JsonOption = False,
    verbose: VerboseOption = False,
    stats_every: Annotated[
        float | None,
        typer.Option(
            "--stats-every",
            min=0.1,
            help="Every N seconds, one JSON line per running source on stderr: requests, "
            "fetched, hits, retries, failures, bytes, rate, limiter wait, breaker.",
        ),
    ] = None,
) -> None:
    """Run an ingestion job: every request its file describes, through the cache.

    Rerunning fetches only what is missing or stale. Exit status: 0 every request ended OK
    (or --allow-failures), 1 some failed (or an error), 2 the job file is invalid (nothing ran),
    3 the job is running already (its lease is held; --wait waits), 130 interrupted.
    """
    from mxm_dataio_async._exceptions import LeaseHeld
    from mxm_dataio_async.jobs import (
        JobConfigError,
        JobPlan,
        load_job,
        resolve_payloads,
        resolve_root,
        run_job,
    )

    show_logs(verbose, False)
    with _errors(verbose):
        if store_url is not None and root is not None:
            raise ValueError("give --store or --root, not both (--root is a store folder)")
        try:
            config = load_job(job_file)
            store_root = resolve_root(config, store_url if store_url is not None else root)
            payloads_at = resolve_payloads(config, payloads_url)
            if dry_run:
                plan = JobPlan(config, limit=limit, only=only)
                _print_dry_run(plan, store_root, show, as_json)
                return
            with contextlib.ExitStack() as stack:
                shown: Callable[[SourceSummary], None] | None = None
                if not as_json:
                    progress = stack.enter_context(_job_progress())
                    tasks: dict[str, TaskID] = {}

                    def shown(s: SourceSummary) -> None:
                        if s.source not in tasks:
                            tasks[s.source] = progress.add_task(
                                s.source, total=s.total, cached=0, failed=0, ops=""
                            )
                        progress.update(
                            tasks[s.source],
                            completed=s.done,
                            cached=s.from_cache,
                            failed=s.failed,
                            ops=_ops(s),
                        )

                on_progress = _with_stats_lines(shown, stats_every)

                summary, interrupted = _run(
                    lambda: _on_signals(
                        lambda interrupt: run_job(
                            config,
                            root=store_root,
                            payloads=payloads_at,
                            redis=redis_url,
                            limit=limit,
                            only=only,
                            wait=wait,
                            on_progress=on_progress,
                            progress_every=stats_every,
                            stop=interrupt.event,
                            stop_reason=interrupt.reason,
                        ),
                        cancel=False,
                    )
                )
        except JobConfigError as exc:
            err_console.print(f"[red]invalid job:[/red] {escape(str(exc))}", soft_wrap=True)
            raise typer.Exit(EXIT_INVALID_JOB) from None
        except LeaseHeld as exc:
            hint = "" if wait else " (--wait waits for it)"
            err_console.print(f"[red]refused:[/red] job {escape(str(exc))}{hint}", soft_wrap=True)
            raise typer.Exit(EXIT_LEASE_HELD) from None
        except KeyboardInterrupt:
            interrupted, summary = True, None
    resume = "run the job again to fetch the rest"
    summary = _report(summary, interrupted, as_json, _print_summary, resume)
    if not summary.ok and not allow_failures:
        raise typer.Exit(EXIT_FAILED)


def _ops(s: SourceSummary) -> str:
    """The progress line's operating figures: retries, rate-gate wait, stale answers, breaker."""
    st = s.statistics
    if st is None:
        return ""
    text = f"retries {st.retries} wait {st.limiter_wait:.1f}s"
    if st.stale:
        text += f" stale {st.stale}"
    if st.breaker not in (None, "closed"):
        text += f" [red]breaker {st.breaker}[/red]"
    return text


def _with_stats_lines(
    shown: Callable[[SourceSummary], None] | None, every: float | None
) -> Callable[[SourceSummary], None] | None:
    """``shown``, plus a JSON line per source on stderr at most every ``every`` seconds."""
    if every is None:
        return shown
    last: dict[str, float] = {}

    def on_progress(s: SourceSummary) -> None:
        if shown is not None:
            shown(s)
        now = time.monotonic()
        if s.statistics is not None and now - last.get(s.source, -math.inf) >= every:
            last[s.source] = now
            line = {"stats": s.statistics.to_json(), "done": s.done, "total": s.total}
            print(json.dumps(line), file=sys.stderr, flush=True)

    return on_progress
