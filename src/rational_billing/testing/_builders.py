"""Builders for realistic Stripe payloads, written from the facts Stripe's fixtures show.

The shapes follow the current API version; pass extra keyword arguments to
add or override fields.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping
from typing import Any

from ..services._signature import compute_signature

__all__ = ["build_customer", "make_event", "sign_payload", "stripe_id"]

#: The API version these builders model.
API_VERSION = "2025-09-30.clover"
_ID_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


def stripe_id(prefix: str) -> str:
    """A fresh Stripe-looking id, such as ``cus_NffrFeUfNV2Hib``."""
    return f"{prefix}_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(14))


def make_event(
    type: str,
    obj: Mapping[str, Any],
    *,
    account: str | None = None,
    livemode: bool = False,
    created: int | None = None,
    event_id: str | None = None,
    api_version: str = API_VERSION,
    previous_attributes: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A Stripe event envelope around ``obj``, as a webhook would deliver it."""
    data: dict[str, Any] = {"object": dict(obj)}
    if previous_attributes is not None:
        data["previous_attributes"] = dict(previous_attributes)
    event: dict[str, Any] = {
        "id": event_id or stripe_id("evt"),
        "object": "event",
        "api_version": api_version,
        "created": int(time.time()) if created is None else created,
        "data": data,
        "livemode": livemode,
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
        "type": type,
    }
    if account is not None:
        event["account"] = account
    return event


def sign_payload(payload: bytes, secret: str, *, timestamp: int | None = None) -> dict[str, str]:
    """The headers Stripe would send with ``payload`` signed by ``secret``."""
    moment = int(time.time()) if timestamp is None else timestamp
    signature = compute_signature(payload, secret, moment)
    return {"Stripe-Signature": f"t={moment},v1={signature}", "Content-Type": "application/json"}


def build_customer(
    *,
    id: str | None = None,
    email: str | None = "jenny.rosen@example.com",
    name: str | None = "Jenny Rosen",
    metadata: Mapping[str, str] | None = None,
    livemode: bool = False,
    created: int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A Stripe ``customer`` object at the current API version."""
    customer: dict[str, Any] = {
        "id": id or stripe_id("cus"),
        "object": "customer",
        "address": None,
        "balance": 0,
        "created": int(time.time()) if created is None else created,
        "currency": None,
        "default_source": None,
        "delinquent": False,
        "description": None,
        "email": email,
        "invoice_prefix": "0759376C",
        "invoice_settings": {
            "custom_fields": None,
            "default_payment_method": None,
            "footer": None,
            "rendering_options": None,
        },
        "livemode": livemode,
        "metadata": dict(metadata or {}),
        "name": name,
        "next_invoice_sequence": 1,
        "phone": None,
        "preferred_locales": [],
        "shipping": None,
        "tax_exempt": "none",
        "test_clock": None,
    }
    customer.update(extra)
    return customer
