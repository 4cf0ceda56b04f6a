"""Token buckets that keep Stripe calls under Stripe's rate limits (§4a.13).

Stripe limits requests per account and mode (by default 100 operations per
second live, 25 in test mode, and 20 per second for the Search API). One
bucket per (account, mode) and, for search endpoints, one more per (account,
mode), so that a long backfill never provokes a 429.

A caller that finds its bucket empty *reserves* the next token and sleeps
until it is due, outside the lock. Concurrent callers therefore queue fairly,
and the clock and the sleep function can be fakes in tests.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from .._config import Mode, RateLimits
from ..errors import ConfigError

__all__ = ["TokenBucket", "RateLimiter", "PLATFORM"]

#: The bucket key used for calls on the platform's own account (``account=None``).
PLATFORM = "platform"


class TokenBucket:
    """``rate`` tokens per second, holding at most ``burst`` (one second's worth by default).

    Thread-safe. The bucket starts full.

    Raises:
        ConfigError: a rate or burst that is not positive.

    Example::

        bucket = TokenBucket(25.0)
        bucket.acquire()  # returns at once, or after sleeping until a token is free
    """

    def __init__(
        self,
        rate: float,
        *,
        burst: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not rate > 0:
            raise ConfigError(f"a token bucket's rate must be positive, got {rate!r}")
        # A bucket slower than 1/s still lets one call through at once.
        capacity = max(rate, 1.0) if burst is None else burst
        if not capacity > 0:
            raise ConfigError(f"a token bucket's burst must be positive, got {burst!r}")
        self._rate = float(rate)
        self._burst = float(capacity)
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._tokens = self._burst
        self._updated = clock()

    def __repr__(self) -> str:
        return f"<TokenBucket rate={self._rate:g}/s burst={self._burst:g}>"

    @property
    def rate(self) -> float:
        """Tokens added per second."""
        return self._rate

    @property
    def burst(self) -> float:
        """The most tokens the bucket holds."""
        return self._burst

    def reserve(self) -> float:
        """Take one token now, possibly on credit; returns the seconds until it is due."""
        with self._lock:
            now = self._clock()
            if now > self._updated:
                self._tokens = min(self._burst, self._tokens + (now - self._updated) * self._rate)
                self._updated = now
            self._tokens -= 1.0
            if self._tokens >= 0:
                return 0.0
            return -self._tokens / self._rate

    def acquire(self) -> float:
        """Take one token, sleeping until it is due; returns the seconds slept."""
        delay = self.reserve()
        if delay > 0:
            self._sleep(delay)
        return delay


class RateLimiter:
    """One `TokenBucket` per (account, mode), with rates from `RateLimits`.

    ``account=None`` (the platform's own account) has its own buckets, apart
    from every connected account. Search endpoints also draw from a second,
    slower bucket per (account, mode).

    Example::

        limiter = RateLimiter(config.rate_limits)
        limiter.acquire("acct_123", Mode.LIVE)
    """

    def __init__(
        self,
        limits: RateLimits,
        *,
        clock: Callable[[], float] | None = None,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        self._limits = limits
        self._clock = clock or time.monotonic
        self._sleep = sleep or time.sleep
        self._lock = threading.Lock()
        self._buckets: dict[tuple[str, Mode, bool], TokenBucket] = {}

    def __repr__(self) -> str:
        return f"<RateLimiter {self._limits!r} buckets={len(self._buckets)}>"

    def bucket(self, account: str | None, mode: Mode, *, search: bool = False) -> TokenBucket:
        """The bucket of (account, mode), or of its search endpoints; created on first use."""
        key = (account or PLATFORM, mode, search)
        bucket = self._buckets.get(key)
        if bucket is None:
            with self._lock:
                bucket = self._buckets.get(key)
                if bucket is None:
                    rate = self._limits.search if search else self._limits.for_mode(mode)
                    bucket = TokenBucket(rate, clock=self._clock, sleep=self._sleep)
                    self._buckets[key] = bucket
        return bucket

    def acquire(self, account: str | None, mode: Mode, *, search: bool = False) -> float:
        """Wait until one more call for (account, mode) fits the limits; returns the seconds slept.

        A search call needs a token from both the global and the search bucket.
        """
        delay = self.bucket(account, mode).reserve()
        if search:
            delay = max(delay, self.bucket(account, mode, search=True).reserve())
        if delay > 0:
            self._sleep(delay)
        return delay
