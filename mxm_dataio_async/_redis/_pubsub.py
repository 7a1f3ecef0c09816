"""One subscriber connection per process, shared by every cross-process wait.

A waiter listens on its flight's channel only while it waits. Each listening would otherwise hold
a pooled connection of its own (a subscribed connection can do nothing else), so many waits at
once would drain the pool the rate gates need. Here one connection SUBSCRIBEs and UNSUBSCRIBEs
channels as local waiters come and go, and one reader task hands each message to the waiters of
its channel.

``listen(channel)`` returns only once Redis has confirmed the subscription (the reader sees the
``subscribe`` reply): a waiter then checks whether the outcome is already known, and anything
published after that check reaches it. Subscribing before checking, and knowing the subscription
is in force, is what rules out a lost wake-up. If the connection breaks, every current waiter gets
the error (each falls back to its own fetch) and the next wait opens a new connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager, suppress
from typing import Any, Protocol

import anyio

from mxm_dataio_async._exceptions import CoordinationError

__all__ = ["Channel", "Connection", "Hub"]


class Connection(Protocol):
    """What the hub needs of the connection it listens on (a ``RedisCoordination``)."""

    @property
    def client(self) -> Any: ...

    def translate(self, exc: BaseException) -> CoordinationError: ...

    def spawn(self, work: Coroutine[Any, Any, None]) -> None: ...


class Channel:
    """What one channel's local waiters share: the messages seen since it was subscribed."""

    __slots__ = ("confirmed", "error", "event", "messages", "users")

    def __init__(self) -> None:
        self.users = 0
        self.confirmed = False
        self.error: CoordinationError | None = None
        self.messages: list[str] = []
        self.event = anyio.Event()

    def wake(self) -> None:
        # A fresh event per change: waiters re-check what they wait for after every wake-up.
        event, self.event = self.event, anyio.Event()
        event.set()

    def fail(self, error: CoordinationError) -> None:
        if self.error is None:
            self.error = error
        self.wake()

    async def confirmation(self) -> None:
        while not self.confirmed:
            event = self.event
            if self.error is not None:
                raise self.error
            await event.wait()

    async def message(self, wanted: Callable[[str], bool]) -> str:
        """The first message (seen since subscribing) for which ``wanted`` is true."""
        while True:
            event = self.event
            for text in self.messages:
                if wanted(text):
                    return text
            if self.error is not None:
                raise self.error
            await event.wait()


class Hub:
    """SUBSCRIBE on one shared connection while a waiter of this process listens."""

    __slots__ = ("_channels", "_coordination", "_pubsub", "_reader", "_unconfirmed")

    def __init__(self, coordination: Connection) -> None:
        self._coordination = coordination
        self._pubsub: Any = None  # redis-py's PubSub, made by the first listen()
        self._reader: asyncio.Task[None] | None = None
        self._channels: dict[str, Channel] = {}
        # SUBSCRIBEs sent per channel whose reply has not come yet: a channel left and joined
        # again quickly has two replies to wait for, and only the second one means "in force".
        self._unconfirmed: dict[str, int] = {}

    @asynccontextmanager
    async def listen(self, name: str) -> AsyncIterator[Channel]:
        """Subscribed to ``name`` (confirmed by Redis) for the length of the block."""
        channel = self._channels.get(name)
        fresh = channel is None
        if channel is None:
            channel = self._channels[name] = Channel()
        channel.users += 1
        try:
            if fresh:
                await self._subscribe(name)
            await channel.confirmation()
            yield channel
        finally:
            channel.users -= 1
            if channel.users == 0 and self._channels.get(name) is channel:
                del self._channels[name]
                with anyio.CancelScope(shield=True):
                    await self._unsubscribe(name)

    async def _subscribe(self, name: str) -> None:
        if self._pubsub is None:
            self._pubsub = self._coordination.client.pubsub()
        pubsub = self._pubsub
        self._unconfirmed[name] = self._unconfirmed.get(name, 0) + 1
        try:
            await pubsub.subscribe(name)
        except BaseException as exc:  # cancelled too: whether it was sent is unknown
            self._broken(pubsub, exc)
            if isinstance(exc, Exception):
                raise self._coordination.translate(exc) from exc
            raise
        if self._reader is None:  # the connection exists from the first SUBSCRIBE on
            self._reader = asyncio.get_running_loop().create_task(self._read(pubsub))

    async def _unsubscribe(self, name: str) -> None:
        pubsub = self._pubsub
        if pubsub is None:
            return
        try:
            await pubsub.unsubscribe(name)
        except Exception as exc:
            self._broken(pubsub, exc)

    async def _read(self, pubsub: Any) -> None:
        try:
            while True:
                message = await pubsub.get_message(timeout=None)
                if message is not None:
                    self._dispatch(message)
        except Exception as exc:
            self._broken(pubsub, exc)

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind, name = message["type"], message["channel"]
        if kind == "message":
            channel = self._channels.get(name)
            if channel is not None:
                channel.messages.append(str(message["data"]))
                channel.wake()
        elif kind == "subscribe":
            left = self._unconfirmed.get(name, 0) - 1
            if left > 0:
                self._unconfirmed[name] = left
                return
            self._unconfirmed.pop(name, None)
            channel = self._channels.get(name)
            if channel is not None:
                channel.confirmed = True
                channel.wake()

    def _broken(self, pubsub: Any, exc: BaseException) -> None:
        """The connection failed: every waiter on it gets the error; the next listen() starts a
        new connection."""
        if pubsub is not self._pubsub:
            return  # an old connection, already given up
        error = self._coordination.translate(exc)
        channels, self._channels = self._channels, {}
        self._unconfirmed.clear()
        self._pubsub = None
        reader, self._reader = self._reader, None
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
        for channel in channels.values():
            channel.fail(error)
        self._coordination.spawn(_close(pubsub))

    async def aclose(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            with suppress(asyncio.CancelledError):
                await reader
        for channel in self._channels.values():
            channel.fail(CoordinationError(f"{self._coordination!r} was closed"))
        self._channels.clear()
        if pubsub is not None:
            await _close(pubsub)


async def _close(pubsub: Any) -> None:
    with suppress(Exception):
        await pubsub.aclose()
