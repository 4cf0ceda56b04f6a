"""Inbox mode: receive() stores verified events, process_pending() applies them exactly once."""

from __future__ import annotations

import base64
import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import attrs
import pytest

from rational_billing import BillingConfig, Customer, EventOutcome, Mode, ModeKeys
from rational_billing.billing import Billing
from rational_billing.domain._serde import unstructure
from rational_billing.domain.models import ProcessedEvent
from rational_billing.errors import InvalidArgument, StorageError
from rational_billing.ports import Storage, Transaction
from rational_billing.services import webhooks as webhooks_module
from rational_billing.storage import sql as sql_module
from rational_billing.storage.sql import SQLStorage
from rational_billing.testing import (
    InMemoryStorage,
    RecordingMailer,
    build_customer,
    make_event,
    sign_payload,
)
from tests.helpers import NoStripe, link_directly, stored_event

TEST_SECRET = "whsec_test_inbox"
LIVE_SECRET = "whsec_live_inbox"
T0 = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


class _Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


def _billing(storage: Storage, clock: _Clock) -> Billing:
    config = BillingConfig(
        test=ModeKeys(secret_key="sk_test_abc", webhook_secrets=(TEST_SECRET,)),
        live=ModeKeys(secret_key="sk_live_abc", webhook_secrets=(LIVE_SECRET,)),
    )
    billing = Billing(
        config=config, storage=storage, mailer=RecordingMailer(), clock=clock, stripe=NoStripe()
    )
    billing.tenants.register_direct("acme")
    return billing


@pytest.fixture
def clock() -> _Clock:
    """A hand-moved clock starting at T0."""
    return _Clock()


@pytest.fixture
def billing(clock: _Clock) -> Billing:
    """A Billing on InMemoryStorage with the direct tenant 'acme'."""
    return _billing(InMemoryStorage(), clock)


def _updated(stripe_id: str, email: str, **kw: Any) -> dict[str, Any]:
    obj = build_customer(id=stripe_id, email=email, name="New")
    return make_event("customer.updated", obj, created=int(T0.timestamp()), **kw)


def _signed(event: dict[str, Any], secret: str = TEST_SECRET) -> tuple[bytes, dict[str, str]]:
    payload = json.dumps(event).encode()
    return payload, sign_payload(payload, secret, timestamp=int(T0.timestamp()))


def _receive(billing: Billing, event: dict[str, Any], secret: str = TEST_SECRET) -> Any:
    return billing.webhooks.receive(*_signed(event, secret))


def _count_effects(billing: Billing) -> list[str]:
    """Registers a custom handler that leaves one new row per application; returns its log."""
    applied: list[str] = []

    @billing.webhooks.on("customer.updated")
    def mark(ctx: Any) -> None:
        # A fresh id per call: applying an event twice would leave two rows.
        marker = f"mark-{ctx.event['id']}-{len(applied)}"
        ctx.tx.insert_customer(Customer(id=marker, tenant=ctx.tenant.id, email=None))
        ctx.after_commit(lambda: applied.append(ctx.event["id"]))

    return applied


def _markers(billing: Billing, tenant: str = "acme") -> list[str]:
    return [c.id for c in billing.customers.list(tenant) if c.id.startswith("mark-")]


# -- receive -----------------------------------------------------------------------


def test_receive_stores_the_event_pending_and_applies_nothing(billing: Billing) -> None:
    """receive() answers 200 'pending' and stores the raw body; nothing is applied yet."""
    customer = link_directly(billing, "cus_A1")
    event = _updated("cus_A1", "new@example.com")
    payload, headers = _signed(event)
    response = billing.webhooks.receive(payload, headers)
    assert (response.status_code, response.outcome) == (200, EventOutcome.PENDING)
    stored = stored_event(billing, event["id"])
    assert stored is not None
    assert (stored.outcome, stored.payload, stored.next_attempt_at) == (
        EventOutcome.PENDING,
        payload,
        T0,
    )
    assert billing.customers.get("acme", customer.id).email == "old@example.com"


@pytest.mark.parametrize("tamper", ["missing", "wrong_secret", "stale", "body_byte", "live"])
def test_receive_rejects_what_handle_rejects_and_stores_nothing(
    billing: Billing, tamper: str
) -> None:
    """receive() answers 400 and stores nothing for the deliveries handle() refuses."""
    event = _updated("cus_A1", "evil@example.com", livemode=tamper == "live")
    payload, headers = _signed(event)
    ts = int(T0.timestamp())
    if tamper == "missing":
        headers = {}
    elif tamper == "wrong_secret":
        headers = sign_payload(payload, "whsec_wrong", timestamp=ts)
    elif tamper == "stale":
        headers = sign_payload(payload, TEST_SECRET, timestamp=ts - 301)
    elif tamper == "body_byte":
        payload = payload.replace(b"evil@", b"evjl@")
    response = billing.webhooks.receive(payload, headers)
    assert response.status_code == 400
    assert stored_event(billing, event["id"]) is None
    with billing.storage.transaction() as tx:
        assert list(tx.claim_events(T0, limit=10, lease=timedelta(minutes=1))) == []


def test_receive_accepts_a_live_event_signed_by_the_live_secret(billing: Billing) -> None:
    """A livemode=true event signed with the live secret is stored pending."""
    response = _receive(billing, _updated("cus_L1", "x@example.com", livemode=True), LIVE_SECRET)
    assert (response.status_code, response.outcome) == (200, EventOutcome.PENDING)


def test_receive_of_a_stored_id_is_a_duplicate_and_changes_nothing(billing: Billing) -> None:
    """A second delivery of a stored event answers 200 'duplicate' and leaves it as it was."""
    event = _updated("cus_A1", "new@example.com")
    _receive(billing, event)
    before = stored_event(billing, event["id"])
    response = _receive(billing, event)
    assert (response.status_code, response.outcome) == (200, EventOutcome.DUPLICATE)
    assert stored_event(billing, event["id"]) == before


class _BrokenStorage:
    """A storage whose transactions always fail, like a database that is down."""

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        raise StorageError("the database is down")
        yield  # pragma: no cover

    def close(self) -> None:
        """Nothing to release."""


def test_receive_answers_500_when_the_event_cannot_bestored_event(clock: _Clock) -> None:
    """When storage fails, receive() answers 500 so that Stripe delivers the event again."""
    config = BillingConfig(test=ModeKeys(secret_key="sk_test_abc", webhook_secrets=(TEST_SECRET,)))
    billing = Billing(config=config, storage=_BrokenStorage(), clock=clock, stripe=NoStripe())
    response = _receive(billing, _updated("cus_A1", "x@example.com"))
    assert response.status_code == 500


# -- process_pending -------------------------------------------------------------------


def test_process_pending_applies_received_events_once(billing: Billing) -> None:
    """Workers apply what receive() stored, through the same handlers, exactly once."""
    customer = link_directly(billing, "cus_A1")
    applied = _count_effects(billing)
    event = _updated("cus_A1", "new@example.com")
    _receive(billing, event)
    assert billing.webhooks.process_pending() == 1
    assert billing.webhooks.process_pending() == 0
    assert billing.customers.get("acme", customer.id).email == "new@example.com"
    assert applied == [event["id"]]  # the after-commit work ran in the worker
    assert len(_markers(billing)) == 1
    stored = stored_event(billing, event["id"])
    assert stored is not None
    assert (stored.outcome, stored.attempts, stored.tenant) == (EventOutcome.APPLIED, 1, "acme")
    assert stored.received_at == T0


def test_process_pending_takes_at_most_limit_oldest_first(billing: Billing, clock: _Clock) -> None:
    """process_pending(limit) applies the oldest pending events first, limit at a time."""
    link_directly(billing, "cus_A1")
    applied = _count_effects(billing)
    events = []
    for i in range(5):
        events.append(_updated("cus_A1", f"n{i}@example.com"))
        _receive(billing, events[-1])
        clock.advance(seconds=1)
    assert billing.webhooks.process_pending(limit=2) == 2
    assert applied == [events[0]["id"], events[1]["id"]]
    assert billing.webhooks.process_pending(limit=10) == 3
    assert applied == [e["id"] for e in events]


@pytest.mark.parametrize("limit", [0, -1, 1.5, True])
def test_process_pending_rejects_a_bad_limit(billing: Billing, limit: Any) -> None:
    """A limit that is not a positive integer raises InvalidArgument."""
    with pytest.raises(InvalidArgument):
        billing.webhooks.process_pending(limit)


def test_failed_event_is_retried_with_backoff_and_stays_visible(
    billing: Billing, clock: _Clock
) -> None:
    """A raising handler leaves the event failed, with its error, retried after 30 s, 60 s..."""
    customer = link_directly(billing, "cus_A1")
    failures = {"left": 2}

    @billing.webhooks.on("customer.updated")
    def flaky(ctx: Any) -> None:
        if failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("downstream hiccup")

    event = _updated("cus_A1", "retry@example.com")
    _receive(billing, event)
    assert billing.webhooks.process_pending() == 1
    stored = stored_event(billing, event["id"])
    assert stored is not None
    assert (stored.outcome, stored.attempts) == (EventOutcome.FAILED, 1)
    assert "downstream hiccup" in (stored.reason or "")
    assert stored.next_attempt_at == T0 + timedelta(seconds=30)
    assert stored.payload is not None
    with billing.storage.transaction() as tx:
        assert [e.event_id for e in tx.events_with_outcome(EventOutcome.FAILED)] == [event["id"]]
    assert billing.customers.get("acme", customer.id).email == "old@example.com"

    clock.advance(seconds=29)
    assert billing.webhooks.process_pending() == 0
    clock.advance(seconds=1)
    assert billing.webhooks.process_pending() == 1
    stored = stored_event(billing, event["id"])
    assert stored is not None
    assert (stored.outcome, stored.attempts) == (EventOutcome.FAILED, 2)
    assert stored.next_attempt_at == clock.now + timedelta(seconds=60)

    clock.advance(seconds=60)
    assert billing.webhooks.process_pending() == 1
    stored = stored_event(billing, event["id"])
    assert stored is not None
    assert (stored.outcome, stored.attempts, stored.next_attempt_at) == (
        EventOutcome.APPLIED,
        3,
        None,
    )
    assert billing.customers.get("acme", customer.id).email == "retry@example.com"


def test_retries_stop_after_max_attempts(billing: Billing, clock: _Clock) -> None:
    """After MAX_ATTEMPTS failures the event stays failed and is no longer claimed."""

    @billing.webhooks.on("customer.updated")
    def broken(ctx: Any) -> None:
        raise RuntimeError("always")

    event = _updated("cus_A1", "x@example.com")
    _receive(billing, event)
    for _ in range(webhooks_module.MAX_ATTEMPTS):
        assert billing.webhooks.process_pending() == 1
        clock.advance(hours=2)
    assert billing.webhooks.process_pending() == 0
    stored = stored_event(billing, event["id"])
    assert stored is not None
    assert (stored.outcome, stored.attempts, stored.next_attempt_at) == (
        EventOutcome.FAILED,
        webhooks_module.MAX_ATTEMPTS,
        None,
    )


def test_handle_failure_is_also_retried_by_workers(billing: Billing, clock: _Clock) -> None:
    """An event that failed in handle() is retried by process_pending once its time comes."""
    customer = link_directly(billing, "cus_A1")
    failures = {"left": 1}

    @billing.webhooks.on("customer.updated")
    def flaky(ctx: Any) -> None:
        if failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("hiccup")

    assert billing.webhooks.handle(*_signed(_updated("cus_A1", "h@example.com"))).status_code == 500
    clock.advance(seconds=30)
    assert billing.webhooks.process_pending() == 1
    assert billing.customers.get("acme", customer.id).email == "h@example.com"


def test_pending_event_for_an_unknown_account_is_held_until_it_connects(
    billing: Billing,
) -> None:
    """A worker holds an event for an account not connected yet; connecting applies it."""
    event = _updated("cus_B1", "b@example.com", account="acct_1NEWTENANT")
    _receive(billing, event)
    assert billing.webhooks.process_pending() == 1
    stored = stored_event(billing, event["id"])
    assert stored is not None
    assert stored.outcome is EventOutcome.HELD
    assert billing.webhooks.process_pending() == 0  # held events are not retried on their own
    billing.tenants.connect("beta", "acct_1NEWTENANT", modes=frozenset({Mode.TEST}))
    stored = stored_event(billing, event["id"])
    assert stored is not None
    # No customer is linked in the new tenant yet: applied by the handler as 'ignored'.
    assert stored.outcome is EventOutcome.IGNORED
    assert stored.tenant == "beta"


def test_handle_applies_a_pending_event_instead_of_calling_it_a_duplicate(
    billing: Billing,
) -> None:
    """A pending event delivered again through handle() is applied there, and only there."""
    customer = link_directly(billing, "cus_A1")
    _count_effects(billing)
    event = _updated("cus_A1", "new@example.com")
    _receive(billing, event)
    response = billing.webhooks.handle(*_signed(event))
    assert (response.status_code, response.outcome) == (200, EventOutcome.APPLIED)
    assert billing.customers.get("acme", customer.id).email == "new@example.com"
    assert billing.webhooks.process_pending() == 0
    assert billing.webhooks.handle(*_signed(event)).outcome is EventOutcome.DUPLICATE
    assert len(_markers(billing)) == 1


def test_events_of_a_worker_that_died_are_applied_after_its_lease(
    billing: Billing, clock: _Clock
) -> None:
    """Events claimed by a worker that never applied them are taken by another after the lease."""
    link_directly(billing, "cus_A1")
    _count_effects(billing)
    event = _updated("cus_A1", "new@example.com")
    _receive(billing, event)
    with billing.storage.transaction() as tx:  # a worker claims, then dies
        assert len(tx.claim_events(clock.now, limit=10, lease=webhooks_module.DEFAULT_LEASE)) == 1
    assert billing.webhooks.process_pending() == 0
    clock.advance(seconds=webhooks_module.DEFAULT_LEASE.total_seconds())
    assert billing.webhooks.process_pending() == 1
    assert len(_markers(billing)) == 1


@pytest.mark.parametrize("role", ["handle", "worker"])
def test_a_transient_storage_failure_is_applied_again_not_failed(
    billing: Billing, role: str
) -> None:
    """A deadlock-like StorageError rolls back and runs the event again: applied once, 200."""
    link_directly(billing, "cus_A1")
    applied = _count_effects(billing)
    hiccups = {"left": 1}

    @billing.webhooks.on("customer.updated")
    def deadlock_once(ctx: Any) -> None:
        if hiccups["left"]:
            hiccups["left"] -= 1
            raise StorageError("deadlock detected", transient=True)

    event = _updated("cus_A1", "new@example.com")
    if role == "handle":
        response = billing.webhooks.handle(*_signed(event))
        assert (response.status_code, response.outcome) == (200, EventOutcome.APPLIED)
    else:
        _receive(billing, event)
        assert billing.webhooks.process_pending() == 1
    stored = stored_event(billing, event["id"])
    assert stored is not None and (stored.outcome, stored.attempts) == (EventOutcome.APPLIED, 1)
    assert applied == [event["id"]]
    assert len(_markers(billing)) == 1


def test_a_lasting_storage_failure_is_recorded_failed(billing: Billing) -> None:
    """A StorageError that is not transient (or keeps coming) answers 500 and is recorded."""
    link_directly(billing, "cus_A1")
    calls: list[bool] = []

    @billing.webhooks.on("customer.updated")
    def always(ctx: Any) -> None:
        calls.append(True)
        raise StorageError("deadlock detected", transient=True)

    event = _updated("cus_A1", "new@example.com")
    response = billing.webhooks.handle(*_signed(event))
    assert (response.status_code, response.outcome) == (500, EventOutcome.FAILED)
    assert len(calls) == webhooks_module.TRANSIENT_TRIES
    stored = stored_event(billing, event["id"])
    assert stored is not None and stored.outcome is EventOutcome.FAILED
    assert "deadlock detected" in (stored.reason or "")


@pytest.mark.postgres
def test_a_postgres_deadlock_is_a_transient_storage_error(pg_storage_url: str) -> None:
    """Two transactions locking two rows in opposite orders: the loser's error is transient."""
    storage = SQLStorage(pg_storage_url)
    with storage.transaction() as tx:
        for n in (1, 2):
            tx.put_customer(Customer(id=f"c{n}", tenant="t", email=None))
    both_hold_one = threading.Barrier(2)
    errors: list[StorageError] = []

    def lock(first: str, second: str) -> None:
        try:
            with storage.transaction() as tx:
                tx.lock_customer("t", first)
                both_hold_one.wait(timeout=10)
                tx.lock_customer("t", second)
        except StorageError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=lock, args=pair) for pair in (("c1", "c2"), ("c2", "c1"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    storage.close()
    assert len(errors) == 1
    assert errors[0].transient
    assert "Deadlock" in str(errors[0])


class _WorkerKilled(BaseException):
    """Stands for a worker process killed mid-batch (out of memory, a hard time limit)."""


def test_an_event_that_kills_its_worker_holds_up_nothing_and_is_given_up(
    billing: Billing, clock: _Clock
) -> None:
    """A dead worker's batch waits out its lease; then one retried event per claim, until given up."""
    for n in (1, 2, 3):
        link_directly(billing, f"cus_A{n}")
    applied = _count_effects(billing)

    @billing.webhooks.on("customer.updated")
    def kill_worker(ctx: Any) -> None:
        if ctx.object["id"] == "cus_A1":
            raise _WorkerKilled

    poison, innocent = _updated("cus_A1", "a1@example.com"), _updated("cus_A2", "a2@example.com")
    for event in (poison, innocent):
        _receive(billing, event)
    with pytest.raises(_WorkerKilled):  # both were in the batch
        billing.webhooks.process_pending()
    assert applied == []

    later = _updated("cus_A3", "later@example.com")
    _receive(billing, later)
    assert billing.webhooks.process_pending() == 1  # the leased batch blocks nothing
    assert applied == [later["id"]]

    lease = webhooks_module.DEFAULT_LEASE.total_seconds()
    clock.advance(seconds=lease)
    # Both were claimed before: one is taken per claim, the other released at
    # once, so whichever comes first, the innocent one is applied.
    results = []
    for _ in range(2):
        try:
            results.append(str(billing.webhooks.process_pending()))
        except _WorkerKilled:
            results.append("killed")
    assert sorted(results) == ["1", "killed"]
    assert applied == [later["id"], innocent["id"]]
    kept = stored_event(billing, innocent["id"])
    assert kept is not None
    assert (kept.outcome, kept.attempts, kept.claims) == (EventOutcome.APPLIED, 1, 0)

    for _ in range(webhooks_module.MAX_UNFINISHED_CLAIMS - 2):
        clock.advance(seconds=lease)
        with pytest.raises(_WorkerKilled):
            billing.webhooks.process_pending()
    clock.advance(seconds=lease)
    assert billing.webhooks.process_pending() == 0  # given up, not claimed again
    gone = stored_event(billing, poison["id"])
    assert gone is not None and gone.outcome is EventOutcome.FAILED
    assert "given up: 5 workers claimed it" in (gone.reason or "")
    assert gone.next_attempt_at is None


def test_a_failed_event_that_kills_its_worker_on_retry_holds_up_nothing(
    billing: Billing, clock: _Clock
) -> None:
    """A retry that kills its worker is found out like a first try: its batchmates get through."""
    for n in range(4):
        link_directly(billing, f"cus_R{n}")
    applied = _count_effects(billing)
    mode = {"poison": "raise"}

    @billing.webhooks.on("customer.updated")
    def flaky_then_deadly(ctx: Any) -> None:
        if ctx.object["id"] == "cus_R0":
            if mode["poison"] == "raise":
                raise RuntimeError("downstream hiccup")
            raise _WorkerKilled

    retried = _updated("cus_R0", "r0@example.com")
    _receive(billing, retried)
    assert billing.webhooks.process_pending() == 1  # failed cleanly, retried in 30 s
    mode["poison"] = "kill"
    others = [_updated(f"cus_R{n}", f"r{n}@example.com") for n in (1, 2, 3)]
    for event in others:
        _receive(billing, event)
    clock.advance(seconds=30)
    with pytest.raises(_WorkerKilled):  # the retry, batched with the new ones, kills the worker
        billing.webhooks.process_pending()
    clock.advance(seconds=webhooks_module.DEFAULT_LEASE.total_seconds())
    for _ in range(len(others) + 1):  # one suspect per claim, the others released
        with suppress(_WorkerKilled):
            billing.webhooks.process_pending()
    assert sorted(applied) == sorted(e["id"] for e in others)


def test_failed_events_due_together_are_retried_as_one_batch(
    billing: Billing, clock: _Clock
) -> None:
    """Events that failed cleanly (an outage downstream) are retried in batches, not one by one."""
    for n in range(5):
        link_directly(billing, f"cus_O{n}")
    down = {"yes": True}
    applied = _count_effects(billing)

    @billing.webhooks.on("customer.updated")
    def downstream(ctx: Any) -> None:
        if down["yes"]:
            raise RuntimeError("downstream is down")

    for n in range(5):
        _receive(billing, _updated(f"cus_O{n}", f"o{n}@example.com"))
    assert billing.webhooks.process_pending() == 5
    assert applied == []
    down["yes"] = False
    clock.advance(seconds=30)
    assert billing.webhooks.process_pending() == 5  # one call, one batch
    assert len(applied) == 5


# -- real concurrency: a worker and a redelivery racing for one pending event --------


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def sql_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh SQLite file or PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'inbox.db'}"
    url: str = request.getfixturevalue("pg_storage_url")
    return url


def test_worker_and_redelivery_racing_apply_the_event_once(sql_url: str, clock: _Clock) -> None:
    """While a worker is applying a pending event, handle() of the same event waits, then sees it done."""
    storage = SQLStorage(sql_url)
    billing = _billing(storage, clock)
    try:
        link_directly(billing, "cus_A1")
        inside, release = threading.Event(), threading.Event()
        calls: list[str] = []

        @billing.webhooks.on("customer.updated")
        def slow(ctx: Any) -> None:
            calls.append(threading.current_thread().name)
            ctx.tx.insert_customer(
                Customer(id=f"mark-{len(calls)}", tenant=ctx.tenant.id, email=None)
            )
            if threading.current_thread().name == "worker":
                inside.set()
                assert release.wait(30)

        event = _updated("cus_A1", "race@example.com")
        assert _receive(billing, event).status_code == 200
        worker = threading.Thread(target=billing.webhooks.process_pending, name="worker")
        worker.start()
        assert inside.wait(30)
        responses: list[Any] = []
        redelivery = threading.Thread(
            target=lambda: responses.append(billing.webhooks.handle(*_signed(event))),
            name="redelivery",
        )
        redelivery.start()
        redelivery.join(0.5)
        assert redelivery.is_alive()  # it waits for the worker's lock
        release.set()
        worker.join(30)
        redelivery.join(30)
        assert calls == ["worker"]
        assert (responses[0].status_code, responses[0].outcome) == (200, EventOutcome.DUPLICATE)
        assert len(_markers(billing)) == 1
        assert billing.webhooks.process_pending() == 0
    finally:
        billing.close()


# -- schema version 2 ----------------------------------------------------------------------


def test_version_1_database_keeps_its_held_events(
    tmp_path: Path, clock: _Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Upgrading a version-1 SQLite file moves each stored body out of its JSON, intact."""
    path = tmp_path / "v1.db"
    url = f"sqlite:///{path}"
    with monkeypatch.context() as patch:
        patch.setattr(sql_module, "_MIGRATIONS", sql_module._MIGRATIONS[:1])
        old = SQLStorage(url)
        with old.transaction() as tx:
            tx.direct_tenant()
        old.close()
    event = _updated("cus_A1", "held@example.com", account="acct_1LATER")
    payload = json.dumps(event).encode()
    held = ProcessedEvent(
        event_id=event["id"],
        type=event["type"],
        mode=Mode.TEST,
        created=T0,
        outcome=EventOutcome.HELD,
        account="acct_1LATER",
        reason="account acct_1LATER is not connected yet",
        payload=payload,
        received_at=T0,
    )
    data = unstructure(held)
    assert data["payload"] == base64.b64encode(payload).decode()  # how version 1 stored it
    with sqlite3.connect(path) as raw:
        raw.execute(
            "INSERT INTO rb_events (event_id, outcome, account, received_us, data) "
            "VALUES (?, ?, ?, ?, ?)",
            (held.event_id, "held", held.account, int(T0.timestamp()) * 10**6, json.dumps(data)),
        )
    raw.close()

    billing = _billing(SQLStorage(url), clock)
    try:
        assert stored_event(billing, event["id"]) == held
        billing.tenants.connect("later", "acct_1LATER", modes=frozenset({Mode.TEST}))
        stored = stored_event(billing, event["id"])
        assert stored is not None
        assert (stored.outcome, stored.tenant, stored.payload) == (
            EventOutcome.IGNORED,
            "later",
            payload,
        )
    finally:
        billing.close()


def test_stored_event_json_matches_the_converter() -> None:
    """A stored event's hand-written JSON is the converter's, less the body, and reads back equal."""
    event = ProcessedEvent(
        event_id="evt_1",
        type="invoice.paid",
        mode=Mode.LIVE,
        created=T0,
        outcome=EventOutcome.FAILED,
        tenant="acme",
        account="acct_1",
        api_version="2025-09-30.clover",
        reason="boom",
        payload=b"{}",
        attempts=2,
        received_at=T0 + timedelta(microseconds=5),
        next_attempt_at=T0 + timedelta(minutes=1),
        claims=1,
    )
    expected = unstructure(event)
    del expected["payload"]
    data = sql_module._event_data(event)
    assert json.loads(data) == expected
    assert {f.name for f in attrs.fields(ProcessedEvent)} == {*expected, "payload"}
    assert sql_module._load_event((data, b"{}")) == event
    del expected["next_attempt_at"]  # as version 1 wrote it: read through the converter
    del expected["claims"]
    legacy = attrs.evolve(event, next_attempt_at=None, claims=0)
    assert sql_module._load_event((json.dumps(expected), b"{}")) == legacy


# -- batches: process_pending applies claimed events several per transaction ---------------


def test_a_failing_event_in_a_batch_is_recorded_and_the_others_applied_once(
    sql_url: str, clock: _Clock
) -> None:
    """One raising handler in a batch: it alone is failed and retried; the rest apply once each."""
    storage = SQLStorage(sql_url)
    billing = _billing(storage, clock)
    try:
        for n in range(5):
            link_directly(billing, f"cus_B{n}")
        applied = _count_effects(billing)
        broken = {"cus_B2"}
        runs: list[str] = []

        @billing.webhooks.on("customer.updated")
        def fail_third(ctx: Any) -> None:
            runs.append(ctx.object["id"])
            if ctx.object["id"] in broken:
                raise RuntimeError("third one broke")

        events = [_updated(f"cus_B{n}", f"b{n}@example.com") for n in range(5)]
        for event in events:
            assert _receive(billing, event).status_code == 200
        assert billing.webhooks.process_pending() == 5
        outcomes = [stored_event(billing, e["id"]) for e in events]
        assert [(s.outcome, s.attempts) for s in outcomes if s is not None] == [
            (EventOutcome.APPLIED, 1),
            (EventOutcome.APPLIED, 1),
            (EventOutcome.FAILED, 1),
            (EventOutcome.APPLIED, 1),
            (EventOutcome.APPLIED, 1),
        ]
        assert outcomes[2] is not None and "third one broke" in (outcomes[2].reason or "")
        assert runs.count("cus_B2") == 1  # a failing handler runs once per attempt
        assert sorted(applied) == sorted(e["id"] for n, e in enumerate(events) if n != 2)
        assert len(_markers(billing)) == 4

        broken.clear()
        clock.advance(seconds=30)
        assert billing.webhooks.process_pending() == 1
        again = stored_event(billing, events[2]["id"])
        assert again is not None and (again.outcome, again.attempts) == (EventOutcome.APPLIED, 2)
        assert sorted(applied) == sorted(e["id"] for e in events)
        assert len(_markers(billing)) == 5
    finally:
        billing.close()


def test_batch_deferred_work_runs_only_after_the_batch_commits(
    tmp_path: Path, clock: _Clock
) -> None:
    """Emails and other deferred work of a batch run once every event of it is committed."""
    url = f"sqlite:///{tmp_path / 'batch.db'}"
    billing = _billing(SQLStorage(url), clock)
    observer = SQLStorage(url)  # another connection: it sees committed rows only
    try:
        for n in range(3):
            link_directly(billing, f"cus_C{n}")
        seen: list[list[EventOutcome]] = []
        events = [_updated(f"cus_C{n}", f"c{n}@example.com") for n in range(3)]

        @billing.webhooks.on("customer.updated")
        def observe(ctx: Any) -> None:
            def look() -> None:
                with observer.transaction() as tx:
                    stored = [tx.get_event(e["id"]) for e in events]
                seen.append([s.outcome for s in stored if s is not None])

            ctx.after_commit(look)

        for event in events:
            _receive(billing, event)
        assert billing.webhooks.process_pending() == 3
        assert seen == [[EventOutcome.APPLIED] * 3] * 3
    finally:
        observer.close()
        billing.close()


def test_redelivery_racing_a_batch_waits_and_applies_nothing_twice(
    sql_url: str, clock: _Clock
) -> None:
    """handle() of an event a worker applied earlier in its open batch waits, then is a duplicate."""
    storage = SQLStorage(sql_url)
    billing = _billing(storage, clock)
    try:
        link_directly(billing, "cus_D1")
        link_directly(billing, "cus_D2")
        inside, release = threading.Event(), threading.Event()
        calls: list[str] = []

        @billing.webhooks.on("customer.updated")
        def slow(ctx: Any) -> None:
            calls.append(f"{threading.current_thread().name}:{ctx.object['id']}")
            ctx.tx.insert_customer(
                Customer(id=f"mark-{len(calls)}", tenant=ctx.tenant.id, email=None)
            )
            if threading.current_thread().name == "worker" and ctx.object["id"] == "cus_D2":
                inside.set()
                assert release.wait(30)

        first, second = _updated("cus_D1", "d1@example.com"), _updated("cus_D2", "d2@example.com")
        _receive(billing, first)
        clock.advance(seconds=1)
        _receive(billing, second)
        worker = threading.Thread(target=billing.webhooks.process_pending, name="worker")
        worker.start()
        assert inside.wait(30)  # the first event is applied, not yet committed
        responses: list[Any] = []
        redelivery = threading.Thread(
            target=lambda: responses.append(billing.webhooks.handle(*_signed(first))),
            name="redelivery",
        )
        redelivery.start()
        redelivery.join(0.5)
        assert redelivery.is_alive()  # it waits for the worker's batch
        release.set()
        worker.join(30)
        redelivery.join(30)
        assert calls == ["worker:cus_D1", "worker:cus_D2"]
        assert (responses[0].status_code, responses[0].outcome) == (200, EventOutcome.DUPLICATE)
        assert len(_markers(billing)) == 2
        assert billing.webhooks.process_pending() == 0
    finally:
        billing.close()


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
def test_a_body_stored_before_orjson_still_applies(
    backend: str, clock: _Clock, tmp_path: Path
) -> None:
    """A body the json module took (a lone surrogate escape) applies from the inbox.

    New deliveries of it get 400 (orjson reads UTF-8 JSON only), but one stored
    pending by an earlier version is applied as that version would have, and
    the name round-trips through the storage.
    """
    storage: Storage = (
        InMemoryStorage() if backend == "memory" else SQLStorage(f"sqlite:///{tmp_path / 'b.db'}")
    )
    billing = _billing(storage, clock)
    customer = link_directly(billing, "cus_A1")
    event = _updated("cus_A1", "new@example.com")
    event["data"]["object"]["name"] = "caf\udce9"
    payload, headers = _signed(event)
    assert b"\\udce9" in payload
    assert billing.webhooks.handle(payload, headers).status_code == 400
    assert stored_event(billing, event["id"]) is None
    with storage.transaction() as tx:  # as receive() stored it before orjson
        old = webhooks_module._new_record(
            event, payload, EventOutcome.PENDING, T0, next_attempt_at=T0
        )
        assert tx.record_event(old)
    assert billing.webhooks.process_pending() == 1
    stored = stored_event(billing, event["id"])
    assert stored is not None and stored.outcome is EventOutcome.APPLIED
    assert billing.customers.get("acme", customer.id).name == "caf\udce9"
    storage.close()
