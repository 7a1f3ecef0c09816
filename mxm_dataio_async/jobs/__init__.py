"""Config-first ingestion jobs: a YAML file of sources and requests, run through ``fetch_many``.

Needs the ``jobs`` extra (pydantic, PyYAML). See the README's "Jobs" section for the file format.

```python
from mxm_dataio_async.jobs import load_job, run_job

summary = await run_job("prices.yaml")          # or run_job(load_job("prices.yaml"), limit=10)
print(summary.fetched, summary.from_cache, summary.failed, summary.ok)
```
"""

try:
    import pydantic  # noqa: F401
    import yaml  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "mxm_dataio_async.jobs needs the 'jobs' extra: pip install 'mxm-dataio-async[jobs]'"
    ) from exc

from mxm_dataio_async.jobs._config import JobConfig
from mxm_dataio_async.jobs._datasets import DatasetSummary
from mxm_dataio_async.jobs._dates import Chunk, count_chunks, date_chunks, parse_chunk
from mxm_dataio_async.jobs._errors import JobConfigError
from mxm_dataio_async.jobs._expand import JobPlan, PlannedRequest
from mxm_dataio_async.jobs._load import job_from_data, load_job, parse_job
from mxm_dataio_async.jobs._run import (
    JobSummary,
    SourceSummary,
    resolve_payloads,
    resolve_redis,
    resolve_root,
    run_job,
)
from mxm_dataio_async.jobs._worker import WorkerSummary, config_hash, run_status, run_worker

__all__ = [
    "Chunk",
    "DatasetSummary",
    "JobConfig",
    "JobConfigError",
    "JobPlan",
    "JobSummary",
    "PlannedRequest",
    "SourceSummary",
    "WorkerSummary",
    "config_hash",
    "count_chunks",
    "date_chunks",
    "job_from_data",
    "load_job",
    "parse_chunk",
    "parse_job",
    "resolve_payloads",
    "resolve_redis",
    "resolve_root",
    "run_job",
    "run_status",
    "run_worker",
]
