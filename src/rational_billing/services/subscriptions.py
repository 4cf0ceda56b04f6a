"""`SubscriptionTracker`: mirrored subscriptions, invoices, disputes and refunds, and access.

Mirroring (§4a.4, §4a.5, §4a.10):

- Every record is kept under its Stripe customer id, whether or not a local
  customer is linked; linking a customer attaches its records at once, since
  access reads go customer → link → records.
- `SubscriptionTracker.mirror_object` is the one code path that turns a Stripe
  object into stored state: webhook handlers call it with the event's
  ``created`` time as the marker, backfill and revalidation with the fetch
  time. A stale object never overwrites a newer one; a same-second tie is
  applied and revalidated after the commit by fetching the object again.
- A dispute or refund names a charge (and a payment intent). The charge leads
  to its invoice through ``charge.invoice`` on old API versions, or through
  InvoicePayment objects on new ones; the invoice leads to the subscription.
  Those facts are stored as `StripeReference` rows, added and never changed,
  so whichever event completes the chain attaches the dispute, in any order.

Access reads only indexed local data: the customer, its link, the records
under that Stripe customer, and the product mapping. No Stripe call, no scan.
"""

from __future__ import annotations

import functools
import logging
from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, Final, NoReturn, TypeAlias, TypeVar

import attrs

from .._config import Mode
from ..domain._serde import MAPPINGS as _MAPPINGS
from ..domain.access import AccessPolicy, AccessSummary, Denial, DenialReason, Grant
from ..domain.access_rules import (
    LOST_DISPUTE_STATUS,
    OPEN_DISPUTE_STATUSES,
    UNPAID_INVOICE_STATUSES,
    SubscriptionFacts,
    Verdict,
    best_verdict,
    is_full_refund,
    judge,
    merge_invoice,
    merge_past_due,
    refunded_amount,
)
from ..domain.models import (
    Customer,
    CustomerLink,
    Dispute,
    EventOutcome,
    Invoice,
    MirrorResult,
    Product,
    Refund,
    Relation,
    StripeReference,
    Subscription,
    Tenant,
)
from ..domain.normalize import (
    normalize_charge,
    normalize_dispute,
    normalize_invoice,
    normalize_invoice_payment,
    normalize_refund,
    normalize_subscription,
)
from ..errors import StripeObjectError
from ..ports import Clock, Storage, StripeAPI, Transaction
from ._lookup import find_customer, find_product, known_tenant
from .webhooks import EventContext, HandlerResult

__all__ = ["MirrorOutcome", "RefundState", "SubscriptionTracker", "floor_to_second"]

log = logging.getLogger("rational_billing.subscriptions")

D = TypeVar("D", Dispute, Refund)

#: Where a mirrored record is fetched again, for revalidation.
_FETCH_PATHS: Final[Mapping[str, str]] = {
    "subscription": "/v1/subscriptions/{}",
    "invoice": "/v1/invoices/{}",
    "dispute": "/v1/disputes/{}",
    "refund": "/v1/refunds/{}",
}
_KINDS: Final[Mapping[str, type[Any]]] = {
    "subscription": Subscription,
    "invoice": Invoice,
    "dispute": Dispute,
    "refund": Refund,
}
_PAGE = 100
#: Invoice statuses before finalisation: a subscription's next-period draft, or a deleted one.
_NOT_FINALIZED: Final = frozenset({"draft", "deleted"})

#: Subscription id → a lost dispute, an open dispute, a fully refunded invoice.
_Marks: TypeAlias = tuple[dict[str, str], dict[str, str], dict[str, str]]


def floor_to_second(moment: datetime) -> datetime:
    """``moment`` without its fraction of a second, to compare with Stripe's ``created``."""
    return moment.replace(microsecond=0)


@attrs.frozen
class MirrorOutcome:
    """What mirroring one Stripe object did.

    ``result`` is None for objects that only add references (a charge, an
    InvoicePayment). ``warnings`` say what looked wrong (an unknown status,
    an item without product); ``recheck`` names the disputes and refunds to
    attach again once the transaction has committed; ``ties`` names the
    records embedded in the object (a charge's refunds) that were applied in
    the same second as what was stored, to revalidate like the object itself.
    ``subscription`` is the subscription as stored, when one was written.
    """

    kind: str
    stripe_id: str
    result: MirrorResult | None
    warnings: tuple[str, ...] = ()
    recheck: frozenset[tuple[str, str]] = frozenset()
    ties: frozenset[tuple[str, str]] = frozenset()
    subscription: Subscription | None = None


@attrs.frozen
class RefundState:
    """How much of an invoice was refunded: ``full`` when it equals the amount paid (§4a.10)."""

    invoice_id: str
    amount_paid: int
    refunded: int
    refund_ids: tuple[str, ...]

    @property
    def full(self) -> bool:
        """True when the refunds give back everything paid on the invoice."""
        return is_full_refund(self.refunded, self.amount_paid)

    @property
    def partial(self) -> bool:
        """True when something, but not everything, was refunded."""
        return self.refunded > 0 and not self.full


class SubscriptionTracker:
    """Mirrors Stripe's billing records and answers access questions from local data.

    Example::

        if billing.subscriptions.has_access("acme", "cust_1", "pro"):
            ...
        summary = billing.subscriptions.access("acme", "cust_1")
        summary.denied["team"].reason  # DenialReason.UNPAID_BEYOND_GRACE
    """

    def __init__(
        self, *, storage: Storage, stripe: StripeAPI, policy: AccessPolicy, clock: Clock
    ) -> None:
        self._storage = storage
        self._stripe = stripe
        self._policy = policy
        self._clock = clock

    @property
    def policy(self) -> AccessPolicy:
        """The `AccessPolicy` every decision applies."""
        return self._policy

    # -- access ------------------------------------------------------------------------
    def has_access(self, tenant: str, customer_id: str, product_id: str) -> bool:
        """True when the customer is granted the product now, under the policy.

        Reads local data only: no Stripe call. A disconnected tenant grants nothing.

        Raises:
            TenantNotFound: the tenant was never registered.
            CustomerNotFound: no such customer.
            ProductNotFound: no such product.
        """
        with self._storage.transaction() as tx:
            tenant_obj = tx.get_tenant(tenant)
            customer = tx.get_customer(tenant, customer_id)
            product = tx.get_product(tenant, product_id)
            if tenant_obj is None or customer is None or product is None:
                _raise_missing(tx, tenant, customer_id, product_id)
            link = customer.link
            if link is None or not _serves(tenant_obj, link.mode):
                return False
            stripe_product = product.stripe_product_id(link.mode)
            if stripe_product is None:
                return False
            return self._grants(tx, tenant, link, stripe_product)

    def access(self, tenant: str, customer_id: str) -> AccessSummary:
        """Every product of the tenant: granted (by which subscription) or denied (why).

        Raises:
            TenantNotFound: the tenant was never registered.
            CustomerNotFound: no such customer.
        """
        now = self._clock()
        with self._storage.transaction() as tx:
            tenant_obj = known_tenant(tx, tenant)
            customer = find_customer(tx, tenant, customer_id)
            products = _all_products(tx, tenant)
            return self._summary(tx, tenant_obj, customer, products, now)

    def customers_with_access(self, tenant: str, product_id: str) -> frozenset[str]:
        """The local customers granted the product now, in either mode.

        Found through the subscriptions that carry the product's Stripe
        products (an index), not by scanning every customer.

        Raises:
            TenantNotFound: the tenant was never registered.
            ProductNotFound: no such product.
        """
        now = self._clock()
        with self._storage.transaction() as tx:
            tenant_obj = known_tenant(tx, tenant)
            product = find_product(tx, tenant, product_id)
            found: set[str] = set()
            for mode in sorted(tenant_obj.modes, key=lambda m: m.value):
                stripe_product = product.stripe_product_id(mode)
                if stripe_product is None or not _serves(tenant_obj, mode):
                    continue
                for customer in _customers_on(tx, tenant, mode, stripe_product):
                    assert customer.link is not None
                    verdicts = self._verdicts(tx, tenant, customer.link, {stripe_product}, now)
                    if any(v.granted for v in verdicts.get(stripe_product, ())):
                        found.add(customer.id)
            return frozenset(found)

    def access_for_link(
        self, tx: Transaction, tenant_id: str, link: CustomerLink | None
    ) -> frozenset[str]:
        """The local product ids granted now to whatever is under ``link`` (policy-aware).

        Used by the customers service to compute a remap's impact, inside its
        own transaction.
        """
        if link is None:
            return frozenset()
        tenant = tx.get_tenant(tenant_id)
        if tenant is None or not _serves(tenant, link.mode):
            return frozenset()
        verdicts = self._verdicts(tx, tenant_id, link, None, self._clock())
        granted: set[str] = set()
        for stripe_product, found in verdicts.items():
            if any(v.granted for v in found):
                for product in tx.products_by_stripe_product(tenant_id, link.mode, stripe_product):
                    granted.add(product.id)
        return frozenset(granted)

    def remap_impact(
        self,
        tx: Transaction,
        tenant_id: str,
        product: Product,
        mode: Mode,
        new_stripe_product_id: str | None,
    ) -> Mapping[str, object]:
        """Who gains and who loses ``product`` if it maps to ``new_stripe_product_id`` in ``mode``.

        The ``impact`` of `RemapConfirmationRequired` for a product remap or
        unmap: ``gained`` and ``lost`` are sorted local customer ids.
        """
        old = product.stripe_product_id(mode)
        tenant = tx.get_tenant(tenant_id)
        gained: list[str] = []
        lost: list[str] = []
        if tenant is not None and _serves(tenant, mode):
            now = self._clock()
            candidates: dict[str, Customer] = {}
            for stripe_product in (old, new_stripe_product_id):
                if stripe_product is not None:
                    for customer in _customers_on(tx, tenant_id, mode, stripe_product):
                        candidates[customer.id] = customer
            wanted = {p for p in (old, new_stripe_product_id) if p is not None}
            for customer_id in sorted(candidates):
                link = candidates[customer_id].link
                assert link is not None
                verdicts = self._verdicts(tx, tenant_id, link, wanted, now)
                before = old is not None and any(v.granted for v in verdicts.get(old, ()))
                after = new_stripe_product_id is not None and any(
                    v.granted for v in verdicts.get(new_stripe_product_id, ())
                )
                if after and not before:
                    gained.append(customer_id)
                elif before and not after:
                    lost.append(customer_id)
        return {
            "tenant": tenant_id,
            "product_id": product.id,
            "mode": mode.value,
            "from": old,
            "to": new_stripe_product_id,
            "gained": tuple(gained),
            "lost": tuple(lost),
        }

    def refund_state(self, tenant: str, mode: Mode, invoice_id: str) -> RefundState | None:
        """How much of the invoice was refunded, or None when the invoice is not mirrored."""
        with self._storage.transaction() as tx:
            invoice = tx.get_mirror(Invoice, tenant, mode, invoice_id)
            if invoice is None:
                return None
            refunds = [
                r
                for r in tx.mirrors_for_customer(Refund, tenant, mode, invoice.stripe_customer_id)
                if r.invoice_id == invoice_id
            ]
            return RefundState(
                invoice_id=invoice_id,
                amount_paid=invoice.amount_paid,
                refunded=refunded_amount(refunds),
                refund_ids=tuple(sorted(r.stripe_id for r in refunds)),
            )

    # -- access internals ----------------------------------------------------------------
    def _summary(
        self,
        tx: Transaction,
        tenant: Tenant,
        customer: Customer,
        products: Sequence[Product],
        now: datetime,
    ) -> AccessSummary:
        link = customer.link
        denied: dict[str, Denial] = {}
        grants: dict[str, Grant] = {}
        why = None
        if not tenant.connected:
            why = f"tenant {tenant.id} is disconnected"
        elif link is not None and link.mode not in tenant.modes:
            why = f"tenant {tenant.id} is not connected in {link.mode.value} mode"
        if why is not None:
            for product in products:
                denied[product.id] = Denial(DenialReason.DISCONNECTED_TENANT, why)
            return AccessSummary(tenant.id, customer.id, link, denied=denied)
        if link is None:
            why = f"customer {customer.id} is not linked to a Stripe customer"
            for product in products:
                denied[product.id] = Denial(DenialReason.NO_LINK, why)
            return AccessSummary(tenant.id, customer.id, None, denied=denied)
        verdicts = self._verdicts(tx, tenant.id, link, None, now)
        mapped: set[str] = set()
        for product in products:
            stripe_product = product.stripe_product_id(link.mode)
            if stripe_product is None:
                denied[product.id] = Denial(
                    DenialReason.UNMAPPED_PRODUCT,
                    f"product {product.id} is not mapped to a Stripe product in "
                    f"{link.mode.value} mode",
                )
                continue
            mapped.add(stripe_product)
            verdict = best_verdict(verdicts.get(stripe_product, ()))
            if verdict is None:
                denied[product.id] = Denial(
                    DenialReason.NO_SUBSCRIPTION,
                    f"no subscription of {link.stripe_customer_id} includes {stripe_product}",
                )
            elif verdict.granted:
                grants[product.id] = Grant(
                    subscription_id=verdict.subscription.stripe_id,
                    status=verdict.subscription.status,
                    mode=link.mode,
                    grace_until=verdict.grace_until,
                )
            else:
                assert verdict.reason is not None
                denied[product.id] = Denial(
                    verdict.reason,
                    verdict.message,
                    subscription_id=verdict.subscription.stripe_id,
                    status=verdict.subscription.status,
                )
        unmapped = frozenset(
            sid
            for sid in verdicts
            if sid not in mapped and not tx.products_by_stripe_product(tenant.id, link.mode, sid)
        )
        return AccessSummary(
            tenant.id,
            customer.id,
            link,
            products=frozenset(grants),
            grants=grants,
            denied=denied,
            unmapped_stripe_products=unmapped,
        )

    def _grants(
        self, tx: Transaction, tenant: str, link: CustomerLink, stripe_product: str
    ) -> bool:
        """True when a subscription under ``link`` carries ``stripe_product`` and is granted.

        The hot path of `has_access`: disputes, refunds and invoices are read
        only for a subscription whose status could grant, and the clock only
        when the policy has to be applied in full (a grace period, a mark).
        """
        policy = self._policy
        granting = policy.granting_statuses
        marks: _Marks | None = None
        mode, customer = link.mode, link.stripe_customer_id
        for sub in tx.mirrors_for_customer(Subscription, tenant, mode, customer):
            for item in sub.items:  # a plain loop: this is the hot path
                if item.stripe_product_id == stripe_product:
                    break
            else:
                continue
            if sub.status not in granting and sub.status != "past_due":
                continue
            if marks is None:
                marks = self._marks(tx, tenant, mode, customer)
            lost, open_, refunded = marks
            sid = sub.stripe_id
            if (
                sub.status in granting
                and sid not in lost
                and sid not in open_
                and sid not in refunded
            ):
                return True  # what judge() says when nothing revokes or suspends
            if judge(policy, self._facts(tx, sub, marks), self._clock()).granted:
                return True
        return False

    def _verdicts(
        self,
        tx: Transaction,
        tenant: str,
        link: CustomerLink,
        stripe_products: Collection[str] | None,
        now: datetime,
    ) -> dict[str, list[Verdict]]:
        """Stripe product id → the verdicts of the subscriptions (under ``link``) that carry it."""
        mode, customer = link.mode, link.stripe_customer_id
        subscriptions = [
            s
            for s in tx.mirrors_for_customer(Subscription, tenant, mode, customer)
            if stripe_products is None
            or any(i.stripe_product_id in stripe_products for i in s.items)
        ]
        if not subscriptions:
            return {}
        marks = self._marks(tx, tenant, mode, customer)
        found: dict[str, list[Verdict]] = defaultdict(list)
        for sub in subscriptions:
            verdict = judge(self._policy, self._facts(tx, sub, marks), now)
            for item in sub.items:
                if item.stripe_product_id is not None:
                    found[item.stripe_product_id].append(verdict)
        return found

    def _marks(self, tx: Transaction, tenant: str, mode: Mode, customer: str) -> _Marks:
        """Lost and open disputes and full refunds under the Stripe customer, as the policy needs."""
        policy = self._policy
        lost: dict[str, str] = {}
        open_: dict[str, str] = {}
        refunded: dict[str, str] = {}
        if policy.revoke_on_lost_dispute or policy.suspend_on_open_dispute:
            lost, open_ = _dispute_marks(tx, tenant, mode, customer)
        if policy.revoke_on_full_refund:
            refunded = _refund_marks(tx, tenant, mode, customer)
        return lost, open_, refunded

    def _facts(self, tx: Transaction, sub: Subscription, marks: _Marks) -> SubscriptionFacts:
        lost, open_, refunded = marks
        unpaid = None
        if sub.status == "past_due" and "past_due" not in self._policy.granting_statuses:
            unpaid = _latest_unpaid_invoice(tx, sub)
        return SubscriptionFacts(
            subscription=sub,
            unpaid_invoice=unpaid,
            lost_dispute=lost.get(sub.stripe_id),
            open_dispute=open_.get(sub.stripe_id),
            refunded_invoice=refunded.get(sub.stripe_id),
        )

    # -- mirroring (shared by webhooks, revalidation and backfill) --------------------------
    def mirror_object(
        self,
        tx: Transaction,
        tenant: str,
        mode: Mode,
        obj: Mapping[str, Any],
        *,
        marker: datetime,
        transition_to_past_due: bool = False,
        failed_at: datetime | None = None,
        deleted: bool = False,
    ) -> MirrorOutcome:
        """Store one Stripe object (subscription, invoice, dispute, refund, charge, InvoicePayment).

        ``marker`` orders it against what is stored: an event's ``created``
        time, or the fetch time for an object read from the API (§4a.5).
        ``transition_to_past_due`` says the event changed a subscription's status
        to past_due; ``failed_at`` is the time of an invoice's failed payment;
        ``deleted`` marks a deleted draft invoice.

        Raises:
            StripeObjectError: the object is not one of these, or lacks an id,
                a customer or a status it cannot do without.
        """
        kind = obj.get("object") if isinstance(obj, _MAPPINGS) else None
        if kind == "subscription":
            return self._mirror_subscription(tx, tenant, mode, obj, marker, transition_to_past_due)
        if kind == "invoice":
            return self._mirror_invoice(tx, tenant, mode, obj, marker, failed_at, deleted)
        if kind == "dispute":
            n = normalize_dispute(obj, tenant=tenant, mode=mode, marker=marker)
            return self._mirror_payment_record(tx, n.record, n.references, n.warnings, "dispute")
        if kind == "refund":
            r = normalize_refund(obj, tenant=tenant, mode=mode, marker=marker)
            return self._mirror_payment_record(tx, r.record, r.references, r.warnings, "refund")
        if kind == "charge":
            return self._mirror_charge(tx, tenant, mode, obj, marker)
        if kind == "invoice_payment":
            p = normalize_invoice_payment(obj, tenant=tenant, mode=mode)
            recheck = self._add_references(tx, p.references)
            return MirrorOutcome(
                "invoice_payment",
                p.record.stripe_id or p.record.invoice_id,
                None,
                p.warnings,
                recheck,
            )
        raise StripeObjectError(f"cannot mirror a Stripe object of type {kind!r}")

    def store(self, tenant: str, mode: Mode, obj: Mapping[str, Any]) -> MirrorOutcome:
        """Store an object just read from the API, marked with the fetch time, in its own transaction.

        Raises:
            StripeObjectError: as `mirror_object`.
        """
        fetched = floor_to_second(self._clock())
        with self._storage.transaction() as tx:
            outcome = self._store_fetched(tx, tenant, mode, obj, fetched)
        self.recheck(tenant, mode, outcome.recheck)
        return outcome

    def _store_fetched(
        self, tx: Transaction, tenant: str, mode: Mode, obj: Mapping[str, Any], fetched: datetime
    ) -> MirrorOutcome:
        kind = obj.get("object")
        marker = fetched
        if isinstance(kind, str) and kind in _KINDS and isinstance(obj.get("id"), str):
            stored = tx.get_mirror(_KINDS[kind], tenant, mode, obj["id"])
            if stored is not None and stored.marker > marker:
                # A fetched object is the truth as of now; clocks may disagree by a second.
                marker = stored.marker
        return self.mirror_object(tx, tenant, mode, obj, marker=marker)

    def revalidate(
        self, tenant: str, mode: Mode, kind: str, stripe_id: str
    ) -> MirrorOutcome | None:
        """Fetch one record again and store it with the fetch time as its marker (a tie's follow-up).

        Returns None when the tenant is gone or disconnected.

        Raises:
            StripeAPIError: Stripe could not be asked.
        """
        with self._storage.transaction() as tx:
            tenant_obj = tx.get_tenant(tenant)
        if tenant_obj is None or not _serves(tenant_obj, mode):
            return None
        path = _FETCH_PATHS[kind].format(stripe_id)
        obj = self._stripe.request("GET", path, mode=mode, account=tenant_obj.stripe_account_id)
        outcome = self.store(tenant, mode, obj)
        log.info(
            "revalidated %s %s (tenant=%s mode=%s): %s",
            kind,
            stripe_id,
            tenant,
            mode.value,
            outcome.result.value if outcome.result else "references only",
        )
        return outcome

    def recheck(self, tenant: str, mode: Mode, records: Iterable[tuple[str, str]]) -> None:
        """Attach disputes and refunds to their invoice and customer again, in a new transaction.

        Run after a commit: a concurrent transaction that added the missing
        reference has committed by then (PostgreSQL, several workers).
        """
        records = sorted(records)
        if not records:
            return
        with self._storage.transaction() as tx:
            for kind, stripe_id in records:
                self._attach(tx, _KINDS[kind], tenant, mode, stripe_id)

    def _mirror_subscription(
        self,
        tx: Transaction,
        tenant: str,
        mode: Mode,
        obj: Mapping[str, Any],
        marker: datetime,
        transition: bool,
    ) -> MirrorOutcome:
        n = normalize_subscription(obj, tenant=tenant, mode=mode, marker=marker)
        incoming = n.record
        # Most objects are new: insert at once; read and merge only when one is stored.
        fresh = merge_past_due(None, incoming, transition=transition, applied=True)
        assert fresh is not None
        if tx.insert_mirror(fresh):
            products = {i.stripe_product_id for i in fresh.items if i.stripe_product_id}
            tx.set_subscription_products(tenant, mode, fresh.stripe_id, products)
            return MirrorOutcome(
                "subscription",
                incoming.stripe_id,
                MirrorResult.INSERTED,
                n.warnings,
                subscription=fresh,
            )
        stored = tx.get_mirror(Subscription, tenant, mode, incoming.stripe_id)
        result = MirrorResult.STALE
        if stored is None or incoming.marker >= stored.marker:
            record = merge_past_due(stored, incoming, transition=transition, applied=True)
            assert record is not None
            result = tx.mirror(record)
            if result is not MirrorResult.STALE:
                products = {i.stripe_product_id for i in record.items if i.stripe_product_id}
                tx.set_subscription_products(tenant, mode, record.stripe_id, products)
                return MirrorOutcome(
                    "subscription", incoming.stripe_id, result, n.warnings, subscription=record
                )
            stored = tx.get_mirror(Subscription, tenant, mode, incoming.stripe_id)
        # Stale: only the time of a change to past_due is folded in (§4a.9).
        merged = merge_past_due(stored, incoming, transition=transition, applied=False)
        if merged is not None:
            tx.mirror(merged)
        return MirrorOutcome("subscription", incoming.stripe_id, result, n.warnings)

    def _mirror_invoice(
        self,
        tx: Transaction,
        tenant: str,
        mode: Mode,
        obj: Mapping[str, Any],
        marker: datetime,
        failed_at: datetime | None,
        deleted: bool,
    ) -> MirrorOutcome:
        n = normalize_invoice(obj, tenant=tenant, mode=mode, marker=marker)
        incoming = attrs.evolve(n.record, status="deleted") if deleted else n.record
        recheck = self._add_references(tx, n.references)
        if tx.insert_mirror(merge_invoice(None, incoming, failed_at)):
            # Disputes and refunds that reached this invoice before it was
            # stored now learn their customer.
            recheck |= self._records_paying(tx, tenant, mode, [incoming.stripe_id])
            return MirrorOutcome(
                "invoice", incoming.stripe_id, MirrorResult.INSERTED, n.warnings, recheck
            )
        stored = tx.get_mirror(Invoice, tenant, mode, incoming.stripe_id)
        if stored is not None and incoming.marker < stored.marker:
            # Stale: only the earliest failure is folded in (a minimum, §4a.9).
            merged = merge_invoice(stored, stored, failed_at)
            if merged != stored:
                tx.mirror(merged)
            return MirrorOutcome(
                "invoice", incoming.stripe_id, MirrorResult.STALE, n.warnings, recheck
            )
        result = tx.mirror(merge_invoice(stored, incoming, failed_at))
        if stored is None or stored.stripe_customer_id != incoming.stripe_customer_id:
            # Disputes and refunds that reached this invoice before it was stored
            # now learn their customer.
            recheck |= self._records_paying(tx, tenant, mode, [incoming.stripe_id])
        return MirrorOutcome("invoice", incoming.stripe_id, result, n.warnings, recheck)

    def _mirror_charge(
        self, tx: Transaction, tenant: str, mode: Mode, obj: Mapping[str, Any], marker: datetime
    ) -> MirrorOutcome:
        n = normalize_charge(obj, tenant=tenant, mode=mode, marker=marker)
        recheck = self._add_references(tx, n.references)
        ties: set[tuple[str, str]] = set()
        for refund in n.record.refunds:
            outcome = self._mirror_payment_record(tx, refund, (), (), "refund")
            recheck |= outcome.recheck
            if outcome.result is MirrorResult.TIE:
                ties.add(("refund", refund.stripe_id))
        return MirrorOutcome(
            "charge", n.record.stripe_id, None, n.warnings, recheck, frozenset(ties)
        )

    def _mirror_payment_record(
        self,
        tx: Transaction,
        record: D,
        references: Sequence[StripeReference],
        warnings: tuple[str, ...],
        kind: str,
    ) -> MirrorOutcome:
        recheck = self._add_references(tx, references)
        invoice_id, customer_id = _resolve(tx, record)
        attached = attrs.evolve(
            record,
            invoice_id=record.invoice_id or invoice_id,
            stripe_customer_id=record.stripe_customer_id or customer_id,
        )
        if tx.insert_mirror(attached):
            result = MirrorResult.INSERTED
            record = attached
        else:
            stored = tx.get_mirror(type(record), record.tenant, record.mode, record.stripe_id)
            if stored is not None:
                # Attachments are facts: once known they are kept, whatever the order.
                invoice_id = invoice_id or stored.invoice_id
                customer_id = customer_id or stored.stripe_customer_id
            record = attrs.evolve(
                record,
                invoice_id=record.invoice_id or invoice_id,
                stripe_customer_id=record.stripe_customer_id or customer_id,
            )
            result = tx.mirror(record)
        if result is MirrorResult.STALE:
            self._attach(tx, type(record), record.tenant, record.mode, record.stripe_id)
        if record.invoice_id is None or record.stripe_customer_id is None:
            recheck |= {(kind, record.stripe_id)}
        return MirrorOutcome(kind, record.stripe_id, result, warnings, recheck)

    def _add_references(
        self, tx: Transaction, references: Iterable[StripeReference]
    ) -> frozenset[tuple[str, str]]:
        """Store new references; attach the disputes and refunds they complete. Returns rechecks."""
        changed: set[str] = set()
        tenant_mode: tuple[str, Mode] | None = None
        for ref in references:
            if tx.add_reference(ref) and ref.relation in (Relation.PAYS, Relation.SAME_PAYMENT):
                changed.update((ref.source_id, ref.target_id))
                tenant_mode = (ref.tenant, ref.mode)
        if tenant_mode is None:
            return frozenset()
        tenant, mode = tenant_mode
        records = self._records_on_payments(tx, tenant, mode, changed)
        for kind, stripe_id in sorted(records):
            self._attach(tx, _KINDS[kind], tenant, mode, stripe_id)
        return frozenset(records)

    def _records_paying(
        self, tx: Transaction, tenant: str, mode: Mode, invoice_ids: Iterable[str]
    ) -> frozenset[tuple[str, str]]:
        payments = {
            ref.source_id
            for invoice in invoice_ids
            for ref in tx.references_to(tenant, mode, invoice)
            if ref.relation is Relation.PAYS
        }
        records = self._records_on_payments(tx, tenant, mode, payments)
        for kind, stripe_id in sorted(records):
            self._attach(tx, _KINDS[kind], tenant, mode, stripe_id)
        return frozenset(records)

    def _records_on_payments(
        self, tx: Transaction, tenant: str, mode: Mode, payment_ids: Iterable[str]
    ) -> set[tuple[str, str]]:
        """The disputes and refunds naming any of these payments or their other halves."""
        payments = set(_with_aliases(tx, tenant, mode, payment_ids))
        found: set[tuple[str, str]] = set()
        for payment in payments:
            for ref in tx.references_to(tenant, mode, payment):
                if ref.relation is Relation.DISPUTES:
                    found.add(("dispute", ref.source_id))
                elif ref.relation is Relation.REFUNDS:
                    found.add(("refund", ref.source_id))
        return found

    def _attach(
        self, tx: Transaction, kind: type[D], tenant: str, mode: Mode, stripe_id: str
    ) -> None:
        """Fill a stored dispute's or refund's invoice and customer from the references."""
        stored = tx.get_mirror(kind, tenant, mode, stripe_id)
        if stored is None:
            return
        invoice_id, customer_id = _resolve(tx, stored)
        new_invoice = stored.invoice_id or invoice_id
        new_customer = stored.stripe_customer_id or customer_id
        if (new_invoice, new_customer) != (stored.invoice_id, stored.stripe_customer_id):
            # Same marker: this completes the record, it does not make it newer.
            tx.mirror(attrs.evolve(stored, invoice_id=new_invoice, stripe_customer_id=new_customer))

    # -- webhook handlers ----------------------------------------------------------------
    def on_subscription_event(self, ctx: EventContext) -> HandlerResult | None:
        """``customer.subscription.*``: mirror the subscription with all its items."""
        previous = ctx.event["data"].get("previous_attributes")
        transition = (
            isinstance(previous, _MAPPINGS)
            and "status" in previous
            and previous.get("status") != "past_due"
            and ctx.object.get("status") == "past_due"
        )
        return self._handle(ctx, transition_to_past_due=transition)

    def on_invoice_event(self, ctx: EventContext) -> HandlerResult | None:
        """``invoice.*`` status changes: mirror the invoice (status, amounts, attempts)."""
        return self._handle(ctx)

    def on_invoice_payment_failed(self, ctx: EventContext) -> HandlerResult | None:
        """``invoice.payment_failed`` / ``payment_action_required``: the failure starts the grace."""
        return self._handle(ctx, failed_at=ctx.created)

    def on_invoice_deleted(self, ctx: EventContext) -> HandlerResult | None:
        """``invoice.deleted``: a draft invoice was deleted; kept with status ``deleted``."""
        return self._handle(ctx, deleted=True)

    def on_payment_event(self, ctx: EventContext) -> HandlerResult | None:
        """``invoice_payment.paid``, ``charge.succeeded``, ``charge.refunded``: which payment paid what."""
        return self._handle(ctx)

    def on_dispute_event(self, ctx: EventContext) -> HandlerResult | None:
        """``charge.dispute.*``: mirror the dispute and attach it to its subscription."""
        return self._handle(ctx)

    def on_refund_event(self, ctx: EventContext) -> HandlerResult | None:
        """``refund.*`` and ``charge.refund.updated``: mirror the refund."""
        return self._handle(ctx)

    def _handle(
        self,
        ctx: EventContext,
        *,
        transition_to_past_due: bool = False,
        failed_at: datetime | None = None,
        deleted: bool = False,
    ) -> HandlerResult | None:
        event_id = ctx.event.get("id")
        tenant, mode = ctx.tenant.id, ctx.mode
        try:
            outcome = self.mirror_object(
                ctx.tx,
                tenant,
                mode,
                ctx.object,
                marker=ctx.created,
                transition_to_past_due=transition_to_past_due,
                failed_at=failed_at,
                deleted=deleted,
            )
        except StripeObjectError as exc:
            log.warning("event %s (%s) ignored: %s", event_id, ctx.type, exc)
            return HandlerResult(EventOutcome.IGNORED, str(exc))
        notes = list(outcome.warnings)
        for warning in outcome.warnings:
            log.warning("event %s (%s): %s", event_id, ctx.type, warning)
        if outcome.recheck:
            ctx.after_commit(lambda: self.recheck(tenant, mode, outcome.recheck))
        if outcome.result is MirrorResult.STALE:
            return HandlerResult(
                EventOutcome.STALE,
                f"{outcome.kind} {outcome.stripe_id}: a newer state is already stored",
            )
        ties = set(outcome.ties)
        if outcome.result is MirrorResult.TIE:
            ties.add((outcome.kind, outcome.stripe_id))
        for kind, stripe_id in sorted(ties):
            ctx.after_commit(
                functools.partial(self._revalidate_quietly, tenant, mode, kind, stripe_id)
            )
            notes.append(f"same-second update of {kind} {stripe_id}: revalidating")
        notes += self._notes(ctx, outcome)
        return HandlerResult(EventOutcome.APPLIED, "; ".join(notes)) if notes else None

    def _revalidate_quietly(self, tenant: str, mode: Mode, kind: str, stripe_id: str) -> None:
        try:
            self.revalidate(tenant, mode, kind, stripe_id)
        except Exception:
            # The tied event stays applied; the next event of the object, or a
            # backfill, corrects it if the other tied event was the newer one.
            log.warning(
                "could not revalidate %s %s (tenant=%s mode=%s); the tied event stays applied",
                kind,
                stripe_id,
                tenant,
                mode.value,
                exc_info=True,
            )

    def _notes(self, ctx: EventContext, outcome: MirrorOutcome) -> list[str]:
        """Clear log lines for records that grant nothing yet: no local customer, no mapping."""
        if outcome.kind != "subscription" or outcome.result is None:
            return []
        tx, tenant, mode = ctx.tx, ctx.tenant.id, ctx.mode
        sub = outcome.subscription or tx.get_mirror(Subscription, tenant, mode, outcome.stripe_id)
        if sub is None:
            return []
        notes: list[str] = []
        if tx.customer_by_link(tenant, mode, sub.stripe_customer_id) is None:
            notes.append(
                f"no local customer is linked to {sub.stripe_customer_id} yet; "
                f"{sub.stripe_id} is kept under it"
            )
        for item in sub.items:
            if item.stripe_product_id is not None and not tx.products_by_stripe_product(
                tenant, mode, item.stripe_product_id
            ):
                notes.append(f"{item.stripe_product_id} is mapped to no local product")
        for note in notes:
            log.info("event %s (%s): %s", ctx.event.get("id"), ctx.type, note)
        return notes


# -- helpers ---------------------------------------------------------------------------


def _serves(tenant: Tenant, mode: Mode) -> bool:
    return tenant.connected and mode in tenant.modes


def _raise_missing(tx: Transaction, tenant: str, customer_id: str, product_id: str) -> NoReturn:
    """Raise the error for the first of the tenant, customer and product that is missing."""
    find_customer(tx, tenant, customer_id)
    find_product(tx, tenant, product_id)
    raise AssertionError("_raise_missing found everything")  # pragma: no cover


def _all_products(tx: Transaction, tenant: str) -> list[Product]:
    products: list[Product] = []
    after: str | None = None
    while True:
        page = tx.list_products(tenant, after=after, limit=_PAGE)
        products.extend(page)
        if len(page) < _PAGE:
            return products
        after = page[-1].id


def _customers_on(tx: Transaction, tenant: str, mode: Mode, stripe_product: str) -> list[Customer]:
    """The linked local customers with a subscription that carries ``stripe_product``."""
    stripe_customers: set[str] = set()
    for subscription_id in tx.subscriptions_for_stripe_product(tenant, mode, stripe_product):
        sub = tx.get_mirror(Subscription, tenant, mode, subscription_id)
        if sub is not None:
            stripe_customers.add(sub.stripe_customer_id)
    customers = []
    for stripe_customer in sorted(stripe_customers):
        customer = tx.customer_by_link(tenant, mode, stripe_customer)
        if customer is not None:
            customers.append(customer)
    return customers


def _with_aliases(
    tx: Transaction, tenant: str, mode: Mode, payment_ids: Iterable[str]
) -> list[str]:
    """The payment ids and the other half of each (a charge's payment intent, or back)."""
    found = dict.fromkeys(p for p in payment_ids if p)
    for payment in list(found):
        for ref in tx.references_from(tenant, mode, payment):
            if ref.relation is Relation.SAME_PAYMENT:
                found.setdefault(ref.target_id)
    return list(found)


def _resolve(tx: Transaction, record: Dispute | Refund) -> tuple[str | None, str | None]:
    """The invoice a dispute's or refund's payment paid, and that invoice's customer."""
    tenant, mode = record.tenant, record.mode
    payments = [p for p in (record.charge_id, record.payment_intent_id) if p]
    invoices = sorted(
        ref.target_id
        for payment in _with_aliases(tx, tenant, mode, payments)
        for ref in tx.references_from(tenant, mode, payment)
        if ref.relation is Relation.PAYS
    )
    if not invoices:
        return None, None
    invoice = tx.get_mirror(Invoice, tenant, mode, invoices[0])
    return invoices[0], None if invoice is None else invoice.stripe_customer_id


def _subscription_of(tx: Transaction, record: Dispute | Refund) -> str | None:
    if record.invoice_id is None:
        return None
    invoice = tx.get_mirror(Invoice, record.tenant, record.mode, record.invoice_id)
    return None if invoice is None else invoice.subscription_id


def _dispute_marks(
    tx: Transaction, tenant: str, mode: Mode, customer: str
) -> tuple[dict[str, str], dict[str, str]]:
    """Subscription id → a lost dispute, and → an open dispute, under this Stripe customer."""
    lost: dict[str, str] = {}
    open_: dict[str, str] = {}
    for dispute in tx.mirrors_for_customer(Dispute, tenant, mode, customer):
        if dispute.status == LOST_DISPUTE_STATUS:
            target = lost
        elif dispute.status in OPEN_DISPUTE_STATUSES:
            target = open_
        else:
            continue  # won, warning_* inquiries and the like change nothing
        subscription = _subscription_of(tx, dispute)
        if subscription is not None:
            target.setdefault(subscription, dispute.stripe_id)
    return lost, open_


def _refund_marks(tx: Transaction, tenant: str, mode: Mode, customer: str) -> dict[str, str]:
    """Subscription id → one of its invoices refunded in full, under this Stripe customer."""
    by_invoice: dict[str, list[Refund]] = defaultdict(list)
    for refund in tx.mirrors_for_customer(Refund, tenant, mode, customer):
        if refund.invoice_id is not None:
            by_invoice[refund.invoice_id].append(refund)
    marks: dict[str, str] = {}
    for invoice_id in sorted(by_invoice):
        invoice = tx.get_mirror(Invoice, tenant, mode, invoice_id)
        if invoice is None or invoice.subscription_id is None:
            continue
        if is_full_refund(refunded_amount(by_invoice[invoice_id]), invoice.amount_paid):
            marks.setdefault(invoice.subscription_id, invoice_id)
    return marks


def _latest_unpaid_invoice(tx: Transaction, sub: Subscription) -> Invoice | None:
    """The subscription's latest unpaid invoice, when it is mirrored (§4a.9).

    That is its ``latest_invoice`` when unpaid. When that invoice is not
    mirrored yet, neither is its failed payment: None, so the grace counts
    from the change to past_due. An older unpaid invoice (say, one marked
    uncollectible months ago) never stands in for it. Only when the latest
    invoice is the next period's draft, or the subscription names none (old
    API versions), are the customer's invoices searched: an indexed lookup,
    and only for past_due subscriptions.
    """
    if sub.latest_invoice_id is not None:
        latest = tx.get_mirror(Invoice, sub.tenant, sub.mode, sub.latest_invoice_id)
        if latest is None:
            return None
        if latest.status in UNPAID_INVOICE_STATUSES:
            return latest
        if latest.status not in _NOT_FINALIZED:
            return None  # paid or void: the past_due status is about to change
    unpaid = [
        i
        for i in tx.mirrors_for_customer(Invoice, sub.tenant, sub.mode, sub.stripe_customer_id)
        if i.subscription_id == sub.stripe_id and i.status in UNPAID_INVOICE_STATUSES
    ]
    if not unpaid:
        return None
    return max(unpaid, key=_invoice_age)


def _invoice_age(invoice: Invoice) -> tuple[datetime, datetime, str]:
    floor = datetime.min.replace(tzinfo=invoice.marker.tzinfo)
    return (invoice.created or floor, invoice.first_failed_at or floor, invoice.stripe_id)
