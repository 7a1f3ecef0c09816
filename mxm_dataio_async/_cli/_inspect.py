"""Read commands: sessions, show, meta, cat and stats."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import sys
from pathlib import Path
from typing import Annotated, Any, BinaryIO

import typer
from rich.markup import escape
from rich.table import Table

from mxm_dataio_async._cli._common import (
    BUSY_TIMEOUT,
    JsonOption,
    RootOption,
    VerboseOption,
    _errors,
    _print_json,
    _rate,
    _root,
    _rows,
    _run,
    _size,
    _when,
    app,
    console,
)
from mxm_dataio_async._exceptions import IntegrityError, StoreError
from mxm_dataio_async._store import _stats
from mxm_dataio_async._store._maintenance import (
    _digest_of,
    _hash_file,
    connection,
    resolve_session,
)
from mxm_dataio_async._store._payloads import PayloadFiles, verify


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
                f"…{r['id'][-8:]}" if cached else "",  # ids start with their time: the tail tells
                q["cache_mode"],
                "" if q["ttl_seconds"] is None else f"{q['ttl_seconds']:g}s",
                q["as_of_bucket"] or "",
                q["cache_tag"] or "",
                _size(r["size_bytes"]),
                (r["checksum"] or "")[:12],
            )
    console.print(table)


def _resolve_response(conn: sqlite3.Connection, text: str) -> str:
    """A full response id from itself, a unique prefix, or a unique tail (``…1a2b3c4d``).

    Response ids are time-ordered (UUID version 7), so ids of one run share their first
    characters and ``show`` prints their random last ones.
    """
    if conn.execute("SELECT 1 FROM responses WHERE id = ?", (text,)).fetchone():
        return text
    tail = text.lstrip("…")
    if len(tail) >= 8:
        if tail == text:
            found = conn.execute(
                "SELECT id FROM responses WHERE id >= ? AND id < ? LIMIT 2",
                (text, text + "\uffff"),
            ).fetchall()
            if found:
                return _unique(found, text)
        like = tail.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        found = conn.execute(
            "SELECT id FROM responses WHERE id LIKE ? ESCAPE '\\' LIMIT 2", ("%" + like,)
        ).fetchall()
        if found:
            return _unique(found, text)
    raise StoreError(f"unknown response {text!r}")


def _unique(found: list[Any], text: str) -> str:
    if len(found) > 1:
        raise StoreError(f"response id {text!r} is ambiguous; give more characters")
    return str(found[0][0])


@app.command()
def meta(
    response: Annotated[
        str, typer.Argument(help="Response id (or a unique prefix, or its last 8+ characters).")
    ],
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
