"""The ``S3Payloads`` class (the design is in the package docstring, ``_s3/__init__.py``)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Awaitable, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final, TypeVar

import anyio

from mxm_dataio_async._exceptions import IntegrityError, StoreError
from mxm_dataio_async._store._local import pid_alive, verify_bytes
from mxm_dataio_async._store._protocols import StoredObject

if TYPE_CHECKING:
    from obstore import GetOptions, ObjectMeta
    from obstore.store import ClientConfig, RetryConfig, S3Config

from mxm_dataio_async._store._s3 import _client as client
from mxm_dataio_async._store._s3._client import (
    classify,
    failure,
    host,
    parse,
    require_obstore,
    summary,
)

__all__ = ["S3Payloads"]

T = TypeVar("T")

MiB: Final = 1 << 20
_PART: Final = 8 * MiB  # multipart part size; streams up to this size are buffered whole
_PART_CONCURRENCY: Final = 2  # parts in flight per streamed upload (see the docstring)
_FEED_PIECE: Final = 1 * MiB  # source chunks are handed to obstore in pieces of about this size
_READ_WINDOW: Final = 8 * MiB  # iter() reads ranges of this size
_CHUNK: Final = 256 * 1024
_PAGE: Final = 1000  # keys per list request (S3's maximum)
_SETTLE: Final = 60.0  # seconds to wait for obstore to finish an abandoned upload
_OPEN_SWEEP: Final = 10.0  # seconds open() spends at most on removing dead writers' temporaries
_EXIT_GRACE: Final = 0.01  # seconds aclose() yields to obstore's threads (see the docstring)
_TMP: Final = "tmp"

_LIVE_TEMPS: set[tuple[str, str]] = set()


class S3Payloads:
    """Payload objects under ``s3://bucket/prefix`` (``ab/cd/<sha256>``; temporaries in ``tmp/``).

    ``create=False`` opens an existing store as it is (``open()`` removes nothing, only checks
    that the bucket answers). ``options`` override the URL's query options, which override the
    ``AWS_*`` variables. Tunables (instance attributes): ``part_size`` (8 MiB; S3 wants >= 5 MiB),
    ``part_concurrency`` (2), ``read_window`` (8 MiB).
    """

    def __init__(
        self, url: str, *, create: bool = True, options: Mapping[str, str] | None = None
    ) -> None:
        require_obstore()
        self._config = config = parse(url, options)
        self.bucket = config.bucket
        self.prefix = config.prefix
        self.create = create
        self.part_size = _PART
        self.part_concurrency = _PART_CONCURRENCY
        self.read_window = _READ_WINDOW
        s3: S3Config = config.s3  # type: ignore[assignment]  # keys checked by obstore
        client_options: ClientConfig | None = config.client or None  # type: ignore[assignment]
        retry: RetryConfig = config.retry  # type: ignore[assignment]
        try:
            self._store = client.S3Store(
                config.bucket,
                prefix=config.prefix or None,
                config=s3,
                client_options=client_options,
                retry_config=retry,
            )
        except client.UnknownConfigurationKeyError as exc:
            raise ValueError(f"unknown S3 option: {summary(str(exc))}") from None
        except (ValueError, TypeError) as exc:
            message = str(exc)
            for secret in config.secrets:
                message = message.replace(secret, "***")
            raise ValueError(f"invalid S3 settings for {self.location}: {message}") from None

    def __repr__(self) -> str:
        return f"<S3Payloads {self.location!r}>"

    @property
    def location(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    # -- keys --------------------------------------------------------------------------------------

    def key_for(self, digest: bytes) -> str:
        """The object key of a payload, relative to the prefix (``ab/cd/<sha256>``)."""
        hx = digest.hex()
        return f"{hx[:2]}/{hx[2:4]}/{hx}"

    def _full(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _where(self, key: str) -> str:
        return f"{self.bucket}/{self._full(key)}"

    def _key_of(self, location: str) -> str:
        base = f"{self.bucket}/{self.prefix}/" if self.prefix else f"{self.bucket}/"
        if not location.startswith(base) or len(location) == len(base):
            raise ValueError(f"{location} is not in this payload store ({self.location})")
        return location[len(base) :]

    def _temp_key(self) -> str:
        return f"{_TMP}/{host()}/{os.getpid()}-{uuid.uuid4().hex}"

    @staticmethod
    def _digest_of(key: str) -> bytes | None:
        parts = key.split("/")
        if len(parts) != 3 or not client.HEX64.fullmatch(parts[2]):
            return None
        hx = parts[2]
        if parts[0] != hx[:2] or parts[1] != hx[2:4]:
            return None  # a content address in the wrong folder is a stray
        return bytes.fromhex(hx)

    # -- calls (every obstore await goes through here) ---------------------------------------------

    async def _io(
        self, call: Awaitable[T], action: str, key: str, *, missing_ok: bool = False
    ) -> T:
        """Await an obstore call; its errors become StoreError (``FileNotFoundError`` passes
        through when ``missing_ok``)."""
        try:
            return await call
        except FileNotFoundError:
            if missing_ok:
                raise
            raise self._fail_from(action, key) from None
        except (client.BaseError, OSError, ValueError, RuntimeError) as exc:
            raise failure(exc, action, self._where(key), self._config) from exc

    def _fail_from(self, action: str, key: str) -> StoreError:
        return StoreError(f"cannot {action} {self._where(key)}: it does not exist")

    def _translate(self, exc: BaseException, action: str, key: str) -> StoreError:
        return failure(exc, action, self._where(key), self._config)

    # -- lifecycle ---------------------------------------------------------------------------------

    async def open(self) -> int:
        """With ``create``, remove the temporaries of dead writers on this host; returns how
        many. Refused credentials or a missing bucket raise StoreError here; an unreachable
        server does not (the sweep is skipped: payloads stored inline still work, and each call
        that needs S3 fails with a StoreError until it answers)."""
        removed = 0
        listing = self._listing(_TMP, "open the payload store at")
        try:
            with anyio.move_on_after(_OPEN_SWEEP):
                async for meta in listing:
                    key = meta["path"]
                    if self.create and self._writer_dead_here(key):
                        await self._io(client.obs.delete_async(self._store, key), "remove", key)
                        removed += 1
        except StoreError as exc:
            if classify(exc.__cause__) != "unreachable":
                raise
        finally:
            await listing.aclose()
        return removed

    async def aclose(self) -> None:
        # Let obstore's threads finish waking the loop before it (and maybe the interpreter)
        # ends: see the module docstring.
        with anyio.CancelScope(shield=True):
            await anyio.sleep(_EXIT_GRACE)

    # -- writing -----------------------------------------------------------------------------------

    async def put(self, digest: bytes, data: bytes) -> None:
        key = self.key_for(digest)
        try:
            await self._io(
                client.obs.put_async(self._store, key, data, mode="create"), "write payload", key
            )
        except StoreError as exc:
            if isinstance(exc.__cause__, client.AlreadyExistsError | client.PreconditionError):
                return  # content-addressed: the same bytes are there already
            raise

    async def put_stream(self, chunks: AsyncIterable[bytes]) -> tuple[bytes, int]:
        hasher = hashlib.sha256()
        size = 0
        head: list[bytes] = []
        source = chunks.__aiter__()
        async for chunk in source:
            if not chunk:
                continue
            piece = bytes(chunk)
            hasher.update(piece)
            size += len(piece)
            head.append(piece)
            if size > self.part_size:
                return await self._put_large(hasher, size, head, source)
        data = b"".join(head)
        head.clear()
        digest = hasher.digest()
        await self.put(digest, data)
        return digest, size

    async def _put_large(
        self,
        hasher: Any,
        size: int,
        head: list[bytes],
        source: AsyncIterator[bytes],
    ) -> tuple[bytes, int]:
        """Multipart-upload the rest of a stream to a temporary, then copy it into place."""
        tmp = self._temp_key()
        live = (self.bucket, self._full(tmp))
        _LIVE_TEMPS.add(live)
        try:
            # The marker: a crash from here on leaves something leftovers() finds.
            await self._io(
                client.obs.put_async(self._store, tmp, b"", mode="create"),
                "start an upload to",
                tmp,
            )
            total = await self._upload(tmp, hasher, size, head, source)
            digest = hasher.digest()
            with anyio.CancelScope(shield=True):  # the upload is done: finish, whatever comes
                try:
                    await self._publish(tmp, self.key_for(digest), total)
                except BaseException:
                    await self._discard(tmp)
                    raise
                await self._discard(tmp)
            return digest, total
        finally:
            _LIVE_TEMPS.discard(live)

    async def _upload(
        self,
        tmp: str,
        hasher: Any,
        size: int,
        head: list[bytes],
        source: AsyncIterator[bytes],
    ) -> int:
        """Stream ``head`` and the rest of ``source`` to ``tmp``, hashing; returns the size."""
        send, recv = anyio.create_memory_object_stream[bytes](0)

        async def feed() -> AsyncIterator[bytes]:
            # Runs in tasks obstore creates: it only takes pieces from the channel. An abandoned
            # upload ends like a finished one: obstore then waits for every part in flight and
            # completes a (short) temporary that is deleted below. Ending it with an error would
            # make obstore abort while parts are still being written, and a part the server
            # finishes after the abort brings the upload back, hidden (seen on SeaweedFS).
            with contextlib.suppress(anyio.ClosedResourceError, anyio.EndOfStream):
                async for piece in recv:
                    yield piece

        # obstore starts the upload at once (a Future, not a coroutine); it pulls from feed().
        upload = asyncio.ensure_future(
            client.obs.put_async(
                self._store,
                tmp,
                feed(),
                use_multipart=True,
                chunk_size=self.part_size,
                max_concurrency=self.part_concurrency,
            )
        )
        # If the upload ends early (an S3 error), a sender waiting on the channel wakes up.
        upload.add_done_callback(lambda _: recv.close())
        try:
            buffer = bytearray()
            for piece in head:
                buffer += piece
            head.clear()
            async for chunk in source:
                if not chunk:
                    continue
                piece = bytes(chunk)
                hasher.update(piece)
                size += len(piece)
                buffer += piece
                if len(buffer) >= _FEED_PIECE:
                    out, buffer = bytes(buffer), bytearray()
                    try:
                        await send.send(out)
                    except anyio.BrokenResourceError:
                        break  # the upload failed: its error is raised below
            if buffer:
                with contextlib.suppress(anyio.BrokenResourceError):
                    await send.send(bytes(buffer))
            send.close()
            # shield: cancelling us must not drop obstore's upload half-way (see below).
            await self._io(asyncio.shield(upload), "upload payload to", tmp)
        except BaseException:
            send.close()
            await self._settle(upload)
            await self._discard(tmp)
            raise
        return size

    async def _settle(self, upload: Awaitable[Any]) -> None:
        """Wait (shielded, bounded) for an abandoned upload to finish (or fail)."""
        with (
            anyio.CancelScope(shield=True),
            anyio.move_on_after(_SETTLE),
            contextlib.suppress(Exception),
        ):
            await asyncio.shield(upload)

    async def _publish(self, tmp: str, final: str, size: int) -> None:
        """Copy the complete temporary to its content address, create-only (an object of another
        size found there is corrupt: it is replaced)."""
        try:
            meta = await self._io(
                client.obs.head_async(self._store, final), "write payload", final, missing_ok=True
            )
        except FileNotFoundError:
            pass
        else:
            if meta["size"] == size:
                return  # the same bytes are there already
            await self._io(
                client.obs.copy_async(self._store, tmp, final, overwrite=True),
                "repair payload",
                final,
            )
            return
        try:
            await self._io(
                client.obs.copy_async(self._store, tmp, final, overwrite=False),
                "write payload",
                final,
            )
        except StoreError as exc:
            cause = exc.__cause__
            if isinstance(cause, client.AlreadyExistsError | client.PreconditionError):
                return  # another writer stored the same bytes first
            if not isinstance(cause, client.NotSupportedError):
                raise
            # The configuration offers no copy-if-not-exists: a plain copy writes the same bytes
            # over the same bytes if another writer raced us (content-addressed; harmless).
            await self._io(
                client.obs.copy_async(self._store, tmp, final, overwrite=True),
                "write payload",
                final,
            )

    async def _discard(self, key: str) -> None:
        """Remove a temporary, best effort: if it stays, leftovers() reports it."""
        with anyio.CancelScope(shield=True), contextlib.suppress(StoreError, FileNotFoundError):
            await self._io(client.obs.delete_async(self._store, key), "remove", key)

    async def _exists(self, key: str, action: str) -> bool:
        try:
            await self._io(client.obs.head_async(self._store, key), action, key, missing_ok=True)
        except FileNotFoundError:
            return False
        return True

    # -- reading -----------------------------------------------------------------------------------

    def _missing(self, digest: bytes, key: str) -> IntegrityError:
        return IntegrityError(
            f"payload {digest.hex()} is missing from the payload store ({self._where(key)})"
        )

    def _wrong_size(self, digest: bytes, key: str, stored: int, size: int) -> IntegrityError:
        return IntegrityError(
            f"payload {digest.hex()} is corrupt ({self._where(key)}): expected {size} bytes, "
            f"the object has {stored}"
        )

    async def get(self, digest: bytes, size: int) -> bytes:
        key = self.key_for(digest)
        try:
            result = await self._io(
                client.obs.get_async(self._store, key), "read payload", key, missing_ok=True
            )
        except FileNotFoundError:
            raise self._missing(digest, key) from None
        stored = result.meta["size"]
        if stored != size:
            raise self._wrong_size(digest, key, stored, size)
        body = await self._io(result.bytes_async(), "read payload", key)
        data = bytes(body)
        del body
        if len(data) > MiB:
            await anyio.to_thread.run_sync(
                lambda: verify_bytes(data, digest, size, where=self._where(key))
            )
        else:
            verify_bytes(data, digest, size, where=self._where(key))
        return data

    async def iter(
        self, digest: bytes, size: int, chunk_size: int = _CHUNK
    ) -> AsyncIterator[bytes]:
        if chunk_size < 1:
            raise ValueError("chunk_size must be >= 1")
        key = self.key_for(digest)
        hasher = hashlib.sha256()
        seen = 0
        window = max(self.read_window, chunk_size)
        # Whole if small, else in ranges: one request never outlives a slow consumer's pace.
        spans: list[tuple[int, int] | None] = (
            [None]
            if size <= window
            else [(s, min(s + window, size)) for s in range(0, size, window)]
        )
        for span in spans:
            options: GetOptions | None = None if span is None else {"range": span}
            try:
                result = await self._io(
                    client.obs.get_async(self._store, key, options=options),
                    "read payload",
                    key,
                    missing_ok=True,
                )
            except FileNotFoundError:
                raise self._missing(digest, key) from None
            stored = result.meta["size"]
            if stored != size:
                raise self._wrong_size(digest, key, stored, size)
            stream = result.stream(min_chunk_size=chunk_size)
            while True:
                try:
                    piece = await stream.__anext__()
                except StopAsyncIteration:
                    break
                except (client.BaseError, OSError, ValueError, RuntimeError) as exc:
                    raise self._translate(exc, "read payload", key) from exc
                view = memoryview(piece)
                for i in range(0, len(view), chunk_size):
                    out = bytes(view[i : i + chunk_size])
                    hasher.update(out)
                    seen += len(out)
                    yield out
        if seen != size or hasher.digest() != digest:
            raise IntegrityError(
                f"payload {digest.hex()} is corrupt ({self._where(key)}): its bytes do not "
                "match their sha256"
            )

    async def stat(self, digest: bytes) -> StoredObject | None:
        key = self.key_for(digest)
        try:
            meta = await self._io(
                client.obs.head_async(self._store, key), "inspect", key, missing_ok=True
            )
        except FileNotFoundError:
            return None
        return StoredObject(self._where(key), meta["size"], _age(meta["last_modified"]), digest)

    async def list(self) -> AsyncIterator[StoredObject]:
        async for meta in self._listing(None, "list"):
            key = meta["path"]
            if key == _TMP or key.startswith(f"{_TMP}/"):
                continue
            yield StoredObject(
                self._where(key), meta["size"], _age(meta["last_modified"]), self._digest_of(key)
            )

    async def _listing(self, under: str | None, action: str) -> AsyncGenerator[ObjectMeta]:
        """Every object under the prefix (or ``under`` it), a page at a time."""
        stream = client.obs.list(self._store, under, chunk_size=_PAGE)
        where = under or ""
        while True:
            try:
                page = await stream.__anext__()
            except StopAsyncIteration:
                return
            except (client.BaseError, OSError, ValueError, RuntimeError) as exc:
                raise self._translate(exc, action, where) from exc
            for meta in page:
                yield meta

    async def leftovers(self, grace: float) -> AsyncIterator[StoredObject]:
        async for meta in self._listing(_TMP, "list the temporaries of"):
            key = meta["path"]
            if self._writer_alive(key):
                continue
            age = _age(meta["last_modified"])
            if age >= grace:
                yield StoredObject(self._where(key), meta["size"], age, None)

    def _writer(self, key: str) -> tuple[str, int] | None:
        """``(host, pid)`` of a temporary's writer, from ``tmp/<host>/<pid>-<uuid>``."""
        parts = key.split("/")
        if len(parts) != 3 or parts[0] != _TMP:
            return None
        pid, _, _rest = parts[2].partition("-")
        if not pid.isdigit():
            return None
        return parts[1], int(pid)

    def _writer_alive(self, key: str) -> bool:
        """Whether a live writer may own this temporary (this process's uploads; on this host,
        a running pid). Another host's are judged by their age alone."""
        if (self.bucket, self._full(key)) in _LIVE_TEMPS:
            return True
        writer = self._writer(key)
        if writer is None or writer[0] != host():
            return False
        return writer[1] != os.getpid() and pid_alive(writer[1])

    def _writer_dead_here(self, key: str) -> bool:
        writer = self._writer(key)
        return writer is not None and writer[0] == host() and not self._writer_alive(key)

    async def delete(self, target: bytes | StoredObject) -> bool:
        key = self.key_for(target) if isinstance(target, bytes) else self._key_of(target.location)
        if not await self._exists(key, "remove"):
            return False
        await self._io(client.obs.delete_async(self._store, key), "remove", key)
        return True


def _age(last_modified: datetime) -> float:
    return max(0.0, time.time() - last_modified.timestamp())
