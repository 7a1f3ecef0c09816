"""Where a dataset's files live: a local folder or an S3 prefix, behind one small interface.

Parts and manifests are immutable and written under fresh names; the one mutable object is the
``current`` pointer, changed only by compare-and-swap. Locally the swap is an atomic rename done
under an exclusive ``flock`` (the lock makes compare-then-rename one step for every process on the
machine); on S3 it is a conditional put: ``If-None-Match: *`` for the first version, ``If-Match:
<etag>`` afterwards (SeaweedFS and AWS honour both; measured in tests/datasets/test_s3.py).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from mxm_dataio_async._exceptions import StoreError

__all__ = ["Blob", "Entry", "Files", "LocalFiles", "S3Files", "open_files"]


@dataclass(frozen=True, slots=True)
class Blob:
    data: bytes
    tag: str
    """What a swap must name to replace this content (local: its sha256; S3: its ETag)."""


@dataclass(frozen=True, slots=True)
class Entry:
    key: str
    modified: datetime
    size: int


class Files(Protocol):
    """A dataset's folder: keys are ``/``-separated paths below it."""

    def url(self, key: str) -> str: ...

    def read(self, key: str) -> Blob | None: ...

    def create(self, key: str, data: bytes) -> bool:
        """Write ``key`` only if it does not exist; False if it did."""
        ...

    def swap(self, key: str, data: bytes, expected: str | None) -> bool:
        """Replace ``key`` if its tag is ``expected`` (None: only if absent); False otherwise."""
        ...

    def upload(self, path: Path, key: str) -> None: ...

    def download(self, key: str, path: Path) -> None: ...

    def list(self, prefix: str) -> Iterator[Entry]: ...

    def delete(self, key: str) -> None: ...


def _tag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class LocalFiles:
    def __init__(self, root: Path) -> None:
        self.root = root

    def url(self, key: str) -> str:
        return str(self.root / key)

    def read(self, key: str) -> Blob | None:
        try:
            data = (self.root / key).read_bytes()
        except FileNotFoundError:
            return None
        return Blob(data, _tag(data))

    def _write_new(self, target: Path, data: bytes) -> Path:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before any name points at them
        return Path(tmp)

    def create(self, key: str, data: bytes) -> bool:
        target = self.root / key
        tmp = self._write_new(target, data)
        try:
            os.link(tmp, target)  # fails if the name exists: create-only, atomically
        except FileExistsError:
            return False
        finally:
            tmp.unlink()
        return True

    def swap(self, key: str, data: bytes, expected: str | None) -> bool:
        target = self.root / key
        tmp = self._write_new(target, data)
        try:
            with open(self.root / ".lock", "a+b") as lock:
                # Every publisher on this machine compares and renames under this lock, so no
                # other swap can land between the comparison and the rename.
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
                now = self.read(key)
                if (None if now is None else now.tag) != expected:
                    return False
                os.replace(tmp, target)
                _fsync_dir(target.parent)
                return True
        finally:
            tmp.unlink(missing_ok=True)

    def upload(self, path: Path, key: str) -> None:
        target = self.root / key
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".tmp-{target.name}")
        shutil.copyfile(path, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)

    def download(self, key: str, path: Path) -> None:
        shutil.copyfile(self.root / key, path)

    def list(self, prefix: str) -> Iterator[Entry]:
        base = self.root / prefix
        if not base.is_dir():
            return
        for p in sorted(base.rglob("*")):
            if p.is_file():
                st = p.stat()
                yield Entry(
                    p.relative_to(self.root).as_posix(),
                    datetime.fromtimestamp(st.st_mtime, UTC),
                    st.st_size,
                )

    def delete(self, key: str) -> None:
        (self.root / key).unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class S3Files:
    def __init__(self, url: str) -> None:
        from mxm_dataio_async._store._s3 import _client as client

        client.require_obstore()
        config = client.parse(url, None)
        self._obs = client.obs
        self._errors = client
        self._base = f"s3://{config.bucket}/{config.prefix}".rstrip("/")
        self._store = client.S3Store(
            config.bucket,
            prefix=config.prefix or None,
            config=config.s3,  # type: ignore[arg-type]
            client_options=config.client or None,  # type: ignore[arg-type]
            retry_config=config.retry,  # type: ignore[arg-type]
        )

    def url(self, key: str) -> str:
        return f"{self._base}/{key}"

    def read(self, key: str) -> Blob | None:
        try:
            got = self._obs.get(self._store, key)
            data = bytes(got.bytes())
        except FileNotFoundError:
            return None
        except self._errors.BaseError as exc:
            raise StoreError(f"read {self.url(key)}: {exc}") from exc
        return Blob(data, str(got.meta["e_tag"]))

    def create(self, key: str, data: bytes) -> bool:
        try:
            self._obs.put(self._store, key, data, mode="create")
        except self._errors.AlreadyExistsError:
            return False
        return True

    def swap(self, key: str, data: bytes, expected: str | None) -> bool:
        if expected is None:
            return self.create(key, data)
        try:
            self._obs.put(self._store, key, data, mode={"e_tag": expected})
        except (self._errors.PreconditionError, FileNotFoundError):
            return False
        return True

    def upload(self, path: Path, key: str) -> None:
        with open(path, "rb") as f:
            self._obs.put(self._store, key, f)

    def download(self, key: str, path: Path) -> None:
        got = self._obs.get(self._store, key)
        with open(path, "wb") as f:
            for chunk in got:
                f.write(chunk)

    def list(self, prefix: str) -> Iterator[Entry]:
        for batch in self._obs.list(self._store, prefix=prefix):
            for meta in batch:
                yield Entry(str(meta["path"]), meta["last_modified"], int(meta["size"]))

    def delete(self, key: str) -> None:
        self._obs.delete(self._store, key)


def open_files(location: str | os.PathLike[str], name: str) -> Files:
    text = os.fspath(location)
    if text.startswith(("s3://", "s3a://")):
        return S3Files(f"{text.rstrip('/')}/{name}")
    if "://" in text:
        raise ValueError(f"a dataset location is a folder or s3://bucket/prefix, not {text!r}")
    return LocalFiles(Path(text) / name)
