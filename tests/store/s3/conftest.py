"""Fixtures of the S3 payload-store tests, against the real S3 server (SeaweedFS in CI).

- ``bucket_url``: ``s3://bucket/<fresh prefix>`` for this test (endpoint and credentials in the
  AWS_* variables); ``payloads``: an open ``S3Payloads`` on it, closed at teardown.
- ``raw``: the objects under that prefix through obstore directly, for what the protocol cannot
  do (corrupt an object, leave a stray or a dead writer's temporary).
- ``hidden_uploads(keys)``: the multipart uploads SeaweedFS still holds for those keys (S3 keeps
  them out of listings; ``weed shell`` sees them); ``hidden_uploads.purge(keys)`` removes them.
- ``TcpProxy``: a TCP forwarder to the S3 server that a test can shut, to make S3 go away.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.conftest import service_url

pytest.importorskip("obstore", reason="the s3 extra (obstore) is not installed")

import obstore as obs
from obstore.store import S3Store

from mxm_dataio_async._store._s3 import S3Payloads


def split_url(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.netloc, parts.path.strip("/")


@pytest.fixture
def bucket_url(s3_url: str) -> Iterator[str]:
    """A fresh prefix under the test server's URL: every test starts with an empty store, and
    what it wrote there is deleted afterwards (a 256 MiB test would otherwise pile up)."""
    url = f"{s3_url.rstrip('/')}/s3-tests/{uuid.uuid4().hex}"
    yield url
    bucket, prefix = split_url(url)
    raw = S3Store(bucket, prefix=prefix)
    found = [m["path"] for page in obs.list(raw, None) for m in page]
    for i in range(0, len(found), 1000):
        obs.delete(raw, found[i : i + 1000])


@pytest.fixture
async def payloads(bucket_url: str) -> AsyncIterator[S3Payloads]:
    store = S3Payloads(bucket_url)
    await store.open()
    try:
        yield store
    finally:
        await store.aclose()


@pytest.fixture
def raw(bucket_url: str) -> S3Store:
    bucket, prefix = split_url(bucket_url)
    return S3Store(bucket, prefix=prefix)


def _weed() -> str | None:
    return shutil.which("weed") or next(
        (str(p) for p in [Path(sys.executable).with_name("weed")] if p.exists()), None
    )


class HiddenUploads:
    """The multipart uploads SeaweedFS still holds for some keys: S3 keeps them out of listings,
    ``weed shell`` sees them (a folder ``<sha1 of the key>_<id>`` under
    ``/buckets/<bucket>/.uploads``). Keys are relative to the test's prefix."""

    def __init__(self, weed: str, master: str, bucket: str, prefix: str) -> None:
        self.weed, self.master, self.bucket, self.prefix = weed, master, bucket, prefix

    def _shell(self, command: str) -> str:
        done = subprocess.run(
            [self.weed, "shell", f"-master={self.master}"],
            input=f"{command}\n",
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    def _folders(self, keys: Iterable[str]) -> dict[str, str]:
        wanted = {hashlib.sha1(f"{self.prefix}/{k}".encode()).hexdigest(): k for k in keys}
        names = self._shell(f"fs.ls /buckets/{self.bucket}/.uploads").split()
        return {n: wanted[n.split("_", 1)[0]] for n in names if n.split("_", 1)[0] in wanted}

    def __call__(self, keys: Iterable[str]) -> list[str]:
        """Which of ``keys`` have an upload the server still holds."""
        return sorted(self._folders(keys).values())

    def purge(self, keys: Iterable[str]) -> None:
        """Remove those uploads (what a lifecycle rule would do)."""
        for folder in self._folders(keys):
            self._shell(f"fs.rm -r /buckets/{self.bucket}/.uploads/{folder}")


@pytest.fixture
def hidden_uploads(bucket_url: str) -> HiddenUploads:
    master = os.environ.get("MXM_DATAIO_TEST_S3_MASTER")
    weed = _weed()
    if not master or weed is None:
        pytest.skip("needs SeaweedFS's master address (MXM_DATAIO_TEST_S3_MASTER) and weed")
    return HiddenUploads(weed, master, *split_url(bucket_url))


class RecordingS3Payloads(S3Payloads):
    """Remembers the temporary keys its streamed uploads used (to look for hidden uploads)."""

    def __init__(self, url: str, **kw: object) -> None:
        super().__init__(url, **kw)  # type: ignore[arg-type]
        self.temps: list[str] = []

    def _temp_key(self) -> str:
        key = super()._temp_key()
        self.temps.append(key)
        return key


class TcpProxy:
    """Forwards 127.0.0.1:<port> to the S3 server; ``close()`` makes S3 unreachable (the
    listener and every open connection go away)."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    @classmethod
    async def start(cls, endpoint: str) -> TcpProxy:
        parts = urlsplit(endpoint)
        assert parts.hostname and parts.port, endpoint
        proxy = cls(parts.hostname, parts.port)
        proxy.server = await asyncio.start_server(proxy._serve, "127.0.0.1", 0)
        return proxy

    @property
    def url(self) -> str:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self.writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(256 * 1024):
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(OSError):
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self.writers -= {writer, up_writer}

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for w in list(self.writers):
            w.transport.abort()
        self.writers.clear()
        if self.server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 5)


@pytest.fixture
async def proxy() -> AsyncIterator[TcpProxy]:
    endpoint = service_url("AWS_ENDPOINT_URL", "the S3 endpoint")
    p = await TcpProxy.start(endpoint)
    try:
        yield p
    finally:
        await p.close()
