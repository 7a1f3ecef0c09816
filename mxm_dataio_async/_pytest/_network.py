"""Blocking the network while a test replays: a connect to anything but an allowed host fails.

The check sits at ``socket.socket.connect`` (and ``connect_ex``), where every TCP client in the
process ends up (aiohttp through asyncio's ``sock_connect``, urllib, redis...); Unix sockets and
socket pairs are never blocked. The error is not an ``OSError``: a blocked connect is not a
network failure to retry, and the message says how to allow or record it. The blocked socket is
closed before the error is raised: callers such as ``socket.create_connection`` close their socket
on ``OSError`` only, and would otherwise leave it to the garbage collector (a ``ResourceWarning``
that surfaces in whichever later test the collection happens to run).
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import socket
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from mxm_dataio_async._exceptions import DataIOError

__all__ = ["NetworkBlocked", "blocking_network", "parse_hosts"]


class NetworkBlocked(DataIOError, RuntimeError):
    """A test tried to reach the network while the mxm-dataio plugin blocks it."""


def parse_hosts(values: Iterable[str]) -> tuple[str, ...]:
    """``["a.b, 127.0.0.1", "::1"]`` -> ``("a.b", "127.0.0.1", "::1")``."""
    return tuple(h.strip() for v in values for h in v.split(",") if h.strip())


@functools.cache
def _addresses(host: str) -> frozenset[str]:
    """The IP addresses a host name (or address) stands for."""
    try:
        return frozenset({str(ipaddress.ip_address(host))})
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return frozenset()
    return frozenset(str(info[4][0]) for info in infos)


def _allowed(host: str, allowed: tuple[str, ...]) -> bool:
    if host in allowed:
        return True
    return any(host in _addresses(entry) for entry in allowed)


@contextlib.contextmanager
def blocking_network(allowed: tuple[str, ...], why: str) -> Iterator[None]:
    """While the block runs, TCP/UDP connects to hosts not in ``allowed`` raise
    :class:`NetworkBlocked` (``why`` says which test and mode, for the message)."""
    connect = socket.socket.connect
    connect_ex = socket.socket.connect_ex

    def check(sock: socket.socket, address: Any) -> None:
        if sock.family not in (socket.AF_INET, socket.AF_INET6) or not isinstance(address, tuple):
            return
        host, port = str(address[0]), address[1]
        if not _allowed(host, allowed):
            sock.close()
            allow = f"--dataio-allowed-hosts={host}"
            raise NetworkBlocked(
                f"network access blocked by the mxm-dataio pytest plugin ({why}): a connect to "
                f"{host}:{port}. Allow the host with {allow} (or "
                f"@pytest.mark.dataio(allowed_hosts=[{host!r}])), or record the test's "
                "interactions with --dataio-record-mode=once"
            )

    def guarded(method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def call(sock: socket.socket, address: Any) -> Any:
            check(sock, address)
            return method(sock, address)

        return call

    setattr(socket.socket, "connect", guarded(connect))  # noqa: B010
    setattr(socket.socket, "connect_ex", guarded(connect_ex))  # noqa: B010
    try:
        yield
    finally:
        setattr(socket.socket, "connect", connect)  # noqa: B010
        setattr(socket.socket, "connect_ex", connect_ex)  # noqa: B010
