"""Replay: adapter calls of the sessions on a test's store answered from its recording.

Most replays never reach this module: a fetch whose cache mode serves stored responses is
answered by the pipeline's own cache lookup in the test's store, which holds the recording. What
reaches an adapter there (``bypass``, ``revalidate``, a stale TTL, ``send``, every ``stream``)
comes here instead of the adapter: the test's store stands in for the upstream
(``Store.stand_in``), so the sources its sessions resolve carry a :class:`ReplayingAdapter` in
front of the real one; the registry is not touched. It answers a
request by its identity (``Request.hash``) from the recording, whatever order or concurrency the
requests come in, as often as they are repeated; a request not recorded raises
:class:`NotRecorded` naming it and how to record it (``new_episodes``: it goes to the real
adapter, and is recorded). Sessions on any other store reach their adapters untouched.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable
from typing import Any, Final

from mxm_dataio_async._exceptions import FetchError
from mxm_dataio_async._limits import SourceLimiter
from mxm_dataio_async._models import AdapterResult, Request, Response, ResponseStatus
from mxm_dataio_async._pytest._recording import Interaction, RecordingDir
from mxm_dataio_async._registry import SourceEntry
from mxm_dataio_async._store import Store

__all__ = ["NotRecorded", "Replayer", "ReplayingAdapter", "replaying"]

_OK: Final = ResponseStatus.OK.value
_ERROR: Final = ResponseStatus.ERROR.value
_ACK: Final = ResponseStatus.ACK.value
_MESSAGE: Final = ResponseStatus.STREAM_MESSAGE.value


class NotRecorded(FetchError):
    """A replaying test made a request its recording does not hold (the message says how to
    record it)."""


class Replayer:
    """Answers the requests of the sessions on ``store`` from ``recording``.

    ``passthrough``: a request the recording lacks goes to the real adapter (``new_episodes``)
    instead of failing. ``hint`` ends the message of :class:`NotRecorded`.
    """

    def __init__(
        self, store: Store, recording: RecordingDir, *, passthrough: bool, hint: str
    ) -> None:
        self.store = store
        self.recording = recording
        self.passthrough = passthrough
        self.hint = hint
        self._ours: dict[str, bool] = {}
        self.replayed = 0

    async def owns(self, request: Request) -> bool:
        """Whether ``request`` was built by a session on the test's store."""
        sid = request.session_id
        found = self._ours.get(sid)
        if found is None:
            found = self.store.is_open and await self.store.get_session(sid) is not None
            self._ours[sid] = found
        return found

    def recorded(self, request: Request, statuses: tuple[str, ...]) -> list[Interaction]:
        return [i for i in self.recording.index().get(request.hash, []) if i.status in statuses]

    def missing(self, request: Request, what: str) -> NotRecorded:
        params = f" params={request.params!r}" if request.params else ""
        where = self.recording.path
        state = "" if self.recording.exists() else " (there is no recording yet)"
        return NotRecorded(
            f"{what} not recorded: {request.method} {request.endpoint!r}{params} "
            f"(source {request.source!r}, kind {request.kind!r}, identity "
            f"{request.hash[:16]}) is not in the recording {where}{state}. {self.hint}",
            request=request,
        )

    async def result(self, interaction: Interaction) -> AdapterResult:
        """The recorded answer as the adapter gave it: the exact bytes, the transport facts."""
        response = await self.store.get_response(interaction.response_id)
        if response is None:  # the index and the imported rows come from the same files
            raise FetchError(f"recorded response {interaction.response_id} is not in the store")
        data = await self.store.read(response) if response.checksum is not None else b""
        self.replayed += 1
        return _as_result(response, data)


def _as_result(response: Response, data: bytes) -> AdapterResult:
    meta: dict[str, Any] = dict(response.adapter_meta or {})
    meta["replayed_from"] = response.id
    return AdapterResult(
        data=data,
        content_type=response.content_type,
        encoding=response.encoding,
        transport_status=response.transport_status,
        url=response.url,
        headers=response.headers,
        adapter_meta=meta,
        error=response.error if response.status is ResponseStatus.ERROR else None,
    )


class ReplayingAdapter:
    """In front of a real adapter while a test replays: the recording answers the test's
    sessions; everything else reaches ``inner``."""

    def __init__(self, inner: Any, replayer: Replayer) -> None:
        self.inner = inner
        self.replayer = replayer

    def __repr__(self) -> str:
        return f"<ReplayingAdapter for {self.inner!r}>"

    async def fetch(self, request: Request) -> object:
        r = self.replayer
        if not await r.owns(request):
            return await self.inner.fetch(request)
        # The newest OK answer; else the final refusal the upstream gave (a 404 replays as one).
        found = r.recorded(request, (_OK,)) or [
            i for i in r.recorded(request, (_ERROR,)) if i.transport_status is not None
        ]
        if found:
            return await r.result(found[-1])
        if r.passthrough:
            return await self.inner.fetch(request)
        raise r.missing(request, "fetch")

    async def revalidate(self, request: Request, cached: Response) -> object:
        """Replayed as a full answer (the recording holds answers, not conditional ones)."""
        r = self.replayer
        if not await r.owns(request):
            return await self.inner.revalidate(request, cached)
        if r.recorded(request, (_OK,)) or not r.passthrough:
            return await self.fetch(request)
        return await self.inner.revalidate(request, cached)

    async def send(self, request: Request, payload: bytes) -> object:
        r = self.replayer
        if not await r.owns(request):
            return await self.inner.send(request, payload)
        found = r.recorded(request, (_ACK, _ERROR))
        if found:
            return await r.result(found[-1])
        if r.passthrough:
            return await self.inner.send(request, payload)
        raise r.missing(request, "send")

    async def stream(self, request: Request) -> AsyncIterator[object]:
        """The messages of the newest recorded stream of this request, in sequence order."""
        r = self.replayer
        mine = await r.owns(request)
        messages = r.recorded(request, (_MESSAGE,)) if mine else []
        if not messages and (not mine or r.passthrough):
            async with contextlib.aclosing(self.inner.stream(request)) as inner:
                async for item in inner:
                    yield item
            return
        if not messages:
            raise r.missing(request, "stream")
        newest = messages[-1].request_id
        ordered = sorted(
            (i for i in messages if i.request_id == newest), key=lambda i: i.sequence or 0
        )
        for interaction in ordered:
            yield await r.result(interaction)

    async def aclose(self) -> None:
        """The registry closes the real adapter; this wrapper holds nothing of its own."""


def replaying(replayer: Replayer, *, offline: bool) -> Callable[[SourceEntry], SourceEntry]:
    """A ``Store.stand_in``: each source a session on the replaying store resolves carries a
    :class:`ReplayingAdapter`; ``offline``: its rate gate is an open one (a replay is no upstream
    call and spends no rate budget). The registry itself is left as it is."""
    open_gate = SourceLimiter(None, None)

    def stand_in(found: SourceEntry) -> SourceEntry:
        if isinstance(found.adapter, ReplayingAdapter):
            return found
        return dataclasses.replace(
            found,
            adapter=ReplayingAdapter(found.adapter, replayer),
            gate=open_gate if offline else found.gate,
        )

    return stand_in
