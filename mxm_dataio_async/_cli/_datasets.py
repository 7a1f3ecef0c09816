"""``mxm-dataio datasets``: the datasets under a location, their versions and row counts."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from mxm_dataio_async._cli._common import (
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
    as_json: JsonOption = False,
    verbose: VerboseOption = False,
) -> None:
    """Datasets, their current version, rows and Parquet parts (--json for scripts)."""
    with _errors(verbose):
        from mxm_dataio_async.datasets import Dataset, list_datasets

        where = location or os.fspath(Path(root or default_root()) / "datasets")
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
