from __future__ import annotations

import uuid

import duckdb
import pytest

from mxm_dataio_async.datasets import Dataset, PublishConflict, list_datasets


def test_a_dataset_on_s3(s3_url: str, tmp_path: object) -> None:
    location = f"{s3_url}/datasets-{uuid.uuid4().hex[:8]}"
    ds = Dataset(location, "items", keys=["id"])
    with ds.stage() as staging:
        staging.add({"id": i, "v": str(i)} for i in range(100))
        assert ds.publish(staging).added == 100
    with ds.stage() as staging:
        staging.add({"id": i, "v": str(i)} for i in range(90, 120))
        result = ds.publish(staging)
    assert (result.added, result.version) == (20, 2)
    files = ds.files()
    assert len(files) == 2 and all(f.startswith("s3://") for f in files)
    assert [v.version for v in ds.versions()] == [1, 2]
    assert [v.dataset for v in list_datasets(location)] == ["items"]

    # If-Match on the pointer: a publisher whose version went stale loses the swap.
    def interloper() -> None:
        with ds.stage() as other:
            other.add([{"id": 1000, "v": "x"}])
            ds.publish(other)

    with ds.stage() as staging, pytest.raises(PublishConflict):
        staging.add([{"id": 2000, "v": "y"}])
        ds.publish(staging, retries=0, before_swap=interloper)
    assert ds.current().version == 3  # type: ignore[union-attr]
    assert ds.gc(grace=0) == []

    # Read back through DuckDB from a local copy of the parts (no httpfs here).
    local = tmp_path / "copy"  # type: ignore[operator]
    local.mkdir()
    paths = []
    for i, key in enumerate(ds.current().parts):  # type: ignore[union-attr]
        path = local / f"{i}.parquet"
        ds._files.download(key, path)
        paths.append(str(path))
    got = duckdb.execute(
        f"SELECT count(*), count(DISTINCT id) FROM read_parquet({paths})"
    ).fetchall()
    assert got == [(121, 121)]
