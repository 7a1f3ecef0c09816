"""``mxm-dataio datasets``: the datasets under a location, their versions and row counts; with
``--gc``, the files no version references."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from mxm_dataio_async._cli._common import (
    DryRunOption,
    GraceOption,
    JsonOption,
    RootOption,
    VerboseOption,
    _errors,
    _print_json,
    _when,
    app,
    console,
    default_root,
)
from mxm_dataio_async._durations import parse_duration
from mxm_dataio_async._exceptions import UsageError


@app.command("datasets")
def datasets_command(
    location: Annotated[
        str | None,
        typer.Argument(
            help="A folder or s3://bucket/prefix holding datasets (default: <root>/datasets, "
            "where a job's datasets go unless it says datasets:)."
        ),
    ] = None,
    root: RootOption = None,
    gc: Annotated[
        bool,
        typer.Option(
            "--gc",
            help="Delete the Parquet parts, key indexes and manifests that no version references "
            "(what a publish that crashed before its swap left), older than --grace.",
        ),
    ] = False,
    grace: GraceOption = "1h",
    dry_run: DryRunOption = False,
    as_json: JsonOption = False,
    verbose: VerboseOption = False,
) -> None:
    """Datasets, their current version, rows and Parquet parts (--json for scripts); --gc
    deletes the files no version references."""
    with _errors(verbose):
        from mxm_dataio_async.datasets import Dataset, list_datasets

        where = location or os.fspath(Path(root or default_root()) / "datasets")
        if gc:
            age = parse_duration(grace).total_seconds()
            _collect(where, age, grace, dry_run=dry_run, as_json=as_json)
            return
        if dry_run:
            raise UsageError("--dry-run goes with --gc")
        found = list_datasets(where)
        rows = []
        for v in found:
            versions = Dataset(where, v.dataset).versions()
            rows.append({**v.to_json(), "versions": [x.to_json() for x in versions]})
    if as_json:
        _print_json({"location": where, "datasets": rows})
        return
    table = Table(title=f"datasets in {escape(where)}")
    for col in ("dataset", "version", "rows", "added", "changed", "parts", "versions", "created"):
        table.add_column(col, justify="left" if col in ("dataset", "created") else "right")
    for r in rows:
        table.add_row(
            escape(r["dataset"]), str(r["version"]), f"{r['rows']:,}", f"{r['added']:,}",
            f"{r['changed']:,}", str(r["parts"]), str(len(r["versions"])),
            _when(r["created_at"]),
        )  # fmt: skip
    console.print(table)


def _collect(where: str, age: float, grace: str, *, dry_run: bool, as_json: bool) -> None:
    """``--gc``: each dataset's unreferenced files older than ``age`` seconds, deleted (or, with
    ``dry_run``, listed). A publish writes its parts before the swap that references them, so
    younger files are kept: they may belong to a publish in progress."""
    from mxm_dataio_async.datasets import Dataset, list_datasets

    removed = {
        v.dataset: Dataset(where, v.dataset).gc(grace=age, dry_run=dry_run)
        for v in list_datasets(where)
    }
    if as_json:
        _print_json(
            {
                "location": where,
                "dry_run": dry_run,
                "grace_seconds": age,
                "datasets": [{"dataset": name, "removed": keys} for name, keys in removed.items()],
            }
        )
        return
    verb = "would remove" if dry_run else "removed"
    for name, keys in removed.items():
        kinds = ", ".join(
            f"{sum(k.startswith(prefix) for k in keys)} {label}"
            for prefix, label in (
                ("parts/", "parts"),
                ("index/", "indexes"),
                ("manifests/", "manifests"),
            )
        )
        console.print(
            f"dataset {escape(name)}: {verb} {len(keys)} files no version references "
            f"({kinds}), older than {escape(grace)}",
            soft_wrap=True,
        )
    if not removed:
        console.print(f"no datasets in {escape(where)}", soft_wrap=True)
