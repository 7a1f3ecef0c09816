"""Recorded bytes into validated, incremental datasets.

Parse a payload into records (``parse_records`` with a ``ParseSpec``: JSON, NDJSON, CSV, XLSX or
your own parser), validate them into a pydantic model (``Validator``; each response's
``ValidationOutcome`` is kept in the store), stage them with their provenance and publish the new
ones to a ``Dataset`` (Parquet parts, a manifest per version and a ``current`` pointer swapped by
compare-and-swap), on a local folder or S3. Needs the ``datasets`` extra (DuckDB, pyarrow)::

    files = Dataset("./dataio/datasets", "bars").files()
    duckdb.sql(f"SELECT * FROM read_parquet({files})")
"""

from mxm_dataio_async._public import claim as _claim
from mxm_dataio_async._store._validation import RecordError, ValidationOutcome, ValidationTotals
from mxm_dataio_async.datasets._dataset import (
    Dataset,
    PublishConflict,
    PublishResult,
    Version,
    list_datasets,
)
from mxm_dataio_async.datasets._parse import ParseSpec, parse_records
from mxm_dataio_async.datasets._staging import Staging, key_hash, row_hash
from mxm_dataio_async.datasets._validate import RecordsInvalid, Validator

__all__ = [
    "Dataset",
    "ParseSpec",
    "PublishConflict",
    "PublishResult",
    "RecordError",
    "RecordsInvalid",
    "Staging",
    "ValidationOutcome",
    "ValidationTotals",
    "Validator",
    "Version",
    "key_hash",
    "list_datasets",
    "parse_records",
    "row_hash",
]

_claim(__name__, __all__, globals())
