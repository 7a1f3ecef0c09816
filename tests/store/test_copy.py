"""Copying a whole store into another: everything arrives verified, a rerun adds nothing, payloads
are re-tiered by the target's threshold, and a corrupt source payload stops the copy."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest
from typer.testing import CliRunner

import mxm_dataio_async as dio
from mxm_dataio_async._cli import app

pytestmark = pytest.mark.anyio


def body(req: dio.Request) -> bytes:
    size = int(str(req.params["size"]))
    return bytes([size % 251]) * size


async def fill(store: dio.Store) -> list[dio.Response]:
    registry = dio.Registry()
    registry.register("m", dio.MockAdapter(body))
    out = []
    async with dio.AsyncSession("m", store=store, registry=registry) as s:
        for size in (10, 500, 5_000, 50_000):
            out.append(await s.fetch(s.request("k", params={"size": size})))
        out.append(await s.fetch(s.request("k", params={"size": 10})))  # a cache hit
    return out


async def test_copy_into_another_layout_and_again(tmp_path: Path) -> None:
    async with dio.Store(tmp_path / "src", inline_threshold=1_000) as src:
        responses = await fill(src)
        async with dio.Store(
            tmp_path / "dst", payloads=tmp_path / "dst-objects", inline_threshold=8_000
        ) as dst:
            first = await src.copy_to(dst)
            assert (first.sessions, first.requests, first.responses, first.payloads) == (1, 5, 4, 4)
            assert first.bytes_verified == 10 + 500 + 5_000 + 50_000
            assert first.objects_written == 1  # only 50 KB is above the target's 8 KB threshold
            for resp in responses:
                assert await dst.read(resp) == await src.read(resp)
            hit = await dst.get_response(responses[-1].id)
            assert hit is not None and hit.id == responses[0].id  # served, not fetched again
            assert (await dst.verify()).ok
            again = await src.copy_to(dst)
            assert again.added == 0 and again.objects_written == 0
            stats = await dst.stats()
            assert (stats.inline_payloads, stats.file_payloads) == (3, 1)


async def test_a_corrupt_source_payload_stops_the_copy(tmp_path: Path) -> None:
    async with dio.Store(tmp_path / "src", inline_threshold=100) as src:
        await fill(src)
        (victim,) = [
            p for p in (tmp_path / "src" / "payloads").rglob("*")
            if p.is_file() and p.stat().st_size == 5_000
        ]  # fmt: skip
        victim.write_bytes(b"x" * 5_000)
        async with dio.Store(tmp_path / "dst", inline_threshold=100) as dst:
            with pytest.raises(dio.IntegrityError, match="corrupt"):
                await src.copy_to(dst)
            assert [r async for r in dst.iter_responses()] == []  # no row without its bytes
            assert (await dst.verify()).ok


def test_cli_copy(tmp_path: Path) -> None:
    async def build() -> None:
        async with dio.Store(tmp_path / "src") as src:
            await fill(src)

    anyio.run(build)
    runner = CliRunner()
    target = str(tmp_path / "copy")
    args = ["copy", target, "--to-payloads", str(tmp_path / "objects")]
    done = runner.invoke(app, [*args, "--root", str(tmp_path / "src"), "--json"])
    assert done.exit_code == 0, done.stderr
    assert json.loads(done.stdout)["responses"] == 4
    again = runner.invoke(app, [*args, "--root", str(tmp_path / "src"), "--json"])
    assert again.exit_code == 0 and json.loads(again.stdout)["responses"] == 0
    check = runner.invoke(
        app, ["verify", "--store", target, "--payloads", str(tmp_path / "objects"), "--json"]
    )
    assert check.exit_code == 0 and json.loads(check.stdout)["ok"] is True
    missing = runner.invoke(app, [*args, "--root", str(tmp_path / "nowhere")])
    assert missing.exit_code == 1 and "no store at" in missing.stderr


def test_cli_copy_sqlite_into_postgres_and_s3(
    tmp_path: Path, postgres_url: str, s3_url: str
) -> None:
    """The migration a user runs: a SQLite store copied into PostgreSQL + S3 (a schema and a
    key prefix of its own), verified clean there, a rerun adding nothing."""
    import secrets

    schema = f"copy_{secrets.token_hex(6)}"
    sep = "&" if "?" in postgres_url else "?"
    target, objects = f"{postgres_url}{sep}schema={schema}", f"{s3_url.rstrip('/')}/{schema}"

    async def build() -> None:
        async with dio.Store(tmp_path / "src", inline_threshold=1_000) as src:
            await fill(src)

    anyio.run(build)
    runner = CliRunner()
    args = ["copy", target, "--to-payloads", objects, "--root", str(tmp_path / "src"), "--json"]
    args += ["--inline-threshold", "8000"]  # the 50 KB payload goes to S3, the rest inline
    try:
        first = runner.invoke(app, args)
        assert first.exit_code == 0, first.stderr
        assert json.loads(first.stdout)["objects_written"] == 1, first.stdout
        again = runner.invoke(app, args)
        assert again.exit_code == 0 and json.loads(again.stdout)["responses"] == 0
        check = runner.invoke(app, ["verify", "--store", target, "--payloads", objects, "--json"])
        assert check.exit_code == 0, check.stdout
        report = json.loads(check.stdout)
        assert report["ok"] and report["checked"]["responses"] == 4
        assert report["checked"]["files"] == 1, report
        shown = runner.invoke(app, ["sessions", "--store", target, "--payloads", objects, "--json"])
        assert shown.exit_code == 0 and len(json.loads(shown.stdout)) == 1
        assert "dataio:" not in shown.stdout + check.stdout  # no password in any output
    finally:
        from tests.store.postgres._support import drop_schemas, run_blocking

        run_blocking(drop_schemas(postgres_url, [schema]))
