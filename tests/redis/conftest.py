from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import anyio
import pytest

from mxm_dataio_async.redis import RedisCoordination


@pytest.fixture
def prefix() -> str:
    """A key prefix of this test's own: nothing it writes is seen by another test."""
    return f"t{uuid.uuid4().hex[:12]}"


async def drop_keys(url: str, prefix: str) -> None:
    """Delete what a test left under ``mxm:<prefix>:`` (it would expire anyway)."""
    async with RedisCoordination(url, prefix=prefix) as c:
        keys = [key async for key in c.client.scan_iter(match=c.key("*"))]
        if keys:
            await c.client.delete(*keys)


@pytest.fixture
async def coordination(redis_url: str, prefix: str) -> AsyncIterator[RedisCoordination]:
    async with RedisCoordination(redis_url, prefix=prefix) as c:
        yield c
    await drop_keys(redis_url, prefix)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class PrivateRedis:
    """A redis-server of one test's own, on a port chosen before it starts (so a client can be
    pointed at it while it is down), started and stopped by the test."""

    def __init__(self, directory: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            message = "redis-server is not installed (apt-get install redis-server)"
            if os.environ.get("MXM_DATAIO_REQUIRE_SERVICES"):
                pytest.fail(message)
            pytest.skip(message)
        self._binary = binary
        self._dir = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert self._proc is None
        self._proc = subprocess.Popen(
            [
                self._binary,
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self._dir),
                "--logfile",
                str(self._dir / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not ping(self.port):
            if time.monotonic() > deadline or self._proc.poll() is not None:
                raise RuntimeError(f"redis-server did not start: {self._dir / 'redis.log'}")
            time.sleep(0.01)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.kill()  # gone at once, as a crash would be
            proc.wait(timeout=10)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    try:
        yield server
    finally:
        server.stop()


async def eventually(check: Callable[[], Awaitable[bool]], *, within: float = 5.0) -> None:
    """Wait until ``check()`` (a look at Redis, or at this process's tasks) holds: for I/O to
    land, not for time to pass. Polled: what it waits for happens in another connection."""
    with anyio.fail_after(within):
        while not await check():  # noqa: ASYNC110
            await anyio.sleep(0.002)
