"""A job's sources: adapters built from their config, with limits and retries."""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

from mxm_dataio_async._breaker import CircuitBreaker
from mxm_dataio_async._limits import RateLimit
from mxm_dataio_async._registry import Registry
from mxm_dataio_async._retry import RetryPolicy
from mxm_dataio_async.adapters.files import FileAdapter
from mxm_dataio_async.adapters.http import HttpAdapter
from mxm_dataio_async.jobs._config import (
    BreakerSpec,
    FileSource,
    HttpSource,
    JobConfig,
    PluginSource,
    RateLimitSpec,
    RetrySpec,
    SourceSpec,
)

__all__ = [
    "build_adapter",
    "check_source",
    "job_import_path",
    "register_sources",
    "resolve_factory",
]

_path_lock = threading.Lock()
_path_users: dict[str, int] = {}


@contextlib.contextmanager
def job_import_path(folder: str | os.PathLike[str]) -> Iterator[None]:
    """While the block runs, ``folder`` (a job file's) is on ``sys.path``, so that an adapter
    factory in a module next to the job file imports (``cd jobdir && mxm-dataio run job.yaml``:
    a console script does not put the current directory on the path).

    It is appended, after the installed packages and the standard library, so a file in the
    job's folder never shadows them; and removed again when the last user leaves (runs may
    overlap). A folder that was on the path already is left alone.
    """
    entry = os.fspath(folder)
    with _path_lock:
        owned = entry in _path_users or entry not in sys.path
        if owned:
            if entry not in _path_users:
                sys.path.append(entry)
                importlib.invalidate_caches()
            _path_users[entry] = _path_users.get(entry, 0) + 1
    try:
        yield
    finally:
        if owned:
            with _path_lock:
                _path_users[entry] -= 1
                if not _path_users[entry]:
                    del _path_users[entry]
                    with contextlib.suppress(ValueError):
                        sys.path.remove(entry)


def resolve_factory(path: str, folder: str | os.PathLike[str] | None = None) -> Callable[..., Any]:
    """``"pkg.mod:factory"`` or ``"pkg.mod.factory"`` -> the callable; ``ValueError`` if not.

    ``folder`` (the job file's) is searched too, after the installed packages."""
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(
            f"unknown adapter {path!r}: use http, file, or an adapter factory such as "
            "'pkg.module:factory'"
        )
    try:
        if folder is None:
            module = importlib.import_module(module_name)
        else:
            with job_import_path(folder):
                module = importlib.import_module(module_name)
    except ImportError as exc:
        where = "" if folder is None else f" and in the job file's folder ({os.fspath(folder)})"
        raise ValueError(
            f"adapter {path!r}: cannot import {module_name!r} ({exc}); looked for among the "
            f"installed packages, on PYTHONPATH{where}: install it, put it next to the job "
            "file, or add its folder to PYTHONPATH"
        ) from None
    target: Any = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ValueError(f"adapter {path!r}: {module_name!r} has no {attr!r}") from None
    if not callable(target):
        raise ValueError(f"adapter {path!r} is not callable (an adapter factory or class)")
    return target  # type: ignore[no-any-return]


def _rate_limit(spec: RateLimitSpec | None) -> RateLimit | None:
    if spec is None:
        return None
    return RateLimit(spec.rate, per=spec.per, burst=spec.burst, adaptive=spec.adaptive)


def _breaker(spec: BreakerSpec | None) -> CircuitBreaker | None:
    return None if spec is None else CircuitBreaker(spec.failures, spec.reset_after)


def _retry(spec: RetrySpec | None) -> RetryPolicy | None:
    if spec is None:
        return None
    return RetryPolicy(
        max_attempts=spec.max_attempts,
        base_delay=spec.base_delay,
        max_delay=spec.max_delay,
        multiplier=spec.multiplier,
        jitter=spec.jitter,
        deadline=spec.deadline,
    )


def _http(spec: HttpSource, config: JobConfig) -> HttpAdapter:
    ssl = config.resolve(spec.ssl) if isinstance(spec.ssl, str) else spec.ssl
    cert = spec.client_cert
    return HttpAdapter(
        spec.base_url,
        headers=spec.headers,
        timeout=spec.timeout,
        total_timeout=spec.total_timeout,
        redact=spec.redact or None,
        redact_params=spec.redact_params,
        max_body=spec.max_body,
        connector_limit=spec.connector_limit,
        ssl=ssl,
        client_cert=(
            config.resolve(cert)
            if isinstance(cert, str)
            else None
            if cert is None
            else (config.resolve(cert[0]), config.resolve(cert[1]))
        ),
        proxy=spec.proxy,
        trust_env=spec.trust_env,
        max_line_size=spec.max_line_size,
        max_field_size=spec.max_field_size,
        max_headers=spec.max_headers,
    )


def check_source(name: str, spec: SourceSpec, config: JobConfig) -> list[tuple[str, str]]:
    """What is wrong with a source, as ``(key path, problem)`` pairs; builds nothing that runs
    (adapters connect lazily; a factory is only imported and its signature checked)."""
    where = f"sources.{name}"
    errors: list[tuple[str, str]] = []
    try:
        _rate_limit(spec.rate_limit)
    except (TypeError, ValueError) as exc:
        errors.append((f"{where}.rate_limit", str(exc)))
    try:
        _retry(spec.retry)
    except (TypeError, ValueError) as exc:
        errors.append((f"{where}.retry", str(exc)))
    if isinstance(spec, HttpSource):
        try:
            _http(spec, config)
        except (TypeError, ValueError) as exc:
            errors.append((where, str(exc)))
    elif isinstance(spec, FileSource):
        root = config.resolve(spec.root)
        if not root.is_dir():
            errors.append((f"{where}.root", f"{str(root)!r} is not a directory"))
    else:
        try:
            factory = resolve_factory(spec.adapter, config.base_dir)
        except ValueError as exc:
            errors.append((f"{where}.adapter", str(exc)))
            return errors
        try:
            inspect.signature(factory).bind(**spec.options)
        except TypeError as exc:
            keys = ", ".join(spec.options) or "none"
            errors.append((where, f"{spec.adapter} does not accept these keys ({keys}): {exc}"))
        except ValueError:
            pass  # no introspectable signature (a builtin): find out when it is called
    return errors


async def build_adapter(spec: SourceSpec, config: JobConfig) -> object:
    """The adapter a source describes (a factory may be sync or async)."""
    if isinstance(spec, HttpSource):
        return _http(spec, config)
    if isinstance(spec, FileSource):
        return FileAdapter(config.resolve(spec.root))
    assert isinstance(spec, PluginSource)
    adapter = resolve_factory(spec.adapter, config.base_dir)(**spec.options)
    if inspect.isawaitable(adapter):
        adapter = await adapter
    return adapter


async def register_sources(registry: Registry, config: JobConfig, names: list[str]) -> None:
    """Register the named sources of ``config`` in ``registry``."""
    for name in names:
        spec = config.sources[name]
        registry.register(
            name,
            await build_adapter(spec, config),
            rate_limit=_rate_limit(spec.rate_limit),
            max_concurrency=spec.max_concurrency,
            retry=_retry(spec.retry),
            breaker=_breaker(spec.breaker),
        )
