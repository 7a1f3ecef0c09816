"""Maintenance commands: verify, gc, prune, export and import (bundles).

verify and export open the store read-only; gc and prune open an existing store writable
(``create=False``); import creates the store if it is missing.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
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
    DryRunOption,
    GraceOption,
    JsonOption,
    PayloadsOption,
    RootOption,
    StoreOption,
    VerboseOption,
    Where,
    _errors,
    _open_store,
    _print_json,
    _run,
    _size,
    _when,
    _with_store,
    app,
    console,
    err_console,
    resolve_session,
)
from mxm_dataio_async._durations import parse_duration
from mxm_dataio_async._store import DEFAULT_INLINE_THRESHOLD

if TYPE_CHECKING:
    from mxm_dataio_async import Store
    from mxm_dataio_async.store import CopyReport, ExportReport, GcReport, PruneReport


@app.command("verify")
def verify_command(
    root: RootOption = None,
    store_url: StoreOption = None,
    payloads_url: PayloadsOption = None,
    grace: Annotated[
        str,
        typer.Option(help="Ignore files younger than this (e.g. 10min on a live store)."),
    ] = "0s",
    as_json: JsonOption = False,
    verbose: VerboseOption = False,
) -> None:
    """Check every payload against its sha256, and every row and file; exit 1 on any problem.

    Reports missing and corrupt payloads, rows naming a payload the store lacks, orphan files
    under payloads/ and temp leftovers in tmp/ (`mxm-dataio gc` removes the last two).
    """
    with (
        _errors(verbose),
        Progress(
            TextColumn("{task.description:<10}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err_console,
            transient=True,
        ) as progress,
    ):
        tasks: dict[str, TaskID] = {}

        def on_progress(phase: str, done: int, total: int | None) -> None:
            if phase not in tasks:
                tasks[phase] = progress.add_task(phase, total=total)
            progress.update(tasks[phase], completed=done, total=total)

        age = parse_duration(grace)
        report = _with_store(
            Where(root, store_url, payloads_url),
            "read",
            lambda store: store.verify(grace=age, on_progress=on_progress),
        )
    if as_json:
        _print_json(report.to_json())
        raise typer.Exit(report.exit_code)
    checked = (
        f"checked {report.payloads} payloads ({_size(report.bytes)}), {report.responses} "
        f"responses, {report.requests} requests, {report.files} files"
    )
    if report.ok:
        console.print(f"ok: {checked}; no problems", soft_wrap=True)
        return
    table = Table(title=f"{len(report.problems)} problem(s) in {report.root}")
    table.add_column("kind", no_wrap=True)
    table.add_column("detail", overflow="fold")
    for p in report.problems:
        table.add_row(p.kind.value, escape(p.detail))
    console.print(table)
    console.print(f"{checked}; {len(report.problems)} problem(s)", soft_wrap=True)
    raise typer.Exit(report.exit_code)


def _gc_lines(report: GcReport, grace: str) -> list[str]:
    verb = "would remove" if report.dry_run else "removed"
    lines = [
        f"{verb} {report.payload_rows} unreferenced payloads ({_size(report.payload_bytes)}; "
        f"{len(report.payload_files)} files)",
        f"{verb} {len(report.orphan_files)} orphan files ({_size(report.orphan_bytes)})",
        f"{verb} {len(report.temp_files)} temp leftovers ({_size(report.temp_bytes)})",
        f"{'would free' if report.dry_run else 'freed'} {_size(report.freed_bytes)} in all",
    ]
    if report.kept_recent:
        lines.append(f"kept {report.kept_recent} files younger than {grace} (may be in use)")
    return lines


@app.command("gc")
def gc_command(
    root: RootOption = None,
    store_url: StoreOption = None,
    payloads_url: PayloadsOption = None,
    dry_run: DryRunOption = False,
    grace: GraceOption = "1h",
    as_json: JsonOption = False,
    verbose: VerboseOption = False,
) -> None:
    """Remove payloads no response names (rows and files), orphan files and temp leftovers.

    Safe beside running writers: unreferenced payload rows are found and deleted in one
    transaction holding SQLite's write lock, and files younger than --grace are kept.
    """
    with _errors(verbose):
        age = parse_duration(grace)
        report = _with_store(
            Where(root, store_url, payloads_url),
            "write",
            lambda store: store.gc(dry_run=dry_run, grace=age),
        )
    if as_json:
        _print_json(report.to_json())
        return
    for line in _gc_lines(report, grace):
        console.print(line, soft_wrap=True)


@app.command("prune")
def prune_command(
    older_than: Annotated[
        str,
        typer.Option(
            "--older-than",
            help="Age to keep: a number and a unit, s, min, h, d or w (e.g. 30d, 12h, 90min, "
            "2w). m is refused as ambiguous (min or mo?); months and years, having no fixed "
            "length, too: write days (30d, 365d).",
        ),
    ],
    root: RootOption = None,
    store_url: StoreOption = None,
    payloads_url: PayloadsOption = None,
    source: Annotated[str | None, typer.Option(help="Only responses of this source.")] = None,
    bucket: Annotated[
        str | None, typer.Option(help="Only responses with this as_of_bucket.")
    ] = None,
    dry_run: DryRunOption = False,
    then_gc: Annotated[
        bool, typer.Option("--gc", help="Then remove the payloads left unreferenced (gc).")
    ] = False,
    grace: GraceOption = "1h",
    as_json: JsonOption = False,
    verbose: VerboseOption = False,
) -> None:
    """Delete responses older than --older-than (and requests left without one), in one
    transaction. Sessions are kept. Their payloads become garbage for `mxm-dataio gc`."""
    with _errors(verbose):
        age = parse_duration(older_than)
        gc_grace = parse_duration(grace) if then_gc and not dry_run else None

        async def prune_then_gc(store: Store) -> tuple[PruneReport, GcReport | None]:
            pruned = await store.prune(
                older_than=age, source=source, bucket=bucket, dry_run=dry_run
            )
            freed = None if gc_grace is None else await store.gc(grace=gc_grace)
            return pruned, freed

        report, gc_report = _with_store(
            Where(root, store_url, payloads_url), "write", prune_then_gc
        )
    if as_json:
        out = report.to_json()
        out["gc"] = None if gc_report is None else gc_report.to_json()
        _print_json(out)
        return
    verb = "would delete" if dry_run else "deleted"
    console.print(
        f"{verb} {report.responses} responses ({_size(report.response_bytes)}) and "
        f"{report.requests} requests fetched before {_when(report.cutoff.isoformat())} UTC",
        soft_wrap=True,
    )
    if gc_report is not None:
        for line in _gc_lines(gc_report, grace):
            console.print(line, soft_wrap=True)
    elif report.garbage_payloads:
        console.print(
            f"{report.garbage_payloads} payloads ({_size(report.garbage_bytes)}) "
            f"{'would be' if dry_run else 'are now'} unreferenced: `mxm-dataio gc` removes them",
            soft_wrap=True,
        )


# -- bundles -------------------------------------------------------------------------------------


@app.command("export")
def export_command(
    session: Annotated[
        str, typer.Argument(help="Session id (or a unique prefix of 4+ characters).")
    ],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Bundle file to write (.tar, or .tar.gz).")
    ],
    root: RootOption = None,
    store_url: StoreOption = None,
    payloads_url: PayloadsOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Write a session as a self-contained bundle: rows as JSON lines plus every payload.

    Another machine imports it (`mxm-dataio import`) and replays it with only_if_cached.
    """
    with _errors(verbose):

        async def export(store: Store) -> ExportReport:
            return await store.export_session(await resolve_session(store, session), output)

        report = _with_store(Where(root, store_url, payloads_url), "read", export)
    console.print(
        f"exported session {report.session_id} to {report.path}: {report.requests} requests, "
        f"{report.responses} responses, {report.payloads} payloads "
        f"({_size(report.payload_bytes)}, verified)",
        soft_wrap=True,
    )


@app.command("import")
def import_command(
    bundle: Annotated[Path, typer.Argument(help="A bundle written by `mxm-dataio export`.")],
    root: RootOption = None,
    store_url: StoreOption = None,
    payloads_url: PayloadsOption = None,
    inline_threshold: Annotated[
        int, typer.Option(min=0, help="Payloads up to this many bytes go inline in SQLite.")
    ] = DEFAULT_INLINE_THRESHOLD,
    verbose: VerboseOption = False,
) -> None:
    """Import a bundle into the store (created if missing). Every payload is verified against
    its sha256 before any row is written; importing the same bundle twice adds nothing."""
    with _errors(verbose):
        report = _with_store(
            Where(root, store_url, payloads_url),
            "create",
            lambda store: store.import_bundle(bundle),
            inline_threshold=inline_threshold,
        )
    console.print(
        f"imported session {report.session_id} from {report.path}: added {report.sessions} "
        f"sessions, {report.requests} requests, {report.responses} responses, "
        f"{report.payloads} payloads ({_size(report.bytes_verified)} verified)",
        soft_wrap=True,
    )


@app.command("copy")
def copy_command(
    target: Annotated[
        str,
        typer.Argument(help="The store to copy into: a folder, or postgresql://user@host:port/db."),
    ],
    to_payloads: Annotated[
        str | None,
        typer.Option(
            "--to-payloads",
            help="Where the copy keeps large payloads: a folder or s3://bucket/prefix "
            "(default: the target's folder).",
        ),
    ] = None,
    root: RootOption = None,
    store_url: StoreOption = None,
    payloads_url: PayloadsOption = None,
    inline_threshold: Annotated[
        int,
        typer.Option(min=0, help="In the copy, payloads up to this many bytes are kept inline."),
    ] = DEFAULT_INLINE_THRESHOLD,
    as_json: JsonOption = False,
    verbose: VerboseOption = False,
) -> None:
    """Copy the whole store (--store/--root, --payloads) into TARGET, which may be another
    backend: every session, request, response and payload, each payload verified on the way.
    Running it again adds only what is missing.

        mxm-dataio copy postgresql://dataio@db/dataio --to-payloads s3://bucket/dataio --root ./data
    """
    source = Where(root, store_url, payloads_url)
    with _errors(verbose):
        destination = Where(store=target, payloads=to_payloads)

        async def run() -> CopyReport:
            async with (
                _open_store(source, "read") as src,
                _open_store(destination, "create", inline_threshold=inline_threshold) as dst,
            ):
                return await src.copy_to(dst)

        report = _run(run)
    if as_json:
        _print_json(report.to_json())
        return
    console.print(
        f"copied {source.label()} into {destination.label()}: added {report.sessions} sessions, "
        f"{report.requests} requests, {report.responses} responses, {report.payloads} payloads "
        f"({report.objects_written} objects written, {_size(report.bytes_verified)} verified)",
        soft_wrap=True,
    )
