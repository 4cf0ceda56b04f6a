"""Normalisation: a Stripe object of any API version into our models. Pure: no I/O.

Webhook endpoints can be pinned to old API versions, and backfill reads the
account's default version, so the same object arrives in several shapes
(DESIGN.md §4.6). One function per object type reads every shape:

- a subscription item's ``price``, or the legacy ``plan`` (both present: the price wins);
- the period end on the subscription (old) or on its items (2025-03-31 and later);
- an invoice's subscription at ``invoice.subscription`` (old) or at
  ``invoice.parent.subscription_details.subscription`` (new);
- related objects embedded (expanded) or named by id;
- old invoices without ``status`` (``paid``/``forgiven`` flags; ``closed`` only stopped collection).

Unknown keys are ignored. An unknown status is kept as the string Stripe sent
(it grants nothing) and reported in ``warnings``. A missing id, customer or
charge that a record cannot do without raises `StripeObjectError`.

Besides the record, each function returns the `StripeReference` facts the
object states ("ch_1 pays in_1"), which connect disputes and refunds to their
subscriptions whatever order the events arrive in (§4a.10).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

import attrs

from .._config import Mode
from ..errors import StripeObjectError
from ._serde import MAPPINGS as _MAPPINGS
from .models import (
    Dispute,
    Invoice,
    Refund,
    Relation,
    StripePrice,
    StripeProduct,
    StripeReference,
    Subscription,
    SubscriptionItem,
)

__all__ = [
    "DISPUTE_STATUSES",
    "INVOICE_STATUSES",
    "REFUND_STATUSES",
    "SUBSCRIPTION_STATUSES",
    "ChargeFacts",
    "InvoicePaymentFacts",
    "Normalized",
    "object_id",
    "normalize_charge",
    "normalize_dispute",
    "normalize_invoice",
    "normalize_invoice_payment",
    "normalize_price",
    "normalize_product",
    "normalize_refund",
    "normalize_subscription",
    "timestamp",
]

T = TypeVar("T")

SUBSCRIPTION_STATUSES = frozenset(
    {
        "active",
        "trialing",
        "past_due",
        "unpaid",
        "paused",
        "incomplete",
        "incomplete_expired",
        "canceled",
    }
)
#: ``deleted`` is ours: a draft invoice deleted in Stripe (``invoice.deleted``).
INVOICE_STATUSES = frozenset({"draft", "open", "paid", "uncollectible", "void", "deleted"})
DISPUTE_STATUSES = frozenset(
    {
        "warning_needs_response",
        "warning_under_review",
        "warning_closed",
        "needs_response",
        "under_review",
        "won",
        "lost",
        "prevented",
        "charge_refunded",  # API versions before 2019
    }
)
REFUND_STATUSES = frozenset({"pending", "requires_action", "succeeded", "failed", "canceled"})


@attrs.frozen
class Normalized(Generic[T]):
    """A normalised record, the references its object states, and what looked wrong."""

    record: T
    references: tuple[StripeReference, ...] = ()
    warnings: tuple[str, ...] = ()


@attrs.frozen
class ChargeFacts:
    """What a charge tells us: its customer, invoice (old API), payment intent and refunds."""

    stripe_id: str
    stripe_customer_id: str | None
    invoice_id: str | None
    payment_intent_id: str | None
    amount: int
    amount_refunded: int
    currency: str | None
    refunds: tuple[Refund, ...] = ()


@attrs.frozen
class InvoicePaymentFacts:
    """An InvoicePayment (API 2025-03-31 and later): which payment paid which invoice."""

    stripe_id: str | None
    invoice_id: str
    charge_id: str | None
    payment_intent_id: str | None
    status: str | None
    amount_paid: int | None


# -- field readers --------------------------------------------------------------


def object_id(value: object) -> str | None:
    """The id of a related object, whether Stripe sent the id or the embedded object."""
    if isinstance(value, str) and value:
        return value
    if value is not None and isinstance(value, _MAPPINGS):
        inner = value.get("id")
        if isinstance(inner, str) and inner:
            return inner
    return None


def timestamp(value: object) -> datetime | None:
    """A Stripe timestamp (integer seconds) as an aware UTC datetime, or None."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 253402300800:
        return datetime.fromtimestamp(value, UTC)
    return None


def _integer(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _mapping(value: object) -> Mapping[str, Any]:
    return value if value is not None and isinstance(value, _MAPPINGS) else {}


def _list_data(value: object) -> tuple[Sequence[Any], bool]:
    """The elements of an embedded list object (or a bare list) and its ``has_more``."""
    if isinstance(value, _MAPPINGS):
        data = value.get("data")
        return (data if isinstance(data, list) else []), value.get("has_more") is True
    if isinstance(value, list):
        return value, False
    return [], False


def _require_id(obj: Mapping[str, Any], kind: str) -> str:
    if not isinstance(obj, _MAPPINGS):
        raise StripeObjectError(f"expected a {kind} object, got {type(obj).__name__}")
    found = obj.get("id")
    if not isinstance(found, str) or not found:
        raise StripeObjectError(f"{kind} object has no id")
    return found


def _status(
    obj: Mapping[str, Any], kind: str, stripe_id: str, known: frozenset[str], warnings: list[str]
) -> str:
    status = obj.get("status")
    if not isinstance(status, str) or not status:
        raise StripeObjectError(f"{kind} {stripe_id} has no status")
    if status not in known:
        warnings.append(
            f"{kind} {stripe_id} has the unknown status {status!r}; "
            "it is stored as is and grants nothing"
        )
    return status


def _amount(obj: Mapping[str, Any], key: str, what: str, warnings: list[str]) -> int:
    value = obj.get(key)
    number = _integer(value)
    if number is None:
        if value is not None:
            warnings.append(f"{what} has a non-integer {key} {value!r}; read as 0")
        return 0
    return number


def _same_payment(
    tenant: str, mode: Mode, charge_id: str | None, payment_intent_id: str | None
) -> list[StripeReference]:
    if charge_id is None or payment_intent_id is None:
        return []
    return [
        StripeReference(tenant, mode, charge_id, Relation.SAME_PAYMENT, payment_intent_id),
        StripeReference(tenant, mode, payment_intent_id, Relation.SAME_PAYMENT, charge_id),
    ]


def _pays(
    tenant: str, mode: Mode, payment_ids: Sequence[str | None], invoice_id: str | None
) -> list[StripeReference]:
    if invoice_id is None:
        return []
    return [
        StripeReference(tenant, mode, pid, Relation.PAYS, invoice_id)
        for pid in payment_ids
        if pid is not None
    ]


# -- catalog ---------------------------------------------------------------------


def normalize_product(obj: Mapping[str, Any], *, marker: datetime | None = None) -> StripeProduct:
    """A Stripe product (or the stub of a deleted one) as a `StripeProduct` without prices.

    Raises:
        StripeObjectError: the object has no id.
    """
    stripe_id = _require_id(obj, "product")
    active = obj.get("active")
    return StripeProduct(
        stripe_id=stripe_id,
        name=_text(obj.get("name")),
        active=active if isinstance(active, bool) else True,
        deleted=obj.get("deleted") is True,
        marker=marker,
    )


def normalize_price(
    obj: Mapping[str, Any], *, marker: datetime | None = None
) -> tuple[str | None, StripePrice]:
    """A price, or a legacy plan, and the id of its Stripe product (None when not named).

    Raises:
        StripeObjectError: the object has no id.
    """
    stripe_id = _require_id(obj, "price")
    is_plan = obj.get("object") == "plan"
    recurring = _mapping(obj.get("recurring"))
    active = obj.get("active")
    price = StripePrice(
        stripe_id=stripe_id,
        kind="plan" if is_plan else "price",
        currency=_lower(obj.get("currency")),
        unit_amount=_integer(obj.get("amount" if is_plan else "unit_amount")),
        interval=_text(obj.get("interval") if is_plan else recurring.get("interval")),
        interval_count=_integer(
            obj.get("interval_count") if is_plan else recurring.get("interval_count")
        ),
        nickname=_text(obj.get("nickname")),
        active=active if isinstance(active, bool) else True,
        deleted=obj.get("deleted") is True,
        marker=marker,
    )
    return object_id(obj.get("product")), price


def _lower(value: object) -> str | None:
    text = _text(value)
    return None if text is None else text.lower()


# -- subscriptions ---------------------------------------------------------------


def _item(
    raw: Mapping[str, Any], fallback_id: str, warnings: list[str], subscription_id: str
) -> SubscriptionItem:
    item_id = object_id(raw.get("id")) or fallback_id
    price = raw.get("price")
    plan = raw.get("plan")
    # Both are present from 2020 to 2025 (plan is a legacy view of the price); the price wins.
    source: Mapping[str, Any] | None = None
    if isinstance(price, _MAPPINGS) and object_id(price):
        source = price
    elif isinstance(plan, _MAPPINGS) and object_id(plan):
        source = plan
    price_id: str | None
    product_id: str | None
    if source is not None:
        product_id, normalized = normalize_price(source)
        price_id = normalized.stripe_id
    else:
        price_id = object_id(price) or object_id(plan)
        product_id, normalized = None, StripePrice(stripe_id=price_id or "")
    if product_id is None:
        warnings.append(
            f"subscription {subscription_id} item {item_id} names no product; "
            "it grants nothing until the subscription is fetched again"
        )
    quantity = _integer(raw.get("quantity"))
    return SubscriptionItem(
        stripe_id=item_id,
        price_id=price_id,
        stripe_product_id=product_id,
        quantity=1 if quantity is None else quantity,
        current_period_end=timestamp(raw.get("current_period_end")),
        currency=normalized.currency,
        unit_amount=normalized.unit_amount,
        interval=normalized.interval,
        interval_count=normalized.interval_count,
    )


def normalize_subscription(
    obj: Mapping[str, Any], *, tenant: str, mode: Mode, marker: datetime
) -> Normalized[Subscription]:
    """A subscription with all its embedded items, in any API version's shape.

    ``past_due_since`` is left unset: it depends on the event history, which
    the tracker merges in.

    Raises:
        StripeObjectError: no id, no customer, or no status.
    """
    stripe_id = _require_id(obj, "subscription")
    warnings: list[str] = []
    customer = object_id(obj.get("customer"))
    if customer is None:
        raise StripeObjectError(f"subscription {stripe_id} has no customer")
    status = _status(obj, "subscription", stripe_id, SUBSCRIPTION_STATUSES, warnings)
    raw_items, has_more = _list_data(obj.get("items"))
    if not raw_items and isinstance(obj.get("plan"), _MAPPINGS):
        # Very old shapes carry one plan and a quantity on the subscription itself.
        raw_items = [{"plan": obj["plan"], "quantity": obj.get("quantity")}]
    items = tuple(
        _item(raw, f"{stripe_id}#{i}", warnings, stripe_id)
        for i, raw in enumerate(raw_items)
        if isinstance(raw, _MAPPINGS)
    )
    if has_more:
        warnings.append(
            f"subscription {stripe_id} has more items than were embedded; "
            "only the embedded ones are mirrored"
        )
    period_end = timestamp(obj.get("current_period_end"))
    if period_end is None:
        ends = [i.current_period_end for i in items if i.current_period_end is not None]
        period_end = max(ends) if ends else None
    record = Subscription(
        tenant=tenant,
        mode=mode,
        stripe_id=stripe_id,
        stripe_customer_id=customer,
        status=status,
        items=items,
        current_period_end=period_end,
        cancel_at_period_end=obj.get("cancel_at_period_end") is True,
        marker=marker,
        latest_invoice_id=object_id(obj.get("latest_invoice")),
        created=timestamp(obj.get("created")),
        ended_at=timestamp(obj.get("ended_at")),
    )
    return Normalized(record, (), tuple(warnings))


# -- invoices and payments -------------------------------------------------------


def _legacy_invoice_status(obj: Mapping[str, Any]) -> str:
    # Before 2018-11-08 invoices had no status, only flags. Stripe's upgrade
    # turned ``forgiven`` into the uncollectible status, and ``closed`` into
    # ``auto_advance=false``: a closed invoice is still open, and owed.
    if obj.get("paid") is True:
        return "paid"
    if obj.get("forgiven") is True:
        return "uncollectible"
    return "open"


def normalize_invoice(
    obj: Mapping[str, Any], *, tenant: str, mode: Mode, marker: datetime
) -> Normalized[Invoice]:
    """An invoice, with its subscription wherever the API version puts it.

    References: the charge and payment intent that paid it (old API versions
    name them on the invoice), and any embedded InvoicePayments (new ones).

    Raises:
        StripeObjectError: no id (an upcoming invoice), no customer, or no currency.
    """
    stripe_id = _require_id(obj, "invoice")
    warnings: list[str] = []
    customer = object_id(obj.get("customer"))
    if customer is None:
        raise StripeObjectError(f"invoice {stripe_id} has no customer")
    currency = _lower(obj.get("currency"))
    if currency is None:
        raise StripeObjectError(f"invoice {stripe_id} has no currency")
    if obj.get("status") is None:
        status = _legacy_invoice_status(obj)
    else:
        status = _status(obj, "invoice", stripe_id, INVOICE_STATUSES, warnings)
    subscription = object_id(obj.get("subscription"))
    if subscription is None:
        details = _mapping(_mapping(obj.get("parent")).get("subscription_details"))
        subscription = object_id(details.get("subscription"))
    charge = object_id(obj.get("charge"))
    intent = object_id(obj.get("payment_intent"))
    references = _pays(tenant, mode, [charge, intent], stripe_id)
    references += _same_payment(tenant, mode, charge, intent)
    payments, _ = _list_data(obj.get("payments"))
    for raw in payments:
        if isinstance(raw, _MAPPINGS):
            try:
                references += normalize_invoice_payment(raw, tenant=tenant, mode=mode).references
            except StripeObjectError as exc:
                warnings.append(f"invoice {stripe_id}: {exc}")
    transitions = _mapping(obj.get("status_transitions"))
    record = Invoice(
        tenant=tenant,
        mode=mode,
        stripe_id=stripe_id,
        stripe_customer_id=customer,
        status=status,
        currency=currency,
        amount_due=_amount(obj, "amount_due", f"invoice {stripe_id}", warnings),
        amount_paid=_amount(obj, "amount_paid", f"invoice {stripe_id}", warnings),
        subscription_id=subscription,
        charge_id=charge,
        attempt_count=_integer(obj.get("attempt_count")) or 0,
        next_payment_attempt=timestamp(obj.get("next_payment_attempt")),
        marker=marker,
        payment_intent_id=intent,
        created=timestamp(obj.get("created")),
        paid_at=timestamp(transitions.get("paid_at")),
    )
    return Normalized(record, tuple(references), tuple(warnings))


def normalize_invoice_payment(
    obj: Mapping[str, Any], *, tenant: str, mode: Mode
) -> Normalized[InvoicePaymentFacts]:
    """An InvoicePayment: the payment intent or charge that pays an invoice (§4a.10).

    Raises:
        StripeObjectError: it names no invoice.
    """
    if not isinstance(obj, _MAPPINGS):
        raise StripeObjectError(f"expected an invoice_payment object, got {type(obj).__name__}")
    invoice = object_id(obj.get("invoice"))
    if invoice is None:
        raise StripeObjectError("invoice_payment object names no invoice")
    payment = _mapping(obj.get("payment"))
    charge = object_id(payment.get("charge"))
    intent = object_id(payment.get("payment_intent"))
    warnings: list[str] = []
    if charge is None and intent is None:
        warnings.append(
            f"invoice_payment {obj.get('id')} for {invoice} names no charge or payment intent"
        )
    facts = InvoicePaymentFacts(
        stripe_id=_text(obj.get("id")),
        invoice_id=invoice,
        charge_id=charge,
        payment_intent_id=intent,
        status=_text(obj.get("status")),
        amount_paid=_integer(obj.get("amount_paid")),
    )
    references = _pays(tenant, mode, [charge, intent], invoice)
    references += _same_payment(tenant, mode, charge, intent)
    return Normalized(facts, tuple(references), tuple(warnings))


def normalize_charge(
    obj: Mapping[str, Any], *, tenant: str, mode: Mode, marker: datetime
) -> Normalized[ChargeFacts]:
    """A charge: its invoice (old API versions), payment intent, customer and embedded refunds.

    Raises:
        StripeObjectError: the object has no id.
    """
    stripe_id = _require_id(obj, "charge")
    warnings: list[str] = []
    customer = object_id(obj.get("customer"))
    invoice = object_id(obj.get("invoice"))
    intent = object_id(obj.get("payment_intent"))
    refunds: list[Refund] = []
    references = _pays(tenant, mode, [stripe_id, intent], invoice)
    references += _same_payment(tenant, mode, stripe_id, intent)
    raw_refunds, _ = _list_data(obj.get("refunds"))
    for raw in raw_refunds:
        if not isinstance(raw, _MAPPINGS):
            continue
        try:
            refund = normalize_refund(
                raw,
                tenant=tenant,
                mode=mode,
                marker=marker,
                charge=obj,
            )
        except StripeObjectError as exc:
            warnings.append(f"charge {stripe_id}: {exc}")
            continue
        refunds.append(refund.record)
        references += refund.references
        warnings += refund.warnings
    facts = ChargeFacts(
        stripe_id=stripe_id,
        stripe_customer_id=customer,
        invoice_id=invoice,
        payment_intent_id=intent,
        amount=_amount(obj, "amount", f"charge {stripe_id}", warnings),
        amount_refunded=_amount(obj, "amount_refunded", f"charge {stripe_id}", warnings),
        currency=_lower(obj.get("currency")),
        refunds=tuple(refunds),
    )
    return Normalized(facts, tuple(_unique(references)), tuple(warnings))


def _unique(references: Sequence[StripeReference]) -> list[StripeReference]:
    return list(dict.fromkeys(references))


def normalize_dispute(
    obj: Mapping[str, Any], *, tenant: str, mode: Mode, marker: datetime
) -> Normalized[Dispute]:
    """A dispute (or an inquiry, ``warning_*``) on a charge, embedded or named by id.

    ``invoice_id`` and ``stripe_customer_id`` are filled only from an embedded
    charge; the tracker resolves them through stored references otherwise.

    Raises:
        StripeObjectError: no id, no charge, or no status.
    """
    stripe_id = _require_id(obj, "dispute")
    warnings: list[str] = []
    charge_obj = _mapping(obj.get("charge"))
    charge = object_id(obj.get("charge"))
    if charge is None:
        raise StripeObjectError(f"dispute {stripe_id} names no charge")
    status = _status(obj, "dispute", stripe_id, DISPUTE_STATUSES, warnings)
    intent = object_id(obj.get("payment_intent")) or object_id(charge_obj.get("payment_intent"))
    invoice = object_id(charge_obj.get("invoice"))
    references = [StripeReference(tenant, mode, stripe_id, Relation.DISPUTES, charge)]
    if intent is not None:
        references.append(StripeReference(tenant, mode, stripe_id, Relation.DISPUTES, intent))
    references += _same_payment(tenant, mode, charge, intent)
    references += _pays(tenant, mode, [charge, intent], invoice)
    record = Dispute(
        tenant=tenant,
        mode=mode,
        stripe_id=stripe_id,
        charge_id=charge,
        status=status,
        amount=_amount(obj, "amount", f"dispute {stripe_id}", warnings),
        currency=_lower(obj.get("currency")) or "",
        stripe_customer_id=object_id(charge_obj.get("customer")),
        invoice_id=invoice,
        reason=_text(obj.get("reason")),
        marker=marker,
        payment_intent_id=intent,
        created=timestamp(obj.get("created")),
    )
    return Normalized(record, tuple(references), tuple(warnings))


def normalize_refund(
    obj: Mapping[str, Any],
    *,
    tenant: str,
    mode: Mode,
    marker: datetime,
    charge: Mapping[str, Any] | None = None,
) -> Normalized[Refund]:
    """A refund; ``charge`` is the charge it was embedded in, if any.

    Refunds from before 2016 have no status: they succeeded.

    Raises:
        StripeObjectError: no id.
    """
    stripe_id = _require_id(obj, "refund")
    warnings: list[str] = []
    charge_obj = _mapping(obj.get("charge")) or (charge or {})
    charge_id = object_id(obj.get("charge")) or object_id(charge_obj.get("id"))
    intent = object_id(obj.get("payment_intent")) or object_id(charge_obj.get("payment_intent"))
    if obj.get("status") is None:
        status = "succeeded"
    else:
        status = _status(obj, "refund", stripe_id, REFUND_STATUSES, warnings)
    invoice = object_id(charge_obj.get("invoice"))
    references = [
        StripeReference(tenant, mode, stripe_id, Relation.REFUNDS, pid)
        for pid in (charge_id, intent)
        if pid is not None
    ]
    references += _same_payment(tenant, mode, charge_id, intent)
    references += _pays(tenant, mode, [charge_id, intent], invoice)
    record = Refund(
        tenant=tenant,
        mode=mode,
        stripe_id=stripe_id,
        charge_id=charge_id,
        amount=_amount(obj, "amount", f"refund {stripe_id}", warnings),
        currency=_lower(obj.get("currency")) or _lower(charge_obj.get("currency")) or "",
        status=status,
        stripe_customer_id=object_id(obj.get("customer")) or object_id(charge_obj.get("customer")),
        invoice_id=invoice,
        marker=marker,
        payment_intent_id=intent,
        created=timestamp(obj.get("created")),
    )
    return Normalized(record, tuple(references), tuple(warnings))
