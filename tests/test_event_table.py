"""docs/events.md is true: every event type in its table is handled, with the effect it names.

The test reads the table, builds the listed object, posts the event signed
through ``billing.webhooks.handle`` and checks the row's **Check** effect.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from rational_billing import Billing, EventOutcome, Mode
from rational_billing.domain.access import DenialReason
from rational_billing.domain.models import Dispute, Invoice, Refund, Relation, Subscription
from rational_billing.testing import (
    InMemoryStorage,
    build_charge,
    build_dispute,
    build_invoice,
    build_invoice_payment,
    build_price,
    build_product,
    build_refund,
)

from .test_subscriptions import (
    DAY,
    T0,
    TENANT,
    Clock,
    deliver,
    link_customer,
    make_billing,
    map_product,
    stored,
    subscription,
)

DOC = Path(__file__).resolve().parents[1] / "docs" / "events.md"
ROW = re.compile(
    r"^\| `(?P<type>[a-z_.]+)` \| (?P<object>[a-z_]+) \| `(?P<check>[a-z]+)` \| (.+) \|$"
)


def _table() -> list[tuple[str, str, str]]:
    rows = []
    for line in DOC.read_text(encoding="utf-8").splitlines():
        match = ROW.match(line)
        if match:
            rows.append((match["type"], match["object"], match["check"]))
    return rows


TABLE = _table()


def test_the_table_lists_exactly_the_handled_types() -> None:
    """The table lists every event type the products and subscriptions services handle, once."""
    billing = make_billing(InMemoryStorage())
    ours = {billing.products, billing.subscriptions}
    handled = {
        event_type
        for event_type, handlers in billing.webhooks._handlers.items()
        if any(getattr(handler, "__self__", None) in ours for handler in handlers)
    }
    listed = [row[0] for row in TABLE]
    assert len(listed) == len(set(listed)), "an event type is listed twice"
    assert set(listed) == handled


def _object(kind: str, event_type: str) -> dict[str, Any]:
    status = {
        "customer.subscription.deleted": "canceled",
        "customer.subscription.paused": "paused",
        "invoice.voided": "void",
        "invoice.marked_uncollectible": "uncollectible",
        "invoice.payment_failed": "open",
        "invoice.payment_action_required": "open",
        "invoice.finalized": "open",
        "invoice.created": "draft",
        "invoice.deleted": "draft",
        "charge.dispute.closed": "lost",
        "refund.failed": "failed",
    }.get(event_type)
    if kind == "subscription":
        return subscription(status=status or "active")
    if kind == "invoice":
        return build_invoice(
            customer="cus_A", id="in_1", subscription="sub_A", status=status or "paid"
        )
    if kind == "invoice_payment":
        return build_invoice_payment(invoice="in_1", payment_intent="pi_1")
    if kind == "charge":
        refund = build_refund(charge="ch_1", id="re_1", amount=2000)
        refunds = [refund] if event_type == "charge.refunded" else None
        return build_charge(
            id="ch_1", customer="cus_A", invoice="in_1", payment_intent="pi_1", refunds=refunds
        )
    if kind == "dispute":
        return build_dispute(id="dp_1", charge="ch_1", status=status or "needs_response")
    if kind == "refund":
        return build_refund(charge="ch_1", id="re_1", status=status or "succeeded")
    if kind == "product":
        return build_product(id="prod_pro", name="Pro in Stripe")
    if kind in ("price", "plan"):
        return build_price(product="prod_pro", id="price_1", shape=kind)  # type: ignore[arg-type]
    raise AssertionError(f"the table names an unknown object {kind!r}")


def _before(billing: Billing, check: str) -> None:
    """What must be stored before the event for its effect to show."""
    if check in ("ended", "revoked"):
        deliver(billing, "customer.subscription.created", subscription(), created=T0 - DAY)
        assert billing.subscriptions.has_access(TENANT, "ada", "pro") is True
    if check == "revoked":
        paid = build_invoice(
            customer="cus_A", id="in_1", subscription="sub_A", shape="legacy", charge="ch_1"
        )
        deliver(billing, "invoice.paid", paid, created=T0 - DAY)


def _check(billing: Billing, check: str, kind: str, obj: dict[str, Any], event_type: str) -> None:
    if check in ("ended", "revoked"):
        assert billing.subscriptions.has_access(TENANT, "ada", "pro") is False
        reason = DenialReason.STATUS if check == "ended" else DenialReason.LOST_DISPUTE
        assert billing.subscriptions.access(TENANT, "ada").denied["pro"].reason is reason
    elif check == "mirror":
        model = {"subscription": Subscription, "invoice": Invoice, "dispute": Dispute}.get(
            kind, Refund
        )
        record = stored(billing, model, obj["id"])
        assert record is not None and record.status == obj["status"]
    elif check == "failure":
        assert stored(billing, Invoice, "in_1").first_failed_at == T0
    elif check == "deleted":
        assert stored(billing, Invoice, "in_1").status == "deleted"
    elif check == "pays":
        payment = "pi_1" if kind == "invoice_payment" else "ch_1"
        with billing.storage.transaction() as tx:
            refs = tx.references_from(TENANT, Mode.TEST, payment)
        assert [(r.relation, r.target_id) for r in refs if r.relation is Relation.PAYS] == [
            (Relation.PAYS, "in_1")
        ]
    elif check == "refunds":
        refund = stored(billing, Refund, "re_1")
        assert (refund.amount, refund.invoice_id) == (2000, "in_1")
    elif check == "catalog":
        product = billing.products.get(TENANT, "pro").stripe_product(Mode.TEST)
        assert product is not None and product.name == "Pro in Stripe"
    elif check == "price":
        product = billing.products.get(TENANT, "pro").stripe_product(Mode.TEST)
        assert product is not None and [p.stripe_id for p in product.prices] == ["price_1"]
    elif check == "flagged":
        flags = billing.products.flagged(TENANT)
        assert [(f.problem, f.kind) for f in flags] == [("deleted", kind)]
    else:
        raise AssertionError(f"unknown check {check!r} in docs/events.md")


@pytest.mark.parametrize(("event_type", "kind", "check"), TABLE, ids=[row[0] for row in TABLE])
def test_each_event_has_its_documented_effect(event_type: str, kind: str, check: str) -> None:
    """Posting the event, signed, applies it with the effect the table names."""
    billing = make_billing(InMemoryStorage(), clock=Clock())
    link_customer(billing, "ada", "cus_A")
    map_product(billing, "pro", "prod_pro")
    _before(billing, check)
    obj = _object(kind, event_type)
    response = deliver(billing, event_type, obj, created=T0)
    assert (response.status_code, response.outcome) == (200, EventOutcome.APPLIED), response
    _check(billing, check, kind, obj, event_type)


def test_the_table_is_not_empty() -> None:
    """The parser found the table (a changed layout would otherwise test nothing)."""
    assert len(TABLE) >= 30
