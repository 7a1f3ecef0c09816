"""Datasets: a 1,000,000-row CSV payload parsed, validated and published, and a rerun with 1% new
rows anti-joined against 10,000,000 existing keys.

    python benchmarks/datasets.py            # ~3 minutes on 2 cores; --quick for a smoke run

- **Ingest**: ``run_job`` on a job whose one request reads a ``--rows``-row CSV (10 columns) with
  the file adapter, records it in a fresh store, parses it (streamed from the store), validates
  every row into a pydantic model and publishes a new dataset (Parquet). Wall time of the run and
  the process's peak RSS (each trial in a process of its own). Target: RSS < 512 MiB.
- **Rerun, 1% new**: a dataset with ``--existing`` keys (10 M; built with DuckDB, not timed) and
  an input of ``--rows`` rows of which 1% are new keys: staging (parse, validate, hash) and the
  publish (anti-join against the key index, the new part, manifest, pointer swap) timed apart.
  Target: publish < 5 s.
- **Engines** (when Polars is importable; it is not a dependency): the same anti-join of 1 M
  candidate keys against 10 M keys in DuckDB and in Polars, seconds and peak RSS.

Medians of ``--repeat`` trials; results go to ``benchmarks/results/datasets.json``.
Measurements only: nothing is asserted.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from _common import machine

HERE = Path(__file__).resolve().parent
COLUMNS = "id,symbol,day,open,high,low,close,volume,venue,note"
MODEL = """
from datetime import date
from pydantic import BaseModel


class Bar(BaseModel):
    id: int
    symbol: str
    day: date
    open: float
    high: float
    low: float
    close: float
    volume: int
    venue: str
    note: str | None = None
"""


def write_csv(path: Path, ids: range | list[int]) -> None:
    rnd = random.Random(7)
    with open(path, "w") as f:
        f.write(COLUMNS + "\n")
        for i in ids:
            px = 100 + rnd.random() * 10
            f.write(
                f"{i},SYM{i % 500},2025-{1 + i % 12:02d}-{1 + i % 28:02d},{px:.4f},{px + 1:.4f},"
                f"{px - 1:.4f},{px + 0.5:.4f},{rnd.randrange(1_000_000)},XLON,row {i}\n"
            )


def rss_mib() -> float:
    """This process's peak RSS (VmHWM: ru_maxrss would carry the parent's over fork + exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- trials (each in its own process) -------------------------------------------------------


def trial_ingest(work: Path) -> dict[str, Any]:
    from mxm_dataio_async.jobs import run_job

    started = time.perf_counter()
    summary = anyio.run(run_job, work / "job.yaml")
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "rss_mib": rss_mib(),
        "parsed": summary.records_parsed,
        "failed": summary.records_failed,
        "added": summary.records_added,
        "ok": summary.ok,
    }


def trial_rerun(work: Path) -> dict[str, Any]:
    from mxm_dataio_async.datasets import Dataset, ParseSpec, Validator, parse_records

    sys.path.insert(0, str(work))
    model = importlib.import_module("bench_models").Bar
    ds = Dataset(work / "datasets", "bars", keys=["id"])
    started = time.perf_counter()
    validator = Validator(model)
    tally = validator.tally()
    staging = ds.stage(model)
    with open(work / "rerun.csv", "rb") as f:
        chunks = iter(lambda: f.read(256 * 1024), b"")
        records = parse_records(chunks, ParseSpec(format="csv"))
        staging.add(validator.validate(records, tally), response_id="bench")
    staging.finish()
    staged = time.perf_counter() - started
    rss_staged = rss_mib()
    started = time.perf_counter()
    result = ds.publish(staging)
    publish = time.perf_counter() - started
    staging.close()
    return {
        "stage_seconds": staged,
        "publish_seconds": publish,
        "rss_mib_staging": rss_staged,
        "rss_mib": rss_mib(),
        "added": result.added,
        "version": result.version,
    }


def trial_engine(work: Path, engine: str) -> dict[str, Any]:
    cand, keys = work / "cand.parquet", work / "index.parquet"
    started = time.perf_counter()
    if engine == "duckdb":
        con = duckdb.connect()
        con.execute("SET memory_limit='256MB'")
        row = con.execute(
            f"SELECT count(*) FROM read_parquet('{cand}') c "
            f"ANTI JOIN read_parquet('{keys}') k USING (_key_hash)"
        ).fetchone()
        n = int(row[0]) if row else -1
    else:
        pl: Any = importlib.import_module("polars")
        c = pl.scan_parquet(cand).select("_key_hash")
        n = c.join(pl.scan_parquet(keys), on="_key_hash", how="anti").collect().height
    return {"seconds": time.perf_counter() - started, "rss_mib": rss_mib(), "new": n}


# -- setup (not timed) ---------------------------------------------------------------------------


def setup_ingest(work: Path, rows: int) -> None:
    (work / "inbox").mkdir(parents=True)
    write_csv(work / "inbox" / "bars.csv", range(rows))
    (work / "bench_models.py").write_text(MODEL)
    job = {
        "job": "bench",
        "store": "dataio",
        "sources": {"files": {"adapter": "file", "root": "inbox"}},
        "requests": [
            {
                "source": "files",
                "kind": "bars",
                "endpoint": "bars.csv",
                "parse": {"format": "csv"},
                "validate": {"model": "bench_models:Bar", "on_error": "fail"},
                "dataset": {"name": "bars", "keys": ["id"]},
            }
        ],
    }
    (work / "job.yaml").write_text(yaml.safe_dump(job))


def setup_rerun(work: Path, rows: int, existing: int) -> None:
    """A version 1 of ``existing`` keys, ``rows - 1%`` of them the rerun's own (their hashes
    computed as a publish does), the rest random 16-byte keys made by DuckDB."""
    from mxm_dataio_async.datasets import key_hash

    work.mkdir(parents=True, exist_ok=True)
    (work / "bench_models.py").write_text(MODEL)
    new = rows // 100
    old = rows - new
    write_csv(work / "rerun.csv", [*range(old), *range(existing, existing + new)])
    ds_dir = work / "datasets" / "bars"
    for sub in ("parts", "index", "manifests"):
        (ds_dir / sub).mkdir(parents=True)
    known = work / "known.parquet"
    hashes = pa.array([key_hash({"id": i}, ["id"]) for i in range(old)], pa.binary())
    pq.write_table(pa.table({"_key_hash": hashes}), known)
    del hashes
    con = duckdb.connect()
    stem = f"00000001-{uuid.uuid4().hex[:16]}"
    con.execute(
        f"""COPY (
            SELECT k._key_hash, unhex(md5(k._key_hash::VARCHAR))::BLOB AS _row_hash,
                   1::BIGINT AS _version
            FROM read_parquet('{known}') k
            UNION ALL
            SELECT unhex(md5('x' || i::VARCHAR))::BLOB, unhex(md5('r' || i::VARCHAR))::BLOB, 1
            FROM range({existing - old}) t(i)
        ) TO '{ds_dir}/index/{stem}.parquet' (FORMAT parquet)"""
    )
    con.execute(
        f"""COPY (
            SELECT i AS id, 'SYM' || (i % 500) AS symbol, DATE '2025-01-01' AS day,
                   1.0 AS open, 1.0 AS high, 1.0 AS low, 1.0 AS close, i AS volume,
                   'XLON' AS venue, NULL::VARCHAR AS note, _key_hash, _row_hash,
                   'setup' AS _response_id, now()::TIMESTAMPTZ AS _fetched_at
            FROM (SELECT row_number() OVER () - 1 AS i, * FROM
                  read_parquet('{ds_dir}/index/{stem}.parquet'))
        ) TO '{ds_dir}/parts/{stem}.parquet' (FORMAT parquet, COMPRESSION zstd)"""
    )
    manifest = {
        "format": 1, "dataset": "bars", "version": 1, "id": stem[9:], "parent": None,
        "created_at": datetime.now(UTC).isoformat(), "keys": ["id"],
        "columns": [*COLUMNS.split(","), "_key_hash", "_row_hash", "_response_id", "_fetched_at"],
        "rows": existing, "added": existing, "changed": 0,
        "parts": [{"path": f"parts/{stem}.parquet", "index": f"index/{stem}.parquet",
                   "rows": existing, "version": 1}],
    }  # fmt: skip
    (ds_dir / "manifests" / f"{stem}.json").write_text(json.dumps(manifest))
    pointer = {"version": 1, "manifest": f"manifests/{stem}.json", "id": stem[9:]}
    (ds_dir / "current").write_text(json.dumps(pointer))
    # For the engines' comparison: the rerun's candidate keys and the 10 M index.
    con.execute(
        f"""COPY (SELECT _key_hash FROM read_parquet('{known}')
                  UNION ALL SELECT unhex(md5('new' || i::VARCHAR))::BLOB FROM range({new}) t(i))
            TO '{work}/cand.parquet' (FORMAT parquet)"""
    )
    os.link(ds_dir / "index" / f"{stem}.parquet", work / "index.parquet")
    con.close()


def run_child(*args: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--trial", *args], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise SystemExit(f"trial {args} failed:\n{out.stderr}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def med(trials: list[dict[str, Any]], key: str) -> float:
    return round(float(statistics.median(t[key] for t in trials)), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--existing", type=int, default=10_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="100k rows, 1M keys, one trial")
    parser.add_argument("--trial", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trial:
        kind, work = args.trial[0], Path(args.trial[1])
        if kind == "ingest":
            print(json.dumps(trial_ingest(work)))
        elif kind == "rerun":
            print(json.dumps(trial_rerun(work)))
        else:
            print(json.dumps(trial_engine(work, args.trial[2])))
        return
    if args.quick:
        args.rows, args.existing, args.repeat = 100_000, 1_000_000, 1
    results: dict[str, Any] = {"machine": machine(), "rows": args.rows, "existing": args.existing}
    with tempfile.TemporaryDirectory(prefix="mxm-bench-ds-") as tmp:
        base = Path(tmp)
        ingest = []
        for n in range(args.repeat):
            work = base / f"ingest-{n}"
            setup_ingest(work, args.rows)
            ingest.append(run_child("ingest", str(work)))
            print("ingest", ingest[-1], flush=True)
        results["ingest"] = {
            "trials": ingest, "seconds": med(ingest, "seconds"), "rss_mib": med(ingest, "rss_mib"),
            "rows_per_s": round(args.rows / med(ingest, "seconds")),
        }  # fmt: skip
        rerun = []
        for n in range(args.repeat):
            work = base / f"rerun-{n}"
            setup_rerun(work, args.rows, args.existing)
            rerun.append(run_child("rerun", str(work)))
            print("rerun", rerun[-1], flush=True)
        results["rerun"] = {
            "trials": rerun,
            "stage_seconds": med(rerun, "stage_seconds"),
            "publish_seconds": med(rerun, "publish_seconds"),
            "rss_mib": med(rerun, "rss_mib"),
        }
        engines: dict[str, Any] = {}
        try:
            importlib.import_module("polars")
            names = ["duckdb", "polars"]
        except ImportError:
            names = ["duckdb"]
        for name in names:
            trials = [run_child("engine", str(base / "rerun-0"), name) for _ in range(args.repeat)]
            engines[name] = {"seconds": med(trials, "seconds"), "rss_mib": med(trials, "rss_mib")}
            print("engine", name, engines[name], flush=True)
        results["engines"] = engines
    name = "datasets-quick.json" if args.quick else "datasets.json"
    out = HERE / "results" / name
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k != "machine"}, indent=1))


if __name__ == "__main__":
    main()
