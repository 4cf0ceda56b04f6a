"""The domain's values: frozen attrs classes, no I/O.

Times are timezone-aware UTC datetimes. Money is an integer in minor units
next to a lowercase currency code. Every Stripe-side record is keyed by
(tenant, mode, Stripe id) and keeps ``marker``: the ``created`` time of the
last event applied to it, or the fetch time when it came from the API (§4a.5).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

import attrs

from .._config import Mode

__all__ = [
    "Tenant",
    "TenantStatus",
    "CustomerLink",
    "Customer",
    "SyncState",
    "Product",
    "SubscriptionItem",
    "Subscription",
    "Invoice",
    "Dispute",
    "Refund",
    "EventOutcome",
    "ProcessedEvent",
    "OutboxState",
    "OutboxEntry",
    "MirrorResult",
    "utc",
    # tenants and customers (issue 3)
    "PendingConnection",
    "InvitationState",
    "Invitation",
    # products, subscriptions and access (issue 4)
    "StripePrice",
    "StripeProduct",
    "Relation",
    "StripeReference",
]


def utc(value: datetime) -> datetime:
    """``value`` as an aware UTC datetime; a naive value is taken to be UTC already."""
    tz = value.tzinfo
    if tz is UTC:
        return value
    if tz is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def _utc_or_none(value: datetime | None) -> datetime | None:
    return None if value is None else utc(value)


def freeze(mapping: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """A read-only copy of ``mapping``, so frozen models stay frozen."""
    if isinstance(mapping, MappingProxyType):
        return mapping
    return MappingProxyType(dict(mapping or {}))


class TenantStatus(enum.Enum):
    """Whether calls may be made for a tenant."""

    CONNECTED = "connected"
    DISCONNECTED = "disconnected"


@attrs.frozen
class Tenant:
    """A business on the host platform that bills through its own Stripe account.

    A *direct* tenant has no ``stripe_account_id``: it uses the platform's own
    account, and platform events without ``account`` are routed to it (§4a.1).
    """

    id: str
    stripe_account_id: str | None
    modes: frozenset[Mode]
    status: TenantStatus = TenantStatus.CONNECTED
    direct: bool = False
    connected_at: datetime | None = attrs.field(default=None, converter=_utc_or_none)
    disconnected_at: datetime | None = attrs.field(default=None, converter=_utc_or_none)

    @property
    def connected(self) -> bool:
        """True while calls may be made for this tenant."""
        return self.status is TenantStatus.CONNECTED


@attrs.frozen
class CustomerLink:
    """Which Stripe customer, in which mode, a local customer is billed through."""

    mode: Mode
    stripe_customer_id: str


class SyncState(enum.Enum):
    """How far local changes to a customer have reached Stripe."""

    LOCAL = "local"  # not linked: nothing is owed to Stripe
    SYNCED = "synced"
    PENDING = "pending"
    FAILED = "failed"


@attrs.frozen
class Customer:
    """A customer of a tenant, created locally and optionally linked to Stripe.

    ``local_changed_at`` is when email, name or metadata last changed here;
    ``stripe_marker`` is the ``created`` time of the last Stripe event applied.
    The newer of the two wins a conflict.
    """

    id: str
    tenant: str
    email: str | None
    name: str | None = None
    metadata: Mapping[str, str] = attrs.field(factory=dict, converter=freeze)
    link: CustomerLink | None = None
    sync_state: SyncState = SyncState.LOCAL
    created_at: datetime = attrs.field(factory=lambda: datetime.now(UTC), converter=utc)
    local_changed_at: datetime | None = attrs.field(default=None, converter=_utc_or_none)
    stripe_marker: datetime | None = attrs.field(default=None, converter=_utc_or_none)


@attrs.frozen
class Product:
    """A product of the host app, mapped to a Stripe test and a Stripe live product."""

    tenant: str
    id: str
    name: str
    stripe_test_product_id: str | None = None
    stripe_live_product_id: str | None = None
    created_at: datetime = attrs.field(factory=lambda: datetime.now(UTC), converter=utc)
    # What the mapped Stripe product and its prices looked like when last seen (issue 4).
    stripe_test: StripeProduct | None = None
    stripe_live: StripeProduct | None = None

    def stripe_product_id(self, mode: Mode) -> str | None:
        """The mapped Stripe product id in ``mode``."""
        return self.stripe_live_product_id if mode is Mode.LIVE else self.stripe_test_product_id

    def stripe_product(self, mode: Mode) -> StripeProduct | None:
        """The mapped Stripe product in ``mode`` as last seen (name, flags, prices), or None."""
        return self.stripe_live if mode is Mode.LIVE else self.stripe_test


@attrs.frozen
class SubscriptionItem:
    """One line of a subscription: a price of a Stripe product, times a quantity."""

    stripe_id: str
    price_id: str | None
    stripe_product_id: str | None
    quantity: int = 1
    current_period_end: datetime | None = attrs.field(default=None, converter=_utc_or_none)
    currency: str | None = None
    unit_amount: int | None = None
    interval: str | None = None
    interval_count: int | None = None


@attrs.frozen
class Subscription:
    """A Stripe subscription, mirrored under its Stripe customer id (§4a.4)."""

    tenant: str
    mode: Mode
    stripe_id: str
    stripe_customer_id: str
    status: str
    items: tuple[SubscriptionItem, ...] = ()
    current_period_end: datetime | None = attrs.field(default=None, converter=_utc_or_none)
    cancel_at_period_end: bool = False
    past_due_since: datetime | None = attrs.field(default=None, converter=_utc_or_none)
    marker: datetime = attrs.field(factory=lambda: datetime.now(UTC), converter=utc)
    latest_invoice_id: str | None = None
    created: datetime | None = attrs.field(default=None, converter=_utc_or_none)
    ended_at: datetime | None = attrs.field(default=None, converter=_utc_or_none)
    # History that ``past_due_since`` is derived from, whatever order events came in:
    # the latest event that changed the status to past_due, the latest time it was
    # seen not past_due, and the first time it was seen past_due after that.
    past_due_changed_at: datetime | None = attrs.field(default=None, converter=_utc_or_none)
    not_past_due_at: datetime | None = attrs.field(default=None, converter=_utc_or_none)
    past_due_seen_at: datetime | None = attrs.field(default=None, converter=_utc_or_none)


@attrs.frozen
class Invoice:
    """A Stripe invoice: status, amounts and the state of its payment attempts."""

    tenant: str
    mode: Mode
    stripe_id: str
    stripe_customer_id: str
    status: str
    currency: str
    amount_due: int = 0
    amount_paid: int = 0
    subscription_id: str | None = None
    charge_id: str | None = None
    attempt_count: int = 0
    next_payment_attempt: datetime | None = attrs.field(default=None, converter=_utc_or_none)
    first_failed_at: datetime | None = attrs.field(default=None, converter=_utc_or_none)
    marker: datetime = attrs.field(factory=lambda: datetime.now(UTC), converter=utc)
    payment_intent_id: str | None = None
    created: datetime | None = attrs.field(default=None, converter=_utc_or_none)
    paid_at: datetime | None = attrs.field(default=None, converter=_utc_or_none)


@attrs.frozen
class Dispute:
    """A dispute (chargeback or inquiry) on a charge."""

    tenant: str
    mode: Mode
    stripe_id: str
    charge_id: str
    status: str
    amount: int
    currency: str
    stripe_customer_id: str | None = None
    invoice_id: str | None = None
    reason: str | None = None
    marker: datetime = attrs.field(factory=lambda: datetime.now(UTC), converter=utc)
    payment_intent_id: str | None = None
    created: datetime | None = attrs.field(default=None, converter=_utc_or_none)


@attrs.frozen
class Refund:
    """A refund of (part of) a charge."""

    tenant: str
    mode: Mode
    stripe_id: str
    charge_id: str | None
    amount: int
    currency: str
    status: str
    stripe_customer_id: str | None = None
    invoice_id: str | None = None
    marker: datetime = attrs.field(factory=lambda: datetime.now(UTC), converter=utc)
    payment_intent_id: str | None = None
    created: datetime | None = attrs.field(default=None, converter=_utc_or_none)


class EventOutcome(enum.Enum):
    """What happened to a verified webhook event (§4a.3)."""

    APPLIED = "applied"
    DUPLICATE = "duplicate"
    IGNORED = "ignored"
    STALE = "stale"
    HELD = "held"
    FAILED = "failed"
    PENDING = "pending"  # inbox mode: stored, not yet processed


@attrs.frozen
class ProcessedEvent:
    """A verified webhook event and its outcome, keyed by the Stripe event id.

    ``payload`` keeps the raw body for events that still have to be applied
    (held or pending) and for replay. ``next_attempt_at`` is when an inbox
    worker may next try a pending or failed event (None: not scheduled).
    ``attempts`` counts the applications tried. ``claims`` counts the inbox
    workers that claimed the event since its last recorded outcome: above 1,
    a worker died applying it (see `WebhookRouter.process_pending`).
    """

    event_id: str
    type: str
    mode: Mode
    created: datetime = attrs.field(converter=utc)
    outcome: EventOutcome
    tenant: str | None = None
    account: str | None = None
    api_version: str | None = None
    reason: str | None = None
    payload: bytes | None = None
    attempts: int = 0
    received_at: datetime = attrs.field(factory=lambda: datetime.now(UTC), converter=utc)
    next_attempt_at: datetime | None = attrs.field(default=None, converter=_utc_or_none)
    claims: int = 0


class OutboxState(enum.Enum):
    """Where an outbox entry stands."""

    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"  # superseded (a newer Stripe change, a deleted customer)


@attrs.frozen
class OutboxEntry:
    """A change owed to Stripe, frozen when it was written (§4a.8).

    ``params`` and ``idempotency_key`` never change after the entry is written:
    retries reuse both, so Stripe sees one operation however often it is sent.
    """

    id: str
    tenant: str
    mode: Mode
    operation: str
    customer_id: str
    params: Mapping[str, Any] = attrs.field(converter=freeze)
    idempotency_key: str
    created_at: datetime = attrs.field(converter=utc)
    state: OutboxState = OutboxState.PENDING
    attempts: int = 0
    next_attempt_at: datetime | None = attrs.field(default=None, converter=_utc_or_none)
    last_error: str | None = None
    stripe_id: str | None = None


class MirrorResult(enum.Enum):
    """What an ordered upsert of a Stripe record did (§4a.5)."""

    INSERTED = "inserted"
    APPLIED = "applied"
    TIE = "tie"  # same-second marker: applied, and must be revalidated
    STALE = "stale"  # older than what is stored: skipped


# -- tenants and customers (issue 3) ------------------------------------------------


@attrs.frozen
class PendingConnection:
    """A Connect onboarding that has started and not finished.

    ``kind`` is ``"oauth"`` (``key`` is derived from the single-use ``state``
    and ``expires_at`` is set) or ``"account_link"`` (``key`` names the tenant;
    ``stripe_account_id`` is the account being onboarded, once created).
    ``idempotency_key`` is the key of the request that creates the account.
    """

    key: str
    tenant: str
    mode: Mode
    kind: str
    created_at: datetime = attrs.field(converter=utc)
    expires_at: datetime | None = attrs.field(default=None, converter=_utc_or_none)
    stripe_account_id: str | None = None
    redirect_uri: str | None = None
    idempotency_key: str | None = None


class InvitationState(enum.Enum):
    """Where an invitation email stands (§4a.7)."""

    PENDING = "pending"  # to be sent, at ``next_attempt_at`` when set
    SENT = "sent"
    NO_EMAIL = "no_email"  # the Stripe customer has no email address: nothing to send
    FAILED = "failed"  # refused for good, or out of attempts: see ``last_error``


@attrs.frozen
class Invitation:
    """The invitation owed to a customer created in Stripe: one per Stripe customer.

    Keyed by (tenant, mode, Stripe customer id). ``message_id`` is derived
    from the tenant and the local customer, so a resend after a crash carries
    the same ``Message-ID`` and can be deduplicated downstream.
    """

    tenant: str
    mode: Mode
    stripe_customer_id: str
    customer_id: str
    email: str | None
    message_id: str
    created_at: datetime = attrs.field(converter=utc)
    state: InvitationState = InvitationState.PENDING
    attempts: int = 0
    next_attempt_at: datetime | None = attrs.field(default=None, converter=_utc_or_none)
    last_error: str | None = None
    sent_at: datetime | None = attrs.field(default=None, converter=_utc_or_none)


# -- products, subscriptions and access (issue 4) -------------------------------------


@attrs.frozen
class StripePrice:
    """A price (or a legacy plan) of a mapped Stripe product, as last seen.

    ``active`` false means archived in Stripe; ``deleted`` means deleted there.
    Subscriptions already on the price keep their access either way.
    """

    stripe_id: str
    kind: str = "price"  # "price", or "plan" for the legacy object
    currency: str | None = None
    unit_amount: int | None = None
    interval: str | None = None
    interval_count: int | None = None
    nickname: str | None = None
    active: bool = True
    deleted: bool = False
    marker: datetime | None = attrs.field(default=None, converter=_utc_or_none)


@attrs.frozen
class StripeProduct:
    """A Stripe product that a local product maps to, with its prices, as last seen.

    ``marker`` orders product events; each price has a marker of its own.
    """

    stripe_id: str
    name: str | None = None
    active: bool = True
    deleted: bool = False
    prices: tuple[StripePrice, ...] = ()
    marker: datetime | None = attrs.field(default=None, converter=_utc_or_none)

    @property
    def flagged(self) -> bool:
        """True when the product or one of its prices is archived or deleted in Stripe."""
        return (
            self.deleted or not self.active or any(p.deleted or not p.active for p in self.prices)
        )


class Relation(enum.Enum):
    """How one Stripe object names another, in a `StripeReference`."""

    PAYS = "pays"  # a charge or payment intent paid an invoice
    DISPUTES = "disputes"  # a dispute is about a charge or payment intent
    REFUNDS = "refunds"  # a refund gives back (part of) a charge or payment intent
    SAME_PAYMENT = "same_payment"  # a charge and its payment intent


@attrs.frozen
class StripeReference:
    """A fact that one Stripe object names another, such as "ch_1 pays in_1" (§4a.10).

    References never change in Stripe, so they are stored once and never
    updated: whatever order the events arrive in, the same set results. They
    let a dispute reach its subscription through its charge and invoice.
    """

    tenant: str
    mode: Mode
    source_id: str
    relation: Relation
    target_id: str
