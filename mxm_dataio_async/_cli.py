"""The ``mxm-dataio`` command line (needs the ``cli`` extra: typer and rich)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import anyio

try:
    import typer
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskID,
        TextColumn,
        TimeElapsedColumn,
    )
    from rich.table import Table
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise SystemExit(
        "the mxm-dataio command needs the 'cli' extra: pip install 'mxm-dataio-async[cli]'"
    ) from exc

from mxm_dataio_async._demo import run_demo
from mxm_dataio_async._exceptions import DataIOError

app = typer.Typer(
    name="mxm-dataio",
    help="Inspect and manage an mxm-dataio-async store.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)


def default_root() -> Path:
    return Path(os.environ.get("MXM_DATAIO_ROOT") or "./dataio")


RootOption = Annotated[
    Path | None,
    typer.Option("--root", help="Store directory (default: $MXM_DATAIO_ROOT, else ./dataio)."),
]


@app.callback()
def _main() -> None:
    """mxm-dataio: every request and the exact bytes, recorded and replayable."""


@app.command()
def demo(
    root: RootOption = None,
    count: Annotated[int, typer.Option(min=1, help="How many requests per pass.")] = 300,
    concurrency: Annotated[int, typer.Option(min=1, help="Requests in flight at once.")] = 32,
) -> None:
    """Ingest from a loopback server into a store, then again from cache, and summarise."""
    store_root = root if root is not None else default_root()
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        tasks: dict[str, TaskID] = {}

        def on_progress(name: str, n: int) -> None:
            if name not in tasks:
                tasks[name] = progress.add_task(name, total=count)
            progress.advance(tasks[name], n)

        try:
            summary = anyio.run(
                lambda: run_demo(
                    store_root, count=count, concurrency=concurrency, on_progress=on_progress
                )
            )
        except DataIOError as exc:
            err_console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(1) from None
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


def main() -> None:
    app()
