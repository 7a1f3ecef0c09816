from __future__ import annotations

import hashlib
import os
from datetime import UTC, datetime
from pathlib import Path

import anyio
import pytest

from mxm_dataio_async._exceptions import FetchError
from mxm_dataio_async._models import Request
from mxm_dataio_async._request import build_request
from mxm_dataio_async.adapters.base import Fetcher
from mxm_dataio_async.adapters.files import FileAdapter

pytestmark = pytest.mark.anyio


def req(endpoint: str | None) -> Request:
    return build_request(session_id="t", source="files", kind="k", endpoint=endpoint)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """root/ with files, a subdir, symlinks in and out; a secret file next to root."""
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "a.json").write_bytes(b'{"a": 1}')
    (root / "sub" / "b.csv").write_bytes(b"x,y\n1,2\n")
    (tmp_path / "secret.txt").write_bytes(b"top secret")
    (root / "inside-link.csv").symlink_to(root / "sub" / "b.csv")
    (root / "outside-link.txt").symlink_to(tmp_path / "secret.txt")
    (root / "outside-dir").symlink_to(tmp_path)
    return root


def test_is_a_fetcher(tree: Path) -> None:
    assert isinstance(FileAdapter(tree), Fetcher)
    assert "root" in repr(FileAdapter(tree))
    with pytest.raises(ValueError, match="not a directory"):
        FileAdapter(tree / "a.json")


async def test_small_file(tree: Path) -> None:
    result = await FileAdapter(tree).fetch(req("a.json"))
    assert result.data == b'{"a": 1}'
    assert result.transport_status is None
    assert result.content_type == "application/json"
    assert result.adapter_meta is not None
    assert result.adapter_meta["path"] == "a.json"
    assert result.adapter_meta["size"] == 8
    mtime = datetime.fromtimestamp(os.stat(tree / "a.json").st_mtime, UTC)
    assert datetime.fromisoformat(result.adapter_meta["mtime"]) == mtime


@pytest.mark.parametrize(
    ("endpoint", "path"),
    [
        ("sub/b.csv", "sub/b.csv"),
        ("./sub/../sub/b.csv", "sub/b.csv"),  # ".." that stays inside is fine
        ("inside-link.csv", "sub/b.csv"),  # a symlink that stays inside too
    ],
)
async def test_paths_inside_root(tree: Path, endpoint: str, path: str) -> None:
    result = await FileAdapter(tree).fetch(req(endpoint))
    assert result.data == b"x,y\n1,2\n"
    assert result.content_type == "text/csv"
    assert result.adapter_meta is not None
    assert result.adapter_meta["path"] == path


async def test_absolute_path_inside_root(tree: Path) -> None:
    result = await FileAdapter(tree).fetch(req(str(tree / "a.json")))
    assert result.data == b'{"a": 1}'


@pytest.mark.parametrize(
    "endpoint",
    [
        "../secret.txt",
        "sub/../../secret.txt",
        "outside-link.txt",
        "outside-dir/secret.txt",
        "/etc/hostname",
        "ABSOLUTE_SECRET",
    ],
)
async def test_escapes_refused(tree: Path, endpoint: str) -> None:
    if endpoint == "ABSOLUTE_SECRET":
        endpoint = str(tree.parent / "secret.txt")
    with pytest.raises(FetchError, match=r"refused|no such file"):
        await FileAdapter(tree).fetch(req(endpoint))


async def test_escape_message(tree: Path) -> None:
    with pytest.raises(FetchError, match="resolves outside the adapter root"):
        await FileAdapter(tree).fetch(req("outside-link.txt"))


@pytest.mark.parametrize(
    ("endpoint", "match"),
    [
        ("missing.txt", "no such file"),
        ("sub", "is a directory"),
        (".", "is a directory"),
        (None, "needs request.endpoint"),
        ("", "needs request.endpoint"),
    ],
)
async def test_bad_targets(tree: Path, endpoint: str | None, match: str) -> None:
    with pytest.raises(FetchError, match=match):
        await FileAdapter(tree).fetch(req(endpoint))


async def test_fifo_refused(tree: Path) -> None:
    os.mkfifo(tree / "pipe")
    with pytest.raises(FetchError, match="not a regular file"):
        await FileAdapter(tree).fetch(req("pipe"))


async def test_symlink_loop(tree: Path) -> None:
    (tree / "loop1").symlink_to(tree / "loop2")
    (tree / "loop2").symlink_to(tree / "loop1")
    with pytest.raises(FetchError):
        await FileAdapter(tree).fetch(req("loop1"))


async def test_large_file_chunked(tree: Path) -> None:
    data = os.urandom(3 * (1 << 20) + 17)
    (tree / "big.unknownext").write_bytes(data)
    adapter = FileAdapter(tree, chunk_size=1 << 16)
    result = await adapter.fetch(req("big.unknownext"))
    assert not isinstance(result.data, bytes)
    sizes: list[int] = []
    h = hashlib.sha256()
    async for chunk in result.data:
        sizes.append(len(chunk))
        h.update(chunk)
    assert sum(sizes) == len(data)
    assert max(sizes) <= 1 << 16
    assert len(sizes) == len(data) // (1 << 16) + 1
    assert h.hexdigest() == hashlib.sha256(data).hexdigest()
    assert getattr(result.data, "closed", None) is True
    assert result.content_type is None
    assert result.adapter_meta is not None
    assert result.adapter_meta["size"] == len(data)


async def test_threshold_boundary(tree: Path) -> None:
    (tree / "ten.txt").write_bytes(b"0123456789")
    assert (await FileAdapter(tree, stream_threshold=10).fetch(req("ten.txt"))).data == (
        b"0123456789"
    )
    result = await FileAdapter(tree, stream_threshold=9, chunk_size=4).fetch(req("ten.txt"))
    assert not isinstance(result.data, bytes)
    assert [c async for c in result.data] == [b"0123", b"4567", b"89"]


async def test_large_file_aclose_without_iterating(tree: Path) -> None:
    (tree / "big.bin").write_bytes(b"z" * 100)
    result = await FileAdapter(tree, stream_threshold=10).fetch(req("big.bin"))
    stream = result.data
    assert not isinstance(stream, bytes)
    assert getattr(stream, "closed", None) is False
    await stream.aclose()  # type: ignore[attr-defined]
    await stream.aclose()  # type: ignore[attr-defined]
    assert getattr(stream, "closed", None) is True
    assert [c async for c in stream] == []


async def test_large_symlink_escape_refused(tree: Path) -> None:
    (tree.parent / "big-secret.bin").write_bytes(b"s" * 100)
    (tree / "big-link").symlink_to(tree.parent / "big-secret.bin")
    with pytest.raises(FetchError, match="outside"):
        await FileAdapter(tree, stream_threshold=10).fetch(req("big-link"))


async def test_cancelled_iteration_closes_the_file(tree: Path) -> None:
    (tree / "big.bin").write_bytes(b"z" * (1 << 20))
    result = await FileAdapter(tree, stream_threshold=10, chunk_size=1024).fetch(req("big.bin"))
    stream = result.data
    assert not isinstance(stream, bytes)
    with anyio.CancelScope() as scope:
        async for _ in stream:
            scope.cancel()
    assert getattr(stream, "closed", None) is True
