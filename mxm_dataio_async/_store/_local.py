"""``LocalPayloads``: the embedded :class:`PayloadStore`, content-addressed files on one disk.

A payload lives at ``payloads/ab/cd/<sha256>``. It is written to ``tmp/<pid>-<id>.part``, flushed,
fsynced and renamed into place, so a file under ``payloads/`` is always complete; the rename
happens before the row naming it commits (the Store's rule), so a crash can orphan a file (``gc``
removes it) but never leave a row naming nothing. Temp files carry their writer's pid: at open,
and in ``leftovers()``, those of dead processes are interrupted writes.

Measured here: one file per payload caps a pipeline near 2k requests/s (file creation dominates),
which is why small payloads stay inline in the metadata store and only large ones come here.
Streaming writes go through aiofiles chunk by chunk, so a 1 GiB body never sits in memory.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import hashlib
import os
import re
import time
from collections.abc import AsyncIterable, AsyncIterator, Generator, Iterator
from pathlib import Path
from typing import Final

import aiofiles
import anyio.to_thread

from mxm_dataio_async._exceptions import IntegrityError, StoreError
from mxm_dataio_async._models import new_id
from mxm_dataio_async._store._protocols import StoredObject

__all__ = ["LocalPayloads", "pid_alive", "verify_bytes"]

_CHUNK: Final = 256 * 1024
_PAGE: Final = 500
_HEX64: Final = re.compile(r"[0-9a-f]{64}")


def _os_error(action: str, path: Path, exc: OSError) -> StoreError:
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    if exc.errno == errno.ENOSPC:
        reason = "no space left on device"
    return StoreError(f"cannot {action} {path}: {reason}")


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, OSError):  # not a pid this system can have
        return False
    return True


def _writer_alive(name: str) -> bool:
    """Temp files are named ``<pid>-<id>.part``: is that process still running?"""
    pid = name.split("-", 1)[0]
    return pid.isdigit() and pid_alive(int(pid))


def verify_bytes(data: bytes, digest: bytes, size: int, *, where: str) -> None:
    """Raise IntegrityError unless ``data`` is exactly the payload with this digest and size."""
    if len(data) != size or hashlib.sha256(data).digest() != digest:
        raise IntegrityError(
            f"payload {digest.hex()} is corrupt ({where}): expected {size} bytes with that sha256, "
            f"found {len(data)} bytes that do not match"
        )


class LocalPayloads:
    """Payload files under ``<root>/payloads/`` (temp files under ``<root>/tmp/``)."""

    def __init__(self, root: str | os.PathLike[str], *, create: bool = True) -> None:
        self.root = Path(root)
        self.dir = self.root / "payloads"
        self.tmp = self.root / "tmp"
        self.create = create

    def __repr__(self) -> str:
        return f"<LocalPayloads {str(self.dir)!r}>"

    @property
    def location(self) -> str:
        return str(self.dir)

    def path_for(self, digest: bytes) -> Path:
        hx = digest.hex()
        return self.dir / hx[:2] / hx[2:4] / hx

    # -- lifecycle ------------------------------------------------------------------------------

    async def open(self) -> int:
        if not self.create:
            return 0  # an existing store opened as it is: leftovers are for verify to report
        return await anyio.to_thread.run_sync(self._prepare)

    def _prepare(self) -> int:
        for d in (self.dir, self.tmp):
            try:
                d.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise _os_error("create", d, exc) from exc
        removed = 0
        for entry in self.tmp.iterdir():
            if _writer_alive(entry.name) and not entry.name.startswith(f"{os.getpid()}-"):
                continue  # another live process is writing it
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
                removed += 1
        return removed

    async def aclose(self) -> None:
        return None

    # -- writing --------------------------------------------------------------------------------

    def _temp_path(self) -> Path:
        return self.tmp / f"{os.getpid()}-{new_id()}.part"

    async def put(self, digest: bytes, data: bytes) -> None:
        await anyio.to_thread.run_sync(self._write_whole, digest, data)

    def _write_whole(self, digest: bytes, raw: bytes) -> None:
        final = self.path_for(digest)
        if final.exists():
            # Content-addressed: the same bytes are already there. Touch it, so gc's grace period
            # (by mtime) protects it until this fetch's row commits, even if it was an orphan.
            try:
                os.utime(final)
                return
            except FileNotFoundError:
                pass  # gc removed it just now: write it again below
        temp = self._temp_path()
        try:
            with open(temp, "wb") as f:
                f.write(raw)
                f.flush()
                os.fsync(f.fileno())
            self._publish(temp, final)
        except OSError as exc:
            with contextlib.suppress(OSError):
                temp.unlink()
            raise _os_error("write payload", final, exc) from exc

    def _publish(self, temp: Path, final: Path) -> None:
        final.parent.mkdir(parents=True, exist_ok=True)
        # os.replace is atomic; two processes racing on the same content both write identical bytes.
        os.replace(temp, final)

    async def put_stream(self, chunks: AsyncIterable[bytes]) -> tuple[bytes, int]:
        hasher = hashlib.sha256()
        size = 0
        temp: Path | None = self._temp_path()
        assert temp is not None
        try:
            try:
                f = await aiofiles.open(temp, "wb")
            except OSError as exc:
                raise _os_error("write payload", temp, exc) from exc
            try:
                # Only the file's own errors are ours to translate: an error of the source (a
                # connection reset mid-body) propagates as it is.
                async for chunk in chunks:
                    if not chunk:
                        continue
                    hasher.update(chunk)
                    size += len(chunk)
                    try:
                        await f.write(chunk)
                    except OSError as exc:
                        raise _os_error("write payload", temp, exc) from exc
                try:
                    await f.flush()
                    await anyio.to_thread.run_sync(os.fsync, f.fileno())
                except OSError as exc:
                    raise _os_error("write payload", temp, exc) from exc
            finally:
                with anyio.CancelScope(shield=True), contextlib.suppress(OSError):
                    await f.close()
            digest = hasher.digest()
            try:
                await anyio.to_thread.run_sync(self._publish, temp, self.path_for(digest))
            except OSError as exc:
                raise _os_error("write payload", temp, exc) from exc
            temp = None
            return digest, size
        finally:
            if temp is not None:
                with contextlib.suppress(OSError):
                    temp.unlink()

    # -- reading --------------------------------------------------------------------------------

    async def get(self, digest: bytes, size: int) -> bytes:
        return await anyio.to_thread.run_sync(self._read_verified, digest, size)

    def _read_verified(self, digest: bytes, size: int) -> bytes:
        path = self.path_for(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise IntegrityError(
                f"payload {digest.hex()} is missing from the file tier ({path})"
            ) from None
        except OSError as exc:
            raise _os_error("read payload", path, exc) from exc
        verify_bytes(data, digest, size, where=str(path))
        return data

    async def iter(
        self, digest: bytes, size: int, chunk_size: int = _CHUNK
    ) -> AsyncIterator[bytes]:
        path = self.path_for(digest)
        hasher = hashlib.sha256()
        seen = 0
        try:
            async with aiofiles.open(path, "rb") as f:
                while True:
                    chunk = await f.read(chunk_size)
                    if not chunk:
                        break
                    hasher.update(chunk)
                    seen += len(chunk)
                    yield chunk
        except FileNotFoundError:
            raise IntegrityError(
                f"payload {digest.hex()} is missing from the file tier ({path})"
            ) from None
        except OSError as exc:
            raise _os_error("read payload", path, exc) from exc
        if seen != size or hasher.digest() != digest:
            raise IntegrityError(f"payload {digest.hex()} is corrupt on disk ({path})")

    async def stat(self, digest: bytes) -> StoredObject | None:
        path = self.path_for(digest)
        return await anyio.to_thread.run_sync(lambda: _stat(path, time.time(), digest))

    async def list(self) -> AsyncIterator[StoredObject]:
        walk = self._walk()
        try:
            while True:
                page = await anyio.to_thread.run_sync(lambda: _take(walk, _PAGE))
                for obj in page:
                    yield obj
                if len(page) < _PAGE:
                    return
        finally:
            walk.close()

    def _walk(self) -> Generator[StoredObject]:
        """Every file under ``payloads/``, directory by directory (never the whole list)."""
        now = time.time()
        for dirpath, _dirs, names in os.walk(self.dir):
            for name in sorted(names):
                path = Path(dirpath) / name
                digest = bytes.fromhex(name) if _HEX64.fullmatch(name) else None
                if digest is not None and self.path_for(digest) != path:
                    digest = None  # a content address in the wrong folder is a stray
                obj = _stat(path, now, digest)
                if obj is not None:
                    yield obj

    async def leftovers(self, grace: float) -> AsyncIterator[StoredObject]:
        found = await anyio.to_thread.run_sync(self._leftovers, grace)
        for obj in found:
            yield obj

    def _leftovers(self, grace: float) -> builtins.list[StoredObject]:
        if not self.tmp.is_dir():
            return []
        now = time.time()
        found = []
        for entry in sorted(self.tmp.iterdir()):
            if _writer_alive(entry.name):
                continue  # a write in progress (in this process or another)
            obj = _stat(entry, now, None)
            if obj is not None and obj.age >= grace:
                found.append(obj)
        return found

    async def delete(self, target: bytes | StoredObject) -> bool:
        if isinstance(target, bytes):
            path = self.path_for(target)
        else:
            path = Path(target.location)
            if not (path.is_relative_to(self.dir) or path.is_relative_to(self.tmp)):
                raise ValueError(f"{path} is not in this payload store ({self.root})")
        return await anyio.to_thread.run_sync(_unlink, path)


def _stat(path: Path, now: float, digest: bytes | None) -> StoredObject | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _os_error("inspect", path, exc) from exc
    return StoredObject(str(path), st.st_size, now - st.st_mtime, digest)


def _take(it: Iterator[StoredObject], n: int) -> list[StoredObject]:
    out: list[StoredObject] = []
    for obj in it:
        out.append(obj)
        if len(out) >= n:
            break
    return out


def _unlink(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise StoreError(f"cannot remove {path}: {exc.strerror or exc}") from exc
    return True
