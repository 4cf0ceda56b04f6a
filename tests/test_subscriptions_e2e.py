"""Subscriptions end to end against a real localstripe server and SQLite.

localstripe speaks old API shapes (plans, not prices; the period on the
subscription), sends events pinned to 2017-08-15, about a second late, and
never sends ``customer.subscription.updated``. Its webhooks are delivered
over HTTP to ``billing.webhooks.handle`` through the webhook sink.
"""

from __future__ import annotations

from typing import Any

import pytest

from rational_billing import Billing, EventOutcome, Mode
from rational_billing.domain.access import DenialReason
from rational_billing.domain.models import Invoice, Subscription

from .fixtures.localstripe import unique_email

pytestmark = pytest.mark.localstripe

EVENTS = [
    "customer.subscription.created",
    "customer.subscription.deleted",
    "invoice.created",
    "invoice.payment_succeeded",
    "invoice.payment_failed",
]


@pytest.fixture
def billing(make_e2e_billing: Any) -> Billing:
    """Billing on a SQLite file, talking to localstripe, with the direct tenant ``acme``."""
    return make_e2e_billing()


@pytest.fixture
def wired(billing: Billing, wire_webhooks: Any) -> Any:
    """localstripe delivers signed webhooks over HTTP to billing.webhooks.handle."""
    return wire_webhooks(billing, EVENTS)


@pytest.fixture
def plan(billing: Billing, localstripe_api: Any) -> str:
    """A localstripe product and monthly plan, and the local product ``pro`` mapped to it."""
    product = localstripe_api.post("/v1/products", name="Pro", type="service")
    plan = localstripe_api.post(
        "/v1/plans", product=product["id"], amount=1900, currency="eur", interval="month"
    )
    billing.products.create("acme", product_id="pro", name="Pro plan")
    mapped = billing.products.map("acme", "pro", mode=Mode.TEST, stripe_product_id=product["id"])
    stripe = mapped.stripe_product(Mode.TEST)
    # localstripe has no /v1/prices: map() listed the product's plans instead.
    assert stripe is not None and [p.stripe_id for p in stripe.prices] == [plan["id"]]
    assert stripe.prices[0].kind == "plan"
    plan_id: str = plan["id"]
    return plan_id


def _customer_with_card(billing: Billing, localstripe_api: Any, card: str) -> tuple[str, str]:
    """A local customer created in Stripe, whose default payment method is ``card``."""
    customer = billing.customers.create("acme", email=unique_email("sub-e2e"))
    linked = billing.customers.create_in_stripe("acme", customer.id, mode=Mode.TEST)
    assert linked.link is not None
    stripe_customer = linked.link.stripe_customer_id
    method = localstripe_api.post(f"/v1/payment_methods/{card}/attach", customer=stripe_customer)
    localstripe_api.post(
        f"/v1/customers/{stripe_customer}",
        invoice_settings={"default_payment_method": method["id"]},
    )
    return customer.id, stripe_customer


def _subscribe(localstripe_api: Any, stripe_customer: str, plan: str) -> dict[str, Any]:
    subscription: dict[str, Any] = localstripe_api.post(
        "/v1/subscriptions", customer=stripe_customer, items=[{"plan": plan}]
    )
    return subscription


def _delivered(wired: Any, event_type: str, stripe_id: str) -> Any:
    delivery = wired.wait_for_event(
        event_type, where=lambda e: e["data"]["object"]["id"] == stripe_id
    )
    assert delivery.status == 200
    return delivery


def test_good_card_grants_access(
    billing: Billing, wired: Any, localstripe_api: Any, plan: str
) -> None:
    """Subscribing with a good card: the webhook makes the subscription active and grants access."""
    customer_id, stripe_customer = _customer_with_card(billing, localstripe_api, "pm_card_visa")
    assert billing.subscriptions.has_access("acme", customer_id, "pro") is False
    subscription = _subscribe(localstripe_api, stripe_customer, plan)
    assert subscription["status"] == "active"
    delivery = _delivered(wired, "customer.subscription.created", subscription["id"])
    assert delivery.json()["api_version"] == "2017-08-15"
    assert billing.subscriptions.has_access("acme", customer_id, "pro") is True
    grant = billing.subscriptions.access("acme", customer_id).grants["pro"]
    assert (grant.subscription_id, grant.status) == (subscription["id"], "active")
    invoice_id = subscription["latest_invoice"]
    _delivered(wired, "invoice.payment_succeeded", invoice_id)
    with billing.storage.transaction() as tx:
        invoice = tx.get_mirror(Invoice, "acme", Mode.TEST, invoice_id)
    assert invoice is not None
    assert (invoice.status, invoice.subscription_id, invoice.amount_paid) == (
        "paid",
        subscription["id"],
        1900,
    )


def test_failing_card_leaves_the_subscription_incomplete(
    billing: Billing, wired: Any, localstripe_api: Any, plan: str
) -> None:
    """Subscribing with a card that fails: the subscription is incomplete and grants nothing."""
    customer_id, stripe_customer = _customer_with_card(
        billing, localstripe_api, "pm_card_chargeCustomerFail"
    )
    subscription = _subscribe(localstripe_api, stripe_customer, plan)
    assert subscription["status"] == "incomplete"
    _delivered(wired, "customer.subscription.created", subscription["id"])
    assert billing.subscriptions.has_access("acme", customer_id, "pro") is False
    denial = billing.subscriptions.access("acme", customer_id).denied["pro"]
    assert (denial.reason, denial.status) == (DenialReason.STATUS, "incomplete")


def test_cancel_ends_access(billing: Billing, wired: Any, localstripe_api: Any, plan: str) -> None:
    """Canceling in Stripe ends access once customer.subscription.deleted arrives."""
    customer_id, stripe_customer = _customer_with_card(billing, localstripe_api, "pm_card_visa")
    subscription = _subscribe(localstripe_api, stripe_customer, plan)
    _delivered(wired, "customer.subscription.created", subscription["id"])
    assert billing.subscriptions.has_access("acme", customer_id, "pro") is True
    localstripe_api.delete(f"/v1/subscriptions/{subscription['id']}")
    _delivered(wired, "customer.subscription.deleted", subscription["id"])
    assert billing.subscriptions.has_access("acme", customer_id, "pro") is False
    denial = billing.subscriptions.access("acme", customer_id).denied["pro"]
    assert (denial.reason, denial.status) == (DenialReason.STATUS, "canceled")
    applied = [r for r in wired.responses if r.outcome is EventOutcome.APPLIED]
    assert applied, "no event was applied"


def test_objects_fetched_from_localstripe_use_the_same_code(
    billing: Billing, localstripe_api: Any, plan: str
) -> None:
    """Storing objects read from the API (as backfill does) grants access without any webhook."""
    customer_id, stripe_customer = _customer_with_card(billing, localstripe_api, "pm_card_visa")
    created = _subscribe(localstripe_api, stripe_customer, plan)
    fetched = localstripe_api.get(f"/v1/subscriptions/{created['id']}")
    outcome = billing.subscriptions.store("acme", Mode.TEST, fetched)
    assert outcome.kind == "subscription"
    assert billing.subscriptions.has_access("acme", customer_id, "pro") is True
    billing.subscriptions.store(
        "acme", Mode.TEST, localstripe_api.get(f"/v1/invoices/{created['latest_invoice']}")
    )
    canceled = localstripe_api.delete(f"/v1/subscriptions/{created['id']}")
    billing.subscriptions.store("acme", Mode.TEST, canceled)
    with billing.storage.transaction() as tx:
        stored = tx.get_mirror(Subscription, "acme", Mode.TEST, created["id"])
    assert stored is not None and stored.status == "canceled"
    assert billing.subscriptions.has_access("acme", customer_id, "pro") is False
