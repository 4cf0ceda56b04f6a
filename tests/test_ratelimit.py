"""Token buckets per (account, mode), driven by a fake clock: nothing here really sleeps."""

from __future__ import annotations

import threading

import pytest

from rational_billing import Mode, RateLimits
from rational_billing.adapters._ratelimit import RateLimiter, TokenBucket
from rational_billing.errors import ConfigError


class FakeTime:
    """A monotonic clock that only moves when something sleeps on it."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def elapsed(self, since: float = 1000.0) -> float:
        return self.now - since


@pytest.fixture
def fake() -> FakeTime:
    """A fresh fake clock."""
    return FakeTime()


def _limiter(fake: FakeTime, limits: RateLimits | None = None) -> RateLimiter:
    return RateLimiter(limits or RateLimits(), clock=fake.clock, sleep=fake.sleep)


@pytest.mark.parametrize(("rate", "count"), [(25.0, 25), (25.0, 100), (100.0, 350), (3.0, 10)])
def test_n_acquisitions_take_n_minus_burst_over_rate(
    fake: FakeTime, rate: float, count: int
) -> None:
    """N acquisitions from a full bucket take (N - burst) / rate seconds."""
    bucket = TokenBucket(rate, clock=fake.clock, sleep=fake.sleep)
    for _ in range(count):
        bucket.acquire()
    assert fake.elapsed() == pytest.approx(max(count - rate, 0) / rate)


def test_full_bucket_allows_one_seconds_burst(fake: FakeTime) -> None:
    """The bucket starts full: one second's worth of calls goes through without sleeping."""
    bucket = TokenBucket(25.0, clock=fake.clock, sleep=fake.sleep)
    assert bucket.burst == 25.0
    assert [bucket.acquire() for _ in range(25)] == [0.0] * 25
    assert fake.sleeps == []
    assert bucket.acquire() == pytest.approx(1 / 25)


def test_idle_time_refills_but_never_beyond_burst(fake: FakeTime) -> None:
    """Idle time refills the bucket, up to one burst and no more."""
    bucket = TokenBucket(10.0, clock=fake.clock, sleep=fake.sleep)
    for _ in range(10):
        bucket.acquire()
    fake.now += 60.0
    start = fake.now
    for _ in range(15):
        bucket.acquire()
    assert fake.now - start == pytest.approx(0.5)


def test_slow_bucket_still_lets_one_call_through(fake: FakeTime) -> None:
    """A rate below one per second still allows one call at once, then one per 1/rate."""
    bucket = TokenBucket(0.5, clock=fake.clock, sleep=fake.sleep)
    assert bucket.acquire() == 0.0
    assert bucket.acquire() == pytest.approx(2.0)


@pytest.mark.parametrize("rate", [0.0, -1.0])
def test_non_positive_rate_is_refused(rate: float) -> None:
    """A bucket needs a positive rate."""
    with pytest.raises(ConfigError):
        TokenBucket(rate)


def test_concurrent_callers_queue_without_losing_tokens() -> None:
    """Threads sharing a bucket reserve distinct slots: the waits are 1/r, 2/r, ... exactly."""
    lock = threading.Lock()
    waits: list[float] = []

    def record(seconds: float) -> None:
        with lock:
            waits.append(seconds)

    # The clock stands still, so every wait is a pure function of how many
    # tokens were reserved before: a lost update would show as a duplicate.
    bucket = TokenBucket(100.0, clock=lambda: 0.0, sleep=record)
    threads = [
        threading.Thread(target=lambda: [bucket.acquire() for _ in range(50)]) for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(waits) == pytest.approx([k / 100 for k in range(1, 301)])


def test_accounts_have_separate_buckets(fake: FakeTime) -> None:
    """Emptying one account's bucket does not slow another account or the platform."""
    limiter = _limiter(fake)
    for _ in range(25):
        limiter.acquire("acct_a", Mode.TEST)
    assert limiter.acquire("acct_b", Mode.TEST) == 0.0
    assert limiter.acquire(None, Mode.TEST) == 0.0
    assert limiter.acquire("acct_a", Mode.TEST) > 0
    assert limiter.bucket("acct_a", Mode.TEST) is not limiter.bucket("acct_b", Mode.TEST)
    assert limiter.bucket(None, Mode.TEST) is limiter.bucket(None, Mode.TEST)


def test_modes_have_separate_buckets(fake: FakeTime) -> None:
    """Test-mode traffic does not use up the same account's live-mode budget."""
    limiter = _limiter(fake)
    for _ in range(25):
        limiter.acquire("acct_a", Mode.TEST)
    assert limiter.acquire("acct_a", Mode.LIVE) == 0.0


def test_live_bucket_is_faster_than_test(fake: FakeTime) -> None:
    """By default live mode allows 100 calls per second and test mode 25."""
    limiter = _limiter(fake)
    start = fake.now
    for _ in range(200):
        limiter.acquire("acct_a", Mode.TEST)
    test_time = fake.now - start
    start = fake.now
    for _ in range(200):
        limiter.acquire("acct_a", Mode.LIVE)
    live_time = fake.now - start
    assert test_time == pytest.approx((200 - 25) / 25)
    assert live_time == pytest.approx((200 - 100) / 100)
    assert live_time < test_time


def test_rates_come_from_rate_limits(fake: FakeTime) -> None:
    """Configured rates replace the defaults."""
    limiter = _limiter(fake, RateLimits(test=5.0, live=50.0))
    assert limiter.bucket("acct_a", Mode.TEST).rate == 5.0
    assert limiter.bucket("acct_a", Mode.LIVE).rate == 50.0
    for _ in range(10):
        limiter.acquire("acct_a", Mode.TEST)
    assert fake.elapsed() == pytest.approx(1.0)


def test_search_calls_also_draw_from_the_search_bucket(fake: FakeTime) -> None:
    """Search endpoints stay under the search limit even in live mode."""
    limiter = _limiter(fake, RateLimits(search=20.0))
    for _ in range(60):
        limiter.acquire("acct_a", Mode.LIVE, search=True)
    assert fake.elapsed() == pytest.approx((60 - 20) / 20)
    assert limiter.bucket("acct_a", Mode.LIVE, search=True).rate == 20.0
