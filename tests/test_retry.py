"""``RetryPolicy`` (configuration) and ``Retrying`` (the pure per-request schedule).

Nothing here needs an event loop: a schedule is asked "how long until the next attempt, or give
up?" with the time passed in, and builds the final ``FetchError``. The loop that drives it, with
its recording, sleeping and cancellation, is tested end to end in ``test_pipeline_retry.py``.
"""

from __future__ import annotations

import math

import pytest

from mxm_dataio_async._exceptions import DataIOError, FetchError, TransientError
from mxm_dataio_async._models import Request
from mxm_dataio_async._request import build_request
from mxm_dataio_async._retry import (
    NO_RETRY,
    DeadlineExceeded,
    Retrying,
    RetryPolicy,
    disable_retry_waits,
    retry_waits_disabled,
)

NO_JITTER = RetryPolicy(max_attempts=3, base_delay=0.1, jitter=0)


def _request() -> Request:
    return build_request(session_id="s1", source="example", kind="quote", endpoint="/q")


def _waits(
    policy: RetryPolicy, errors: list[BaseException], *, started: float = 0.0
) -> tuple[Retrying, list[float | None]]:
    """Play ``errors`` as the failures of consecutive attempts, each failing at ``started`` plus
    the waits so far (attempts take no time); the schedule's answer after each one."""
    retrying = policy.schedule(started)
    now = started
    answers: list[float | None] = []
    for error in errors:
        retrying.begin()
        wait = retrying.next_wait(error, now)
        answers.append(wait)
        if wait is None:
            break
        now += wait
    return retrying, answers


# -- policy -----------------------------------------------------------------------------------


def test_policy_defaults_and_no_retry() -> None:
    policy = RetryPolicy()
    assert (policy.max_attempts, policy.base_delay, policy.max_delay) == (3, 0.1, 10.0)
    assert (policy.multiplier, policy.jitter, policy.deadline) == (2.0, 0.1, None)
    assert NO_RETRY.max_attempts == 1


def test_backoff_is_exponential_and_capped() -> None:
    policy = RetryPolicy(base_delay=0.5, multiplier=3, max_delay=10)
    assert [policy.backoff(n) for n in range(1, 6)] == pytest.approx([0.5, 1.5, 4.5, 10, 10])
    assert policy.backoff(100_000) == 10  # no OverflowError for absurd retry numbers
    assert RetryPolicy(base_delay=0, max_delay=5).backoff(100_000) == 0
    assert RetryPolicy(base_delay=2, multiplier=1).backoff(7) == 2
    with pytest.raises(ValueError, match="1-based"):
        policy.backoff(0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_attempts": 0}, "max_attempts must be >= 1"),
        ({"base_delay": -0.1}, "base_delay must be a finite number >= 0"),
        ({"max_delay": math.inf}, "max_delay must be a finite number >= 0"),
        ({"jitter": math.nan}, "jitter must be a finite number >= 0"),
        ({"multiplier": 0.5}, "multiplier must be a finite number >= 1"),
        ({"multiplier": math.inf}, "multiplier must be a finite number >= 1"),
        ({"deadline": 0}, "deadline must be > 0"),
        ({"deadline": -1}, "deadline must be a finite number >= 0"),
    ],
)
def test_policy_rejects_impossible_values(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_attempts": 2.0}, "max_attempts must be an int"),
        ({"max_attempts": True}, "max_attempts must be an int"),
        ({"base_delay": "1"}, "base_delay must be a number"),
        ({"multiplier": None}, "multiplier must be a number"),
        ({"deadline": "5"}, "deadline must be a number"),
    ],
)
def test_policy_rejects_wrong_types(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(TypeError, match=match):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_policy_is_frozen() -> None:
    with pytest.raises(AttributeError):
        NO_JITTER.max_attempts = 9  # type: ignore[misc]


# -- the schedule -----------------------------------------------------------------------------


def test_schedule_starts_fresh_and_counts_attempts() -> None:
    retrying = NO_JITTER.schedule(12.5)
    assert isinstance(retrying, Retrying)
    assert (retrying.policy, retrying.started, retrying.attempts) == (NO_JITTER, 12.5, 0)
    assert [retrying.begin() for _ in range(3)] == [1, 2, 3]
    assert retrying.attempts == 3
    other = NO_JITTER.schedule(0.0)  # schedules of one policy share nothing
    assert other.attempts == 0
    assert other.begin() == 1 and retrying.attempts == 3


def test_waits_are_exponential_and_capped_then_attempts_run_out() -> None:
    policy = RetryPolicy(max_attempts=7, base_delay=0.5, multiplier=2, max_delay=3, jitter=0)
    retrying, waits = _waits(policy, [TransientError("503")] * 10)
    # six waits between seven attempts, then no wait after the last: give up
    assert waits == pytest.approx([0.5, 1, 2, 3, 3, 3, None])
    assert waits[-1] is None
    assert retrying.attempts == 7


def test_the_first_wait_is_base_delay_and_types_are_float() -> None:
    retrying = NO_JITTER.schedule(0.0)
    retrying.begin()
    wait = retrying.next_wait(TransientError("503"), 0.0)
    assert type(wait) is float
    assert wait == pytest.approx(0.1)


def test_jitter_stays_within_bounds_after_the_cap() -> None:
    policy = RetryPolicy(max_attempts=200, base_delay=1, multiplier=2, max_delay=1, jitter=0.5)
    _, waits = _waits(policy, [TransientError("503")] * 199)
    assert len(waits) == 199
    spread = [w for w in waits if w is not None]
    assert len(spread) == 199
    assert all(1.0 <= w <= 1.5 for w in spread)  # jitter is added after the cap
    assert len(set(spread)) > 1  # actually random


def test_no_jitter_is_exact() -> None:
    policy = RetryPolicy(max_attempts=4, base_delay=0.25, multiplier=2, jitter=0)
    _, first = _waits(policy, [TransientError("503")] * 3)
    _, second = _waits(policy, [TransientError("503")] * 3)
    assert first == second == [0.25, 0.5, 1.0]


def test_retry_after_is_never_undercut() -> None:
    policy = RetryPolicy(max_attempts=4, base_delay=0.1, max_delay=1.0, jitter=0)
    errors: list[BaseException] = [
        TransientError("429", retry_after=0.05),  # below the backoff: the backoff wins
        TransientError("429", retry_after=0.7),
        TransientError("429", retry_after=30.0),  # far above max_delay: still honoured
    ]
    _, waits = _waits(policy, errors)
    assert waits == pytest.approx([0.1, 0.7, 30.0])


def test_retry_after_wins_over_backoff_plus_jitter_and_jitter_over_a_small_hint() -> None:
    policy = RetryPolicy(max_attempts=2, base_delay=0.1, jitter=0.2)
    for _ in range(50):
        _, (wait,) = _waits(policy, [TransientError("429", retry_after=5)])
        assert wait == 5.0  # 0.1 + at most 0.2 of jitter is less than the hint
        _, (small,) = _waits(policy, [TransientError("429", retry_after=0.05)])
        assert small is not None and 0.1 <= small <= 0.3  # never below the hint either


def test_retry_after_zero_or_negative_adds_nothing() -> None:
    assert TransientError("429", retry_after=-3).retry_after == 0.0
    _, waits = _waits(NO_JITTER, [TransientError("429", retry_after=0), TransientError("x")])
    assert waits == pytest.approx([0.1, 0.2])


def test_no_retry_gives_up_after_one_attempt() -> None:
    retrying, waits = _waits(NO_RETRY, [TransientError("503")])
    assert waits == [None]
    assert retrying.attempts == 1


@pytest.mark.parametrize(
    "error",
    [
        ValueError("bad payload"),
        KeyError("missing"),
        FetchError("upstream said 404", transport_status=404),
        DataIOError("not transient"),
        KeyboardInterrupt(),
    ],
    ids=lambda e: type(e).__name__,
)
def test_anything_but_a_transient_error_gives_up_at_once(error: BaseException) -> None:
    retrying = RetryPolicy(max_attempts=10).schedule(0.0)
    retrying.begin()
    assert retrying.next_wait(error, 0.0) is None


def test_a_non_transient_error_after_transient_ones_stops_there() -> None:
    retrying, waits = _waits(NO_JITTER, [TransientError("503"), KeyError("missing")])
    assert waits == [pytest.approx(0.1), None]
    assert retrying.attempts == 2


def test_deadline_exceeded_is_transient() -> None:
    assert issubclass(DeadlineExceeded, TransientError)
    retrying = RetryPolicy(max_attempts=2, jitter=0, deadline=60).schedule(0.0)
    retrying.begin()
    assert retrying.next_wait(DeadlineExceeded("attempt cancelled"), 1.0) == pytest.approx(0.1)


# -- the deadline -----------------------------------------------------------------------------


def test_deadline_gives_up_a_wait_that_would_pass_it() -> None:
    policy = RetryPolicy(max_attempts=10, base_delay=1, multiplier=2, jitter=0, deadline=5)
    retrying = policy.schedule(100.0)  # monotonic seconds: only differences matter
    error = TransientError("503", transport_status=503)
    # attempts fail 0.5 s after they start: at 100.5, 102.0 (after 1 s), 104.5 (after 2 s)
    retrying.begin()
    assert retrying.next_wait(error, 100.5) == 1.0
    retrying.begin()
    assert retrying.next_wait(error, 102.0) == 2.0
    retrying.begin()
    assert retrying.next_wait(error, 104.5) is None  # a 4 s wait would end at 108.5 > 105
    failure = retrying.failure(error, None)
    assert failure.attempts == 3
    assert str(failure) == (
        "fetch failed after 3 attempts: 503 (gave up: waiting 4s more would pass the 5s retry "
        "deadline)"
    )
    assert failure.transport_status == 503


def test_a_wait_ending_exactly_at_the_deadline_is_allowed() -> None:
    policy = RetryPolicy(max_attempts=3, base_delay=1, jitter=0, deadline=3)
    retrying = policy.schedule(0.0)
    retrying.begin()
    assert retrying.next_wait(TransientError("503"), 2.0) == 1.0  # ends at 3.0, the deadline
    retrying.begin()
    assert retrying.next_wait(TransientError("503"), 2.5) is None  # 2 s more: 4.5 > 3


def test_deadline_counts_retry_after() -> None:
    policy = RetryPolicy(max_attempts=5, jitter=0, deadline=10)
    retrying, waits = _waits(policy, [TransientError("429", retry_after=60)])
    assert waits == [None]
    failure = retrying.failure(TransientError("429", retry_after=60), None)
    assert str(failure) == (
        "fetch failed after 1 attempt: 429 (gave up: waiting 60s more would pass the 10s retry "
        "deadline)"
    )


def test_deadline_allows_the_retries_that_fit() -> None:
    policy = RetryPolicy(max_attempts=3, base_delay=1, jitter=0, deadline=10)
    retrying, waits = _waits(policy, [TransientError("a"), TransientError("b")])
    assert waits == pytest.approx([1, 2])
    assert "deadline" not in str(retrying.failure(TransientError("b"), None))


def test_time_left() -> None:
    assert NO_JITTER.schedule(5.0).time_left(1000.0) is None  # no deadline, no bound
    retrying = RetryPolicy(deadline=30).schedule(5.0)
    assert retrying.time_left(5.0) == 30.0
    assert retrying.time_left(20.0) == 15.0
    assert retrying.time_left(35.0) == 0.0
    assert retrying.time_left(99.0) == 0.0  # never negative


# -- the final error --------------------------------------------------------------------------


def test_failure_after_exhaustion_has_message_and_fields() -> None:
    request = _request()
    last = TransientError("503 Service Unavailable", transport_status=503)
    retrying, waits = _waits(NO_JITTER, [TransientError("timeout"), TransientError("reset"), last])
    assert waits[-1] is None
    failure = retrying.failure(last, request, response_id="r-42")
    assert isinstance(failure, FetchError)
    assert str(failure) == "fetch failed after 3 attempts: 503 Service Unavailable"
    assert failure.attempts == 3
    assert failure.request is request
    assert failure.transport_status == 503
    assert failure.response_id == "r-42"
    assert failure.__cause__ is None  # the pipeline raises it `from` the error


def test_failure_after_one_attempt_is_singular() -> None:
    retrying, _ = _waits(NO_RETRY, [TransientError("503")])
    failure = retrying.failure(TransientError("503"), None)
    assert str(failure) == "fetch failed after 1 attempt: 503"
    assert failure.attempts == 1
    assert failure.request is None and failure.response_id is None
    assert failure.transport_status is None


def test_failure_of_a_non_transient_error() -> None:
    request = _request()
    retrying, _ = _waits(NO_JITTER, [ValueError("bad payload")])
    failure = retrying.failure(ValueError("bad payload"), request, response_id="r-1")
    assert str(failure) == "fetch failed: bad payload (not retried: ValueError)"
    assert (failure.attempts, failure.transport_status) == (1, None)
    assert (failure.request, failure.response_id) == (request, "r-1")


def test_failure_of_a_non_transient_error_after_transient_ones() -> None:
    boom = KeyError("missing")
    retrying, _ = _waits(NO_JITTER, [TransientError("503"), boom])
    failure = retrying.failure(boom, None)
    assert str(failure) == "fetch failed after 2 attempts: 'missing' (not retried: KeyError)"
    assert failure.attempts == 2


def test_failure_keeps_the_status_an_error_carries() -> None:
    class Refused(Exception):
        transport_status = 418

    retrying, _ = _waits(NO_JITTER, [Refused("teapot")])
    assert retrying.failure(Refused("teapot"), None).transport_status == 418


def test_failure_message_falls_back_to_the_type_name() -> None:
    retrying, _ = _waits(NO_JITTER, [RuntimeError()])
    assert str(retrying.failure(RuntimeError(), None)) == (
        "fetch failed: RuntimeError (not retried: RuntimeError)"
    )
    retrying, _ = _waits(NO_RETRY, [TransientError("")])
    assert str(retrying.failure(TransientError(""), None)) == (
        "fetch failed after 1 attempt: TransientError"
    )


def test_a_fetch_error_passes_through_with_its_message_and_status() -> None:
    request = _request()
    final = FetchError("upstream said 404", transport_status=404)
    retrying, waits = _waits(NO_JITTER, [TransientError("503"), final])
    assert waits[-1] is None
    failure = retrying.failure(final, request, response_id="r-error-row")
    assert failure is not final  # a new, complete error; the adapter's is not mutated
    assert str(failure) == "upstream said 404"
    assert failure.attempts == 2
    assert failure.request is request
    assert failure.transport_status == 404
    assert failure.response_id == "r-error-row"
    assert (final.attempts, final.request, final.response_id) == (0, None, None)


def test_a_fetch_error_keeps_its_own_response_id() -> None:
    final = FetchError("refused", response_id="r-own")
    retrying, _ = _waits(NO_JITTER, [final])
    assert retrying.failure(final, None, response_id="r-other").response_id == "r-own"


# -- disable_retry_waits ----------------------------------------------------------------------


def test_disable_retry_waits_makes_waits_zero_and_nests() -> None:
    policy = RetryPolicy(max_attempts=3, base_delay=5, jitter=1)
    errors: list[BaseException] = [TransientError("429", retry_after=100), TransientError("503")]
    assert not retry_waits_disabled()
    with disable_retry_waits():
        assert retry_waits_disabled()
        with disable_retry_waits():
            _, waits = _waits(policy, [*errors, TransientError("x")])
            assert waits == [0.0, 0.0, None]  # attempts still run out
        assert retry_waits_disabled()  # the outer block is still active
        _, waits = _waits(policy, errors)
        assert waits == [0.0, 0.0]
        _, waits = _waits(policy, [ValueError("final")])
        assert waits == [None]  # still only transient errors are retried
    assert not retry_waits_disabled()
    _, waits = _waits(policy, errors)
    assert waits[0] == 100.0
    assert waits[1] is not None and 10.0 <= waits[1] <= 11.0


def test_disable_retry_waits_is_undone_by_an_exception() -> None:
    with pytest.raises(RuntimeError), disable_retry_waits():
        raise RuntimeError("boom")
    assert not retry_waits_disabled()
    _, (wait,) = _waits(NO_JITTER, [TransientError("503")])
    assert wait == pytest.approx(0.1)


def test_fetch_error_is_a_dataio_error() -> None:
    assert issubclass(FetchError, DataIOError)
