"""Access decisions: every denial reason, grants with their grace deadline, and the pure rules.

``has_access`` must answer from indexed local data alone: the tests watch
which storage lookups it makes and block the network while it runs.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rational_billing import AccessPolicy, AccessSummary, Mode
from rational_billing.domain.access import Denial, DenialReason, Grant
from rational_billing.domain.access_rules import (
    SubscriptionFacts,
    best_verdict,
    judge,
    merge_past_due,
)
from rational_billing.domain.models import CustomerLink, Invoice, Subscription
from rational_billing.errors import CustomerNotFound, ProductNotFound, TenantNotFound
from rational_billing.testing import (
    InMemoryStorage,
    build_dispute,
    build_invoice,
    build_refund,
)

from .test_subscriptions import (
    DAY,
    T0,
    TENANT,
    Clock,
    FakeStripe,
    deliver,
    link_customer,
    make_billing,
    map_product,
    subscription,
)

# -- the summary ------------------------------------------------------------------------------


@pytest.fixture
def clock() -> Clock:
    """A clock standing at T0."""
    return Clock()


@pytest.fixture
def billing(clock: Clock) -> Any:
    """A policy with a one-day grace and every revocation switched on; six products."""
    policy = AccessPolicy(
        past_due_grace=DAY,
        revoke_on_lost_dispute=True,
        suspend_on_open_dispute=True,
        revoke_on_full_refund=True,
    )
    b = make_billing(InMemoryStorage(), policy=policy, clock=clock)
    for product in ("active", "grace", "late", "lost", "open", "refunded", "canceled", "none"):
        map_product(b, product, f"prod_{product}")
    map_product(b, "unmapped", None)
    link_customer(b, "ada", "cus_A")
    return b


def _subscribe(
    billing: Any, product: str, status: str = "active", *, invoice: str | None = None
) -> None:
    raw = subscription("cus_A", id=f"sub_{product}", products=(f"prod_{product}",), status=status)
    deliver(billing, "customer.subscription.created", raw, created=T0)
    if invoice is not None:
        paid = build_invoice(
            customer="cus_A",
            id=invoice,
            subscription=f"sub_{product}",
            shape="legacy",
            charge=f"ch_{product}",
        )
        deliver(billing, "invoice.paid", paid, created=T0)


def test_summary_explains_every_product(billing: Any, clock: Clock) -> None:
    """access() grants or denies every product of the tenant, each with its reason."""
    _subscribe(billing, "active")
    _subscribe(billing, "canceled", "canceled")
    for product, invoice_id in (("lost", "in_l"), ("open", "in_o"), ("refunded", "in_r")):
        _subscribe(billing, product, invoice=invoice_id)
    deliver(
        billing,
        "charge.dispute.closed",
        build_dispute(id="dp_l", charge="ch_lost", status="lost"),
        created=T0,
    )
    deliver(
        billing,
        "charge.dispute.created",
        build_dispute(id="dp_o", charge="ch_open", status="under_review"),
        created=T0,
    )
    deliver(billing, "refund.created", build_refund(charge="ch_refunded", id="re_r"), created=T0)
    for product in ("grace", "late"):
        deliver(
            billing,
            "customer.subscription.updated",
            subscription(
                "cus_A", id=f"sub_{product}", products=(f"prod_{product}",), status="past_due"
            ),
            created=T0 if product == "grace" else T0 - 2 * DAY,
            previous={"status": "active"},
        )
    summary = billing.subscriptions.access(TENANT, "ada")
    assert isinstance(summary, AccessSummary)
    assert summary.link == CustomerLink(Mode.TEST, "cus_A")
    assert summary.products == {"active", "grace"}
    assert summary.grants == {
        "active": Grant("sub_active", "active", Mode.TEST, None),
        "grace": Grant("sub_grace", "past_due", Mode.TEST, T0 + DAY),
    }
    reasons = {product: denial.reason for product, denial in summary.denied.items()}
    assert reasons == {
        "late": DenialReason.UNPAID_BEYOND_GRACE,
        "lost": DenialReason.LOST_DISPUTE,
        "open": DenialReason.OPEN_DISPUTE,
        "refunded": DenialReason.FULL_REFUND,
        "canceled": DenialReason.STATUS,
        "none": DenialReason.NO_SUBSCRIPTION,
        "unmapped": DenialReason.UNMAPPED_PRODUCT,
    }
    assert summary.denied["lost"].subscription_id == "sub_lost"
    assert str(summary.denied["lost"]) == "dispute dp_l on a payment of sub_lost was lost"
    clock.now = T0 + DAY
    assert billing.subscriptions.has_access(TENANT, "ada", "grace") is False


def test_unlinked_customer_is_denied_for_no_link(billing: Any) -> None:
    """A customer with no Stripe link is denied every product: no link."""
    link_customer(billing, "bob", None)
    summary = billing.subscriptions.access(TENANT, "bob")
    assert summary.products == frozenset()
    assert {d.reason for d in summary.denied.values()} == {DenialReason.NO_LINK}
    assert billing.subscriptions.has_access(TENANT, "bob", "active") is False


def test_tenant_not_connected_in_the_links_mode(clock: Clock) -> None:
    """A customer linked in a mode its tenant is not connected in is denied: disconnected tenant."""
    b = make_billing(InMemoryStorage(), clock=clock)
    b.tenants.connect("solo", "acct_1Solo", modes=frozenset({Mode.TEST}))
    with b.storage.transaction() as tx:
        tx.put_customer(
            attrs.evolve(link_customer(b, "ada", "cus_A", Mode.LIVE), tenant="solo", id="ada_live")
        )
    map_product(b, "pro", "prod_pro")
    summary = b.subscriptions.access("solo", "ada_live")
    assert summary.denied == {}  # solo has no products; acme's are not its
    with b.storage.transaction() as tx:
        tx.put_product(attrs.evolve(tx.get_product(TENANT, "pro"), tenant="solo"))
    denial = b.subscriptions.access("solo", "ada_live").denied["pro"]
    assert denial == Denial(
        DenialReason.DISCONNECTED_TENANT, "tenant solo is not connected in live mode"
    )


def test_unknown_ids_raise(billing: Any) -> None:
    """Unknown tenant, customer or product ids raise their specific errors."""
    with pytest.raises(TenantNotFound):
        billing.subscriptions.has_access("nobody", "ada", "active")
    with pytest.raises(CustomerNotFound):
        billing.subscriptions.has_access(TENANT, "nobody", "active")
    with pytest.raises(ProductNotFound):
        billing.subscriptions.has_access(TENANT, "ada", "nothing")
    with pytest.raises(CustomerNotFound):
        billing.subscriptions.access(TENANT, "nobody")
    with pytest.raises(ProductNotFound):
        billing.subscriptions.customers_with_access(TENANT, "nothing")


# -- has_access touches indexed local data only --------------------------------------------


class _Spy:
    """Wraps a storage and records the names of the Transaction methods called."""

    def __init__(self, inner: InMemoryStorage) -> None:
        self.inner = inner
        self.called: list[str] = []

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        with self.inner.transaction() as tx:
            yield _SpyTx(tx, self.called)

    def close(self) -> None:
        self.inner.close()


class _SpyTx:
    def __init__(self, tx: Any, called: list[str]) -> None:
        self._tx = tx
        self._called = called

    def __getattr__(self, name: str) -> Any:
        self._called.append(name)
        return getattr(self._tx, name)


def test_has_access_reads_only_indexed_local_data(
    clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """has_access makes point lookups and per-customer lookups only: no Stripe, no network, no scan."""
    spy = _Spy(InMemoryStorage())
    stripe = FakeStripe()
    b = make_billing(spy, clock=clock, stripe=stripe)  # type: ignore[arg-type]
    link_customer(b, "ada", "cus_A")
    map_product(b, "pro", "prod_pro")
    deliver(b, "customer.subscription.created", subscription(), created=T0)
    spy.called.clear()

    def no_network(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("has_access opened a socket")

    monkeypatch.setattr(socket, "socket", no_network)
    assert b.subscriptions.has_access(TENANT, "ada", "pro") is True
    assert set(spy.called) <= {
        "get_tenant",
        "get_customer",
        "get_product",
        "mirrors_for_customer",
        "get_mirror",
    }
    assert stripe.calls == []


# -- the pure rules ----------------------------------------------------------------------------


def _sub(status: str, **extra: Any) -> Subscription:
    return Subscription(TENANT, Mode.TEST, "sub_1", "cus_1", status, marker=T0, **extra)


@given(
    status=st.sampled_from(
        ["active", "trialing", "past_due", "unpaid", "paused", "incomplete", "canceled"]
    ),
    granting=st.sets(st.sampled_from(["active", "trialing", "past_due", "unpaid"]), min_size=1),
)
def test_granting_statuses_decide(status: str, granting: set[str]) -> None:
    """Without marks, exactly the policy's granting statuses grant (past_due without grace)."""
    policy = AccessPolicy(granting_statuses=frozenset(granting))
    verdict = judge(policy, SubscriptionFacts(_sub(status)), T0 + DAY)
    assert verdict.granted is (status in granting)
    if not verdict.granted:
        expected = DenialReason.UNPAID_BEYOND_GRACE if status == "past_due" else DenialReason.STATUS
        assert verdict.reason is expected


@given(hours=st.integers(min_value=0, max_value=100), failed=st.booleans())
def test_grace_deadline(hours: int, failed: bool) -> None:
    """past_due grants until the grace, counted from the first failure (or past_due_since), ends."""
    policy = AccessPolicy(past_due_grace=timedelta(hours=48))
    start = T0 - timedelta(hours=10) if failed else T0
    invoice = Invoice(
        TENANT, Mode.TEST, "in_1", "cus_1", "open", "usd", first_failed_at=start, marker=T0
    )
    facts = SubscriptionFacts(
        _sub("past_due", past_due_since=T0), unpaid_invoice=invoice if failed else None
    )
    now = T0 + timedelta(hours=hours)
    verdict = judge(policy, facts, now)
    assert verdict.granted is (now < start + timedelta(hours=48))
    if verdict.granted:
        assert verdict.grace_until == start + timedelta(hours=48)


def test_revocations_only_touch_granting_subscriptions() -> None:
    """A canceled subscription is denied for its status, even with a lost dispute."""
    facts = SubscriptionFacts(_sub("canceled"), lost_dispute="dp_1", refunded_invoice="in_1")
    verdict = judge(AccessPolicy(revoke_on_full_refund=True), facts, T0)
    assert verdict.reason is DenialReason.STATUS


def test_best_verdict_prefers_grants_then_live_subscriptions() -> None:
    """A grant beats a denial; a live subscription's denial beats an ended one's."""
    policy = AccessPolicy()
    ended = judge(policy, SubscriptionFacts(_sub("canceled")), T0)
    live = judge(policy, SubscriptionFacts(attrs.evolve(_sub("unpaid"), stripe_id="sub_2")), T0)
    granted = judge(policy, SubscriptionFacts(attrs.evolve(_sub("active"), stripe_id="sub_3")), T0)
    assert best_verdict([ended, live]) == live
    assert best_verdict([ended, granted, live]) == granted
    assert best_verdict([]) is None


@st.composite
def status_histories(draw: st.DrawFn) -> list[tuple[str, Any, bool]]:
    """A subscription's statuses at distinct seconds, each change to past_due a transition."""
    history = []
    at = T0
    previous = None
    for _ in range(draw(st.integers(1, 8))):
        at += timedelta(seconds=draw(st.sampled_from([1, 60, 3600])))
        status = draw(st.sampled_from(["active", "past_due", "unpaid"]))
        history.append((status, at, status != previous and status == "past_due"))
        previous = status
    return history


def _fold(history: list[tuple[str, Any, bool]], order: list[int]) -> Any:
    """What the tracker stores after these events, in this order."""
    stored = None
    for i in order:
        status, at, transition = history[i]
        incoming = attrs.evolve(_sub(status), marker=at)
        applied = stored is None or incoming.marker >= stored.marker
        merged = merge_past_due(stored, incoming, transition=transition, applied=applied)
        if merged is not None:
            stored = merged
    return stored


@given(history=status_histories(), data=st.data())
def test_past_due_since_does_not_depend_on_order(
    history: list[tuple[str, Any, bool]], data: st.DataObject
) -> None:
    """Folding status events in any order gives the in-order past_due_since: the latest change."""
    in_order = list(range(len(history)))
    expected = _fold(history, in_order)
    got = _fold(history, data.draw(st.permutations(in_order), label="order"))
    assert (got.status, got.past_due_since) == (expected.status, expected.past_due_since)
    if expected.status == "past_due":
        last_change = max(at for _, at, transition in history if transition)
        assert expected.past_due_since == last_change
    else:
        assert expected.past_due_since is None
