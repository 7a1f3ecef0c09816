"""The ``mxm-dataio`` command line, through its real entry point, on stores made by the demo."""

from __future__ import annotations

import importlib.util
import inspect
import io
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tarfile
import time
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
from typer.testing import CliRunner

import mxm_dataio_async as dio
from mxm_dataio_async._cli import app
from mxm_dataio_async._demo import run_demo

DEMO_COUNT = 12
INLINE_THRESHOLD = 100  # the "big" sessions' payloads (> 100 bytes) go to the file tier
runner = CliRunner()
WIDE = {"COLUMNS": "200"}  # rich tables: no truncated ids in the assertions


def blob(req: dio.Request) -> bytes:
    return f"{req.endpoint} {req.as_of_bucket}\n".encode() * 20


async def _build(root: Path) -> None:
    await run_demo(root, count=DEMO_COUNT, concurrency=4)
    async with (
        dio.Store(root, inline_threshold=INLINE_THRESHOLD) as store,
        dio.Registry() as registry,
    ):
        registry.register("big", dio.MockAdapter(blob))
        for bucket, n in (("2024-01", 4), ("2024-02", 3)):
            async with dio.AsyncSession(
                "big", store=store, registry=registry, as_of_bucket=bucket, cache_tag="t"
            ) as s:
                for i in range(n):
                    await s.fetch(s.request("blob", endpoint=f"/b/{i}"))


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("template") / "store"
    anyio.run(_build, root)
    return root


@pytest.fixture
def store(template: Path, tmp_path: Path) -> Path:
    root = tmp_path / "store"
    shutil.copytree(template, root)
    return root


def cli(*args: str, code: int = 0) -> Any:
    result = runner.invoke(app, list(args), env=WIDE)
    assert result.exit_code == code, (result.stdout, result.stderr)
    return result


def as_json(*args: str) -> Any:
    return json.loads(cli(*args, "--json").stdout)


def query(root: Path, sql: str, params: Any = ()) -> list[Any]:
    with closing(sqlite3.connect(root / "dataio.sqlite", isolation_level=None)) as conn:
        return conn.execute(sql, params).fetchall()


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in (root / "payloads").rglob("*") if p.is_file())


def snapshot(root: Path) -> tuple[Any, ...]:
    counts = tuple(
        query(root, f"SELECT count(*) FROM {t}")[0][0]
        for t in ("sessions", "requests", "responses", "payloads")
    )
    temps = sorted((root / "tmp").iterdir())
    return counts, files_under(root), temps


def sessions_by_source(root: Path) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for s in as_json("sessions", "--root", str(root)):
        out.setdefault(s["source"], []).append(s)
    return out


def a_response(root: Path, tier: str) -> tuple[str, str]:
    """(response id, checksum) of an OK response whose payload is in ``tier``."""
    rows = query(
        root,
        "SELECT r.id, r.checksum FROM responses r JOIN payloads p "
        "ON lower(hex(p.sha256)) = r.checksum WHERE p.tier = ? ORDER BY r.rowid LIMIT 1",
        (tier,),
    )
    return rows[0][0], rows[0][1]


def payload_path(root: Path, checksum: str) -> Path:
    return root / "payloads" / checksum[:2] / checksum[2:4] / checksum


def age(path: Path, seconds: float) -> None:
    old = time.time() - seconds
    os.utime(path, (old, old))


def one_error_line(result: Any, *needles: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return str(lines[0])


async def read_all(root: Path, checksums: list[str]) -> list[bytes]:
    async with dio.Store(root) as s:
        return [await s.read(c) for c in checksums]


# -- inspection ----------------------------------------------------------------------------------


def test_a_command_runs_with_the_objects_before_it_frozen_out_of_the_collector() -> None:
    import gc

    from mxm_dataio_async._cli._common import _run

    async def frozen() -> int:
        return gc.get_freeze_count()

    assert gc.get_freeze_count() == 0
    assert _run(frozen) > 0  # the imports are not walked by a full collection meanwhile
    assert gc.get_freeze_count() == 0  # and are collected again afterwards
    gc.freeze()  # a program that froze objects itself: left as it was
    try:
        assert _run(frozen) > 0
        assert gc.get_freeze_count() > 0  # not unfrozen by the command
    finally:
        gc.unfreeze()


def test_sessions_table_and_json(store: Path) -> None:
    rows = as_json("sessions", "--root", str(store))
    assert len(rows) == 4
    assert [r["started_at"] for r in rows] == sorted((r["started_at"] for r in rows), reverse=True)
    by = sessions_by_source(store)
    assert sorted(r["requests"] for r in by["demo"]) == [DEMO_COUNT, DEMO_COUNT]
    assert sorted(r["requests"] for r in by["big"]) == [3, 4]
    assert all(r["status"] == "ok" and r["ended_at"] for r in rows)
    fetched = next(r for r in by["demo"] if r["responses"])
    assert (
        fetched["bytes"]
        == query(
            store, "SELECT sum(size_bytes) FROM responses WHERE session_id = ?", (fetched["id"],)
        )[0][0]
    )
    big = as_json("sessions", "--root", str(store), "--source", "big")
    assert {r["source"] for r in big} == {"big"} and len(big) == 2
    assert len(as_json("sessions", "--root", str(store), "--limit", "1")) == 1
    out = cli("sessions", "--root", str(store)).stdout
    for header in ("id", "source", "as_of", "started", "ended", "status", "requests", "bytes"):
        assert header in out
    assert all(r["id"] in out for r in rows)


def test_root_from_environment(store: Path) -> None:
    result = runner.invoke(app, ["sessions", "--json"], env={"MXM_DATAIO_ROOT": str(store)})
    assert result.exit_code == 0 and len(json.loads(result.stdout)) == 4


def test_store_option_and_environment_name_the_store(store: Path, tmp_path: Path) -> None:
    by_option = as_json("sessions", "--store", str(store))
    env = {**WIDE, "MXM_DATAIO_STORE": str(store), "MXM_DATAIO_ROOT": str(tmp_path / "other")}
    by_env = runner.invoke(app, ["sessions", "--json"], env=env)
    assert by_env.exit_code == 0, by_env.stderr
    assert json.loads(by_env.stdout) == by_option and len(by_option) == 4
    both = runner.invoke(app, ["sessions", "--store", str(store), "--root", str(store)], env=WIDE)
    assert both.exit_code == 1 and "not both" in one_error_line(both)
    unknown = runner.invoke(app, ["sessions", "--store", "ftp://example/x"], env=WIDE)
    assert unknown.exit_code == 1 and "postgresql://" in one_error_line(unknown)


def test_payloads_elsewhere_are_read_and_verified(tmp_path: Path) -> None:
    """--payloads puts the large payloads in another folder; every command reads them there."""
    root, objects = tmp_path / "meta", tmp_path / "objects"

    async def ingest() -> None:
        async with (
            dio.Store(root, payloads=objects, inline_threshold=INLINE_THRESHOLD) as st,
            dio.Registry() as registry,
        ):
            registry.register("big", dio.MockAdapter(blob))
            async with dio.AsyncSession("big", store=st, registry=registry) as s:
                await s.fetch(s.request("blob", endpoint="/b/0"))

    anyio.run(ingest)
    assert len(files_under(objects)) == 1  # files_under() looks in <folder>/payloads
    assert files_under(root) == []
    where = ("--store", str(root), "--payloads", str(objects))
    report = as_json("verify", *where)
    assert report["ok"] and report["checked"]["files"] == 1
    without = runner.invoke(app, ["verify", "--store", str(root)], env=WIDE)
    assert without.exit_code == 1  # the payload is not where the store alone looks
    (checksum,) = [p.name for p in files_under(objects)]
    assert cli("cat", checksum, *where).stdout_bytes == b"/b/0 None\n" * 20


def test_show_fetched_and_cached_sessions(store: Path) -> None:
    by = sessions_by_source(store)
    first = next(s for s in by["demo"] if s["responses"])
    second = next(s for s in by["demo"] if not s["responses"])
    detail = as_json("show", first["id"], "--root", str(store))
    assert detail["session"]["id"] == first["id"]
    assert len(detail["requests"]) == DEMO_COUNT
    for q in detail["requests"]:
        assert q["served_from"] is None and q["served"] is None
        (r,) = q["responses"]
        assert r["status"] == "ok" and r["from_cache"] is False
        assert r["transport_status"] == 200 and r["attempts"] == 1
        assert r["cache_mode"] == "default" and r["ttl_seconds"] is None
    # The second pass was served from cache: each request names the response it was served.
    cached = as_json("show", second["id"][:8], "--root", str(store))  # a unique prefix works
    first_ids = {r["id"] for q in detail["requests"] for r in q["responses"]}
    for q in cached["requests"]:
        assert q["responses"] == [] and q["served_from"] in first_ids
        assert q["served"]["from_cache"] is True and q["served"]["id"] == q["served_from"]
    big = by["big"][0]
    bucketed = as_json("show", big["id"], "--root", str(store))
    for q in bucketed["requests"]:
        assert q["as_of_bucket"] in ("2024-01", "2024-02") and q["cache_tag"] == "t"
    out = cli("show", second["id"], "--root", str(store)).stdout
    assert "cache" in out and "served_from" in out and "bucket" in out
    served_from = cached["requests"][0]["served_from"]
    assert served_from[-8:] in out  # the random tail: response ids start with their time
    # `meta` finds a response by its full id, a unique prefix or its tail as `show` prints it.
    for handle in (served_from, served_from[:30], served_from[-8:], f"…{served_from[-8:]}"):
        assert json.loads(cli("meta", handle, "--root", str(store)).stdout)["id"] == served_from
    same_minute = served_from[:8]  # time-ordered ids: this prefix is shared by the whole run
    one_error_line(cli("meta", same_minute, "--root", str(store), code=1), "ambiguous")
    out = cli("show", big["id"], "--root", str(store)).stdout
    assert "fetched" in out and "2024-0" in out


def test_cat_by_response_id_and_checksum(store: Path) -> None:
    for tier in ("inline", "file"):
        response_id, checksum = a_response(store, tier)
        (expected,) = anyio.run(read_all, store, [checksum])
        by_id = cli("cat", response_id, "--root", str(store))
        assert by_id.stdout_bytes == expected
        by_sum = cli("cat", checksum, "--root", str(store))
        assert by_sum.stdout_bytes == expected
    assert payload_path(store, a_response(store, "file")[1]).exists()


def test_cat_refuses_corrupt_payloads(store: Path) -> None:
    _, inline = a_response(store, "inline")
    with closing(sqlite3.connect(store / "dataio.sqlite")) as conn:
        conn.execute("UPDATE payloads SET data = ? WHERE lower(hex(sha256)) = ?", (b"x", inline))
        conn.commit()
    result = cli("cat", inline, "--root", str(store), code=1)
    assert result.stdout_bytes == b""
    one_error_line(result, inline, "corrupt")
    response_id, on_disk = a_response(store, "file")
    path = payload_path(store, on_disk)
    path.write_bytes(path.read_bytes()[:-1] + b"!")
    result = cli("cat", response_id, "--root", str(store), code=1)
    assert result.stdout_bytes == b""  # verified before the first byte is written
    one_error_line(result, "corrupt")
    path.unlink()
    one_error_line(cli("cat", on_disk, "--root", str(store), code=1), "missing")
    one_error_line(cli("cat", "ab" * 32, "--root", str(store), code=1), "not in the store")
    one_error_line(cli("cat", "no-such-response", "--root", str(store), code=1), "unknown response")


def test_meta_is_the_response_metadata_as_json(store: Path) -> None:
    response_id, checksum = a_response(store, "inline")
    out = json.loads(cli("meta", response_id, "--root", str(store)).stdout)
    assert out["id"] == response_id and out["checksum"] == checksum
    assert out["status"] == "ok" and out["source"] == "demo" and out["transport_status"] == 200
    assert isinstance(out["headers"], dict) and len(out["request_hash"]) == 64
    assert out["request"]["id"] == out["request_id"]
    assert out["request"]["endpoint"].startswith("/items/")
    assert out["request"]["hash"] == out["request_hash"]
    one_error_line(cli("meta", "nope", "--root", str(store), code=1), "unknown response")


def test_stats(store: Path) -> None:
    st = as_json("stats", "--root", str(store))
    sources = {s["source"]: s for s in st["sources"]}
    demo, big = sources["demo"], sources["big"]
    assert (demo["sessions"], demo["requests"], demo["cache_hits"], demo["fetched"]) == (
        2,
        2 * DEMO_COUNT,
        DEMO_COUNT,
        DEMO_COUNT,
    )
    assert demo["hit_rate"] == 0.5 and demo["error_rate"] == 0.0 and demo["error_responses"] == 0
    assert "errors" not in demo  # rows, not requests: named apart from Session.errors
    assert (big["requests"], big["cache_hits"], big["responses"], big["hit_rate"]) == (7, 0, 7, 0)
    assert big["bytes"] == sum(len(blob(_fake(f"/b/{i}", b))) for b, n in _BIG for i in range(n))
    assert st["totals"]["requests"] == 2 * DEMO_COUNT + 7
    assert st["payloads"]["inline"]["count"] == DEMO_COUNT
    assert st["payloads"]["file"]["count"] == 7
    assert st["payloads"]["file"]["bytes"] == big["bytes"]
    assert st["db_bytes"] >= (store / "dataio.sqlite").stat().st_size > 0
    out = cli("stats", "--root", str(store)).stdout
    assert "hit rate" in out and "50.0%" in out and "inline" in out and "database" in out


_BIG = (("2024-01", 4), ("2024-02", 3))


def _fake(endpoint: str, bucket: str) -> dio.Request:
    from mxm_dataio_async._request import build_request

    return build_request(
        session_id="x", source="big", kind="blob", endpoint=endpoint, as_of_bucket=bucket
    )


def test_errors_are_one_line_and_verbose_shows_details(store: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    for args in (["sessions"], ["stats"], ["verify"], ["gc"], ["show", "x"], ["cat", "x"]):
        result = cli(*args, "--root", str(missing), code=1)
        one_error_line(result, "no store at", str(missing))
    assert not missing.exists()  # inspecting never creates a store
    one_error_line(cli("show", "nope", "--root", str(store), code=1), "unknown session 'nope'")
    result = cli("prune", "--older-than", "30x", "--root", str(store), code=1)
    one_error_line(result, "invalid duration '30x'")
    verbose = cli("show", "nope", "--root", str(store), "--verbose", code=1)
    assert "Traceback" in verbose.stderr and "unknown session" in verbose.stderr
    verbose = cli("--verbose", "show", "nope", "--root", str(store), code=1)
    assert "Traceback" in verbose.stderr
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "dataio.sqlite").write_bytes(b"not a database at all" * 10)
    one_error_line(cli("sessions", "--root", str(tmp_path / "empty"), code=1), "not")


def test_help_texts() -> None:
    out = cli("--help").stdout
    for command in ("sessions", "show", "cat", "meta", "stats", "verify", "gc", "prune"):
        assert command in out
    assert "export" in out and "import" in out
    assert "--grace" in cli("gc", "--help").stdout
    assert "--older-than" in cli("prune", "--help").stdout


# -- verify --------------------------------------------------------------------------------------


def test_verify_clean_store(store: Path) -> None:
    result = cli("verify", "--root", str(store))
    assert "ok:" in result.stdout and "no problems" in result.stdout
    report = as_json("verify", "--root", str(store))
    assert report["ok"] is True and report["problems"] == []
    assert report["checked"]["payloads"] == DEMO_COUNT + 7
    assert report["checked"]["files"] == 7


def test_verify_reports_every_kind_of_problem(store: Path) -> None:
    _, inline = a_response(store, "inline")
    with closing(sqlite3.connect(store / "dataio.sqlite")) as conn:
        conn.execute("UPDATE payloads SET data = ? WHERE lower(hex(sha256)) = ?", (b"evil", inline))
        dangling = conn.execute("SELECT id FROM responses WHERE checksum != ? LIMIT 1", (inline,))
        dangling_id = dangling.fetchone()[0]
        conn.execute("UPDATE responses SET checksum = ? WHERE id = ?", ("cd" * 32, dangling_id))
        conn.commit()
    _, on_disk = a_response(store, "file")
    payload_path(store, on_disk).unlink()
    orphan = payload_path(store, "ef" * 32)
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"nobody names me")
    leftover = store / "tmp" / "99999999-crashed.part"
    leftover.write_bytes(b"half a payload")
    result = runner.invoke(app, ["verify", "--root", str(store), "--json"], env=WIDE)
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    kinds = {p["kind"]: p for p in report["problems"]}
    assert set(kinds) == {
        "corrupt_payload",
        "missing_payload",
        "missing_reference",
        "orphan_file",
        "temp_leftover",
    }
    assert len(report["problems"]) == 5
    assert kinds["corrupt_payload"]["checksum"] == inline
    assert kinds["missing_payload"]["checksum"] == on_disk
    assert kinds["missing_reference"]["row"] == f"response {dangling_id}"
    assert kinds["orphan_file"]["path"] == str(orphan)
    assert kinds["temp_leftover"]["path"] == str(leftover)
    table = cli("verify", "--root", str(store), code=1).stdout
    for needle in (inline, on_disk, dangling_id, "ef" * 32, "99999999-crashed.part"):
        assert needle in table
    assert "5 problem(s)" in table
    # --grace: young files are not (yet) orphans or leftovers on a live store.
    report = json.loads(
        runner.invoke(app, ["verify", "--root", str(store), "--json", "--grace", "1h"]).stdout
    )
    assert {p["kind"] for p in report["problems"]} == {
        "corrupt_payload",
        "missing_payload",
        "missing_reference",
    }


# -- gc and prune --------------------------------------------------------------------------------


def test_gc_dry_run_changes_nothing_then_frees_orphans(store: Path) -> None:
    orphan = payload_path(store, "ef" * 32)
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"x" * 1000)
    young = payload_path(store, "ee" * 32)
    young.parent.mkdir(parents=True)
    young.write_bytes(b"y" * 10)
    leftover = store / "tmp" / "99999999-crashed.part"
    leftover.write_bytes(b"z" * 300)
    for path in (orphan, leftover):
        age(path, 2 * 3600)
    with closing(sqlite3.connect(store / "dataio.sqlite")) as conn:  # a payload nothing names
        conn.execute(
            "INSERT INTO payloads VALUES (?, 5, 'inline', ?, '2024-01-01T00:00:00.000000+00:00')",
            (bytes.fromhex("ab" * 32), b"hello"),
        )
        conn.commit()
    before = snapshot(store)
    dry = as_json("gc", "--root", str(store), "--dry-run")
    assert snapshot(store) == before
    assert dry["dry_run"] is True and dry["payload_rows"] == 1 and dry["payload_bytes"] == 5
    assert dry["orphan_files"] == [str(orphan)] and dry["orphan_bytes"] == 1000
    assert dry["temp_files"] == [str(leftover)] and dry["temp_bytes"] == 300
    assert dry["kept_recent"] == 1 and dry["freed_bytes"] == 1305
    out = cli("gc", "--root", str(store), "--dry-run").stdout
    assert "would remove 1 orphan files" in out and "would free" in out
    assert snapshot(store) == before

    report = as_json("gc", "--root", str(store))
    assert report["dry_run"] is False and report["freed_bytes"] == 1305
    assert not orphan.exists() and not leftover.exists() and young.exists()
    assert query(store, "SELECT count(*) FROM payloads WHERE sha256 = ?", (b"\xab" * 32,)) == [(0,)]
    # Referenced payloads survive: the store still verifies (the young file aside) and reads back.
    check = as_json("verify", "--root", str(store), "--grace", "1h")
    assert check["ok"] is True and check["checked"]["payloads"] == DEMO_COUNT + 7
    checksums = [r[0] for r in query(store, "SELECT checksum FROM responses")]
    assert len(anyio.run(read_all, store, checksums)) == len(checksums)
    # --grace 0 takes the young file too.
    assert as_json("gc", "--root", str(store), "--grace", "0")["orphan_files"] == [str(young)]
    assert cli("verify", "--root", str(store)).exit_code == 0


def _backdate(root: Path, where: str, days: int = 40) -> int:
    when = (datetime.now(UTC) - timedelta(days=days)).isoformat(timespec="microseconds")
    with closing(sqlite3.connect(root / "dataio.sqlite")) as conn:
        n = conn.execute(f"UPDATE responses SET fetched_at = ? WHERE {where}", (when,)).rowcount
        conn.commit()
    return int(n)


def test_prune_with_source_and_bucket_filters(store: Path) -> None:
    assert _backdate(store, "source = 'big'") == 7
    before = snapshot(store)
    dry = as_json(
        "prune", "--root", str(store), "--older-than", "30d", "--bucket", "2024-01", "--dry-run"
    )
    assert (dry["responses"], dry["requests"], dry["garbage_payloads"]) == (4, 4, 4)
    assert snapshot(store) == before
    out = cli("prune", "--root", str(store), "--older-than", "30d", "--source", "big", "--dry-run")
    assert "would delete 7 responses" in out.stdout and "mxm-dataio gc" in out.stdout
    # Too young for the cutoff: nothing.
    assert as_json("prune", "--root", str(store), "--older-than", "6w")["responses"] == 0
    # Another source's filter: nothing.
    none = as_json("prune", "--root", str(store), "--older-than", "30d", "--source", "demo")
    assert none["responses"] == 0 and snapshot(store) == before

    done = as_json("prune", "--root", str(store), "--older-than", "30d", "--bucket", "2024-01")
    assert (done["responses"], done["requests"], done["garbage_payloads"]) == (4, 4, 4)
    assert query(store, "SELECT DISTINCT as_of_bucket FROM responses WHERE source = 'big'") == [
        ("2024-02",)
    ]
    assert query(store, "SELECT count(*) FROM sessions")[0][0] == 4  # sessions are kept
    freed = as_json("gc", "--root", str(store), "--grace", "0")
    assert freed["payload_rows"] == 4 and len(freed["payload_files"]) == 4
    assert len(files_under(store)) == 3
    assert cli("verify", "--root", str(store)).exit_code == 0


def test_prune_removes_cache_hits_served_by_pruned_responses(store: Path) -> None:
    # The demo's first pass is old; its second pass was served from it.
    first = next(s for s in sessions_by_source(store)["demo"] if s["responses"])
    assert _backdate(store, f"session_id = '{first['id']}'") == DEMO_COUNT
    done = as_json("prune", "--root", str(store), "--older-than", "2w", "--gc", "--grace", "0")
    assert done["responses"] == DEMO_COUNT and done["requests"] == 2 * DEMO_COUNT
    assert done["gc"]["payload_rows"] == DEMO_COUNT
    assert query(store, "SELECT count(*) FROM requests WHERE source = 'demo'") == [(0,)]
    assert query(store, "SELECT count(*) FROM payloads WHERE tier = 'inline'") == [(0,)]
    assert cli("verify", "--root", str(store)).exit_code == 0


# -- export / import -----------------------------------------------------------------------------


async def _replay(root: Path, requests: list[tuple[str, str, str | None]]) -> list[bytes]:
    """Fetch with only_if_cached: an adapter call would fail the test."""

    def refuse(req: dio.Request) -> bytes:
        raise AssertionError(f"the adapter was called for {req!r}")

    out: list[bytes] = []
    async with dio.Store(root) as store, dio.Registry() as registry:
        for source in sorted({s for s, _, _ in requests}):
            registry.register(source, dio.MockAdapter(refuse))
        for source, endpoint, bucket in requests:
            async with dio.AsyncSession(
                source,
                store=store,
                registry=registry,
                cache_mode="only_if_cached",
                as_of_bucket=bucket,
                cache_tag="t" if source == "big" else None,
            ) as s:
                kind = "item" if source == "demo" else "blob"
                resp = await s.fetch(s.request(kind, endpoint=endpoint))
                assert resp.from_cache
                out.append(await s.read(resp))
    return out


def test_export_import_roundtrip_replays_offline(store: Path, tmp_path: Path) -> None:
    by = sessions_by_source(store)
    cached = next(s for s in by["demo"] if not s["responses"])  # the pass served from cache
    big = next(s for s in by["big"] if s["requests"] == 4)
    bundles = []
    for session in (cached, big):
        bundle = tmp_path / f"{session['source']}.tar"
        out = cli("export", session["id"], "-o", str(bundle), "--root", str(store)).stdout
        assert "exported session" in out and bundle.exists()
        bundles.append(bundle)
    with tarfile.open(bundles[0]) as tar:
        names = tar.getnames()
        manifest = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
    assert names[:4] == ["manifest.json", "sessions.jsonl", "requests.jsonl", "responses.jsonl"]
    assert manifest["session_id"] == cached["id"]
    assert len(manifest["payloads"]) == DEMO_COUNT
    # The cached session's requests, plus the responses it was served with their requests.
    counts = {"sessions": 2, "requests": 2 * DEMO_COUNT, "responses": DEMO_COUNT}
    assert manifest["counts"] == counts

    other = tmp_path / "machine-b"
    for bundle in bundles:
        out = cli("import", str(bundle), "--root", str(other), "--inline-threshold", "100")
        assert "imported session" in out.stdout
    before = snapshot(other)
    again = cli("import", str(bundles[1]), "--root", str(other), "--inline-threshold", "100")
    assert "added 0 sessions, 0 requests, 0 responses, 0 payloads" in again.stdout
    assert snapshot(other) == before  # idempotent
    assert cli("verify", "--root", str(other)).exit_code == 0
    # The imported session is listed and shown like the original.
    assert {s["id"] for s in as_json("sessions", "--root", str(other))} >= {cached["id"], big["id"]}
    shown = as_json("show", cached["id"], "--root", str(other))
    assert all(q["served"] is not None for q in shown["requests"])

    wanted: list[tuple[str, str, str | None]] = [
        ("demo", f"/items/{n}", None) for n in range(DEMO_COUNT)
    ]
    wanted += [("big", f"/b/{i}", "2024-01") for i in range(4)]
    replayed = anyio.run(_replay, other, wanted)
    original = anyio.run(_replay, store, wanted)
    assert replayed == original
    assert replayed[-1] == blob(_fake("/b/3", "2024-01"))


def test_import_refuses_a_tampered_bundle_before_writing_rows(store: Path, tmp_path: Path) -> None:
    big = next(s for s in sessions_by_source(store)["big"] if s["requests"] == 4)
    good = tmp_path / "good.tar.gz"  # compressed bundles work too
    cli("export", big["id"][:8], "--output", str(good), "--root", str(store))
    bad = tmp_path / "bad.tar"
    with tarfile.open(good) as src, tarfile.open(bad, "w") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read()  # type: ignore[union-attr]
            if member.name.startswith("payloads/") and not dst.getnames()[4:]:
                data = data[:-1] + b"?"  # one byte changed, same size
            dst.addfile(member, io.BytesIO(data))
    other = tmp_path / "b"
    result = cli("import", str(bad), "--root", str(other), code=1)
    one_error_line(result, "does not match its sha256", "nothing was imported")
    assert query(other, "SELECT count(*) FROM responses") == [(0,)]
    assert query(other, "SELECT count(*) FROM payloads") == [(0,)]
    assert cli("import", str(good), "--root", str(other)).exit_code == 0
    assert query(other, "SELECT count(*) FROM responses") == [(4,)]
    one_error_line(cli("import", str(tmp_path / "none.tar"), "--root", str(other), code=1))
    one_error_line(
        cli("export", "nope", "-o", str(tmp_path / "x.tar"), "--root", str(store), code=1),
        "unknown session",
    )
    assert not (tmp_path / "x.tar").exists()


# -- the real entry point ------------------------------------------------------------------------


def _module(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "mxm_dataio_async", *args], capture_output=True, timeout=120
    )


def test_entry_point_in_a_subprocess(store: Path, tmp_path: Path) -> None:
    response_id, checksum = a_response(store, "file")
    (expected,) = anyio.run(read_all, store, [checksum])
    done = _module("cat", response_id, "--root", str(store))
    assert done.returncode == 0 and done.stdout == expected
    done = _module("verify", "--root", str(store))
    assert done.returncode == 0 and b"no problems" in done.stdout
    payload_path(store, checksum).write_bytes(b"garbage")
    done = _module("verify", "--root", str(store))
    assert done.returncode == 1 and b"corrupt" in done.stdout
    done = _module("sessions", "--root", str(tmp_path / "missing"))
    assert done.returncode == 1 and b"Traceback" not in done.stderr
    assert done.stderr.decode().strip().startswith("error: no store at")


# -- durations, show's handles, session prefixes, --version, help, closed pipes ------------------


def test_prune_refuses_an_ambiguous_month_or_minute(store: Path) -> None:
    """Regression: ``--older-than 1M`` meant one minute, so it pruned nearly everything."""
    old = (datetime.now(UTC) - timedelta(minutes=5)).isoformat(timespec="microseconds")
    with closing(sqlite3.connect(store / "dataio.sqlite")) as conn:
        conn.execute("UPDATE responses SET fetched_at = ?", (old,))
        conn.commit()
    before = snapshot(store)
    for text in ("1M", "1m"):
        result = cli("prune", "--older-than", text, "--root", str(store), code=1)
        one_error_line(result, "ambiguous", "1min", "30d")
    one_error_line(
        cli("prune", "--older-than", "1mo", "--root", str(store), code=1), "no fixed length", "30d"
    )
    one_error_line(cli("gc", "--grace", "5m", "--root", str(store), code=1), "5min")
    assert snapshot(store) == before
    assert as_json("prune", "--older-than", "10min", "--root", str(store))["responses"] == 0
    done = as_json("prune", "--older-than", "4min", "--root", str(store))
    assert done["responses"] == DEMO_COUNT + 7


async def _varied(root: Path) -> None:
    """A session with params, a failed request and a stream of three messages."""

    def handler(req: dio.Request) -> bytes:
        if req.endpoint == "/bad":
            raise ValueError("the upstream said no: quota exceeded")
        return f"ok {req.endpoint}".encode()

    async with dio.Store(root) as store, dio.Registry() as registry:
        adapter = dio.MockAdapter(handler, stream_handler=lambda req: [b"e0", b"e1", b"e2"])
        registry.register("src", adapter, retry=dio.RetryPolicy(max_attempts=1))
        async with dio.AsyncSession("src", store=store, registry=registry) as s:
            await s.fetch(s.request("quote", endpoint="/q", params={"symbol": "CSPX.L", "n": 3}))
            with pytest.raises(dio.FetchError):
                await s.fetch(s.request("quote", endpoint="/bad"))
            async for _ in s.stream(s.request("ticks", endpoint="/stream")):
                pass


def test_show_prints_handles_cat_and_meta_take(tmp_path: Path) -> None:
    """Regression: show printed a 12-character checksum prefix nothing accepts, and no ids,
    params, error text or stream sequence."""
    root = tmp_path / "store"
    anyio.run(_varied, root)
    (session,) = as_json("sessions", "--root", str(root))
    detail = as_json("show", session["id"], "--root", str(root))
    ids = [r["id"] for q in detail["requests"] for r in q["responses"]]
    out = cli("show", session["id"], "--root", str(root)).stdout
    handles = re.findall(r"…([0-9a-f]{12})\b", out)
    assert len(handles) == len(ids) == 5
    assert [i[-12:] for i in ids] == handles
    for response_id, handle in zip(ids, handles, strict=True):
        for text in (handle, f"…{handle}"):
            shown = json.loads(cli("meta", text, "--root", str(root)).stdout)
            assert shown["id"] == response_id
    assert cli("cat", handles[0], "--root", str(root)).stdout_bytes == b"ok /q"
    assert cli("cat", handles[2], "--root", str(root)).stdout_bytes == b"e0"
    assert '{"n":3,"symbol":"CSPX.L"}' in out
    cells = [line.split("│")[1:-1] for line in out.splitlines() if line.count("│") > 10]
    assert "the upstream said no: quota exceeded" in " ".join(c[13].strip() for c in cells)
    rows = [line.split("│")[1:-1] for line in out.splitlines() if "ticks GET /stream" in line]
    assert [cells[7].strip() for cells in rows] == ["0", "1", "2"]
    stream = [r for q in detail["requests"] if q["kind"] == "ticks" for r in q["responses"]]
    assert [r["sequence"] for r in stream] == [0, 1, 2]


async def _sessions_named(root: Path, ids: list[str]) -> None:
    async with dio.Store(root) as store:
        for session_id in ids:
            await store.metadata.save_session(
                dio.Session(id=session_id, source="s", as_of=None, started_at=datetime.now(UTC))
            )


def test_short_session_prefixes_say_too_short_or_ambiguous(tmp_path: Path) -> None:
    """Regression: a prefix under 4 characters was "unknown" even when sessions start with it."""
    root = tmp_path / "store"
    anyio.run(_sessions_named, root, ["abc1-1111", "abc2-2222", "fed0-3333"])
    for command in (["show"], ["export", "-o", str(tmp_path / "x.tar")]):
        args = [*command[:1], "ab", *command[1:], "--root", str(root)]
        one_error_line(cli(*args, code=1), "'ab' is ambiguous", "2 sessions", "at least 4")
        args[1] = "fe"
        one_error_line(cli(*args, code=1), "'fe' is too short", "at least 4", "fed0")
        args[1] = "zz"
        one_error_line(cli(*args, code=1), "unknown session 'zz'")
    assert as_json("show", "fed0", "--root", str(root))["session"]["id"] == "fed0-3333"
    one_error_line(cli("show", "abc", "--root", str(root), code=1), "ambiguous")


def test_version() -> None:
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    assert cli("--version").stdout.strip() == f"mxm-dataio {dio.__version__} (event loop: {loop})"


@pytest.mark.parametrize("chosen", ["", "asyncio", "uvloop"])
def test_commands_run_on_uvloop_when_installed(
    chosen: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    from mxm_dataio_async._cli._common import _run

    if chosen == "uvloop" or not chosen:
        pytest.importorskip("uvloop")
    monkeypatch.setenv("MXM_DATAIO_LOOP", chosen)

    async def loop_module() -> str:
        return type(asyncio.get_running_loop()).__module__.split(".")[0]

    assert _run(loop_module) == ("asyncio" if chosen == "asyncio" else "uvloop")


def test_a_bad_loop_choice_is_one_line(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MXM_DATAIO_LOOP", "trio")
    result = runner.invoke(app, ["sessions", "--root", str(store)])
    assert result.exit_code == 1
    assert "MXM_DATAIO_LOOP must be asyncio or uvloop, not 'trio'" in result.stderr


def test_help_paragraphs_reflow() -> None:
    """Regression: hard line breaks in the command docstrings were kept, so --help broke lines
    mid-sentence. Each paragraph now comes out on one line when the terminal is wide enough."""
    commands = {c.name or c.callback.__name__: c.callback for c in app.registered_commands}  # type: ignore[union-attr]
    assert {"show", "tail", "run", "prune", "copy"} <= set(commands)
    for name, callback in commands.items():
        doc = inspect.cleandoc(callback.__doc__ or "")
        result = runner.invoke(app, [name, "--help"], env={"COLUMNS": "1000"})
        assert result.exit_code == 0, result.output
        lines = [" ".join(line.split()) for line in result.stdout.splitlines()]
        for paragraph in doc.split("\n\n"):
            if paragraph.startswith("    "):
                continue  # an example (a code block)
            text = " ".join(paragraph.replace("`", "").split())
            assert any(text in line for line in lines), (name, text, result.stdout)


async def _many(root: Path) -> None:
    async with dio.Store(root) as store, dio.Registry() as registry:
        registry.register("src", dio.MockAdapter(lambda req: b"x"))
        async with dio.AsyncSession("src", store=store, registry=registry) as s:
            padding = "p" * 300  # 1,000 lines of ~700 bytes: more than a pipe buffer holds
            reqs = (s.request("k", endpoint=f"/{i}", params={"pad": padding}) for i in range(1000))
            async for outcome in s.fetch_many(reqs, concurrency=16):
                assert outcome.ok


def test_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    """Regression: ``tail ... | head -1`` printed "Broken pipe" and exited 1."""
    root = tmp_path / "store"
    anyio.run(_many, root)
    (session,) = as_json("sessions", "--root", str(root))
    for args in (["tail", "--checkpoint", "c"], ["show", session["id"]]):
        with subprocess.Popen(
            [sys.executable, "-m", "mxm_dataio_async", *args, "--root", str(root)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        ) as proc:
            assert proc.stdout is not None and proc.stderr is not None
            first = proc.stdout.readline()
            proc.stdout.close()  # the reader goes away, as `head -1` does
            err = proc.stderr.read()
            assert proc.wait(timeout=60) == 141, err
        assert first and err == b""
    # What was not written is not checkpointed: a second tail goes on from there.
    rest = cli("tail", "--checkpoint", "c", "--root", str(root)).stdout.splitlines()
    assert 0 < len(rest) < 1000
