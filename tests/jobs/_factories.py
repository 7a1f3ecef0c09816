"""Adapter factories named by dotted path in the job files of these tests."""

from __future__ import annotations

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
