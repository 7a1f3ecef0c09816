"""FileAdapter: local files under one root, as a source.

Confinement is checked on the fully resolved path (symlinks followed), so neither ``..``, an
absolute path elsewhere, nor a symlink pointing outside the root reaches a file outside it; the
final open refuses a symlink (``O_NOFOLLOW``) so the checked path is the opened one. A concurrent
process able to swap *directories* under the root between check and open is out of scope.
"""

from __future__ import annotations

import mimetypes
import os
import stat
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import aiofiles
import anyio
import anyio.to_thread
from aiofiles.threadpool.binary import AsyncBufferedReader

from mxm_dataio_async._exceptions import FetchError
from mxm_dataio_async._models import AdapterResult, Request

__all__ = ["DEFAULT_FILE_STREAM_THRESHOLD", "FileAdapter"]

DEFAULT_FILE_STREAM_THRESHOLD: Final = 1 << 20  # 1 MiB
_DEFAULT_CHUNK_SIZE: Final = 1 << 18  # 256 KiB
_NOFOLLOW: Final = getattr(os, "O_NOFOLLOW", 0)


def _open_nofollow(path: str, flags: int) -> int:
    return os.open(path, flags | _NOFOLLOW)


@dataclass(frozen=True, slots=True)
class _Located:
    path: Path
    relative: str
    size: int
    mtime: float
    data: bytes | None  # read already when small: one thread hop for resolve + stat + read


class _FileChunks:
    """A large file as an async iterator of chunks (aiofiles); owns the open file.

    ``aclose()`` (or the end of the file, or an error) closes it, even if iteration never began.
    """

    __slots__ = ("_chunk_size", "_file", "_relative")

    def __init__(self, file: AsyncBufferedReader, relative: str, chunk_size: int) -> None:
        self._file: AsyncBufferedReader | None = file
        self._relative = relative
        self._chunk_size = chunk_size

    def __aiter__(self) -> _FileChunks:
        return self

    async def __anext__(self) -> bytes:
        file = self._file
        if file is None:
            raise StopAsyncIteration
        try:
            chunk = await file.read(self._chunk_size)
        except BaseException as exc:
            await self.aclose()
            if isinstance(exc, OSError):
                raise FetchError(f"cannot read {self._relative!r}: {exc.strerror}") from exc
            raise
        if not chunk:
            await self.aclose()
            raise StopAsyncIteration
        return chunk

    async def aclose(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            with anyio.CancelScope(shield=True):  # a cancelled close would leak the descriptor
                await file.close()

    @property
    def closed(self) -> bool:
        return self._file is None


class FileAdapter:
    """Fetcher over the files under ``root``: ``request.endpoint`` names one, relative to it.

    ``..`` segments, absolute paths and symlinks are allowed only when they resolve inside
    ``root``; anything else, a missing file, a directory or a special file raises ``FetchError``.
    Files up to ``stream_threshold`` bytes are returned as ``bytes``; larger ones as an async
    iterator of ``chunk_size`` chunks read with aiofiles (never whole in memory). The result has
    ``transport_status=None``, ``content_type`` guessed from the name, and
    ``adapter_meta={"path": <posix path relative to root>, "mtime": <ISO-8601 UTC>, "size": n}``.

    >>> adapter = FileAdapter("./inbox")
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        stream_threshold: int = DEFAULT_FILE_STREAM_THRESHOLD,
        chunk_size: int = _DEFAULT_CHUNK_SIZE,
    ) -> None:
        resolved = Path(root).resolve()
        if not resolved.is_dir():
            raise ValueError(f"FileAdapter root {str(root)!r} is not a directory")
        if stream_threshold < 0 or chunk_size < 1:
            raise ValueError("stream_threshold must be >= 0 and chunk_size >= 1")
        self.root = resolved
        self.stream_threshold = stream_threshold
        self.chunk_size = chunk_size

    def __repr__(self) -> str:
        return f"FileAdapter(root={str(self.root)!r})"

    def _locate(self, endpoint: str | None) -> _Located:
        """Resolve, confine, stat and (when small) read: blocking, run in a worker thread."""
        if not endpoint:
            raise FetchError("FileAdapter needs request.endpoint: a path relative to the root")
        candidate = Path(endpoint)
        if not candidate.is_absolute():
            candidate = self.root / candidate
        try:
            resolved = candidate.resolve(strict=True)
        except FileNotFoundError as exc:
            raise FetchError(f"no such file {endpoint!r} under {str(self.root)!r}") from exc
        except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop
            raise FetchError(f"cannot resolve {endpoint!r}: {exc}") from exc
        try:
            relative = resolved.relative_to(self.root).as_posix()
        except ValueError:
            raise FetchError(
                f"refused {endpoint!r}: it resolves outside the adapter root {str(self.root)!r}"
            ) from None
        try:
            st = resolved.stat()
        except OSError as exc:
            raise FetchError(f"cannot stat {relative!r}: {exc.strerror}") from exc
        if stat.S_ISDIR(st.st_mode):
            raise FetchError(f"{relative!r} is a directory, not a file")
        if not stat.S_ISREG(st.st_mode):
            # FIFOs and devices would block or never end.
            raise FetchError(f"{relative!r} is not a regular file")
        data = None
        if st.st_size <= self.stream_threshold:
            try:
                with open(resolved, "rb", opener=_open_nofollow) as f:
                    data = f.read()
            except OSError as exc:
                raise FetchError(f"cannot read {relative!r}: {exc.strerror}") from exc
        return _Located(resolved, relative, st.st_size, st.st_mtime, data)

    async def fetch(self, request: Request) -> AdapterResult:
        """Read the file ``request.endpoint`` names (see the class docstring for the rules)."""
        located = await anyio.to_thread.run_sync(self._locate, request.endpoint)
        data: bytes | _FileChunks
        if located.data is not None:
            data = located.data
        else:
            try:
                # Shielded: a cancellation landing mid-open would leave an unowned open file.
                with anyio.CancelScope(shield=True):
                    file = await aiofiles.open(located.path, "rb", opener=_open_nofollow)
            except OSError as exc:
                raise FetchError(f"cannot open {located.relative!r}: {exc.strerror}") from exc
            data = _FileChunks(file, located.relative, self.chunk_size)
        meta: dict[str, Any] = {
            "path": located.relative,
            "mtime": datetime.fromtimestamp(located.mtime, UTC).isoformat(),
            "size": located.size,
        }
        return AdapterResult(
            data=data,
            content_type=mimetypes.guess_type(located.path.name)[0],
            transport_status=None,
            adapter_meta=meta,
        )
