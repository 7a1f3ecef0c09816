"""A handler-driven adapter for tests and benchmarks (httpx's ``MockTransport`` is the model)."""

from __future__ import annotations

import inspect
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import TypeAlias

from mxm_dataio_async._exceptions import CapabilityError
from mxm_dataio_async._models import AdapterResult, Request, Response

__all__ = ["MockAdapter", "echo_handler"]

Result: TypeAlias = AdapterResult | bytes
FetchHandler: TypeAlias = Callable[[Request], Result | Awaitable[Result]]
SendHandler: TypeAlias = Callable[[Request, bytes], Result | Awaitable[Result]]
RevalidateHandler: TypeAlias = Callable[[Request, Response], Result | Awaitable[Result]]
StreamHandler: TypeAlias = Callable[
    [Request], Iterable[Result] | AsyncIterator[Result] | Awaitable[Iterable[Result]]
]


def echo_handler(request: Request) -> bytes:
    """The default fetch handler: a JSON echo of the request's identity fields."""
    return json.dumps(
        {
            "kind": request.kind,
            "method": request.method,
            "endpoint": request.endpoint,
            "params": request.params,
            "body": request.body,
        },
        sort_keys=True,
    ).encode()


async def _resolve(value: Result | Awaitable[Result]) -> Result:
    if inspect.isawaitable(value):
        return await value
    return value


def _as_result(value: Result) -> AdapterResult:
    return value if isinstance(value, AdapterResult) else AdapterResult(data=value)


class MockAdapter:
    """An adapter whose behaviour is a function you pass.

    ```python
    adapter = MockAdapter(lambda req: b'{"price": 1}')
    ```
    Handlers may be sync or async, return ``bytes`` or an ``AdapterResult``, and raise (e.g.
    ``TransientError`` to exercise retries). ``calls`` counts adapter invocations of each kind.
    A capability without a handler raises ``CapabilityError``, as a real adapter lacking it would.
    """

    def __init__(
        self,
        handler: FetchHandler | None = echo_handler,
        *,
        send_handler: SendHandler | None = None,
        stream_handler: StreamHandler | None = None,
        revalidate_handler: RevalidateHandler | None = None,
    ) -> None:
        self.handler = handler
        self.send_handler = send_handler
        self.stream_handler = stream_handler
        self.revalidate_handler = revalidate_handler
        self.calls: dict[str, int] = {"fetch": 0, "send": 0, "stream": 0, "revalidate": 0}
        self.closed = False

    async def fetch(self, request: Request) -> AdapterResult | bytes:
        if self.handler is None:
            raise CapabilityError("this MockAdapter has no fetch handler")
        self.calls["fetch"] += 1
        return await _resolve(self.handler(request))

    async def revalidate(self, request: Request, cached: Response) -> AdapterResult | bytes:
        if self.revalidate_handler is None:
            return await self.fetch(request)
        self.calls["revalidate"] += 1
        return await _resolve(self.revalidate_handler(request, cached))

    async def send(self, request: Request, payload: bytes) -> AdapterResult | bytes:
        if self.send_handler is None:
            raise CapabilityError("this MockAdapter has no send handler")
        self.calls["send"] += 1
        return await _resolve(self.send_handler(request, payload))

    async def stream(self, request: Request) -> AsyncIterator[AdapterResult]:
        if self.stream_handler is None:
            raise CapabilityError("this MockAdapter has no stream handler")
        self.calls["stream"] += 1
        produced = self.stream_handler(request)
        if inspect.isawaitable(produced):
            produced = await produced
        if isinstance(produced, AsyncIterator):
            async for item in produced:
                yield _as_result(item)
        else:
            for item in produced:
                yield _as_result(item)

    async def aclose(self) -> None:
        self.closed = True
