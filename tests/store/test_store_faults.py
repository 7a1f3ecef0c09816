"""Store faults: a full disk, a read-only or vanished root, failing fsync: a clear StoreError,
no partial rows, and the session surfaces it instead of hanging."""

from __future__ import annotations

import errno
import os
import shutil
import sqlite3
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import anyio
import pytest

import mxm_dataio_async as dio
from mxm_dataio_async._models import Request

pytestmark = pytest.mark.anyio


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (needs mount permission: root in CI; skipped elsewhere)."""
    mnt = tmp_path / f"fs-{uuid.uuid4().hex[:8]}"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _registry(size: int) -> dio.Registry:
    def handler(req: Request) -> bytes:
        i = req.params["i"]
        assert isinstance(i, int)
        return os.urandom(size - 8) + i.to_bytes(8, "big")

    reg = dio.Registry()
    reg.register("m", dio.MockAdapter(handler))
    return reg


async def _assert_consistent(root: Path) -> int:
    """Every recorded response's payload reads back verified; returns the OK count."""
    with closing(sqlite3.connect(root / "dataio.sqlite")) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    n = 0
    async with dio.Store(root) as store:
        async for resp in store.iter_responses(status="ok"):
            await store.read(resp)
            n += 1
    return n


@pytest.mark.parametrize("size", [200, 20_000], ids=["inline", "file-tier"])
async def test_disk_full_is_a_store_error_with_no_partial_rows(small_fs: Path, size: int) -> None:
    root = small_fs / "store"
    reg = _registry(size)
    failed_at: int | None = None
    message = ""
    with anyio.fail_after(60):  # a bound, not a timing assertion: it must not hang
        with pytest.raises(dio.StoreError):  # the session's own end row may fail too
            async with dio.AsyncSession("m", root=str(root), registry=reg) as s:
                for i in range(10_000):
                    try:
                        await s.fetch(s.request("k", params={"i": i}))
                    except dio.StoreError as exc:
                        failed_at, message = i, str(exc)
                        raise
    assert failed_at is not None and failed_at > 0
    assert "disk full" in message or "no space left" in message
    # Free some room so the store can be opened and checked.
    for extra in small_fs.rglob("*.part"):
        extra.unlink()
    ok = await _assert_consistent(root)
    assert ok <= failed_at


async def test_read_only_root_refused_clearly(small_fs: Path) -> None:
    root = small_fs / "store"
    async with dio.Store(root):
        pass
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    with pytest.raises(dio.StoreError, match=r"not writable|read-only"):
        async with dio.Store(root):
            pass


async def test_vanished_root_mid_run(tmp_path: Path) -> None:
    root = tmp_path / "store"
    reg = _registry(100_000)
    with anyio.fail_after(60):
        async with dio.AsyncSession("m", root=str(root), registry=reg) as s:
            await s.fetch(s.request("k", params={"i": 0}))
            shutil.rmtree(root)
            with pytest.raises(dio.StoreError, match="cannot"):
                await s.fetch(s.request("k", params={"i": 1}))
            assert s.session.errors == 1


async def test_failing_fsync_simulated_enospc(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mxm_dataio_async._store import _local as _payloads

    root = tmp_path / "store"
    reg = _registry(100_000)

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    async with dio.AsyncSession("m", root=str(root), registry=reg) as s:
        await s.fetch(s.request("k", params={"i": 0}))
        monkeypatch.setattr(_payloads.os, "fsync", no_space)  # type: ignore[attr-defined]
        with pytest.raises(dio.StoreError, match="no space left on device"):
            await s.fetch(s.request("k", params={"i": 1}))
        monkeypatch.undo()
        again = await s.fetch(s.request("k", params={"i": 1}))  # the store recovers
        assert again.ok
    assert await _assert_consistent(root) == 2
    assert not any((root / "tmp").iterdir())
