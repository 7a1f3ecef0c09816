"""The responses committed while lookups are in flight (``_store/_sqlite/_window.py``)."""

from __future__ import annotations

from mxm_dataio_async._models import (
    CacheMode,
    Response,
    ResponseStatus,
    new_id,
    utcnow,
)
from mxm_dataio_async._store._sqlite._window import CommitWindow


def _response(request_hash: str, status: ResponseStatus = ResponseStatus.OK) -> Response:
    return Response(
        id=new_id(),
        request_id=new_id(),
        request_hash=request_hash,
        session_id=new_id(),
        status=status,
        checksum=None,
        size_bytes=0,
        fetched_at=utcnow(),
        cache_mode=CacheMode.DEFAULT,
        ttl_seconds=None,
        as_of_bucket=None,
        cache_tag=None,
    )


def test_nothing_is_kept_while_no_lookup_is_in_flight() -> None:
    window = CommitWindow()
    for i in range(100):
        window.committed([_response(f"h{i}")])
    assert window.commits == 100
    assert len(window) == 0
    began = window.begin()
    assert window.end(began, "h5") is None  # committed before the lookup began


def test_a_lookup_gets_what_committed_after_it_began_and_not_before() -> None:
    window = CommitWindow()
    began = window.begin()
    window.committed([_response("other")])
    newer = _response("h")
    window.committed([_response("h", ResponseStatus.ERROR), newer])
    assert window.end(began, "h") is newer
    # The only lookup ended: nothing is kept any more.
    assert len(window) == 0
    later = window.begin()
    assert window.end(later, "h") is None


def test_the_newest_of_several_commits_wins() -> None:
    window = CommitWindow()
    began = window.begin()
    first, second = _response("h"), _response("h")
    window.committed([first])
    window.committed([second])
    assert window.end(began, "h") is second


def test_entries_go_once_every_lookup_that_may_need_them_has_ended() -> None:
    window = CommitWindow()
    old = window.begin()
    early = _response("a")
    window.committed([early])  # after `old` began
    young = window.begin()  # began after `early` committed: never needs it
    late = _response("b")
    window.committed([late])
    assert len(window) == 2
    # A lookup ends in any order; `old` still needs both entries meanwhile.
    assert window.end(young, "a") is None
    assert len(window) == 2
    twin = window.begin()
    assert window.end(old, "a") is early
    # `twin` began after both commits, so no lookup in flight can use either of them now.
    assert len(window) == 0
    assert window.end(twin, "b") is None


def test_lookups_that_began_at_the_same_commit_are_counted() -> None:
    window = CommitWindow()
    first, second = window.begin(), window.begin()
    assert first == second
    response = _response("h")
    window.committed([response])
    assert window.end(first, "h") is response
    assert len(window) == 1  # the second lookup may still need it
    assert window.end(second, "h") is response
    assert len(window) == 0
