"""WebhookRouter: verification, routing, outcomes and exactly-once application."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import attrs
import pytest

from rational_billing import BillingConfig, EventOutcome, Mode, ModeKeys
from rational_billing.billing import Billing
from rational_billing.testing import (
    InMemoryStorage,
    RecordingMailer,
    build_customer,
    make_event,
    sign_payload,
)
from tests.helpers import NoStripe, link_directly, stored_event

TEST_SECRET = "whsec_test_one"
ROTATED_SECRET = "whsec_test_two"
LIVE_SECRET = "whsec_live_one"
NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


@pytest.fixture
def billing() -> Billing:
    """A Billing with both modes, two test secrets (rotation) and a fixed clock."""
    config = BillingConfig(
        test=ModeKeys(secret_key="sk_test_abc", webhook_secrets=(TEST_SECRET, ROTATED_SECRET)),
        live=ModeKeys(secret_key="sk_live_abc", webhook_secrets=(LIVE_SECRET,)),
    )
    b = Billing(
        config=config,
        storage=InMemoryStorage(),
        mailer=RecordingMailer(),
        clock=lambda: NOW,
        stripe=NoStripe(),
    )
    b.tenants.register_direct("acme")
    return b


def _deliver(
    billing: Billing,
    event: dict[str, Any],
    secret: str = TEST_SECRET,
    *,
    timestamp: int | None = None,
) -> Any:
    payload = json.dumps(event).encode()
    ts = int(NOW.timestamp()) if timestamp is None else timestamp
    return billing.webhooks.handle(payload, sign_payload(payload, secret, timestamp=ts))


def _updated(
    stripe_id: str, email: str, *, created: int | None = None, **kw: Any
) -> dict[str, Any]:
    created = int(NOW.timestamp()) if created is None else created
    return make_event(
        "customer.updated",
        build_customer(id=stripe_id, email=email, name="New"),
        created=created,
        **kw,
    )


def test_signed_customer_updated_updates_the_linked_customer(billing: Billing) -> None:
    """A verified customer.updated copies email and name onto the linked local customer."""
    customer = link_directly(billing, "cus_A1", tenant="acme")
    response = _deliver(billing, _updated("cus_A1", "new@example.com"))
    assert response.status_code == 200
    assert response.outcome is EventOutcome.APPLIED
    got = billing.customers.get("acme", customer.id)
    assert (got.email, got.name) == ("new@example.com", "New")


def test_duplicate_delivery_is_acknowledged_and_changes_nothing(billing: Billing) -> None:
    """The same event id delivered twice is applied once and answered 200 'duplicate'."""
    customer = link_directly(billing, "cus_A1", tenant="acme")
    event = _updated("cus_A1", "first@example.com")
    assert _deliver(billing, event).outcome is EventOutcome.APPLIED
    with billing.storage.transaction() as tx:
        current = tx.get_customer("acme", customer.id)
        tx.put_customer(attrs.evolve(current, name="Changed locally"))
    second = _deliver(billing, event)
    assert (second.status_code, second.outcome) == (200, EventOutcome.DUPLICATE)
    assert billing.customers.get("acme", customer.id).name == "Changed locally"


def test_rotated_secret_and_several_v1_entries_verify(billing: Billing) -> None:
    """An event signed with the second configured secret, among several v1 entries, verifies."""
    link_directly(billing, "cus_A1", tenant="acme")
    event = _updated("cus_A1", "rot@example.com")
    payload = json.dumps(event).encode()
    ts = int(NOW.timestamp())
    good = sign_payload(payload, ROTATED_SECRET, timestamp=ts)["Stripe-Signature"]
    bad = sign_payload(payload, "whsec_other", timestamp=ts)["Stripe-Signature"].split(",")[1]
    header = f"{good.split(',')[0]},{bad},{good.split(',')[1]}"
    response = billing.webhooks.handle(payload, {"stripe-signature": header})
    assert response.status_code == 200


@pytest.mark.parametrize(
    "tamper",
    ["missing", "garbled", "wrong_secret", "stale", "future", "body_byte"],
)
def test_rejected_deliveries_get_400_and_store_nothing(billing: Billing, tamper: str) -> None:
    """Missing/garbled headers, wrong secrets, stale or future stamps and altered bodies get 400."""
    customer = link_directly(billing, "cus_A1", tenant="acme")
    event = _updated("cus_A1", "evil@example.com")
    payload = json.dumps(event).encode()
    ts = int(NOW.timestamp())
    headers = sign_payload(payload, TEST_SECRET, timestamp=ts)
    if tamper == "missing":
        headers = {}
    elif tamper == "garbled":
        headers = {"Stripe-Signature": "t=abc;v1"}
    elif tamper == "wrong_secret":
        headers = sign_payload(payload, "whsec_wrong", timestamp=ts)
    elif tamper == "stale":
        headers = sign_payload(payload, TEST_SECRET, timestamp=ts - 301)
    elif tamper == "future":
        headers = sign_payload(payload, TEST_SECRET, timestamp=ts + 301)
    elif tamper == "body_byte":
        payload = payload.replace(b"evil@", b"evjl@")
    response = billing.webhooks.handle(payload, headers)
    assert response.status_code == 400
    assert stored_event(billing, event["id"]) is None
    assert billing.customers.get("acme", customer.id).email == "old@example.com"


def test_live_event_signed_only_by_a_test_secret_is_rejected(billing: Billing) -> None:
    """A livemode=true event verified only by a test secret gets 400 (§4a.2)."""
    link_directly(billing, "cus_L1", tenant="acme", mode=Mode.LIVE)
    event = _updated("cus_L1", "x@example.com", livemode=True)
    assert _deliver(billing, event, TEST_SECRET).status_code == 400
    assert stored_event(billing, event["id"]) is None


def test_test_event_signed_by_a_live_secret_is_accepted(billing: Billing) -> None:
    """Live Connect endpoints also receive test events signed with the live secret (§4a.2)."""
    customer = link_directly(billing, "cus_A1", tenant="acme")
    response = _deliver(billing, _updated("cus_A1", "t@example.com"), LIVE_SECRET)
    assert response.status_code == 200
    assert billing.customers.get("acme", customer.id).email == "t@example.com"


def test_test_event_never_touches_the_live_link(billing: Billing) -> None:
    """A test-mode event for a Stripe id only linked in live mode changes nothing."""
    customer = link_directly(billing, "cus_SAME", tenant="acme", mode=Mode.LIVE)
    response = _deliver(billing, _updated("cus_SAME", "t@example.com"))
    assert response.outcome is EventOutcome.IGNORED
    assert billing.customers.get("acme", customer.id).email == "old@example.com"


def test_event_for_unknown_account_is_held_then_applied_on_connect(billing: Billing) -> None:
    """An event for an account not connected yet is stored held and applied once it connects."""
    event = _updated("cus_B1", "b@example.com", account="acct_1NEWTENANT")
    response = _deliver(billing, event)
    assert (response.status_code, response.outcome) == (200, EventOutcome.HELD)
    billing.customers.create("acme", email="x@example.com")  # unrelated tenant state
    with billing.storage.transaction() as tx:
        tx.put_tenant(
            attrs.evolve(
                billing.tenants.get("acme"), id="beta", direct=False, stripe_account_id=None
            )
        )
    customer = link_directly(billing, "cus_B1", tenant="beta")
    billing.tenants.connect("beta", "acct_1NEWTENANT", modes=frozenset({Mode.TEST}))
    assert stored_event(billing, event["id"]).outcome is EventOutcome.APPLIED
    assert billing.customers.get("beta", customer.id).email == "b@example.com"


def test_unhandled_type_is_recorded_as_ignored(billing: Billing) -> None:
    """An event type without a handler gets 200 and is stored 'ignored' with its reason."""
    event = make_event("balance.available", {"object": "balance"}, created=int(NOW.timestamp()))
    response = _deliver(billing, event)
    assert (response.status_code, response.outcome) == (200, EventOutcome.IGNORED)
    assert "no handler" in (stored_event(billing, event["id"]).reason or "")


def test_failing_handler_rolls_back_answers_500_and_a_retry_applies(billing: Billing) -> None:
    """A raising handler rolls back every effect, records the failure, and a redelivery applies."""
    customer = link_directly(billing, "cus_A1", tenant="acme")
    calls = []

    @billing.webhooks.on("customer.updated")
    def flaky(ctx: Any) -> None:
        calls.append(ctx.event["id"])
        if len(calls) == 1:
            raise RuntimeError("downstream hiccup")

    event = _updated("cus_A1", "retry@example.com")
    first = _deliver(billing, event)
    assert first.status_code == 500
    assert billing.customers.get("acme", customer.id).email == "old@example.com"
    stored = stored_event(billing, event["id"])
    assert stored.outcome is EventOutcome.FAILED
    assert "downstream hiccup" in stored.reason
    second = _deliver(billing, event)
    assert (second.status_code, second.outcome) == (200, EventOutcome.APPLIED)
    assert billing.customers.get("acme", customer.id).email == "retry@example.com"


def test_custom_handler_runs_after_builtin_in_the_same_transaction(billing: Billing) -> None:
    """@router.on handlers see the built-in handler's write inside the same transaction."""
    customer = link_directly(billing, "cus_A1", tenant="acme")
    seen: list[str | None] = []

    @billing.webhooks.on("customer.updated")
    def audit(ctx: Any) -> None:
        seen.append(ctx.tx.get_customer("acme", customer.id).email)

    _deliver(billing, _updated("cus_A1", "seen@example.com"))
    assert seen == ["seen@example.com"]


def test_older_stripe_event_does_not_overwrite_a_newer_one(billing: Billing) -> None:
    """customer.updated events applied out of order leave the newest values."""
    customer = link_directly(billing, "cus_A1", tenant="acme")
    base = int(NOW.timestamp())
    assert (
        _deliver(billing, _updated("cus_A1", "newer@example.com", created=base)).status_code == 200
    )
    stale = _deliver(billing, _updated("cus_A1", "older@example.com", created=base - 10))
    assert stale.outcome is EventOutcome.STALE
    assert billing.customers.get("acme", customer.id).email == "newer@example.com"


def test_local_change_newer_than_the_event_wins(billing: Billing) -> None:
    """An event created before the last local change does not overwrite it."""
    customer = link_directly(billing, "cus_A1", tenant="acme")
    with billing.storage.transaction() as tx:
        tx.put_customer(
            attrs.evolve(
                customer, email="local@example.com", local_changed_at=NOW + timedelta(seconds=5)
            )
        )
    created = int(NOW.timestamp()) + 2
    response = _deliver(billing, _updated("cus_A1", "remote@example.com", created=created))
    assert response.outcome is EventOutcome.STALE
    assert billing.customers.get("acme", customer.id).email == "local@example.com"


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"id": "evt_1"}',
        b'{"id":"x","type":"a","livemode":false}',
        # Not UTF-8, or not JSON as RFC 8259 has it (the json module took the last three):
        b'{"id": "evt_1\xff", "type": "customer.updated"}',
        '{"id": "evt_1"}'.encode("utf-16"),
        b'{"id": "evt_1", "amount": NaN}',
        b'{"id": "evt_1", "name": "\\ud800"}',
    ],
)
def test_malformed_but_signed_body_gets_400(billing: Billing, body: bytes) -> None:
    """A correctly signed body that is not a Stripe event is rejected with 400, nothing stored."""
    headers = sign_payload(body, TEST_SECRET, timestamp=int(NOW.timestamp()))
    response = billing.webhooks.handle(body, headers)
    assert response.status_code == 400
    with billing.storage.transaction() as tx:
        assert tx.list_events() == []


def test_a_utf8_byte_order_mark_is_allowed(billing: Billing) -> None:
    """RFC 8259 lets a parser skip a leading BOM; the event applies as without it."""
    customer = link_directly(billing, "cus_A1", tenant="acme")
    event = _updated("cus_A1", "bom@example.com", created=int(NOW.timestamp()))
    payload = b"\xef\xbb\xbf" + json.dumps(event).encode()
    headers = sign_payload(payload, TEST_SECRET, timestamp=int(NOW.timestamp()))
    assert billing.webhooks.handle(payload, headers).outcome is EventOutcome.APPLIED
    assert billing.customers.get("acme", customer.id).email == "bom@example.com"
