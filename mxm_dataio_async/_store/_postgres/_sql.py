"""What every part of the PostgreSQL backend shares: the store's URL, the one translation of driver
errors into ``StoreError``, and the encoding of values PostgreSQL is stricter about than SQLite.

Error translation happens here and nowhere else: callers catch ``DRIVER_ERRORS`` and raise
``pg_error(action, exc, location)`` from it. ``is_disconnect`` and ``is_transient`` say which
failures are worth a retry (the server went away; a deadlock or lock timeout that rolled the
transaction back).

Values: PostgreSQL ``text`` holds neither NUL characters nor lone surrogates, and ``jsonb`` refuses
``\\u0000``, unpaired surrogate escapes and ``NaN``, all of which SQLite stores. Plain text columns
get the SQLite backend's treatment of lone surrogates (backslash escapes), NUL included. JSON
columns stay lossless: a document ``jsonb`` cannot hold (or whose numbers it would rewrite, such as
``1e+300``) is stored as ``{"$mxm_json": "<the exact JSON text>"}`` and unwrapped on the way out.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio
import asyncpg  # type: ignore[import-untyped]

from mxm_dataio_async._exceptions import StoreError
from mxm_dataio_async._identity import canonical_json
from mxm_dataio_async._store._sqlite._sql import json_text, storable_text

__all__ = [
    "close_pool",
    "open_pool",
    "shielded",
    "DEFAULT_SCHEMA",
    "DRIVER_ERRORS",
    "Target",
    "advisory_key",
    "is_disconnect",
    "is_transient",
    "json_in",
    "json_out",
    "json_value",
    "parse_target",
    "pg_error",
    "pg_text",
    "utc",
]

DEFAULT_SCHEMA: Final = "public"
_SCHEMA_NAME: Final = re.compile(r"[a-z_][a-z0-9_]{0,62}")

#: Everything asyncpg (and the socket under it) raises; translated by :func:`pg_error`.
DRIVER_ERRORS: Final = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    OSError,
    TimeoutError,
)


@dataclass(frozen=True, slots=True)
class Target:
    """Where a store lives: ``dsn`` for asyncpg (without the ``schema`` option), the PostgreSQL
    ``schema`` holding its tables, and ``location`` (the URL without its password) for messages."""

    dsn: str
    schema: str
    location: str


def parse_target(url: str, schema: str | None = None) -> Target:
    """Split ``postgresql://user:pw@host:port/db?schema=name`` into what asyncpg and messages
    need. ``schema`` (the argument) and ``?schema=`` must agree when both are given."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("postgresql", "postgres"):
        raise ValueError(f"not a PostgreSQL URL (postgresql://...): {_without_password(url)}")
    query = parse_qsl(parts.query, keep_blank_values=True)
    named = [v for k, v in query if k == "schema"]
    rest = [(k, v) for k, v in query if k != "schema"]
    if len(named) > 1 or (named and schema is not None and named[0] != schema):
        raise ValueError(f"the store's schema is given twice, differently: {[*named, schema]}")
    name = schema if schema is not None else (named[0] if named else DEFAULT_SCHEMA)
    if not _SCHEMA_NAME.fullmatch(name):
        raise ValueError(
            f"schema {name!r} must be a lowercase SQL name (a-z, 0-9, _; at most 63 characters)"
        )
    dsn = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(rest), parts.fragment))
    shown = [(k, v) for k, v in rest if k != "password"]
    if name != DEFAULT_SCHEMA:
        shown.append(("schema", name))
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{parts.username}@{host}" if parts.username else host
    location = urlunsplit((parts.scheme, netloc, parts.path, urlencode(shown), ""))
    return Target(dsn, name, location)


def _without_password(url: str) -> str:
    try:
        parts = urlsplit(url)
        host = parts.netloc.rpartition("@")[2]
        netloc = f"{parts.username}@{host}" if parts.username else host
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    except ValueError:
        return "<unparseable URL>"


def advisory_key(schema: str) -> int:
    """The advisory lock that serialises creating and migrating ``schema`` (per database)."""
    digest = hashlib.sha256(f"mxm-dataio-async:{schema}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


# -- errors ---------------------------------------------------------------------------------------


def _sqlstate(exc: BaseException) -> str:
    state = getattr(exc, "sqlstate", None)
    return state if isinstance(state, str) else ""


def is_disconnect(exc: BaseException) -> bool:
    """The server is unreachable or the connection was lost (a restart, a network failure):
    retrying on a new connection may succeed. Whether a commit in flight landed is unknown."""
    if isinstance(
        exc,
        OSError
        | TimeoutError
        | asyncpg.PostgresConnectionError
        # The protocol lost its footing (e.g. "cannot switch to state 15; another operation is
        # in progress" when the server hangs up mid-statement): the connection is unusable.
        | asyncpg.exceptions.InternalClientError,
    ):
        return True
    if isinstance(exc, asyncpg.InterfaceError):
        return "closed" in str(exc)  # "connection is closed", "...closed in the middle of..."
    # 08: connection exceptions; 57P01-3: the server shut down, crashed, or is starting up.
    return _sqlstate(exc).startswith(("08", "57P"))


def is_transient(exc: BaseException) -> bool:
    """The transaction was rolled back and may simply be run again: a serialisation failure, a
    deadlock, or a lock not granted within ``lock_timeout``."""
    return _sqlstate(exc) in ("40001", "40P01", "55P03")


def pg_error(action: str, exc: BaseException, location: str) -> StoreError:
    """Translate an asyncpg (or socket) error into a StoreError whose message says what to do."""
    state = _sqlstate(exc)
    where = f"PostgreSQL at {location}"
    detail = str(exc).strip() or type(exc).__name__
    if state.startswith("28"):
        hint = "check the user and password in the URL (or ~/.pgpass)"
        return StoreError(f"cannot {action}: {where} refused the login ({detail}); {hint}")
    if state == "3D000":
        return StoreError(
            f"cannot {action}: {where}: the database does not exist ({detail}); "
            "create it (createdb) or fix the URL"
        )
    if is_disconnect(exc):
        return StoreError(
            f"cannot {action}: {where} is unreachable or the connection was lost "
            f"({type(exc).__name__}: {detail}); check that the server is running, then retry"
        )
    if state == "42501":
        return StoreError(
            f"cannot {action}: {where}: permission denied ({detail}); grant the user rights on "
            "the store's schema, or open the store read-only"
        )
    if state == "25006":
        return StoreError(
            f"cannot {action}: {where} accepts no writes ({detail}); is it a standby? "
            "connect to the primary"
        )
    if state == "53100":
        return StoreError(f"cannot {action}: {where}: the server's disk is full ({detail})")
    if state == "53300":
        return StoreError(
            f"cannot {action}: {where} has no free connection slot ({detail}); lower "
            "pool_size or raise the server's max_connections"
        )
    if state == "55P03":
        return StoreError(
            f"cannot {action}: {where}: timed out waiting for a lock ({detail}); another "
            "transaction (gc, prune, an import?) held it longer than busy_timeout; retry"
        )
    if state == "40P01" or state == "40001":
        return StoreError(f"cannot {action}: {where}: {detail}; retry")
    if state == "23505":
        return StoreError(f"cannot {action}: a row with that id is already stored ({detail})")
    if state.startswith("22") or isinstance(exc, asyncpg.DataError):
        return StoreError(f"cannot {action}: a value {where} cannot store ({detail})")
    if state == "57014":
        return StoreError(f"cannot {action}: {where} cancelled the statement ({detail})")
    return StoreError(f"cannot {action}: {where}: {type(exc).__name__}: {detail}")


# -- values ---------------------------------------------------------------------------------------


def utc(dt: datetime) -> datetime:
    """An aware UTC datetime (a naive one is taken as local time, as the SQLite backend does)."""
    return dt if dt.tzinfo is UTC else dt.astimezone(UTC)


def pg_text(value: str | None) -> str | None:
    """Text PostgreSQL can store: lone surrogates and NUL characters become backslash escapes
    (the SQLite backend escapes lone surrogates the same way; SQLite would keep a NUL)."""
    if value is None:
        return None
    if not value.isascii():
        value = storable_text(value)
        assert value is not None
    if "\x00" in value:
        value = value.replace("\x00", "\\x00")
    return value


_WRAP: Final = "$mxm_json"
_ESCAPE: Final = re.compile(r"\\(?:u([0-9a-fA-F]{4})|.)", re.DOTALL)


def _unholdable_escape(text: str) -> bool:
    """Does JSON ``text`` escape a NUL or an unpaired surrogate (both refused by jsonb)?"""
    high_ends = -1  # where the escape of a pending high surrogate ended
    for m in _ESCAPE.finditer(text):
        code = m.group(1)
        point = int(code, 16) if code is not None else -1
        if high_ends >= 0:
            if m.start() == high_ends and 0xDC00 <= point <= 0xDFFF:
                high_ends = -1
                continue
            return True
        if point == 0 or 0xDC00 <= point <= 0xDFFF:
            return True
        if 0xD800 <= point <= 0xDBFF:
            high_ends = m.end()
    return high_ends >= 0


def json_in(text: str | None) -> str | None:
    """JSON text as a ``jsonb`` column holds it (see the module docstring). ``text`` is ASCII
    JSON as ``canonical_json``/``json_text`` write it; other JSON text is re-encoded first."""
    if text is None:
        return None
    if not text.isascii():  # (rows being imported) the same document, as ASCII
        text = json.dumps(json.loads(text), separators=(",", ":"), ensure_ascii=True)
    if (
        _WRAP in text
        or "NaN" in text
        or "Infinity" in text
        or "e+" in text  # jsonb prints 1e+300 as 1000...0, which reads back as an int
        or ("\\u" in text and _unholdable_escape(text))
    ):
        return json.dumps({_WRAP: text}, separators=(",", ":"))
    return text


def json_value(stored: str | None) -> Any:
    """The value of a ``jsonb`` column as stored by :func:`json_in`."""
    if stored is None:
        return None
    value = json.loads(stored)
    if type(value) is dict and len(value) == 1 and _WRAP in value:
        return json.loads(value[_WRAP])
    return value


def json_out(stored: str | None, *, canonical: bool) -> str | None:
    """The JSON text the SQLite backend keeps for the same value: ``canonical_json`` (params,
    body) or ``json_text`` (headers, adapter_meta; jsonb does not keep their key order)."""
    if stored is None:
        return None
    value = json.loads(stored)
    if type(value) is dict and len(value) == 1 and _WRAP in value:
        text: str = value[_WRAP]
        return text
    return canonical_json(value) if canonical else json_text(value)


async def open_pool(
    dsn: str, location: str, *, schema: str, size: int, busy_timeout: float, read_only: bool
) -> Any:
    """The store's connection pool, each connection set up for the store's schema."""
    settings = {
        "search_path": f'"{schema}"',
        "application_name": "mxm-dataio-async",
        "timezone": "UTC",
        # A statement waits this long for a lock (busy_timeout's meaning in SQLite); 0 in
        # PostgreSQL would mean forever.
        "lock_timeout": str(max(1, round(busy_timeout * 1000))),
    }
    if read_only:
        settings["default_transaction_read_only"] = "on"  # a bug that writes fails loudly
    try:
        return await asyncpg.create_pool(
            dsn,
            min_size=1,
            max_size=size,
            server_settings=settings,
            timeout=max(busy_timeout, 5.0),
        )
    except DRIVER_ERRORS as exc:
        raise pg_error(f"open {location}", exc, location) from exc


async def close_pool(pool: Any) -> None:
    with anyio.CancelScope(shield=True):
        try:
            await asyncio.wait_for(pool.close(), timeout=10)
        except DRIVER_ERRORS:  # gone, or stuck: let go of it
            pool.terminate()


async def shielded(loop: Callable[[], Awaitable[None]]) -> None:
    """Run a serving loop shielded: the writers and the reader serve until ``aclose()`` stops
    them, not until the opener is cancelled (code holding the store open under a cancelled
    scope still has final writes)."""
    with anyio.CancelScope(shield=True):
        await loop()
