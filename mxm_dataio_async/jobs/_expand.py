"""From a job config to requests: checked once, then expanded lazily.

Each ``requests[i]`` entry is compiled (templates parsed, placeholders checked) into an ``_Entry``
whose expansion is the cartesian product of its ``expand`` axes, in the order written, the last
axis varying fastest. Axes are re-iterable and sized without iterating (a date range's chunk count
is arithmetic), so ``JobPlan.total`` is a product of lengths and iterating a 10-million-request
plan holds one combination at a time.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from typing import TYPE_CHECKING, Any, Final

from mxm_dataio_async._models import CacheMode, Request
from mxm_dataio_async._redact import Redaction
from mxm_dataio_async._request import build_request
from mxm_dataio_async.jobs._config import DateRange, JobConfig, RequestSpec, today_utc
from mxm_dataio_async.jobs._dates import Chunk, count_chunks, date_chunks, nth_chunk
from mxm_dataio_async.jobs._errors import JobConfigError
from mxm_dataio_async.jobs._sources import check_source
from mxm_dataio_async.jobs._template import Template, TemplateTree, compile_text, compile_tree

if TYPE_CHECKING:
    from mxm_dataio_async._session import AsyncSession

__all__ = ["BUILTINS", "CompiledJob", "JobPlan", "PlannedRequest", "compile_job", "job_problems"]

#: Placeholders every request may use: the run's UTC date and the job's name.
BUILTINS: Final = ("job", "today")
_RANGE_NAMES: Final = ("start", "end")


@dataclass(frozen=True, slots=True)
class PlannedRequest:
    """One request a job will make, before a session builds it (``build(session)``)."""

    source: str
    kind: str
    method: str
    endpoint: str | None
    params: dict[str, Any]
    body: Any
    headers: Mapping[str, str]
    as_of_bucket: str | None
    cache_tag: str | None
    ttl: float | None
    cache_mode: CacheMode
    entry: int
    """Index of the ``requests:`` entry it expands."""
    values: Mapping[str, object]
    """The placeholder values it was rendered with."""

    def build(self, session: AsyncSession) -> Request:
        """The Request, built (validated, identity computed) by ``session``."""
        return session.request(
            self.kind,
            endpoint=self.endpoint,
            params=self.params,
            method=self.method,
            body=self.body,
            headers=self.headers or None,
            as_of_bucket=self.as_of_bucket,
            cache_tag=self.cache_tag,
            ttl=self.ttl,
            cache_mode=self.cache_mode,
        )

    def to_json(self, redaction: Redaction | None = None) -> dict[str, Any]:
        """A JSON-ready description (secret headers and params redacted)."""
        red = redaction or Redaction()
        params = {
            k: ("[REDACTED]" if red.is_secret_param(k) else v) for k, v in self.params.items()
        }
        return {
            "source": self.source,
            "kind": self.kind,
            "method": self.method,
            "endpoint": self.endpoint,
            "params": params,
            "body": self.body,
            "headers": dict(red.headers_of(self.headers) or {}),
            "as_of_bucket": self.as_of_bucket,
            "cache_tag": self.cache_tag,
            "cache_mode": self.cache_mode.value,
            "ttl": self.ttl,
        }


# -- axes ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _ValuesAxis:
    names: tuple[str]
    items: tuple[tuple[object], ...]

    def __iter__(self) -> Iterator[tuple[object, ...]]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int) -> tuple[object, ...]:
        return self.items[k]


@dataclass(frozen=True, slots=True)
class _DatesAxis:
    start: date
    end: date
    chunk: Chunk | None
    names: tuple[str, str] = _RANGE_NAMES

    def __iter__(self) -> Iterator[tuple[object, ...]]:
        if self.chunk is None:
            return iter([(self.start, self.end)])
        return date_chunks(self.start, self.end, self.chunk)

    def __len__(self) -> int:
        return 1 if self.chunk is None else count_chunks(self.start, self.end, self.chunk)

    def __getitem__(self, k: int) -> tuple[object, ...]:
        if self.chunk is None:
            if k != 0:
                raise IndexError(k)
            return (self.start, self.end)
        return nth_chunk(self.start, self.end, self.chunk, k)


_Axis = _ValuesAxis | _DatesAxis


def _product(axes: Sequence[_Axis]) -> Iterator[tuple[tuple[object, ...], ...]]:
    """The cartesian product of re-iterable, non-empty axes, last fastest, one item at a time
    (``itertools.product`` would first copy every axis, a long date range included)."""
    iters = [iter(axis) for axis in axes]
    current = [next(it) for it in iters]
    while True:
        yield tuple(current)
        i = len(axes) - 1
        while i >= 0:
            try:
                current[i] = next(iters[i])
                break
            except StopIteration:
                iters[i] = iter(axes[i])
                current[i] = next(iters[i])
                i -= 1
        if i < 0:
            return


# -- entries -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Entry:
    index: int
    spec: RequestSpec
    axes: tuple[_Axis, ...]
    base: Mapping[str, object]
    endpoint: Template | None
    params: TemplateTree
    body: TemplateTree
    bucket: Template | None
    tag: Template | None

    @property
    def source(self) -> str:
        return self.spec.source

    def count(self) -> int:
        n = 1
        for axis in self.axes:
            n *= len(axis)
        return n

    def __iter__(self) -> Iterator[PlannedRequest]:
        for combo in _product(self.axes) if self.axes else iter([()]):
            yield self._planned(combo)

    def at(self, i: int) -> PlannedRequest:
        """The ``i``-th request of the expansion (as iteration would give it), computed
        directly: ``i`` is read as a mixed-radix number whose last digit is the last axis."""
        if not 0 <= i < self.count():
            raise IndexError(f"request {i} of requests[{self.index}], which has {self.count()}")
        combo: list[tuple[object, ...]] = []
        for axis in reversed(self.axes):
            i, k = divmod(i, len(axis))
            combo.append(axis[k])
        return self._planned(tuple(reversed(combo)))

    def _planned(self, combo: tuple[tuple[object, ...], ...]) -> PlannedRequest:
        spec = self.spec
        values = dict(self.base)
        for axis, item in zip(self.axes, combo, strict=True):
            values.update(zip(axis.names, item, strict=True))
        return PlannedRequest(
            source=spec.source,
            kind=spec.kind,
            method=spec.method,
            endpoint=None if self.endpoint is None else self.endpoint.render(values),
            params=self.params.render(values),
            body=self.body.render(values),
            headers=spec.headers,
            as_of_bucket=None if self.bucket is None else self.bucket.render(values),
            cache_tag=None if self.tag is None else self.tag.render(values),
            ttl=spec.ttl,
            cache_mode=spec.cache_mode,
            entry=self.index,
            values=values,
        )


def _compile_entry(
    i: int, spec: RequestSpec, config: JobConfig, today: date, errors: list[tuple[str, str]]
) -> _Entry | None:
    where = f"requests[{i}]"
    before = len(errors)
    if spec.source not in config.sources:
        defined = ", ".join(config.sources)
        errors.append((f"{where}.source", f"unknown source {spec.source!r}; defined: {defined}"))
    base: dict[str, object] = {"job": config.job, "today": today}
    samples: dict[str, list[object]] = {"job": [config.job], "today": [today]}
    axes: list[_Axis] = []
    ranges = [key for key, value in spec.expand.items() if isinstance(value, DateRange)]
    for key, value in spec.expand.items():
        at = f"{where}.expand.{key}"
        if isinstance(value, DateRange):
            samples["start"] = [value.start]
            samples["end"] = [value.end]
            if len(ranges) > 1:
                errors.append((at, f"one date range per request, found {len(ranges)}: {ranges}"))
            elif value.end < value.start:
                errors.append((f"{at}.end", f"end {value.end} is before start {value.start}"))
            else:
                axes.append(_DatesAxis(value.start, value.end, value.chunk))
            continue
        if not key.isidentifier():
            errors.append(
                (at, f"expansion names are plain names (letters, digits, _), not {key!r}")
            )
            continue
        if key in BUILTINS or (ranges and key in _RANGE_NAMES):
            errors.append((at, f"{key!r} is a built-in placeholder; choose another name"))
            continue
        axes.append(_ValuesAxis((key,), tuple((v,) for v in value)))
        samples[key] = list(value)
    endpoint = None
    if spec.endpoint is not None:
        endpoint = compile_text(spec.endpoint, f"{where}.endpoint", samples, errors)
    bucket = tag = None
    if spec.as_of_bucket is not None:
        bucket = compile_text(spec.as_of_bucket, f"{where}.as_of_bucket", samples, errors)
    if spec.cache_tag is not None:
        tag = compile_text(spec.cache_tag, f"{where}.cache_tag", samples, errors)
    params = compile_tree(spec.params, f"{where}.params", samples, errors)
    body = compile_tree(spec.body, f"{where}.body", samples, errors)
    used = params.names | body.names
    for tpl in (endpoint, bucket, tag):
        if tpl is not None:
            used |= tpl.names
    for key, value in spec.expand.items():
        names = _RANGE_NAMES if isinstance(value, DateRange) else (key,)
        if not used & set(names):
            shown = "{start} nor {end}" if isinstance(value, DateRange) else f"{{{key}}}"
            errors.append(
                (
                    f"{where}.expand.{key}",
                    f"never used: neither endpoint, params, body, as_of_bucket nor cache_tag "
                    f"mentions {shown}, so every request it expands to would be the same",
                )
            )
    if len(errors) > before:
        return None
    assert endpoint is not None or spec.endpoint is None
    entry = _Entry(i, spec, tuple(axes), base, endpoint, params, body, bucket, tag)
    try:
        first = next(iter(entry))
        build_request(
            session_id="plan",
            source=first.source,
            kind=first.kind,
            endpoint=first.endpoint,
            params=first.params,
            method=first.method,
            body=first.body,
            headers=first.headers,
            as_of_bucket=first.as_of_bucket,
            cache_tag=first.cache_tag,
            ttl=first.ttl,
            cache_mode=first.cache_mode,
        )
    except (TypeError, ValueError) as exc:
        errors.append((where, f"its first request is invalid: {exc}"))
        return None
    return entry


@dataclass(frozen=True, slots=True)
class CompiledJob:
    config: JobConfig
    entries: tuple[_Entry, ...]
    today: date


def job_problems(
    config: JobConfig, *, today: date | None = None
) -> tuple[list[tuple[str, str]], CompiledJob]:
    """Check what pydantic cannot (the meaning) and compile every entry: ``(problems, job)``,
    the job holding only the entries without problems."""
    day = today if today is not None else today_utc()
    errors: list[tuple[str, str]] = []
    for name, spec in config.sources.items():
        errors.extend(check_source(name, spec, config))
    entries = [
        _compile_entry(i, spec, config, day, errors) for i, spec in enumerate(config.requests)
    ]
    return errors, CompiledJob(config, tuple(e for e in entries if e is not None), day)


def compile_job(config: JobConfig, *, today: date | None = None) -> CompiledJob:
    """Check what pydantic cannot (the meaning) and compile every entry; ``JobConfigError``."""
    errors, compiled = job_problems(config, today=today)
    if errors:
        raise JobConfigError(config.file, errors)
    return compiled


class JobPlan:
    """What a job will request, lazily: ``total`` is computed, requests are made on demand.

    ``limit`` keeps the first ``limit`` requests in file order (``requests[0]``'s expansion
    first); ``only`` keeps the requests of those sources.

    ```python
    plan = JobPlan(load_job("job.yaml"))
    print(plan.total, [r.endpoint for r in itertools.islice(plan, 5)])
    ```
    """

    def __init__(
        self,
        config: JobConfig,
        *,
        limit: int | None = None,
        only: Sequence[str] | str | None = None,
        today: date | None = None,
    ) -> None:
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)):
            raise TypeError(f"limit must be an int or None, got {limit!r}")
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        wanted = [only] if isinstance(only, str) else None if only is None else list(only)
        if wanted is not None:
            unknown = [name for name in wanted if name not in config.sources]
            if unknown:
                defined = ", ".join(config.sources)
                problem = f"not a source of this job; defined: {defined}"
                raise JobConfigError(config.file, [(f"--only {', '.join(unknown)}", problem)])
        compiled = compile_job(config, today=today)
        self.config = config
        self.today = compiled.today
        self.limit = limit
        remaining = limit
        kept: list[tuple[_Entry, int, int]] = []
        for entry in compiled.entries:
            if wanted is not None and entry.source not in wanted:
                continue
            n = entry.count()
            take = n if remaining is None else min(n, remaining)
            if remaining is not None:
                remaining -= take
            if take:
                kept.append((entry, take, n))
        self._entries = tuple(kept)
        self.sources: tuple[str, ...] = tuple(dict.fromkeys(e.source for e, _, _ in kept))
        """The sources with at least one request, in the order they first appear."""

    @property
    def total(self) -> int:
        """How many requests the plan holds (computed, not counted)."""
        return sum(take for _, take, _ in self._entries)

    def count(self, source: str) -> int:
        """How many requests of ``source`` the plan holds."""
        return sum(take for e, take, _ in self._entries if e.source == source)

    def __iter__(self) -> Iterator[PlannedRequest]:
        return self._iter(None)

    def for_source(self, source: str) -> Iterator[PlannedRequest]:
        """The plan's requests of one source, in order (lazily)."""
        return self._iter(source)

    def at(self, index: int) -> PlannedRequest:
        """The plan's request number ``index`` (0-based, in the plan's order), computed without
        iterating what comes before it: workers sharing a run address requests by index."""
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"a plan index is an int, got {index!r}")
        if index >= 0:
            for entry, take, _ in self._entries:
                if index < take:
                    return entry.at(index)
                index -= take
        raise IndexError(f"plan index out of range (the plan has {self.total} requests)")

    def _iter(self, source: str | None) -> Iterator[PlannedRequest]:
        for entry, take, n in self._entries:
            if source is None or entry.source == source:
                yield from entry if take == n else itertools.islice(entry, take)
