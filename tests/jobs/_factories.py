"""Adapter factories named by dotted path in the job files of these tests."""

from __future__ import annotations

import anyio

import mxm_dataio_async as dio

CALLS: list[str] = []


def echo(prefix: str = "echo") -> dio.MockAdapter:
    """A MockAdapter answering ``<prefix> <endpoint> <params>``."""

    def handler(request: dio.Request) -> bytes:
        CALLS.append(request.endpoint or "")
        return f"{prefix} {request.endpoint} {sorted(request.params.items())}".encode()

    return dio.MockAdapter(handler)


async def async_echo(prefix: str) -> dio.MockAdapter:
    return echo(prefix)


class InFlight:
    """Counts calls in flight across every adapter ``tracked()`` made (one event loop)."""

    now = 0
    peak = 0


def tracked(delay: float = 0.01) -> dio.MockAdapter:
    """A MockAdapter whose calls take ``delay`` seconds, counted in ``InFlight``."""

    async def handler(request: dio.Request) -> bytes:
        InFlight.now += 1
        InFlight.peak = max(InFlight.peak, InFlight.now)
        try:
            await anyio.sleep(delay)
        finally:
            InFlight.now -= 1
        return b"ok"

    return dio.MockAdapter(handler)
