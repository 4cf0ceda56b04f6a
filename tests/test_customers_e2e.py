"""Customers end to end against a real localstripe, with signed webhooks delivered over HTTP.

localstripe has no Connect, so the tenant is the direct one (the platform's own
account). Each test uses unique emails, since the server is shared.
"""

from __future__ import annotations

from typing import Any

import pytest

from rational_billing import (
    Billing,
    EventOutcome,
    InvitationSettings,
    InvitationState,
    Mode,
    SyncState,
)
from rational_billing.testing import RecordingMailer

from .fixtures.localstripe import unique_email

pytestmark = pytest.mark.localstripe

EVENTS = ["customer.created", "customer.updated", "customer.deleted"]


@pytest.fixture
def billing(make_e2e_billing: Any) -> Billing:
    """Billing on a SQLite file, talking to localstripe, with invitations and the direct tenant."""
    return make_e2e_billing(
        invitations=InvitationSettings(
            signup_link=lambda customer: f"https://app.example.com/join/{customer.id}"
        )
    )


@pytest.fixture
def wired(billing: Billing, wire_webhooks: Any) -> Any:
    """localstripe delivers customer.* webhooks over HTTP to billing.webhooks.handle."""
    return wire_webhooks(billing, EVENTS)


def _mailer(billing: Billing) -> RecordingMailer:
    mailer = billing.mailer
    assert isinstance(mailer, RecordingMailer)
    return mailer


def _mine(billing: Billing, email: str) -> list[Any]:
    return [c for c in billing.customers.list("acme") if c.email == email]


def test_customer_created_in_stripe_yields_a_local_customer_and_one_email(
    billing: Billing, wired: Any, localstripe_api: Any
) -> None:
    """A customer made in Stripe arrives as customer.created: one linked local customer, one email."""
    email = unique_email("invitee")
    remote = localstripe_api.post("/v1/customers", email=email, name="Invited Ivy")
    delivery = wired.wait_for_event(
        "customer.created", where=lambda e: e["data"]["object"]["id"] == remote["id"]
    )
    assert delivery.status == 200
    (customer,) = _mine(billing, email)
    assert customer.link is not None and customer.link.stripe_customer_id == remote["id"]
    assert customer.name == "Invited Ivy"
    (sent,) = _mailer(billing).to(email)
    assert f"https://app.example.com/join/{customer.id}" in sent.text
    # Stripe retrying the same delivery changes nothing: still one customer, one email.
    assert billing.webhooks.handle(delivery.body, delivery.headers).outcome is (
        EventOutcome.DUPLICATE
    )
    assert len(_mine(billing, email)) == 1 and len(_mailer(billing).to(email)) == 1
    invitation = billing.invitations.get("acme", remote["id"], mode=Mode.TEST)
    assert invitation is not None and invitation.state is InvitationState.SENT


def test_our_own_create_in_stripe_is_not_invited(
    billing: Billing, wired: Any, localstripe_api: Any
) -> None:
    """The customer.created caused by create_in_stripe finds the customer linked: no email."""
    email = unique_email("own")
    customer = billing.customers.create("acme", email=email)
    linked = billing.customers.create_in_stripe("acme", customer.id, mode=Mode.TEST)
    assert linked.link is not None and linked.sync_state is SyncState.SYNCED
    remote = localstripe_api.get(f"/v1/customers/{linked.link.stripe_customer_id}")
    assert remote["metadata"]["rational_customer_id"] == customer.id
    delivery = wired.wait_for_event(
        "customer.created",
        where=lambda e: e["data"]["object"]["id"] == linked.link.stripe_customer_id,  # type: ignore[union-attr]
    )
    assert delivery.status == 200
    assert _mine(billing, email) == [billing.customers.get("acme", customer.id)]
    assert _mailer(billing).to(email) == []


def test_a_change_in_stripe_reaches_a_stripe_created_customer(
    billing: Billing, wired: Any, localstripe_api: Any
) -> None:
    """After auto-creation, a Stripe-side edit arrives as customer.updated and is copied locally."""
    email = unique_email("edit")
    remote = localstripe_api.post("/v1/customers", email=email, name="Before")
    wired.wait_for_event(
        "customer.created", where=lambda e: e["data"]["object"]["id"] == remote["id"]
    )
    localstripe_api.post(f"/v1/customers/{remote['id']}", name="After", metadata={"tier": "gold"})
    wired.wait_for_event("customer.updated", where=lambda e: e["data"]["object"]["name"] == "After")
    (customer,) = _mine(billing, email)
    assert (customer.name, dict(customer.metadata)) == ("After", {"tier": "gold"})


def test_a_local_change_reaches_stripe_without_ping_pong(
    billing: Billing, wired: Any, localstripe_api: Any
) -> None:
    """A local update is pushed; its echo changes nothing and pushes nothing back."""
    email = unique_email("push")
    customer = billing.customers.create("acme", email=email)
    linked = billing.customers.create_in_stripe("acme", customer.id, mode=Mode.TEST)
    assert linked.link is not None
    sid = linked.link.stripe_customer_id
    updated = billing.customers.update("acme", customer.id, name="Local", metadata={"k": "v"})
    assert updated.sync_state is SyncState.SYNCED
    remote = localstripe_api.get(f"/v1/customers/{sid}")
    assert (remote["name"], remote["metadata"]["k"]) == ("Local", "v")
    echo = wired.wait_for_event(
        "customer.updated", where=lambda e: e["data"]["object"]["name"] == "Local"
    )
    assert echo.status == 200
    final = billing.customers.get("acme", customer.id)
    assert (final.name, dict(final.metadata), final.sync_state) == (
        "Local",
        {"k": "v"},
        SyncState.SYNCED,
    )
    assert billing.sync.push_pending() == 0  # nothing owed: no ping-pong


def test_link_and_unlink_write_and_clear_our_metadata_in_stripe(
    billing: Billing, localstripe_api: Any
) -> None:
    """link tags an existing Stripe customer; a confirmed unlink clears the tag."""
    email = unique_email("link")
    remote = localstripe_api.post("/v1/customers", email=email)
    customer = billing.customers.create("acme", email=email)
    linked = billing.customers.link(
        "acme", customer.id, mode=Mode.TEST, stripe_customer_id=remote["id"]
    )
    assert linked.sync_state is SyncState.SYNCED
    tagged = localstripe_api.get(f"/v1/customers/{remote['id']}")
    assert tagged["metadata"]["rational_customer_id"] == customer.id
    unlinked = billing.customers.unlink("acme", customer.id, confirm_remap=True)
    assert unlinked.link is None
    cleared = localstripe_api.get(f"/v1/customers/{remote['id']}")
    assert not cleared["metadata"].get("rational_customer_id")


def test_customer_deleted_in_stripe_unlinks_and_keeps_the_local_customer(
    billing: Billing, wired: Any, localstripe_api: Any
) -> None:
    """Deleting the Stripe customer unlinks the local one; its record stays."""
    email = unique_email("gone")
    customer = billing.customers.create("acme", email=email, name="Kept")
    linked = billing.customers.create_in_stripe("acme", customer.id, mode=Mode.TEST)
    assert linked.link is not None
    localstripe_api.delete(f"/v1/customers/{linked.link.stripe_customer_id}")
    delivery = wired.wait_for_event(
        "customer.deleted",
        where=lambda e: e["data"]["object"]["id"] == linked.link.stripe_customer_id,  # type: ignore[union-attr]
    )
    assert delivery.status == 200
    kept = billing.customers.get("acme", customer.id)
    assert (kept.link, kept.name, kept.email) == (None, "Kept", email)
