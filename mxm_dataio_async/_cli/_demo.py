"""``mxm-dataio demo``: ingest from a loopback server, again from cache, and summarise."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from mxm_dataio_async._cli._common import (
    PayloadsOption,
    RootOption,
    StoreOption,
    VerboseOption,
    Where,
    _errors,
    _run,
    app,
    console,
)
from mxm_dataio_async._demo import run_demo


@app.command()
def demo(
    root: RootOption = None,
    store_url: StoreOption = None,
    payloads_url: PayloadsOption = None,
    count: Annotated[int, typer.Option(min=1, help="How many requests per pass.")] = 300,
    concurrency: Annotated[int, typer.Option(min=1, help="Requests in flight at once.")] = 32,
    verbose: VerboseOption = False,
) -> None:
    """Ingest from a loopback server into a store, then again from cache, and summarise."""
    where = Where(root, store_url, payloads_url)
    with (
        _errors(verbose),
        Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        ) as progress,
    ):
        tasks: dict[str, TaskID] = {}

        def on_progress(name: str, n: int) -> None:
            if name not in tasks:
                tasks[name] = progress.add_task(name, total=count)
            progress.advance(tasks[name], n)

        summary = _run(
            lambda: run_demo(
                where.target(),
                payloads=where.payloads_at(),
                count=count,
                concurrency=concurrency,
                on_progress=on_progress,
            )
        )
    table = Table(title=f"demo ingestion into {summary.root}")
    for col in ("pass", "requests", "fetched", "from cache", "failed", "req/s", "bytes"):
        table.add_column(col, justify="left" if col == "pass" else "right")
    for p in summary.passes:
        table.add_row(
            p.name,
            str(p.requests),
            str(p.fetched),
            str(p.from_cache),
            str(p.failed),
            f"{p.per_second:,.0f}",
            f"{p.bytes:,}",
        )
    console.print(table)
    console.print(
        f"upstream requests served: {summary.upstream_hits}; payloads verified: "
        f"{summary.verified}; database: {summary.db_bytes / 1024:,.0f} KiB"
    )
    failed = sum(p.failed for p in summary.passes)
    if failed:
        raise typer.Exit(1)
