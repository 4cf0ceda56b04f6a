"""Linking local customers to existing Stripe customers, unlinking, and guarded remapping (§4a.6).

Every Stripe request is checked for the tenant's ``Stripe-Account``, the
mode's secret key and, on mutating calls, an idempotency key.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs

import pytest
import responses

from rational_billing import Billing, BillingConfig, Mode, ModeKeys, SyncState
from rational_billing.adapters._retry import RetryPolicy
from rational_billing.adapters.stripe_gateway import StripeGateway
from rational_billing.domain.models import Product, Subscription, SubscriptionItem
from rational_billing.errors import (
    AlreadyLinked,
    CustomerNotFound,
    InvalidArgument,
    NotLinked,
    RemapConfirmationRequired,
    StripeCustomerNotFound,
    TenantNotConnected,
    TenantNotFound,
)
from rational_billing.testing import InMemoryStorage, RecordingMailer, build_customer

API = "https://api.stripe.com"
ACCOUNT = "acct_1LINKINGAAAAAA"
KEYS = {Mode.TEST: "sk_test_linking", Mode.LIVE: "sk_live_linking"}
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def _billing(*, live: bool = True) -> Billing:
    config = BillingConfig(
        test=ModeKeys(secret_key=KEYS[Mode.TEST], webhook_secrets=("whsec_t",)),
        live=ModeKeys(secret_key=KEYS[Mode.LIVE], webhook_secrets=("whsec_l",)) if live else None,
    )
    gateway = StripeGateway(config, retry=RetryPolicy.none(), sleep=lambda _: None)
    billing = Billing(
        config=config,
        storage=InMemoryStorage(),
        mailer=RecordingMailer(),
        clock=lambda: T0,
        stripe=gateway,
    )
    billing.tenants.connect("acme", ACCOUNT, modes=billing.config.modes)
    return billing


@pytest.fixture
def billing() -> Billing:
    """Billing with test and live keys and tenant 'acme' connected in both modes."""
    return _billing()


def _check(call: Any, mode: Mode) -> None:
    """The request went to the tenant's account, with the mode's key (and a key when mutating)."""
    headers = call.request.headers
    assert headers["Stripe-Account"] == ACCOUNT
    assert headers["Authorization"] == f"Bearer {KEYS[mode]}"
    if call.request.method in ("POST", "DELETE"):
        assert headers["Idempotency-Key"].startswith("rb-")
    else:
        assert "Idempotency-Key" not in headers


def _form(call: Any) -> dict[str, list[str]]:
    return parse_qs(call.request.body or "", keep_blank_values=True)


def _snapshot(billing: Billing) -> Any:
    storage = billing.storage
    assert isinstance(storage, InMemoryStorage)
    return (
        dict(storage._customers),
        dict(storage._customer_by_link),
        dict(storage._outbox),
        dict(storage._tenants),
        dict(storage._invitations),
    )


def _grant(
    billing: Billing, stripe_customer_id: str, product: str, *, mode: Mode = Mode.TEST
) -> None:
    """An active subscription under the Stripe customer to a product mapped locally."""
    stripe_product = f"prod_{product}"
    with billing.storage.transaction() as tx:
        kwargs = {
            "stripe_live_product_id"
            if mode is Mode.LIVE
            else "stripe_test_product_id": stripe_product
        }
        tx.put_product(Product(tenant="acme", id=product, name=product, created_at=T0, **kwargs))
        tx.mirror(
            Subscription(
                tenant="acme",
                mode=mode,
                stripe_id=f"sub_{product}_{stripe_customer_id}",
                stripe_customer_id=stripe_customer_id,
                status="active",
                items=(SubscriptionItem(f"si_{product}", f"price_{product}", stripe_product),),
                marker=T0,
            )
        )


@responses.activate
def test_link_retrieves_then_tags_the_stripe_customer(billing: Billing) -> None:
    """link GETs the customer on the tenant's account, writes our metadata, and links it."""
    customer = billing.customers.create("acme", email="ada@example.com")
    responses.get(f"{API}/v1/customers/cus_EXIST1", json=build_customer(id="cus_EXIST1"))
    responses.post(f"{API}/v1/customers/cus_EXIST1", json=build_customer(id="cus_EXIST1"))
    linked = billing.customers.link(
        "acme", customer.id, mode=Mode.TEST, stripe_customer_id="cus_EXIST1"
    )
    assert linked.link is not None
    assert (linked.link.mode, linked.link.stripe_customer_id) == (Mode.TEST, "cus_EXIST1")
    assert linked.sync_state is SyncState.SYNCED
    get, post = responses.calls
    assert get.request.method == "GET" and post.request.method == "POST"
    for call in responses.calls:
        _check(call, Mode.TEST)
    assert _form(post) == {
        "metadata[rational_customer_id]": [customer.id],
        "metadata[rational_tenant]": ["acme"],
    }


@responses.activate
def test_live_link_uses_the_live_key(billing: Billing) -> None:
    """A live-mode link talks to Stripe with the live secret key only."""
    customer = billing.customers.create("acme", email="ada@example.com")
    responses.get(
        f"{API}/v1/customers/cus_LIVE1", json=build_customer(id="cus_LIVE1", livemode=True)
    )
    responses.post(f"{API}/v1/customers/cus_LIVE1", json=build_customer(id="cus_LIVE1"))
    linked = billing.customers.link(
        "acme", customer.id, mode="live", stripe_customer_id="cus_LIVE1"
    )
    assert linked.link is not None and linked.link.mode is Mode.LIVE
    assert len(responses.calls) == 2
    for call in responses.calls:
        _check(call, Mode.LIVE)


@responses.activate
def test_link_skips_the_tag_when_stripe_already_names_the_customer(billing: Billing) -> None:
    """A Stripe customer already carrying our metadata is linked without a write."""
    customer = billing.customers.create("acme", email="ada@example.com", customer_id="c_tagged")
    metadata = {"rational_customer_id": "c_tagged", "rational_tenant": "acme"}
    responses.get(f"{API}/v1/customers/cus_T1", json=build_customer(id="cus_T1", metadata=metadata))
    linked = billing.customers.link(
        "acme", customer.id, mode=Mode.TEST, stripe_customer_id="cus_T1"
    )
    assert linked.sync_state is SyncState.SYNCED
    assert [c.request.method for c in responses.calls] == ["GET"]


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (
            404,
            {
                "error": {
                    "type": "invalid_request_error",
                    "code": "resource_missing",
                    "message": "No such customer: 'cus_GONE'",
                }
            },
        ),
        (200, {"id": "cus_GONE", "object": "customer", "deleted": True}),
    ],
    ids=["absent", "deleted"],
)
def test_link_to_an_absent_or_deleted_customer_raises_and_writes_nothing(
    billing: Billing, status: int, body: dict[str, Any]
) -> None:
    """404 or ``deleted: true`` in that account and mode is StripeCustomerNotFound; nothing changes."""
    customer = billing.customers.create("acme", email="ada@example.com")
    before = _snapshot(billing)
    with responses.RequestsMock() as mock:
        mock.get(f"{API}/v1/customers/cus_GONE", status=status, json=body)
        with pytest.raises(StripeCustomerNotFound) as raised:
            billing.customers.link(
                "acme", customer.id, mode=Mode.TEST, stripe_customer_id="cus_GONE"
            )
        (call,) = mock.calls
        _check(call, Mode.TEST)
    assert raised.value.tenant == "acme" and raised.value.mode is Mode.TEST
    assert _snapshot(billing) == before


@responses.activate
def test_linking_to_the_current_link_is_a_no_op_without_http(billing: Billing) -> None:
    """Linking again to the same Stripe customer and mode changes nothing and calls nothing."""
    customer = billing.customers.create("acme", email="ada@example.com")
    responses.get(f"{API}/v1/customers/cus_SAME", json=build_customer(id="cus_SAME"))
    responses.post(f"{API}/v1/customers/cus_SAME", json=build_customer(id="cus_SAME"))
    first = billing.customers.link(
        "acme", customer.id, mode=Mode.TEST, stripe_customer_id="cus_SAME"
    )
    calls = len(responses.calls)
    before = _snapshot(billing)
    again = billing.customers.link(
        "acme", customer.id, mode=Mode.TEST, stripe_customer_id="cus_SAME"
    )
    assert again == first
    assert len(responses.calls) == calls
    assert _snapshot(billing) == before


@responses.activate
def test_a_stripe_customer_links_to_one_local_customer_per_tenant(billing: Billing) -> None:
    """A second local customer cannot take a Stripe customer that is already linked."""
    first = billing.customers.create("acme", email="a@example.com")
    second = billing.customers.create("acme", email="b@example.com")
    responses.get(f"{API}/v1/customers/cus_ONE", json=build_customer(id="cus_ONE"))
    responses.post(f"{API}/v1/customers/cus_ONE", json=build_customer(id="cus_ONE"))
    billing.customers.link("acme", first.id, mode=Mode.TEST, stripe_customer_id="cus_ONE")
    calls = len(responses.calls)
    before = _snapshot(billing)
    with pytest.raises(AlreadyLinked) as raised:
        billing.customers.link("acme", second.id, mode=Mode.TEST, stripe_customer_id="cus_ONE")
    assert raised.value.customer_id == first.id
    assert len(responses.calls) == calls
    assert _snapshot(billing) == before


@responses.activate
def test_remap_without_confirmation_reports_products_gained_and_lost(billing: Billing) -> None:
    """Remapping to another Stripe customer raises with the impact, calls nothing, writes nothing."""
    customer = billing.customers.create("acme", email="ada@example.com")
    responses.get(f"{API}/v1/customers/cus_OLD", json=build_customer(id="cus_OLD"))
    responses.post(f"{API}/v1/customers/cus_OLD", json=build_customer(id="cus_OLD"))
    billing.customers.link("acme", customer.id, mode=Mode.TEST, stripe_customer_id="cus_OLD")
    _grant(billing, "cus_OLD", "basic")
    _grant(billing, "cus_OLD", "shared")
    _grant(billing, "cus_NEW", "pro")
    _grant(billing, "cus_NEW", "shared")
    calls = len(responses.calls)
    before = _snapshot(billing)
    with pytest.raises(RemapConfirmationRequired) as raised:
        billing.customers.link("acme", customer.id, mode=Mode.TEST, stripe_customer_id="cus_NEW")
    impact = raised.value.impact
    assert (impact["gained"], impact["lost"]) == (("pro",), ("basic",))
    assert impact["from"] == {"mode": "test", "stripe_customer_id": "cus_OLD"}
    assert impact["to"] == {"mode": "test", "stripe_customer_id": "cus_NEW"}
    assert len(responses.calls) == calls
    assert _snapshot(billing) == before


@responses.activate
def test_confirmed_remap_clears_the_old_tag_and_tags_the_new_customer(billing: Billing) -> None:
    """With confirm_remap=True: retrieve the new one, clear metadata on the old, tag the new."""
    customer = billing.customers.create("acme", email="ada@example.com")
    for sid in ("cus_OLD", "cus_NEW"):
        responses.get(f"{API}/v1/customers/{sid}", json=build_customer(id=sid))
        responses.post(f"{API}/v1/customers/{sid}", json=build_customer(id=sid))
    billing.customers.link("acme", customer.id, mode=Mode.TEST, stripe_customer_id="cus_OLD")
    start = len(responses.calls)
    moved = billing.customers.link(
        "acme", customer.id, mode=Mode.TEST, stripe_customer_id="cus_NEW", confirm_remap=True
    )
    assert moved.link is not None and moved.link.stripe_customer_id == "cus_NEW"
    assert moved.sync_state is SyncState.SYNCED
    calls = responses.calls[start:]
    assert [(c.request.method, c.request.url.rsplit("/", 1)[1]) for c in calls] == [
        ("GET", "cus_NEW"),
        ("POST", "cus_OLD"),
        ("POST", "cus_NEW"),
    ]
    for call in calls:
        _check(call, Mode.TEST)
    assert _form(calls[1]) == {
        "metadata[rational_customer_id]": [""],
        "metadata[rational_tenant]": [""],
    }
    assert _form(calls[2])["metadata[rational_customer_id]"] == [customer.id]
    keys = {c.request.headers["Idempotency-Key"] for c in calls[1:]}
    assert len(keys) == 2  # one key per local operation


@responses.activate
def test_remap_to_the_other_mode_is_guarded_too(billing: Billing) -> None:
    """The same Stripe id in the other mode is a remap: it needs confirmation."""
    customer = billing.customers.create("acme", email="ada@example.com")
    responses.get(f"{API}/v1/customers/cus_M", json=build_customer(id="cus_M"))
    responses.post(f"{API}/v1/customers/cus_M", json=build_customer(id="cus_M"))
    billing.customers.link("acme", customer.id, mode=Mode.TEST, stripe_customer_id="cus_M")
    with pytest.raises(RemapConfirmationRequired):
        billing.customers.link("acme", customer.id, mode=Mode.LIVE, stripe_customer_id="cus_M")


@responses.activate
def test_unlink_needs_confirmation_then_clears_the_stripe_metadata(billing: Billing) -> None:
    """unlink raises with the products lost; confirmed, it clears our metadata through the outbox."""
    customer = billing.customers.create("acme", email="ada@example.com")
    responses.get(f"{API}/v1/customers/cus_U", json=build_customer(id="cus_U"))
    responses.post(f"{API}/v1/customers/cus_U", json=build_customer(id="cus_U"))
    billing.customers.link("acme", customer.id, mode=Mode.TEST, stripe_customer_id="cus_U")
    _grant(billing, "cus_U", "pro")
    before = _snapshot(billing)
    calls = len(responses.calls)
    with pytest.raises(RemapConfirmationRequired) as raised:
        billing.customers.unlink("acme", customer.id)
    assert (raised.value.impact["lost"], raised.value.impact["gained"]) == (("pro",), ())
    assert raised.value.impact["to"] is None
    assert _snapshot(billing) == before and len(responses.calls) == calls
    unlinked = billing.customers.unlink("acme", customer.id, confirm_remap=True)
    assert (unlinked.link, unlinked.sync_state) == (None, SyncState.LOCAL)
    (clear,) = responses.calls[calls:]
    _check(clear, Mode.TEST)
    assert _form(clear) == {
        "metadata[rational_customer_id]": [""],
        "metadata[rational_tenant]": [""],
    }
    with pytest.raises(NotLinked):
        billing.customers.unlink("acme", customer.id, confirm_remap=True)


@responses.activate
def test_unlink_while_stripe_is_down_stays_queued(billing: Billing) -> None:
    """The metadata clear fails with a 503: the customer is unlinked, the clear stays pending."""
    customer = billing.customers.create("acme", email="ada@example.com")
    responses.get(f"{API}/v1/customers/cus_D", json=build_customer(id="cus_D"))
    responses.post(f"{API}/v1/customers/cus_D", json=build_customer(id="cus_D"))
    billing.customers.link("acme", customer.id, mode=Mode.TEST, stripe_customer_id="cus_D")
    responses.replace(responses.POST, f"{API}/v1/customers/cus_D", status=503, json={})
    unlinked = billing.customers.unlink("acme", customer.id, confirm_remap=True)
    assert (unlinked.link, unlinked.sync_state) == (None, SyncState.PENDING)


@responses.activate
def test_unlink_then_create_in_stripe_uses_a_new_idempotency_key(billing: Billing) -> None:
    """A new create after an unlink is a new operation: a new key, so Stripe makes a new customer."""
    customer = billing.customers.create("acme", email="ada@example.com")
    responses.post(f"{API}/v1/customers", json=build_customer(id="cus_C1"))
    responses.post(f"{API}/v1/customers/cus_C1", json=build_customer(id="cus_C1"))
    billing.customers.create_in_stripe("acme", customer.id, mode=Mode.TEST)
    billing.customers.unlink("acme", customer.id, confirm_remap=True)
    responses.replace(responses.POST, f"{API}/v1/customers", json=build_customer(id="cus_C2"))
    again = billing.customers.create_in_stripe("acme", customer.id, mode=Mode.TEST)
    assert again.link is not None and again.link.stripe_customer_id == "cus_C2"
    creates = [c for c in responses.calls if c.request.url == f"{API}/v1/customers"]
    assert len({c.request.headers["Idempotency-Key"] for c in creates}) == 2


def test_link_while_create_in_stripe_is_pending_is_refused(billing: Billing) -> None:
    """A customer still being created in Stripe cannot be linked to another one."""
    customer = billing.customers.create("acme", email="ada@example.com")
    with responses.RequestsMock() as mock:
        mock.post(f"{API}/v1/customers", status=503, json={})
        billing.customers.create_in_stripe("acme", customer.id, mode=Mode.TEST)
    before = _snapshot(billing)
    with responses.RequestsMock(), pytest.raises(InvalidArgument, match="pending"):
        billing.customers.link("acme", customer.id, mode=Mode.TEST, stripe_customer_id="cus_X")
    assert _snapshot(billing) == before


BAD_LINKS: list[tuple[str, Callable[[Billing], object], type[Exception]]] = [
    (
        "unknown tenant",
        lambda b: b.customers.link("ghost", "c1", mode=Mode.TEST, stripe_customer_id="cus_A"),
        TenantNotFound,
    ),
    (
        "unknown customer",
        lambda b: b.customers.link("acme", "nobody", mode=Mode.TEST, stripe_customer_id="cus_A"),
        CustomerNotFound,
    ),
    (
        "malformed Stripe id",
        lambda b: b.customers.link("acme", "c1", mode=Mode.TEST, stripe_customer_id="acct_A"),
        InvalidArgument,
    ),
    (
        "Stripe id with a blank",
        lambda b: b.customers.link("acme", "c1", mode=Mode.TEST, stripe_customer_id="cus_A B"),
        InvalidArgument,
    ),
    (
        "malformed customer id",
        lambda b: b.customers.link("acme", "c 1", mode=Mode.TEST, stripe_customer_id="cus_A"),
        InvalidArgument,
    ),
    (
        "malformed tenant id",
        lambda b: b.customers.link("", "c1", mode=Mode.TEST, stripe_customer_id="cus_A"),
        InvalidArgument,
    ),
    (
        "unknown mode",
        lambda b: b.customers.link("acme", "c1", mode="prod", stripe_customer_id="cus_A"),
        InvalidArgument,
    ),
    (
        "unlink unknown customer",
        lambda b: b.customers.unlink("acme", "nobody", confirm_remap=True),
        CustomerNotFound,
    ),
    (
        "unlink malformed id",
        lambda b: b.customers.unlink("acme", "c 1", confirm_remap=True),
        InvalidArgument,
    ),
    (
        "unlink unknown tenant",
        lambda b: b.customers.unlink("ghost", "c1", confirm_remap=True),
        TenantNotFound,
    ),
]


@pytest.mark.parametrize(("case", "call", "error"), BAD_LINKS, ids=[c[0] for c in BAD_LINKS])
def test_bad_link_input_raises_a_specific_error_and_writes_nothing(
    billing: Billing, case: str, call: Callable[[Billing], object], error: type[Exception]
) -> None:
    """Each bad argument raises its own error before any HTTP call, and storage is unchanged."""
    billing.customers.create("acme", email="c1@example.com", customer_id="c1")
    before = _snapshot(billing)
    with responses.RequestsMock(), pytest.raises(error):
        call(billing)
    assert _snapshot(billing) == before


def test_disconnected_tenant_cannot_link_unlink_or_update(billing: Billing) -> None:
    """After disconnect, link, unlink, update and create raise TenantNotConnected; data stays."""
    customer = billing.customers.create("acme", email="c1@example.com", customer_id="c1")
    billing.tenants.disconnect("acme")
    before = _snapshot(billing)
    calls: list[Callable[[], object]] = [
        lambda: billing.customers.link("acme", "c1", mode=Mode.TEST, stripe_customer_id="cus_A"),
        lambda: billing.customers.unlink("acme", "c1", confirm_remap=True),
        lambda: billing.customers.update("acme", "c1", name="x"),
        lambda: billing.customers.create("acme", email="new@example.com"),
    ]
    with responses.RequestsMock():
        for call in calls:
            with pytest.raises(TenantNotConnected):
                call()
    assert _snapshot(billing) == before
    assert billing.customers.get("acme", "c1") == customer


def test_live_link_without_live_keys_is_refused_before_any_call() -> None:
    """With no live keys configured, a live link raises TenantNotConnected naming the keys."""
    billing = _billing(live=False)
    billing.customers.create("acme", email="c1@example.com", customer_id="c1")
    before = _snapshot(billing)
    with responses.RequestsMock(), pytest.raises(TenantNotConnected, match="no keys") as raised:
        billing.customers.link("acme", "c1", mode=Mode.LIVE, stripe_customer_id="cus_A")
    assert raised.value.mode is Mode.LIVE
    assert _snapshot(billing) == before


class _SlowRetrieve:
    """A Stripe port whose customer retrieve waits until every linking thread has fetched."""

    def __init__(self, parties: int) -> None:
        self._barrier = threading.Barrier(parties, timeout=20)

    def request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        """GET returns the customer once all threads are here; POSTs (tags) just succeed."""
        stripe_id = path.rsplit("/", 1)[-1]
        if method == "GET":
            self._barrier.wait()
        return build_customer(id=stripe_id)

    def list_all(self, *args: Any, **kwargs: Any) -> Any:
        """Nothing to list."""
        return iter(())


def test_concurrent_links_to_one_stripe_customer_on_postgres_leave_one_winner(
    pg_storage_url: str,
) -> None:
    """Two customers linking the same Stripe customer at once: one links, the other gets AlreadyLinked."""
    from rational_billing.storage.sql import SQLStorage

    config = BillingConfig(test=ModeKeys(secret_key=KEYS[Mode.TEST], webhook_secrets=("whsec_t",)))
    storage = SQLStorage(pg_storage_url)
    billing = Billing(
        config=config,
        storage=storage,
        mailer=RecordingMailer(),
        clock=lambda: T0,
        stripe=_SlowRetrieve(2),
    )
    try:
        billing.tenants.connect("acme", ACCOUNT, modes=frozenset({Mode.TEST}))
        ids = [billing.customers.create("acme", email=f"{n}@example.com").id for n in "ab"]
        outcomes: dict[str, BaseException | None] = {}

        def link(customer_id: str) -> None:
            try:
                billing.customers.link(
                    "acme", customer_id, mode=Mode.TEST, stripe_customer_id="cus_RACE"
                )
                outcomes[customer_id] = None
            except BaseException as exc:
                outcomes[customer_id] = exc

        threads = [threading.Thread(target=link, args=(cid,)) for cid in ids]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        winners = [cid for cid, exc in outcomes.items() if exc is None]
        losers = [exc for exc in outcomes.values() if exc is not None]
        assert len(winners) == 1
        assert len(losers) == 1
        assert isinstance(losers[0], AlreadyLinked), repr(losers[0])
        linked = [billing.customers.get("acme", cid).link for cid in ids]
        assert linked.count(None) == 1
    finally:
        storage.close()
