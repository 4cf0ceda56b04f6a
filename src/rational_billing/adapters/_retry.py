"""Retries for Stripe calls: the `RetryPolicy` value and the loop that applies it.

All of tenacity stays inside this module: nothing it defines is ever seen by
callers, and it is the only place that decides whether to try again (§4a.8):

- a ``Stripe-Should-Retry`` header, when present, decides;
- otherwise 409, 429, 5xx and connection errors are retried, nothing else;
- ``Retry-After`` (in seconds) is honoured, up to ``retry_after_cap``;
- otherwise the wait grows exponentially, with jitter.

The caller's idempotency key is part of the attempt it hands in, so every
attempt of one call sends the same key.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping
from typing import TypeVar

import attrs
import tenacity

from ..errors import ConfigError, StripeAPIError

__all__ = [
    "RetryPolicy",
    "AttemptFailed",
    "should_retry",
    "retry_after",
    "header",
    "call_with_retries",
]

T = TypeVar("T")

#: Statuses worth repeating when Stripe does not say otherwise: a conflict
#: (such as a concurrent request with the same idempotency key) and rate limits.
_RETRYABLE_STATUSES = frozenset({409, 429})


@attrs.frozen
class RetryPolicy:
    """How often and how patiently a Stripe call is repeated.

    Args:
        attempts: total tries, the first one included (1 means no retry).
        initial_wait: seconds before the first retry; doubled for each next one.
        max_wait: the longest exponential wait, in seconds.
        retry_after_cap: the longest wait a ``Retry-After`` header may ask for.
        jitter: spread waits at random over [wait/2, wait], so that clients
            that failed together do not retry together.

    Raises:
        ConfigError: fewer than one attempt, or a negative wait.

    Example::

        StripeGateway(config, retry=RetryPolicy(attempts=6, max_wait=20.0))
        StripeGateway(config, retry=RetryPolicy.none())  # tests: one try, no waiting
    """

    attempts: int = 4
    initial_wait: float = 0.5
    max_wait: float = 8.0
    retry_after_cap: float = 30.0
    jitter: bool = True

    def __attrs_post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int):
            raise ConfigError(f"RetryPolicy.attempts must be an int, got {self.attempts!r}")
        if self.attempts < 1:
            raise ConfigError(f"RetryPolicy.attempts must be at least 1, got {self.attempts!r}")
        for name in ("initial_wait", "max_wait", "retry_after_cap"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"RetryPolicy.{name} must be a finite number >= 0, got {value!r}")

    @classmethod
    def none(cls) -> RetryPolicy:
        """One attempt and no waiting: what tests usually want."""
        return cls(attempts=1, initial_wait=0.0, max_wait=0.0, retry_after_cap=0.0, jitter=False)

    def backoff(self, failures: int) -> float:
        """Seconds to wait after ``failures`` failed attempts (1 for the first), without hints."""
        base = min(self.initial_wait * 2.0 ** max(failures - 1, 0), self.max_wait)
        if self.jitter and base > 0:
            # Jitter only spreads load; it needs no cryptographic randomness.
            return random.uniform(base / 2, base)  # noqa: S311
        return base

    def wait(self, failures: int, retry_after: float | None) -> float:
        """Seconds to wait before the next attempt: ``Retry-After`` (capped) wins over backoff."""
        if retry_after is not None:
            return min(retry_after, self.retry_after_cap)
        return self.backoff(failures)


class AttemptFailed(Exception):
    """One attempt failed: ``error`` is what to raise if it stays failed.

    Raised by the attempt handed to `call_with_retries`, which retries when
    ``error.retryable`` and waits ``retry_after`` seconds when Stripe asked for it.
    """

    def __init__(self, error: StripeAPIError, *, retry_after: float | None = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.retry_after = retry_after


def header(headers: Mapping[str, str] | None, name: str) -> str | None:
    """The value of header ``name`` in ``headers``, compared without case, or None."""
    if not headers:
        return None
    value = headers.get(name)
    if value is not None:
        return value
    wanted = name.lower()
    for key, candidate in headers.items():
        if key.lower() == wanted:
            return candidate
    return None


def should_retry(status: int | None, headers: Mapping[str, str] | None = None) -> bool:
    """Whether a failed attempt may succeed if repeated with the same idempotency key.

    ``status`` is None when no response arrived (a connection error or a
    timeout). ``Stripe-Should-Retry: true|false`` overrides the status.
    """
    verdict = header(headers, "Stripe-Should-Retry")
    if verdict is not None:
        verdict = verdict.strip().lower()
        if verdict == "true":
            return True
        if verdict == "false":
            return False
    if status is None:
        return True
    return status in _RETRYABLE_STATUSES or status >= 500


def retry_after(headers: Mapping[str, str] | None) -> float | None:
    """The ``Retry-After`` header in seconds, or None when absent or not a number of seconds."""
    value = header(headers, "Retry-After")
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    if math.isnan(seconds) or seconds < 0:
        return None
    return seconds


def call_with_retries(
    attempt: Callable[[], T],
    policy: RetryPolicy,
    *,
    sleep: Callable[[float], None],
) -> T:
    """Run ``attempt`` until it returns, retrying the `AttemptFailed` it raises when retryable.

    Anything else ``attempt`` raises propagates at once.

    Raises:
        StripeAPIError: the error of the last attempt, when it was final or the
            attempts ran out; ``retryable`` says which.
    """

    def wait(state: tenacity.RetryCallState) -> float:
        failure = state.outcome.exception() if state.outcome is not None else None
        hint = failure.retry_after if isinstance(failure, AttemptFailed) else None
        return policy.wait(state.attempt_number, hint)

    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(policy.attempts),
        wait=wait,
        retry=tenacity.retry_if_exception(
            lambda exc: isinstance(exc, AttemptFailed) and exc.error.retryable
        ),
        sleep=sleep,
        reraise=True,
    )
    try:
        return retrying(attempt)
    except AttemptFailed as failure:
        # The cause (if any) is the transport error; Stripe's own exception is
        # left out on purpose: its body may echo a (masked) key.
        raise failure.error from failure.__cause__
