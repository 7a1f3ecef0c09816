from __future__ import annotations

import math

import anyio
import anyio.lowlevel
import pytest

from mxm_dataio_async._exceptions import DataIOError, FetchError, TransientError
from mxm_dataio_async._request import build_request
from mxm_dataio_async._retry import NO_RETRY, RetryPolicy, disable_retry_waits, run_with_retries

pytestmark = pytest.mark.anyio

NO_JITTER = RetryPolicy(max_attempts=3, base_delay=0.1, jitter=0)


class FakeTime:
    """A clock and a recording sleep; sleeping advances the clock, nothing really waits."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        assert type(seconds) is float
        self.sleeps.append(seconds)
        self.now += seconds
        await anyio.lowlevel.checkpoint()


class Script:
    """An attempt function that plays outcomes in order: raise exceptions, return anything else."""

    def __init__(self, *outcomes: object, time: FakeTime | None = None, took: float = 0.0) -> None:
        self.outcomes = list(outcomes)
        self.calls: list[int] = []
        self.time = time
        self.took = took

    async def __call__(self, attempt: int) -> object:
        self.calls.append(attempt)
        if self.time is not None:
            self.time.now += self.took
        outcome = self.outcomes[min(attempt, len(self.outcomes)) - 1]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


class Failures:
    """An ``on_failure`` hook that records its calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, BaseException, float]] = []

    async def __call__(self, attempt: int, error: BaseException, elapsed: float) -> None:
        self.calls.append((attempt, error, elapsed))


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


# -- retrying ---------------------------------------------------------------------------------


async def test_first_attempt_success_is_the_fast_path() -> None:
    time = FakeTime()
    failures = Failures()
    script = Script("ok")
    result = await run_with_retries(
        NO_JITTER, script, on_failure=failures, sleep=time.sleep, clock=time.clock
    )
    assert result == "ok"
    assert script.calls == [1]
    assert failures.calls == []
    assert time.sleeps == []


async def test_transient_errors_are_retried_until_success() -> None:
    time = FakeTime()
    script = Script(TransientError("503"), TransientError("reset"), "ok")
    result = await run_with_retries(NO_JITTER, script, sleep=time.sleep, clock=time.clock)
    assert result == "ok"
    assert script.calls == [1, 2, 3]
    assert time.sleeps == pytest.approx([0.1, 0.2])


async def test_exhaustion_raises_fetch_error_with_attempts_and_cause() -> None:
    time = FakeTime()
    request = build_request(session_id="s1", source="example", kind="quote", endpoint="/q")
    last = TransientError("503 Service Unavailable", transport_status=503)
    script = Script(TransientError("timeout"), TransientError("reset"), last)
    with pytest.raises(FetchError) as info:
        await run_with_retries(
            NO_JITTER, script, request=request, sleep=time.sleep, clock=time.clock
        )
    err = info.value
    assert str(err) == "fetch failed after 3 attempts: 503 Service Unavailable"
    assert err.attempts == 3
    assert err.__cause__ is last
    assert err.transport_status == 503
    assert err.request is request
    assert script.calls == [1, 2, 3]
    assert time.sleeps == pytest.approx([0.1, 0.2])  # no wait after the last attempt


async def test_no_retry_policy_makes_one_attempt() -> None:
    time = FakeTime()
    script = Script(TransientError("503"))
    with pytest.raises(FetchError, match="fetch failed after 1 attempt: 503") as info:
        await run_with_retries(NO_RETRY, script, sleep=time.sleep, clock=time.clock)
    assert info.value.attempts == 1
    assert script.calls == [1]
    assert time.sleeps == []


async def test_non_transient_error_is_final_at_once() -> None:
    time = FakeTime()
    failures = Failures()
    boom = ValueError("bad payload")
    script = Script(boom, "never")
    with pytest.raises(FetchError) as info:
        await run_with_retries(
            NO_JITTER, script, on_failure=failures, sleep=time.sleep, clock=time.clock
        )
    assert str(info.value) == "fetch failed: bad payload (not retried: ValueError)"
    assert info.value.attempts == 1
    assert info.value.__cause__ is boom
    assert info.value.transport_status is None
    assert script.calls == [1]
    assert [(n, e) for n, e, _ in failures.calls] == [(1, boom)]
    assert time.sleeps == []


async def test_non_transient_after_transient_stops_there() -> None:
    time = FakeTime()
    boom = KeyError("missing")
    script = Script(TransientError("503"), boom, "never")
    with pytest.raises(FetchError) as info:
        await run_with_retries(NO_JITTER, script, sleep=time.sleep, clock=time.clock)
    assert str(info.value) == "fetch failed after 2 attempts: 'missing' (not retried: KeyError)"
    assert info.value.attempts == 2
    assert info.value.__cause__ is boom


async def test_fetch_error_from_attempt_is_reraised_with_attempts() -> None:
    time = FakeTime()
    request = build_request(session_id="s1", source="example", kind="quote")
    root = OSError("disk")
    final = FetchError("upstream said 404", transport_status=404)
    final.__cause__ = root
    script = Script(TransientError("503"), final)
    with pytest.raises(FetchError) as info:
        await run_with_retries(
            NO_JITTER, script, request=request, sleep=time.sleep, clock=time.clock
        )
    assert info.value is final
    assert info.value.attempts == 2
    assert info.value.__cause__ is root
    assert info.value.request is request
    assert info.value.transport_status == 404


async def test_error_message_falls_back_to_the_type_name() -> None:
    time = FakeTime()
    script = Script(RuntimeError())
    with pytest.raises(FetchError, match=r"^fetch failed: RuntimeError \(not retried: Runtime"):
        await run_with_retries(NO_JITTER, script, sleep=time.sleep, clock=time.clock)


# -- on_failure -------------------------------------------------------------------------------


async def test_on_failure_called_for_every_failed_attempt() -> None:
    time = FakeTime()
    failures = Failures()
    errors = [TransientError("a"), TransientError("b"), TransientError("c")]
    script = Script(*errors, time=time, took=0.25)
    with pytest.raises(FetchError):
        await run_with_retries(
            NO_JITTER, script, on_failure=failures, sleep=time.sleep, clock=time.clock
        )
    assert [(n, e) for n, e, _ in failures.calls] == list(zip([1, 2, 3], errors, strict=True))
    # elapsed is the attempt's own duration, not counting waits
    assert [elapsed for *_, elapsed in failures.calls] == pytest.approx([0.25] * 3)


async def test_on_failure_runs_before_the_wait() -> None:
    time = FakeTime()
    events: list[str] = []

    async def on_failure(attempt: int, error: BaseException, elapsed: float) -> None:
        events.append(f"failure {attempt}")

    async def sleep(seconds: float) -> None:
        events.append("sleep")

    script = Script(TransientError("a"), "ok")
    await run_with_retries(NO_JITTER, script, on_failure=on_failure, sleep=sleep, clock=time.clock)
    assert events == ["failure 1", "sleep"]


async def test_on_failure_error_propagates_unwrapped_and_stops() -> None:
    time = FakeTime()
    hook_error = RuntimeError("store is down")

    async def on_failure(attempt: int, error: BaseException, elapsed: float) -> None:
        if attempt == 2:
            raise hook_error

    script = Script(TransientError("a"), TransientError("b"), "ok")
    with pytest.raises(RuntimeError) as info:
        await run_with_retries(
            NO_JITTER, script, on_failure=on_failure, sleep=time.sleep, clock=time.clock
        )
    assert info.value is hook_error
    assert info.value.__context__ is None  # no internal plumbing leaks into the chain
    assert script.calls == [1, 2]


# -- cancellation and BaseException -----------------------------------------------------------


async def test_cancellation_during_an_attempt_is_not_retried_or_wrapped() -> None:
    failures = Failures()
    calls: list[int] = []
    time = FakeTime()

    async def attempt(n: int) -> str:
        calls.append(n)
        if n == 1:
            raise TransientError("503")
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    outcome: list[str] = []

    async def run() -> None:
        try:
            await run_with_retries(
                NO_JITTER, attempt, on_failure=failures, sleep=time.sleep, clock=time.clock
            )
        except anyio.get_cancelled_exc_class():
            outcome.append("cancelled")
            raise
        except BaseException as exc:  # what this test guards against: wrapping the cancellation
            outcome.append(repr(exc))
            raise

    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            while calls != [1, 2]:
                await anyio.lowlevel.checkpoint()
            scope.cancel()
    assert scope.cancelled_caught
    assert outcome == ["cancelled"]
    assert calls == [1, 2]
    assert [n for n, *_ in failures.calls] == [1]  # never for the cancellation


async def test_cancellation_during_a_wait_propagates() -> None:
    failures = Failures()
    script = Script(TransientError("503"), "ok")
    sleeping = anyio.Event()

    async def sleep(seconds: float) -> None:
        sleeping.set()
        await anyio.sleep_forever()

    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                lambda: run_with_retries(NO_JITTER, script, on_failure=failures, sleep=sleep)
            )
            await sleeping.wait()
            scope.cancel()
    assert scope.cancelled_caught
    assert script.calls == [1]
    assert [n for n, *_ in failures.calls] == [1]


async def test_cancellation_of_the_first_attempt() -> None:
    with anyio.CancelScope() as scope:
        scope.cancel()
        await run_with_retries(NO_JITTER, _sleep_then_fail)
    assert scope.cancelled_caught


async def _sleep_then_fail(attempt: int) -> None:
    await anyio.sleep_forever()


@pytest.mark.parametrize("attempt_number", [1, 2])
async def test_keyboard_interrupt_passes_through_untouched(attempt_number: int) -> None:
    time = FakeTime()
    failures = Failures()
    interrupt = KeyboardInterrupt()
    outcomes: list[object] = [TransientError("503")] * (attempt_number - 1) + [interrupt]
    script = Script(*outcomes)
    with pytest.raises(KeyboardInterrupt) as info:
        await run_with_retries(
            NO_JITTER, script, on_failure=failures, sleep=time.sleep, clock=time.clock
        )
    assert info.value is interrupt
    assert script.calls == list(range(1, attempt_number + 1))
    assert len(failures.calls) == attempt_number - 1


# -- waits ------------------------------------------------------------------------------------


async def test_waits_are_exponential_and_capped() -> None:
    time = FakeTime()
    policy = RetryPolicy(max_attempts=7, base_delay=0.5, multiplier=2, max_delay=3, jitter=0)
    script = Script(TransientError("503"))
    with pytest.raises(FetchError, match="after 7 attempts"):
        await run_with_retries(policy, script, sleep=time.sleep, clock=time.clock)
    assert time.sleeps == pytest.approx([0.5, 1, 2, 3, 3, 3])


async def test_jitter_stays_within_bounds() -> None:
    time = FakeTime()
    policy = RetryPolicy(max_attempts=60, base_delay=1, multiplier=1, max_delay=1, jitter=0.5)
    script = Script(TransientError("503"))
    with pytest.raises(FetchError):
        await run_with_retries(policy, script, sleep=time.sleep, clock=time.clock)
    assert len(time.sleeps) == 59
    assert all(1.0 <= s <= 1.5 for s in time.sleeps)
    assert len(set(time.sleeps)) > 1  # actually random


async def test_retry_after_is_never_waited_less_than() -> None:
    time = FakeTime()
    policy = RetryPolicy(max_attempts=4, base_delay=0.1, max_delay=1.0, jitter=0)
    script = Script(
        TransientError("429", retry_after=0.05),  # below the backoff: backoff wins
        TransientError("429", retry_after=0.7),
        TransientError("429", retry_after=30.0),  # far above max_delay: still honoured
        "ok",
    )
    assert await run_with_retries(policy, script, sleep=time.sleep, clock=time.clock) == "ok"
    assert time.sleeps == pytest.approx([0.1, 0.7, 30.0])


async def test_retry_after_with_jitter() -> None:
    time = FakeTime()
    policy = RetryPolicy(max_attempts=2, base_delay=0.1, jitter=0.2)
    script = Script(TransientError("429", retry_after=5), "ok")
    await run_with_retries(policy, script, sleep=time.sleep, clock=time.clock)
    assert time.sleeps == [5.0]


async def test_deadline_gives_up_before_a_wait_that_would_pass_it() -> None:
    time = FakeTime()
    policy = RetryPolicy(max_attempts=10, base_delay=1, multiplier=2, jitter=0, deadline=5)
    script = Script(TransientError("503", transport_status=503), time=time, took=0.5)
    with pytest.raises(FetchError) as info:
        await run_with_retries(policy, script, sleep=time.sleep, clock=time.clock)
    # attempts end at 0.5, 2.0 (after 1 s wait), 4.5 (after 2 s); a 4 s wait would end at 8.5.
    assert script.calls == [1, 2, 3]
    assert time.sleeps == pytest.approx([1, 2])
    assert info.value.attempts == 3
    assert str(info.value) == (
        "fetch failed after 3 attempts: 503 (gave up: waiting 4s more would pass the 5s retry "
        "deadline)"
    )
    assert info.value.transport_status == 503


async def test_deadline_counts_retry_after() -> None:
    time = FakeTime()
    policy = RetryPolicy(max_attempts=5, jitter=0, deadline=10)
    script = Script(TransientError("429", retry_after=60), "ok")
    with pytest.raises(FetchError, match="retry deadline") as info:
        await run_with_retries(policy, script, sleep=time.sleep, clock=time.clock)
    assert info.value.attempts == 1
    assert time.sleeps == []


async def test_deadline_allows_retries_that_fit() -> None:
    time = FakeTime()
    policy = RetryPolicy(max_attempts=3, base_delay=1, jitter=0, deadline=10)
    script = Script(TransientError("a"), TransientError("b"), "ok", time=time, took=1)
    assert await run_with_retries(policy, script, sleep=time.sleep, clock=time.clock) == "ok"
    assert time.sleeps == pytest.approx([1, 2])


async def test_disable_retry_waits_makes_waits_zero_and_nests() -> None:
    time = FakeTime()
    policy = RetryPolicy(max_attempts=3, base_delay=5, jitter=1)
    with disable_retry_waits():
        with disable_retry_waits():
            script = Script(TransientError("429", retry_after=100), TransientError("503"), "ok")
            assert await run_with_retries(policy, script, sleep=time.sleep, clock=time.clock)
        assert time.sleeps == [0.0, 0.0]
        assert script.calls == [1, 2, 3]
        script = Script(TransientError("503"), "ok")
        await run_with_retries(policy, script, sleep=time.sleep, clock=time.clock)
        assert time.sleeps == [0.0, 0.0, 0.0]
    script = Script(TransientError("503"), "ok")
    await run_with_retries(policy, script, sleep=time.sleep, clock=time.clock)
    assert 5.0 <= time.sleeps[-1] <= 6.0


async def test_default_sleep_and_clock() -> None:
    policy = RetryPolicy(max_attempts=2, base_delay=0, jitter=0)
    script = Script(TransientError("503"), "ok")
    assert await run_with_retries(policy, script) == "ok"


async def test_concurrent_runs_do_not_share_state() -> None:
    time = FakeTime()
    results: dict[int, object] = {}

    async def one(i: int) -> None:
        script = Script(*[TransientError(str(i))] * (i % 3), f"ok{i}")
        results[i] = await run_with_retries(NO_JITTER, script, sleep=time.sleep, clock=time.clock)

    async with anyio.create_task_group() as tg:
        for i in range(30):
            tg.start_soon(one, i)
    assert results == {i: f"ok{i}" for i in range(30)}


def test_fetch_error_is_a_dataio_error() -> None:
    assert issubclass(FetchError, DataIOError)
