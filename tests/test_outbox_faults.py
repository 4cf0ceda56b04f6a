"""Exactly-once Stripe effects under faults, against a local server that honours idempotency keys.

Lost responses, timeouts, 5xx answers, a crash between Stripe's answer and the
local write, Stripe forgetting keys after 24 h, and permanent 4xx answers: in
every case one local operation makes exactly one Stripe effect, and nothing
owed to Stripe is lost (DESIGN.md §4.4, §4a.8).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from rational_billing import Billing, BillingConfig, EventOutcome, Mode, ModeKeys, SyncState
from rational_billing.adapters._retry import RetryPolicy
from rational_billing.adapters.stripe_gateway import StripeGateway
from rational_billing.domain.models import OutboxState
from rational_billing.ports import StripeAPI
from rational_billing.storage.sql import SQLStorage
from rational_billing.testing import RecordingMailer, make_event, sign_payload

from .fakestripe import FakeStripe

ACCOUNT = "acct_1FAULTSAAAAAAA"
SECRET = "whsec_faults"


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC).replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now


class SimulatedCrash(BaseException):
    """The process died at this point (nothing after it ran)."""


class CrashAfterAnswer:
    """A StripeAPI that forwards to the gateway and 'dies' right after one chosen answer."""

    def __init__(self, inner: StripeAPI, *, method: str = "POST", path: str = "/v1/customers"):
        self._inner = inner
        self._method = method
        self._path = path
        self.armed = True

    def request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        answer = self._inner.request(method, path, **kwargs)
        if self.armed and method == self._method and path.startswith(self._path):
            self.armed = False
            raise SimulatedCrash(f"after {method} {path}")
        return answer

    def list_all(self, path: str, **kwargs: Any) -> Iterator[dict[str, Any]]:
        return self._inner.list_all(path, **kwargs)


@pytest.fixture
def fake() -> Iterator[FakeStripe]:
    """A running idempotency-honouring fake Stripe."""
    with FakeStripe() as server:
        yield server


@pytest.fixture
def clock() -> Clock:
    """A hand-moved clock."""
    return Clock()


class World:
    """Billings that share one SQLite file, as processes restarted on the same database do."""

    def __init__(self, fake: FakeStripe, tmp_path: Path, clock: Clock) -> None:
        self.fake = fake
        self.url = f"sqlite:///{tmp_path / 'billing.db'}"
        self.clock = clock
        self.config = BillingConfig(
            test=ModeKeys(secret_key="sk_test_faults", webhook_secrets=(SECRET,)),
            api_base=fake.url,
        )
        self.opened: list[Billing] = []

    def gateway(self, *, attempts: int = 1, timeout: float = 5.0) -> StripeGateway:
        retry = RetryPolicy(
            attempts=attempts, initial_wait=0, max_wait=0, retry_after_cap=0, jitter=False
        )
        return StripeGateway(self.config, retry=retry, sleep=lambda _: None, timeout=timeout)

    def billing(self, stripe: StripeAPI | None = None) -> Billing:
        billing = Billing(
            config=self.config,
            storage=SQLStorage(self.url),
            mailer=RecordingMailer(),
            clock=self.clock,
            stripe=stripe if stripe is not None else self.gateway(),
        )
        self.opened.append(billing)
        return billing

    def close(self) -> None:
        for billing in self.opened:
            billing.close()


@pytest.fixture
def world(fake: FakeStripe, tmp_path: Path, clock: Clock) -> Iterator[World]:
    """The fake Stripe, a SQLite file, and a connected tenant 'acme'."""
    w = World(fake, tmp_path, clock)
    first = w.billing()
    first.tenants.connect("acme", ACCOUNT, modes=frozenset({Mode.TEST}))
    yield w
    w.close()


def _posts(fake: FakeStripe, path: str = "/v1/customers") -> list[Any]:
    return fake.calls("POST", path)


def test_lost_response_is_retried_later_with_the_same_key(world: World, clock: Clock) -> None:
    """The response is dropped after Stripe created the customer; push_pending links that one."""
    billing = world.opened[0]
    customer = billing.customers.create("acme", email="lost@example.com")
    world.fake.fail_next("drop")
    pending = billing.customers.create_in_stripe("acme", customer.id, mode=Mode.TEST)
    assert (pending.link, pending.sync_state) == (None, SyncState.PENDING)
    assert len(world.fake.customers(ACCOUNT)) == 1  # Stripe did the work
    clock.now += timedelta(minutes=5)
    assert billing.sync.push_pending() == 1
    (remote,) = world.fake.customers(ACCOUNT)
    linked = billing.customers.get("acme", customer.id)
    assert linked.link is not None and linked.link.stripe_customer_id == remote["id"]
    first, second = _posts(world.fake)
    assert first.headers["Idempotency-Key"] == second.headers["Idempotency-Key"]
    assert second.replayed


def test_gateway_retry_after_a_timeout_replays_instead_of_creating_twice(world: World) -> None:
    """A timed-out POST retried at once by the gateway gets Stripe's saved answer: one customer."""
    billing = world.billing(world.gateway(attempts=3, timeout=0.5))
    customer = billing.customers.create("acme", email="slow@example.com")
    world.fake.fail_next("timeout", delay=1.5)
    linked = billing.customers.create_in_stripe("acme", customer.id, mode=Mode.TEST)
    assert linked.sync_state is SyncState.SYNCED
    (remote,) = world.fake.customers(ACCOUNT)
    assert linked.link is not None and linked.link.stripe_customer_id == remote["id"]
    assert [c.replayed for c in _posts(world.fake)] == [False, True]


def test_a_5xx_keeps_the_entry_queued_until_stripe_accepts(world: World, clock: Clock) -> None:
    """A 503 before any work leaves the entry pending with a backoff; the retry creates one customer."""
    billing = world.opened[0]
    customer = billing.customers.create("acme", email="busy@example.com")
    world.fake.fail_next("error", status=503, save=False)
    assert billing.customers.create_in_stripe("acme", customer.id, mode=Mode.TEST).link is None
    assert billing.sync.push_pending() == 0  # the backoff has not elapsed: no call at all
    assert len(_posts(world.fake)) == 1
    clock.now += timedelta(minutes=1)
    assert billing.sync.push_pending() == 1
    assert len(world.fake.customers(ACCOUNT)) == 1
    assert billing.customers.get("acme", customer.id).sync_state is SyncState.SYNCED


def test_crash_between_stripe_answer_and_local_write_drains_once_after_restart(
    world: World,
) -> None:
    """Stripe created the customer, the process died before writing it; a restart links that one."""
    crashing = CrashAfterAnswer(world.gateway())
    billing = world.billing(crashing)
    customer = billing.customers.create("acme", email="crash@example.com")
    with pytest.raises(SimulatedCrash):
        billing.customers.create_in_stripe("acme", customer.id, mode=Mode.TEST)
    billing.close()

    restarted = world.billing()
    assert restarted.customers.get("acme", customer.id).link is None
    assert restarted.sync.push_pending() == 1
    assert restarted.sync.push_pending() == 0  # drained: nothing is sent twice
    (remote,) = world.fake.customers(ACCOUNT)
    linked = restarted.customers.get("acme", customer.id)
    assert linked.link is not None and linked.link.stripe_customer_id == remote["id"]
    assert [c.replayed for c in _posts(world.fake)] == [False, True]


def test_after_23_hours_a_forgotten_key_is_recovered_by_listing_by_email(
    world: World, clock: Clock
) -> None:
    """Stripe forgot the key; the entry finds its customer by email and metadata, and posts nothing."""
    billing = world.billing(CrashAfterAnswer(world.gateway()))
    customer = billing.customers.create("acme", email="late@example.com")
    world.fake.add_customer(ACCOUNT, email="late@example.com")  # same email, not ours
    with pytest.raises(SimulatedCrash):
        billing.customers.create_in_stripe("acme", customer.id, mode=Mode.TEST)
    world.fake.forget_keys()
    clock.now += timedelta(hours=24)

    restarted = world.billing()
    assert restarted.sync.push_pending() == 1
    ours = [c for c in world.fake.customers(ACCOUNT) if c["metadata"].get("rational_customer_id")]
    assert len(ours) == 1
    linked = restarted.customers.get("acme", customer.id)
    assert linked.link is not None and linked.link.stripe_customer_id == ours[0]["id"]
    assert len(_posts(world.fake)) == 1
    (listing,) = world.fake.calls("GET", "/v1/customers")
    assert listing.query["email"] == "late@example.com"


def test_a_saved_5xx_replayed_again_and_again_is_resolved_from_stripe_state(
    world: World, clock: Clock
) -> None:
    """Stripe did the work but saved a 500 under the key; after repeats, listing finds the customer."""
    billing = world.opened[0]
    customer = billing.customers.create("acme", email="saved500@example.com")
    world.fake.fail_next("error", status=500, commit=True)
    billing.customers.create_in_stripe("acme", customer.id, mode=Mode.TEST)
    for _ in range(6):
        clock.now += timedelta(hours=1)
        billing.sync.push_pending()
    linked = billing.customers.get("acme", customer.id)
    (remote,) = world.fake.customers(ACCOUNT)
    assert linked.link is not None and linked.link.stripe_customer_id == remote["id"]
    assert billing.sync.failed() == []


def test_a_saved_5xx_with_nothing_created_ends_in_the_failed_list(
    world: World, clock: Clock
) -> None:
    """The same replayed 500 with no customer behind it stops retrying and is listed as failed."""
    billing = world.opened[0]
    customer = billing.customers.create("acme", email="broken@example.com")
    world.fake.fail_next("error", status=500)
    billing.customers.create_in_stripe("acme", customer.id, mode=Mode.TEST)
    for _ in range(8):
        clock.now += timedelta(hours=1)
        billing.sync.push_pending()
    (failed,) = billing.sync.failed()
    assert failed.operation == "customer.create" and failed.state is OutboxState.FAILED
    assert "500" in (failed.last_error or "")
    assert billing.customers.get("acme", customer.id).sync_state is SyncState.FAILED
    calls = len(world.fake.requests)
    clock.now += timedelta(days=2)
    assert billing.sync.push_pending() == 0
    assert len(world.fake.requests) == calls
    assert world.fake.customers(ACCOUNT) == []


def test_permanent_4xx_on_update_goes_to_the_visible_failed_list(
    world: World, clock: Clock
) -> None:
    """A 400 on a pushed update is listed by sync.failed() with its error and never retried."""
    billing = world.opened[0]
    customer = billing.customers.create("acme", email="ok@example.com")
    linked = billing.customers.create_in_stripe("acme", customer.id, mode=Mode.TEST)
    assert linked.link is not None
    world.fake.fail_next("error", status=400, path="/v1/customers/")
    updated = billing.customers.update("acme", customer.id, name="Refused")
    assert (updated.name, updated.sync_state) == ("Refused", SyncState.FAILED)
    (failed,) = billing.sync.failed()
    assert failed.operation == "customer.update"
    assert dict(failed.params) == {
        "name": "Refused",
        "stripe_customer_id": linked.link.stripe_customer_id,
    }
    calls = len(world.fake.requests)
    clock.now += timedelta(days=1)
    assert billing.sync.push_pending() == 0
    assert len(world.fake.requests) == calls


def test_update_while_stripe_is_down_is_retried_with_backoff_and_one_key(
    world: World, clock: Clock
) -> None:
    """Three 503s in a row: each retry waits its backoff, reuses the key, and the change lands once."""
    billing = world.opened[0]
    customer = billing.customers.create("acme", email="retry@example.com")
    linked = billing.customers.create_in_stripe("acme", customer.id, mode=Mode.TEST)
    assert linked.link is not None
    path = f"/v1/customers/{linked.link.stripe_customer_id}"
    world.fake.fail_next("error", status=503, times=3, save=False, path=path)
    updated = billing.customers.update("acme", customer.id, name="Later")
    assert (updated.name, updated.sync_state) == ("Later", SyncState.PENDING)
    assert billing.sync.push_pending() == 0  # 2 s backoff not elapsed: no call
    assert len(_posts(world.fake, path)) == 1
    for wait, sent in ((2, 2), (4, 3)):
        clock.now += timedelta(seconds=wait)
        assert billing.sync.push_pending() == 0
        assert len(_posts(world.fake, path)) == sent
    clock.now += timedelta(seconds=7)
    assert billing.sync.push_pending() == 0  # 8 s backoff not elapsed yet
    assert len(_posts(world.fake, path)) == 3
    clock.now += timedelta(seconds=1)
    assert billing.sync.push_pending() == 1
    assert billing.customers.get("acme", customer.id).sync_state is SyncState.SYNCED
    updates = _posts(world.fake, path)
    assert len(updates) == 4
    assert len({c.headers["Idempotency-Key"] for c in updates}) == 1
    (remote,) = world.fake.customers(ACCOUNT)
    assert remote["name"] == "Later"


def test_crash_after_an_update_answer_is_drained_once_after_restart(world: World) -> None:
    """An update accepted by Stripe but not recorded locally is re-sent once, as a replay."""
    billing = world.opened[0]
    customer = billing.customers.create("acme", email="upd@example.com")
    linked = billing.customers.create_in_stripe("acme", customer.id, mode=Mode.TEST)
    assert linked.link is not None
    path = f"/v1/customers/{linked.link.stripe_customer_id}"
    crashing = world.billing(CrashAfterAnswer(world.gateway(), path=path))
    with pytest.raises(SimulatedCrash):
        crashing.customers.update("acme", customer.id, metadata={"tier": "gold"})
    restarted = world.billing()
    assert restarted.customers.get("acme", customer.id).sync_state is SyncState.PENDING
    assert restarted.sync.push_pending() == 1
    assert restarted.sync.push_pending() == 0
    assert restarted.customers.get("acme", customer.id).sync_state is SyncState.SYNCED
    assert [c.replayed for c in _posts(world.fake, path)] == [False, True]


def test_customer_created_event_in_the_crash_window_links_without_a_second_customer(
    world: World, clock: Clock
) -> None:
    """The webhook for our own create arrives before the restart: it links; the outbox sends nothing more."""
    billing = world.billing(CrashAfterAnswer(world.gateway()))
    customer = billing.customers.create("acme", email="window@example.com")
    with pytest.raises(SimulatedCrash):
        billing.customers.create_in_stripe("acme", customer.id, mode=Mode.TEST)
    (remote,) = world.fake.customers(ACCOUNT)

    restarted = world.billing()
    now = int(clock.now.timestamp())
    event = make_event("customer.created", remote, account=ACCOUNT, created=now)
    payload = json.dumps(event).encode()
    response = restarted.webhooks.handle(payload, sign_payload(payload, SECRET, timestamp=now))
    assert (response.status_code, response.outcome) == (200, EventOutcome.APPLIED)
    assert "metadata" in response.message
    restarted.sync.push_pending()
    linked = restarted.customers.get("acme", customer.id)
    assert linked.link is not None and linked.link.stripe_customer_id == remote["id"]
    assert len(_posts(world.fake, "/v1/customers")) == 1
    assert len(world.fake.customers(ACCOUNT)) == 1
    mailer = restarted.mailer
    assert isinstance(mailer, RecordingMailer) and mailer.sent == []


def test_push_pending_keeps_a_customers_changes_in_order_behind_a_backoff(
    world: World, clock: Clock
) -> None:
    """A later update never overtakes an earlier one waiting out its backoff: Stripe ends with the latest."""
    billing = world.opened[0]
    customer = billing.customers.create("acme", email="order@example.com")
    linked = billing.customers.create_in_stripe("acme", customer.id, mode=Mode.TEST)
    assert linked.link is not None
    path = f"/v1/customers/{linked.link.stripe_customer_id}"
    world.fake.fail_next("error", status=503, save=False, path=path)
    billing.customers.update("acme", customer.id, name="First")  # 503: waits 2 s
    billing.customers.update("acme", customer.id, name="Second")  # queued behind it
    assert billing.sync.push_pending() == 0  # the first is not due, so nothing goes
    assert len(_posts(world.fake, path)) == 1
    clock.now += timedelta(seconds=2)
    assert billing.sync.push_pending() == 2
    assert [c.form["name"] for c in _posts(world.fake, path)] == ["First", "First", "Second"]
    (remote,) = world.fake.customers(ACCOUNT)
    assert remote["name"] == billing.customers.get("acme", customer.id).name == "Second"


def test_an_update_made_while_create_in_stripe_waits_reaches_stripe(
    world: World, clock: Clock
) -> None:
    """Email, name and metadata changed before a queued create lands are pushed right after it."""
    billing = world.opened[0]
    customer = billing.customers.create(
        "acme", email="before@example.com", name="Before", metadata={"a": "1", "b": "2"}
    )
    world.fake.fail_next("error", status=503, save=False)
    assert billing.customers.create_in_stripe("acme", customer.id, mode=Mode.TEST).link is None
    billing.customers.update(
        "acme", customer.id, email="after@example.com", name="After", metadata={"a": None, "c": "3"}
    )
    clock.now += timedelta(minutes=1)
    assert billing.sync.push_pending() == 2  # the create, then the change made meanwhile
    (remote,) = world.fake.customers(ACCOUNT)
    assert (remote["email"], remote["name"]) == ("after@example.com", "After")
    assert remote["metadata"] == {
        "b": "2",
        "c": "3",
        "rational_customer_id": customer.id,
        "rational_tenant": "acme",
    }
    local = billing.customers.get("acme", customer.id)
    assert local.link is not None and local.link.stripe_customer_id == remote["id"]
    assert local.sync_state is SyncState.SYNCED
    assert billing.sync.push_pending() == 0


def test_repeated_5xx_while_stripe_cannot_be_checked_keeps_the_create_queued(
    world: World, clock: Clock
) -> None:
    """Six 503s in a row while listing fails too is an outage, not a saved 5xx: kept, then sent once."""
    billing = world.opened[0]
    customer = billing.customers.create("acme", email="outage@example.com")
    world.fake.fail_next("error", status=503, save=False, times=6)
    world.fake.fail_next("error", method="GET", status=503, save=False, times=2)
    billing.customers.create_in_stripe("acme", customer.id, mode=Mode.TEST)
    for _ in range(5):
        clock.now += timedelta(hours=1)
        assert billing.sync.push_pending() == 0
    assert billing.sync.failed() == []
    assert billing.customers.get("acme", customer.id).sync_state is SyncState.PENDING
    clock.now += timedelta(hours=1)
    assert billing.sync.push_pending() == 1
    (remote,) = world.fake.customers(ACCOUNT)
    linked = billing.customers.get("acme", customer.id)
    assert linked.link is not None and linked.link.stripe_customer_id == remote["id"]
    assert len({c.headers["Idempotency-Key"] for c in _posts(world.fake)}) == 1


def test_repeated_5xx_on_an_update_already_in_stripe_completes_it(
    world: World, clock: Clock
) -> None:
    """Stripe applied the update but replays a saved 500: a read of Stripe's state completes the entry."""
    billing = world.opened[0]
    customer = billing.customers.create("acme", email="applied@example.com")
    linked = billing.customers.create_in_stripe("acme", customer.id, mode=Mode.TEST)
    assert linked.link is not None
    path = f"/v1/customers/{linked.link.stripe_customer_id}"
    world.fake.fail_next("error", status=500, commit=True, path=path)
    billing.customers.update("acme", customer.id, name="Applied")
    for _ in range(6):
        clock.now += timedelta(hours=1)
        billing.sync.push_pending()
    assert billing.sync.failed() == []
    assert billing.customers.get("acme", customer.id).sync_state is SyncState.SYNCED
    (remote,) = world.fake.customers(ACCOUNT)
    assert remote["name"] == "Applied"


class _PausingTransaction:
    """Forwards to a storage transaction, pausing after each read of a customer's outbox queue."""

    def __init__(self, tx: Any, pause: float) -> None:
        self._tx = tx
        self._pause = pause

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tx, name)

    def outbox_for_customer(self, tenant: str, customer_id: str) -> Any:
        found = self._tx.outbox_for_customer(tenant, customer_id)
        time.sleep(self._pause)
        return found


class _PausingStorage:
    """A storage whose transactions pause after reading an outbox queue, to widen races."""

    def __init__(self, inner: SQLStorage, pause: float) -> None:
        self._inner = inner
        self._pause = pause

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        with self._inner.transaction() as tx:
            yield _PausingTransaction(tx, self._pause)

    def close(self) -> None:
        self._inner.close()


@pytest.mark.postgres
def test_concurrent_create_in_stripe_on_postgres_makes_one_stripe_customer(
    fake: FakeStripe, pg_storage_url: str
) -> None:
    """Threads calling create_in_stripe for one customer at once write one entry: one Stripe customer."""
    config = BillingConfig(
        test=ModeKeys(secret_key="sk_test_faults", webhook_secrets=(SECRET,)), api_base=fake.url
    )
    retry = RetryPolicy(attempts=1, initial_wait=0, max_wait=0, retry_after_cap=0, jitter=False)
    billing = Billing(
        config=config,
        storage=_PausingStorage(SQLStorage(pg_storage_url), pause=0.1),
        mailer=RecordingMailer(),
        stripe=StripeGateway(config, retry=retry, sleep=lambda _: None),
    )
    threads = 3
    start = threading.Barrier(threads)
    try:
        billing.tenants.connect("acme", ACCOUNT, modes=frozenset({Mode.TEST}))
        customer = billing.customers.create("acme", email="race@example.com")

        def create(_: int) -> Any:
            start.wait(timeout=30)
            return billing.customers.create_in_stripe("acme", customer.id, mode=Mode.TEST)

        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(create, range(threads)))
        billing.sync.push_pending()
        (remote,) = fake.customers(ACCOUNT)
        assert len({c.headers["Idempotency-Key"] for c in _posts(fake)}) == 1
        linked = billing.customers.get("acme", customer.id)
        assert linked.link is not None and linked.link.stripe_customer_id == remote["id"]
    finally:
        billing.close()
