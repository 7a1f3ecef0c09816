"""Commands of runs shared by many workers: ``worker`` (work on a run until it is complete) and
``status`` (where a run stands). Both need a PostgreSQL store."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

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
)
from mxm_dataio_async._cli._jobs import EXIT_INVALID_JOB, _on_signals, _report

if TYPE_CHECKING:
    from mxm_dataio_async.jobs import WorkerSummary
    from mxm_dataio_async.store import RunStatus

__all__ = ["status_command", "worker_command"]

EXIT_RUN_MISMATCH = 4

JobStoreOption = Annotated[
    str | None,
    typer.Option(
        "--store",
        help="The shared store: postgresql://user@host:port/db (default: the job's store:, "
        "else $MXM_DATAIO_STORE).",
    ),
]
JobPayloadsOption = Annotated[
    str | None,
    typer.Option(
        "--payloads",
        help="Where large payloads live: s3://bucket/prefix when workers run on several hosts "
        "(default: the job's payloads:, else $MXM_DATAIO_PAYLOADS).",
    ),
]
RunOption = Annotated[
    str | None,
    typer.Option("--run", help="The run's id: workers with the same id share it (default: the "
                 "job's name)."),
]  # fmt: skip


@app.command("worker")
def worker_command(
    job_file: Annotated[Path, typer.Argument(help="The job file (YAML); see the README, Jobs.")],
    store_url: JobStoreOption = None,
    payloads_url: JobPayloadsOption = None,
    redis_url: RedisOption = None,
    run: RunOption = None,
    chunk_size: Annotated[
        int, typer.Option(min=1, help="Plan indices claimed at a time (one lease each).")
    ] = 64,
    lease_ttl: Annotated[
        float | None,
        typer.Option(min=0.1, help="Seconds a claim lives unless renewed (default: the job's)."),
    ] = None,
    max_attempts: Annotated[
        int, typer.Option(min=1, help="Claims of a failing chunk before it is dead.")
    ] = 3,
    as_json: JsonOption = False,
    verbose: VerboseOption = False,
) -> None:
    """Work on a run of a job shared by any number of workers, on any number of hosts.

    Start one on each host against the same PostgreSQL store (and S3 payloads): they split the
    plan into chunks, each fetched once; a worker that dies leaves its chunks to the others when
    their leases expire. With --redis, every source's rate limit holds across all the workers.
    Exits when the run is complete (every chunk done or dead). Exit status:
    0 complete, 1 an error, 2 the job file is invalid, 4 the run was started with another
    configuration, 130 interrupted.
    """
    from mxm_dataio_async._exceptions import RunMismatch
    from mxm_dataio_async.jobs import JobConfigError, run_worker

    with _errors(verbose):
        try:
            summary, interrupted = _run(
                lambda: _on_signals(
                    lambda interrupt: run_worker(
                        job_file,
                        store=store_url,
                        payloads=payloads_url,
                        redis=redis_url,
                        run=run,
                        chunk_size=chunk_size,
                        lease_ttl=lease_ttl,
                        max_attempts=max_attempts,
                        stop=interrupt.event,
                        stop_reason=interrupt.reason,
                    ),
                    cancel=False,
                )
            )
        except JobConfigError as exc:
            err_console.print(f"[red]invalid job:[/red] {escape(str(exc))}", soft_wrap=True)
            raise typer.Exit(EXIT_INVALID_JOB) from None
        except RunMismatch as exc:
            err_console.print(f"[red]refused:[/red] {escape(str(exc))}", soft_wrap=True)
            raise typer.Exit(EXIT_RUN_MISMATCH) from None
        except KeyboardInterrupt:
            summary, interrupted = None, True
    _report(
        summary,
        interrupted,
        as_json,
        _print_worker,
        "the chunks this worker held go back to the others when their leases expire",
    )


def _print_worker(s: WorkerSummary) -> None:
    state = "complete" if s.complete else "not complete"
    dead = f", {s.dead_chunks:,} dead chunks in the run" if s.dead_chunks else ""
    console.print(
        f"run {escape(s.run_id)} {state}{dead}. This worker ({escape(s.worker)}): "
        f"{s.chunks_done:,} chunks done, {s.chunks_released:,} given back, "
        f"{s.chunks_lost:,} lost; {s.fetched:,} fetched, {s.from_cache:,} from cache, "
        f"{s.failed:,} failed, in {s.elapsed:,.1f}s",
        soft_wrap=True,
    )
    for line in s.errors[:10]:
        err_console.print(f"[red]failed[/red] {escape(line)}", soft_wrap=True)
    if s.not_parsed:
        console.print(
            f"[yellow]not parsed, validated or published by workers:[/yellow] "
            f"{escape(', '.join(s.not_parsed))}. Once the run is complete, `mxm-dataio run` of "
            "this job on the same store (--store, --payloads) does it from the recorded "
            "responses, each a cache hit.",
            soft_wrap=True,
        )


@app.command("status")
def status_command(
    job_file: Annotated[
        Path | None,
        typer.Argument(help="The job file (its store: and name); or give --run and --store."),
    ] = None,
    store_url: JobStoreOption = None,
    run: RunOption = None,
    window: Annotated[
        float, typer.Option(min=0.1, help="Seconds over which rates are measured.")
    ] = 10.0,
    ttl: Annotated[
        float | None,
        typer.Option(
            min=0.1,
            help="A worker is alive if seen within this many seconds (default: the "
            "job's lease_ttl, else 30).",
        ),
    ] = None,
    as_json: JsonOption = False,
    verbose: VerboseOption = False,
) -> None:
    """Where a run stands: chunks pending, claimed, done and dead, plan indices done, workers
    (alive by their last heartbeat) and the rate achieved per source."""
    from mxm_dataio_async._store import Store
    from mxm_dataio_async.jobs import load_job, resolve_root, run_status

    with _errors(verbose):
        if job_file is None and (run is None or store_url is None):
            raise typer.BadParameter("give a job file, or --run and --store")
        run_id = run
        alive = 30.0 if ttl is None else ttl
        where: str | Path | None = store_url
        if job_file is not None:
            config = load_job(job_file)
            run_id = run or config.job
            where = resolve_root(config, store_url)
            alive = config.lease_ttl if ttl is None else ttl
        assert run_id is not None and where is not None

        async def read() -> RunStatus:
            async with Store(where, create=False, read_only=True) as store:
                return await run_status(store, run_id, window=window, ttl=alive)

        status = _run(read)
    if as_json:
        _print_json(status.to_json())
        return
    _print_status(status)


def _print_status(st: RunStatus) -> None:
    r = st.run
    chunks = {s: st.chunks.get(s, 0) for s in ("pending", "claimed", "done", "dead")}
    state = "complete" if st.complete else "planned" if r.planned else "not planned yet"
    console.print(
        f"run {escape(r.id)} (job {escape(r.job)}): {state}; {st.done:,} of {r.total:,} "
        f"requests done; chunks of {r.chunk_size}: "
        + ", ".join(f"{n:,} {s}" for s, n in chunks.items()),
        soft_wrap=True,
    )
    if st.workers:
        table = Table(title="workers", title_justify="left", box=None, header_style="bold")
        for col in ("worker", "host", "pid", "alive", "chunks held", "last seen"):
            table.add_column(col)
        for w in st.workers:
            table.add_row(
                escape(w.name),
                escape(w.host),
                str(w.pid),
                "yes" if w.alive else "no",
                str(w.chunks),
                w.seen_at.isoformat(timespec="seconds"),
            )
        console.print(table)
    sources = sorted(set(st.per_source_done) | set(st.rates))
    if sources:
        table = Table(title="sources", title_justify="left", box=None, header_style="bold")
        for col in ("source", "done", f"fetched/s (last {st.window:g}s)"):
            table.add_column(col, justify="left" if col == "source" else "right")
        for name in sources:
            table.add_row(
                escape(name), f"{st.per_source_done.get(name, 0):,}", f"{st.rates.get(name, 0):.2f}"
            )
        console.print(table)
    for chunk, attempts, error in st.dead_chunks[:10]:
        err_console.print(
            f"[red]dead[/red] chunk {chunk} after {attempts} claims: {escape(error or '')}",
            soft_wrap=True,
        )
