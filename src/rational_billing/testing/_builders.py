"""Builders for realistic Stripe payloads, written from the facts Stripe's fixtures show.

The shapes follow the current API version; pass extra keyword arguments to
add or override fields.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from ..services._signature import compute_signature

__all__ = [
    "build_customer",
    "make_event",
    "sign_payload",
    "stripe_id",
    # products, subscriptions and access (issue 4)
    "build_charge",
    "build_dispute",
    "build_invoice",
    "build_invoice_payment",
    "build_price",
    "build_product",
    "build_refund",
    "build_subscription",
    # tenants and customers (issue 3)
    "build_account",
    "build_account_link",
    "build_oauth_token",
    "build_deleted_customer",
]

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


# -- products, subscriptions and access (issue 4) -------------------------------------
#
# Shapes follow Stripe's OpenAPI fixtures (current API) and, with shape="plan" or
# shape="legacy", the 2016-2020 shapes that endpoints pinned to old versions send.

_MONTH = 30 * 24 * 3600


def _now(value: int | None) -> int:
    return int(time.time()) if value is None else value


def build_product(
    *,
    id: str | None = None,
    name: str = "T-shirt",
    active: bool = True,
    livemode: bool = False,
    created: int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A Stripe ``product`` object at the current API version."""
    moment = _now(created)
    product: dict[str, Any] = {
        "id": id or stripe_id("prod"),
        "object": "product",
        "active": active,
        "created": moment,
        "default_price": None,
        "description": None,
        "images": [],
        "livemode": livemode,
        "marketing_features": [],
        "metadata": {},
        "name": name,
        "package_dimensions": None,
        "shippable": None,
        "statement_descriptor": None,
        "tax_code": None,
        "unit_label": None,
        "updated": moment,
        "url": None,
        "type": "service",
    }
    product.update(extra)
    return product


def build_price(
    *,
    product: str | Mapping[str, Any],
    id: str | None = None,
    unit_amount: int = 2000,
    currency: str = "usd",
    interval: str = "month",
    interval_count: int = 1,
    active: bool = True,
    nickname: str | None = None,
    shape: Literal["price", "plan"] = "price",
    livemode: bool = False,
    created: int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A recurring ``price``, or with ``shape="plan"`` the legacy ``plan`` object.

    ``product`` is an id, or an object that is embedded as it is.
    """
    product_ref = product if isinstance(product, str) else dict(product)
    if shape == "plan":
        plan: dict[str, Any] = {
            "id": id or stripe_id("plan"),
            "object": "plan",
            "active": active,
            "aggregate_usage": None,
            "amount": unit_amount,
            "amount_decimal": str(unit_amount),
            "billing_scheme": "per_unit",
            "created": _now(created),
            "currency": currency,
            "interval": interval,
            "interval_count": interval_count,
            "livemode": livemode,
            "metadata": {},
            "nickname": nickname,
            "product": product_ref,
            "tiers_mode": None,
            "transform_usage": None,
            "trial_period_days": None,
            "usage_type": "licensed",
        }
        plan.update(extra)
        return plan
    price: dict[str, Any] = {
        "id": id or stripe_id("price"),
        "object": "price",
        "active": active,
        "billing_scheme": "per_unit",
        "created": _now(created),
        "currency": currency,
        "custom_unit_amount": None,
        "livemode": livemode,
        "lookup_key": None,
        "metadata": {},
        "nickname": nickname,
        "product": product_ref,
        "recurring": {
            "interval": interval,
            "interval_count": interval_count,
            "meter": None,
            "usage_type": "licensed",
            "trial_period_days": None,
        },
        "tax_behavior": "unspecified",
        "tiers_mode": None,
        "transform_quantity": None,
        "type": "recurring",
        "unit_amount": unit_amount,
        "unit_amount_decimal": str(unit_amount),
    }
    price.update(extra)
    return price


def _plan_view(price: Mapping[str, Any]) -> dict[str, Any]:
    """The legacy ``plan`` that Stripe still shows next to a subscription item's price."""
    recurring = price.get("recurring") or {}
    return build_price(
        product=price["product"],
        id=price["id"],
        unit_amount=price.get("unit_amount") or 0,
        currency=price.get("currency", "usd"),
        interval=recurring.get("interval", "month"),
        interval_count=recurring.get("interval_count", 1),
        active=price.get("active", True),
        nickname=price.get("nickname"),
        shape="plan",
        created=price.get("created"),
    )


def build_subscription(
    *,
    customer: str,
    id: str | None = None,
    prices: Sequence[Mapping[str, Any]] | None = None,
    quantity: int = 1,
    status: str = "active",
    shape: Literal["price", "plan"] = "price",
    current_period_start: int | None = None,
    current_period_end: int | None = None,
    latest_invoice: str | None = None,
    cancel_at_period_end: bool = False,
    livemode: bool = False,
    created: int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A ``subscription`` with one item per price in ``prices``.

    ``shape="price"`` is the current API: items carry the price (and its legacy
    plan view) and the period fields. ``shape="plan"`` is the old one
    (2016-2020): items and the subscription carry the plan, and the period
    fields sit on the subscription. ``prices`` defaults to one new price of a
    new product (a plan with ``shape="plan"``).
    """
    sub_id = id or stripe_id("sub")
    moment = _now(created)
    start = moment if current_period_start is None else current_period_start
    end = start + _MONTH if current_period_end is None else current_period_end
    if prices is None:
        prices = [build_price(product=stripe_id("prod"), shape=shape, created=moment)]
    items = []
    for price in prices:
        item: dict[str, Any] = {
            "id": stripe_id("si"),
            "object": "subscription_item",
            "billing_thresholds": None,
            "created": moment,
            "discounts": [],
            "metadata": {},
            "quantity": quantity,
            "subscription": sub_id,
            "tax_rates": [],
        }
        if shape == "plan":
            item["plan"] = dict(price)
        else:
            item["price"] = dict(price)
            item["plan"] = _plan_view(price) if price.get("object") == "price" else dict(price)
            item["current_period_start"] = start
            item["current_period_end"] = end
        items.append(item)
    subscription: dict[str, Any] = {
        "id": sub_id,
        "object": "subscription",
        "application": None,
        "application_fee_percent": None,
        "billing_cycle_anchor": start,
        "cancel_at": None,
        "cancel_at_period_end": cancel_at_period_end,
        "canceled_at": None,
        "collection_method": "charge_automatically",
        "created": moment,
        "currency": (prices[0].get("currency") if prices else None) or "usd",
        "customer": customer,
        "days_until_due": None,
        "default_payment_method": None,
        "discounts": [],
        "ended_at": None,
        "items": {
            "object": "list",
            "data": items,
            "has_more": False,
            "total_count": len(items),
            "url": f"/v1/subscription_items?subscription={sub_id}",
        },
        "latest_invoice": latest_invoice,
        "livemode": livemode,
        "metadata": {},
        "pause_collection": None,
        "schedule": None,
        "start_date": moment,
        "status": status,
        "test_clock": None,
        "trial_end": None,
        "trial_start": None,
    }
    if shape == "plan":
        subscription["current_period_start"] = start
        subscription["current_period_end"] = end
        subscription["plan"] = dict(prices[0]) if len(prices) == 1 else None
        subscription["quantity"] = quantity if len(prices) == 1 else None
        subscription["tax_percent"] = None
    else:
        subscription["billing_mode"] = {"type": "classic"}
    subscription.update(extra)
    return subscription


def build_invoice(
    *,
    customer: str,
    id: str | None = None,
    subscription: str | None = None,
    status: str = "paid",
    amount_due: int = 2000,
    amount_paid: int | None = None,
    currency: str = "usd",
    attempt_count: int | None = None,
    next_payment_attempt: int | None = None,
    shape: Literal["parent", "legacy"] = "parent",
    charge: str | None = None,
    payment_intent: str | None = None,
    livemode: bool = False,
    created: int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """An ``invoice``; ``amount_paid`` defaults to ``amount_due`` when paid, else 0.

    ``shape="parent"`` is the current API: the subscription sits at
    ``parent.subscription_details.subscription`` and the invoice names no
    charge (InvoicePayments link them). ``shape="legacy"`` puts it at
    ``invoice.subscription``, with ``charge``, ``payment_intent`` and ``paid``.
    """
    moment = _now(created)
    paid = status == "paid"
    if amount_paid is None:
        amount_paid = amount_due if paid else 0
    if attempt_count is None:
        attempt_count = 0 if status == "draft" else 1
    invoice: dict[str, Any] = {
        "id": id or stripe_id("in"),
        "object": "invoice",
        "account_country": "US",
        "amount_due": amount_due,
        "amount_paid": amount_paid,
        "amount_remaining": amount_due - amount_paid,
        "attempt_count": attempt_count,
        "attempted": attempt_count > 0,
        "auto_advance": status in ("draft", "open"),
        "billing_reason": "subscription_cycle" if subscription else "manual",
        "collection_method": "charge_automatically",
        "created": moment,
        "currency": currency,
        "customer": customer,
        "customer_email": None,
        "description": None,
        "discounts": [],
        "due_date": None,
        "hosted_invoice_url": None,
        "lines": {"object": "list", "data": [], "has_more": False, "url": "/v1/invoices/x/lines"},
        "livemode": livemode,
        "metadata": {},
        "next_payment_attempt": next_payment_attempt,
        "number": None,
        "period_end": moment,
        "period_start": moment,
        "status": status,
        "status_transitions": {
            "finalized_at": None if status == "draft" else moment,
            "marked_uncollectible_at": moment if status == "uncollectible" else None,
            "paid_at": moment if paid else None,
            "voided_at": moment if status == "void" else None,
        },
        "subtotal": amount_due,
        "total": amount_due,
    }
    if shape == "legacy":
        invoice["subscription"] = subscription
        invoice["charge"] = charge
        invoice["payment_intent"] = payment_intent
        invoice["paid"] = paid
    else:
        invoice["parent"] = (
            None
            if subscription is None
            else {
                "quote_details": None,
                "subscription_details": {"metadata": {}, "subscription": subscription},
                "type": "subscription_details",
            }
        )
    invoice.update(extra)
    return invoice


def build_charge(
    *,
    id: str | None = None,
    customer: str | None = None,
    amount: int = 2000,
    amount_refunded: int = 0,
    currency: str = "usd",
    invoice: str | None = None,
    payment_intent: str | None = None,
    refunds: Sequence[Mapping[str, Any]] | None = None,
    status: str = "succeeded",
    livemode: bool = False,
    created: int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A ``charge``. ``invoice`` adds the old API's ``charge.invoice``; ``refunds`` embeds a list."""
    charge_id = id or stripe_id("ch")
    charge: dict[str, Any] = {
        "id": charge_id,
        "object": "charge",
        "amount": amount,
        "amount_captured": amount,
        "amount_refunded": amount_refunded,
        "balance_transaction": stripe_id("txn"),
        "captured": True,
        "created": _now(created),
        "currency": currency,
        "customer": customer,
        "description": None,
        "disputed": False,
        "failure_code": None,
        "failure_message": None,
        "livemode": livemode,
        "metadata": {},
        "paid": status == "succeeded",
        "payment_intent": payment_intent,
        "payment_method": stripe_id("pm"),
        "refunded": amount_refunded >= amount > 0,
        "status": status,
    }
    if invoice is not None:
        charge["invoice"] = invoice
    if refunds is not None:
        charge["refunds"] = {
            "object": "list",
            "data": [dict(r) for r in refunds],
            "has_more": False,
            "total_count": len(refunds),
            "url": f"/v1/charges/{charge_id}/refunds",
        }
    charge.update(extra)
    return charge


def build_dispute(
    *,
    charge: str | Mapping[str, Any],
    id: str | None = None,
    status: str = "needs_response",
    amount: int = 2000,
    currency: str = "usd",
    payment_intent: str | None = None,
    reason: str = "fraudulent",
    livemode: bool = False,
    created: int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A ``dispute``; ``status="warning_needs_response"`` makes it an inquiry."""
    moment = _now(created)
    dispute: dict[str, Any] = {
        "id": id or stripe_id("dp"),
        "object": "dispute",
        "amount": amount,
        "balance_transactions": [],
        "charge": charge if isinstance(charge, str) else dict(charge),
        "created": moment,
        "currency": currency,
        "evidence_details": {
            "due_by": moment + 14 * 24 * 3600,
            "has_evidence": False,
            "past_due": False,
            "submission_count": 0,
        },
        "is_charge_refundable": False,
        "livemode": livemode,
        "metadata": {},
        "payment_intent": payment_intent,
        "reason": reason,
        "status": status,
    }
    dispute.update(extra)
    return dispute


def build_refund(
    *,
    charge: str,
    id: str | None = None,
    amount: int = 2000,
    currency: str = "usd",
    status: str = "succeeded",
    payment_intent: str | None = None,
    created: int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A ``refund`` of ``amount`` from ``charge``."""
    refund: dict[str, Any] = {
        "id": id or stripe_id("re"),
        "object": "refund",
        "amount": amount,
        "balance_transaction": None,
        "charge": charge,
        "created": _now(created),
        "currency": currency,
        "metadata": {},
        "payment_intent": payment_intent,
        "reason": None,
        "receipt_number": None,
        "status": status,
    }
    refund.update(extra)
    return refund


def build_invoice_payment(
    *,
    invoice: str,
    id: str | None = None,
    payment_intent: str | None = None,
    charge: str | None = None,
    amount_paid: int | None = 2000,
    currency: str = "usd",
    status: str = "paid",
    livemode: bool = False,
    created: int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """An ``invoice_payment`` (API 2025-03-31 and later): a payment intent or charge for an invoice."""
    moment = _now(created)
    if charge is not None:
        payment: dict[str, Any] = {"type": "charge", "charge": charge}
    else:
        payment = {"type": "payment_intent", "payment_intent": payment_intent or stripe_id("pi")}
    invoice_payment: dict[str, Any] = {
        "id": id or stripe_id("inpay"),
        "object": "invoice_payment",
        "amount_paid": amount_paid if status == "paid" else None,
        "amount_requested": amount_paid,
        "created": moment,
        "currency": currency,
        "invoice": invoice,
        "is_default": True,
        "livemode": livemode,
        "payment": payment,
        "status": status,
        "status_transitions": {
            "canceled_at": None,
            "paid_at": moment if status == "paid" else None,
        },
    }
    invoice_payment.update(extra)
    return invoice_payment


# -- tenants and customers (issue 3) --------------------------------------------------


def build_deleted_customer(id: str) -> dict[str, Any]:
    """What Stripe answers for a deleted customer: ``{"id", "object", "deleted": true}``."""
    return {"id": id, "object": "customer", "deleted": True}


def build_account(
    *,
    id: str | None = None,
    details_submitted: bool = False,
    charges_enabled: bool = False,
    country: str = "US",
    email: str | None = "site@stripe.com",
    created: int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A Connect ``account`` (Standard, dashboard access), as ``GET /v1/accounts/{id}`` returns.

    Until ``details_submitted``, ``requirements.currently_due`` lists what
    onboarding still has to collect, as Stripe's fixture shows.
    """
    due = (
        []
        if details_submitted
        else [
            "business_profile.product_description",
            "business_profile.support_phone",
            "business_profile.url",
            "external_account",
            "tos_acceptance.date",
            "tos_acceptance.ip",
        ]
    )
    account: dict[str, Any] = {
        "id": id or stripe_id("acct"),
        "object": "account",
        "business_profile": {"mcc": None, "name": None, "url": None, "support_email": None},
        "business_type": None,
        "capabilities": {"card_payments": "active", "transfers": "active"},
        "charges_enabled": charges_enabled,
        "controller": {"type": "account"},
        "country": country,
        "created": int(time.time()) if created is None else created,
        "default_currency": "usd",
        "details_submitted": details_submitted,
        "email": email,
        "metadata": {},
        "payouts_enabled": charges_enabled,
        "requirements": {
            "alternatives": [],
            "current_deadline": None,
            "currently_due": due,
            "disabled_reason": None if details_submitted else "requirements.past_due",
            "errors": [],
            "eventually_due": list(due),
            "past_due": list(due),
            "pending_verification": [],
        },
        "type": "standard",
    }
    account.update(extra)
    return account


def build_account_link(account: str, *, expires_in: int = 300) -> dict[str, Any]:
    """An ``account_link``: a single-use onboarding URL that expires after a few minutes."""
    now = int(time.time())
    return {
        "object": "account_link",
        "created": now,
        "expires_at": now + expires_in,
        "url": f"https://connect.stripe.com/setup/s/{account}/{secrets.token_urlsafe(9)}",
    }


def build_oauth_token(
    stripe_user_id: str, *, livemode: bool = False, scope: str = "read_write"
) -> dict[str, Any]:
    """The answer of ``POST /oauth/token`` for an authorization code (keys are placeholders)."""
    prefix = "live" if livemode else "test"
    return {
        "access_token": f"sk_{prefix}_placeholder",
        "livemode": livemode,
        "refresh_token": "rt_placeholder",
        "scope": scope,
        "stripe_publishable_key": f"pk_{prefix}_placeholder",
        "stripe_user_id": stripe_user_id,
        "token_type": "bearer",
    }
