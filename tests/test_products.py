"""``billing.products``: local products, Stripe mappings checked over HTTP, guarded remaps, catalog events.

Stripe is the real `StripeGateway` talking to `responses`, so the tests see
the exact requests: path, query, ``Stripe-Account`` and the mode's key.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import responses
from responses import matchers

from rational_billing import Billing, EventOutcome, Mode
from rational_billing.adapters._retry import RetryPolicy
from rational_billing.adapters.stripe_gateway import StripeGateway
from rational_billing.domain.access import DenialReason
from rational_billing.errors import (
    InvalidArgument,
    ProductNotFound,
    RemapConfirmationRequired,
    StripeAPIError,
    StripeProductNotFound,
    TenantNotConnected,
    TenantNotFound,
)
from rational_billing.testing import InMemoryStorage, build_price, build_product

from .test_subscriptions import (
    ACCOUNT,
    CONFIG,
    DAY,
    T0,
    TENANT,
    Clock,
    deliver,
    link_customer,
    make_billing,
    subscription,
)

API = "https://api.stripe.com"


@pytest.fixture
def http() -> Iterator[responses.RequestsMock]:
    """Every HTTP call goes to `responses`; an unexpected one fails the test."""
    with responses.RequestsMock(assert_all_requests_are_fired=True) as rsps:
        yield rsps


@pytest.fixture
def billing(http: responses.RequestsMock) -> Iterator[Billing]:
    """Billing on the real gateway (no retries), tenant ``acme`` in both modes, product ``pro``."""
    with StripeGateway(CONFIG, retry=RetryPolicy.none()) as gateway:
        b = make_billing(InMemoryStorage(), clock=Clock(), stripe=gateway)
        b.products.create(TENANT, product_id="pro", name="Pro plan")
        yield b


def _serve_product(
    http: responses.RequestsMock,
    product_id: str,
    *,
    prices: list[dict[str, Any]] | None = None,
    plans: list[dict[str, Any]] | None = None,
    key: str = "sk_test_subscriptions",
    **fields: Any,
) -> None:
    headers = {"Stripe-Account": ACCOUNT, "Authorization": f"Bearer {key}"}
    http.get(
        f"{API}/v1/products/{product_id}",
        json=build_product(id=product_id, **fields),
        match=[matchers.header_matcher(headers)],
    )
    query = matchers.query_param_matcher({"product": product_id, "limit": "100"})
    if prices is not None:
        page = {"object": "list", "data": prices, "has_more": False, "url": "/v1/prices"}
        http.get(f"{API}/v1/prices", json=page, match=[query])
        return
    http.get(
        f"{API}/v1/prices", status=404, json={"error": {"message": "Unrecognized request URL"}}
    )
    page = {"object": "list", "data": plans or [], "has_more": False, "url": "/v1/plans"}
    http.get(f"{API}/v1/plans", json=page, match=[query])


# -- local products ---------------------------------------------------------------------------


def test_create_get_and_list(billing: Billing) -> None:
    """Products are created locally, read back, and listed in id order."""
    billing.products.create(TENANT, product_id="basic", name="Basic")
    assert billing.products.get(TENANT, "basic").name == "Basic"
    assert [p.id for p in billing.products.list(TENANT, page_size=1)] == ["basic", "pro"]


def test_bad_product_input_changes_nothing(billing: Billing) -> None:
    """A taken id, a bad id, an unknown tenant or product each raise a specific error."""
    with pytest.raises(InvalidArgument, match="already has a product"):
        billing.products.create(TENANT, product_id="pro", name="Other")
    with pytest.raises(InvalidArgument):
        billing.products.create(TENANT, product_id="bad id", name="X")
    with pytest.raises(TenantNotFound):
        billing.products.create("nobody", product_id="x", name="X")
    with pytest.raises(TenantNotFound):
        billing.products.unmap("nobody", "pro", mode=Mode.TEST)
    with pytest.raises(ProductNotFound):
        billing.products.get(TENANT, "missing")
    assert [p.name for p in billing.products.list(TENANT)] == ["Pro plan"]


# -- mapping ------------------------------------------------------------------------------


def test_map_checks_the_product_and_records_its_prices(
    billing: Billing, http: responses.RequestsMock
) -> None:
    """map reads the product and its prices on the tenant's account, in the mode's key."""
    prices = [
        build_price(product="prod_T", id="price_b", unit_amount=900),
        build_price(
            product="prod_T", id="price_a", unit_amount=9000, interval="year", active=False
        ),
    ]
    _serve_product(http, "prod_T", name="Pro (Stripe)", prices=prices)
    product = billing.products.map(TENANT, "pro", mode=Mode.TEST, stripe_product_id="prod_T")
    assert product.stripe_test_product_id == "prod_T"
    assert product.stripe_live_product_id is None
    stripe = product.stripe_product(Mode.TEST)
    assert stripe is not None and stripe.name == "Pro (Stripe)"
    assert [(p.stripe_id, p.unit_amount, p.interval, p.active) for p in stripe.prices] == [
        ("price_a", 9000, "year", False),
        ("price_b", 900, "month", True),
    ]
    assert billing.products.get(TENANT, "pro") == product


def test_test_and_live_map_independently(billing: Billing, http: responses.RequestsMock) -> None:
    """The live mapping uses the live key and leaves the test mapping alone."""
    _serve_product(http, "prod_T", prices=[])
    _serve_product(http, "prod_L", prices=[], key="sk_live_subscriptions", livemode=True)
    billing.products.map(TENANT, "pro", mode=Mode.TEST, stripe_product_id="prod_T")
    product = billing.products.map(TENANT, "pro", mode="live", stripe_product_id="prod_L")
    assert (product.stripe_test_product_id, product.stripe_live_product_id) == ("prod_T", "prod_L")


def test_map_falls_back_to_plans(billing: Billing, http: responses.RequestsMock) -> None:
    """Where /v1/prices does not exist (localstripe), the product's plans are listed instead."""
    plan = build_price(product="prod_T", id="plan_1", unit_amount=1500, shape="plan")
    _serve_product(http, "prod_T", plans=[plan])
    product = billing.products.map(TENANT, "pro", mode=Mode.TEST, stripe_product_id="prod_T")
    stripe = product.stripe_product(Mode.TEST)
    assert stripe is not None
    assert [(p.stripe_id, p.kind, p.unit_amount) for p in stripe.prices] == [
        ("plan_1", "plan", 1500)
    ]


def test_map_to_a_missing_product_is_refused(
    billing: Billing, http: responses.RequestsMock
) -> None:
    """A product absent in that account and mode raises StripeProductNotFound; nothing changes."""
    error = {"error": {"code": "resource_missing", "message": "No such product: 'prod_X'"}}
    http.get(f"{API}/v1/products/prod_X", status=404, json=error)
    with pytest.raises(StripeProductNotFound) as info:
        billing.products.map(TENANT, "pro", mode=Mode.TEST, stripe_product_id="prod_X")
    assert (info.value.status, info.value.tenant, info.value.mode) == (404, TENANT, Mode.TEST)
    assert billing.products.get(TENANT, "pro").stripe_test_product_id is None


def test_map_to_a_deleted_product_is_refused(
    billing: Billing, http: responses.RequestsMock
) -> None:
    """A deleted Stripe product (200 with deleted: true) is refused like a missing one."""
    http.get(
        f"{API}/v1/products/prod_D", json={"id": "prod_D", "object": "product", "deleted": True}
    )
    with pytest.raises(StripeProductNotFound, match="deleted"):
        billing.products.map(TENANT, "pro", mode=Mode.TEST, stripe_product_id="prod_D")
    assert billing.products.get(TENANT, "pro").stripe_test_product_id is None


def test_stripe_failure_while_mapping_changes_nothing(
    billing: Billing, http: responses.RequestsMock
) -> None:
    """A Stripe error other than 404 propagates as StripeAPIError and nothing is mapped."""
    http.get(f"{API}/v1/products/prod_T", json=build_product(id="prod_T"))
    http.get(f"{API}/v1/prices", status=500, json={"error": {"message": "boom"}})
    with pytest.raises(StripeAPIError) as info:
        billing.products.map(TENANT, "pro", mode=Mode.TEST, stripe_product_id="prod_T")
    assert info.value.status == 500
    assert billing.products.get(TENANT, "pro").stripe_test_product_id is None


def test_map_needs_a_connected_mode(billing: Billing) -> None:
    """Mapping in a mode the tenant is not connected in raises TenantNotConnected, with no call."""
    billing.tenants.connect("solo", "acct_1Solo", modes=frozenset({Mode.TEST}))
    billing.products.create("solo", product_id="pro", name="Pro")
    with pytest.raises(TenantNotConnected):
        billing.products.map("solo", "pro", mode=Mode.LIVE, stripe_product_id="prod_L")


def test_mapping_again_to_the_same_product_is_a_no_op(
    billing: Billing, http: responses.RequestsMock
) -> None:
    """Mapping to the Stripe product already mapped makes no call and changes nothing."""
    _serve_product(http, "prod_T", prices=[])
    first = billing.products.map(TENANT, "pro", mode=Mode.TEST, stripe_product_id="prod_T")
    again = billing.products.map(TENANT, "pro", mode=Mode.TEST, stripe_product_id="prod_T")
    assert again == first
    assert len(http.calls) == 2


def _subscribers(billing: Billing) -> None:
    """ada and bob subscribe to prod_T, cat to prod_N, dan's prod_T subscription is canceled."""
    for customer, stripe_customer in (("ada", "cus_A"), ("bob", "cus_B"), ("cat", "cus_C")):
        link_customer(billing, customer, stripe_customer)
    link_customer(billing, "dan", "cus_D")
    link_customer(billing, "eve", None)
    for stripe_customer, product, status in (
        ("cus_A", "prod_T", "active"),
        ("cus_B", "prod_T", "trialing"),
        ("cus_C", "prod_N", "active"),
        ("cus_D", "prod_T", "canceled"),
    ):
        raw = subscription(
            stripe_customer, id=f"sub_{stripe_customer}", products=(product,), status=status
        )
        deliver(billing, "customer.subscription.created", raw, created=T0)


def test_remap_is_guarded_with_its_impact(billing: Billing, http: responses.RequestsMock) -> None:
    """Remapping without confirm_remap raises with who gains and loses; with it, access moves."""
    _serve_product(http, "prod_T", prices=[])
    billing.products.map(TENANT, "pro", mode=Mode.TEST, stripe_product_id="prod_T")
    _subscribers(billing)
    assert billing.subscriptions.customers_with_access(TENANT, "pro") == {"ada", "bob"}
    calls = len(http.calls)
    with pytest.raises(RemapConfirmationRequired) as info:
        billing.products.map(TENANT, "pro", mode=Mode.TEST, stripe_product_id="prod_N")
    assert len(http.calls) == calls  # refused before asking Stripe
    assert dict(info.value.impact) == {
        "tenant": TENANT,
        "product_id": "pro",
        "mode": "test",
        "from": "prod_T",
        "to": "prod_N",
        "gained": ("cat",),
        "lost": ("ada", "bob"),
    }
    assert billing.products.get(TENANT, "pro").stripe_test_product_id == "prod_T"
    _serve_product(http, "prod_N", prices=[])
    billing.products.map(
        TENANT, "pro", mode=Mode.TEST, stripe_product_id="prod_N", confirm_remap=True
    )
    assert billing.subscriptions.customers_with_access(TENANT, "pro") == {"cat"}


def test_unmap_is_guarded(billing: Billing, http: responses.RequestsMock) -> None:
    """Unmapping needs confirm_remap; afterwards access is denied as an unmapped product."""
    _serve_product(http, "prod_T", prices=[])
    billing.products.map(TENANT, "pro", mode=Mode.TEST, stripe_product_id="prod_T")
    _subscribers(billing)
    with pytest.raises(RemapConfirmationRequired) as info:
        billing.products.unmap(TENANT, "pro", mode=Mode.TEST)
    assert info.value.impact["lost"] == ("ada", "bob")
    assert info.value.impact["to"] is None
    assert billing.subscriptions.has_access(TENANT, "ada", "pro") is True
    product = billing.products.unmap(TENANT, "pro", mode=Mode.TEST, confirm_remap=True)
    assert (product.stripe_test_product_id, product.stripe_test) == (None, None)
    assert billing.subscriptions.has_access(TENANT, "ada", "pro") is False
    denial = billing.subscriptions.access(TENANT, "ada").denied["pro"]
    assert denial.reason is DenialReason.UNMAPPED_PRODUCT
    assert billing.products.unmap(TENANT, "pro", mode=Mode.TEST) == product  # nothing left: no-op


# -- catalog events -------------------------------------------------------------------------


@pytest.fixture
def mapped(billing: Billing, http: responses.RequestsMock) -> Billing:
    """``pro`` mapped to prod_T (with price_1) and ada subscribed to it."""
    _serve_product(http, "prod_T", name="Pro", prices=[build_price(product="prod_T", id="price_1")])
    billing.products.map(TENANT, "pro", mode=Mode.TEST, stripe_product_id="prod_T")
    link_customer(billing, "ada", "cus_A")
    deliver(
        billing, "customer.subscription.created", subscription(products=("prod_T",)), created=T0
    )
    return billing


def test_product_events_update_the_name_and_flag_deletion(mapped: Billing) -> None:
    """product.updated renames the Stripe side; product.deleted flags it; access keeps working."""
    renamed = build_product(id="prod_T", name="Pro 2025")
    assert (
        deliver(mapped, "product.updated", renamed, created=T0 + DAY).outcome
        is EventOutcome.APPLIED
    )
    product = mapped.products.get(TENANT, "pro")
    assert product.name == "Pro plan"  # the local name is the host's
    stripe = product.stripe_product(Mode.TEST)
    assert stripe is not None and stripe.name == "Pro 2025"
    response = deliver(mapped, "product.deleted", renamed, created=T0 + 2 * DAY)
    assert "flagged deleted" in response.message
    stripe = mapped.products.get(TENANT, "pro").stripe_product(Mode.TEST)
    assert stripe is not None and stripe.deleted and stripe.flagged
    assert [str(f) for f in mapped.products.flagged(TENANT)] == [
        "product pro (test): product prod_T was deleted in Stripe"
    ]
    assert mapped.subscriptions.has_access(TENANT, "ada", "pro") is True


def test_late_older_product_event_is_stale(mapped: Billing) -> None:
    """An older product event arriving after a newer one changes nothing."""
    deliver(mapped, "product.updated", build_product(id="prod_T", name="New"), created=T0 + 2 * DAY)
    response = deliver(
        mapped, "product.updated", build_product(id="prod_T", name="Old"), created=T0 + DAY
    )
    assert response.outcome is EventOutcome.STALE
    stripe = mapped.products.get(TENANT, "pro").stripe_product(Mode.TEST)
    assert stripe is not None and stripe.name == "New"


def test_price_and_plan_events_flag_archived_and_deleted(mapped: Billing) -> None:
    """price.updated (archived) and plan.deleted are flagged; subscriptions keep their access."""
    archived = build_price(product="prod_T", id="price_1", active=False)
    deliver(mapped, "price.updated", archived, created=T0 + DAY)
    plan = build_price(product="prod_T", id="plan_old", shape="plan")
    deliver(mapped, "plan.created", plan, created=T0 + DAY)
    deliver(mapped, "plan.deleted", plan, created=T0 + 2 * DAY)
    # A late plan.created never undoes the deletion.
    assert deliver(
        mapped, "plan.updated", plan, created=T0 + timedelta(days=1, hours=1)
    ).outcome is (EventOutcome.STALE)
    assert sorted(str(f) for f in mapped.products.flagged(TENANT)) == [
        "product pro (test): plan plan_old was deleted in Stripe",
        "product pro (test): price price_1 was archived in Stripe",
    ]
    assert mapped.subscriptions.has_access(TENANT, "ada", "pro") is True


def test_catalog_events_for_unmapped_products_are_ignored(mapped: Billing) -> None:
    """Events about Stripe products that no local product maps to are ignored, with the reason."""
    response = deliver(mapped, "product.updated", build_product(id="prod_other"), created=T0)
    assert (response.outcome, response.message) == (
        EventOutcome.IGNORED,
        "prod_other is mapped to no local product",
    )
    price = build_price(product="prod_other", id="price_x")
    assert deliver(mapped, "price.created", price, created=T0).outcome is EventOutcome.IGNORED
    bad = build_price(product="prod_T")
    del bad["id"]
    assert deliver(mapped, "price.created", bad, created=T0).outcome is EventOutcome.IGNORED
    assert json.dumps([str(f) for f in mapped.products.flagged(TENANT)]) == "[]"
