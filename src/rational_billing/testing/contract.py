"""The storage contract kit: one test suite that every `Storage` must pass.

Subclass `StorageContract` in a test module and provide a ``storage`` fixture
that returns a fresh, empty storage. pytest collects the inherited tests::

    import pytest
    from rational_billing.testing.contract import StorageContract


    class TestMyStorage(StorageContract):
        concurrent = True  # its transactions may run in several threads at once

        @pytest.fixture
        def storage(self):
            storage = MyStorage(...)
            yield storage
            storage.close()

The suite covers every `Transaction` method, rollback of every kind of write,
nested transactions, a round trip of every model, ordering properties
(Hypothesis) and, when ``concurrent`` is true, races between threads.

This module imports pytest and hypothesis, so import it from tests only;
nothing else in ``rational_billing`` imports it (DESIGN.md §4a.16).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import pytest
from attrs import evolve as attrs_evolve
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .._config import Mode
from ..domain.models import (
    Customer,
    CustomerLink,
    Dispute,
    EventOutcome,
    Invitation,
    InvitationState,
    Invoice,
    MirrorResult,
    OutboxEntry,
    OutboxState,
    PendingConnection,
    ProcessedEvent,
    Product,
    Refund,
    Relation,
    StripePrice,
    StripeProduct,
    StripeReference,
    Subscription,
    SubscriptionItem,
    SyncState,
    Tenant,
    TenantStatus,
)
from ..errors import InvalidArgument, StorageError
from ..ports import Storage, Transaction

__all__ = ["StorageContract"]

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
TEST, LIVE = Mode.TEST, Mode.LIVE

# The active profile decides how many examples run. Function-scoped fixtures
# are fine because every example works under keys of its own, and one test
# running under several executors is the point of a kit that is subclassed
# once per storage.
_EXAMPLES = settings(
    suppress_health_check=[
        *settings().suppress_health_check,
        HealthCheck.function_scoped_fixture,
        HealthCheck.differing_executors,
        HealthCheck.too_slow,
    ],
    deadline=None,
)

# Ids as hosts write them: mixed case, digits, punctuation and non-ASCII, so
# that a backend sorting by locale rather than by code point is caught.
_ID_ALPHABET = "aAbBzZ09-_.~éÉßΩ€"


def _at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def _unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def _tenant(
    tenant_id: str = "t1", account: str | None = "acct_1", *, direct: bool = False
) -> Tenant:
    return Tenant(
        id=tenant_id,
        stripe_account_id=account,
        modes=frozenset({TEST, LIVE}),
        direct=direct,
        connected_at=T0,
    )


def _customer(
    customer_id: str,
    tenant: str = "t1",
    *,
    link: tuple[Mode, str] | None = None,
    email: str | None = "a@example.com",
) -> Customer:
    return Customer(
        id=customer_id,
        tenant=tenant,
        email=email,
        link=None if link is None else CustomerLink(*link),
        created_at=T0,
    )


def _product(
    product_id: str,
    tenant: str = "t1",
    *,
    test: str | None = None,
    live: str | None = None,
    name: str = "Pro",
) -> Product:
    return Product(
        tenant=tenant,
        id=product_id,
        name=name,
        stripe_test_product_id=test,
        stripe_live_product_id=live,
        created_at=T0,
    )


def _event(
    event_id: str,
    *,
    outcome: EventOutcome = EventOutcome.APPLIED,
    account: str | None = "acct_1",
    received: float = 0,
    next_attempt: float | None = None,
    type: str = "customer.subscription.updated",
    payload: bytes | None = None,
) -> ProcessedEvent:
    return ProcessedEvent(
        event_id=event_id,
        type=type,
        mode=TEST,
        created=T0,
        outcome=outcome,
        tenant="t1",
        account=account,
        received_at=_at(received),
        next_attempt_at=None if next_attempt is None else _at(next_attempt),
        payload=payload,
    )


def _subscription(
    stripe_id: str,
    *,
    customer: str = "cus_A",
    marker: float = 0,
    status: str = "active",
    tenant: str = "t1",
    mode: Mode = TEST,
) -> Subscription:
    return Subscription(
        tenant=tenant,
        mode=mode,
        stripe_id=stripe_id,
        stripe_customer_id=customer,
        status=status,
        marker=_at(marker),
    )


def _outbox(
    entry_id: str,
    *,
    created: float = 0,
    state: OutboxState = OutboxState.PENDING,
    next_attempt: float | None = None,
    customer_id: str = "c1",
    tenant: str = "t1",
) -> OutboxEntry:
    return OutboxEntry(
        id=entry_id,
        tenant=tenant,
        mode=TEST,
        operation="customer.update",
        customer_id=customer_id,
        params={"email": "a@example.com"},
        idempotency_key=f"key-{entry_id}",
        created_at=_at(created),
        state=state,
        next_attempt_at=None if next_attempt is None else _at(next_attempt),
    )


def _ids(items: Sequence[Any]) -> list[str]:
    return [item.id if hasattr(item, "id") else item.stripe_id for item in items]


def _every_model() -> list[Any]:
    """One instance of every stored model, every optional field set."""
    precise = T0 + timedelta(microseconds=123_456)
    return [
        Tenant(
            id="t_rt",
            stripe_account_id="acct_rt",
            modes=frozenset({TEST, LIVE}),
            status=TenantStatus.DISCONNECTED,
            connected_at=precise,
            disconnected_at=precise + timedelta(days=1),
        ),
        Customer(
            id="c_rt",
            tenant="t_rt",
            email="zoë@example.com",
            name="Zoë «Ω» O'Brien",
            metadata={"plan": "gold", "note": 'quote " and \\ and 🙂'},
            link=CustomerLink(LIVE, "cus_rt"),
            sync_state=SyncState.FAILED,
            created_at=precise,
            local_changed_at=precise + timedelta(seconds=1),
            stripe_marker=precise + timedelta(seconds=2),
        ),
        Product(
            tenant="t_rt",
            id="p_rt",
            name="Pro",
            stripe_test_product_id="prod_test",
            stripe_live_product_id="prod_live",
            created_at=precise,
        ),
        ProcessedEvent(
            event_id="evt_rt",
            type="invoice.paid",
            mode=LIVE,
            created=precise,
            outcome=EventOutcome.HELD,
            tenant="t_rt",
            account="acct_rt",
            api_version="2024-06-20",
            reason="account not connected yet",
            payload=b'{"id": "evt_rt"}\x00\xff\n',
            attempts=3,
            received_at=precise + timedelta(seconds=1),
            next_attempt_at=precise + timedelta(minutes=1),
        ),
        Subscription(
            tenant="t_rt",
            mode=LIVE,
            stripe_id="sub_rt",
            stripe_customer_id="cus_rt",
            status="past_due",
            items=(
                SubscriptionItem("si_1", "price_1", "prod_live", 3, precise),
                SubscriptionItem("si_2", None, None),
            ),
            current_period_end=precise + timedelta(days=30),
            cancel_at_period_end=True,
            past_due_since=precise,
            marker=precise,
        ),
        Invoice(
            tenant="t_rt",
            mode=LIVE,
            stripe_id="in_rt",
            stripe_customer_id="cus_rt",
            status="open",
            currency="eur",
            amount_due=1999,
            amount_paid=0,
            subscription_id="sub_rt",
            charge_id="ch_rt",
            attempt_count=2,
            next_payment_attempt=precise + timedelta(days=3),
            first_failed_at=precise,
            marker=precise,
        ),
        Dispute(
            tenant="t_rt",
            mode=LIVE,
            stripe_id="dp_rt",
            charge_id="ch_rt",
            status="needs_response",
            amount=1999,
            currency="eur",
            stripe_customer_id="cus_rt",
            invoice_id="in_rt",
            reason="fraudulent",
            marker=precise,
        ),
        Refund(
            tenant="t_rt",
            mode=LIVE,
            stripe_id="re_rt",
            charge_id="ch_rt",
            amount=500,
            currency="eur",
            status="succeeded",
            stripe_customer_id="cus_rt",
            invoice_id="in_rt",
            marker=precise,
        ),
        OutboxEntry(
            id="ob_rt",
            tenant="t_rt",
            mode=LIVE,
            operation="customer.update",
            customer_id="c_rt",
            params={"email": "zoë@example.com", "metadata": {"rational_customer_id": ""}, "n": 2},
            idempotency_key="key-rt",
            created_at=precise,
            state=OutboxState.FAILED,
            attempts=5,
            next_attempt_at=precise + timedelta(minutes=5),
            last_error="card_declined",
            stripe_id="cus_rt",
        ),
    ]


def _store(tx: Transaction, model: Any) -> None:
    if isinstance(model, Tenant):
        tx.put_tenant(model)
    elif isinstance(model, Customer):
        tx.put_customer(model)
    elif isinstance(model, Product):
        tx.put_product(model)
    elif isinstance(model, ProcessedEvent):
        assert tx.record_event(model)
    elif isinstance(model, OutboxEntry):
        tx.put_outbox(model)
    else:
        assert tx.mirror(model) is MirrorResult.INSERTED


def _load(tx: Transaction, model: Any) -> Any:
    if isinstance(model, Tenant):
        return tx.get_tenant(model.id)
    if isinstance(model, Customer):
        return tx.get_customer(model.tenant, model.id)
    if isinstance(model, Product):
        return tx.get_product(model.tenant, model.id)
    if isinstance(model, ProcessedEvent):
        return tx.get_event(model.event_id)
    if isinstance(model, OutboxEntry):
        return tx.get_outbox(model.id)
    return tx.get_mirror(type(model), model.tenant, model.mode, model.stripe_id)


# -- rollback: a populated storage, one write of every kind, and what it looks like


def _populate(tx: Transaction) -> None:
    tx.put_tenant(_tenant("t1", "acct_1"))
    tx.put_tenant(_tenant("t_direct", None, direct=True))
    tx.put_customer(_customer("c1", link=(TEST, "cus_X")))
    tx.put_customer(_customer("c2"))
    tx.put_product(_product("p1", test="prod_old"))
    tx.record_event(_event("evt_1", outcome=EventOutcome.HELD))
    tx.mirror(_subscription("sub_1", customer="cus_A", marker=10))
    tx.put_outbox(_outbox("ob_1", next_attempt=0))


_WRITES: dict[str, Callable[[Transaction], object]] = {
    "put_tenant_moving_account": lambda tx: tx.put_tenant(_tenant("t1", "acct_2")),
    "put_tenant_new_direct": lambda tx: tx.put_tenant(_tenant("t2", None, direct=True)),
    "insert_customer": lambda tx: tx.insert_customer(_customer("c3", link=(TEST, "cus_Z"))),
    "put_customer_relink": lambda tx: tx.put_customer(_customer("c1", link=(TEST, "cus_Y"))),
    "put_customer_link": lambda tx: tx.put_customer(_customer("c2", link=(LIVE, "cus_L"))),
    "delete_customer": lambda tx: tx.delete_customer("t1", "c1"),
    "put_product_remap": lambda tx: tx.put_product(_product("p1", test="prod_new")),
    "record_event": lambda tx: tx.record_event(_event("evt_2", outcome=EventOutcome.HELD)),
    "update_event": lambda tx: tx.update_event(_event("evt_1", outcome=EventOutcome.APPLIED)),
    "update_events": lambda tx: tx.update_events([_event("evt_1", outcome=EventOutcome.APPLIED)]),
    "mirror_update_moving_customer": lambda tx: tx.mirror(
        _subscription("sub_1", customer="cus_B", marker=20, status="canceled")
    ),
    "mirror_insert": lambda tx: tx.mirror(_subscription("sub_2", customer="cus_A")),
    "insert_mirror": lambda tx: tx.insert_mirror(_subscription("sub_3", customer="cus_A")),
    "put_outbox_replace": lambda tx: tx.put_outbox(_outbox("ob_1", state=OutboxState.DONE)),
    "put_outbox_new": lambda tx: tx.put_outbox(_outbox("ob_2", customer_id="c2")),
}


def _snapshot(storage: Storage) -> dict[str, object]:
    """Everything the writes above could change, as the lookups see it."""
    with storage.transaction() as tx:
        return {
            "tenants": [tx.get_tenant(t) for t in ("t1", "t2", "t_direct")],
            "by_account": [tx.tenant_by_account(a) for a in ("acct_1", "acct_2")],
            "direct": tx.direct_tenant(),
            "customers": list(tx.list_customers("t1", after=None, limit=100)),
            "by_link": [
                tx.customer_by_link("t1", mode, sid)
                for mode, sid in (
                    (TEST, "cus_X"),
                    (TEST, "cus_Y"),
                    (TEST, "cus_Z"),
                    (LIVE, "cus_L"),
                )
            ],
            "product": tx.get_product("t1", "p1"),
            "by_product": [
                list(tx.products_by_stripe_product("t1", TEST, sid))
                for sid in ("prod_old", "prod_new")
            ],
            "events": [tx.get_event(e) for e in ("evt_1", "evt_2")],
            "held": list(tx.events_with_outcome(EventOutcome.HELD)),
            "applied": list(tx.events_with_outcome(EventOutcome.APPLIED)),
            "mirrors": [tx.get_mirror(Subscription, "t1", TEST, s) for s in ("sub_1", "sub_2")],
            "by_customer": [
                list(tx.mirrors_for_customer(Subscription, "t1", TEST, c))
                for c in ("cus_A", "cus_B")
            ],
            "outbox": [tx.get_outbox(o) for o in ("ob_1", "ob_2")],
            "due": list(tx.due_outbox(_at(100), limit=100)),
            "done": list(tx.outbox_with_state(OutboxState.DONE)),
            "for_customer": [list(tx.outbox_for_customer("t1", c)) for c in ("c1", "c2")],
        }


class _Boom(Exception):
    """Raised by a test to make a transaction block fail."""


def _transact(
    storage: Storage, *writes: Callable[[Transaction], object], boom: bool = False
) -> None:
    """Run ``writes`` in one transaction; raise `_Boom` after them when ``boom``."""
    with storage.transaction() as tx:
        for write in writes:
            write(tx)
        if boom:
            raise _Boom


class StorageContract:
    """The contract every `Storage` implementation must pass.

    Subclass it (with a name pytest collects, such as ``TestMyStorage``) and
    override the ``storage`` fixture to return a fresh, empty storage. Set
    ``concurrent = True`` when transactions may run in several threads at once,
    to also run the race tests.
    """

    #: True when the storage may be used from several threads at once.
    concurrent: ClassVar[bool] = False
    #: How many threads the race tests start.
    threads: ClassVar[int] = 8

    @pytest.fixture
    def storage(self) -> Storage:
        """Override this: a fresh, empty storage (yield it, and close it afterwards)."""
        raise NotImplementedError("subclass StorageContract and override the `storage` fixture")

    # -- tenants -------------------------------------------------------------
    def test_tenant_round_trips_by_id(self, storage: Storage) -> None:
        """A stored tenant comes back by id; an unknown id gives None."""
        with storage.transaction() as tx:
            tx.put_tenant(_tenant("t1"))
        with storage.transaction() as tx:
            assert tx.get_tenant("t1") == _tenant("t1")
            assert tx.get_tenant("t_unknown") is None

    def test_tenant_by_account(self, storage: Storage) -> None:
        """A tenant is found by its Stripe account, and only by its own."""
        with storage.transaction() as tx:
            tx.put_tenant(_tenant("t1", "acct_1"))
            tx.put_tenant(_tenant("t2", "acct_2"))
        with storage.transaction() as tx:
            assert tx.tenant_by_account("acct_1") == _tenant("t1", "acct_1")
            assert tx.tenant_by_account("acct_2") == _tenant("t2", "acct_2")
            assert tx.tenant_by_account("acct_unknown") is None

    def test_direct_tenant(self, storage: Storage) -> None:
        """The direct tenant is found by direct_tenant(), and None before there is one."""
        with storage.transaction() as tx:
            assert tx.direct_tenant() is None
            tx.put_tenant(_tenant("t1", "acct_1"))
            assert tx.direct_tenant() is None
            tx.put_tenant(_tenant("t_direct", None, direct=True))
        with storage.transaction() as tx:
            assert tx.direct_tenant() == _tenant("t_direct", None, direct=True)

    def test_reput_tenant_moves_its_account(self, storage: Storage) -> None:
        """Re-putting a tenant with another account frees the old account."""
        with storage.transaction() as tx:
            tx.put_tenant(_tenant("t1", "acct_1"))
        with storage.transaction() as tx:
            tx.put_tenant(_tenant("t1", "acct_2"))
        with storage.transaction() as tx:
            assert tx.tenant_by_account("acct_1") is None
            assert tx.tenant_by_account("acct_2") == _tenant("t1", "acct_2")
            assert tx.get_tenant("t1") == _tenant("t1", "acct_2")

    def test_reput_tenant_as_not_direct(self, storage: Storage) -> None:
        """A direct tenant re-put as connected is no longer the direct tenant."""
        with storage.transaction() as tx:
            tx.put_tenant(_tenant("t1", None, direct=True))
        with storage.transaction() as tx:
            tx.put_tenant(_tenant("t1", "acct_1"))
        with storage.transaction() as tx:
            assert tx.direct_tenant() is None
            assert tx.tenant_by_account("acct_1") == _tenant("t1", "acct_1")

    # -- customers -----------------------------------------------------------
    def test_insert_customer_is_insert_if_absent(self, storage: Storage) -> None:
        """insert_customer inserts once; a second insert returns False and changes nothing."""
        first = _customer("c1", email="first@example.com")
        with storage.transaction() as tx:
            assert tx.insert_customer(first) is True
        with storage.transaction() as tx:
            assert tx.insert_customer(_customer("c1", email="second@example.com")) is False
        with storage.transaction() as tx:
            assert tx.get_customer("t1", "c1") == first

    def test_put_customer_replaces(self, storage: Storage) -> None:
        """put_customer inserts, then replaces the customer with the same (tenant, id)."""
        with storage.transaction() as tx:
            tx.put_customer(_customer("c1", email="old@example.com"))
        with storage.transaction() as tx:
            tx.put_customer(_customer("c1", email="new@example.com"))
        with storage.transaction() as tx:
            assert tx.get_customer("t1", "c1") == _customer("c1", email="new@example.com")
            assert tx.get_customer("t1", "c_unknown") is None

    def test_customer_ids_are_per_tenant(self, storage: Storage) -> None:
        """The same customer id in two tenants names two customers."""
        with storage.transaction() as tx:
            assert tx.insert_customer(_customer("c1", "t1", email="one@example.com"))
            assert tx.insert_customer(_customer("c1", "t2", email="two@example.com"))
        with storage.transaction() as tx:
            assert tx.get_customer("t1", "c1") == _customer("c1", "t1", email="one@example.com")
            assert tx.get_customer("t2", "c1") == _customer("c1", "t2", email="two@example.com")
            assert tx.delete_customer("t2", "c1") is True
            assert tx.get_customer("t1", "c1") is not None

    def test_customer_by_link(self, storage: Storage) -> None:
        """A linked customer is found by (tenant, mode, Stripe customer id) only."""
        linked = _customer("c1", link=(TEST, "cus_X"))
        with storage.transaction() as tx:
            tx.put_customer(linked)
            tx.put_customer(_customer("c2"))
        with storage.transaction() as tx:
            assert tx.customer_by_link("t1", TEST, "cus_X") == linked
            assert tx.customer_by_link("t1", LIVE, "cus_X") is None
            assert tx.customer_by_link("t2", TEST, "cus_X") is None
            assert tx.customer_by_link("t1", TEST, "cus_unknown") is None

    def test_link_held_by_another_customer_is_refused(self, storage: Storage) -> None:
        """Linking a second customer to a held link raises StorageError; the block rolls back."""
        with storage.transaction() as tx:
            tx.put_customer(_customer("c1", link=(TEST, "cus_X")))
            tx.put_customer(_customer("c2", link=(TEST, "cus_Y")))
        with pytest.raises(StorageError):
            _transact(
                storage,
                lambda tx: tx.put_customer(_customer("c3")),
                lambda tx: tx.put_customer(_customer("c2", link=(TEST, "cus_X"))),
            )
        with storage.transaction() as tx:
            assert tx.customer_by_link("t1", TEST, "cus_X") == _customer("c1", link=(TEST, "cus_X"))
            assert tx.customer_by_link("t1", TEST, "cus_Y") == _customer("c2", link=(TEST, "cus_Y"))
            assert tx.get_customer("t1", "c3") is None

    def test_refused_link_leaves_the_transaction_usable(self, storage: Storage) -> None:
        """A refused link changes nothing, so a block that catches the error may commit."""
        with storage.transaction() as tx:
            tx.put_customer(_customer("c1", link=(TEST, "cus_X")))
            tx.put_customer(_customer("c2", link=(TEST, "cus_Y")))
        with storage.transaction() as tx:
            with pytest.raises(StorageError):
                tx.put_customer(_customer("c2", link=(TEST, "cus_X")))
            tx.put_customer(_customer("c3"))
        with storage.transaction() as tx:
            assert tx.customer_by_link("t1", TEST, "cus_X") == _customer("c1", link=(TEST, "cus_X"))
            assert tx.customer_by_link("t1", TEST, "cus_Y") == _customer("c2", link=(TEST, "cus_Y"))
            assert tx.get_customer("t1", "c3") == _customer("c3")

    def test_insert_customer_with_a_held_link_is_refused(self, storage: Storage) -> None:
        """insert_customer of a new customer with a held link raises StorageError."""
        with storage.transaction() as tx:
            tx.put_customer(_customer("c1", link=(TEST, "cus_X")))
        with pytest.raises(StorageError), storage.transaction() as tx:
            tx.insert_customer(_customer("c2", link=(TEST, "cus_X")))
        with storage.transaction() as tx:
            assert tx.get_customer("t1", "c2") is None
            assert tx.customer_by_link("t1", TEST, "cus_X") == _customer("c1", link=(TEST, "cus_X"))

    def test_same_stripe_customer_in_another_mode_or_tenant(self, storage: Storage) -> None:
        """A link is unique per (tenant, mode): other modes and tenants may reuse the id."""
        with storage.transaction() as tx:
            tx.put_customer(_customer("c1", link=(TEST, "cus_X")))
            tx.put_customer(_customer("c2", link=(LIVE, "cus_X")))
            tx.put_customer(_customer("c1", "t2", link=(TEST, "cus_X")))
        with storage.transaction() as tx:
            assert _ids([tx.customer_by_link("t1", TEST, "cus_X")]) == ["c1"]
            assert _ids([tx.customer_by_link("t1", LIVE, "cus_X")]) == ["c2"]
            assert tx.customer_by_link("t2", TEST, "cus_X") == _customer(
                "c1", "t2", link=(TEST, "cus_X")
            )

    def test_relink_frees_the_old_link(self, storage: Storage) -> None:
        """Relinking a customer frees its old link for another customer."""
        with storage.transaction() as tx:
            tx.put_customer(_customer("c1", link=(TEST, "cus_X")))
        with storage.transaction() as tx:
            tx.put_customer(_customer("c1", link=(TEST, "cus_Y")))
        with storage.transaction() as tx:
            assert tx.customer_by_link("t1", TEST, "cus_X") is None
            assert _ids([tx.customer_by_link("t1", TEST, "cus_Y")]) == ["c1"]
            tx.put_customer(_customer("c2", link=(TEST, "cus_X")))
        with storage.transaction() as tx:
            assert _ids([tx.customer_by_link("t1", TEST, "cus_X")]) == ["c2"]

    def test_relink_twice_in_one_transaction(self, storage: Storage) -> None:
        """Links moved back and forth within one transaction end where they were put last."""
        with storage.transaction() as tx:
            tx.put_customer(_customer("c1", link=(TEST, "cus_X")))
            tx.put_customer(_customer("c1", link=(TEST, "cus_Y")))
            tx.put_customer(_customer("c2", link=(TEST, "cus_X")))
            tx.put_customer(_customer("c1"))
            tx.put_customer(_customer("c2", link=(TEST, "cus_Y")))
        with storage.transaction() as tx:
            assert tx.customer_by_link("t1", TEST, "cus_X") is None
            assert _ids([tx.customer_by_link("t1", TEST, "cus_Y")]) == ["c2"]
            assert tx.get_customer("t1", "c1") == _customer("c1")

    def test_customer_reads_follow_the_transactions_own_writes(self, storage: Storage) -> None:
        """Within one transaction, every read of a customer sees its latest write there."""
        with storage.transaction() as tx:
            tx.put_customer(_customer("c1", link=(TEST, "cus_X"), email="old@example.com"))
        moved = _customer("c1", link=(TEST, "cus_Y"), email="new@example.com")
        with storage.transaction() as tx:
            assert tx.customer_by_link("t1", TEST, "cus_X") is not None
            assert tx.lock_customer("t1", "c1") is not None
            assert tx.get_customer("t1", "c1") is not None
            tx.put_customer(moved)
            assert tx.lock_customer("t1", "c1") == moved
            assert tx.get_customer("t1", "c1") == moved
            assert tx.customer_by_link("t1", TEST, "cus_X") is None
            assert tx.customer_by_link("t1", TEST, "cus_Y") == moved
            assert tx.delete_customer("t1", "c1") is True
            assert tx.lock_customer("t1", "c1") is None
            assert tx.get_customer("t1", "c1") is None
            assert tx.insert_customer(_customer("c1")) is True
            assert tx.get_customer("t1", "c1") == _customer("c1")

    def test_links_are_checked_against_customers_read_earlier(self, storage: Storage) -> None:
        """A link held by a customer read earlier in the transaction is still refused to another.

        And a customer read earlier keeps its own link when put again, or
        frees it for another customer when it is put without it.
        """
        one = _customer("c1", link=(TEST, "cus_X"))
        two = _customer("c2", link=(TEST, "cus_Y"))
        with storage.transaction() as tx:
            tx.put_customer(one)
            tx.put_customer(two)
        with storage.transaction() as tx:
            assert tx.lock_customer("t1", "c1") == one
            assert tx.lock_customer("t1", "c2") == two
            with pytest.raises(StorageError):
                tx.put_customer(_customer("c2", link=(TEST, "cus_X"), email="b@example.com"))
            tx.put_customer(_customer("c2", link=(TEST, "cus_Y"), email="b@example.com"))
            tx.put_customer(_customer("c1", link=(TEST, "cus_X"), email="b@example.com"))
        with storage.transaction() as tx:
            assert tx.customer_by_link("t1", TEST, "cus_X") == _customer(
                "c1", link=(TEST, "cus_X"), email="b@example.com"
            )
            assert tx.get_customer("t1", "c1") is not None
            tx.put_customer(_customer("c1", link=(TEST, "cus_Z")))
            tx.put_customer(_customer("c2", link=(TEST, "cus_X")))
        with storage.transaction() as tx:
            assert _ids([tx.customer_by_link("t1", TEST, "cus_X")]) == ["c2"]
            assert _ids([tx.customer_by_link("t1", TEST, "cus_Z")]) == ["c1"]

    def test_nested_block_that_raises_undoes_a_customer_read_back_inside_it(
        self, storage: Storage
    ) -> None:
        """After an inner block that changed a customer raises, reads see the customer as before."""
        before = _customer("c1", link=(TEST, "cus_X"))
        with storage.transaction() as tx:
            tx.put_customer(before)
        changed = _customer("c1", link=(TEST, "cus_Y"), email="inner@example.com")

        def change(inner: Transaction) -> None:
            inner.put_customer(changed)
            assert inner.lock_customer("t1", "c1") == changed

        with storage.transaction() as outer:
            assert outer.lock_customer("t1", "c1") == before
            with pytest.raises(_Boom):
                _transact(storage, change, boom=True)
            assert outer.lock_customer("t1", "c1") == before
            assert outer.get_customer("t1", "c1") == before
            assert outer.customer_by_link("t1", TEST, "cus_X") == before
            assert outer.customer_by_link("t1", TEST, "cus_Y") is None
            with pytest.raises(StorageError):
                outer.put_customer(_customer("c2", link=(TEST, "cus_X")))

    def test_unlink_frees_the_link(self, storage: Storage) -> None:
        """Putting a customer without a link removes it from the link lookup."""
        with storage.transaction() as tx:
            tx.put_customer(_customer("c1", link=(TEST, "cus_X")))
        with storage.transaction() as tx:
            tx.put_customer(_customer("c1"))
        with storage.transaction() as tx:
            assert tx.customer_by_link("t1", TEST, "cus_X") is None
            assert tx.get_customer("t1", "c1") == _customer("c1")

    def test_delete_customer(self, storage: Storage) -> None:
        """delete_customer removes the customer and frees its link; True only when it existed."""
        with storage.transaction() as tx:
            tx.put_customer(_customer("c1", link=(TEST, "cus_X")))
        with storage.transaction() as tx:
            assert tx.delete_customer("t1", "c1") is True
        with storage.transaction() as tx:
            assert tx.delete_customer("t1", "c1") is False
            assert tx.get_customer("t1", "c1") is None
            assert tx.customer_by_link("t1", TEST, "cus_X") is None
            assert tx.list_customers("t1", after=None, limit=10) == []
            tx.put_customer(_customer("c2", link=(TEST, "cus_X")))

    def test_list_customers_pages_in_id_order(self, storage: Storage) -> None:
        """list_customers pages through one tenant's customers by id, after an id."""
        ids = ["c05", "c01", "c10", "c03", "c02"]
        with storage.transaction() as tx:
            for cid in ids:
                tx.insert_customer(_customer(cid))
            tx.insert_customer(_customer("c04", "t2"))
        with storage.transaction() as tx:
            assert _ids(tx.list_customers("t1", after=None, limit=2)) == ["c01", "c02"]
            assert _ids(tx.list_customers("t1", after="c02", limit=2)) == ["c03", "c05"]
            assert _ids(tx.list_customers("t1", after="c04", limit=10)) == ["c05", "c10"]
            assert _ids(tx.list_customers("t1", after="c10", limit=2)) == []
            assert _ids(tx.list_customers("t2", after=None, limit=10)) == ["c04"]
            assert _ids(tx.list_customers("t_none", after=None, limit=10)) == []

    def test_text_json_cannot_spell_as_utf8_round_trips(self, storage: Storage) -> None:
        """A lone surrogate (which JSON parsed by Python can carry) is stored and read back."""
        customer = attrs_evolve(_customer("c1"), name="caf\udce9 \u00e9\U0001f600")
        with storage.transaction() as tx:
            tx.put_customer(customer)
        with storage.transaction() as tx:
            assert tx.get_customer("t1", "c1") == customer

    @_EXAMPLES
    @given(
        ids=st.sets(st.text(_ID_ALPHABET, min_size=1, max_size=6), min_size=1, max_size=12),
        limit=st.integers(1, 5),
    )
    def test_list_customers_orders_like_python(
        self, storage: Storage, ids: set[str], limit: int
    ) -> None:
        """Paging through any set of ids yields them in Python's code-point order."""
        tenant = _unique("t")
        with storage.transaction() as tx:
            for cid in ids:
                assert tx.insert_customer(_customer(cid, tenant))
        seen: list[str] = []
        after: str | None = None
        with storage.transaction() as tx:
            while True:
                page = _ids(tx.list_customers(tenant, after=after, limit=limit))
                assert len(page) <= limit
                if not page:
                    break
                seen += page
                after = page[-1]
        assert seen == sorted(ids)

    # -- products ------------------------------------------------------------
    def test_product_round_trips_and_is_replaced(self, storage: Storage) -> None:
        """put_product inserts, then replaces the product with the same (tenant, id)."""
        with storage.transaction() as tx:
            tx.put_product(_product("p1", name="Pro"))
            assert tx.get_product("t1", "p1") == _product("p1", name="Pro")
        with storage.transaction() as tx:
            tx.put_product(_product("p1", name="Pro 2"))
        with storage.transaction() as tx:
            assert tx.get_product("t1", "p1") == _product("p1", name="Pro 2")
            assert tx.get_product("t2", "p1") is None

    def test_products_by_stripe_product(self, storage: Storage) -> None:
        """Products are found by the Stripe product they map to, per tenant and mode."""
        with storage.transaction() as tx:
            tx.put_product(_product("p1", test="prod_T", live="prod_L"))
            tx.put_product(_product("p2", test="prod_T"))
            tx.put_product(_product("p3", live="prod_T"))
            tx.put_product(_product("p1", "t2", test="prod_T"))
        with storage.transaction() as tx:
            assert sorted(_ids(tx.products_by_stripe_product("t1", TEST, "prod_T"))) == [
                "p1",
                "p2",
            ]
            assert _ids(tx.products_by_stripe_product("t1", LIVE, "prod_L")) == ["p1"]
            assert _ids(tx.products_by_stripe_product("t1", LIVE, "prod_T")) == ["p3"]
            assert _ids(tx.products_by_stripe_product("t2", TEST, "prod_T")) == ["p1"]
            assert list(tx.products_by_stripe_product("t1", TEST, "prod_L")) == []

    def test_remapped_product_moves_in_the_lookup(self, storage: Storage) -> None:
        """After a remap, the product is found by its new Stripe product only."""
        with storage.transaction() as tx:
            tx.put_product(_product("p1", test="prod_old", live="prod_live"))
        with storage.transaction() as tx:
            tx.put_product(_product("p1", test="prod_new", live="prod_live"))
        with storage.transaction() as tx:
            assert list(tx.products_by_stripe_product("t1", TEST, "prod_old")) == []
            assert tx.products_by_stripe_product("t1", TEST, "prod_new") == [
                _product("p1", test="prod_new", live="prod_live")
            ]
            assert _ids(tx.products_by_stripe_product("t1", LIVE, "prod_live")) == ["p1"]
            tx.put_product(_product("p1"))
        with storage.transaction() as tx:
            assert list(tx.products_by_stripe_product("t1", TEST, "prod_new")) == []
            assert list(tx.products_by_stripe_product("t1", LIVE, "prod_live")) == []

    # -- events --------------------------------------------------------------
    def test_record_event_is_insert_if_absent(self, storage: Storage) -> None:
        """record_event returns True once per id, then False, keeping the first record."""
        first = _event("evt_1", outcome=EventOutcome.APPLIED)
        with storage.transaction() as tx:
            assert tx.record_event(first) is True
            assert tx.record_event(first) is False
        with storage.transaction() as tx:
            assert tx.record_event(_event("evt_1", outcome=EventOutcome.FAILED)) is False
        with storage.transaction() as tx:
            assert tx.get_event("evt_1") == first
            assert tx.get_event("evt_unknown") is None

    def test_update_event(self, storage: Storage) -> None:
        """update_event replaces the stored event, and its outcome lookups follow."""
        with storage.transaction() as tx:
            tx.record_event(_event("evt_1", outcome=EventOutcome.HELD))
        updated = _event("evt_1", outcome=EventOutcome.APPLIED, account="acct_2")
        with storage.transaction() as tx:
            tx.update_event(updated)
        with storage.transaction() as tx:
            assert tx.get_event("evt_1") == updated
            assert list(tx.events_with_outcome(EventOutcome.HELD)) == []
            assert tx.events_with_outcome(EventOutcome.APPLIED, account="acct_2") == [updated]

    def test_update_of_an_unknown_event_raises(self, storage: Storage) -> None:
        """update_event of an id never recorded raises StorageError."""
        with pytest.raises(StorageError), storage.transaction() as tx:
            tx.update_event(_event("evt_unknown"))

    def test_update_events_updates_each(self, storage: Storage) -> None:
        """update_events writes every event as update_event would; an unknown id raises."""
        body = b'{"id": "evt_1"}'
        with storage.transaction() as tx:
            tx.record_event(_event("evt_1", outcome=EventOutcome.PENDING, payload=body))
            tx.record_event(_event("evt_2", outcome=EventOutcome.PENDING, received=5))
        updated = [
            _event("evt_1", outcome=EventOutcome.APPLIED, payload=None),
            _event("evt_2", outcome=EventOutcome.FAILED, received=5, next_attempt=9),
        ]
        with storage.transaction() as tx:
            tx.update_events(updated)
            tx.update_events([])
        with storage.transaction() as tx:
            assert tx.get_event("evt_1") == _event("evt_1", payload=body)
            assert tx.get_event("evt_2") == updated[1]
            assert [e.event_id for e in tx.events_with_outcome(EventOutcome.PENDING)] == []
        with pytest.raises(StorageError), storage.transaction() as tx:
            tx.update_events([_event("evt_1", outcome=EventOutcome.IGNORED), _event("evt_x")])
        with storage.transaction() as tx:
            assert tx.get_event("evt_1") == _event("evt_1", payload=body)

    def test_events_with_outcome(self, storage: Storage) -> None:
        """events_with_outcome filters by outcome and account, oldest first, up to limit."""
        held = EventOutcome.HELD
        with storage.transaction() as tx:
            tx.record_event(_event("evt_c", outcome=held, account="acct_1", received=30))
            tx.record_event(_event("evt_a", outcome=held, account="acct_2", received=10))
            tx.record_event(_event("evt_b", outcome=held, account="acct_1", received=20))
            tx.record_event(_event("evt_d", outcome=EventOutcome.APPLIED, received=0))
            tx.record_event(_event("evt_e", outcome=held, account=None, received=40))
        with storage.transaction() as tx:
            found = tx.events_with_outcome(held)
            assert [e.event_id for e in found] == ["evt_a", "evt_b", "evt_c", "evt_e"]
            mine = tx.events_with_outcome(held, account="acct_1")
            assert [e.event_id for e in mine] == ["evt_b", "evt_c"]
            first = tx.events_with_outcome(held, limit=2)
            assert [e.event_id for e in first] == ["evt_a", "evt_b"]
            assert list(tx.events_with_outcome(EventOutcome.FAILED)) == []
            assert list(tx.events_with_outcome(held, account="acct_unknown")) == []

    # -- webhook inbox: locks, claims, replay listing ---------------------------
    def test_lock_event_returns_the_stored_event(self, storage: Storage) -> None:
        """lock_event returns the stored event with its body, or None for an unknown id."""
        event = _event("evt_1", outcome=EventOutcome.PENDING, payload=b'{"id": "evt_1"}\n')
        with storage.transaction() as tx:
            tx.record_event(event)
        with storage.transaction() as tx:
            assert tx.lock_event("evt_1") == event
            assert tx.lock_event("evt_unknown") is None

    def test_lock_events_returns_the_stored_ones_in_id_order(self, storage: Storage) -> None:
        """lock_events returns the stored events among the ids, in id order, each once."""
        with storage.transaction() as tx:
            for event_id in ("evt_b", "evt_a", "evt_c"):
                tx.record_event(_event(event_id, outcome=EventOutcome.PENDING, payload=b"{}"))
        with storage.transaction() as tx:
            found = tx.lock_events(["evt_c", "evt_x", "evt_a", "evt_c"])
            assert [e.event_id for e in found] == ["evt_a", "evt_c"]
            assert found[0] == _event("evt_a", outcome=EventOutcome.PENDING, payload=b"{}")
            assert list(tx.lock_events([])) == []

    def test_update_event_keeps_the_body(self, storage: Storage) -> None:
        """An update keeps the stored body byte for byte, or fills it in when none was stored."""
        body = '{"id": "evt_1", "x": "é"}'.encode() + b"\x00\xff\n"
        pending = _event("evt_1", outcome=EventOutcome.PENDING, payload=body)
        with storage.transaction() as tx:
            tx.record_event(pending)
            tx.record_event(_event("evt_2", outcome=EventOutcome.PENDING))
        failed = _event("evt_1", outcome=EventOutcome.FAILED, payload=body, next_attempt=9)
        with storage.transaction() as tx:
            tx.update_event(failed)
        with storage.transaction() as tx:
            assert tx.get_event("evt_1") == failed
            tx.update_event(_event("evt_1", outcome=EventOutcome.APPLIED, payload=None))
            tx.update_event(_event("evt_2", outcome=EventOutcome.APPLIED, payload=b"{}"))
        with storage.transaction() as tx:
            assert tx.get_event("evt_1") == _event("evt_1", payload=body)
            assert tx.get_event("evt_2") == _event("evt_2", payload=b"{}")

    def _inbox(self, storage: Storage) -> None:
        pending, failed = EventOutcome.PENDING, EventOutcome.FAILED
        with storage.transaction() as tx:
            tx.record_event(_event("evt_p1", outcome=pending, received=10))
            tx.record_event(_event("evt_p2", outcome=pending, received=5, next_attempt=20))
            tx.record_event(_event("evt_f1", outcome=failed, next_attempt=15))
            tx.record_event(_event("evt_f2", outcome=failed))  # retries exhausted
            tx.record_event(_event("evt_a1", outcome=EventOutcome.APPLIED))
            tx.record_event(_event("evt_h1", outcome=EventOutcome.HELD, next_attempt=0))

    def _claim(self, storage: Storage, at: float, limit: int = 10) -> list[str]:
        with storage.transaction() as tx:
            claimed = tx.claim_events(_at(at), limit=limit, lease=timedelta(seconds=60))
        return [e.event_id for e in claimed]

    def test_claim_events_leases_due_events_in_due_order(self, storage: Storage) -> None:
        """Pending and due failed events are claimed once per lease, in the order they fell due."""
        self._inbox(storage)
        assert self._claim(storage, 16) == ["evt_p1", "evt_f1"]
        assert self._claim(storage, 16) == []
        assert self._claim(storage, 21) == ["evt_p2"]
        # The first lease ran out for both at once: ties go by id.
        assert self._claim(storage, 76) == ["evt_f1", "evt_p1"]
        assert self._claim(storage, 80) == []
        assert self._claim(storage, 81) == ["evt_p2"]

    def test_claim_events_respects_the_limit(self, storage: Storage) -> None:
        """claim_events returns at most ``limit`` events, the earliest due first."""
        self._inbox(storage)
        assert self._claim(storage, 30, limit=2) == ["evt_p1", "evt_f1"]
        assert self._claim(storage, 30, limit=2) == ["evt_p2"]

    def test_claimed_events_come_back_whole(self, storage: Storage) -> None:
        """A claimed event is the stored event, body included, with its claims counted."""
        event = _event("evt_1", outcome=EventOutcome.PENDING, payload=b"{}")
        with storage.transaction() as tx:
            tx.record_event(event)
        counted = attrs_evolve(event, claims=1)
        with storage.transaction() as tx:
            assert list(tx.claim_events(_at(0), limit=5, lease=timedelta(seconds=1))) == [counted]
        with storage.transaction() as tx:
            assert tx.get_event("evt_1") == counted
        with storage.transaction() as tx:  # a second claim, once the lease ran out
            again = tx.claim_events(_at(2), limit=5, lease=timedelta(seconds=1))
            assert [(e.claims, e.attempts) for e in again] == [(2, 0)]

    def test_update_event_ends_the_lease(self, storage: Storage) -> None:
        """A claimed event written again is due by its new state, not by the lease."""
        self._inbox(storage)
        assert self._claim(storage, 16) == ["evt_p1", "evt_f1"]
        with storage.transaction() as tx:
            tx.update_event(_event("evt_p1", outcome=EventOutcome.APPLIED, received=10))
            tx.update_event(_event("evt_f1", outcome=EventOutcome.FAILED, next_attempt=30))
        assert self._claim(storage, 29) == ["evt_p2"]
        assert self._claim(storage, 30) == ["evt_f1"]
        assert self._claim(storage, 1000) == ["evt_p2", "evt_f1"]

    def test_rolled_back_claim_leases_nothing(self, storage: Storage) -> None:
        """A claim in a transaction that rolls back leaves the events claimable, and uncounted."""
        self._inbox(storage)
        claimed: list[int] = []

        def claim(tx: Transaction) -> None:
            claimed.append(len(tx.claim_events(_at(16), limit=10, lease=timedelta(hours=1))))

        with pytest.raises(_Boom):
            _transact(storage, claim, boom=True)
        assert claimed == [2]
        with storage.transaction() as tx:
            assert [tx.get_event(i).claims for i in ("evt_p1", "evt_f1")] == [0, 0]  # type: ignore[union-attr]
        assert self._claim(storage, 16) == ["evt_p1", "evt_f1"]

    def test_list_events_filters_and_pages(self, storage: Storage) -> None:
        """list_events pages by the last id, in received order when stored in it, and filters."""
        with storage.transaction() as tx:
            tx.record_event(_event("evt_c", received=5, type="invoice.paid"))
            tx.record_event(_event("evt_b", received=10, type="invoice.paid"))
            tx.record_event(_event("evt_a", received=11))
            tx.record_event(_event("evt_d", received=20, outcome=EventOutcome.FAILED))
        with storage.transaction() as tx:
            every = [e.event_id for e in tx.list_events()]
            assert every == ["evt_c", "evt_b", "evt_a", "evt_d"]
            since = tx.list_events(since=_at(10))
            assert [e.event_id for e in since] == ["evt_b", "evt_a", "evt_d"]
            assert list(tx.list_events(since=_at(21))) == []
            paid = tx.list_events(types={"invoice.paid"})
            assert [e.event_id for e in paid] == ["evt_c", "evt_b"]
            assert list(tx.list_events(types=set())) == []
            first = tx.list_events(limit=2)
            assert [e.event_id for e in first] == ["evt_c", "evt_b"]
            rest = tx.list_events(after=first[-1].event_id, limit=2)
            assert [e.event_id for e in rest] == ["evt_a", "evt_d"]
            both = tx.list_events(since=_at(6), types={"invoice.paid"}, after="evt_c")
            assert [e.event_id for e in both] == ["evt_b"]
            with pytest.raises(InvalidArgument, match="evt_nowhere"):
                tx.list_events(after="evt_nowhere")
            with pytest.raises(InvalidArgument, match="evt_nowhere"):
                tx.list_events(types=set(), after="evt_nowhere")
            assert len(tx.list_events()) == 4  # the transaction goes on

    def test_list_events_since_follows_an_updated_time(self, storage: Storage) -> None:
        """An event updated to a later received time is listed from that time."""
        with storage.transaction() as tx:
            tx.record_event(_event("evt_a", received=0))
            tx.record_event(_event("evt_b", received=600))
        with storage.transaction() as tx:
            tx.update_event(_event("evt_a", received=7200, outcome=EventOutcome.FAILED))
        with storage.transaction() as tx:
            assert [e.event_id for e in tx.list_events(since=_at(3600))] == ["evt_a"]
            assert {e.event_id for e in tx.list_events(since=_at(300))} == {"evt_a", "evt_b"}

    @_EXAMPLES
    @given(
        received=st.lists(st.integers(0, 3 * 3600), min_size=1, max_size=12),
        since=st.none() | st.integers(0, 3 * 3600),
        limit=st.integers(1, 5),
        changed=st.sampled_from([None, 0, -1]),
        moved=st.none() | st.integers(0, 3 * 3600),
    )
    def test_list_events_pages_visit_each_event_once(
        self,
        storage: Storage,
        received: list[int],
        since: int | None,
        limit: int,
        changed: int | None,
        moved: int | None,
    ) -> None:
        """In whatever order events were stored, paging visits each match once, in one order."""
        kind = _unique("test.event")  # this example's own type: earlier examples' events stay out
        ids = [f"evt_{kind[-12:]}_{i}" for i in range(len(received))]
        with storage.transaction() as tx:
            for event_id, seconds in zip(ids, received, strict=True):
                assert tx.record_event(_event(event_id, received=seconds, type=kind))
        if changed is not None:  # a changed outcome keeps the event's place
            if moved is not None:  # and a changed time is what since goes by
                received[changed] = moved
            with storage.transaction() as tx:
                event = _event(ids[changed], received=received[changed], type=kind)
                tx.update_event(attrs_evolve(event, outcome=EventOutcome.FAILED, attempts=1))
        start = None if since is None else _at(since)
        seen: list[str] = []
        after: str | None = None
        with storage.transaction() as tx:
            while page := tx.list_events(since=start, types={kind}, after=after, limit=limit):
                assert len(page) <= limit
                seen += [e.event_id for e in page]
                after = page[-1].event_id
            at_once = [e.event_id for e in tx.list_events(since=start, types={kind}, limit=100)]
        wanted = {i for i, s in zip(ids, received, strict=True) if since is None or s >= since}
        assert sorted(seen) == sorted(wanted)
        assert seen == at_once

    # -- mirrors -------------------------------------------------------------
    def test_mirror_orders_writes_by_marker(self, storage: Storage) -> None:
        """mirror reports INSERTED, APPLIED, TIE and STALE, and a stale write changes nothing."""
        with storage.transaction() as tx:
            assert tx.mirror(_subscription("sub_1", marker=10)) is MirrorResult.INSERTED
        with storage.transaction() as tx:
            newer = _subscription("sub_1", marker=20, status="past_due")
            assert tx.mirror(newer) is MirrorResult.APPLIED
        with storage.transaction() as tx:
            tie = _subscription("sub_1", marker=20, status="canceled")
            assert tx.mirror(tie) is MirrorResult.TIE
        with storage.transaction() as tx:
            stale = _subscription("sub_1", customer="cus_B", marker=19, status="active")
            assert tx.mirror(stale) is MirrorResult.STALE
        with storage.transaction() as tx:
            assert tx.get_mirror(Subscription, "t1", TEST, "sub_1") == tie
            assert tx.mirrors_for_customer(Subscription, "t1", TEST, "cus_A") == [tie]
            assert list(tx.mirrors_for_customer(Subscription, "t1", TEST, "cus_B")) == []

    def test_insert_mirror_inserts_only_when_absent(self, storage: Storage) -> None:
        """insert_mirror stores a new record and indexes it; a stored one stays, even if older."""
        first = _subscription("sub_1", customer="cus_A", marker=10)
        with storage.transaction() as tx:
            assert tx.insert_mirror(first) is True
            assert tx.insert_mirror(_subscription("sub_1", customer="cus_B", marker=20)) is False
        with storage.transaction() as tx:
            assert tx.get_mirror(Subscription, "t1", TEST, "sub_1") == first
            assert tx.mirrors_for_customer(Subscription, "t1", TEST, "cus_A") == [first]
            assert tx.mirrors_for_customer(Subscription, "t1", TEST, "cus_B") == []
            assert tx.mirror(_subscription("sub_1", customer="cus_A", marker=5)) is (
                MirrorResult.STALE
            )

    def test_mirror_key_is_kind_tenant_mode_and_id(self, storage: Storage) -> None:
        """Records that differ in kind, tenant or mode never overwrite each other."""
        sub = _subscription("x_1", marker=10)
        other_tenant = _subscription("x_1", marker=5, tenant="t2")
        other_mode = _subscription("x_1", marker=5, mode=LIVE)
        invoice = Invoice(
            tenant="t1",
            mode=TEST,
            stripe_id="x_1",
            stripe_customer_id="cus_A",
            status="paid",
            currency="usd",
            marker=_at(5),
        )
        with storage.transaction() as tx:
            for record in (sub, other_tenant, other_mode, invoice):
                assert tx.mirror(record) is MirrorResult.INSERTED
        with storage.transaction() as tx:
            assert tx.get_mirror(Subscription, "t1", TEST, "x_1") == sub
            assert tx.get_mirror(Subscription, "t2", TEST, "x_1") == other_tenant
            assert tx.get_mirror(Subscription, "t1", LIVE, "x_1") == other_mode
            assert tx.get_mirror(Invoice, "t1", TEST, "x_1") == invoice
            assert tx.get_mirror(Dispute, "t1", TEST, "x_1") is None
            assert tx.get_mirror(Subscription, "t1", TEST, "x_unknown") is None
            assert tx.mirrors_for_customer(Invoice, "t1", TEST, "cus_A") == [invoice]
            assert tx.mirrors_for_customer(Subscription, "t1", LIVE, "cus_A") == [other_mode]

    def test_mirrors_for_customer(self, storage: Storage) -> None:
        """mirrors_for_customer lists every record of one kind under one Stripe customer."""
        refund = Refund(
            tenant="t1",
            mode=TEST,
            stripe_id="re_1",
            charge_id="ch_1",
            amount=100,
            currency="usd",
            status="succeeded",
            stripe_customer_id="cus_A",
        )
        orphan = Dispute(
            tenant="t1",
            mode=TEST,
            stripe_id="dp_1",
            charge_id="ch_1",
            status="needs_response",
            amount=100,
            currency="usd",
        )
        with storage.transaction() as tx:
            tx.mirror(_subscription("sub_2"))
            tx.mirror(_subscription("sub_1"))
            tx.mirror(_subscription("sub_3", customer="cus_B"))
            tx.mirror(refund)
            tx.mirror(orphan)
        with storage.transaction() as tx:
            found = tx.mirrors_for_customer(Subscription, "t1", TEST, "cus_A")
            assert sorted(_ids(found)) == ["sub_1", "sub_2"]
            assert tx.mirrors_for_customer(Refund, "t1", TEST, "cus_A") == [refund]
            assert list(tx.mirrors_for_customer(Dispute, "t1", TEST, "cus_A")) == []
            assert tx.get_mirror(Dispute, "t1", TEST, "dp_1") == orphan
            assert list(tx.mirrors_for_customer(Subscription, "t1", TEST, "cus_none")) == []

    def test_mirror_moving_customer_leaves_the_old_index(self, storage: Storage) -> None:
        """A record that moves to another Stripe customer is listed under the new one only."""
        with storage.transaction() as tx:
            tx.mirror(_subscription("sub_1", customer="cus_A", marker=10))
        moved = _subscription("sub_1", customer="cus_B", marker=11)
        with storage.transaction() as tx:
            assert tx.mirror(moved) is MirrorResult.APPLIED
        with storage.transaction() as tx:
            assert list(tx.mirrors_for_customer(Subscription, "t1", TEST, "cus_A")) == []
            assert tx.mirrors_for_customer(Subscription, "t1", TEST, "cus_B") == [moved]

    @_EXAMPLES
    @given(
        writes=st.lists(
            st.tuples(st.integers(0, 4), st.sampled_from(["cus_A", "cus_B", "cus_C"])),
            min_size=1,
            max_size=10,
        ),
        per_transaction=st.booleans(),
    )
    def test_mirror_sequence_ends_with_the_max_marker(
        self, storage: Storage, writes: list[tuple[int, str]], per_transaction: bool
    ) -> None:
        """Any sequence of writes ends with the record of the max marker, the last of its ties."""
        tenant, stripe_id = _unique("t"), _unique("sub")
        stored: Subscription | None = None
        results: list[MirrorResult] = []
        expected: list[MirrorResult] = []
        records = [
            _subscription(stripe_id, customer=c, marker=m, status=f"s{i}", tenant=tenant)
            for i, (m, c) in enumerate(writes)
        ]
        for record in records:
            if stored is None:
                expected.append(MirrorResult.INSERTED)
            elif record.marker < stored.marker:
                expected.append(MirrorResult.STALE)
                continue
            else:
                tie = record.marker == stored.marker
                expected.append(MirrorResult.TIE if tie else MirrorResult.APPLIED)
            stored = record
        if per_transaction:
            for record in records:
                with storage.transaction() as tx:
                    results.append(tx.mirror(record))
        else:
            with storage.transaction() as tx:
                results = [tx.mirror(record) for record in records]
        assert results == expected
        assert stored is not None
        top = max(m for m, _ in writes)
        assert stored == [r for r in records if r.marker == _at(top)][-1]
        with storage.transaction() as tx:
            assert tx.get_mirror(Subscription, tenant, TEST, stripe_id) == stored
            for customer in ("cus_A", "cus_B", "cus_C"):
                listed = tx.mirrors_for_customer(Subscription, tenant, TEST, customer)
                assert list(listed) == ([stored] if customer == stored.stripe_customer_id else [])

    # -- outbox --------------------------------------------------------------
    def test_outbox_round_trips_and_is_replaced(self, storage: Storage) -> None:
        """put_outbox inserts, then replaces the entry with the same id."""
        with storage.transaction() as tx:
            tx.put_outbox(_outbox("ob_1"))
        done = _outbox("ob_1", state=OutboxState.DONE)
        with storage.transaction() as tx:
            assert tx.get_outbox("ob_1") == _outbox("ob_1")
            tx.put_outbox(done)
        with storage.transaction() as tx:
            assert tx.get_outbox("ob_1") == done
            assert tx.get_outbox("ob_unknown") is None

    def test_due_outbox(self, storage: Storage) -> None:
        """due_outbox lists pending entries due at `now`, oldest first, up to limit."""
        with storage.transaction() as tx:
            tx.put_outbox(_outbox("ob_1", created=3))
            tx.put_outbox(_outbox("ob_2", created=1, next_attempt=10))
            tx.put_outbox(_outbox("ob_3", created=2, next_attempt=11))
            tx.put_outbox(_outbox("ob_4", created=0, state=OutboxState.DONE))
            tx.put_outbox(_outbox("ob_5", created=0, state=OutboxState.FAILED))
            tx.put_outbox(_outbox("ob_6", created=5, next_attempt=5))
        with storage.transaction() as tx:
            assert _ids(tx.due_outbox(_at(10), limit=10)) == ["ob_2", "ob_1", "ob_6"]
            assert _ids(tx.due_outbox(_at(10), limit=2)) == ["ob_2", "ob_1"]
            assert _ids(tx.due_outbox(_at(4), limit=10)) == ["ob_1"]
            assert _ids(tx.due_outbox(_at(11), limit=10)) == ["ob_2", "ob_3", "ob_1", "ob_6"]
            tx.put_outbox(_outbox("ob_2", created=1, state=OutboxState.DONE))
        with storage.transaction() as tx:
            assert _ids(tx.due_outbox(_at(10), limit=10)) == ["ob_1", "ob_6"]

    def test_outbox_with_state(self, storage: Storage) -> None:
        """outbox_with_state lists the entries in one state, oldest first, up to limit."""
        failed = OutboxState.FAILED
        with storage.transaction() as tx:
            tx.put_outbox(_outbox("ob_1", created=2, state=failed))
            tx.put_outbox(_outbox("ob_2", created=1, state=failed))
            tx.put_outbox(_outbox("ob_3", created=0))
            tx.put_outbox(_outbox("ob_4", created=3, state=failed))
        with storage.transaction() as tx:
            assert _ids(tx.outbox_with_state(failed)) == ["ob_2", "ob_1", "ob_4"]
            assert _ids(tx.outbox_with_state(failed, limit=1)) == ["ob_2"]
            assert _ids(tx.outbox_with_state(OutboxState.PENDING)) == ["ob_3"]
            assert list(tx.outbox_with_state(OutboxState.DONE)) == []

    def test_outbox_for_customer(self, storage: Storage) -> None:
        """outbox_for_customer lists one customer's pending entries, oldest first."""
        with storage.transaction() as tx:
            tx.put_outbox(_outbox("ob_1", created=2, customer_id="c1"))
            tx.put_outbox(_outbox("ob_2", created=1, customer_id="c1", next_attempt=99))
            tx.put_outbox(_outbox("ob_3", created=0, customer_id="c1", state=OutboxState.DONE))
            tx.put_outbox(_outbox("ob_4", created=0, customer_id="c2"))
            tx.put_outbox(_outbox("ob_5", created=0, customer_id="c1", tenant="t2"))
        with storage.transaction() as tx:
            assert _ids(tx.outbox_for_customer("t1", "c1")) == ["ob_2", "ob_1"]
            assert _ids(tx.outbox_for_customer("t1", "c2")) == ["ob_4"]
            assert _ids(tx.outbox_for_customer("t2", "c1")) == ["ob_5"]
            assert list(tx.outbox_for_customer("t1", "c_none")) == []

    # -- models --------------------------------------------------------------
    @pytest.mark.parametrize("model", _every_model(), ids=lambda m: type(m).__name__)
    def test_model_round_trips(self, storage: Storage, model: Any) -> None:
        """Every model, with every field set, comes back from storage equal to the original."""
        with storage.transaction() as tx:
            _store(tx, model)
        with storage.transaction() as tx:
            loaded = _load(tx, model)
        assert type(loaded) is type(model)
        assert loaded == model

    @_EXAMPLES
    @given(
        name=st.none() | st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\0")),
        metadata=st.dictionaries(
            st.text(_ID_ALPHABET, min_size=1, max_size=8),
            st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\0")),
            max_size=4,
        ),
    )
    def test_customer_text_round_trips(
        self, storage: Storage, name: str | None, metadata: dict[str, str]
    ) -> None:
        """Any name and metadata text (no NUL) comes back unchanged."""
        customer = Customer(id=_unique("c"), tenant="t1", email=None, name=name, metadata=metadata)
        with storage.transaction() as tx:
            tx.put_customer(customer)
        with storage.transaction() as tx:
            assert tx.get_customer("t1", customer.id) == customer

    # -- transactions --------------------------------------------------------
    @pytest.mark.parametrize("write", sorted(_WRITES))
    def test_rollback_leaves_nothing(self, storage: Storage, write: str) -> None:
        """A block that raises after a write leaves storage exactly as it was."""
        with storage.transaction() as tx:
            _populate(tx)
        before = _snapshot(storage)
        with pytest.raises(_Boom):
            _transact(storage, _WRITES[write], boom=True)
        assert _snapshot(storage) == before

    def test_rollback_of_every_write_at_once(self, storage: Storage) -> None:
        """A block that raises after writes of every kind leaves storage as it was."""
        with storage.transaction() as tx:
            _populate(tx)
        before = _snapshot(storage)
        with pytest.raises(_Boom):
            _transact(storage, *(_WRITES[name] for name in sorted(_WRITES)), boom=True)
        assert _snapshot(storage) == before

    def test_writes_commit_on_normal_exit(self, storage: Storage) -> None:
        """Every kind of write is visible to the next transaction once its block exits."""
        with storage.transaction() as tx:
            _populate(tx)
        before = _snapshot(storage)
        with storage.transaction() as tx:
            for name in sorted(_WRITES):
                _WRITES[name](tx)
        after = _snapshot(storage)
        changed = {key for key in before if before[key] != after[key]}
        assert changed == set(before)

    def test_block_exception_propagates_unchanged(self, storage: Storage) -> None:
        """The exception raised in a block comes out of it as itself, not wrapped."""
        boom = _Boom("mine")
        with pytest.raises(_Boom) as raised, storage.transaction():
            raise boom
        assert raised.value is boom

    def test_nested_transaction_joins_the_outer_one(self, storage: Storage) -> None:
        """A transaction opened inside another sees its writes and rolls back with it."""

        def nested(outer: Transaction) -> None:
            outer.put_customer(_customer("c1"))
            with storage.transaction() as inner:
                assert inner.get_customer("t1", "c1") == _customer("c1")
                inner.put_customer(_customer("c2"))
            assert outer.get_customer("t1", "c2") == _customer("c2")

        with pytest.raises(_Boom):
            _transact(storage, nested, boom=True)
        with storage.transaction() as tx:
            assert tx.list_customers("t1", after=None, limit=10) == []

    def test_nested_block_that_raises_undoes_only_its_writes(self, storage: Storage) -> None:
        """An inner block that raises undoes its own writes; the outer one still commits."""
        with storage.transaction() as outer:
            outer.put_customer(_customer("c1"))
            with pytest.raises(_Boom):
                _transact(
                    storage,
                    lambda inner: inner.put_customer(_customer("c2")),
                    lambda inner: inner.record_event(_event("evt_1")),
                    boom=True,
                )
            outer.put_customer(_customer("c3"))
        with storage.transaction() as tx:
            assert _ids(tx.list_customers("t1", after=None, limit=10)) == ["c1", "c3"]
            assert tx.get_event("evt_1") is None

    def test_closed_storage_refuses_transactions(self, storage: Storage) -> None:
        """After close(), opening a transaction raises StorageError."""
        storage.close()
        with pytest.raises(StorageError), storage.transaction():
            pass

    # -- races ---------------------------------------------------------------
    def _race(self, work: Callable[[int], Any]) -> list[Any]:
        """Run ``work(i)`` in ``threads`` threads released together; their results in order."""
        if not self.concurrent:
            pytest.skip("this storage does not declare itself thread-safe (concurrent = False)")
        start = threading.Barrier(self.threads)

        def run(i: int) -> Any:
            start.wait(timeout=60)
            return work(i)

        with ThreadPoolExecutor(max_workers=self.threads) as pool:
            return list(pool.map(run, range(self.threads)))

    def test_concurrent_record_event_has_one_winner(self, storage: Storage) -> None:
        """Of N threads recording the same event id at once, exactly one sees True."""
        event = _event("evt_race")

        def record(_: int) -> bool:
            with storage.transaction() as tx:
                return tx.record_event(event)

        results = self._race(record)
        assert sorted(results) == [False] * (self.threads - 1) + [True]
        with storage.transaction() as tx:
            assert tx.get_event("evt_race") == event

    def test_concurrent_claims_never_share_an_event(self, storage: Storage) -> None:
        """N threads claiming at once get disjoint events, as many as were due."""
        with storage.transaction() as tx:
            for i in range(20):
                tx.record_event(_event(f"evt_{i:02}", outcome=EventOutcome.PENDING, received=i))

        def claim(_: int) -> list[str]:
            with storage.transaction() as tx:
                claimed = tx.claim_events(_at(100), limit=3, lease=timedelta(minutes=1))
            return [e.event_id for e in claimed]

        results = [event_id for claimed in self._race(claim) for event_id in claimed]
        assert len(results) == len(set(results)) == min(20, 3 * self.threads)

    def test_concurrent_mirror_keeps_the_max_marker(self, storage: Storage) -> None:
        """N threads mirroring one record at once: one insert, and the max marker wins."""

        def write(i: int) -> MirrorResult:
            record = _subscription("sub_race", marker=i, status=f"s{i}")
            with storage.transaction() as tx:
                return tx.mirror(record)

        results = self._race(write)
        assert results.count(MirrorResult.INSERTED) == 1
        assert MirrorResult.TIE not in results
        top = self.threads - 1
        with storage.transaction() as tx:
            stored = tx.get_mirror(Subscription, "t1", TEST, "sub_race")
        assert stored == _subscription("sub_race", marker=top, status=f"s{top}")

    # -- products, references and the subscription-product index (issue 4) -----
    def test_list_products_pages_in_id_order(self, storage: Storage) -> None:
        """list_products returns one tenant's products by id, page by page."""
        with storage.transaction() as tx:
            for pid in ("p3", "p1", "p2", "Ω"):
                tx.put_product(_product(pid))
            tx.put_product(_product("p0", tenant="t2"))
        with storage.transaction() as tx:
            first = tx.list_products("t1", after=None, limit=2)
            rest = tx.list_products("t1", after=first[-1].id, limit=10)
            assert [p.id for p in first] == ["p1", "p2"]
            assert [p.id for p in rest] == sorted(["p3", "Ω"])
            assert [p.id for p in tx.list_products("t2", after=None, limit=10)] == ["p0"]
            assert list(tx.list_products("t_none", after=None, limit=10)) == []

    def test_product_catalog_round_trips(self, storage: Storage) -> None:
        """A product with its Stripe product, flags and prices comes back equal."""
        product = attrs_evolve(
            _product("p_cat", test="prod_T"),
            stripe_test=StripeProduct(
                stripe_id="prod_T",
                name="Pro «T»",
                active=False,
                prices=(
                    StripePrice("price_1", "price", "eur", 1999, "month", 1, "Monthly"),
                    StripePrice("plan_1", "plan", "usd", None, None, None, None, False, True, T0),
                ),
                marker=T0,
            ),
        )
        with storage.transaction() as tx:
            tx.put_product(product)
        with storage.transaction() as tx:
            assert tx.get_product("t1", "p_cat") == product

    def test_add_reference_is_insert_if_absent(self, storage: Storage) -> None:
        """A reference is stored once: adding it again reports False."""
        ref = StripeReference("t1", TEST, "ch_1", Relation.PAYS, "in_1")
        with storage.transaction() as tx:
            assert tx.add_reference(ref) is True
            assert tx.add_reference(ref) is False
        with storage.transaction() as tx:
            assert tx.add_reference(ref) is False
            assert list(tx.references_from("t1", TEST, "ch_1")) == [ref]

    def test_references_from_and_to(self, storage: Storage) -> None:
        """References are found from their source and from their target, per tenant and mode."""
        refs = [
            StripeReference("t1", TEST, "dp_1", Relation.DISPUTES, "pi_1"),
            StripeReference("t1", TEST, "dp_1", Relation.DISPUTES, "ch_1"),
            StripeReference("t1", TEST, "re_1", Relation.REFUNDS, "ch_1"),
            StripeReference("t1", TEST, "ch_1", Relation.SAME_PAYMENT, "pi_1"),
            StripeReference("t1", TEST, "ch_1", Relation.PAYS, "in_1"),
            StripeReference("t1", LIVE, "dp_1", Relation.DISPUTES, "ch_1"),
            StripeReference("t2", TEST, "dp_1", Relation.DISPUTES, "ch_1"),
        ]
        with storage.transaction() as tx:
            for ref in refs:
                tx.add_reference(ref)
        with storage.transaction() as tx:
            assert list(tx.references_from("t1", TEST, "dp_1")) == [refs[1], refs[0]]
            assert list(tx.references_from("t1", TEST, "ch_1")) == [refs[4], refs[3]]
            assert list(tx.references_to("t1", TEST, "ch_1")) == [refs[1], refs[2]]
            assert list(tx.references_to("t1", TEST, "in_1")) == [refs[4]]
            assert list(tx.references_to("t1", LIVE, "ch_1")) == [refs[5]]
            assert list(tx.references_to("t2", TEST, "ch_1")) == [refs[6]]
            assert list(tx.references_from("t1", TEST, "none")) == []
            assert list(tx.references_to("t1", TEST, "none")) == []

    def test_rolled_back_reference_is_gone(self, storage: Storage) -> None:
        """A reference added in a block that raises is not stored."""
        ref = StripeReference("t1", TEST, "dp_9", Relation.DISPUTES, "ch_9")
        with pytest.raises(_Boom):
            _transact(storage, lambda tx: tx.add_reference(ref), boom=True)
        with storage.transaction() as tx:
            assert list(tx.references_from("t1", TEST, "dp_9")) == []
            assert list(tx.references_to("t1", TEST, "ch_9")) == []
            assert tx.add_reference(ref) is True

    def test_subscription_products_index(self, storage: Storage) -> None:
        """A subscription is found under exactly the Stripe products it was last indexed with."""
        with storage.transaction() as tx:
            tx.set_subscription_products("t1", TEST, "sub_2", ["prod_A"])
            tx.set_subscription_products("t1", TEST, "sub_1", ["prod_A", "prod_B"])
            tx.set_subscription_products("t1", LIVE, "sub_1", ["prod_A"])
            tx.set_subscription_products("t2", TEST, "sub_3", ["prod_A"])
        with storage.transaction() as tx:
            assert list(tx.subscriptions_for_stripe_product("t1", TEST, "prod_A")) == [
                "sub_1",
                "sub_2",
            ]
            assert list(tx.subscriptions_for_stripe_product("t1", TEST, "prod_B")) == ["sub_1"]
            assert list(tx.subscriptions_for_stripe_product("t1", LIVE, "prod_A")) == ["sub_1"]
            tx.set_subscription_products("t1", TEST, "sub_1", ["prod_C"])
            tx.set_subscription_products("t1", TEST, "sub_2", [])
        with storage.transaction() as tx:
            assert list(tx.subscriptions_for_stripe_product("t1", TEST, "prod_A")) == []
            assert list(tx.subscriptions_for_stripe_product("t1", TEST, "prod_B")) == []
            assert list(tx.subscriptions_for_stripe_product("t1", TEST, "prod_C")) == ["sub_1"]
            assert list(tx.subscriptions_for_stripe_product("t2", TEST, "prod_A")) == ["sub_3"]

    def test_rolled_back_subscription_products_are_restored(self, storage: Storage) -> None:
        """Re-indexing a subscription in a block that raises leaves the old index."""
        with storage.transaction() as tx:
            tx.set_subscription_products("t1", TEST, "sub_1", ["prod_A"])

        def reindex(tx: Transaction) -> None:
            tx.set_subscription_products("t1", TEST, "sub_1", ["prod_B"])

        with pytest.raises(_Boom):
            _transact(storage, reindex, boom=True)
        with storage.transaction() as tx:
            assert list(tx.subscriptions_for_stripe_product("t1", TEST, "prod_A")) == ["sub_1"]
            assert list(tx.subscriptions_for_stripe_product("t1", TEST, "prod_B")) == []

    # -- Connect onboarding in progress and invitations (issue 3) --------------
    def test_pending_connection_round_trips_and_is_replaced(self, storage: Storage) -> None:
        """put_pending_connection inserts, then replaces the record with the same key."""
        first = _pending("oauth:abc")
        second = attrs_evolve(first, stripe_account_id="acct_9", idempotency_key="k2")
        with storage.transaction() as tx:
            tx.put_pending_connection(first)
        with storage.transaction() as tx:
            assert tx.get_pending_connection("oauth:abc") == first
            assert tx.get_pending_connection("oauth:other") is None
            tx.put_pending_connection(second)
        with storage.transaction() as tx:
            assert tx.get_pending_connection("oauth:abc") == second

    def test_take_pending_connection_is_single_use(self, storage: Storage) -> None:
        """take_pending_connection returns the record once, then None."""
        with storage.transaction() as tx:
            tx.put_pending_connection(_pending("oauth:abc"))
        with storage.transaction() as tx:
            assert tx.take_pending_connection("oauth:abc") == _pending("oauth:abc")
            assert tx.take_pending_connection("oauth:abc") is None
        with storage.transaction() as tx:
            assert tx.get_pending_connection("oauth:abc") is None
            assert tx.take_pending_connection("oauth:missing") is None

    def test_insert_invitation_is_insert_if_absent(self, storage: Storage) -> None:
        """One invitation per (tenant, mode, Stripe customer): a second insert is refused."""
        with storage.transaction() as tx:
            assert tx.insert_invitation(_invitation("cus_A"))
            assert not tx.insert_invitation(_invitation("cus_A", customer_id="c_other"))
            assert tx.insert_invitation(_invitation("cus_A", mode=LIVE))
            assert tx.insert_invitation(_invitation("cus_A", tenant="t2"))
        with storage.transaction() as tx:
            assert not tx.insert_invitation(_invitation("cus_A", customer_id="c_again"))
            assert tx.get_invitation("t1", TEST, "cus_A") == _invitation("cus_A")
            assert tx.get_invitation("t1", LIVE, "cus_A") == _invitation("cus_A", mode=LIVE)
            assert tx.get_invitation("t1", TEST, "cus_none") is None

    def test_invitation_round_trips_with_every_field(self, storage: Storage) -> None:
        """An invitation with every field set comes back equal; put_invitation replaces it."""
        precise = T0 + timedelta(microseconds=654_321)
        full = Invitation(
            tenant="t1",
            mode=LIVE,
            stripe_customer_id="cus_full",
            customer_id="c_zoë",
            email="zoë@example.com",
            message_id="invitation.abc@example.com",
            created_at=precise,
            state=InvitationState.SENT,
            attempts=3,
            next_attempt_at=precise + timedelta(minutes=1),
            last_error="SMTP 451 «try later»",
            sent_at=precise + timedelta(minutes=2),
        )
        with storage.transaction() as tx:
            assert tx.insert_invitation(_invitation("cus_full", mode=LIVE))
            tx.put_invitation(full)
        with storage.transaction() as tx:
            assert tx.get_invitation("t1", LIVE, "cus_full") == full

    def test_due_invitations(self, storage: Storage) -> None:
        """due_invitations lists pending invitations due at `now`, oldest first, up to limit."""
        with storage.transaction() as tx:
            tx.insert_invitation(_invitation("cus_1", created=3))
            tx.insert_invitation(_invitation("cus_2", created=1, next_attempt=10))
            tx.insert_invitation(_invitation("cus_3", created=2, next_attempt=11))
            tx.insert_invitation(_invitation("cus_4", created=0, state=InvitationState.SENT))
            tx.insert_invitation(_invitation("cus_5", created=0, state=InvitationState.NO_EMAIL))
        with storage.transaction() as tx:
            assert _customers_of(tx.due_invitations(_at(10), limit=10)) == ["cus_2", "cus_1"]
            assert _customers_of(tx.due_invitations(_at(10), limit=1)) == ["cus_2"]
            assert _customers_of(tx.due_invitations(_at(11), limit=10)) == [
                "cus_2",
                "cus_3",
                "cus_1",
            ]
            tx.put_invitation(_invitation("cus_2", created=1, state=InvitationState.SENT))
        with storage.transaction() as tx:
            assert _customers_of(tx.due_invitations(_at(10), limit=10)) == ["cus_1"]

    def test_claim_invitation_leases_it(self, storage: Storage) -> None:
        """A claim returns the invitation leased until `until`; it is not due again before then."""
        with storage.transaction() as tx:
            tx.insert_invitation(_invitation("cus_1"))
            tx.insert_invitation(_invitation("cus_sent", state=InvitationState.SENT))
        with storage.transaction() as tx:
            claimed = tx.claim_invitation("t1", TEST, "cus_1", now=_at(5), until=_at(65))
            assert claimed == _invitation("cus_1", next_attempt=65)
            assert tx.claim_invitation("t1", TEST, "cus_sent", now=_at(5), until=_at(65)) is None
            assert tx.claim_invitation("t1", TEST, "cus_none", now=_at(5), until=_at(65)) is None
        with storage.transaction() as tx:
            assert tx.claim_invitation("t1", TEST, "cus_1", now=_at(64), until=_at(99)) is None
            assert list(tx.due_invitations(_at(64), limit=10)) == []
            assert _customers_of(tx.due_invitations(_at(65), limit=10)) == ["cus_1"]
            assert tx.claim_invitation("t1", TEST, "cus_1", now=_at(65), until=_at(99)) is not None

    def test_onboarding_and_invitation_writes_roll_back(self, storage: Storage) -> None:
        """A block that raises undoes pending-connection and invitation writes."""
        with storage.transaction() as tx:
            tx.put_pending_connection(_pending("oauth:kept"))
            tx.insert_invitation(_invitation("cus_kept"))

        def writes(tx: Transaction) -> None:
            assert tx.take_pending_connection("oauth:kept") is not None
            tx.put_pending_connection(_pending("oauth:new"))
            tx.insert_invitation(_invitation("cus_new"))
            tx.put_invitation(_invitation("cus_kept", state=InvitationState.SENT))
            tx.claim_invitation("t1", TEST, "cus_new", now=_at(0), until=_at(60))

        with pytest.raises(_Boom):
            _transact(storage, writes, boom=True)
        with storage.transaction() as tx:
            assert tx.get_pending_connection("oauth:kept") == _pending("oauth:kept")
            assert tx.get_pending_connection("oauth:new") is None
            assert tx.get_invitation("t1", TEST, "cus_new") is None
            assert tx.get_invitation("t1", TEST, "cus_kept") == _invitation("cus_kept")
            assert _customers_of(tx.due_invitations(_at(0), limit=10)) == ["cus_kept"]

    def test_concurrent_insert_invitation_has_one_winner(self, storage: Storage) -> None:
        """Of N threads inserting the invitation for one Stripe customer, exactly one wins."""

        def insert(i: int) -> bool:
            with storage.transaction() as tx:
                return tx.insert_invitation(_invitation("cus_race", customer_id=f"c{i}"))

        results = self._race(insert)
        assert sorted(results) == [False] * (self.threads - 1) + [True]

    def test_concurrent_take_pending_connection_has_one_winner(self, storage: Storage) -> None:
        """Of N threads taking one pending connection (an OAuth state), exactly one gets it."""
        with storage.transaction() as tx:
            tx.put_pending_connection(_pending("oauth:race"))

        def take(_: int) -> bool:
            with storage.transaction() as tx:
                return tx.take_pending_connection("oauth:race") is not None

        results = self._race(take)
        assert sorted(results) == [False] * (self.threads - 1) + [True]

    def test_concurrent_claim_invitation_has_one_winner(self, storage: Storage) -> None:
        """Of N threads claiming one due invitation at once, exactly one gets it."""
        with storage.transaction() as tx:
            tx.insert_invitation(_invitation("cus_claim"))

        def claim(_: int) -> bool:
            with storage.transaction() as tx:
                found = tx.claim_invitation("t1", TEST, "cus_claim", now=_at(1), until=_at(60))
            return found is not None

        results = self._race(claim)
        assert sorted(results) == [False] * (self.threads - 1) + [True]

    # -- customer row locks (issue 3 review) -------------------------------------
    def test_lock_customer_returns_the_stored_customer(self, storage: Storage) -> None:
        """lock_customer returns the customer as get_customer does, or None when there is none."""
        with storage.transaction() as tx:
            tx.put_customer(_customer("c1", link=(TEST, "cus_L")))
        with storage.transaction() as tx:
            assert tx.lock_customer("t1", "c1") == _customer("c1", link=(TEST, "cus_L"))
            assert tx.lock_customer("t1", "c_unknown") is None
            assert tx.lock_customer("t2", "c1") is None

    def test_concurrent_read_modify_write_under_lock_customer_loses_nothing(
        self, storage: Storage
    ) -> None:
        """N threads each locking a customer and adding one to a counter: the count ends at N."""
        with storage.transaction() as tx:
            tx.put_customer(attrs_evolve(_customer("c_count"), metadata={"n": "0"}))

        def increment(_: int) -> None:
            with storage.transaction() as tx:
                customer = tx.lock_customer("t1", "c_count")
                assert customer is not None
                count = int(customer.metadata["n"]) + 1
                time.sleep(0.01)  # widen the window a lost update needs
                tx.put_customer(attrs_evolve(customer, metadata={"n": str(count)}))

        self._race(increment)
        with storage.transaction() as tx:
            final = tx.get_customer("t1", "c_count")
        assert final is not None
        assert final.metadata["n"] == str(self.threads)


def _pending(key: str) -> PendingConnection:
    return PendingConnection(
        key=key,
        tenant="t1",
        mode=TEST,
        kind="oauth",
        created_at=T0,
        expires_at=T0 + timedelta(hours=1),
        redirect_uri="https://app.example.com/back",
    )


def _invitation(
    stripe_customer_id: str,
    *,
    tenant: str = "t1",
    mode: Mode = TEST,
    customer_id: str = "c1",
    created: float = 0,
    next_attempt: float | None = None,
    state: InvitationState = InvitationState.PENDING,
) -> Invitation:
    return Invitation(
        tenant=tenant,
        mode=mode,
        stripe_customer_id=stripe_customer_id,
        customer_id=customer_id,
        email="a@example.com",
        message_id=f"invitation.{customer_id}@example.com",
        created_at=_at(created),
        state=state,
        next_attempt_at=None if next_attempt is None else _at(next_attempt),
    )


def _customers_of(invitations: Sequence[Invitation]) -> list[str]:
    return [i.stripe_customer_id for i in invitations]
