"""Small helpers shared by the webhook, adapter and isolation tests."""

from __future__ import annotations

from typing import Any

import attrs

from rational_billing import Billing, Customer, CustomerLink, Mode
from rational_billing.domain.models import ProcessedEvent


class NoStripe:
    """A Stripe port that fails the test if anything calls it."""

    def request(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Fail: no Stripe call is expected."""
        raise AssertionError("no Stripe call expected")

    def list_all(self, *args: Any, **kwargs: Any) -> Any:
        """Fail: no Stripe call is expected."""
        raise AssertionError("no Stripe call expected")


def link_directly(
    billing: Billing, stripe_id: str, *, tenant: str = "acme", mode: Mode = Mode.TEST
) -> Customer:
    """A new local customer linked to ``stripe_id`` in storage, without any Stripe call."""
    customer = billing.customers.create(tenant, email="old@example.com", name="Old")
    linked = attrs.evolve(customer, link=CustomerLink(mode, stripe_id))
    with billing.storage.transaction() as tx:
        tx.put_customer(linked)
    return linked


def stored_event(billing: Billing, event_id: str) -> ProcessedEvent | None:
    """The stored webhook event, or None."""
    with billing.storage.transaction() as tx:
        return tx.get_event(event_id)
