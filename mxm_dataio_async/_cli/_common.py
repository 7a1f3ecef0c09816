"""Shared by the command modules: the typer ``app``, the consoles, the common options, error
handling, opening the store, and formatting helpers."""

from __future__ import annotations

import contextlib
import errno
import gc
import importlib.util
import json
import os
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import anyio

try:
    import typer
    from rich.console import Console
    from rich.markup import escape
    from typer.core import TyperGroup
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise SystemExit(
        "the mxm-dataio command needs the 'cli' extra: pip install 'mxm-dataio-async[cli]'"
    ) from exc

from mxm_dataio_async import __version__
from mxm_dataio_async._exceptions import DataIOError, StoreError, UsageError
from mxm_dataio_async._store import DEFAULT_INLINE_THRESHOLD, Store

#: The exit status when the reader of our output went away (``mxm-dataio tail | head -1``):
#: 128 + SIGPIPE, what a shell reports for ``cat``, ``yes`` and other tools stopped by a closed
#: pipe, so that ``set -o pipefail`` still tells a cut-short run from a complete one.
EXIT_PIPE_CLOSED = 141


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the flush at exit cannot fail (and print) again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        finally:
            os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass  # no real file descriptor (a test runner's capture): nothing will flush to a pipe


class _Group(TyperGroup):
    """The command group, quiet when its output pipe closes: no "Broken pipe" error, exit 141."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            _silence_stdout()
            raise typer.Exit(EXIT_PIPE_CLOSED) from None


app = typer.Typer(
    name="mxm-dataio",
    cls=_Group,
    help="Inspect, verify and manage an mxm-dataio-async store.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Docstrings are Markdown: paragraphs reflow to the terminal's width (no hard line breaks
    # inside a paragraph), `code` and indented examples render as such.
    rich_markup_mode="markdown",
)


class _Console(Console):
    """A rich Console that leaves a closed pipe to the command group (rich itself would exit
    with status 1)."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError(errno.EPIPE, "the reader of this output went away")


# Piped or redirected output is not squeezed to 80 columns (rich's default off a terminal).
console = _Console(width=None if sys.stdout.isatty() else 200)
err_console = _Console(stderr=True)

T = TypeVar("T")
_verbose = False


def default_root() -> Path:
    return Path(os.environ.get("MXM_DATAIO_ROOT") or "./dataio")


RootOption = Annotated[
    Path | None,
    typer.Option("--root", help="Store directory (default: $MXM_DATAIO_ROOT, else ./dataio)."),
]
StoreOption = Annotated[
    str | None,
    typer.Option(
        "--store",
        help="The store: a folder, or postgresql://user@host:port/db "
        "(default: $MXM_DATAIO_STORE, else --root).",
    ),
]
PayloadsOption = Annotated[
    str | None,
    typer.Option(
        "--payloads",
        help="Where payloads above the inline threshold live: a folder or s3://bucket/prefix "
        "(default: $MXM_DATAIO_PAYLOADS, else the store's folder).",
    ),
]
RedisOption = Annotated[
    str | None,
    typer.Option(
        "--redis",
        help="Share every source's rate limit and Retry-After pauses (and in-flight requests) "
        "with all runs and workers on this Redis: redis://host:6379/0 (default: the job's redis:, "
        "else $MXM_DATAIO_REDIS; without one, limits are per process).",
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON (for scripts).")]
VerboseOption = Annotated[
    bool, typer.Option("--verbose", "-v", help="On error, show the details (traceback).")
]
DryRunOption = Annotated[
    bool, typer.Option("--dry-run", help="Report what would be removed; change nothing.")
]
GraceOption = Annotated[
    str,
    typer.Option(
        help="Only delete files older than this: a file is written before what names it is "
        "committed (a payload before its row, a dataset's part before its version)."
    ),
]
BUSY_TIMEOUT = 30.0  # seconds to wait for a writer in another process to release the lock


def _print_version(value: bool) -> None:
    if value:
        try:
            loop = event_loop()
        except UsageError as exc:
            loop = str(exc)
        typer.echo(f"mxm-dataio {__version__} (event loop: {loop})")
        raise typer.Exit()


_log_handler: Any = None


def show_logs(verbose: bool, json_lines: bool) -> None:
    """``-v``: the library's logs (retries, cooldowns, breakers, stale answers; INFO and up) on
    stderr; ``--log-json``: the same as JSON lines with every event field. Once per process."""
    global _log_handler
    if not (verbose or json_lines):
        return
    import logging

    from mxm_dataio_async.telemetry import configure_logging

    logger = logging.getLogger("mxm_dataio_async")
    if _log_handler is not None:
        logger.removeHandler(_log_handler)
    _log_handler = configure_logging(logging.INFO, json_lines=json_lines)


LogJsonOption = Annotated[
    bool,
    typer.Option(
        "--log-json", help="Write the library's logs to stderr as JSON lines (one per event)."
    ),
]


@app.callback()
def _main(
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose",
            "-v",
            help="On error, show the details (traceback); show the library's logs on stderr.",
        ),
    ] = False,
    log_json: LogJsonOption = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_print_version,
            is_eager=True,
            help="Print the version and exit.",
        ),
    ] = False,
) -> None:
    """mxm-dataio: every request and the exact bytes, recorded, verified and replayable.

    Every command takes --root (default: $MXM_DATAIO_ROOT, else ./dataio).
    """
    global _verbose
    _verbose = verbose
    show_logs(verbose, log_json)


@contextlib.contextmanager
def _errors(verbose: bool) -> Iterator[None]:
    """One clear line on stderr and exit status 1 for an error; the traceback with --verbose."""
    try:
        yield
    except (typer.Exit, typer.Abort, KeyboardInterrupt, BrokenPipeError):
        raise  # a closed output pipe is no error: the group exits quietly (EXIT_PIPE_CLOSED)
    except Exception as exc:
        if verbose or _verbose:
            err_console.print_exception()
        # The store translates its backends' errors (the database's among them) to StoreError.
        expected = isinstance(exc, DataIOError | OSError | ValueError)
        text = str(exc) if expected else f"unexpected {type(exc).__name__}: {exc}"
        hint = "" if verbose or _verbose or expected else " (run with --verbose for details)"
        err_console.print(f"[red]error:[/red] {escape(text)}{hint}", soft_wrap=True)
        raise typer.Exit(1) from None


def _root(root: Path | None) -> Path:
    return root if root is not None else default_root()


def event_loop() -> str:
    """The event loop commands run on: ``uvloop`` when it is installed (the ``fast`` extra;
    measured here: a recorded 1 KiB HTTP miss ~15% faster), else ``asyncio``.
    ``MXM_DATAIO_LOOP=asyncio`` or ``=uvloop`` chooses."""
    chosen = os.environ.get("MXM_DATAIO_LOOP", "").strip().lower()
    if chosen not in ("", "asyncio", "uvloop"):
        raise UsageError(f"MXM_DATAIO_LOOP must be asyncio or uvloop, not {chosen!r}")
    available = importlib.util.find_spec("uvloop") is not None
    if chosen == "uvloop" and not available:
        raise UsageError(
            "MXM_DATAIO_LOOP=uvloop, but uvloop is not installed: "
            "pip install 'mxm-dataio-async[fast]'"
        )
    return chosen or ("uvloop" if available else "asyncio")


def _run(fn: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine function to completion (the CLI is sync; the store API is async), on
    :func:`event_loop`'s loop.

    While it runs, the objects made before it (the imports, the parsed job) are frozen out of
    the garbage collector (``gc.freeze``): a full collection no longer walks them, and those
    collections were the loop's longest stalls (http_bench's mock trial: 24-26 ms at worst, ~5
    ms frozen, and 6% more fetches/s). Unfrozen again at the end, so a program that calls the
    CLI in-process keeps collecting them; one that froze objects itself is left as it was.
    """
    freeze = gc.get_freeze_count() == 0
    if freeze:
        gc.freeze()
    try:
        return anyio.run(fn, backend_options={"use_uvloop": event_loop() == "uvloop"})
    finally:
        if freeze:
            gc.unfreeze()


@dataclass(frozen=True, slots=True)
class Where:
    """Which store a command uses: ``--store`` (a folder or a URL), ``--root`` (a folder) and
    ``--payloads``; then ``$MXM_DATAIO_STORE``, ``$MXM_DATAIO_ROOT``, ``$MXM_DATAIO_PAYLOADS``."""

    root: Path | None = None
    store: str | None = None
    payloads: str | None = None

    def target(self) -> str | Path:
        if self.store is not None and self.root is not None:
            raise ValueError("give --store or --root, not both (--root is a store folder)")
        if self.store is not None:
            return self.store
        if self.root is not None:
            return self.root
        env = os.environ.get("MXM_DATAIO_STORE")
        return env if env else default_root()

    def payloads_at(self) -> str | None:
        return self.payloads or os.environ.get("MXM_DATAIO_PAYLOADS") or None

    def label(self) -> str:
        """The store for titles and messages (a URL's password left out)."""
        target = str(self.target())
        if "://" in target and "@" in target.split("://", 1)[1]:
            scheme, rest = target.split("://", 1)
            user, host = rest.rsplit("@", 1)
            target = f"{scheme}://{user.split(':', 1)[0]}@{host}"
        return target


Access = Literal["read", "write", "create"]
"""How a command opens the store: ``read`` an existing one and change nothing (inspection);
``write`` an existing one (maintenance, checkpoints); ``create`` it if missing (import)."""


def _open_store(
    where: Where, access: Access, *, inline_threshold: int = DEFAULT_INLINE_THRESHOLD
) -> Store:
    """The ``Store`` a command names (not yet open). ``read`` and ``write`` never create a store:
    a missing one is ``StoreError("no store at ...")``, and nothing is made on disk."""
    return Store(
        where.target(),
        payloads=where.payloads_at(),
        read_only=access == "read",
        create=access == "create",
        busy_timeout=BUSY_TIMEOUT,
        inline_threshold=inline_threshold,
    )


def _with_store(
    where: Where,
    access: Access,
    fn: Callable[[Store], Awaitable[T]],
    *,
    inline_threshold: int = DEFAULT_INLINE_THRESHOLD,
) -> T:
    """Open the store (see :func:`_open_store`), run ``fn(store)`` and close it again."""
    store = _open_store(where, access, inline_threshold=inline_threshold)

    async def run() -> T:
        async with store:
            return await fn(store)

    return _run(run)


#: The shortest session prefix the store resolves (as ``git`` resolves commits).
MIN_SESSION_PREFIX = 4


async def resolve_session(store: Store, text: str) -> str:
    """``store.resolve_session(text)``, except that a prefix shorter than 4 characters is not
    called "unknown" when sessions start with it: it is "too short" (one does) or "ambiguous"
    (several do), and the message says what to give instead."""
    if len(text) >= MIN_SESSION_PREFIX or not text:
        return await store.resolve_session(text)
    matches: list[str] = []
    async for row in store.iter_rows("sessions"):
        if row["id"] == text:
            return text
        if row["id"].startswith(text):
            matches.append(row["id"])
    if not matches:
        raise StoreError(f"unknown session {text!r}; `mxm-dataio sessions` lists them")
    if len(matches) == 1:
        raise StoreError(
            f"session prefix {text!r} is too short: give at least {MIN_SESSION_PREFIX} "
            f"characters (it matches one session, {matches[0][:8]})"
        )
    raise StoreError(
        f"session prefix {text!r} is ambiguous: {len(matches)} sessions start with it; give "
        f"more characters (at least {MIN_SESSION_PREFIX})"
    )


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
