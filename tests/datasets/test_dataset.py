from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pytest
from pydantic import BaseModel

from mxm_dataio_async.datasets import Dataset, PublishConflict, list_datasets

ROOT = Path(__file__).resolve().parents[2]


class Row(BaseModel):
    id: int
    value: str


def rows(first: int, last: int, suffix: str = "") -> Iterator[dict[str, object]]:
    return ({"id": i, "value": f"v{i}{suffix}"} for i in range(first, last))


def publish(ds: Dataset, records: Iterator[dict[str, object]], **kw: object) -> object:
    with ds.stage(Row) as staging:
        staging.add(records, response_id="resp-1", fetched_at=datetime(2025, 1, 2, tzinfo=UTC))
        return ds.publish(staging, **kw)  # type: ignore[arg-type]


def query(ds: Dataset, sql: str) -> list[tuple[object, ...]]:
    files = ds.files()
    return duckdb.execute(sql.replace("{t}", f"read_parquet({files})")).fetchall()


def test_publish_then_rerun_adds_nothing(tmp_path: Path) -> None:
    ds = Dataset(tmp_path, "items", keys=["id"])
    assert ds.current() is None
    assert ds.files() == []
    first = publish(ds, rows(0, 100))
    assert first.added == 100 and first.version == 1 and first.published  # type: ignore[attr-defined]
    again = publish(ds, rows(0, 100))
    assert (again.added, again.version, again.published) == (0, 1, False)  # type: ignore[attr-defined]
    assert len(ds.versions()) == 1
    more = publish(ds, rows(50, 150))
    assert (more.added, more.version) == (50, 2)  # type: ignore[attr-defined]
    assert query(ds, "SELECT count(*), count(DISTINCT id) FROM {t}") == [(150, 150)]
    current = ds.current()
    assert current is not None and current.rows == 150 and len(current.parts) == 2
    # Provenance on every row; a reader by manifest sees version 1 as it was.
    assert query(ds, "SELECT DISTINCT _response_id, _fetched_at FROM {t}") == [
        ("resp-1", datetime(2025, 1, 2, tzinfo=UTC))
    ]
    assert len(ds.files(version=1)) == 1
    assert [v.version for v in list_datasets(tmp_path)] == [2]


def test_duplicate_keys_in_one_input_keep_the_last(tmp_path: Path) -> None:
    ds = Dataset(tmp_path, "items", keys=["id"])
    publish(ds, iter([{"id": 1, "value": "a"}, {"id": 1, "value": "b"}]))
    assert query(ds, "SELECT id, value FROM {t}") == [(1, "b")]


def test_changed_rows_are_appended_only_when_tracked(tmp_path: Path) -> None:
    plain = Dataset(tmp_path, "plain", keys=["id"])
    publish(plain, rows(0, 10))
    assert publish(plain, rows(0, 10, "-new")).added == 0  # type: ignore[attr-defined]

    ds = Dataset(tmp_path, "tracked", keys=["id"], track_changes=True)
    publish(ds, rows(0, 10))
    changed = [*rows(0, 3, "-new"), *rows(3, 10), *rows(10, 12)]
    result = publish(ds, iter(changed))
    assert (result.added, result.changed) == (2, 3)  # type: ignore[attr-defined]
    assert publish(ds, iter(changed)).published is False  # type: ignore[attr-defined]
    # Back to an old value is a change too: the latest row per key is compared.
    assert publish(ds, rows(0, 1)).changed == 1  # type: ignore[attr-defined]
    latest = query(
        ds,
        "SELECT id, arg_max(value, filename) FROM read_parquet("
        f"{ds.files()}, filename=true) WHERE id < 4 GROUP BY id ORDER BY id",
    )
    assert latest == [(0, "v0"), (1, "v1-new"), (2, "v2-new"), (3, "v3")]


def test_keys_must_match_and_exist(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not columns"):
        Dataset(tmp_path, "x", keys=["nope"]).stage(Row)
    publish(Dataset(tmp_path, "x", keys=["id"]), rows(0, 2))
    with pytest.raises(ValueError, match="has keys"):
        publish(Dataset(tmp_path, "x", keys=["value"]), rows(0, 2))
    with pytest.raises(ValueError, match="needs keys"):
        Dataset(tmp_path, "x").stage(Row)


def test_losing_publisher_without_retries_leaves_nothing(tmp_path: Path) -> None:
    ds = Dataset(tmp_path, "items", keys=["id"])
    publish(ds, rows(0, 5))

    def someone_else_publishes() -> None:
        publish(Dataset(tmp_path, "items", keys=["id"]), rows(5, 6))

    with pytest.raises(PublishConflict):
        publish(ds, rows(100, 110), retries=0, before_swap=someone_else_publishes)
    current = ds.current()
    assert current is not None and current.version == 2
    assert query(ds, "SELECT count(*) FROM {t}") == [(6,)]
    # The loser deleted its part, index and manifest: nothing for gc.
    assert ds.gc(grace=0, dry_run=True) == []


def _child(
    tmp_path: Path, first: int, last: int, mode: str, barrier: Path, retries: int = 5
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.datasets._publish_child",
            str(tmp_path),
            "items",
            str(first),
            str(last),
            mode,
            str(barrier),
            str(retries),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


@pytest.mark.parametrize("retries", [5, 0])
def test_two_processes_race_one_wins(tmp_path: Path, retries: int) -> None:
    publish(Dataset(tmp_path, "items", keys=["id"]), rows(0, 10))
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    a = _child(tmp_path, 0, 100, "race", barrier, retries)
    b = _child(tmp_path, 50, 150, "race", barrier, retries)
    outs = [p.communicate(timeout=60) for p in (a, b)]
    assert [p.returncode for p in (a, b)] == [0, 0], outs
    results = [o.strip() for o, _ in outs]
    ds = Dataset(tmp_path, "items", keys=["id"])
    if retries:
        # The loser saw the swap fail, computed again on the winner's version and published.
        done = [json.loads(r) for r in results]
        assert sorted(d["attempts"] for d in done) == [1, 2]
        assert sorted(d["version"] for d in done) == [2, 3]
        assert query(ds, "SELECT count(*), count(DISTINCT id) FROM {t}") == [(150, 150)]
    else:
        assert sorted(r == "conflict" for r in results) == [False, True]
        assert ds.current().version == 2  # type: ignore[union-attr]
        assert query(ds, "SELECT count(*), count(DISTINCT id) FROM {t}")[0][0] in (100, 110)
    assert ds.gc(grace=0, dry_run=True) == []


def test_crash_before_the_swap_leaves_current_and_gc_collects(tmp_path: Path) -> None:
    ds = Dataset(tmp_path, "items", keys=["id"])
    publish(ds, rows(0, 10))
    before = (tmp_path / "items" / "current").read_bytes()
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    child = _child(tmp_path, 0, 1000, "crash", barrier)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 17, (out, err)
    assert (tmp_path / "items" / "current").read_bytes() == before
    assert ds.current().version == 1  # type: ignore[union-attr]
    assert query(ds, "SELECT count(*) FROM {t}") == [(10,)]
    assert ds.gc(grace=3600) == []  # too young: might be a publish in progress
    orphans = ds.gc(grace=0)
    assert sorted(k.split("/")[0] for k in orphans) == ["index", "manifests", "parts"]
    assert ds.gc(grace=0) == []
    assert query(ds, "SELECT count(*) FROM {t}") == [(10,)]
    # The next publish is not hindered by what the crash left.
    assert publish(ds, rows(0, 20)).version == 2  # type: ignore[attr-defined]
