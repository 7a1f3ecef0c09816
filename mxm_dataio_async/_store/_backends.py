"""Which backend a store or payloads URL names: a folder is SQLite / local files,
``postgresql://`` is PostgreSQL and ``s3://`` is S3 (each of those in its extra, imported only
when named)."""

from __future__ import annotations

import os
from pathlib import Path

from mxm_dataio_async._clock import Clock
from mxm_dataio_async._store._local import LocalPayloads
from mxm_dataio_async._store._protocols import MetadataStore, PayloadStore
from mxm_dataio_async._store._sqlite import SqliteMetadata

__all__ = ["metadata_for", "payloads_for"]


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
