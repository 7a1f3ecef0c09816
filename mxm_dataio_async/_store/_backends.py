"""Which backend a store or payloads URL names: a folder is SQLite / local files,
``postgresql://`` is PostgreSQL and ``s3://`` is S3 (each of those in its extra, imported only
when named)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path

from mxm_dataio_async._clock import Clock
from mxm_dataio_async._exceptions import UsageError
from mxm_dataio_async._store._local import LocalPayloads
from mxm_dataio_async._store._protocols import MetadataStore, PayloadStore, StoredObject
from mxm_dataio_async._store._sqlite import SqliteMetadata

__all__ = ["AbsentPayloads", "metadata_for", "payloads_for"]


def metadata_for(
    target: str | os.PathLike[str],
    *,
    busy_timeout: float,
    create: bool,
    read_only: bool,
    clock: Clock,
) -> tuple[MetadataStore, Path | None]:
    """The metadata backend a store names (with its folder, if it has one): a folder is SQLite,
    ``postgresql://`` is PostgreSQL (the ``postgres`` extra)."""
    text = os.fspath(target)
    scheme = text.split("://", 1)[0].lower() if "://" in text else None
    if scheme is None:
        root = Path(text)
        return SqliteMetadata(
            root, busy_timeout=busy_timeout, create=create, read_only=read_only, clock=clock
        ), root
    if scheme in ("postgresql", "postgres"):
        from mxm_dataio_async._store._postgres import PostgresMetadata  # needs the extra

        return PostgresMetadata(
            text, busy_timeout=busy_timeout, create=create, read_only=read_only, clock=clock
        ), None
    raise ValueError(f"unknown store {scheme}://...: give a folder (SQLite) or a postgresql:// URL")


def payloads_for(target: str | os.PathLike[str], *, create: bool) -> PayloadStore:
    """The payload backend ``payloads=`` names: a folder, or ``s3://bucket/prefix`` (the ``s3``
    extra; endpoint, region and credentials from the AWS_* variables or the URL's options)."""
    text = os.fspath(target)
    if "://" not in text:
        return LocalPayloads(text, create=create)
    if text.lower().startswith("s3://"):
        from mxm_dataio_async._store._s3 import S3Payloads  # needs the extra

        return S3Payloads(text, create=create)
    scheme = text.split("://", 1)[0]
    raise ValueError(f"unknown payloads {scheme}://...: give a folder or an s3://bucket/prefix URL")


class AbsentPayloads:
    """The payload store of a read-only view opened without one (``Store("postgresql://...",
    read_only=True)``): rows, sessions, stats and run status read fine; any payload access says
    to pass ``payloads=``."""

    def __init__(self, metadata_location: str) -> None:
        self._for = metadata_location

    @property
    def location(self) -> str:
        return "(no payload store given)"

    def _refuse(self) -> UsageError:
        return UsageError(
            f"the store at {self._for} was opened without its payloads: pass payloads= "
            "(--payloads: s3://bucket/prefix or a folder) to read payload bytes"
        )

    async def open(self) -> int:
        return 0

    async def aclose(self) -> None:
        return None

    async def put(self, digest: bytes, data: bytes) -> None:
        raise self._refuse()

    async def put_stream(self, chunks: AsyncIterable[bytes]) -> tuple[bytes, int]:
        raise self._refuse()

    async def get(self, digest: bytes, size: int) -> bytes:
        raise self._refuse()

    def iter(self, digest: bytes, size: int, chunk_size: int = 256 * 1024) -> AsyncIterator[bytes]:
        raise self._refuse()

    async def stat(self, digest: bytes) -> StoredObject | None:
        raise self._refuse()

    def list(self) -> AsyncIterator[StoredObject]:
        raise self._refuse()

    def leftovers(self, grace: float) -> AsyncIterator[StoredObject]:
        raise self._refuse()

    async def delete(self, target: bytes | StoredObject) -> bool:
        raise self._refuse()
