"""Fault-injecting loopback HTTP servers: a real aiohttp server, and a raw asyncio TCP server for
the faults aiohttp will not commit (resets mid-headers, malformed status lines, garbage headers).

Which fault a request meets is a pure function of ``(seed, path, attempt)``, where ``attempt``
counts the requests the server has seen for that path: a test is deterministic whatever order the
client's concurrency delivers requests in. Every URL has one deterministic body
(:func:`body_for`), so a client that reports success can be checked byte for byte.

Servers count the faults they actually injected, per kind (``counts``), for the test to report.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import hashlib
import random
import socket
import struct
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final

from aiohttp import web

__all__ = [
    "AIOHTTP_FAULTS",
    "AiohttpFaultyServer",
    "Fault",
    "FaultPlan",
    "RawFaultyServer",
    "body_for",
]


class Fault(StrEnum):
    OK = "ok"
    HTTP_5XX = "http_5xx"
    RETRY_AFTER_SECONDS = "429_retry_after_seconds"
    RETRY_AFTER_DATE = "429_retry_after_http_date"
    RESET_MID_HEADERS = "reset_mid_headers"
    RESET_MID_BODY = "reset_mid_body"
    STALL = "stall_past_timeout"
    TRUNCATED_BODY = "truncated_body"
    GARBAGE_HEADERS = "garbage_headers"
    MALFORMED_STATUS = "malformed_status_line"
    SLOW_TRICKLE = "slow_trickle"
    ENDLESS_TRICKLE = "endless_trickle"


#: What the aiohttp server can inject (it always sends well-formed heads).
AIOHTTP_FAULTS: Final = frozenset(
    {
        Fault.OK,
        Fault.HTTP_5XX,
        Fault.RETRY_AFTER_SECONDS,
        Fault.RETRY_AFTER_DATE,
        Fault.RESET_MID_BODY,
        Fault.STALL,
        Fault.TRUNCATED_BODY,
        Fault.SLOW_TRICKLE,
        Fault.ENDLESS_TRICKLE,
    }
)

_5XX: Final = (500, 502, 503, 504, 599)
# Malformed status lines: each makes the response unparsable (or never-ending, for the 1xx).
_BAD_STATUS_LINES: Final = (
    b"HTTP/1.1 2OO OK\r\n",
    b"HTPT/1.1 200 OK\r\n",
    b"\x00\x01\x02 garbage\r\n",
    b"HTTP/1.1 99999 Huh\r\n",
    b"ICY 200 OK\r\n",
    b"HTTP/1.1\r\n",
    b"HTTP/9.9 200 OK\r\n",
    b"\r\n",
)
# Header blocks a strict parser must refuse. All ASCII: non-UTF-8 header bytes are the subject of
# a separate test (they currently take the store down; see test_hostile_upstream.py).
_GARBAGE_HEADERS: Final = (
    b"this line has no colon\r\n",
    b"Content-Length: banana\r\n",
    b"Content-Length: 5\r\nContent-Length: 7\r\n",
    b"Bad Name With Spaces: x\r\n",
    b"X-Folded: a\r\n  folded continuation\r\n",
    b"X-Long: " + b"a" * 20_000 + b"\r\n",
    b"X-Nul: a\x00b\r\n",
    b": empty name\r\n",
    b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n",
)


def body_for(path: str) -> bytes:
    """The one true body of ``path``: 1 B to ~3 KiB, some ~20 KiB (past a small threshold)."""
    digest = hashlib.sha256(path.encode()).digest()
    size = 1 + int.from_bytes(digest[:2], "big") % 3000
    if digest[2] < 24:
        size += 20_000
    return (digest * (size // len(digest) + 1))[:size]


@dataclass
class FaultPlan:
    """Which fault meets attempt ``n`` of ``path``: seeded, weighted, reproducible.

    ``timeout`` is the client's per-read timeout: stalls outlast it, trickles stay well below it.
    ``retry_after`` is the Retry-After the 429s announce (seconds; the date form is rounded).
    """

    seed: int
    weights: Mapping[Fault, float]
    timeout: float
    retry_after: int = 1
    trickle_pieces: int = 5
    counts: Counter[str] = field(default_factory=Counter)
    hits: Counter[str] = field(default_factory=Counter)
    log: dict[str, list[Fault]] = field(default_factory=dict)  # path -> faults, in order

    @property
    def trickle_interval(self) -> float:
        return self.timeout / 6

    def choose(self, path: str, attempt: int) -> Fault:
        if path.startswith("/always/"):  # /always/<fault>/...: that fault on every attempt
            return Fault(path.split("/")[2])
        if path.startswith("/first/"):  # /first/<fault>/...: that fault once, then OK
            return Fault(path.split("/")[2]) if attempt == 1 else Fault.OK
        kinds = list(self.weights)
        rng = random.Random(f"{self.seed}|{path}|{attempt}")
        return rng.choices(kinds, weights=[self.weights[k] for k in kinds])[0]

    def next_fault(self, path: str) -> tuple[Fault, random.Random]:
        """Count a hit on ``path`` and pick its fault; the rng picks the fault's details."""
        self.hits[path] += 1
        attempt = self.hits[path]
        fault = self.choose(path, attempt)
        self.counts[fault.value] += 1
        self.log.setdefault(path, []).append(fault)
        return fault, random.Random(f"{self.seed}|{path}|{attempt}|detail")

    def retry_after_date(self) -> str:
        # An HTTP-date has whole seconds: round up so the hint is never in the past.
        return email.utils.formatdate(time.time() + self.retry_after + 1, usegmt=True)


# -- raw asyncio server -----------------------------------------------------------------------


def _rst(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (SO_LINGER 0), not a FIN: what a crashed peer looks like."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _head(status: str, headers: Mapping[str, str | int]) -> bytes:
    lines = [f"HTTP/1.1 {status}", *(f"{k}: {v}" for k, v in headers.items()), "", ""]
    return "\r\n".join(lines).encode("ascii")


async def _wait_for_close(reader: asyncio.StreamReader, cap: float) -> None:
    """Say nothing until the client gives up (EOF) or ``cap`` seconds pass."""
    with contextlib.suppress(asyncio.TimeoutError, ConnectionError):
        await asyncio.wait_for(reader.read(), cap)


class RawFaultyServer:
    """HTTP/1.1 spoken by hand over asyncio streams; one request per connection.

    ``GET /<anything>``: the plan's fault for that path and attempt. ``GET /sse/...``: an event
    stream that never ends (comments, or events for ``/sse/events...``). ``GET /endless/...``: a
    chunked body that never ends.
    """

    def __init__(self, plan: FaultPlan) -> None:
        self.plan = plan
        self.url = ""
        self.open_connections = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> RawFaultyServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.open_connections += 1
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            path = head.split(b" ", 2)[1].decode("latin-1")
            await self._respond(path, reader, writer)
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError, IndexError):
            pass
        except asyncio.CancelledError:
            pass  # the server is shutting down: end quietly (asyncio logs a cancelled handler)
        finally:
            self.open_connections -= 1
            self._tasks.discard(task)
            writer.transport.abort()  # idempotent; nothing lingers after the handler

    async def _respond(
        self, path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        plan = self.plan
        if path.startswith("/sse/"):
            plan.counts[Fault.ENDLESS_TRICKLE.value] += 1
            await self._endless_sse(path, reader, writer)
            return
        if path.startswith("/endless/"):
            plan.hits[path] += 1
            plan.counts[Fault.ENDLESS_TRICKLE.value] += 1
            await self._endless_body(reader, writer)
            return
        fault, rng = plan.next_fault(path)
        body = body_for(path)
        ok: dict[str, str | int] = {
            "Content-Type": "application/octet-stream",
            "Connection": "close",
        }
        if fault is Fault.OK:
            writer.write(_head("200 OK", {**ok, "Content-Length": len(body)}) + body)
        elif fault is Fault.HTTP_5XX:
            code = rng.choice(_5XX)
            text = f"upstream failure {code}".encode()
            writer.write(
                _head(f"{code} Oops", {"Content-Length": len(text), "Connection": "close"}) + text
            )
        elif fault in (Fault.RETRY_AFTER_SECONDS, Fault.RETRY_AFTER_DATE):
            hint = (
                str(plan.retry_after)
                if fault is Fault.RETRY_AFTER_SECONDS
                else plan.retry_after_date()
            )
            head = _head(
                "429 Too Many Requests",
                {"Retry-After": hint, "Content-Length": 4, "Connection": "close"},
            )
            writer.write(head + b"slow")
        elif fault is Fault.RESET_MID_HEADERS:
            full = _head("200 OK", {**ok, "Content-Length": len(body)})
            writer.write(full[: rng.randrange(1, len(full) - 2)])
            await writer.drain()
            _rst(writer)
            return
        elif fault is Fault.RESET_MID_BODY:
            writer.write(_head("200 OK", {**ok, "Content-Length": len(body) + 1}))
            writer.write(body[: rng.randrange(0, len(body) + 1)])
            await writer.drain()
            _rst(writer)
            return
        elif fault is Fault.STALL:
            if rng.random() < 0.5:  # stall before the head, or after a head, mid-body
                writer.write(_head("200 OK", {**ok, "Content-Length": len(body)}))
                writer.write(body[: len(body) // 2])
                await writer.drain()
            await _wait_for_close(reader, cap=30)
            return
        elif fault is Fault.TRUNCATED_BODY:
            declared = len(body) + rng.randrange(1, 5000)
            writer.write(_head("200 OK", {**ok, "Content-Length": declared}) + body)
        elif fault is Fault.GARBAGE_HEADERS:
            garbage = rng.choice(_GARBAGE_HEADERS)
            head = _head("200 OK", {**ok, "Content-Length": len(body)})
            writer.write(head[:-2] + garbage + b"\r\n" + body)
        elif fault is Fault.MALFORMED_STATUS:
            line = rng.choice(_BAD_STATUS_LINES)
            writer.write(line + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            if line.startswith(b"HTTP/1.1 1"):
                await _wait_for_close(reader, cap=30)
        elif fault is Fault.SLOW_TRICKLE:
            writer.write(_head("200 OK", {**ok, "Content-Length": len(body)}))
            await writer.drain()
            step = max(1, -(-len(body) // plan.trickle_pieces))
            for start in range(0, len(body), step):
                await asyncio.sleep(plan.trickle_interval)
                writer.write(body[start : start + step])
                await writer.drain()
        else:
            raise AssertionError(f"the raw server does not inject {fault} on {path}")
        await writer.drain()
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()

    async def _endless_body(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """A chunked body that never ends: one byte per ``trickle_interval``, until the client
        hangs up."""
        headers = {"Content-Type": "application/octet-stream", "Transfer-Encoding": "chunked"}
        writer.write(_head("200 OK", headers))
        while not reader.at_eof():
            writer.write(b"1\r\nx\r\n")
            await writer.drain()
            await asyncio.sleep(self.plan.trickle_interval)

    async def _endless_sse(
        self, path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """``/sse/comments``: keep-alive comments forever; ``/sse/events``: events forever (until
        the client hangs up)."""
        headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        writer.write(_head("200 OK", headers))
        n = 0
        while not reader.at_eof():
            if path.startswith("/sse/events"):
                writer.write(f"id: {n}\ndata: event {n}\n\n".encode())
            else:
                writer.write(b": keep-alive\n\n")
            n += 1
            await writer.drain()
            await asyncio.sleep(self.plan.trickle_interval / 4)


# -- aiohttp server ----------------------------------------------------------------------------


class AiohttpFaultyServer:
    """The faults a well-behaved HTTP stack can still commit, from a real ``aiohttp.web`` app."""

    def __init__(self, plan: FaultPlan) -> None:
        unsupported = set(plan.weights) - AIOHTTP_FAULTS
        if unsupported:
            raise ValueError(f"the aiohttp server cannot inject {sorted(unsupported)}")
        self.plan = plan
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> AiohttpFaultyServer:
        app = web.Application()
        app.router.add_get("/sse/{tail:.*}", self._sse)
        app.router.add_get("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    @staticmethod
    async def _until_gone(request: web.Request, cap: float) -> None:
        """Hold the connection until the client closes it (aiohttp does not cancel handlers)."""
        deadline = time.monotonic() + cap
        while time.monotonic() < deadline:
            transport = request.transport
            if transport is None or transport.is_closing():
                return
            await asyncio.sleep(0.01)

    @staticmethod
    def _reset(request: web.Request) -> None:
        transport = request.transport
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        plan = self.plan
        path = request.path
        fault, rng = plan.next_fault(path)
        body = body_for(path)
        if fault is Fault.OK:
            return web.Response(body=body, content_type="application/octet-stream")
        if fault is Fault.HTTP_5XX:
            return web.Response(status=rng.choice(_5XX), text="upstream failure")
        if fault in (Fault.RETRY_AFTER_SECONDS, Fault.RETRY_AFTER_DATE):
            hint = (
                str(plan.retry_after)
                if fault is Fault.RETRY_AFTER_SECONDS
                else plan.retry_after_date()
            )
            return web.Response(status=429, text="slow down", headers={"Retry-After": hint})
        if fault is Fault.STALL:
            await self._until_gone(request, cap=30)
            return web.Response(body=body)
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        if fault is Fault.SLOW_TRICKLE:
            resp.content_length = len(body)
            await resp.prepare(request)
            step = max(1, -(-len(body) // plan.trickle_pieces))
            for start in range(0, len(body), step):
                await asyncio.sleep(plan.trickle_interval)
                await resp.write(body[start : start + step])
            await resp.write_eof()
            return resp
        if fault in (Fault.RESET_MID_BODY, Fault.TRUNCATED_BODY):
            resp.content_length = len(body) + rng.randrange(1, 5000)
            resp.force_close()
            await resp.prepare(request)
            await resp.write(body[: rng.randrange(0, len(body) + 1)])
            if fault is Fault.RESET_MID_BODY:
                self._reset(request)
            elif request.transport is not None:
                request.transport.close()  # a clean FIN, short of the declared length
            return resp
        raise AssertionError(f"the aiohttp server does not inject {fault}")

    async def _sse(self, request: web.Request) -> web.StreamResponse:
        self.plan.counts[Fault.ENDLESS_TRICKLE.value] += 1
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        n = 0
        with contextlib.suppress(ConnectionError):
            while request.transport is not None and not request.transport.is_closing():
                if request.path.startswith("/sse/events"):
                    await resp.write(f"id: {n}\ndata: event {n}\n\n".encode())
                else:
                    await resp.write(b": keep-alive\n\n")
                n += 1
                await asyncio.sleep(self.plan.trickle_interval / 4)
        return resp
