"""The first vertical slice, end to end against a real localstripe server and SQLite.

Customer created locally, created in Stripe through the gateway, changed in
Stripe and delivered back as a signed webhook over HTTP, changed locally and
pushed to Stripe, with the echo recognised.
"""

from __future__ import annotations

from typing import Any

import pytest

from rational_billing import Billing, EventOutcome, Mode, SyncState

from .fixtures.localstripe import unique_email

pytestmark = pytest.mark.localstripe


@pytest.fixture
def billing(make_e2e_billing: Any) -> Billing:
    """Billing on a SQLite file, talking to localstripe, with the direct tenant registered."""
    return make_e2e_billing()


@pytest.fixture
def wired(billing: Billing, wire_webhooks: Any) -> Any:
    """localstripe delivers signed customer.updated webhooks over HTTP to billing.webhooks.handle."""
    return wire_webhooks(billing, ["customer.updated"])


def test_create_in_stripe_makes_a_linked_stripe_customer(
    billing: Billing, localstripe_api: Any
) -> None:
    """create_in_stripe creates the customer in localstripe, with our metadata, and links it."""
    email = unique_email("slice")
    customer = billing.customers.create("acme", email=email, name="Ada")
    linked = billing.customers.create_in_stripe("acme", customer.id, mode=Mode.TEST)
    assert linked.link is not None and linked.link.mode is Mode.TEST
    assert linked.sync_state is SyncState.SYNCED
    remote = localstripe_api.get(f"/v1/customers/{linked.link.stripe_customer_id}")
    assert remote["email"] == email
    assert remote["metadata"]["rational_customer_id"] == customer.id
    assert remote["metadata"]["rational_tenant"] == "acme"


def test_change_in_stripe_reaches_the_local_customer(
    billing: Billing, wired: Any, localstripe_api: Any
) -> None:
    """A customer.updated signed and delivered by localstripe over HTTP updates the local customer."""
    customer = billing.customers.create("acme", email=unique_email("before"))
    linked = billing.customers.create_in_stripe("acme", customer.id, mode=Mode.TEST)
    assert linked.link is not None
    new_email = unique_email("after")
    localstripe_api.post(
        f"/v1/customers/{linked.link.stripe_customer_id}", email=new_email, name="Changed"
    )
    delivery = wired.wait_for_event(
        "customer.updated", where=lambda e: e["data"]["object"]["email"] == new_email
    )
    assert delivery.status == 200
    got = billing.customers.get("acme", customer.id)
    assert (got.email, got.name) == (new_email, "Changed")


def test_local_change_reaches_stripe_and_its_echo_changes_nothing(
    billing: Billing, wired: Any, localstripe_api: Any
) -> None:
    """A local update is pushed to localstripe; the customer.updated it causes is a no-op echo."""
    customer = billing.customers.create("acme", email=unique_email("local"))
    linked = billing.customers.create_in_stripe("acme", customer.id, mode=Mode.TEST)
    assert linked.link is not None
    updated = billing.customers.update("acme", customer.id, name="Pushed", metadata={"tier": "pro"})
    assert updated.sync_state is SyncState.SYNCED
    remote = localstripe_api.get(f"/v1/customers/{linked.link.stripe_customer_id}")
    assert (remote["name"], remote["metadata"]["tier"]) == ("Pushed", "pro")
    wired.wait_for_event(
        "customer.updated", where=lambda e: e["data"]["object"]["name"] == "Pushed"
    )
    echo = [r for r in wired.responses if r.status_code == 200]
    assert echo and echo[-1].outcome is EventOutcome.APPLIED
    assert "echo" in echo[-1].message
    final = billing.customers.get("acme", customer.id)
    assert (final.name, dict(final.metadata)) == ("Pushed", {"tier": "pro"})
