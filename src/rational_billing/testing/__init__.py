"""Helpers for the host app's own tests: fakes, signed events and Stripe object builders.

Example::

    from rational_billing.testing import InMemoryStorage, RecordingMailer, make_event, sign_payload

    event = make_event("customer.updated", build_customer(id="cus_123", email="new@example.com"))
    payload = json.dumps(event).encode()
    response = billing.webhooks.handle(payload, sign_payload(payload, "whsec_test"))

The storage contract kit lives in ``rational_billing.testing.contract`` and
needs pytest; importing this package does not.
"""

from __future__ import annotations

from ..adapters.mail import RecordingMailer
from ..adapters.memory import InMemoryStorage
from ._builders import (
    build_account,
    build_account_link,
    build_charge,
    build_customer,
    build_deleted_customer,
    build_dispute,
    build_invoice,
    build_invoice_payment,
    build_oauth_token,
    build_price,
    build_product,
    build_refund,
    build_subscription,
    make_event,
    sign_payload,
    stripe_id,
)

__all__ = [
    "InMemoryStorage",
    "RecordingMailer",
    "make_event",
    "sign_payload",
    "build_customer",
    "stripe_id",
    "build_charge",
    "build_dispute",
    "build_invoice",
    "build_invoice_payment",
    "build_price",
    "build_product",
    "build_refund",
    "build_subscription",
    "build_account",
    "build_account_link",
    "build_deleted_customer",
    "build_oauth_token",
]
