"""A loopback upstream whose answers a test scripts (statuses in order, the last repeating)."""

from __future__ import annotations

from aiohttp import web


class Upstream:
    """A loopback server answering ``/q`` from a script of statuses (the last repeats)."""

    def __init__(self, *statuses: int, retry_after: str | None = None) -> None:
        self.statuses = list(statuses) or [200]
        self.retry_after = retry_after
        self.calls = 0
        self._base = 0

    def then(self, *statuses: int) -> None:
        """From the next request on, answer with ``statuses`` (the last repeating)."""
        self.statuses = list(statuses)
        self._base = self.calls

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/q", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        self.calls += 1
        status = self.statuses[min(self.calls - self._base, len(self.statuses)) - 1]
        headers: dict[str, str] = {}
        if status != 200 and self.retry_after is not None:
            headers["Retry-After"] = self.retry_after
        return web.Response(status=status, body=b'{"n": %d}' % self.calls, headers=headers)
