"""Normalisation: every API version's shape of each Stripe object becomes the same model.

Current shapes come from Stripe's OpenAPI fixtures, old ones (2016-2020) from
dj-stripe's test data, both under ../shared (skipped when absent), and from
a running localstripe; the builders in rational_billing.testing cover both.
"""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rational_billing import Mode
from rational_billing.domain.models import Relation, StripeReference
from rational_billing.domain.normalize import (
    normalize_charge,
    normalize_dispute,
    normalize_invoice,
    normalize_invoice_payment,
    normalize_price,
    normalize_product,
    normalize_refund,
    normalize_subscription,
)
from rational_billing.errors import StripeObjectError
from rational_billing.testing import (
    build_charge,
    build_dispute,
    build_invoice,
    build_invoice_payment,
    build_price,
    build_product,
    build_refund,
    build_subscription,
)

SHARED = Path(__file__).resolve().parents[2] / "shared"
OPENAPI = SHARED / "stripe-fixtures" / "openapi-fixtures3.json"
DJSTRIPE = SHARED / "peer-fixtures" / "dj-stripe"
T = datetime(2025, 5, 1, 12, 0, tzinfo=UTC)
KW: dict[str, Any] = {"tenant": "acme", "mode": Mode.TEST, "marker": T}

needs_openapi = pytest.mark.skipif(
    not OPENAPI.exists(), reason="../shared/stripe-fixtures is absent (a user's clone)"
)
needs_djstripe = pytest.mark.skipif(
    not (DJSTRIPE / "manifest.json").exists(),
    reason="../shared/peer-fixtures/dj-stripe is absent (a user's clone)",
)


def _openapi(name: str) -> dict[str, Any]:
    resources: dict[str, Any] = json.loads(OPENAPI.read_text())["resources"]
    return copy.deepcopy(resources[name])


def _djstripe_files(kind: str) -> list[str]:
    if not (DJSTRIPE / "manifest.json").exists():
        return []
    manifest = json.loads((DJSTRIPE / "manifest.json").read_text())
    return sorted(entry["file"] for entry in manifest if entry.get("object") == kind)


def _djstripe(file: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DJSTRIPE / file).read_text())
    return data


# -- current shapes (Stripe's OpenAPI fixtures) ------------------------------------------


@needs_openapi
def test_current_subscription_reads_price_and_item_periods() -> None:
    """A current subscription's items use the price (not the legacy plan) and their own period."""
    sub = normalize_subscription(_openapi("subscription"), **KW).record
    assert sub.stripe_id == "sub_1Pgc6rB7WZ01zgkWNy0Cn5nw"
    assert sub.stripe_customer_id == "cus_QXg1o8vcGmoR32"
    assert sub.status == "active"
    [item] = sub.items
    assert item.price_id == "price_1PgafmB7WZ01zgkW6dKueIc5"
    assert item.stripe_product_id == "prod_QXg1hqf4jFNsqG"
    assert (item.unit_amount, item.currency, item.interval) == (2000, "usd", "month")
    assert item.current_period_end == datetime.fromtimestamp(976287773, UTC)
    assert sub.current_period_end == item.current_period_end
    assert sub.cancel_at_period_end is True


@needs_openapi
def test_current_invoice_finds_its_subscription_under_parent() -> None:
    """A current invoice's subscription is read from parent.subscription_details."""
    invoice = normalize_invoice(_openapi("invoice"), **KW).record
    assert invoice.subscription_id == "subscription"
    assert invoice.stripe_customer_id == "cus_QXg1o8vcGmoR32"
    assert (invoice.status, invoice.amount_due, invoice.amount_paid) == ("draft", 1000, 0)
    assert invoice.charge_id is None
    assert invoice.next_payment_attempt == datetime.fromtimestamp(1234567890, UTC)


@needs_openapi
def test_current_dispute_inquiry_and_refund() -> None:
    """A current dispute (an inquiry) and refund keep their charge, status and amount."""
    dispute = normalize_dispute(_openapi("dispute"), **KW)
    assert dispute.record.status == "warning_needs_response"
    assert dispute.record.charge_id == "ch_1PgafuB7WZ01zgkWXYmPNZs8"
    assert dispute.warnings == ()
    assert (
        StripeReference(
            "acme", Mode.TEST, dispute.record.stripe_id, Relation.DISPUTES, dispute.record.charge_id
        )
        in dispute.references
    )
    refund = normalize_refund(_openapi("refund"), **KW).record
    assert (refund.amount, refund.currency, refund.status) == (100, "usd", "succeeded")
    assert refund.charge_id == "ch_1PgafuB7WZ01zgkWXYmPNZs8"


@needs_openapi
def test_current_charge_names_no_invoice() -> None:
    """A current charge has no invoice field: it states no invoice reference."""
    charge = normalize_charge(_openapi("charge"), **KW)
    assert charge.record.invoice_id is None
    assert not [r for r in charge.references if r.relation is Relation.PAYS]


@needs_openapi
def test_current_invoice_payment_states_what_paid_the_invoice() -> None:
    """An InvoicePayment of type payment_intent links that payment intent to the invoice."""
    raw = _openapi("invoice_payment")
    raw["payment"] = {"type": "payment_intent", "payment_intent": "pi_123"}
    facts = normalize_invoice_payment(raw, tenant="acme", mode=Mode.TEST)
    assert facts.record.invoice_id == "invoice"
    assert facts.references == (
        StripeReference("acme", Mode.TEST, "pi_123", Relation.PAYS, "invoice"),
    )


@needs_openapi
def test_current_catalog_objects() -> None:
    """Products, prices, plans and their deleted stubs normalise with their flags."""
    product = normalize_product(_openapi("product"))
    assert (product.stripe_id, product.name, product.active, product.deleted) == (
        "prod_QXg1hqf4jFNsqG",
        "T-shirt",
        True,
        False,
    )
    assert normalize_product(_openapi("deleted_product")).deleted is True
    owner, price = normalize_price(_openapi("price"))
    assert owner == "prod_QXg1hqf4jFNsqG"
    assert (price.kind, price.unit_amount, price.interval) == ("price", 2000, "month")
    owner, plan = normalize_price(_openapi("plan"))
    assert owner == "prod_QXg1hqf4jFNsqG"
    assert (plan.kind, plan.unit_amount, plan.interval) == ("plan", 2000, "month")
    assert normalize_price(_openapi("deleted_price"))[1].deleted is True


# -- old shapes (dj-stripe's test data, API 2016-2020) --------------------------------------


@needs_djstripe
@pytest.mark.parametrize("file", _djstripe_files("subscription") or ["none"])
def test_old_subscriptions(file: str) -> None:
    """Old subscriptions (plans, period on the subscription) normalise with every item."""
    raw = _djstripe(file)
    sub = normalize_subscription(raw, **KW).record
    assert sub.stripe_customer_id.startswith("cus_")
    assert sub.current_period_end == datetime.fromtimestamp(raw["current_period_end"], UTC)
    assert len(sub.items) == len(raw["items"]["data"])
    assert all(item.stripe_product_id == "prod_fake1" for item in sub.items)
    assert all(item.current_period_end is None for item in sub.items)


def _real_invoices() -> list[str]:
    # FAKE_UPCOMING_INVOICE is a preview ("in"): never mirrored, as it has no real id.
    return [f for f in _djstripe_files("invoice") if "UPCOMING" not in f]


@needs_djstripe
@pytest.mark.parametrize("file", _real_invoices() or ["none"])
def test_old_invoices(file: str) -> None:
    """Old invoices name their subscription and charge directly; the status may be missing."""
    raw = _djstripe(file)
    result = normalize_invoice(raw, **KW)
    invoice = result.record
    assert invoice.subscription_id == raw["subscription"]
    assert invoice.status in {"paid", "open", "uncollectible", "draft", "void"}
    if raw.get("status") is None:
        assert invoice.status == ("paid" if raw.get("paid") else invoice.status)
    charge = raw.get("charge")
    if isinstance(charge, str):
        assert StripeReference("acme", Mode.TEST, charge, Relation.PAYS, raw["id"]) in (
            result.references
        )


@needs_djstripe
@pytest.mark.parametrize("file", _djstripe_files("dispute") or ["none"])
def test_old_disputes(file: str) -> None:
    """Old disputes normalise with their charge (an id or an embedded object)."""
    raw = _djstripe(file)
    dispute = normalize_dispute(raw, **KW).record
    assert dispute.charge_id.startswith("ch_")
    assert dispute.amount > 0


@needs_djstripe
@pytest.mark.parametrize("file", _djstripe_files("charge") or ["none"])
def test_old_charges(file: str) -> None:
    """Old charges link themselves to their invoice and carry their embedded refunds."""
    raw = _djstripe(file)
    result = normalize_charge(raw, **KW)
    facts = result.record
    invoice = raw.get("invoice")
    if isinstance(invoice, str):
        assert facts.invoice_id == invoice
        assert StripeReference("acme", Mode.TEST, raw["id"], Relation.PAYS, invoice) in (
            result.references
        )
    embedded = (
        raw.get("refunds", {}).get("data", []) if isinstance(raw.get("refunds"), dict) else []
    )
    assert [r.stripe_id for r in facts.refunds] == [r["id"] for r in embedded]
    if not isinstance(raw.get("amount"), int):
        assert any("non-integer amount" in w for w in result.warnings)


@needs_djstripe
def test_old_refund_without_customer_keeps_its_charge() -> None:
    """An old refund normalises with its charge and amount."""
    [file] = _djstripe_files("refund")
    refund = normalize_refund(_djstripe(file), **KW).record
    assert (refund.charge_id, refund.amount, refund.status) == (
        "ch_fakefakefakefakefake0001",
        2000,
        "succeeded",
    )


@needs_djstripe
@pytest.mark.parametrize(
    "file",
    _djstripe_files("plan") + _djstripe_files("price") + _djstripe_files("product") or ["none"],
)
def test_old_catalog(file: str) -> None:
    """Old plans, prices and products normalise; plans and prices name their product."""
    raw = _djstripe(file)
    if raw["object"] == "product":
        assert normalize_product(raw).name
    else:
        owner, price = normalize_price(raw)
        assert owner == "prod_fake1" or raw.get("product") is None
        assert price.kind == raw["object"]


@needs_djstripe
def test_old_subscription_event_object() -> None:
    """The data.object of an old customer.subscription.created event normalises."""
    [file] = [f for f in _djstripe_files("event") if "SUBSCRIPTION_CREATED" in f]
    event = _djstripe(file)
    sub = normalize_subscription(event["data"]["object"], **KW).record
    assert sub.items and sub.items[0].stripe_product_id is not None


# -- the builders, both shapes -----------------------------------------------------------


def _same_item_ids(raw: dict[str, Any]) -> dict[str, Any]:
    for i, item in enumerate(raw["items"]["data"]):
        item["id"] = f"si_{i}"
    return raw


@given(
    status=st.sampled_from(["active", "trialing", "past_due", "canceled", "incomplete"]),
    quantity=st.integers(min_value=1, max_value=50),
    amounts=st.lists(st.integers(min_value=0, max_value=10**6), min_size=1, max_size=3),
    start=st.integers(min_value=1_500_000_000, max_value=2_000_000_000),
    cancel=st.booleans(),
)
def test_price_and_plan_shapes_normalise_alike(
    status: str, quantity: int, amounts: list[int], start: int, cancel: bool
) -> None:
    """The same subscription in the current (price) and old (plan) shapes gives one model."""
    prices = [
        build_price(product=f"prod_{i}", id=f"price_{i}", unit_amount=a)
        for i, a in enumerate(amounts)
    ]
    plans = [
        build_price(product=f"prod_{i}", id=f"price_{i}", unit_amount=a, shape="plan")
        for i, a in enumerate(amounts)
    ]
    common: dict[str, Any] = {
        "customer": "cus_1",
        "id": "sub_1",
        "quantity": quantity,
        "status": status,
        "current_period_start": start,
        "cancel_at_period_end": cancel,
        "created": start,
    }
    new = normalize_subscription(_same_item_ids(build_subscription(prices=prices, **common)), **KW)
    old = normalize_subscription(
        _same_item_ids(build_subscription(prices=plans, shape="plan", **common)), **KW
    )
    # Only where the period end is kept differs: on the items (new) or not (old).
    assert old.record == attrs.evolve(
        new.record, items=tuple(attrs.evolve(i, current_period_end=None) for i in new.record.items)
    )
    assert new.record.current_period_end == datetime.fromtimestamp(start + 30 * 24 * 3600, UTC)
    assert new.warnings == old.warnings == ()


@given(
    status=st.sampled_from(["draft", "open", "paid", "uncollectible", "void"]),
    due=st.integers(min_value=0, max_value=10**6),
    attempts=st.integers(min_value=0, max_value=5),
    embed=st.booleans(),
)
def test_invoice_subscription_in_either_place(
    status: str, due: int, attempts: int, embed: bool
) -> None:
    """invoice.subscription (old) and parent.subscription_details (new) give the same invoice."""
    customer: Any = {"id": "cus_1", "object": "customer"} if embed else "cus_1"
    common: dict[str, Any] = {
        "customer": customer,
        "id": "in_1",
        "subscription": "sub_1",
        "status": status,
        "amount_due": due,
        "attempt_count": attempts,
        "created": 1_700_000_000,
    }
    new = normalize_invoice(build_invoice(**common), **KW).record
    old = normalize_invoice(build_invoice(shape="legacy", **common), **KW).record
    assert new == old
    assert (new.subscription_id, new.stripe_customer_id) == ("sub_1", "cus_1")


@pytest.mark.parametrize(
    ("flags", "status"),
    [
        ({"paid": True, "closed": True}, "paid"),
        ({"paid": False, "forgiven": True, "closed": True}, "uncollectible"),
        # closed=true became auto_advance=false in 2018-11-08: still open, not uncollectible.
        ({"paid": False, "forgiven": False, "closed": True}, "open"),
        ({"paid": False, "closed": False}, "open"),
    ],
)
def test_invoices_before_2018_11_08_read_their_status_from_flags(
    flags: dict[str, bool], status: str
) -> None:
    """An invoice without status gets it from paid and forgiven as Stripe's upgrade maps them."""
    raw = build_invoice(customer="cus_1", id="in_1", shape="legacy")
    del raw["status"]
    raw.update(flags)
    assert normalize_invoice(raw, **KW).record.status == status


def test_embedded_and_referenced_objects_are_read_alike() -> None:
    """A dispute's charge, embedded or named by id, gives the same charge id."""
    charge = build_charge(id="ch_1", customer="cus_1", invoice="in_1", payment_intent="pi_1")
    by_id = normalize_dispute(build_dispute(id="dp_1", charge="ch_1", payment_intent="pi_1"), **KW)
    embedded = normalize_dispute(build_dispute(id="dp_1", charge=charge), **KW)
    assert embedded.record.charge_id == by_id.record.charge_id == "ch_1"
    assert embedded.record.payment_intent_id == by_id.record.payment_intent_id == "pi_1"
    # The embedded charge says more: its customer and its invoice (old API versions).
    assert (embedded.record.stripe_customer_id, embedded.record.invoice_id) == ("cus_1", "in_1")
    assert StripeReference("acme", Mode.TEST, "ch_1", Relation.PAYS, "in_1") in embedded.references


def test_charge_with_embedded_refunds() -> None:
    """charge.refunded (old API) carries the refunds: each becomes a Refund record."""
    refunds = [
        build_refund(charge="ch_1", id="re_1", amount=500),
        build_refund(charge="ch_1", id="re_2", amount=1500),
    ]
    raw = build_charge(
        id="ch_1", customer="cus_1", invoice="in_1", amount_refunded=2000, refunds=refunds
    )
    facts = normalize_charge(raw, **KW)
    assert [
        (r.stripe_id, r.amount, r.stripe_customer_id, r.invoice_id) for r in facts.record.refunds
    ] == [
        ("re_1", 500, "cus_1", "in_1"),
        ("re_2", 1500, "cus_1", "in_1"),
    ]


def test_invoice_payment_of_a_charge() -> None:
    """An InvoicePayment of type charge links the charge to the invoice."""
    facts = normalize_invoice_payment(
        build_invoice_payment(invoice="in_1", charge="ch_1"), tenant="acme", mode=Mode.TEST
    )
    assert facts.references == (StripeReference("acme", Mode.TEST, "ch_1", Relation.PAYS, "in_1"),)


def test_product_and_price_builders() -> None:
    """The product and price builders normalise to what they were built with."""
    product = normalize_product(build_product(id="prod_1", name="Pro", active=False))
    assert (product.name, product.active) == ("Pro", False)
    owner, price = normalize_price(
        build_price(product="prod_1", id="price_1", unit_amount=999, interval="year")
    )
    assert (owner, price.unit_amount, price.interval, price.kind) == (
        "prod_1",
        999,
        "year",
        "price",
    )


# -- bad input ---------------------------------------------------------------------------


def test_unknown_status_is_kept_and_flagged() -> None:
    """An unknown subscription status is stored as sent, with a warning."""
    result = normalize_subscription(build_subscription(customer="cus_1", status="on_fire"), **KW)
    assert result.record.status == "on_fire"
    assert any("unknown status 'on_fire'" in w for w in result.warnings)


@pytest.mark.parametrize(
    ("build", "drop", "message"),
    [
        (lambda: build_subscription(customer="cus_1"), "id", "has no id"),
        (lambda: build_subscription(customer="cus_1"), "customer", "has no customer"),
        (lambda: build_subscription(customer="cus_1"), "status", "has no status"),
        (lambda: build_invoice(customer="cus_1"), "customer", "has no customer"),
        (lambda: build_invoice(customer="cus_1"), "currency", "has no currency"),
        (lambda: build_dispute(charge="ch_1"), "charge", "names no charge"),
        (lambda: build_invoice_payment(invoice="in_1"), "invoice", "names no invoice"),
    ],
)
def test_objects_missing_what_we_need_raise(build: Any, drop: str, message: str) -> None:
    """An object without an id, customer, status, currency or charge raises StripeObjectError."""
    raw = build()
    raw.pop(drop)
    with pytest.raises(StripeObjectError, match=message):
        _normalize(raw)


def _normalize(raw: dict[str, Any]) -> Any:
    """The normalised record of any of the mirrored object types."""
    kind = raw["object"]
    if kind == "invoice_payment":
        return normalize_invoice_payment(raw, tenant="acme", mode=Mode.TEST).record
    normalizer: Any = {
        "subscription": normalize_subscription,
        "invoice": normalize_invoice,
        "dispute": normalize_dispute,
        "refund": normalize_refund,
        "charge": normalize_charge,
    }[kind]
    return normalizer(raw, **KW).record


def test_item_without_product_is_flagged() -> None:
    """A subscription item whose price names no product is kept and reported."""
    raw = build_subscription(customer="cus_1", prices=[build_price(product="prod_1")])
    raw["items"]["data"][0]["price"] = "price_only_an_id"
    del raw["items"]["data"][0]["plan"]
    result = normalize_subscription(raw, **KW)
    assert result.record.items[0].stripe_product_id is None
    assert result.record.items[0].price_id == "price_only_an_id"
    assert any("names no product" in w for w in result.warnings)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


@given(
    field=st.sampled_from(
        ["customer", "status", "items", "current_period_end", "latest_invoice", "created", "plan"]
    ),
    value=json_values,
)
def test_garbage_fields_never_crash_subscriptions(field: str, value: Any) -> None:
    """Any JSON in any field gives a record or a StripeObjectError, never another exception."""
    raw = build_subscription(customer="cus_1")
    raw[field] = value
    try:
        sub = normalize_subscription(raw, **KW).record
    except StripeObjectError as exc:
        error: StripeObjectError | None = exc
    else:
        error = None
        assert sub.stripe_id == raw["id"]
        assert all(isinstance(item.quantity, int) for item in sub.items)
    assert error is None or str(error).startswith("subscription ")


@given(
    kind=st.sampled_from(["invoice", "dispute", "refund", "charge", "invoice_payment"]),
    field=st.sampled_from(
        [
            "customer",
            "status",
            "charge",
            "payment_intent",
            "amount",
            "invoice",
            "payment",
            "parent",
            "refunds",
        ]
    ),
    value=json_values,
)
def test_garbage_fields_never_crash_payments(kind: str, field: str, value: Any) -> None:
    """Invoices, disputes, refunds, charges and InvoicePayments with garbage never crash."""
    raw = {
        "invoice": lambda: build_invoice(customer="cus_1", subscription="sub_1"),
        "dispute": lambda: build_dispute(charge="ch_1"),
        "refund": lambda: build_refund(charge="ch_1"),
        "charge": lambda: build_charge(customer="cus_1"),
        "invoice_payment": lambda: build_invoice_payment(invoice="in_1"),
    }[kind]()
    raw[field] = value
    try:
        record = _normalize(raw)
    except StripeObjectError as exc:
        error: StripeObjectError | None = exc
    else:
        error = None
        assert isinstance(getattr(record, "stripe_id", None) or record.invoice_id, str)
    assert error is None or str(error)


# -- localstripe's old shapes ---------------------------------------------------------------


@pytest.mark.localstripe
def test_localstripe_shapes(localstripe_api: Any) -> None:
    """localstripe's plan-shaped subscription and its invoice normalise with product and period."""
    from .fixtures.localstripe import unique_email

    product = localstripe_api.post("/v1/products", name="Norm", type="service")
    plan = localstripe_api.post(
        "/v1/plans", product=product["id"], amount=1500, currency="eur", interval="month"
    )
    customer = localstripe_api.post("/v1/customers", email=unique_email("norm"))
    card = localstripe_api.post("/v1/payment_methods/pm_card_visa/attach", customer=customer["id"])
    localstripe_api.post(
        f"/v1/customers/{customer['id']}", invoice_settings={"default_payment_method": card["id"]}
    )
    sub_raw = localstripe_api.post(
        "/v1/subscriptions", customer=customer["id"], items=[{"plan": plan["id"]}]
    )
    sub = normalize_subscription(sub_raw, **KW).record
    assert sub.status == "active"
    assert [(i.stripe_product_id, i.price_id, i.unit_amount) for i in sub.items] == [
        (product["id"], plan["id"], 1500)
    ]
    assert sub.current_period_end == datetime.fromtimestamp(sub_raw["current_period_end"], UTC)
    assert sub.latest_invoice_id is not None
    invoice_raw = localstripe_api.get(f"/v1/invoices/{sub.latest_invoice_id}")
    result = normalize_invoice(invoice_raw, **KW)
    invoice = result.record
    assert (invoice.subscription_id, invoice.status, invoice.currency) == (
        sub.stripe_id,
        "paid",
        "eur",
    )
    # localstripe embeds the charge in the invoice: it is read as a reference all the same.
    charge_id = invoice_raw["charge"]["id"]
    assert invoice.charge_id == charge_id
    assert StripeReference("acme", Mode.TEST, charge_id, Relation.PAYS, invoice.stripe_id) in (
        result.references
    )
