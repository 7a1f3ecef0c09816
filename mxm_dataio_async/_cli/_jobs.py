"""Job commands: ``run`` (an ingestion job from its file) and ``tail`` (responses since a
checkpoint, as JSON lines)."""

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
    PayloadsOption,
    RedisOption,
    RootOption,
    StoreOption,
    VerboseOption,
    Where,
    _errors,
    _open_store,
    _print_json,
    _run,
    app,
    console,
    err_console,
    show_logs,
)

if TYPE_CHECKING:
    from mxm_dataio_async._models import Response
    from mxm_dataio_async._store import Store
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


def _tail_line(resp: Response, request: dict[str, Any] | None) -> str:
    params = json.loads(request["params"]) if request and request["params"] else {}
    return json.dumps(
        {
            "id": resp.id,
            "source": request["source"] if request else None,
            "kind": request["kind"] if request else None,
            "status": resp.status.value,
            "checksum": resp.checksum,
            "size": resp.size_bytes,
            "fetched_at": resp.fetched_at.isoformat(),
            "params": params,
            "endpoint": request["endpoint"] if request else None,
            "request_id": resp.request_id,
            "request_hash": resp.request_hash,
            "session_id": resp.session_id,
            "as_of_bucket": resp.as_of_bucket,
            "cache_tag": resp.cache_tag,
            "transport_status": resp.transport_status,
            "error": resp.error,
        },
        ensure_ascii=False,
    )


#: ``tail`` looks up the requests of this many responses at a time (one read, not one each).
_TAIL_BATCH = 500


class _Checkpoint:
    """Where ``tail --checkpoint NAME`` keeps its position, per set of filters.

    A position is one response id in recording order, so it only means "everything before this
    was shown" for the filters it was advanced with: under other filters, rows before it that
    those filters let through (and the first filters did not) would be skipped silently. The
    store's checkpoints hold only a response id (PostgreSQL checks that it names a response), so
    the filters go into the checkpoint's *name*:

    - the position is stored as ``NAME`` without filters, else as ``NAME {"kind":...,
      "source":...,"status":...}`` (the filters given, as sorted compact JSON);
    - ``NAME #`` marks that NAME has a position under some filters (written once, with the same
      response id).

    A run whose own position is missing while NAME has one under other filters (the mark, or a
    plain ``NAME`` from a tail without filters or from an older version) is refused.
    """

    def __init__(self, name: str, filters: dict[str, str | None]) -> None:
        given = {k: v for k, v in sorted(filters.items()) if v is not None}
        self.name = name
        self.filters = given
        self.key = f"{name} {json.dumps(given, separators=(',', ':'))}" if given else name
        self.mark = f"{name} #"
        self._marked = False

    def _shown(self) -> str:
        flags = " ".join(f"--{k} {v}" for k, v in self.filters.items())
        return flags or "no filters"

    async def read(self, store: Store) -> str | None:
        cursor = await store.read_checkpoint(self.key)
        if cursor is not None:
            return cursor
        elsewhere = await store.read_checkpoint(self.mark)
        if elsewhere is None and self.filters:
            elsewhere = await store.read_checkpoint(self.name)  # a tail without filters
        if elsewhere is not None:
            raise ValueError(
                f"checkpoint {self.name!r} was used with other filters than {self._shown()} (its "
                "position is in recording order, so these filters would skip rows): run tail "
                "with the filters it was used with, or give these filters their own "
                "--checkpoint name (a new name starts from the first response)"
            )
        return None

    async def write(self, store: Store, cursor: str) -> None:
        # The position first: a run stopped between the two writes resumes from it.
        await store.write_checkpoint(self.key, cursor)
        if not self._marked:
            await store.write_checkpoint(self.mark, cursor)
            self._marked = True


async def _tail_batch(store: Store, checkpoint: _Checkpoint, batch: list[Response]) -> None:
    """Print a batch of responses (with their requests) in order, checkpointing after each."""
    wanted = {resp.request_id for resp in batch}
    requests = {q["id"]: q async for q in store.iter_rows("requests", ids=wanted)}
    for resp in batch:
        typer.echo(_tail_line(resp, requests.get(resp.request_id)))
        # After the line is out, and shielded: Ctrl-C never leaves a printed line behind the
        # checkpoint (it would be printed again).
        with anyio.CancelScope(shield=True):
            await checkpoint.write(store, resp.id)


async def _tail(
    where: Where,
    name: str,
    *,
    source: str | None,
    kind: str | None,
    status: str | None,
    follow: bool,
    interval: float,
    stop_after: float | None,
) -> int:
    import time

    printed = 0
    deadline = None if stop_after is None else time.monotonic() + stop_after
    checkpoint = _Checkpoint(name, {"source": source, "kind": kind, "status": status})
    # Writable (it writes checkpoints) but never created: a missing store is an error.
    async with _open_store(where, "write") as store:
        cursor = await checkpoint.read(store)
        while True:
            batch: list[Response] = []
            async for resp in store.iter_responses(
                source=source, kind=kind, status=status, after=cursor, page_size=_TAIL_BATCH
            ):
                batch.append(resp)
                if len(batch) == _TAIL_BATCH:
                    await _tail_batch(store, checkpoint, batch)
                    cursor, printed, batch = resp.id, printed + len(batch), []
            if batch:
                await _tail_batch(store, checkpoint, batch)
                cursor, printed = batch[-1].id, printed + len(batch)
            if not follow:
                return printed
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return printed
            await anyio.sleep(interval if left is None else min(interval, left))


@app.command("tail")
def tail_command(
    checkpoint: Annotated[
        str,
        typer.Option(
            "--checkpoint",
            help="Consumer name: resume after the last response it was shown (with the same "
            "filters: a name used with other filters is refused).",
        ),
    ],
    root: RootOption = None,
    store_url: StoreOption = None,
    payloads_url: PayloadsOption = None,
    source: Annotated[str | None, typer.Option(help="Only responses of this source.")] = None,
    kind: Annotated[str | None, typer.Option(help="Only responses of this kind.")] = None,
    status: Annotated[
        str | None, typer.Option(help="Only responses with this status (ok, error, ...).")
    ] = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep polling for new responses (Ctrl-C ends).")
    ] = False,
    interval: Annotated[
        float, typer.Option(min=0.01, help="--follow: seconds between polls.")
    ] = 1.0,
    timeout: Annotated[
        float | None, typer.Option(min=0, help="--follow: stop after this many seconds.")
    ] = None,
    verbose: VerboseOption = False,
) -> None:
    """Print responses recorded since this consumer's checkpoint, as JSON lines, in the order
    they were recorded; the checkpoint advances after each line is written.

    Each line: id, source, kind, status, checksum, size, fetched_at, params (the request's),
    endpoint, request_id, request_hash, session_id, as_of_bucket, cache_tag, transport_status,
    error. Cache hits add no response, so they are not shown.

    A checkpoint keeps its filters (--source, --kind, --status): its position is only valid for
    them, so the same name with other filters is refused. Use one name per consumer and set of
    filters. When the reader goes away (`tail | head -1`) it stops quietly with exit status 141,
    as other tools do; the checkpoint stays after the last line written into the pipe.
    """
    where = Where(root, store_url, payloads_url)
    with _errors(verbose):
        if status is not None:
            from mxm_dataio_async._models import ResponseStatus

            allowed = ", ".join(s.value for s in ResponseStatus)
            if status not in {s.value for s in ResponseStatus}:
                raise ValueError(f"unknown status {status!r}; use one of: {allowed}")
        try:
            _run(
                lambda: _on_signals(
                    lambda _: _tail(
                        where,
                        checkpoint,
                        source=source,
                        kind=kind,
                        status=status,
                        follow=follow,
                        interval=interval,
                        stop_after=timeout,
                    ),
                    cancel=True,
                )
            )
        except KeyboardInterrupt:
            return
