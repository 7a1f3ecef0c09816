"""A worker of a run shared by many processes on many hosts (``mxm-dataio worker``).

Every worker runs the same loop against one PostgreSQL store (``_store/_work.py`` has the queue's
rules): join the run (its configuration must match), plan it once (under a lease; enqueueing is
idempotent anyway), then claim chunks of plan indices and fetch them until every chunk is done or
dead. Requests are built from their index (``JobPlan.at``), fetched through one ``AsyncSession``
per source, each fenced by its chunk's claim: a response and its index's done mark commit in one
transaction, or not at all once the claim is lost. A heartbeat extends the worker's leases and
cancels the chunks it lost. Requests already recorded are served from the store, exactly as a
single-machine run (``run_job``) does, so a chunk taken over from a dead worker re-fetches only
what that worker had in flight.

Workers fetch and record; they do not parse, validate or publish (``parse:``, ``validate:``,
``dataset:``). Their summary names those entries (``not_parsed``), and once the run is complete a
``run_job`` of the same job on the same store does it from the recorded responses, each a cache
hit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import anyio

from mxm_dataio_async._clock import SYSTEM_CLOCK, Clock
from mxm_dataio_async._exceptions import CacheMiss, ClaimLost, DataIOError, FetchError
from mxm_dataio_async._registry import Registry
from mxm_dataio_async._session import AsyncSession
from mxm_dataio_async._store import Store
from mxm_dataio_async._store._work import Claim, Mark, RunInfo, RunStatus, WorkQueue
from mxm_dataio_async.jobs._config import JobConfig
from mxm_dataio_async.jobs._errors import JobConfigError
from mxm_dataio_async.jobs._expand import JobPlan
from mxm_dataio_async.jobs._load import load_job
from mxm_dataio_async.jobs._run import (
    _concurrency,
    resolve_payloads,
    resolve_redis,
    resolve_root,
)
from mxm_dataio_async.jobs._sources import job_import_path, register_sources

if TYPE_CHECKING:
    from mxm_dataio_async._redis import RedisCoordination

__all__ = ["DEFAULT_CHUNK_SIZE", "WorkerSummary", "config_hash", "run_status", "run_worker"]

log = logging.getLogger("mxm_dataio_async.jobs")

#: Plan indices per chunk: the unit of claiming, leasing and retrying.
DEFAULT_CHUNK_SIZE: Final = 64
DEFAULT_MAX_ATTEMPTS: Final = 3
_MAX_ERRORS: Final = 20


@dataclass(frozen=True, slots=True)
class WorkerSummary:
    """What one worker did in a run, and whether the run is complete."""

    run_id: str
    job: str
    worker: str
    complete: bool
    """Every chunk of the run is done or dead (the worker stops only then, or when stopped)."""
    interrupted: bool
    chunks_done: int
    chunks_released: int
    """Chunks given back after a failure (to be retried, or dead)."""
    chunks_lost: int
    """Chunks whose claim expired or was taken over while this worker held them."""
    fetched: int
    from_cache: int
    failed: int
    elapsed: float
    dead_chunks: int = 0
    errors: tuple[str, ...] = ()
    not_parsed: tuple[str, ...] = ()
    """The job's entries with ``parse:`` (by dataset, else ``requests[i]``), whose records a worker
    does not parse, validate or publish: once the run is complete, ``run_job`` (``mxm-dataio
    run``) of the same job on the same store does it from the recorded responses."""

    def to_json(self) -> dict[str, Any]:
        return {
            "run": self.run_id,
            "job": self.job,
            "worker": self.worker,
            "complete": self.complete,
            "interrupted": self.interrupted,
            "chunks_done": self.chunks_done,
            "chunks_released": self.chunks_released,
            "chunks_lost": self.chunks_lost,
            "dead_chunks": self.dead_chunks,
            "fetched": self.fetched,
            "from_cache": self.from_cache,
            "failed": self.failed,
            "elapsed": round(self.elapsed, 6),
            "errors": list(self.errors),
            "not_parsed": list(self.not_parsed),
        }


@dataclass(slots=True)
class _Counts:
    chunks_done: int = 0
    chunks_released: int = 0
    chunks_lost: int = 0
    fetched: int = 0
    from_cache: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)


def config_hash(config: JobConfig, plan: JobPlan) -> str:
    """What makes two workers' plans the same: the job's name and requests, the day ``{today}``
    stands for, ``limit`` and ``only``. Sources' settings (limits, headers, tokens) may differ
    between hosts without changing which requests index ``i`` names."""
    spec = {
        "job": config.job,
        # Keys at their defaults are left out: a release that adds an optional key (parse:,
        # validate:, dataset: came so) does not change the hash of a run started before it.
        "requests": config.model_dump(mode="json", include={"requests"}, exclude_defaults=True)[
            "requests"
        ],
        "today": plan.today.isoformat(),
        "limit": plan.limit,
        "sources": list(plan.sources),
    }
    text = json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _not_parsed(config: JobConfig) -> tuple[str, ...]:
    """The entries whose records a worker leaves to a ``run_job`` after the run: each dataset
    once, and ``requests[i]`` for an entry that parses (and validates) without one."""
    names: dict[str, None] = {}
    for i, spec in enumerate(config.requests):
        if spec.parse is not None:
            names[spec.dataset.name if spec.dataset is not None else f"requests[{i}]"] = None
    return tuple(names)


def _worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


async def run_worker(
    job: str | os.PathLike[str] | JobConfig,
    *,
    store: str | os.PathLike[str] | None = None,
    payloads: str | os.PathLike[str] | None = None,
    redis: str | RedisCoordination | None = None,
    run: str | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    lease_ttl: float | None = None,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    limit: int | None = None,
    only: Sequence[str] | str | None = None,
    stop: anyio.Event | None = None,
    stop_reason: Callable[[], str] | None = None,
    clock: Clock | None = None,
) -> WorkerSummary:
    """Work on a run of ``job`` shared with any number of other workers, until it is complete.

    ``store`` is a ``postgresql://`` URL (default: the job's ``store:``, then
    ``$MXM_DATAIO_STORE``); ``payloads`` where large payloads go (``s3://...`` when workers run
    on several hosts). ``run`` names the run (default: the job's name): workers with the same run
    share it, and one whose job file plans other requests is refused (``RunMismatch``). A
    complete run stays complete: name a new run to fetch again. ``chunk_size`` plan indices are
    claimed at a time for ``lease_ttl`` seconds (default: the job's ``lease_ttl``), renewed every
    third of it; a chunk that fails ``max_attempts`` times is dead. ``redis`` (a ``redis://`` URL
    or a ``RedisCoordination``; default: the job's ``redis:``, else ``$MXM_DATAIO_REDIS``) makes
    each source's rate limit and ``Retry-After`` pauses global across every worker on that Redis,
    and coalesces identical requests in flight on different workers; without it limits are per
    process. Setting ``stop`` ends the worker early; its chunks are given back when their leases
    expire. Workers do not parse, validate or publish: ``not_parsed`` in the summary names the
    entries left to a ``run_job`` of the job on the same store once the run is complete.

    ```python
    summary = await run_worker("prices.yaml", store="postgresql://dataio@db/dataio")
    print(summary.complete, summary.fetched, summary.chunks_done)
    ```
    """
    config = job if isinstance(job, JobConfig) else load_job(job)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
        raise ValueError(f"max_attempts must be a positive int, got {max_attempts!r}")
    ttl = config.lease_ttl if lease_ttl is None else float(lease_ttl)
    if not ttl > 0:
        raise ValueError(f"lease_ttl must be > 0 seconds, got {lease_ttl!r}")
    plan = JobPlan(config, limit=limit, only=only)
    if skipped := _not_parsed(config):
        log.warning(
            "job %s: workers fetch and record, but do not parse, validate or publish (%s); once "
            "the run is complete, run the job on the same store (mxm-dataio run) to do it from "
            "the recorded responses",
            config.job,
            ", ".join(skipped),
        )
    worker = _Worker(
        config,
        plan,
        run_id=run or config.job,
        chunk_size=chunk_size,
        ttl=ttl,
        max_attempts=max_attempts,
        clock=SYSTEM_CLOCK if clock is None else clock,
    )
    coordination = resolve_redis(config, redis)
    try:
        with job_import_path(config.base_dir):
            async with Store(
                resolve_root(config, store),
                payloads=resolve_payloads(config, payloads),
                clock=worker.clock,
            ) as opened:
                registry = Registry(clock=worker.clock, redis=coordination)
                return await worker.run(opened, registry, stop, stop_reason)
    finally:
        if coordination is not None:  # the registry closed it, unless the run failed before
            await coordination.aclose()


async def run_status(
    store: Store, run_id: str, *, window: float = 10.0, ttl: float = 30.0
) -> RunStatus:
    """Where a run stands (chunks by state, indices done, workers, rates): ``mxm-dataio
    status``. A worker is alive if its heartbeat is younger than ``ttl`` seconds."""
    return await store.work.run_status(run_id, window=window, ttl=ttl)


class _Worker:
    def __init__(
        self,
        config: JobConfig,
        plan: JobPlan,
        *,
        run_id: str,
        chunk_size: int,
        ttl: float,
        max_attempts: int,
        clock: Clock,
    ) -> None:
        self.config = config
        self.plan = plan
        self.run_id = run_id
        self.chunk_size = chunk_size
        self.ttl = ttl
        self.max_attempts = max_attempts
        self.clock = clock
        self.name = _worker_name()
        self.counts = _Counts()
        # Chunks being worked on, by number: their cancel scopes (a lost claim cancels it).
        self.active: dict[int, anyio.CancelScope] = {}
        self.finished = anyio.Event()  # set when a chunk ends (a fresh one per wait)
        self.sessions: dict[str, AsyncSession] = {}
        self.gate = anyio.Semaphore(config.concurrency)
        self.source_gates = {
            name: anyio.Semaphore(_concurrency(config, name)) for name in plan.sources
        }

    @property
    def poll(self) -> float:
        """How often an idle worker looks for claimable chunks (an expired lease's, say)."""
        return min(1.0, self.ttl / 4)

    async def run(
        self,
        store: Store,
        registry: Registry,
        stop: anyio.Event | None,
        stop_reason: Callable[[], str] | None,
    ) -> WorkerSummary:
        started = time.perf_counter()
        work = store.work
        info = await work.open_run(
            self.run_id,
            job=self.config.job,
            config_hash=config_hash(self.config, self.plan),
            total=self.plan.total,
            chunk_size=self.chunk_size,
        )
        if not info.planned:
            await self._plan(store, work, info)
        await work.worker_seen(self.run_id, self.name, host=socket.gethostname(), pid=os.getpid())
        body = anyio.CancelScope()
        complete = False
        async with registry:
            await register_sources(registry, self.config, list(self.plan.sources))
            async with anyio.create_task_group() as background:
                background.start_soon(self._heartbeat, work)
                if stop is not None:
                    background.start_soon(self._watch, stop, stop_reason, body)
                try:
                    with body:
                        complete = await self._work(store, registry, work)
                finally:
                    background.cancel_scope.cancel()
        status = await work.run_status(self.run_id, ttl=self.ttl)
        if status.complete:
            await work.finish_run(self.run_id)
        c = self.counts
        return WorkerSummary(
            run_id=self.run_id,
            job=self.config.job,
            worker=self.name,
            complete=complete or status.complete,
            interrupted=body.cancelled_caught,
            chunks_done=c.chunks_done,
            chunks_released=c.chunks_released,
            chunks_lost=c.chunks_lost,
            fetched=c.fetched,
            from_cache=c.from_cache,
            failed=c.failed,
            elapsed=time.perf_counter() - started,
            dead_chunks=status.chunks.get("dead", 0),
            errors=tuple(c.errors),
            not_parsed=_not_parsed(self.config),
        )

    async def _plan(self, store: Store, work: WorkQueue, info: RunInfo) -> None:
        """Enqueue the run's chunks: under the run's planning lease, one planner at a time (the
        others wait for it; enqueueing is idempotent, so a planner that died half-way is simply
        followed by the next)."""
        async with store.lease(f"plan:{info.id}", ttl=self.ttl, wait=True, poll=self.poll):
            await work.enqueue(info.id)

    async def _watch(
        self,
        stop: anyio.Event,
        stop_reason: Callable[[], str] | None,
        body: anyio.CancelScope,
    ) -> None:
        await stop.wait()
        reason = "interrupted" if stop_reason is None else stop_reason()
        for session in self.sessions.values():
            session.interrupted = reason
        body.cancel()

    async def _heartbeat(self, work: WorkQueue) -> None:
        """Every third of the lease: say the worker lives, extend its claims, and cancel the
        chunks whose claims it lost (expired while it was paused, or taken over)."""
        host, pid = socket.gethostname(), os.getpid()
        while True:
            await self.clock.sleep(self.ttl / 3)
            before = dict(self.active)  # claimed before the extension: it must see them
            try:
                held = await work.extend(self.run_id, self.name, self.ttl, list(before))
                await work.worker_seen(self.run_id, self.name, host=host, pid=pid)
            except DataIOError:
                continue  # a store briefly away: the next beat tries again, leases permitting
            for chunk, scope in before.items():
                if chunk not in held:
                    scope.cancel()

    async def _work(self, store: Store, registry: Registry, work: WorkQueue) -> bool:
        """Claim and process chunks until the run is complete. Keeps enough chunks in progress
        that the job's concurrency stays busy across a chunk's tail."""
        depth = max(2, -(-self.config.concurrency // self.chunk_size) + 1)
        slots = anyio.Semaphore(depth)
        async with AsyncExitStack() as stack:
            for source in self.plan.sources:
                self.sessions[source] = await stack.enter_async_context(
                    AsyncSession(
                        source,
                        store=store,
                        registry=registry,
                        as_of=f"run:{self.run_id}",
                        stale_if_error=self.config.sources[source].stale_if_error,
                        http_freshness=self.config.sources[source].http_freshness,
                    )
                )
            async with anyio.create_task_group() as tg:
                while True:
                    await slots.acquire()
                    claims = await work.claim(
                        self.run_id,
                        self.name,
                        n=1,
                        ttl=self.ttl,
                        max_attempts=self.max_attempts,
                    )
                    if claims:
                        tg.start_soon(self._chunk, work, claims[0], slots)
                        continue
                    slots.release()
                    if not self.active:
                        status = await work.run_status(self.run_id, ttl=self.ttl)
                        if status.complete:
                            return True
                    # Nothing to claim now: look again when one of this worker's chunks ends
                    # (the run may then be complete) or after a poll (another's lease expired).
                    finished = self.finished = anyio.Event()
                    with self.clock.cancel_after(self.poll):
                        await finished.wait()
        return False  # pragma: no cover - the loop returns or is cancelled

    async def _chunk(self, work: WorkQueue, claim: Claim, slots: anyio.Semaphore) -> None:
        scope = anyio.CancelScope()
        self.active[claim.chunk] = scope
        state = _ChunkRun(scope)
        try:
            with scope:
                async with anyio.create_task_group() as tg:
                    for index in claim.indices:
                        await self.gate.acquire()
                        tg.start_soon(self._one, claim, index, state)
            if scope.cancelled_caught or state.lost:
                # The claim went away (the next holder redoes the chunk), or a request of this
                # chunk joined another chunk's fetch whose claim was lost: give it back then.
                self.counts.chunks_lost += 1
                with contextlib.suppress(ClaimLost):
                    await work.release(
                        claim, "a fetch it shared lost its claim", max_attempts=self.max_attempts
                    )
                return
            try:
                if state.failures:
                    first = state.failures[0]
                    error = f"{len(state.failures)} of {len(claim.indices)} failed: {first}"
                    await work.release(claim, error, max_attempts=self.max_attempts)
                    self.counts.chunks_released += 1
                else:
                    await work.complete(claim, state.marks)
                    self.counts.chunks_done += 1
            except ClaimLost:
                self.counts.chunks_lost += 1
        finally:
            del self.active[claim.chunk]
            slots.release()
            self.finished.set()

    async def _one(self, claim: Claim, index: int, state: _ChunkRun) -> None:
        """Fetch plan index ``index`` under ``claim``: a recorded answer marks the index done in
        its own transaction; a cache hit or a duplicate's answer is marked with the chunk."""
        try:
            planned = self.plan.at(index)
            source = planned.source
            session = self.sessions[source]
            try:
                request = planned.build(session)
            except (TypeError, ValueError) as exc:
                shown = {k: str(v) for k, v in planned.values.items()}
                raise JobConfigError(
                    self.config.file,
                    [(f"requests[{planned.entry}]", f"the request for {shown}: {exc}")],
                ) from exc
            async with self.source_gates[source]:
                try:
                    response = await session.fetch(request, fence=claim.fence(index, source))
                except ClaimLost:
                    state.lost = True
                    state.scope.cancel()  # nothing more can be recorded under this claim
                    return
                except (FetchError, CacheMiss) as exc:
                    self.counts.failed += 1
                    text = f"plan index {index}: {exc}"
                    state.failures.append(text)
                    if len(self.counts.errors) < _MAX_ERRORS:
                        self.counts.errors.append(text)
                    return
            if response.request_id == request.id and not response.from_cache:
                self.counts.fetched += 1  # recorded, and marked, under the claim
            else:
                self.counts.from_cache += 1
                state.marks.append(Mark(index, source, response.id))
        finally:
            self.gate.release()


@dataclass(slots=True)
class _ChunkRun:
    """One chunk in progress: its scope, what it will mark at completion, what failed."""

    scope: anyio.CancelScope
    marks: list[Mark] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    lost: bool = False
