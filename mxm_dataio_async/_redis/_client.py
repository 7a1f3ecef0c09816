"""The connection to Redis that worker processes share, and the one place its errors are
translated (redis-py is imported here only: the ``redis`` extra is optional).

Design decisions:

- A blocking connection pool: redis-py's default pool raises once its connections are all in
  use, which under load would look like "Redis unreachable"; a blocking one waits up to
  ``timeout`` for a connection instead.
- One retry of a command whose connection broke (a pooled connection left over from before a
  Redis restart), none after a timeout: failing closed must be quick, not a minute of backoff.
  The scripts are written so that running one twice is harmless (a reservation spent twice is
  budget lost, never a grant too many; a claim recognises its own token).
- Connection-level failures (refused, reset, timed out) are :class:`RedisUnavailable`, which a
  gate may answer with its local fallback; anything else Redis says (a script error, a refused
  authentication) is a plain :class:`CoordinationError`: a misconfiguration, never papered over.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Coroutine, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Literal, Self

import anyio

from mxm_dataio_async._exceptions import CoordinationError, UsageError
from mxm_dataio_async._redis._pubsub import Hub

if TYPE_CHECKING:
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.commands.core import AsyncScript
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import RedisError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    REDIS_MISSING: ImportError | None = None
else:
    try:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import RedisError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        REDIS_MISSING = None
    except ImportError as exc:  # the redis extra is not installed
        REDIS_MISSING = exc

    AsyncScript = Any

__all__ = ["KEY_ROOT", "OnUnavailable", "RedisCoordination", "RedisUnavailable", "log"]

log = logging.getLogger("mxm_dataio_async.redis")

KEY_ROOT: Final = "mxm"
"""Every key and channel is ``mxm:<prefix>:...``."""

OnUnavailable = Literal["fail", "local"]


class RedisUnavailable(CoordinationError):
    """Redis could not be reached (refused, reset, timed out): what a local fallback answers."""


def _require_redis() -> None:
    if REDIS_MISSING is not None:
        raise ImportError(
            "Redis coordination needs redis-py, which comes with the redis extra: "
            "pip install 'mxm-dataio-async[redis]'"
        ) from REDIS_MISSING


def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}: {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


class RedisCoordination:
    """One Redis shared by every worker process: global rate gates and cross-process coalescing.

    ```python
    redis = RedisCoordination("redis://10.0.0.5:6379/0", prefix="prices")
    async with dio.Store("postgresql://...") as store, dio.Registry(redis=redis) as registry:
        registry.register("yahoo", adapter, rate_limit=dio.RateLimit(100), max_concurrency=8)
        ...  # 100 upstream calls/s for this source across every process with this prefix
    ```

    Every key and channel is ``mxm:<prefix>:...``: processes that share a ``prefix`` share
    rate budgets and in-flight requests (give each deployment its own). The client is created
    without I/O; the first command connects. ``aclose()`` closes it (a ``Registry`` given this
    object closes it with itself).

    - ``on_unavailable="fail"`` (the default): when Redis cannot be reached, a rate gate raises
      :class:`~mxm_dataio_async.CoordinationError` rather than grant without it (fail closed),
      and so does a fetch that would coalesce across processes.
      ``on_unavailable="local"`` with ``local_share=s`` (0 < s <= 1): each process goes on at
      ``s`` times each source's rate (e.g. ``0.25`` for four processes) and coalesces only
      within itself, asking Redis again every ``probe_interval`` seconds until it answers.
    - ``timeout``: seconds to connect, to wait for one answer, and to wait for a free pooled
      connection (``max_connections`` of them). A dead Redis is reported within about this.
    - ``coalesce``: whether ``Registry(redis=...)`` also coalesces across processes (a request
      in flight in one process is awaited by the others: ``wait`` seconds at most, after which
      a waiter fetches it itself). ``flight_ttl`` bounds one fetch (all its attempts): a process
      that dies while fetching holds its claim that long.
    """

    __slots__ = (
        "_client",
        "_closed",
        "_hub",
        "_scripts",
        "_tasks",
        "coalesce",
        "flight_ttl",
        "local_share",
        "on_unavailable",
        "prefix",
        "probe_interval",
        "server",
        "timeout",
        "wait",
    )

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "default",
        on_unavailable: OnUnavailable = "fail",
        local_share: float | None = None,
        timeout: float = 2.0,
        max_connections: int = 32,
        probe_interval: float = 1.0,
        coalesce: bool = True,
        wait: float = 60.0,
        flight_ttl: float = 60.0,
    ) -> None:
        if not isinstance(url, str):
            raise TypeError(f"url must be a redis:// URL (str), got {type(url).__name__}")
        if not isinstance(prefix, str) or not prefix or any(c in prefix for c in ": \x00"):
            raise ValueError(f"prefix must be non-empty, without ':', space or NUL: {prefix!r}")
        if on_unavailable not in ("fail", "local"):
            raise ValueError(f"on_unavailable must be 'fail' or 'local', got {on_unavailable!r}")
        if on_unavailable == "local":
            if local_share is None:
                raise ValueError(
                    "on_unavailable='local' needs local_share: this process's part of each "
                    "source's rate while Redis is down (e.g. 0.25 for four processes)"
                )
            share = _positive("local_share", local_share)
            if share > 1:
                raise ValueError(f"local_share must be <= 1, got {local_share!r}")
        elif local_share is not None:
            raise ValueError("local_share is only used with on_unavailable='local'")
        if isinstance(max_connections, bool) or not isinstance(max_connections, int):
            raise TypeError(f"max_connections must be an int, got {max_connections!r}")
        if max_connections < 2:
            raise ValueError(f"max_connections must be >= 2 (one listens), got {max_connections}")
        _require_redis()
        self.prefix = prefix
        self.on_unavailable: OnUnavailable = on_unavailable
        self.local_share = local_share
        self.timeout = _positive("timeout", timeout)
        self.probe_interval = _positive("probe_interval", probe_interval)
        self.coalesce = bool(coalesce)
        self.wait = _positive("wait", wait)
        self.flight_ttl = _positive("flight_ttl", flight_ttl)
        try:
            pool = aioredis.BlockingConnectionPool.from_url(
                url,
                max_connections=max_connections,
                timeout=self.timeout,
                socket_timeout=self.timeout,
                socket_connect_timeout=self.timeout,
                retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
                decode_responses=True,
            )
        except ValueError as exc:
            raise ValueError(f"not a Redis URL ({exc}): give redis://host:port/db") from None
        kw = pool.connection_kwargs
        where = kw.get("path") or f"{kw.get('host', 'localhost')}:{kw.get('port', 6379)}"
        self.server = f"redis {where}/{kw.get('db', 0)}"  # no password: it goes in messages
        self._client = aioredis.Redis.from_pool(pool)
        self._scripts: dict[str, AsyncScript] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._hub = Hub(self)  # one subscriber connection, opened by the first waiter
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"<RedisCoordination {self.server} prefix={self.prefix!r} "
            f"on_unavailable={self.on_unavailable!r}{' closed' if self._closed else ''}>"
        )

    @property
    def client(self) -> aioredis.Redis:
        """The redis-py asyncio client (``decode_responses=True``)."""
        if self._closed:
            raise UsageError(f"{self!r} is closed; make a new one")
        return self._client

    def key(self, *parts: str) -> str:
        """``mxm:<prefix>:<parts...>``: the name of a key or channel of this deployment."""
        return ":".join((KEY_ROOT, self.prefix, *parts))

    def script(self, lua: str) -> AsyncScript:
        """The script ``lua``, run by EVALSHA (loaded on first use, and again after a restart)."""
        found = self._scripts.get(lua)
        if found is None:
            found = self._scripts[lua] = self.client.register_script(lua)
        return found

    async def run(self, lua: str, keys: Sequence[str], args: Sequence[str | int | float]) -> Any:
        """Run ``lua`` on ``keys`` and ``args`` in one round trip; errors translated."""
        script = self.script(lua)
        try:
            return await script(keys=keys, args=args)
        except Exception as exc:
            raise self.translate(exc) from exc

    def translate(self, exc: BaseException) -> CoordinationError:
        """Any failure talking to Redis as a :class:`CoordinationError` naming the server."""
        if isinstance(exc, CoordinationError):
            return exc
        if isinstance(exc, RedisConnectionError | RedisTimeoutError | OSError | TimeoutError):
            return RedisUnavailable(
                f"{self.server} is unreachable ({type(exc).__name__}: {exc}); "
                "start it, fix the URL, or pass on_unavailable='local' with a local_share to "
                "go on without it"
            )
        if isinstance(exc, RedisError):
            return CoordinationError(f"{self.server} refused a command: {exc}")
        return CoordinationError(f"talking to {self.server} failed: {type(exc).__name__}: {exc}")

    @property
    def hub(self) -> Hub:
        """The one subscriber connection of this process, shared by every waiter."""
        return self._hub

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` in the background (a cooldown's write); ``aclose()`` waits for it."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        """Wait briefly for background writes, stop the subscriber, close the connections.
        Safe to call twice; shielded from cancellation."""
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            if self._tasks:
                with anyio.move_on_after(self.timeout):
                    await asyncio.wait(list(self._tasks))
                for task in list(self._tasks):
                    task.cancel()
                if self._tasks:
                    await asyncio.wait(list(self._tasks))
            await self._hub.aclose()
            await self._client.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
