"""Read commands: sessions, show, meta, cat and stats.

They open the store read-only (``Store(root, read_only=True)``): nothing is created or changed,
and a missing store is an error.
"""

from __future__ import annotations

import json
import re
import sys
from datetime import UTC, datetime
from typing import Annotated, Any, BinaryIO, Final

import typer
from rich.markup import escape
from rich.table import Table

from mxm_dataio_async._cli._common import (
    JsonOption,
    PayloadsOption,
    RootOption,
    StoreOption,
    VerboseOption,
    Where,
    _errors,
    _print_json,
    _rate,
    _size,
    _when,
    _with_store,
    app,
    console,
    resolve_session,
)
from mxm_dataio_async._exceptions import IntegrityError, StoreError
from mxm_dataio_async._models import Session
from mxm_dataio_async._store import Store


def _ts(moment: datetime | None) -> str | None:
    """A time as the store writes it (UTC, ISO 8601, microseconds always present)."""
    return None if moment is None else moment.astimezone(UTC).isoformat(timespec="microseconds")


def _session_row(s: Session) -> dict[str, Any]:
    """A session as ``sessions --json`` prints it (its counts are written when it ends)."""
    return {
        "id": s.id,
        "source": s.source,
        "as_of": s.as_of,
        "started_at": _ts(s.started_at),
        "ended_at": _ts(s.ended_at),
        "status": s.status.value,
        "cache_mode": s.cache_mode.value,
        "requests": s.requests,
        "responses": s.responses,
        "bytes": s.bytes_fetched,
        "error": s.error,
    }


@app.command()
def sessions(
    root: RootOption = None,
    store_url: StoreOption = None,
    payloads_url: PayloadsOption = None,
    source: Annotated[str | None, typer.Option(help="Only sessions of this source.")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="At most this many (newest).")] = None,
    as_json: JsonOption = False,
    verbose: VerboseOption = False,
) -> None:
    """List sessions, newest first: id, source, as_of, times, status, requests, bytes.

    The counts are those a session records when it ends (0 while it is still open).
    """
    with _errors(verbose):
        found = _with_store(
            Where(root, store_url, payloads_url),
            "read",
            lambda store: store.list_sessions(source=source, limit=limit),
        )
    rows = [_session_row(s) for s in found]
    if as_json:
        _print_json(rows)
        return
    table = Table(title=f"sessions in {Where(root, store_url, payloads_url).label()}")
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


_REQUEST_FIELDS: Final = (
    "id", "kind", "method", "endpoint", "params", "hash", "as_of_bucket", "cache_tag",
    "cache_mode", "ttl_seconds", "created_at", "served_from", "sent_checksum",
)  # fmt: skip
_RESPONSE_FIELDS: Final = (
    "id", "request_id", "status", "transport_status", "attempt", "attempts", "checksum",
    "size_bytes", "fetched_at", "cache_mode", "ttl_seconds", "as_of_bucket", "cache_tag",
    "sequence", "elapsed_ms", "error",
)  # fmt: skip


def _pick(row: dict[str, Any], fields: tuple[str, ...]) -> dict[str, Any]:
    return {k: row[k] for k in fields}


async def _session_detail(store: Store, text: str) -> dict[str, Any]:
    """A session's row, its requests (oldest first) with their responses, and for a cache hit
    the stored response it was served."""
    session_id = await resolve_session(store, text)
    found = [row async for row in store.iter_rows("sessions", ids=[session_id])]
    if not found:
        raise StoreError(f"unknown session {text!r}; `mxm-dataio sessions` lists them")
    requests = [
        _pick(q, _REQUEST_FIELDS) async for q in store.iter_rows("requests", session_id=session_id)
    ]
    requests.sort(key=lambda q: q["created_at"])  # stable: recording order within an instant
    by_request: dict[str, list[dict[str, Any]]] = {}
    async for row in store.iter_rows("responses", session_id=session_id):
        r = _pick(row, _RESPONSE_FIELDS)
        r["from_cache"] = False
        by_request.setdefault(r["request_id"], []).append(r)
    served_ids = sorted({q["served_from"] for q in requests if q["served_from"]})
    served: dict[str, dict[str, Any]] = {}
    if served_ids:
        async for row in store.iter_rows("responses", ids=served_ids):
            r = _pick(row, _RESPONSE_FIELDS)
            r["from_cache"] = True
            served[r["id"]] = r
    for q in requests:
        q["params"] = json.loads(q["params"]) if q["params"] else q["params"]
        q["responses"] = by_request.get(q["id"], [])
        q["served"] = served.get(q["served_from"]) if q["served_from"] else None
    for r in [*served.values(), *(r for rs in by_request.values() for r in rs)]:
        if r["status"] == "ok":  # how its records validated (datasets), if they were
            r["validations"] = [v.to_json() for v in await store.validations(r["id"])]
    return {"session": found[0], "requests": requests}


#: ``show`` names a response by this many last characters of its id: the random last group of
#: a UUID (48 bits), which ``cat`` and ``meta`` resolve (any unique tail of 8+ characters).
_HANDLE = 12


def _handle(response_id: str) -> str:
    """A response's handle as ``show`` prints it: ``…`` and the last 12 characters of its id
    (ids start with their time, so the tail is what tells them apart)."""
    return f"…{response_id[-_HANDLE:]}"


def _params_text(params: Any) -> str:
    if not params:
        return ""
    return json.dumps(params, ensure_ascii=False, separators=(",", ":"), default=str)


@app.command()
def show(
    session: Annotated[
        str, typer.Argument(help="Session id (or a unique prefix of 4+ characters).")
    ],
    root: RootOption = None,
    store_url: StoreOption = None,
    payloads_url: PayloadsOption = None,
    as_json: JsonOption = False,
    verbose: VerboseOption = False,
) -> None:
    """A session's requests and responses: params, status, and where each answer came from.

    One row per response. "fetched" rows are upstream attempts (one row per attempt, a
    stream's responses numbered by seq); "cache" rows were served a stored response
    (served_from), with the request's cache_mode, ttl, bucket and tag.

    The response column is the tail of its id, which `mxm-dataio cat` and `mxm-dataio meta`
    take; error is the failed attempt's error text. --json prints every field, with full ids.
    """
    with _errors(verbose):
        detail = _with_store(
            Where(root, store_url, payloads_url),
            "read",
            lambda store: _session_detail(store, session),
        )
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
    if s.get("error"):
        console.print(f"error: {escape(str(s['error']))}", soft_wrap=True)
    table = Table()
    columns = (
        "request", "params", "status", "http", "attempt", "from", "response", "seq",
        "cache_mode", "ttl", "bucket", "tag", "bytes", "error",
    )  # fmt: skip
    for col in columns:
        table.add_column(
            col,
            overflow="fold",
            no_wrap=col in ("response", "status", "from"),
            justify="right" if col in ("http", "seq", "bytes") else "left",
        )
    for q in detail["requests"]:
        label = f"{q['kind']} {q['method']} {q['endpoint'] or ''}".strip()
        params = escape(_params_text(q["params"]))
        answers = q["responses"] or ([q["served"]] if q["served"] else [])
        if not answers:
            table.add_row(escape(label), params, "-", *[""] * (len(columns) - 3))
        for r in answers:
            table.add_row(
                escape(label),
                params,
                r["status"],
                "" if r["transport_status"] is None else str(r["transport_status"]),
                f"{r['attempt']}/{r['attempts']}",
                "cache" if r["from_cache"] else "fetched",
                _handle(r["id"]),
                "" if r["sequence"] is None else str(r["sequence"]),
                q["cache_mode"],
                "" if q["ttl_seconds"] is None else f"{q['ttl_seconds']:g}s",
                escape(q["as_of_bucket"] or ""),
                escape(q["cache_tag"] or ""),
                _size(r["size_bytes"]),
                escape(r["error"] or ""),
            )
    console.print(table)
    _print_validations(detail)
    console.print(
        "response: the tail of the response's id, which `mxm-dataio cat` and `mxm-dataio meta` "
        "take (on a cache row, served_from: the stored response it was served)",
        soft_wrap=True,
        highlight=False,
    )


def _print_validations(detail: dict[str, Any]) -> None:
    """The validation outcomes of the session's responses (records ok, failed, first errors)."""
    table = Table(title="validation")
    for col in ("response", "model", "dataset", "ok", "failed", "first errors"):
        table.add_column(
            col, overflow="fold", justify="right" if col in ("ok", "failed") else "left"
        )
    seen: set[str] = set()
    for q in detail["requests"]:
        for r in q["responses"] or ([q["served"]] if q["served"] else []):
            if r["id"] in seen:
                continue
            seen.add(r["id"])
            for v in r.get("validations", []):
                errors = "; ".join(
                    f"record {e['index']} {e['path']}: {e['message']}" for e in v["errors"][:3]
                )
                table.add_row(
                    _handle(r["id"]), escape(v["model"]), escape(v["dataset"] or ""),
                    str(v["ok"]), str(v["failed"]), escape(errors),
                )  # fmt: skip
    if table.row_count:
        console.print(table)


def _decode(row: dict[str, Any], *keys: str) -> dict[str, Any]:
    """Parse the JSON text columns ``keys`` of a raw row (in place)."""
    for key in keys:
        if row[key] is not None:
            row[key] = json.loads(row[key])
    return row


async def _response_meta(store: Store, text: str) -> dict[str, Any]:
    response_id = await store.resolve_response(text)
    found = [row async for row in store.iter_rows("responses", ids=[response_id])]
    if not found:
        raise StoreError(f"unknown response {text!r}")
    resp = _decode(found[0], "headers", "adapter_meta")
    requests = [row async for row in store.iter_rows("requests", ids=[resp["request_id"]])]
    resp["request"] = _decode(requests[0], "params", "body", "headers") if requests else None
    return resp


@app.command()
def meta(
    response: Annotated[
        str,
        typer.Argument(
            help="Response id (or a unique prefix, or its last 8+ characters, as `show` prints)."
        ),
    ],
    root: RootOption = None,
    store_url: StoreOption = None,
    payloads_url: PayloadsOption = None,
    verbose: VerboseOption = False,
) -> None:
    """A response's metadata as JSON (with its request under "request")."""
    with _errors(verbose):
        resp = _with_store(
            Where(root, store_url, payloads_url),
            "read",
            lambda store: _response_meta(store, response),
        )
    _print_json(resp)


_SHA256_HEX: Final = re.compile(r"[0-9a-f]{64}")
#: ``cat`` holds a payload up to this size in memory between verifying and writing it; a larger
#: one is read twice (verified first, then written) so memory stays flat.
_CAT_BUFFER: Final = 8 * 1024 * 1024


async def _payload_checksum(store: Store, target: str) -> str:
    """The checksum ``target`` names: itself (sha256 hex), or a response's (id or handle)."""
    if _SHA256_HEX.fullmatch(target.lower()):
        return target.lower()
    response_id = await store.resolve_response(target)
    resp = await store.get_response(response_id)
    if resp is None:
        raise StoreError(f"unknown response {target!r}")
    if resp.checksum is None:
        raise IntegrityError(f"response {response_id} has no payload")
    return resp.checksum


async def _copy_payload(store: Store, checksum: str, out: BinaryIO) -> int:
    """Write a payload's exact bytes to ``out``, verified before the first byte is written.

    The first pass verifies (``iter_payload`` raises at the end at the latest); a payload that
    fits in ``_CAT_BUFFER`` is written from that pass, a larger one by a second verified pass.
    """
    held: list[bytes] | None = []
    seen = 0
    async for chunk in store.iter_payload(checksum):
        seen += len(chunk)
        if held is not None:
            held.append(chunk)
            if seen > _CAT_BUFFER:
                held = None  # too big to hold: verify only, then read it again
    if held is not None:
        for chunk in held:
            out.write(chunk)
        return seen
    written = 0
    try:
        async for chunk in store.iter_payload(checksum):
            out.write(chunk)
            written += len(chunk)
    except IntegrityError as exc:
        raise IntegrityError(
            f"payload {checksum} changed while it was being written out ({written} bytes "
            f"written; do not trust them): {exc}"
        ) from exc
    return written


async def _cat(store: Store, target: str) -> None:
    checksum = await _payload_checksum(store, target)
    sys.stdout.flush()
    out = sys.stdout.buffer
    await _copy_payload(store, checksum, out)
    out.flush()


@app.command()
def cat(
    target: Annotated[
        str,
        typer.Argument(
            help="Response id (or a unique prefix, or its last 8+ characters, as `show` "
            "prints it), or a payload's full checksum (sha256 hex)."
        ),
    ],
    root: RootOption = None,
    store_url: StoreOption = None,
    payloads_url: PayloadsOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Write a payload's exact bytes to stdout, verified against its sha256 first."""
    with _errors(verbose):
        _with_store(Where(root, store_url, payloads_url), "read", lambda store: _cat(store, target))


@app.command()
def stats(
    root: RootOption = None,
    store_url: StoreOption = None,
    payloads_url: PayloadsOption = None,
    as_json: JsonOption = False,
    verbose: VerboseOption = False,
) -> None:
    """Counts and bytes per source, cache hit rate, error rate, payload tiers, database size.

    hit rate = requests served from the store / (those + requests fetched upstream);
    error rate = error responses (every failed attempt is one) / all responses.
    """

    async def collect(store: Store) -> tuple[Any, list[Any]]:
        return await store.stats(), await store.validation_totals()

    with _errors(verbose):
        st, checked = _with_store(Where(root, store_url, payloads_url), "read", collect)
    if as_json:
        _print_json({**st.to_json(), "validations": [
            {"model": v.model, "responses": v.responses, "ok": v.ok, "failed": v.failed}
            for v in checked
        ]})  # fmt: skip
        return
    table = Table(title=f"store {st.root}")
    columns = ("source", "sessions", "requests", "cache hits", "fetched", "hit rate",
               "responses", "error responses", "error rate", "bytes")  # fmt: skip
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
            str(s.error_responses),
            _rate(s.error_rate),
            _size(s.bytes),
        )
    console.print(table)
    console.print(
        f"payloads: {st.inline_payloads} inline ({_size(st.inline_bytes)}), "
        f"{st.file_payloads} files ({_size(st.file_bytes)}); database: {_size(st.db_bytes)}",
        soft_wrap=True,
    )
    for v in checked:
        console.print(
            f"validated {escape(v.model)}: {v.responses} responses, {v.ok} records ok, "
            f"{v.failed} failed",
            soft_wrap=True,
        )
