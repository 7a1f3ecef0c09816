"""A run's records: each answered request whose entry has ``parse:`` is decoded from the stored
bytes, validated (``validate:``; the outcome recorded in the store, linked to the response) and
staged for its ``dataset:``; when every source is done, each dataset gets one publish.

Parsing and validating run in a worker thread, reading the payload from the store chunk by chunk
(``store.iter_payload``), so the event loop keeps fetching while records are checked.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread

from mxm_dataio_async._models import Response
from mxm_dataio_async._store import Store
from mxm_dataio_async._store._validation import RecordError, ValidationOutcome
from mxm_dataio_async.jobs._config import JobConfig, RequestSpec
from mxm_dataio_async.jobs._errors import JobConfigError

__all__ = ["DatasetSummary", "RecordsOutcome", "RunDatasets", "resolve_datasets"]


@dataclass(frozen=True, slots=True)
class DatasetSummary:
    """One dataset's part of a run: records staged, the publish's result."""

    name: str
    location: str
    parsed: int = 0
    """Records parsed from the responses."""
    failed: int = 0
    """Records that failed validation (or a payload that failed to parse, counted as one)."""
    added: int = 0
    changed: int = 0
    version: int | None = None
    published: bool = False
    error: str | None = None
    """Why nothing was published (``on_error: fail``/``stop``), or None."""

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "location": self.location,
            "parsed": self.parsed,
            "failed": self.failed,
            "added": self.added,
            "changed": self.changed,
            "version": self.version,
            "published": self.published,
            "error": self.error,
        }


@dataclass(frozen=True, slots=True)
class RecordsOutcome:
    """What one response's records did: parsed, failed, and whether the source must stop."""

    parsed: int
    failed: int
    stop: bool = False
    error: str | None = None


def resolve_datasets(config: JobConfig, store_root: str | Path) -> str:
    """The job's ``datasets:`` (relative: from the job file's folder), else
    ``<store root>/datasets`` for a store in a folder."""
    if config.datasets is not None:
        where = config.resolve_location(config.datasets)
        return os.fspath(where)
    if isinstance(store_root, Path):
        return os.fspath(store_root / "datasets")
    raise JobConfigError(
        config.file,
        [("datasets", "the store is not a folder: say where datasets go (a folder or s3://)")],
    )


@dataclass(slots=True)
class _Target:
    name: str
    spec: RequestSpec
    dataset: Any  # datasets.Dataset
    staging: Any  # datasets.Staging
    lock: anyio.Lock = field(default_factory=anyio.Lock)
    parsed: int = 0
    failed: int = 0
    error: str | None = None


class RunDatasets:
    """The records side of one run (nothing to do when no entry has ``parse:``)."""

    def __init__(self, config: JobConfig, store: Store, store_root: str | Path) -> None:
        self._store = store
        self._entries: dict[int, RequestSpec] = {
            i: spec for i, spec in enumerate(config.requests) if spec.parse is not None
        }
        self._targets: dict[str, _Target] = {}
        self._plain: dict[int, _Target] = {}  # parse (and validate) without a dataset
        if not self._entries:
            self.location = ""
            return
        from mxm_dataio_async import datasets  # the datasets extra, only for jobs that parse

        self.location = resolve_datasets(config, store_root) if self._needs_location() else ""
        for i, spec in self._entries.items():
            model = (
                datasets.Validator(spec.validation.model).model
                if spec.validation is not None
                else None
            )
            if spec.dataset is None:
                self._plain[i] = _Target(f"requests[{i}]", spec, None, None)
                continue
            name = spec.dataset.name
            known = self._targets.get(name)
            if known is not None:
                assert known.spec.dataset is not None
                if known.spec.dataset.keys != spec.dataset.keys:
                    raise JobConfigError(
                        config.file,
                        [(f"requests[{i}].dataset.keys", f"dataset {name!r} has other keys")],
                    )
                continue
            ds = datasets.Dataset(
                self.location, name, keys=spec.dataset.keys,
                track_changes=spec.dataset.track_changes,
            )  # fmt: skip
            self._targets[name] = _Target(name, spec, ds, ds.stage(model))

    def _needs_location(self) -> bool:
        return any(spec.dataset is not None for spec in self._entries.values())

    def wants(self, entry: int) -> bool:
        return entry in self._entries

    def _target(self, entry: int) -> _Target:
        spec = self._entries[entry]
        if spec.dataset is None:
            return self._plain[entry]
        return self._targets[spec.dataset.name]

    async def take(self, entry: int, response: Response) -> RecordsOutcome:
        """Parse, validate and stage one OK response's records; records the validation
        outcome in the store (when the entry validates)."""
        from mxm_dataio_async import datasets

        spec = self._entries[entry]
        target = self._target(entry)
        assert spec.parse is not None
        options = spec.parse.model_dump()
        parse = datasets.ParseSpec(**options)
        validator = (
            datasets.Validator(
                spec.validation.model, spec.validation.on_error, spec.validation.max_errors
            )
            if spec.validation is not None
            else None
        )
        chunks = self._store.iter_payload(response)

        def work() -> tuple[int, int, int, list[RecordError]]:
            records = datasets.parse_records(_blocking(chunks), parse)
            tally = datasets.Validator.tally() if validator is not None else None
            parsed = 0

            def counted() -> Iterator[dict[str, Any]]:
                nonlocal parsed
                for r in records:
                    parsed += 1
                    yield r

            good = validator.validate(counted(), tally) if validator and tally else counted()
            errors: list[RecordError] = []
            failed = 0
            try:
                if target.staging is not None:
                    target.staging.add(
                        good, response_id=response.id, fetched_at=response.fetched_at
                    )
                else:
                    for _ in good:
                        pass
            except ValueError as exc:  # the payload itself did not parse
                failed += 1
                errors.append(RecordError(parsed, "", f"cannot parse the payload: {exc}"))
            ok = parsed
            if tally is not None:
                failed += tally.failed
                errors = [*tally.errors, *errors]
                ok = tally.ok
            return parsed, ok, failed, errors

        async with target.lock:  # one response at a time into a staging (and its spool file)
            parsed, ok, failed, errors = await anyio.to_thread.run_sync(work)
            target.parsed += parsed
            target.failed += failed
        if validator is not None:
            await self._store.record_validation(
                ValidationOutcome(
                    response.id,
                    validator.name,
                    ok=ok,
                    failed=failed,
                    errors=tuple(errors[: validator.max_errors]),
                    dataset=spec.dataset.name if spec.dataset is not None else None,
                )
            )
        policy = spec.validation.on_error if spec.validation is not None else "fail"
        unparsed = bool(errors) and errors[-1].path == "" and errors[-1].index == parsed
        if not failed or (policy == "skip" and not unparsed):
            return RecordsOutcome(parsed, failed)
        # A payload that does not parse is never skipped quietly: it fails the run (or stops).
        first = errors[0] if errors else None
        where = f"record {first.index} {first.path}: {first.message}" if first else "?"
        error = f"{failed} record(s) failed validation ({policy}); first: {where}"
        if target.error is None:
            target.error = error
        return RecordsOutcome(parsed, failed, stop=policy == "stop", error=error)

    async def publish(self) -> list[DatasetSummary]:
        """One publish per dataset (those whose records all passed their policy)."""
        out = []
        for t in self._targets.values():
            summary = DatasetSummary(t.name, self.location, t.parsed, t.failed, error=t.error)
            if t.error is None:
                result = await anyio.to_thread.run_sync(t.dataset.publish, t.staging)
                summary = DatasetSummary(
                    t.name, self.location, t.parsed, t.failed, result.added, result.changed,
                    result.version, result.published,
                )  # fmt: skip
            out.append(summary)
        return out

    def close(self) -> None:
        for t in self._targets.values():
            t.staging.close()


def _blocking(chunks: AsyncIterator[bytes]) -> Iterator[bytes]:
    """An async iterator read from a worker thread, chunk by chunk, through the event loop."""

    async def next_chunk() -> bytes:
        return await chunks.__anext__()

    while True:
        try:
            yield anyio.from_thread.run(next_chunk)
        except StopAsyncIteration:
            return
