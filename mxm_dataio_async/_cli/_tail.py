"""The ``tail`` command: the responses recorded since a consumer's checkpoint, as JSON lines."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Annotated, Any

import anyio
import typer

from mxm_dataio_async._cli._common import (
    PayloadsOption,
    RootOption,
    StoreOption,
    VerboseOption,
    Where,
    _errors,
    _open_store,
    _run,
    app,
)
from mxm_dataio_async._cli._jobs import _on_signals

if TYPE_CHECKING:
    from mxm_dataio_async._models import Response
    from mxm_dataio_async._store import Store


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


#: ``tail`` looks up the requests of this many responses at a time (one read, not one each).
_TAIL_BATCH = 500


class _Checkpoint:
    """Where ``tail --checkpoint NAME`` keeps its position, per set of filters.

    A position is one response id in recording order, so it only means "everything before this
    was shown" for the filters it was advanced with: under other filters, rows before it that
    those filters let through (and the first filters did not) would be skipped silently. The
    store's checkpoints hold only a response id (PostgreSQL checks that it names a response), so
    the filters go into the checkpoint's *name*:

    - the position is stored as ``NAME`` without filters, else as ``NAME {"kind":...,
      "source":...,"status":...}`` (the filters given, as sorted compact JSON);
    - ``NAME #`` marks that NAME has a position under some filters (written once, with the same
      response id).

    A run whose own position is missing while NAME has one under other filters (the mark, or a
    plain ``NAME`` from a tail without filters or from an older version) is refused.
    """

    def __init__(self, name: str, filters: dict[str, str | None]) -> None:
        given = {k: v for k, v in sorted(filters.items()) if v is not None}
        self.name = name
        self.filters = given
        self.key = f"{name} {json.dumps(given, separators=(',', ':'))}" if given else name
        self.mark = f"{name} #"
        self._marked = False

    def _shown(self) -> str:
        flags = " ".join(f"--{k} {v}" for k, v in self.filters.items())
        return flags or "no filters"

    async def read(self, store: Store) -> str | None:
        cursor = await store.read_checkpoint(self.key)
        if cursor is not None:
            return cursor
        elsewhere = await store.read_checkpoint(self.mark)
        if elsewhere is None and self.filters:
            elsewhere = await store.read_checkpoint(self.name)  # a tail without filters
        if elsewhere is not None:
            raise ValueError(
                f"checkpoint {self.name!r} was used with other filters than {self._shown()} (its "
                "position is in recording order, so these filters would skip rows): run tail "
                "with the filters it was used with, or give these filters their own "
                "--checkpoint name (a new name starts from the first response)"
            )
        return None

    async def write(self, store: Store, cursor: str) -> None:
        # The position first: a run stopped between the two writes resumes from it.
        await store.write_checkpoint(self.key, cursor)
        if not self._marked:
            await store.write_checkpoint(self.mark, cursor)
            self._marked = True


async def _tail_batch(store: Store, checkpoint: _Checkpoint, batch: list[Response]) -> None:
    """Print a batch of responses (with their requests) in order, checkpointing after each."""
    wanted = {resp.request_id for resp in batch}
    requests = {q["id"]: q async for q in store.iter_rows("requests", ids=wanted)}
    for resp in batch:
        typer.echo(_tail_line(resp, requests.get(resp.request_id)))
        # After the line is out, and shielded: Ctrl-C never leaves a printed line behind the
        # checkpoint (it would be printed again).
        with anyio.CancelScope(shield=True):
            await checkpoint.write(store, resp.id)


async def _tail(
    where: Where,
    name: str,
    *,
    source: str | None,
    kind: str | None,
    status: str | None,
    follow: bool,
    interval: float,
    stop_after: float | None,
) -> int:
    printed = 0
    deadline = None if stop_after is None else time.monotonic() + stop_after
    checkpoint = _Checkpoint(name, {"source": source, "kind": kind, "status": status})
    # Writable (it writes checkpoints) but never created: a missing store is an error.
    async with _open_store(where, "write") as store:
        cursor = await checkpoint.read(store)
        while True:
            batch: list[Response] = []
            async for resp in store.iter_responses(
                source=source, kind=kind, status=status, after=cursor, page_size=_TAIL_BATCH
            ):
                batch.append(resp)
                if len(batch) == _TAIL_BATCH:
                    await _tail_batch(store, checkpoint, batch)
                    cursor, printed, batch = resp.id, printed + len(batch), []
            if batch:
                await _tail_batch(store, checkpoint, batch)
                cursor, printed = batch[-1].id, printed + len(batch)
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
            "--checkpoint",
            help="Consumer name: resume after the last response it was shown (with the same "
            "filters: a name used with other filters is refused).",
        ),
    ],
    root: RootOption = None,
    store_url: StoreOption = None,
    payloads_url: PayloadsOption = None,
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
    error. Cache hits add no response, so they are not shown.

    A checkpoint keeps its filters (--source, --kind, --status): its position is only valid for
    them, so the same name with other filters is refused. Use one name per consumer and set of
    filters. When the reader goes away (`tail | head -1`) it stops quietly with exit status 141,
    as other tools do; the checkpoint stays after the last line written into the pipe.
    """
    where = Where(root, store_url, payloads_url)
    with _errors(verbose):
        if status is not None:
            from mxm_dataio_async._models import ResponseStatus

            allowed = ", ".join(s.value for s in ResponseStatus)
            if status not in {s.value for s in ResponseStatus}:
                raise ValueError(f"unknown status {status!r}; use one of: {allowed}")
        try:
            _run(
                lambda: _on_signals(
                    lambda _: _tail(
                        where,
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
