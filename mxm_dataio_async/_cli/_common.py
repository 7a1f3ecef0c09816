"""The ``mxm-dataio`` command line (needs the ``cli`` extra: typer and rich).

Read commands open ``<root>/dataio.sqlite`` with a short-lived connection and never create a store;
writing commands (gc, prune, import) share the store's maintenance code (``_store/_maintenance.py``,
``_store/_bundle.py``), which takes SQLite's write lock with ``BEGIN IMMEDIATE`` and waits for a
writer in another process (``busy_timeout``) rather than failing or interleaving.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import sqlite3
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, BinaryIO, TypeVar

import anyio

try:
    import typer
    from rich.console import Console
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
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise SystemExit(
        "the mxm-dataio command needs the 'cli' extra: pip install 'mxm-dataio-async[cli]'"
    ) from exc

from mxm_dataio_async._demo import run_demo
from mxm_dataio_async._exceptions import DataIOError, IntegrityError, StoreError
from mxm_dataio_async._store import DEFAULT_INLINE_THRESHOLD, _bundle, _cleanup, _stats, _verify
from mxm_dataio_async._store._maintenance import (
    _digest_of,
    _hash_file,
    connection,
    parse_duration,
    resolve_session,
)
from mxm_dataio_async._store._payloads import PayloadFiles, verify

if TYPE_CHECKING:
    from mxm_dataio_async._models import Response
    from mxm_dataio_async.jobs import JobPlan, JobSummary, SourceSummary

app = typer.Typer(
    name="mxm-dataio",
    help="Inspect, verify and manage an mxm-dataio-async store.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Piped or redirected output is not squeezed to 80 columns (rich's default off a terminal).
console = Console(width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True)

T = TypeVar("T")
_verbose = False


def default_root() -> Path:
    return Path(os.environ.get("MXM_DATAIO_ROOT") or "./dataio")


RootOption = Annotated[
    Path | None,
    typer.Option("--root", help="Store directory (default: $MXM_DATAIO_ROOT, else ./dataio)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON (for scripts).")]
VerboseOption = Annotated[
    bool, typer.Option("--verbose", "-v", help="On error, show the details (traceback).")
]
DryRunOption = Annotated[
    bool, typer.Option("--dry-run", help="Report what would be removed; change nothing.")
]
BUSY_TIMEOUT = 30.0  # seconds to wait for a writer in another process to release the lock


@app.callback()
def _main(verbose: VerboseOption = False) -> None:
    """mxm-dataio: every request and the exact bytes, recorded, verified and replayable.

    Every command takes --root (default: $MXM_DATAIO_ROOT, else ./dataio).
    """
    global _verbose
    _verbose = verbose


@contextlib.contextmanager
def _errors(verbose: bool) -> Iterator[None]:
    """One clear line on stderr and exit status 1 for an error; the traceback with --verbose."""
    try:
        yield
    except (typer.Exit, typer.Abort, KeyboardInterrupt):
        raise
    except Exception as exc:
        if verbose or _verbose:
            err_console.print_exception()
        expected = isinstance(exc, DataIOError | OSError | ValueError | sqlite3.Error)
        text = str(exc) if expected else f"unexpected {type(exc).__name__}: {exc}"
        hint = "" if verbose or _verbose or expected else " (run with --verbose for details)"
        err_console.print(f"[red]error:[/red] {escape(text)}{hint}", soft_wrap=True)
        raise typer.Exit(1) from None


def _root(root: Path | None) -> Path:
    return root if root is not None else default_root()


def _run(fn: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine function to completion (the CLI is sync; the store API is async)."""
    return anyio.run(fn)


def _print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, ensure_ascii=False, default=str))


def _size(n: int | None) -> str:
    if n is None:
        return ""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:,.1f} {unit}"
        value /= 1024
    return str(n)  # pragma: no cover


def _when(ts: str | None) -> str:
    return "" if ts is None else ts[:19].replace("T", " ")


def _rate(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def _rows(conn: sqlite3.Connection, sql: str, params: Any = ()) -> list[dict[str, Any]]:
    cur = conn.execute(sql, params)
    names = [d[0] for d in cur.description]
    return [
        {k: (bytes(v).hex() if isinstance(v, bytes) else v) for k, v in zip(names, r, strict=True)}
        for r in cur.fetchall()
    ]


# -- demo ----------------------------------------------------------------------------------------


@app.command()
def demo(
    root: RootOption = None,
    count: Annotated[int, typer.Option(min=1, help="How many requests per pass.")] = 300,
    concurrency: Annotated[int, typer.Option(min=1, help="Requests in flight at once.")] = 32,
    verbose: VerboseOption = False,
) -> None:
    """Ingest from a loopback server into a store, then again from cache, and summarise."""
    store_root = _root(root)
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
                store_root, count=count, concurrency=concurrency, on_progress=on_progress
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


# -- inspection ----------------------------------------------------------------------------------


@app.command()
def sessions(
    root: RootOption = None,
    source: Annotated[str | None, typer.Option(help="Only sessions of this source.")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="At most this many (newest).")] = None,
    as_json: JsonOption = False,
    verbose: VerboseOption = False,
) -> None:
    """List sessions, newest first: id, source, as_of, times, status, requests, bytes."""
    with _errors(verbose), connection(_root(root), BUSY_TIMEOUT) as conn:
        sql = (
            "SELECT id, source, as_of, started_at, ended_at, status, cache_mode, "
            "(SELECT count(*) FROM requests q WHERE q.session_id = s.id) AS requests, "
            "(SELECT count(*) FROM responses r WHERE r.session_id = s.id) AS responses, "
            "(SELECT coalesce(sum(size_bytes), 0) FROM responses r WHERE r.session_id = s.id) "
            "AS bytes, error FROM sessions s"
        )
        params: list[Any] = []
        if source is not None:
            sql += " WHERE source = ?"
            params.append(source)
        sql += " ORDER BY started_at DESC"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        rows = _rows(conn, sql, params)
    if as_json:
        _print_json(rows)
        return
    table = Table(title=f"sessions in {_root(root)}")
    # On a narrow terminal show id prefixes: `show` accepts any unique prefix of 4+ characters.
    short_ids = console.width < 140
    for col in ("id", "source", "as_of", "started", "ended", "status", "requests", "bytes"):
        table.add_column(
            col,
            no_wrap=col in ("id", "started", "ended", "status"),
            min_width=6 if col in ("source", "status") else None,
            justify="right" if col in ("requests", "bytes") else "left",
        )
    for r in rows:
        table.add_row(
            r["id"][:8] if short_ids else r["id"],
            r["source"],
            r["as_of"] or "",
            _when(r["started_at"]),
            _when(r["ended_at"]),
            r["status"],
            str(r["requests"]),
            _size(r["bytes"]),
        )
    console.print(table)


_RESPONSE_FIELDS = (
    "id, request_id, status, transport_status, attempt, attempts, checksum, size_bytes, "
    "fetched_at, cache_mode, ttl_seconds, as_of_bucket, cache_tag, elapsed_ms, error"
)


def _session_detail(conn: sqlite3.Connection, session_id: str) -> dict[str, Any]:
    session = _rows(conn, "SELECT * FROM sessions WHERE id = ?", (session_id,))[0]
    requests = _rows(
        conn,
        "SELECT id, kind, method, endpoint, params, hash, as_of_bucket, cache_tag, cache_mode, "
        "ttl_seconds, created_at, served_from, sent_checksum FROM requests "
        "WHERE session_id = ? ORDER BY created_at, rowid",
        (session_id,),
    )
    by_request: dict[str, list[dict[str, Any]]] = {}
    for r in _rows(
        conn,
        f"SELECT {_RESPONSE_FIELDS} FROM responses WHERE session_id = ? ORDER BY rowid",
        (session_id,),
    ):
        r["from_cache"] = False
        by_request.setdefault(r["request_id"], []).append(r)
    served_ids = sorted({q["served_from"] for q in requests if q["served_from"]})
    served: dict[str, dict[str, Any]] = {}
    for i in range(0, len(served_ids), 500):
        batch = served_ids[i : i + 500]
        marks = ", ".join("?" * len(batch))
        for r in _rows(
            conn, f"SELECT {_RESPONSE_FIELDS} FROM responses WHERE id IN ({marks})", batch
        ):
            r["from_cache"] = True
            served[r["id"]] = r
    for q in requests:
        q["params"] = json.loads(q["params"]) if q["params"] else q["params"]
        q["responses"] = by_request.get(q["id"], [])
        q["served"] = served.get(q["served_from"]) if q["served_from"] else None
    return {"session": session, "requests": requests}


@app.command()
def show(
    session: Annotated[str, typer.Argument(help="Session id (or a unique prefix of it).")],
    root: RootOption = None,
    as_json: JsonOption = False,
    verbose: VerboseOption = False,
) -> None:
    """A session's requests and responses: status, and where each answer came from.

    "fetched" rows are upstream attempts (one row per attempt); "cache" rows were served a stored
    response (served_from names it), with its cache_mode, ttl, bucket and tag.
    """
    with _errors(verbose), connection(_root(root), BUSY_TIMEOUT) as conn:
        detail = _session_detail(conn, resolve_session(conn, session))
    if as_json:
        _print_json(detail)
        return
    s = detail["session"]
    console.print(
        f"session [bold]{s['id']}[/bold]  source={escape(s['source'])}  as_of={s['as_of'] or '-'}  "
        f"status={s['status']}  cache_mode={s['cache_mode']}\n"
        f"started {_when(s['started_at'])}  ended {_when(s['ended_at']) or '-'}",
        soft_wrap=True,
    )
    table = Table()
    columns = (
        "request", "status", "http", "attempts", "from", "served_from", "cache_mode", "ttl",
        "bucket", "tag", "bytes", "checksum",
    )  # fmt: skip
    for col in columns:
        table.add_column(col, overflow="fold")
    for q in detail["requests"]:
        label = f"{q['kind']} {q['method']} {q['endpoint'] or ''}".strip()
        answers = q["responses"] or ([q["served"]] if q["served"] else [])
        if not answers:
            table.add_row(escape(label), "-", *[""] * 10)
        for r in answers:
            cached = r["from_cache"]
            table.add_row(
                escape(label),
                r["status"],
                "" if r["transport_status"] is None else str(r["transport_status"]),
                f"{r['attempt']}/{r['attempts']}",
                "cache" if cached else "fetched",
                r["id"][:8] if cached else "",
                q["cache_mode"],
                "" if q["ttl_seconds"] is None else f"{q['ttl_seconds']:g}s",
                q["as_of_bucket"] or "",
                q["cache_tag"] or "",
                _size(r["size_bytes"]),
                (r["checksum"] or "")[:12],
            )
    console.print(table)


def _resolve_response(conn: sqlite3.Connection, text: str) -> str:
    if conn.execute("SELECT 1 FROM responses WHERE id = ?", (text,)).fetchone():
        return text
    if len(text) >= 8:
        found = conn.execute(
            "SELECT id FROM responses WHERE id >= ? AND id < ? LIMIT 2", (text, text + "\uffff")
        ).fetchall()
        if len(found) == 1:
            return str(found[0][0])
        if found:
            raise StoreError(f"response prefix {text!r} is ambiguous; give more characters")
    raise StoreError(f"unknown response {text!r}")


@app.command()
def meta(
    response: Annotated[str, typer.Argument(help="Response id (or a unique prefix of it).")],
    root: RootOption = None,
    verbose: VerboseOption = False,
) -> None:
    """A response's metadata as JSON (with its request under "request")."""
    with _errors(verbose), connection(_root(root), BUSY_TIMEOUT) as conn:
        resp = _rows(
            conn, "SELECT * FROM responses WHERE id = ?", (_resolve_response(conn, response),)
        )[0]
        for key in ("headers", "adapter_meta"):
            if resp[key] is not None:
                resp[key] = json.loads(resp[key])
        req = _rows(conn, "SELECT * FROM requests WHERE id = ?", (resp["request_id"],))
        if req:
            for key in ("params", "body", "headers"):
                if req[0][key] is not None:
                    req[0][key] = json.loads(req[0][key])
        resp["request"] = req[0] if req else None
    _print_json(resp)


def _copy_payload(root: Path, conn: sqlite3.Connection, digest: bytes, out: BinaryIO) -> int:
    """Write a payload's exact bytes to ``out``, verified before the first byte is written."""
    hx = digest.hex()
    row = conn.execute(
        "SELECT size_bytes, tier, data FROM payloads WHERE sha256 = ?", (digest,)
    ).fetchone()
    if row is None:
        raise IntegrityError(f"payload {hx} is not in the store")
    size, tier, data = row
    if tier == "inline":
        raw = b"" if data is None else bytes(data)
        verify(raw, digest, size, where=f"inline in {root}")
        out.write(raw)
        return len(raw)
    path = PayloadFiles(root, 0).path_for(digest)
    corrupt = IntegrityError(f"payload {hx} is corrupt on disk ({path}): sha256 does not match")
    try:
        if _hash_file(path) != (digest, size):  # first pass: nothing written if corrupt
            raise corrupt
        hasher, seen = hashlib.sha256(), 0
        with open(path, "rb") as f:
            while chunk := f.read(256 * 1024):
                hasher.update(chunk)
                seen += len(chunk)
                out.write(chunk)
    except FileNotFoundError:
        raise IntegrityError(f"payload {hx} is missing from the file tier ({path})") from None
    if (hasher.digest(), seen) != (digest, size):
        raise IntegrityError(f"payload {hx} changed while it was being read ({path})")
    return seen


@app.command()
def cat(
    target: Annotated[str, typer.Argument(help="Response id, or payload checksum (sha256 hex).")],
    root: RootOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Write a payload's exact bytes to stdout, verified against its sha256 first."""
    with _errors(verbose), connection(_root(root), BUSY_TIMEOUT) as conn:
        digest = _digest_of(target.lower())
        if digest is None:
            response_id = _resolve_response(conn, target)
            row = conn.execute("SELECT checksum FROM responses WHERE id = ?", (response_id,))
            checksum = row.fetchone()[0]
            if checksum is None:
                raise IntegrityError(f"response {response_id} has no payload")
            digest = bytes.fromhex(checksum)
        sys.stdout.flush()
        out = sys.stdout.buffer
        _copy_payload(_root(root), conn, digest, out)
        out.flush()


# -- maintenance ---------------------------------------------------------------------------------


@app.command()
def stats(
    root: RootOption = None, as_json: JsonOption = False, verbose: VerboseOption = False
) -> None:
    """Counts and bytes per source, cache hit rate, error rate, payload tiers, database size.

    hit rate = requests served from the store / (those + requests fetched upstream);
    error rate = error responses (every failed attempt is one) / all responses.
    """
    with _errors(verbose):
        st = _run(lambda: _stats.stats(_root(root), busy_timeout=BUSY_TIMEOUT))
    if as_json:
        _print_json(st.to_json())
        return
    table = Table(title=f"store {st.root}")
    columns = ("source", "sessions", "requests", "cache hits", "fetched", "hit rate",
               "responses", "errors", "error rate", "bytes")  # fmt: skip
    for col in columns:
        table.add_column(col, justify="left" if col == "source" else "right")
    for s in [*st.sources, st.totals]:
        table.add_row(
            s.source,
            str(s.sessions),
            str(s.requests),
            str(s.cache_hits),
            str(s.fetched),
            _rate(s.hit_rate),
            str(s.responses),
            str(s.errors),
            _rate(s.error_rate),
            _size(s.bytes),
        )
    console.print(table)
    console.print(
        f"payloads: {st.inline_payloads} inline ({_size(st.inline_bytes)}), "
        f"{st.file_payloads} files ({_size(st.file_bytes)}); database: {_size(st.db_bytes)}",
        soft_wrap=True,
    )


@app.command("verify")
def verify_command(
    root: RootOption = None,
    grace: Annotated[
        str, typer.Option(help="Ignore files younger than this (e.g. 10m on a live store).")
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

        seconds = parse_duration(grace).total_seconds()
        report = _run(
            lambda: _verify.verify(
                _root(root), grace=seconds, busy_timeout=BUSY_TIMEOUT, on_progress=on_progress
            )
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


def _gc_lines(report: _cleanup.GcReport, grace: str) -> list[str]:
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


GraceOption = Annotated[
    str,
    typer.Option(
        help="Only delete files older than this: a file is written before its row commits."
    ),
]


@app.command("gc")
def gc_command(
    root: RootOption = None,
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
        seconds = parse_duration(grace).total_seconds()
        report = _run(
            lambda: _cleanup.gc(
                _root(root), dry_run=dry_run, grace=seconds, busy_timeout=BUSY_TIMEOUT
            )
        )
    if as_json:
        _print_json(report.to_json())
        return
    for line in _gc_lines(report, grace):
        console.print(line, soft_wrap=True)


@app.command("prune")
def prune_command(
    older_than: Annotated[
        str, typer.Option("--older-than", help="Age to keep: e.g. 30d, 12h, 90m, 2w.")
    ],
    root: RootOption = None,
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
        report = _run(
            lambda: _cleanup.prune(
                _root(root),
                older_than=age,
                source=source,
                bucket=bucket,
                dry_run=dry_run,
                busy_timeout=BUSY_TIMEOUT,
            )
        )
        gc_report = None
        if then_gc and not dry_run:
            seconds = parse_duration(grace).total_seconds()
            gc_report = _run(
                lambda: _cleanup.gc(_root(root), grace=seconds, busy_timeout=BUSY_TIMEOUT)
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
    session: Annotated[str, typer.Argument(help="Session id (or a unique prefix of it).")],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Bundle file to write (.tar, or .tar.gz).")
    ],
    root: RootOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Write a session as a self-contained bundle: rows as JSON lines plus every payload.

    Another machine imports it (`mxm-dataio import`) and replays it with only_if_cached.
    """
    with _errors(verbose):
        report = _run(
            lambda: _bundle.export_session(_root(root), session, output, busy_timeout=BUSY_TIMEOUT)
        )
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
    inline_threshold: Annotated[
        int, typer.Option(min=0, help="Payloads up to this many bytes go inline in SQLite.")
    ] = DEFAULT_INLINE_THRESHOLD,
    verbose: VerboseOption = False,
) -> None:
    """Import a bundle into the store (created if missing). Every payload is verified against
    its sha256 before any row is written; importing the same bundle twice adds nothing."""
    with _errors(verbose):
        report = _run(
            lambda: _bundle.import_bundle(
                _root(root), bundle, inline_threshold=inline_threshold, busy_timeout=BUSY_TIMEOUT
            )
        )
    console.print(
        f"imported session {report.session_id} from {report.path}: added {report.sessions} "
        f"sessions, {report.requests} requests, {report.responses} responses, "
        f"{report.payloads} payloads ({_size(report.bytes_verified)} verified)",
        soft_wrap=True,
    )


# -- jobs ----------------------------------------------------------------------------------------

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
        _RateColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=False,
    )


async def _on_signals(
    fn: Callable[[anyio.Event], Awaitable[T]], *, cancel: bool
) -> tuple[T | None, bool]:
    """Run ``fn(stop)``; Ctrl-C (or SIGTERM) sets ``stop`` (and with ``cancel=True`` also
    cancels ``fn``). Returns ``(result, interrupted)``. A second Ctrl-C interrupts at once."""
    stop = anyio.Event()
    outcome: list[T] = []
    failure: list[Exception] = []
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    stop.set()
                    if cancel:
                        tg.cancel_scope.cancel()
                    return  # the default handler is back: a second Ctrl-C raises at once

        tg.start_soon(watch)
        try:
            outcome.append(await fn(stop))
        except Exception as exc:  # re-raised below, not wrapped in an ExceptionGroup
            failure.append(exc)
        finally:
            tg.cancel_scope.cancel()
    if failure:
        raise failure[0]
    return (outcome[0] if outcome else None), stop.is_set()


def _plan_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str, separators=(",", ":"))


def _print_dry_run(plan: JobPlan, store_root: Path, show: int, as_json: bool) -> None:
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


@app.command("run")
def run_command(
    job_file: Annotated[Path, typer.Argument(help="The job file (YAML); see the README, Jobs.")],
    root: Annotated[
        Path | None,
        typer.Option(
            "--root",
            help="Store directory (default: the job's store:, else $MXM_DATAIO_ROOT, "
            "else ./dataio).",
        ),
    ] = None,
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
) -> None:
    """Run an ingestion job: every request its file describes, through the cache.

    Rerunning fetches only what is missing or stale. Exit status: 0 every request ended OK
    (or --allow-failures), 1 some failed (or an error), 2 the job file is invalid (nothing ran),
    3 the job is running already (its lease is held; --wait waits), 130 interrupted.
    """
    from mxm_dataio_async._exceptions import LeaseHeld
    from mxm_dataio_async.jobs import JobConfigError, JobPlan, load_job, resolve_root, run_job

    with _errors(verbose):
        try:
            config = load_job(job_file)
            store_root = resolve_root(config, root)
            if dry_run:
                plan = JobPlan(config, limit=limit, only=only)
                _print_dry_run(plan, store_root, show, as_json)
                return
            if as_json:
                summary, interrupted = _run(
                    lambda: _on_signals(
                        lambda stop: run_job(
                            config, root=store_root, limit=limit, only=only, wait=wait, stop=stop
                        ),
                        cancel=False,
                    )
                )
            else:
                with _job_progress() as progress:
                    tasks: dict[str, TaskID] = {}

                    def on_progress(s: SourceSummary) -> None:
                        if s.source not in tasks:
                            tasks[s.source] = progress.add_task(
                                s.source, total=s.total, cached=0, failed=0
                            )
                        progress.update(
                            tasks[s.source], completed=s.done, cached=s.from_cache, failed=s.failed
                        )

                    summary, interrupted = _run(
                        lambda: _on_signals(
                            lambda stop: run_job(
                                config,
                                root=store_root,
                                limit=limit,
                                only=only,
                                wait=wait,
                                on_progress=on_progress,
                                stop=stop,
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
    if summary is not None:
        if as_json:
            _print_json(summary.to_json())
        else:
            _print_summary(summary)
    if interrupted or summary is None or summary.interrupted:
        err_console.print(
            "[yellow]interrupted:[/yellow] what was recorded is kept; run the job again "
            "to fetch the rest"
        )
        raise typer.Exit(EXIT_INTERRUPTED)
    if not summary.ok and not allow_failures:
        raise typer.Exit(EXIT_FAILED)


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


async def _tail(
    store_root: Path,
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

    from mxm_dataio_async._store import Store

    printed = 0
    deadline = None if stop_after is None else time.monotonic() + stop_after
    async with Store(store_root) as store:
        with connection(store_root, BUSY_TIMEOUT) as conn:
            cursor = await store.read_checkpoint(name)
            while True:
                async for resp in store.iter_responses(
                    source=source, kind=kind, status=status, after=cursor
                ):
                    found = _rows(
                        conn,
                        "SELECT source, kind, endpoint, params FROM requests WHERE id = ?",
                        (resp.request_id,),
                    )
                    typer.echo(_tail_line(resp, found[0] if found else None))
                    # After the line is out, and shielded: Ctrl-C never leaves a printed line
                    # behind the checkpoint (it would be printed again).
                    with anyio.CancelScope(shield=True):
                        await store.write_checkpoint(name, resp.id)
                    cursor = resp.id
                    printed += 1
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
            "--checkpoint", help="Consumer name: resume after the last response it was shown."
        ),
    ],
    root: RootOption = None,
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
    error. Use one checkpoint name per consumer (and per set of filters). Cache hits add no
    response, so they are not shown.
    """
    store_root = _root(root)
    with _errors(verbose):
        if not (store_root / "dataio.sqlite").is_file():
            raise StoreError(f"no store at {store_root} (no dataio.sqlite there)")
        if status is not None:
            from mxm_dataio_async._models import ResponseStatus

            allowed = ", ".join(s.value for s in ResponseStatus)
            if status not in {s.value for s in ResponseStatus}:
                raise ValueError(f"unknown status {status!r}; use one of: {allowed}")
        try:
            _run(
                lambda: _on_signals(
                    lambda _: _tail(
                        store_root,
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


def main() -> None:
    app()
