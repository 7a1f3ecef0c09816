"""Running a job: one ``AsyncSession`` per source on one shared Store and Registry, under the
job's lease, each session fed lazily through ``fetch_many``.

A job adds no fetching machinery of its own: caching, retries, limits and recording are the
session's. What it adds is the plan (``_expand``), the lease (one run of a job per store at a
time), a job-wide cap on requests in flight, and the counting.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import anyio

from mxm_dataio_async._clock import SYSTEM_CLOCK, Clock
from mxm_dataio_async._models import Request
from mxm_dataio_async._registry import Registry
from mxm_dataio_async._session import AsyncSession
from mxm_dataio_async._statistics import SourceStatistics
from mxm_dataio_async._store import Store
from mxm_dataio_async.jobs._config import JobConfig, check_redis_url
from mxm_dataio_async.jobs._datasets import DatasetSummary, RunDatasets
from mxm_dataio_async.jobs._errors import JobConfigError
from mxm_dataio_async.jobs._expand import JobPlan, PlannedRequest
from mxm_dataio_async.jobs._load import load_job
from mxm_dataio_async.jobs._sources import job_import_path, register_sources

if TYPE_CHECKING:
    from mxm_dataio_async._redis import RedisCoordination

__all__ = [
    "JobSummary",
    "SourceSummary",
    "resolve_payloads",
    "resolve_redis",
    "resolve_root",
    "run_job",
]

_MAX_ERRORS: Final = 20  # failures kept (as text) per source in the summary


@dataclass(frozen=True, slots=True)
class SourceSummary:
    """One source's counts in a run (also what ``on_progress`` receives, while it runs)."""

    source: str
    total: int | None
    """Requests planned for this source (None if unknown)."""
    fetched: int = 0
    """Answered by the upstream (and recorded)."""
    from_cache: int = 0
    """Answered from the store."""
    failed: int = 0
    session_id: str | None = None
    elapsed: float = 0.0
    errors: tuple[str, ...] = ()
    """The first failures, as text (at most 20)."""
    records_parsed: int = 0
    """Records parsed from this source's responses (requests with ``parse:``)."""
    records_failed: int = 0
    """Records that failed validation (or payloads that did not parse)."""
    statistics: SourceStatistics | None = field(default=None, compare=False)
    """The source's session while it runs (``session.statistics()``: retries, limiter wait,
    breaker state...); ``None`` before it starts."""

    @property
    def done(self) -> int:
        return self.fetched + self.from_cache + self.failed

    @property
    def ok(self) -> bool:
        return self.failed == 0 and (self.total is None or self.done == self.total)

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "total": self.total,
            "done": self.done,
            "fetched": self.fetched,
            "from_cache": self.from_cache,
            "failed": self.failed,
            "session_id": self.session_id,
            "elapsed": round(self.elapsed, 6),
            "errors": list(self.errors),
            "records_parsed": self.records_parsed,
            "records_failed": self.records_failed,
        }


@dataclass(frozen=True, slots=True)
class JobSummary:
    """The outcome of ``run_job``: counts per source, elapsed seconds, the sessions."""

    job: str
    root: str | Path
    sources: Mapping[str, SourceSummary]
    elapsed: float
    interrupted: bool = False
    """The run was stopped early (``stop`` was set)."""
    datasets: tuple[DatasetSummary, ...] = ()
    """What each ``dataset:`` got: records parsed, failed, added; the version published."""

    @property
    def records_parsed(self) -> int:
        return sum(s.records_parsed for s in self.sources.values())

    @property
    def records_failed(self) -> int:
        return sum(s.records_failed for s in self.sources.values())

    @property
    def records_added(self) -> int:
        return sum(d.added + d.changed for d in self.datasets)

    @property
    def session_ids(self) -> tuple[str, ...]:
        return tuple(s.session_id for s in self.sources.values() if s.session_id is not None)

    @property
    def total(self) -> int:
        return sum(s.total or 0 for s in self.sources.values())

    @property
    def fetched(self) -> int:
        return sum(s.fetched for s in self.sources.values())

    @property
    def from_cache(self) -> int:
        return sum(s.from_cache for s in self.sources.values())

    @property
    def failed(self) -> int:
        return sum(s.failed for s in self.sources.values())

    @property
    def done(self) -> int:
        return sum(s.done for s in self.sources.values())

    @property
    def ok(self) -> bool:
        """Every planned request ended OK (fetched or from cache), and every dataset's records
        passed their ``on_error`` policy."""
        return all(s.ok for s in self.sources.values()) and all(d.ok for d in self.datasets)

    def to_json(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "root": str(self.root),
            "elapsed": round(self.elapsed, 6),
            "ok": self.ok,
            "interrupted": self.interrupted,
            "total": self.total,
            "fetched": self.fetched,
            "from_cache": self.from_cache,
            "failed": self.failed,
            "session_ids": list(self.session_ids),
            "sources": {name: s.to_json() for name, s in self.sources.items()},
            "records_parsed": self.records_parsed,
            "records_failed": self.records_failed,
            "records_added": self.records_added,
            "datasets": [d.to_json() for d in self.datasets],
        }


ProgressCallback = Callable[[SourceSummary], None]


@dataclass(slots=True)
class _Counter:
    source: str
    total: int | None
    started: float = field(default_factory=time.perf_counter)
    ended: float | None = None
    fetched: int = 0
    from_cache: int = 0
    failed: int = 0
    session_id: str | None = None
    errors: list[str] = field(default_factory=list)
    records_parsed: int = 0
    records_failed: int = 0
    session: AsyncSession | None = None

    def snapshot(self) -> SourceSummary:
        return SourceSummary(
            source=self.source,
            total=self.total,
            fetched=self.fetched,
            from_cache=self.from_cache,
            failed=self.failed,
            session_id=self.session_id,
            elapsed=(self.ended or time.perf_counter()) - self.started,
            errors=tuple(self.errors),
            records_parsed=self.records_parsed,
            records_failed=self.records_failed,
            statistics=None if self.session is None else self.session.statistics(),
        )


def _describe(request: Request, error: BaseException) -> str:
    params = json.dumps(request.params, ensure_ascii=False, default=str) if request.params else ""
    what = " ".join(p for p in (request.kind, request.endpoint or "", params) if p)
    text = str(error).removeprefix(f"{request!r}: ")  # FetchError starts with the request
    return f"{what}: {text}"


def _built(
    planned: Iterator[PlannedRequest],
    session: AsyncSession,
    file: str,
    entries: dict[str, int] | None = None,
) -> Iterator[Request]:
    """The planned requests, built by ``session`` as ``fetch_many`` pulls them (``entries``
    remembers the ``requests:`` entry of those whose records are wanted)."""
    for p in planned:
        try:
            request = p.build(session)
        except (TypeError, ValueError) as exc:
            shown = {k: str(v) for k, v in p.values.items()}
            raise JobConfigError(
                file, [(f"requests[{p.entry}]", f"the request for {shown}: {exc}")]
            ) from exc
        if entries is not None:
            entries[request.id] = p.entry
        yield request


class _Gated:
    """Requests that each take one of the job's overall slots before ``fetch_many`` gets them
    (the slot is released when the request's outcome is consumed)."""

    def __init__(self, requests: Iterator[Request], gate: anyio.Semaphore) -> None:
        self._requests = requests
        self._gate = gate

    def __aiter__(self) -> _Gated:
        return self

    async def __anext__(self) -> Request:
        try:
            request = next(self._requests)
        except StopIteration:
            raise StopAsyncIteration from None
        await self._gate.acquire()
        return request


def _concurrency(config: JobConfig, source: str) -> int:
    own = config.sources[source].concurrency
    return min(own, config.concurrency) if own is not None else config.concurrency


def resolve_root(config: JobConfig, root: str | os.PathLike[str] | None = None) -> str | Path:
    """The store a run uses: ``root`` if given (a folder or a ``postgresql://`` URL), else the
    job's ``store`` (a folder relative to the job file's), else ``$MXM_DATAIO_STORE``, else
    ``$MXM_DATAIO_ROOT``, else ``./dataio``."""
    if root is not None:
        return _location(os.fspath(root))
    if config.store is not None:
        return config.resolve_location(config.store)
    env = os.environ.get("MXM_DATAIO_STORE") or os.environ.get("MXM_DATAIO_ROOT")
    return _location(env or "./dataio")


def resolve_payloads(
    config: JobConfig, payloads: str | os.PathLike[str] | None = None
) -> str | Path | None:
    """Where a run's large payloads go: ``payloads`` if given, else the job's ``payloads``, else
    ``$MXM_DATAIO_PAYLOADS``, else the store's own folder (None)."""
    if payloads is not None:
        return _location(os.fspath(payloads))
    if config.payloads is not None:
        return config.resolve_location(config.payloads)
    env = os.environ.get("MXM_DATAIO_PAYLOADS")
    return _location(env) if env else None


def resolve_redis(
    config: JobConfig, redis: str | RedisCoordination | None = None
) -> RedisCoordination | None:
    """The Redis a run shares limits and in-flight requests through: ``redis`` if given (a URL,
    which keeps the job's ``redis:`` options, or a ``RedisCoordination``), else the job's
    ``redis:``, else ``$MXM_DATAIO_REDIS``; ``None`` (limits per process) when none is set."""
    if redis is not None and not isinstance(redis, str):
        return redis
    spec = config.redis
    url = redis or (spec.url if spec is not None else None) or os.environ.get("MXM_DATAIO_REDIS")
    if not url:
        if spec is not None:
            raise JobConfigError(
                config.file,
                [("redis", "no url: give one here, or --redis, or set $MXM_DATAIO_REDIS")],
            )
        return None
    from mxm_dataio_async._redis import RedisCoordination  # the redis extra, only when asked

    options = spec.options() if spec is not None else {}
    return RedisCoordination(check_redis_url(url), **options)


def _location(text: str) -> str | Path:
    return text if "://" in text else Path(text)


async def run_job(
    job: str | os.PathLike[str] | JobConfig,
    *,
    root: str | os.PathLike[str] | None = None,
    payloads: str | os.PathLike[str] | None = None,
    redis: str | RedisCoordination | None = None,
    limit: int | None = None,
    only: Sequence[str] | str | None = None,
    wait: bool = False,
    on_progress: ProgressCallback | None = None,
    stop: anyio.Event | None = None,
    stop_reason: Callable[[], str] | None = None,
    clock: Clock | None = None,
    progress_every: float | None = None,
) -> JobSummary:
    """Run a job (a job file's path or a loaded ``JobConfig``) to the end; returns its summary.

    The job holds ``store.lease(job_name)`` while it runs: a second run of the same job on the
    same store raises ``LeaseHeld`` (or, with ``wait=True``, waits for the first to finish).
    Each source gets its own ``AsyncSession``; all share one Store and one Registry. At most
    ``concurrency`` requests (the job file's) are in flight across all sources, and at most a
    source's own ``concurrency`` in that source. Failed requests are counted, not raised:
    check ``summary.ok``. ``on_progress`` gets a ``SourceSummary`` for each source when it starts
    and after each finished request (and, with ``progress_every``, every that many seconds for
    each running source, so a stalled source still reports: an open breaker, a long cooldown).
    Setting ``stop`` ends the run early but cleanly (in-flight
    requests cancelled, sessions closed, lease released): the summary says ``interrupted``, and
    each session ends ``cancelled`` with ``stop_reason()`` as its error (default
    ``"interrupted"``; the CLI passes ``"interrupted (SIGINT)"`` and the like).
    ``clock`` (default: the system clock) drives the lease (expiry, heartbeat, polls), the retry
    waits and rate limits, and the recorded timestamps; tests pass a ``FakeClock``.
    ``redis`` (a ``redis://`` URL or a ``RedisCoordination``; default: the job's ``redis:``, else
    ``$MXM_DATAIO_REDIS``) makes the sources' rate limits and cooldowns global: shared with every
    other run and worker on that Redis and prefix.

    ```python
    summary = await run_job("prices.yaml", limit=100)
    print(summary.fetched, summary.from_cache, summary.failed, summary.ok)
    ```
    """
    config = job if isinstance(job, JobConfig) else load_job(job)
    plan = JobPlan(config, limit=limit, only=only)
    store_root = resolve_root(config, root)
    payloads_at = resolve_payloads(config, payloads)
    clock = SYSTEM_CLOCK if clock is None else clock
    coordination = resolve_redis(config, redis)
    # An adapter factory's module may sit next to the job file, and import more of its own
    # neighbours while the run goes on: the folder is on the import path for the whole run.
    try:
        with job_import_path(config.base_dir):
            return await _run(
                config,
                plan,
                store_root,
                payloads_at,
                wait,
                on_progress,
                stop,
                stop_reason,
                Registry(clock=clock, redis=coordination),
                progress_every,
            )
    finally:
        if coordination is not None:  # the registry closed it, unless the run failed before
            await coordination.aclose()


async def _run(
    config: JobConfig,
    plan: JobPlan,
    store_root: str | Path,
    payloads_at: str | Path | None,
    wait: bool,
    on_progress: ProgressCallback | None,
    stop: anyio.Event | None,
    stop_reason: Callable[[], str] | None,
    registry: Registry,
    progress_every: float | None = None,
) -> JobSummary:
    counters = {name: _Counter(name, plan.count(name)) for name in plan.sources}
    started = time.perf_counter()
    clock = registry.clock
    datasets: list[DatasetSummary] = []
    async with Store(store_root, payloads=payloads_at, clock=clock) as store:
        records = RunDatasets(config, store, store_root)
        # A stop cancels everything but the store (opened outside this scope), so the sessions
        # still record their end and the lease is released.
        body = anyio.CancelScope()
        failures: list[Exception] = []
        sessions: list[AsyncSession] = []

        async def watch(event: anyio.Event) -> None:
            await event.wait()
            reason = "interrupted" if stop_reason is None else stop_reason()
            for session in sessions:  # recorded as the reason each one ended
                session.interrupted = reason
            body.cancel()

        async def tick(every: float, report: ProgressCallback) -> None:
            while True:
                await anyio.sleep(every)  # wall time: a display's cadence, not the job's clock
                for counter in counters.values():
                    if counter.session is not None:
                        report(counter.snapshot())

        async with anyio.create_task_group() as watcher:
            if stop is not None:
                watcher.start_soon(watch, stop)
            if progress_every is not None and on_progress is not None:
                watcher.start_soon(tick, progress_every, on_progress)
            try:
                with body:
                    datasets = await _run_sources(
                        config, plan, store, registry, counters, sessions, wait, on_progress,
                        records,
                    )  # fmt: skip
            except Exception as exc:  # raised below, not wrapped in an ExceptionGroup
                failures.append(exc)
            finally:
                watcher.cancel_scope.cancel()
                records.close()
        if failures:
            raise failures[0]
    return JobSummary(
        job=config.job,
        root=store_root,
        sources={name: c.snapshot() for name, c in counters.items()},
        elapsed=time.perf_counter() - started,
        interrupted=body.cancelled_caught,
        datasets=tuple(datasets),
    )


async def _run_sources(
    config: JobConfig,
    plan: JobPlan,
    store: Store,
    registry: Registry,
    counters: dict[str, _Counter],
    sessions: list[AsyncSession],
    wait: bool,
    on_progress: ProgressCallback | None,
    records: RunDatasets,
) -> list[DatasetSummary]:
    """Under the job's lease: one session per source, all at once (each added to
    ``sessions`` while it is open); then one publish per dataset the requests feed."""
    poll = min(1.0, config.lease_ttl / 3)
    async with (
        store.lease(config.job, ttl=config.lease_ttl, wait=wait, poll=poll),
        registry,
    ):
        await register_sources(registry, config, list(plan.sources))
        gate = anyio.Semaphore(config.concurrency)
        # Sources whose own limits add up to at most the job's need no job-wide gate (a plain
        # iterator feeds fetch_many faster than an async one).
        gated = sum(_concurrency(config, n) for n in plan.sources) > config.concurrency
        failures: list[Exception] = []

        async def run_source(name: str) -> None:
            counter = counters[name]
            counter.started = time.perf_counter()
            async with AsyncSession(
                name,
                store=store,
                registry=registry,
                as_of=f"job:{config.job}",
                stale_if_error=config.sources[name].stale_if_error,
                http_freshness=config.sources[name].http_freshness,
            ) as session:
                sessions.append(session)
                counter.session = session
                counter.session_id = session.session.id
                if on_progress is not None:
                    on_progress(counter.snapshot())
                entries: dict[str, int] = {}
                requests = _built(plan.for_source(name), session, config.file, entries)
                feed = _Gated(requests, gate) if gated else requests
                concurrency = _concurrency(config, name)
                async for outcome in session.fetch_many(feed, concurrency=concurrency):
                    if gated:
                        gate.release()
                    if outcome.error is not None:
                        counter.failed += 1
                        if len(counter.errors) < _MAX_ERRORS:
                            counter.errors.append(_describe(outcome.request, outcome.error))
                    elif outcome.response is not None and outcome.response.from_cache:
                        counter.from_cache += 1
                    else:
                        counter.fetched += 1
                    entry = entries.pop(outcome.request.id, None)
                    taken = None
                    if entry is not None and outcome.ok and records.wants(entry):
                        assert outcome.response is not None
                        taken = await records.take(entry, outcome.response)
                        counter.records_parsed += taken.parsed
                        counter.records_failed += taken.failed
                        if taken.error is not None and len(counter.errors) < _MAX_ERRORS:
                            counter.errors.append(
                                _describe(outcome.request, ValueError(taken.error))
                            )
                    if on_progress is not None:
                        on_progress(counter.snapshot())
                    if taken is not None and taken.stop:
                        break  # on_error: stop ends this source's requests
            counter.ended = time.perf_counter()

        async def guarded(name: str, scope: anyio.CancelScope) -> None:
            try:
                await run_source(name)
            except Exception as exc:  # one source failing for good stops the job, unwrapped
                failures.append(exc)
                scope.cancel()

        async with anyio.create_task_group() as tg:
            for name in plan.sources:
                tg.start_soon(guarded, name, tg.cancel_scope)
        if failures:
            raise failures[0]
        return await records.publish()
