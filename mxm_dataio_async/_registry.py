"""Which adapter serves which source, with that source's limits and retry policy.

A source's limiter lives here, on its registration, so every session of that source in the process
shares one budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import anyio

from mxm_dataio_async._exceptions import AdapterNotFound
from mxm_dataio_async._limits import RateLimit, SourceLimiter
from mxm_dataio_async._redact import Redaction
from mxm_dataio_async._retry import RetryPolicy
from mxm_dataio_async.adapters.base import Closable, Fetcher, Revalidator, Sender, Streamer

__all__ = [
    "Registry",
    "SourceEntry",
    "default_registry",
    "list_registered",
    "register",
    "resolve_adapter",
    "unregister",
]

DEFAULT_RETRY = RetryPolicy()


@dataclass(frozen=True, slots=True)
class SourceEntry:
    """A registered source: its adapter, capabilities (checked once), limiter and retry policy."""

    name: str
    adapter: Any
    limiter: SourceLimiter
    retry: RetryPolicy
    redaction: Redaction
    can_fetch: bool = field(default=False)
    can_send: bool = field(default=False)
    can_stream: bool = field(default=False)
    can_revalidate: bool = field(default=False)


class Registry:
    """Maps source names to adapters.

    ```python
    registry = Registry()
    registry.register("example", HttpAdapter(base_url="http://127.0.0.1:8080"),
                      rate_limit=RateLimit(10, per=1.0, burst=1), max_concurrency=8,
                      retry=RetryPolicy(max_attempts=5))
    ```
    Used as ``async with Registry() as registry:``, it closes its adapters on exit.
    """

    def __init__(self) -> None:
        self._entries: dict[str, SourceEntry] = {}

    def __repr__(self) -> str:
        return f"<Registry {', '.join(self._entries) or '(empty)'}>"

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def register(
        self,
        name: str,
        adapter: object,
        *,
        rate_limit: RateLimit | None = None,
        max_concurrency: int | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        """Register ``adapter`` under ``name``. A taken name raises ``ValueError``."""
        if not isinstance(name, str) or not name:
            raise TypeError(f"source name must be a non-empty str, got {name!r}")
        if "\x00" in name:
            raise ValueError(f"source name must not contain NUL characters: {name!r}")
        if name in self._entries:
            raise ValueError(f"source {name!r} is already registered; unregister it first")
        if rate_limit is not None and not isinstance(rate_limit, RateLimit):
            raise TypeError(f"rate_limit must be a RateLimit, got {type(rate_limit).__name__}")
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise TypeError(f"retry must be a RetryPolicy, got {type(retry).__name__}")
        caps = {
            "can_fetch": isinstance(adapter, Fetcher),
            "can_send": isinstance(adapter, Sender),
            "can_stream": isinstance(adapter, Streamer),
            "can_revalidate": isinstance(adapter, Revalidator),
        }
        if not (caps["can_fetch"] or caps["can_send"] or caps["can_stream"]):
            raise TypeError(
                f"{type(adapter).__name__} is not an adapter: it has none of "
                "fetch(request), send(request, payload) or stream(request)"
            )
        extra = getattr(adapter, "redaction", None)
        redaction = Redaction().merge(extra) if isinstance(extra, Redaction) else Redaction()
        self._entries[name] = SourceEntry(
            name=name,
            adapter=adapter,
            limiter=SourceLimiter(rate_limit, max_concurrency),
            retry=retry if retry is not None else DEFAULT_RETRY,
            redaction=redaction,
            **caps,
        )

    def unregister(self, name: str) -> object:
        """Remove a source and return its adapter (the caller closes it if needed)."""
        try:
            return self._entries.pop(name).adapter
        except KeyError:
            raise AdapterNotFound(name, self.list_registered()) from None

    def entry(self, name: str) -> SourceEntry:
        try:
            return self._entries[name]
        except KeyError:
            raise AdapterNotFound(name, self.list_registered()) from None

    def resolve_adapter(self, name: str) -> object:
        """The adapter registered under ``name``; ``AdapterNotFound`` lists the known names."""
        return self.entry(name).adapter

    def list_registered(self) -> list[str]:
        return sorted(self._entries)

    async def aclose(self) -> None:
        """Close every adapter that has ``aclose()`` (shielded from cancellation)."""
        with anyio.CancelScope(shield=True):
            for entry in list(self._entries.values()):
                if isinstance(entry.adapter, Closable):
                    await entry.adapter.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


#: The module's default registry, used by sessions created without ``registry=``.
default_registry = Registry()


def register(
    name: str,
    adapter: object,
    *,
    rate_limit: RateLimit | None = None,
    max_concurrency: int | None = None,
    retry: RetryPolicy | None = None,
) -> None:
    """Register ``adapter`` under ``name`` in the default registry."""
    default_registry.register(
        name, adapter, rate_limit=rate_limit, max_concurrency=max_concurrency, retry=retry
    )


def unregister(name: str) -> object:
    """Remove ``name`` from the default registry and return its adapter."""
    return default_registry.unregister(name)


def resolve_adapter(name: str) -> object:
    """The adapter registered under ``name`` in the default registry."""
    return default_registry.resolve_adapter(name)


def list_registered() -> list[str]:
    """The names registered in the default registry, sorted."""
    return default_registry.list_registered()
