"""The job file's shape: pydantic models (extra keys forbidden), ``${ENV}`` interpolation, and
the translation of pydantic's errors into ``(key path, problem)`` pairs."""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PlainValidator,
    PrivateAttr,
    Tag,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from mxm_dataio_async._durations import parse_duration
from mxm_dataio_async._models import CacheMode
from mxm_dataio_async.adapters.http import DEFAULT_TOTAL_TIMEOUT
from mxm_dataio_async.jobs._dates import Chunk, parse_chunk

__all__ = [
    "DatasetConfig",
    "DateRange",
    "FileSource",
    "HttpSource",
    "JobConfig",
    "ParseConfig",
    "PluginSource",
    "RateLimitSpec",
    "RedisSpec",
    "RequestSpec",
    "RetrySpec",
    "SourceSpec",
    "ValidateConfig",
    "check_redis_url",
    "interpolate_env",
    "key_path",
    "pydantic_problem",
    "today_utc",
]

DEFAULT_CONCURRENCY = 64
DEFAULT_LEASE_TTL = 30.0


def today_utc() -> date:
    return datetime.now(UTC).date()


# -- value types ---------------------------------------------------------------------------------


def _scalar(value: Any) -> str | int | float | bool | date:
    if isinstance(value, str | int | float | date):
        return value
    what = "a mapping" if isinstance(value, dict) else "a list" if isinstance(value, list) else None
    raise ValueError(
        "expansion values are strings, numbers, booleans or dates, not "
        f"{what or type(value).__name__}"
    )


def _date(value: Any) -> date:
    if isinstance(value, datetime):
        if value.timetz().replace(tzinfo=None) != time():
            raise ValueError(f"expected a date (YYYY-MM-DD), got the date-time {value}")
        return value.date()
    if isinstance(value, date):
        return value
    if isinstance(value, str):
        word = value.strip().lower()
        if word == "today":
            return today_utc()
        if word == "yesterday":
            return today_utc() - timedelta(days=1)
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", value.strip()):
            try:
                return date.fromisoformat(value.strip())
            except ValueError as exc:
                raise ValueError(f"invalid date {value!r}: {exc}") from None
    raise ValueError(f"expected a date as YYYY-MM-DD, 'today' or 'yesterday', got {value!r}")


def _ttl(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"ttl is seconds or a duration such as '6h', got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = parse_duration(value).total_seconds()
    else:
        raise ValueError(f"ttl is seconds or a duration such as '6h', got {value!r}")
    if not seconds >= 0:
        raise ValueError(f"ttl must be >= 0 seconds, got {value!r}")
    return seconds


def _chunk(value: Any) -> Chunk:
    return parse_chunk(value)


Scalar = Annotated[str | int | float | bool | date, PlainValidator(_scalar)]
DateValue = Annotated[date, PlainValidator(_date)]
ChunkValue = Annotated[Chunk, PlainValidator(_chunk)]
TtlValue = Annotated[float | None, PlainValidator(_ttl)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# -- sources -------------------------------------------------------------------------------------


class RateLimitSpec(_Model):
    """``rate`` requests per ``per`` seconds, ``burst`` at once after idle (``dio.RateLimit``)."""

    rate: float = Field(gt=0)
    per: float = Field(default=1.0, gt=0)
    burst: int = Field(default=1, ge=1)
    adaptive: bool = False
    """``rate`` is a ceiling: 429/503 answers lower it, successes raise it back (AIMD)."""


class BreakerSpec(_Model):
    """A circuit breaker (``dio.CircuitBreaker``): after ``failures`` consecutive transient
    failures the source fails fast for ``reset_after`` seconds, then one probe goes through."""

    failures: int = Field(default=5, ge=1)
    reset_after: float = Field(default=30.0, gt=0)


class RetrySpec(_Model):
    """Retries of transient failures (``dio.RetryPolicy``)."""

    max_attempts: int = Field(default=3, ge=1)
    base_delay: float = Field(default=0.1, ge=0)
    max_delay: float = Field(default=10.0, ge=0)
    multiplier: float = Field(default=2.0, ge=1)
    jitter: float = Field(default=0.1, ge=0)
    deadline: float | None = Field(default=None, gt=0)


class _SourceBase(_Model):
    adapter: str
    rate_limit: RateLimitSpec | None = None
    max_concurrency: int | None = Field(default=None, ge=1)
    retry: RetrySpec | None = None
    concurrency: int | None = Field(default=None, ge=1)
    breaker: BreakerSpec | None = None
    stale_if_error: float | bool | None = None
    """Seconds (or ``true``: any age) a stored answer may be old and still answer when the
    upstream fails (``AsyncSession(stale_if_error=...)``)."""
    http_freshness: bool = False
    """Without a TTL, stored answers are fresh as their ``Cache-Control``/``Expires`` say."""


class HttpSource(_SourceBase):
    """``adapter: http``: the keyword arguments of ``HttpAdapter``."""

    adapter: Literal["http"]
    base_url: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    timeout: float = Field(default=30.0, gt=0)
    max_body: int | None = Field(default=None, ge=0)
    redact: list[str] = Field(default_factory=list)
    redact_params: list[str] = Field(default_factory=list)
    connector_limit: int = Field(default=100, ge=0)
    total_timeout: float | None = Field(default=DEFAULT_TOTAL_TIMEOUT, gt=0)
    ssl: bool | str | None = None
    """``false`` (no verification) or a CA bundle's path (relative: from the job file)."""
    client_cert: str | tuple[str, str] | None = None
    """A PEM file with certificate and key, or ``[certificate, key]`` (paths as for ``ssl``)."""
    proxy: str | None = None
    trust_env: bool = False
    max_line_size: int = Field(default=8190, ge=1)
    max_field_size: int = Field(default=1 << 16, ge=1)
    max_headers: int = Field(default=128, ge=1)


class FileSource(_SourceBase):
    """``adapter: file``: files under ``root`` (relative paths: from the job file's folder)."""

    adapter: Literal["file"]
    root: str


class PluginSource(_SourceBase):
    """``adapter: pkg.module:factory``: the factory is called with the other keys."""

    model_config = ConfigDict(extra="allow", frozen=True)

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


def _source_tag(value: Any) -> str:
    if isinstance(value, dict) and value.get("adapter") in ("http", "file"):
        return str(value["adapter"])
    return "plugin"


SourceSpec = Annotated[
    Union[  # noqa: UP007 - tagged members of a discriminated union
        Annotated[HttpSource, Tag("http")],
        Annotated[FileSource, Tag("file")],
        Annotated[PluginSource, Tag("plugin")],
    ],
    Discriminator(_source_tag),
]

# -- requests ------------------------------------------------------------------------------------


class DateRange(_Model):
    """An expansion over dates: one request per chunk, with ``{start}`` and ``{end}``."""

    start: DateValue
    end: DateValue
    chunk: ChunkValue | None = None


def _expand_tag(value: Any) -> str:
    return "range" if isinstance(value, dict) else "values"


ExpandValue = Annotated[
    Union[  # noqa: UP007
        Annotated[DateRange, Tag("range")],
        Annotated[list[Scalar], Field(min_length=1), Tag("values")],
    ],
    Discriminator(_expand_tag),
]


class ParseConfig(_Model):
    """``parse:`` how a response's payload becomes records (``datasets.ParseSpec``)."""

    format: Literal["json", "ndjson", "csv", "xlsx"] | None = None
    parser: str | None = None
    """``pkg.module:function`` taking the payload's byte chunks, returning records."""
    path: str = ""
    encoding: str = "utf-8"
    delimiter: str = Field(default=",", min_length=1, max_length=1)
    quotechar: str = Field(default='"', min_length=1, max_length=1)
    escapechar: str | None = None
    doublequote: bool = True
    skip_rows: int = Field(default=0, ge=0)
    sheet: str | None = None
    header_row: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _one(self) -> ParseConfig:
        if (self.format is None) == (self.parser is None):
            raise ValueError("give format (json, ndjson, csv, xlsx) or parser, not both")
        return self


class ValidateConfig(_Model):
    """``validate:`` the pydantic model records must fit, and what a record that does not does."""

    model: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
    """``pkg.module:Model`` (the job file's folder is on the import path)."""
    on_error: Literal["skip", "fail", "stop"] = "skip"
    max_errors: int = Field(default=20, ge=0)
    """How many failures per response are kept with their record index and field path."""


class DatasetConfig(_Model):
    """``dataset:`` the dataset the records are published to, under the job's ``datasets:``."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    keys: list[str] = Field(min_length=1)
    track_changes: bool = False
    """Also append a new row for a known key whose values changed."""


class RequestSpec(_Model):
    """One entry of ``requests:``; ``expand`` turns it into many requests."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    source: str
    kind: str
    endpoint: str | None = None
    method: str = "GET"
    params: dict[str, Any] = Field(default_factory=dict)
    body: Any = None
    headers: dict[str, str] = Field(default_factory=dict)
    expand: dict[str, ExpandValue] = Field(default_factory=dict)
    cache_mode: CacheMode = CacheMode.DEFAULT
    ttl: TtlValue = None
    as_of_bucket: str | None = None
    cache_tag: str | None = None
    parse: ParseConfig | None = None
    validation: ValidateConfig | None = Field(default=None, alias="validate")
    dataset: DatasetConfig | None = None

    @model_validator(mode="after")
    def _records(self) -> RequestSpec:
        if self.parse is None and (self.validation is not None or self.dataset is not None):
            raise ValueError("validate and dataset need parse: (how the payload becomes records)")
        return self


# -- coordination ---------------------------------------------------------------------------------


class RedisSpec(_Model):
    """The Redis every run and worker of the job shares rate limits and in-flight requests
    through (``mxm_dataio_async.redis.RedisCoordination``). ``redis: redis://host:6379/0`` is
    short for ``redis: {url: redis://host:6379/0}``; without ``url`` (``redis: {prefix: p}``)
    the URL comes from ``--redis`` or ``$MXM_DATAIO_REDIS`` on each host."""

    url: str | None = None
    prefix: str = "default"
    """Processes with the same prefix share every source's budget (one per deployment)."""
    on_unavailable: Literal["fail", "local"] = "fail"
    local_share: float | None = Field(default=None, gt=0, le=1)
    timeout: float = Field(default=2.0, gt=0)
    coalesce: bool = True
    wait: float = Field(default=60.0, gt=0)
    flight_ttl: float = Field(default=60.0, gt=0)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None:
            check_redis_url(value)
        return value

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not value or any(c in value for c in ": \x00"):
            raise ValueError(f"prefix must be non-empty, without ':', space or NUL: {value!r}")
        return value

    @model_validator(mode="after")
    def _share(self) -> RedisSpec:
        if (self.on_unavailable == "local") != (self.local_share is not None):
            raise ValueError(
                "on_unavailable: local needs local_share (this process's part of each rate while "
                "Redis is down, e.g. 0.25 for four workers), and local_share needs it"
            )
        return self

    def options(self) -> dict[str, Any]:
        """Keyword arguments of ``RedisCoordination`` besides the URL."""
        return self.model_dump(exclude={"url"})


def check_redis_url(url: str) -> str:
    """``url`` if it names a Redis (``redis://``, ``rediss://`` or ``unix://``)."""
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"a Redis URL is redis://host:port/db (or rediss://, unix://): {url!r}")
    return url


def _redis(value: Any) -> Any:
    return {"url": value} if isinstance(value, str) else value


# -- the job -------------------------------------------------------------------------------------


class JobConfig(_Model):
    """A validated job file. Build one with ``load_job(path)`` or ``parse_job(text)``."""

    job: str
    store: str | None = None
    """A folder (relative to the job file's) or a ``postgresql://`` URL."""
    payloads: str | None = None
    """Where payloads above the inline threshold go: a folder or ``s3://bucket/prefix``."""
    redis: Annotated[RedisSpec | None, BeforeValidator(_redis)] = None
    """Share rate limits and in-flight requests with every process on this Redis."""
    sources: dict[str, SourceSpec] = Field(min_length=1)
    requests: list[RequestSpec] = Field(min_length=1)
    concurrency: int = Field(default=DEFAULT_CONCURRENCY, ge=1)
    lease_ttl: float = Field(default=DEFAULT_LEASE_TTL, gt=0)
    datasets: str | None = None
    """Where the requests' ``dataset:`` live: a folder (relative to the job file's) or
    ``s3://bucket/prefix``; default ``<store root>/datasets``."""

    _file: str = PrivateAttr(default="<config>")
    _base_dir: Path | None = PrivateAttr(default=None)

    @field_validator("job")
    @classmethod
    def _job_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.:-]*", value):
            raise ValueError(
                f"job names are letters, digits and _ . : - (starting with a letter or digit), "
                f"got {value!r}"
            )
        return value

    @field_validator("sources")
    @classmethod
    def _source_names(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name in value:
            if not name or "\x00" in name:
                raise ValueError(f"invalid source name {name!r}")
        return value

    @property
    def file(self) -> str:
        """Where this config came from (the job file's path, for messages)."""
        return self._file

    @property
    def base_dir(self) -> Path:
        """Relative paths in the job (``store``, a file source's ``root``) start here: the job
        file's folder, else the current directory."""
        return self._base_dir if self._base_dir is not None else Path.cwd()

    def resolve(self, path: str) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() else self.base_dir / p

    def resolve_location(self, where: str) -> str | Path:
        """A store or payloads location: a URL as it is, a folder resolved like a path."""
        return where if "://" in where else self.resolve(where)


# -- loading -------------------------------------------------------------------------------------


def key_path(loc: tuple[int | str, ...] | list[int | str]) -> str:
    """``("requests", 0, "expand", "dates", "chunk")`` -> ``requests[0].expand.dates.chunk``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


_ENV_RE = re.compile(r"\$(\$\{)|\$\{([^}]*)\}|\$\{")
_ENV_NAME = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?", re.DOTALL)


def _interpolate_text(text: str, env: Mapping[str, str]) -> str:
    def sub(match: re.Match[str]) -> str:
        if match.group(1) is not None:
            return "${"  # "$${" is a literal "${"
        inner = match.group(2)
        if inner is None:
            raise ValueError(f"unclosed '${{' in {text!r} (write $${{ for a literal ${{)")
        m = _ENV_NAME.fullmatch(inner)
        if m is None:
            raise ValueError(
                f"invalid ${{{inner}}} in {text!r}: use ${{NAME}} or ${{NAME:-default}} "
                "(write $${ for a literal ${)"
            )
        name, default = m.group(1), m.group(2)
        value = env.get(name)
        if value is None:
            if default is not None:
                return default
            raise ValueError(
                f"environment variable {name} is not set (referenced as ${{{name}}}; "
                f"set it, or give a default: ${{{name}:-value}})"
            )
        return value

    return _ENV_RE.sub(sub, text)


def interpolate_env(
    data: Any, env: Mapping[str, str], errors: list[tuple[str, str]], path: str = ""
) -> Any:
    """Replace ``${NAME}`` / ``${NAME:-default}`` in every string value (not keys)."""
    if isinstance(data, str):
        if "$" not in data:
            return data
        try:
            return _interpolate_text(data, env)
        except ValueError as exc:
            errors.append((path, str(exc)))
            return data
    if isinstance(data, dict):
        return {
            k: interpolate_env(v, env, errors, f"{path}.{k}" if path else str(k))
            for k, v in data.items()
        }
    if isinstance(data, list):
        return [interpolate_env(v, env, errors, f"{path}[{i}]") for i, v in enumerate(data)]
    return data


def _model_at(parent: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The model whose keys are allowed under ``parent`` (a pydantic loc, union tags included)."""
    match parent:
        case ():
            return JobConfig
        case ("sources", str(), "http"):
            return HttpSource
        case ("sources", str(), "file"):
            return FileSource
        case ("sources", str(), str(), "rate_limit"):
            return RateLimitSpec
        case ("sources", str(), str(), "retry"):
            return RetrySpec
        case ("sources", str(), str(), "breaker"):
            return BreakerSpec
        case ("requests", int()):
            return RequestSpec
        case ("requests", int(), "parse"):
            return ParseConfig
        case ("requests", int(), "validate"):
            return ValidateConfig
        case ("requests", int(), "dataset"):
            return DatasetConfig
        case ("requests", int(), "expand", str(), "range"):
            return DateRange
    return None


def _unknown_key(loc: tuple[int | str, ...]) -> str:
    key = str(loc[-1])
    model = _model_at(loc[:-1])
    if model is None:
        return f"unknown key {key!r}"
    allowed = list(model.model_fields)
    hint = difflib.get_close_matches(key, allowed, n=1)
    if hint:
        return f"unknown key {key!r}; did you mean {hint[0]!r}?"
    return f"unknown key {key!r}; allowed: {', '.join(allowed)}"


def pydantic_problem(err: ErrorDetails) -> tuple[str, str]:
    raw = tuple(err["loc"])
    loc = list(raw)
    # Drop the tags of discriminated unions: sources.<name>.<tag>..., expand.<key>.<tag>...
    if len(loc) > 2 and loc[0] == "sources" and loc[2] in ("http", "file", "plugin"):
        del loc[2]
    if (
        len(loc) > 4
        and loc[0] == "requests"
        and loc[2] == "expand"
        and loc[4] in ("range", "values")
    ):
        del loc[4]
    kind = err["type"]
    last = loc[-1] if loc else ""
    if kind == "extra_forbidden":
        problem = _unknown_key(raw)
    elif kind == "missing":
        problem = f"missing required key {last!r}"
    elif kind in ("value_error", "assertion_error"):
        problem = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    else:
        shown = repr(err["input"])
        if len(shown) > 60:
            shown = shown[:57] + "..."
        problem = f"{err['msg']}, got {shown}"
    if kind == "missing" and loc:
        loc = loc[:-1]  # the key path of the mapping that lacks it
    return key_path(loc), problem
