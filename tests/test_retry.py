"""The retry policy: which failures are retried, how long to wait, and the retry loop."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rational_billing.adapters._retry import (
    AttemptFailed,
    RetryPolicy,
    call_with_retries,
    header,
    retry_after,
    should_retry,
)
from rational_billing.errors import ConfigError, StripeAPIError


def _failure(status: int | None, *, retryable: bool, after: float | None = None) -> AttemptFailed:
    return AttemptFailed(
        StripeAPIError("boom", status=status, retryable=retryable), retry_after=after
    )


class Script:
    """An attempt that raises the scripted failures in turn, then returns ``result``."""

    def __init__(self, *failures: BaseException, result: str = "ok") -> None:
        self.failures = list(failures)
        self.result = result
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return self.result


@pytest.mark.parametrize(
    ("status", "headers", "expected"),
    [
        (409, {}, True),
        (429, {}, True),
        (500, {}, True),
        (502, {}, True),
        (503, {}, True),
        (None, {}, True),
        (400, {}, False),
        (401, {}, False),
        (402, {}, False),
        (403, {}, False),
        (404, {}, False),
        (500, {"Stripe-Should-Retry": "false"}, False),
        (429, {"stripe-should-retry": "false"}, False),
        (None, {"Stripe-Should-Retry": "false"}, False),
        (400, {"Stripe-Should-Retry": "true"}, True),
        (404, {"STRIPE-SHOULD-RETRY": " True "}, True),
        (400, {"Stripe-Should-Retry": "maybe"}, False),
        (503, {"Stripe-Should-Retry": "maybe"}, True),
    ],
)
def test_should_retry_follows_stripe(
    status: int | None, headers: dict[str, str], expected: bool
) -> None:
    """Stripe-Should-Retry decides when present; otherwise 409, 429, 5xx and no response retry."""
    assert should_retry(status, headers) is expected


def test_header_lookup_ignores_case() -> None:
    """Header names match whatever their case."""
    assert header({"request-id": "req_1"}, "Request-Id") == "req_1"
    assert header({"Request-Id": "req_1"}, "REQUEST-ID") == "req_1"
    assert header({}, "Request-Id") is None
    assert header(None, "Request-Id") is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [("3", 3.0), ("1.5", 1.5), (" 0 ", 0.0), ("soon", None), ("-1", None), ("nan", None)],
)
def test_retry_after_parses_seconds(value: str, expected: float | None) -> None:
    """Retry-After is read as seconds; anything else is ignored."""
    assert retry_after({"Retry-After": value}) == expected


def test_retry_after_absent() -> None:
    """No Retry-After header means no hint."""
    assert retry_after({"Request-Id": "req_1"}) is None


def test_none_policy_tries_once_without_waiting() -> None:
    """RetryPolicy.none() makes one attempt and never waits."""
    policy = RetryPolicy.none()
    assert policy.attempts == 1
    assert policy.backoff(1) == 0
    assert policy.wait(1, 10.0) == 0


def test_backoff_doubles_up_to_max_wait() -> None:
    """Without jitter the wait doubles from initial_wait and stops at max_wait."""
    policy = RetryPolicy(initial_wait=0.5, max_wait=3.0, jitter=False)
    assert [policy.backoff(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]


@given(failures=st.integers(min_value=1, max_value=60))
def test_jittered_backoff_stays_in_band(failures: int) -> None:
    """Jitter keeps every wait between half the exponential wait and the wait itself."""
    policy = RetryPolicy(initial_wait=0.5, max_wait=8.0, jitter=True)
    base = min(0.5 * 2.0 ** (failures - 1), 8.0)
    assert base / 2 <= policy.backoff(failures) <= base


def test_retry_after_wins_and_is_capped() -> None:
    """A Retry-After hint replaces backoff, up to retry_after_cap."""
    policy = RetryPolicy(retry_after_cap=30.0, jitter=False)
    assert policy.wait(1, 3.0) == 3.0
    assert policy.wait(1, 120.0) == 30.0
    assert policy.wait(2, None) == 1.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"attempts": 0},
        {"attempts": 1.5},
        {"attempts": True},
        {"initial_wait": -1.0},
        {"max_wait": float("inf")},
        {"retry_after_cap": float("nan")},
    ],
)
def test_invalid_policy_is_a_config_error(kwargs: dict[str, object]) -> None:
    """A policy with no attempts or a negative or infinite wait is refused."""
    with pytest.raises(ConfigError):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_retries_until_success_and_sleeps_between() -> None:
    """Retryable failures are repeated, with the policy's waits, until an attempt succeeds."""
    sleeps: list[float] = []
    attempt = Script(_failure(503, retryable=True), _failure(None, retryable=True))
    policy = RetryPolicy(attempts=4, initial_wait=0.5, jitter=False)
    assert call_with_retries(attempt, policy, sleep=sleeps.append) == "ok"
    assert attempt.calls == 3
    assert sleeps == [0.5, 1.0]


def test_final_failure_is_not_retried() -> None:
    """A failure that is not retryable is raised after one attempt, without waiting."""
    sleeps: list[float] = []
    attempt = Script(_failure(400, retryable=False))
    with pytest.raises(StripeAPIError) as info:
        call_with_retries(attempt, RetryPolicy(jitter=False), sleep=sleeps.append)
    assert attempt.calls == 1
    assert sleeps == []
    assert info.value.status == 400
    assert info.value.retryable is False


def test_gives_up_after_the_last_attempt() -> None:
    """When attempts run out, the last error is raised as a retryable StripeAPIError."""
    sleeps: list[float] = []
    attempt = Script(*[_failure(500 + n, retryable=True) for n in range(5)])
    with pytest.raises(StripeAPIError) as info:
        call_with_retries(attempt, RetryPolicy(attempts=3, jitter=False), sleep=sleeps.append)
    assert attempt.calls == 3
    assert sleeps == [0.5, 1.0]
    assert info.value.status == 502
    assert info.value.retryable is True
    assert not isinstance(info.value, AttemptFailed)


def test_retry_after_hint_is_used_for_the_wait() -> None:
    """The wait after a failure carrying Retry-After is that many seconds, capped."""
    sleeps: list[float] = []
    attempt = Script(
        _failure(429, retryable=True, after=2.0), _failure(429, retryable=True, after=99.0)
    )
    policy = RetryPolicy(attempts=3, retry_after_cap=10.0)
    assert call_with_retries(attempt, policy, sleep=sleeps.append) == "ok"
    assert sleeps == [2.0, 10.0]


def test_other_exceptions_propagate_untouched() -> None:
    """An exception that is not an attempt failure is neither retried nor wrapped."""
    attempt = Script(KeyError("bug"))
    with pytest.raises(KeyError):
        call_with_retries(attempt, RetryPolicy(), sleep=lambda _: None)
    assert attempt.calls == 1


def test_none_policy_makes_one_attempt() -> None:
    """With RetryPolicy.none() even a retryable failure is raised at once."""
    attempt = Script(_failure(503, retryable=True))
    with pytest.raises(StripeAPIError) as info:
        call_with_retries(attempt, RetryPolicy.none(), sleep=lambda _: None)
    assert attempt.calls == 1
    assert info.value.retryable is True


def test_cause_of_the_attempt_failure_is_kept() -> None:
    """The error raised in the end is chained to what caused the last failure."""
    root = ConnectionError("refused")
    try:
        raise _failure(None, retryable=True) from root
    except AttemptFailed as failure:
        scripted = failure
    with pytest.raises(StripeAPIError) as info:
        call_with_retries(Script(scripted), RetryPolicy.none(), sleep=lambda _: None)
    assert info.value.__cause__ is root
