"""The responses committed while cache lookups are in flight, for exactly as long as one is.

A lookup is queued and answered by a batched query (``_reader.py``) whose snapshot may predate a
commit that lands while the lookup waits: a fetch that has just recorded its response would then
be told by the next lookup that nothing is stored. The lookup therefore also takes the newest
response committed since it began from here.

Only a lookup in flight when a response commits can need that response, so nothing is kept while
no lookup is in flight, and an entry goes as soon as every lookup that began before its commit has
ended: under load the window holds a few batches' worth of responses. (It used to be a map of the
last 4,096-8,192 responses. Kept that long, each one lived into the garbage collector's oldest
generation, which made the full collections more frequent and slower: 23 µs of client CPU per
1 KiB miss on this machine, 11% of it.)
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from mxm_dataio_async._models import Response, ResponseStatus

__all__ = ["CommitWindow"]


class CommitWindow:
    """Commits counted in order; OK responses kept while a lookup that may need them runs.

    ```python
    began = window.begin()              # before the lookup is queued
    try:
        row = await reader.latest(key)  # may miss a commit that lands meanwhile
    finally:
        newer = window.end(began, request_hash)
    window.committed(responses)         # after each commit
    ```
    """

    __slots__ = ("_began", "_latest", "_order", "commits")

    def __init__(self) -> None:
        self.commits = 0  # record() calls completed
        # Lookups in flight, by the commit count when each began. Keys are inserted in ascending
        # order (the count only grows, and a key is re-inserted only while it is the largest),
        # so the first key is the oldest lookup's.
        self._began: dict[int, int] = {}
        self._latest: dict[str, tuple[int, Response]] = {}  # request hash -> (commit, response)
        self._order: deque[tuple[int, str]] = deque()  # (commit, request hash), commit order

    def __len__(self) -> int:
        """The responses kept now."""
        return len(self._latest)

    def begin(self) -> int:
        """A lookup starts: the count it must compare commits with (give it to ``end``)."""
        began = self.commits
        self._began[began] = self._began.get(began, 0) + 1
        return began

    def end(self, began: int, request_hash: str) -> Response | None:
        """The lookup that ``begin`` returned ``began`` to is over: the newest OK response for
        ``request_hash`` committed since, if any. Call it whether the lookup succeeded or not."""
        entry = self._latest.get(request_hash)
        left = self._began[began] - 1
        if left:
            self._began[began] = left
        else:
            del self._began[began]
            self._drop_unneeded()
        return entry[1] if entry is not None and entry[0] > began else None

    def committed(self, responses: Iterable[Response]) -> None:
        """One more commit; its OK responses are kept if a lookup in flight may need them."""
        self.commits = commit = self.commits + 1
        if not self._began:
            return
        for response in responses:
            if response.status is ResponseStatus.OK:
                self._latest[response.request_hash] = (commit, response)
                self._order.append((commit, response.request_hash))

    def _drop_unneeded(self) -> None:
        """Drop what no lookup in flight can use: commits up to the oldest one's start."""
        oldest = next(iter(self._began), self.commits)
        order, latest = self._order, self._latest
        while order and order[0][0] <= oldest:
            commit, request_hash = order.popleft()
            entry = latest.get(request_hash)
            if entry is not None and entry[0] == commit:
                del latest[request_hash]
