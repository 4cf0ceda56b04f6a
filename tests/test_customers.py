"""CustomerService: local creation, the outbox push to Stripe, and bad input."""

from __future__ import annotations

import json
import socket
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs

import pytest
import requests
import responses

from rational_billing import Billing, BillingConfig, EventOutcome, Mode, ModeKeys, SyncState
from rational_billing.adapters._retry import RetryPolicy
from rational_billing.adapters.stripe_gateway import StripeGateway
from rational_billing.domain.models import OutboxState
from rational_billing.errors import (
    CustomerNotFound,
    InvalidArgument,
    TenantNotConnected,
    TenantNotFound,
)
from rational_billing.testing import (
    InMemoryStorage,
    RecordingMailer,
    build_customer,
    make_event,
    sign_payload,
)

API = "https://api.stripe.com"
ACCOUNT = "acct_1TENANTAAAAAAA"


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    """A hand-moved clock."""
    return Clock()


@pytest.fixture
def billing(clock: Clock) -> Billing:
    """Billing against the real gateway (no retries, no waits) with a connected tenant."""
    config = BillingConfig(test=ModeKeys(secret_key="sk_test_key", webhook_secrets=("whsec_x",)))
    gateway = StripeGateway(config, retry=RetryPolicy.none(), sleep=lambda _: None)
    b = Billing(
        config=config,
        storage=InMemoryStorage(),
        mailer=RecordingMailer(),
        clock=clock,
        stripe=gateway,
    )
    b.tenants.connect("acme", ACCOUNT, modes=frozenset({Mode.TEST}))
    return b


def _form(call: Any) -> dict[str, list[str]]:
    return parse_qs(call.request.body or "", keep_blank_values=True)


def _snapshot(billing: Billing) -> Any:
    storage = billing.storage
    assert isinstance(storage, InMemoryStorage)
    return (dict(storage._customers), dict(storage._outbox), dict(storage._tenants))


def test_create_is_local_and_opens_no_socket(
    billing: Billing, monkeypatch: pytest.MonkeyPatch
) -> None:
    """customers.create makes no network connection at all (sockets are blocked)."""

    def blocked(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a socket was opened")

    monkeypatch.setattr(socket.socket, "connect", blocked)
    monkeypatch.setattr(socket, "create_connection", blocked)
    monkeypatch.setattr(socket, "getaddrinfo", blocked)
    customer = billing.customers.create(
        "acme", email="ada@example.com", name="Ada", metadata={"plan": "free"}
    )
    assert customer.link is None
    assert customer.sync_state is SyncState.LOCAL
    assert billing.customers.get("acme", customer.id) == customer


@responses.activate
def test_create_in_stripe_sends_account_key_and_metadata(billing: Billing) -> None:
    """create_in_stripe posts once, on the tenant's account, with an idempotency key and our metadata."""
    customer = billing.customers.create("acme", email="ada@example.com", name="Ada")
    responses.post(
        f"{API}/v1/customers", json=build_customer(id="cus_NEW1", email="ada@example.com")
    )
    linked = billing.customers.create_in_stripe("acme", customer.id, mode=Mode.TEST)
    assert linked.link is not None
    assert (linked.link.mode, linked.link.stripe_customer_id) == (Mode.TEST, "cus_NEW1")
    assert linked.sync_state is SyncState.SYNCED
    (call,) = responses.calls
    assert call.request.headers["Stripe-Account"] == ACCOUNT
    assert call.request.headers["Authorization"] == "Bearer sk_test_key"
    assert call.request.headers["Idempotency-Key"].startswith("rb-")
    form = _form(call)
    assert form["metadata[rational_customer_id]"] == [customer.id]
    assert form["metadata[rational_tenant]"] == ["acme"]
    assert form["email"] == ["ada@example.com"]


@responses.activate
def test_create_in_stripe_retries_with_the_same_key_after_a_lost_response(
    billing: Billing, clock: Clock
) -> None:
    """A connection error leaves the entry pending; the retry reuses the frozen key and links once."""
    customer = billing.customers.create("acme", email="ada@example.com")
    responses.post(f"{API}/v1/customers", body=requests.ConnectionError("reset"))
    pending = billing.customers.create_in_stripe("acme", customer.id, mode=Mode.TEST)
    assert pending.link is None
    assert pending.sync_state is SyncState.PENDING
    responses.replace(responses.POST, f"{API}/v1/customers", json=build_customer(id="cus_NEW2"))
    clock.now += timedelta(hours=1)
    assert billing.sync.push_pending() == 1
    keys = {c.request.headers["Idempotency-Key"] for c in responses.calls}
    assert len(keys) == 1
    linked = billing.customers.get("acme", customer.id)
    assert linked.link is not None and linked.link.stripe_customer_id == "cus_NEW2"
    # Calling again is a no-op: no second Stripe customer.
    again = billing.customers.create_in_stripe("acme", customer.id, mode=Mode.TEST)
    assert again.link == linked.link
    assert len(responses.calls) == 2


@responses.activate
def test_update_while_stripe_is_down_returns_pending_then_syncs(
    billing: Billing, clock: Clock
) -> None:
    """update returns normally with sync_state 'pending' while Stripe fails, and push_pending syncs it."""
    customer = billing.customers.create("acme", email="ada@example.com")
    responses.post(f"{API}/v1/customers", json=build_customer(id="cus_U1"))
    billing.customers.create_in_stripe("acme", customer.id, mode=Mode.TEST)
    responses.post(f"{API}/v1/customers/cus_U1", status=503, json={"error": {"message": "down"}})
    updated = billing.customers.update("acme", customer.id, name="Ada L.", metadata={"tier": "pro"})
    assert updated.sync_state is SyncState.PENDING
    assert updated.name == "Ada L."
    responses.replace(
        responses.POST, f"{API}/v1/customers/cus_U1", json=build_customer(id="cus_U1")
    )
    assert billing.sync.push_pending() == 0  # backoff not elapsed
    clock.now += timedelta(minutes=5)
    assert billing.sync.push_pending() == 1
    assert billing.customers.get("acme", customer.id).sync_state is SyncState.SYNCED
    pushes = [c for c in responses.calls if c.request.url.endswith("/v1/customers/cus_U1")]
    assert {c.request.headers["Idempotency-Key"] for c in pushes} == {
        pushes[0].request.headers["Idempotency-Key"]
    }
    assert _form(pushes[-1]) == {"name": ["Ada L."], "metadata[tier]": ["pro"]}


@responses.activate
def test_permanent_error_goes_to_the_failed_list(billing: Billing, clock: Clock) -> None:
    """A 400 moves the outbox entry to the failed list, marks the customer failed, and stops retrying."""
    customer = billing.customers.create("acme", email="ada@example.com")
    responses.post(f"{API}/v1/customers", json=build_customer(id="cus_F1"))
    billing.customers.create_in_stripe("acme", customer.id, mode=Mode.TEST)
    responses.post(
        f"{API}/v1/customers/cus_F1",
        status=400,
        json={
            "error": {
                "type": "invalid_request_error",
                "message": "Invalid email",
                "code": "email_invalid",
            }
        },
    )
    updated = billing.customers.update("acme", customer.id, email="bad@example.com")
    assert updated.sync_state is SyncState.FAILED
    with billing.storage.transaction() as tx:
        (failed,) = tx.outbox_with_state(OutboxState.FAILED)
    assert "Invalid email" in (failed.last_error or "")
    clock.now += timedelta(days=1)
    calls = len(responses.calls)
    assert billing.sync.push_pending() == 0
    assert len(responses.calls) == calls


@responses.activate
def test_metadata_none_deletes_the_key_locally_and_in_stripe(billing: Billing) -> None:
    """A None metadata value removes the key here and is sent to Stripe as an empty string."""
    customer = billing.customers.create(
        "acme", email="a@example.com", metadata={"a": "1", "b": "2"}
    )
    responses.post(f"{API}/v1/customers", json=build_customer(id="cus_M1"))
    billing.customers.create_in_stripe("acme", customer.id, mode=Mode.TEST)
    responses.post(f"{API}/v1/customers/cus_M1", json=build_customer(id="cus_M1"))
    updated = billing.customers.update("acme", customer.id, metadata={"a": None})
    assert dict(updated.metadata) == {"b": "2"}
    assert _form(responses.calls[-1]) == {"metadata[a]": [""]}


def test_list_pages_through_every_customer(billing: Billing) -> None:
    """list yields every customer once, in id order, across pages."""
    ids = [f"c{i:03d}" for i in range(25)]
    for cid in reversed(ids):
        billing.customers.create("acme", email=None, customer_id=cid)
    assert [c.id for c in billing.customers.list("acme", page_size=7)] == ids


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda b: b.customers.create("nobody", email="a@example.com"), TenantNotFound),
        (lambda b: b.customers.create("acme", email="not-an-email"), InvalidArgument),
        (
            lambda b: b.customers.create("acme", email=None, customer_id="has space"),
            InvalidArgument,
        ),
        (lambda b: b.customers.create("acme", email=None, metadata={"k": 1}), InvalidArgument),
        (lambda b: b.customers.get("acme", "missing"), CustomerNotFound),
        (lambda b: b.customers.update("acme", "missing", name="x"), CustomerNotFound),
        (lambda b: b.customers.create_in_stripe("acme", "c1", mode=Mode.LIVE), TenantNotConnected),
        (lambda b: b.customers.create_in_stripe("acme", "c1", mode="sandbox"), InvalidArgument),
        (lambda b: b.customers.create_in_stripe("ghost", "c1", mode=Mode.TEST), TenantNotFound),
        (lambda b: b.customers.delete("ghost", "c1"), TenantNotFound),
        (lambda b: b.customers.delete("acme", "missing"), CustomerNotFound),
    ],
)
def test_bad_input_raises_a_specific_error_and_writes_nothing(
    billing: Billing, call: Any, error: type
) -> None:
    """Unknown tenants/customers, bad ids, emails, metadata and modes raise and change nothing."""
    billing.customers.create("acme", email="c1@example.com", customer_id="c1")
    before = _snapshot(billing)
    with responses.RequestsMock(), pytest.raises(error):  # any HTTP call fails the test
        call(billing)
    assert _snapshot(billing) == before


def test_disconnected_tenant_cannot_create_in_stripe(billing: Billing) -> None:
    """After disconnect, Stripe calls raise TenantNotConnected and local data stays."""
    customer = billing.customers.create("acme", email="a@example.com")
    billing.tenants.disconnect("acme")
    with pytest.raises(TenantNotConnected):
        billing.customers.create_in_stripe("acme", customer.id, mode=Mode.TEST)
    assert billing.customers.get("acme", customer.id) == customer


def test_payload_helpers_round_trip() -> None:
    """build_customer produces JSON-ready data (a sanity check for the builders used above)."""
    assert json.loads(json.dumps(build_customer(id="cus_X")))["id"] == "cus_X"


# -- Stripe -> local: the conflict rule, echoes and revalidation (issue 3) -----------------


def _deliver(billing: Billing, event: dict[str, Any], clock: Clock) -> Any:
    payload = json.dumps(event).encode()
    headers = sign_payload(payload, "whsec_x", timestamp=int(clock.now.timestamp()))
    return billing.webhooks.handle(payload, headers)


def _updated(stripe_id: str, at: datetime, **fields: Any) -> dict[str, Any]:
    obj = build_customer(id=stripe_id, **fields)
    return make_event("customer.updated", obj, account=ACCOUNT, created=int(at.timestamp()))


def _linked(billing: Billing, stripe_id: str, **fields: Any) -> Any:
    customer = billing.customers.create("acme", **fields)
    with responses.RequestsMock() as mock:
        mock.post(f"{API}/v1/customers", json=build_customer(id=stripe_id))
        return billing.customers.create_in_stripe("acme", customer.id, mode=Mode.TEST)


def test_a_newer_stripe_change_wins_over_an_older_pending_local_change(
    billing: Billing, clock: Clock
) -> None:
    """A local change stuck in the outbox is cancelled by a newer Stripe change, never pushed."""
    customer = _linked(billing, "cus_W1", email="a@example.com", name="Old")
    with responses.RequestsMock() as mock:
        mock.post(f"{API}/v1/customers/cus_W1", status=503, json={})
        pending = billing.customers.update("acme", customer.id, name="Local")
    assert pending.sync_state is SyncState.PENDING
    event = _updated(
        "cus_W1", clock.now + timedelta(seconds=30), email="a@example.com", name="Dash"
    )
    clock.now += timedelta(minutes=1)
    with responses.RequestsMock():  # no push and no revalidation: the event is strictly newer
        assert _deliver(billing, event, clock).outcome is EventOutcome.APPLIED
        assert billing.sync.push_pending() == 0
    final = billing.customers.get("acme", customer.id)
    assert (final.name, final.sync_state) == ("Dash", SyncState.SYNCED)
    with billing.storage.transaction() as tx:
        (cancelled,) = tx.outbox_with_state(OutboxState.CANCELLED)
    assert cancelled.operation == "customer.update" and "superseded" in (cancelled.last_error or "")


def test_a_stripe_change_older_than_the_local_change_is_stale(
    billing: Billing, clock: Clock
) -> None:
    """An event from before the last local change is recorded stale and changes nothing."""
    customer = _linked(billing, "cus_S1", email="a@example.com")
    clock.now += timedelta(minutes=5)
    with responses.RequestsMock() as mock:
        mock.post(f"{API}/v1/customers/cus_S1", json=build_customer(id="cus_S1"))
        billing.customers.update("acme", customer.id, name="Local")
    old = _updated("cus_S1", clock.now - timedelta(minutes=1), email="a@example.com", name="Old")
    assert _deliver(billing, old, clock).outcome is EventOutcome.STALE
    assert billing.customers.get("acme", customer.id).name == "Local"


def test_the_echo_of_our_push_in_the_same_second_costs_no_call(
    billing: Billing, clock: Clock
) -> None:
    """The customer.updated our own push causes matches local state: no change, no re-fetch."""
    customer = _linked(billing, "cus_E1", email="a@example.com")
    with responses.RequestsMock() as mock:
        mock.post(f"{API}/v1/customers/cus_E1", json=build_customer(id="cus_E1"))
        billing.customers.update("acme", customer.id, name="Same")
    echo = _updated("cus_E1", clock.now, email="a@example.com", name="Same")
    with responses.RequestsMock():
        response = _deliver(billing, echo, clock)
    assert response.outcome is EventOutcome.APPLIED and "echo" in response.message
    assert billing.customers.get("acme", customer.id).sync_state is SyncState.SYNCED


def test_a_different_change_in_the_same_second_is_revalidated_from_stripe(
    billing: Billing, clock: Clock
) -> None:
    """A same-second event that differs is applied, then the customer is re-fetched and Stripe's state kept."""
    customer = _linked(billing, "cus_T1", email="a@example.com")
    with responses.RequestsMock() as mock:
        mock.post(f"{API}/v1/customers/cus_T1", json=build_customer(id="cus_T1"))
        billing.customers.update("acme", customer.id, name="Local")
    tie = _updated("cus_T1", clock.now, email="a@example.com", name="Racing")
    with responses.RequestsMock() as mock:
        mock.get(
            f"{API}/v1/customers/cus_T1",
            json=build_customer(id="cus_T1", email="a@example.com", name="Truth"),
        )
        response = _deliver(billing, tie, clock)
        (fetch,) = mock.calls
    assert "revalidat" in response.message
    assert fetch.request.headers["Stripe-Account"] == ACCOUNT
    assert fetch.request.headers["Authorization"] == "Bearer sk_test_key"
    final = billing.customers.get("acme", customer.id)
    assert (final.name, final.sync_state) == ("Truth", SyncState.SYNCED)


def test_a_failed_revalidation_stays_queued_for_push_pending(
    billing: Billing, clock: Clock
) -> None:
    """When the re-fetch fails, the event is still applied and push_pending re-fetches later."""
    customer = _linked(billing, "cus_R1", email="a@example.com")
    tie = _updated("cus_R1", customer.stripe_marker or clock.now, email="a@example.com", name="X")
    with responses.RequestsMock() as mock:
        mock.get(f"{API}/v1/customers/cus_R1", status=503, json={})
        assert _deliver(billing, tie, clock).status_code == 200
    assert billing.customers.get("acme", customer.id).sync_state is SyncState.PENDING
    clock.now += timedelta(minutes=5)
    with responses.RequestsMock() as mock:
        mock.get(
            f"{API}/v1/customers/cus_R1",
            json=build_customer(id="cus_R1", email="a@example.com", name="Y"),
        )
        assert billing.sync.push_pending() == 1
    final = billing.customers.get("acme", customer.id)
    assert (final.name, final.sync_state) == ("Y", SyncState.SYNCED)


def test_changes_owed_by_a_disconnected_tenant_wait_for_reconnection(
    billing: Billing, clock: Clock
) -> None:
    """While a tenant is disconnected its queued pushes are kept, not sent and not failed."""
    customer = _linked(billing, "cus_D1", email="a@example.com")
    with responses.RequestsMock() as mock:
        mock.post(f"{API}/v1/customers/cus_D1", status=503, json={})
        billing.customers.update("acme", customer.id, name="Queued")
    billing.tenants.disconnect("acme")
    clock.now += timedelta(hours=2)
    with responses.RequestsMock():
        assert billing.sync.push_pending() == 0
    assert billing.sync.failed() == []
    billing.tenants.connect("acme", ACCOUNT, modes=frozenset({Mode.TEST}))
    clock.now += timedelta(hours=2)
    with responses.RequestsMock() as mock:
        mock.post(f"{API}/v1/customers/cus_D1", json=build_customer(id="cus_D1"))
        assert billing.sync.push_pending() == 1
        assert _form(mock.calls[0]) == {"name": ["Queued"]}


def test_listing_an_unknown_tenant_raises_and_a_disconnected_one_still_lists(
    billing: Billing,
) -> None:
    """list names an unknown tenant's mistake; a disconnected tenant's data stays readable."""
    with pytest.raises(TenantNotFound):
        next(billing.customers.list("ghost"))
    customer = billing.customers.create("acme", email="kept@example.com")
    billing.tenants.disconnect("acme")
    assert list(billing.customers.list("acme")) == [customer]


def test_deleting_a_customer_cancels_its_queued_create_in_stripe(
    billing: Billing, clock: Clock
) -> None:
    """A local delete while create_in_stripe waits in the outbox: no Stripe customer is made later."""
    customer = billing.customers.create("acme", email="gone@example.com")
    with responses.RequestsMock() as mock:
        mock.post(f"{API}/v1/customers", status=503, json={})
        billing.customers.create_in_stripe("acme", customer.id, mode=Mode.TEST)
    billing.customers.delete("acme", customer.id)
    clock.now += timedelta(hours=1)
    with responses.RequestsMock():  # any call to Stripe fails the test
        assert billing.sync.push_pending() == 0
    with billing.storage.transaction() as tx:
        (cancelled,) = tx.outbox_with_state(OutboxState.CANCELLED)
    assert cancelled.operation == "customer.create" and "deleted" in (cancelled.last_error or "")


def test_a_newer_stripe_event_that_changed_none_of_our_fields_keeps_a_pending_local_change(
    billing: Billing, clock: Clock
) -> None:
    """A customer.updated for a card or balance change neither cancels nor overwrites a queued edit."""
    customer = _linked(billing, "cus_P1", email="a@example.com", name="Old")
    with responses.RequestsMock() as mock:
        mock.post(f"{API}/v1/customers/cus_P1", status=503, json={})
        billing.customers.update("acme", customer.id, name="Local")
    card = make_event(
        "customer.updated",
        build_customer(id="cus_P1", email="a@example.com", name="Old"),
        account=ACCOUNT,
        created=int((clock.now + timedelta(seconds=30)).timestamp()),
        previous_attributes={"invoice_settings": {"default_payment_method": None}},
    )
    clock.now += timedelta(minutes=1)
    with responses.RequestsMock() as mock:
        mock.post(f"{API}/v1/customers/cus_P1", json=build_customer(id="cus_P1", name="Local"))
        assert _deliver(billing, card, clock).status_code == 200
        assert billing.customers.get("acme", customer.id).name == "Local"
        assert billing.sync.push_pending() == 1
        assert _form(mock.calls[0]) == {"name": ["Local"]}
    assert billing.customers.get("acme", customer.id).sync_state is SyncState.SYNCED


def test_a_newer_stripe_event_that_changed_the_name_still_wins(
    billing: Billing, clock: Clock
) -> None:
    """With previous_attributes naming one of our fields, the newer Stripe change wins as before."""
    customer = _linked(billing, "cus_P2", email="a@example.com", name="Old")
    with responses.RequestsMock() as mock:
        mock.post(f"{API}/v1/customers/cus_P2", status=503, json={})
        billing.customers.update("acme", customer.id, name="Local")
    renamed = make_event(
        "customer.updated",
        build_customer(id="cus_P2", email="a@example.com", name="Dash"),
        account=ACCOUNT,
        created=int((clock.now + timedelta(seconds=30)).timestamp()),
        previous_attributes={"name": "Old"},
    )
    clock.now += timedelta(minutes=1)
    with responses.RequestsMock():
        assert _deliver(billing, renamed, clock).outcome is EventOutcome.APPLIED
        assert billing.sync.push_pending() == 0
    assert billing.customers.get("acme", customer.id).name == "Dash"
