"""The ports: what services need from the outside world, as small Protocols.

Services depend on these and nothing else; adapters implement them. A host app
can bring its own `Storage` and check it with the contract kit in
``rational_billing.testing``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from datetime import datetime, timedelta
from typing import Any, Protocol, TypeAlias, TypeVar

import attrs

from ._config import Mode
from .domain.models import (
    Customer,
    Dispute,
    EventOutcome,
    Invitation,
    Invoice,
    MirrorResult,
    OutboxEntry,
    OutboxState,
    PendingConnection,
    ProcessedEvent,
    Product,
    Refund,
    StripeReference,
    Subscription,
    Tenant,
)

__all__ = [
    "Clock",
    "Email",
    "Mailer",
    "MirrorRecord",
    "MIRROR_KINDS",
    "Storage",
    "StripeAPI",
    "Transaction",
]

#: Returns the current time as an aware UTC datetime. Injected so that grace
#: periods and retries can be tested without waiting.
Clock = Callable[[], datetime]

#: The Stripe-side records mirrored under (tenant, mode, Stripe id).
MirrorRecord: TypeAlias = Subscription | Invoice | Dispute | Refund
MIRROR_KINDS: tuple[type[MirrorRecord], ...] = (Subscription, Invoice, Dispute, Refund)

R = TypeVar("R", Subscription, Invoice, Dispute, Refund)


class Transaction(Protocol):
    """One unit of work against storage: every read and write goes through it.

    Everything written inside a transaction becomes visible atomically when the
    `Storage.transaction` block exits normally, and nothing does if it raises.
    Lookups named here are indexed in every adapter: none of them may scan a
    whole table.
    """

    # -- tenants -------------------------------------------------------------
    def get_tenant(self, tenant_id: str) -> Tenant | None:
        """The tenant with that id, or None."""
        ...

    def tenant_by_account(self, stripe_account_id: str) -> Tenant | None:
        """The tenant connected through ``acct_…``, or None."""
        ...

    def direct_tenant(self) -> Tenant | None:
        """The one tenant that uses the platform's own account, or None."""
        ...

    def put_tenant(self, tenant: Tenant) -> None:
        """Insert or replace the tenant with ``tenant.id``."""
        ...

    # -- customers -----------------------------------------------------------
    def get_customer(self, tenant: str, customer_id: str) -> Customer | None:
        """The customer, or None."""
        ...

    def lock_customer(self, tenant: str, customer_id: str) -> Customer | None:
        """The customer, or None; locked until this transaction ends.

        A concurrent transaction locking the same customer waits, then sees what
        this one committed, so a read-modify-write of a customer loses nothing
        (PostgreSQL: ``SELECT ... FOR UPDATE``).
        """
        ...

    def customer_by_link(self, tenant: str, mode: Mode, stripe_customer_id: str) -> Customer | None:
        """The local customer linked to that Stripe customer, or None."""
        ...

    def insert_customer(self, customer: Customer) -> bool:
        """Insert if no customer of that tenant has that id; True when inserted."""
        ...

    def put_customer(self, customer: Customer) -> None:
        """Insert or replace the customer keyed by (tenant, id)."""
        ...

    def delete_customer(self, tenant: str, customer_id: str) -> bool:
        """Remove the customer; True when there was one."""
        ...

    def list_customers(self, tenant: str, *, after: str | None, limit: int) -> Sequence[Customer]:
        """Up to ``limit`` customers of the tenant with id > ``after``, ordered by id."""
        ...

    # -- products ------------------------------------------------------------
    def get_product(self, tenant: str, product_id: str) -> Product | None:
        """The product, or None."""
        ...

    def put_product(self, product: Product) -> None:
        """Insert or replace the product keyed by (tenant, id)."""
        ...

    def products_by_stripe_product(
        self, tenant: str, mode: Mode, stripe_product_id: str
    ) -> Sequence[Product]:
        """The local products mapped to that Stripe product in that mode."""
        ...

    # -- webhook events ------------------------------------------------------
    def record_event(self, event: ProcessedEvent) -> bool:
        """Insert the event if its id is new; True when inserted, False for a duplicate.

        Atomic: of two concurrent transactions recording the same id, exactly
        one sees True once both commit.
        """
        ...

    def get_event(self, event_id: str) -> ProcessedEvent | None:
        """The stored event, or None."""
        ...

    def update_event(self, event: ProcessedEvent) -> None:
        """Replace the stored event with the same id (its outcome changed).

        The body is written once: a stored ``payload`` is kept (the body of an
        event id never changes), and a missing one is filled in from ``event``.
        """
        ...

    def update_events(self, events: Sequence[ProcessedEvent]) -> None:
        """`update_event` for each of ``events``, which a storage may send together.

        Raises `StorageError` if any of them is not stored.
        """
        ...

    def events_with_outcome(
        self, outcome: EventOutcome, *, account: str | None = None, limit: int = 100
    ) -> Sequence[ProcessedEvent]:
        """Stored events with that outcome, oldest first, optionally for one account."""
        ...

    # -- webhook inbox (workers and replay) ----------------------------------
    def lock_event(self, event_id: str) -> ProcessedEvent | None:
        """The stored event, or None; locked until this transaction ends.

        A concurrent transaction locking the same event waits, then sees what
        this one committed: so two deliveries of a stored pending or failed
        event never both apply it.
        """
        ...

    def lock_events(self, event_ids: Sequence[str]) -> Sequence[ProcessedEvent]:
        """`lock_event` for each of ``event_ids``, in one go; ids not stored are left out.

        The events are locked in event id order, so that two callers locking
        overlapping sets wait for each other rather than deadlock.
        """
        ...

    def claim_events(
        self, now: datetime, *, limit: int, lease: timedelta
    ) -> Sequence[ProcessedEvent]:
        """Lease up to ``limit`` events that are due for a worker, in the order they fell due.

        Due: ``pending`` events (at ``next_attempt_at``, or at once when it is
        None) and ``failed`` events whose ``next_attempt_at`` has come. A
        claimed event is not claimed again before ``now + lease`` unless it is
        written again (`update_event` ends the lease). Concurrent claims never
        return the same event (PostgreSQL: ``FOR UPDATE SKIP LOCKED``). Each
        claim is counted: the claimed events are stored, and returned, with
        ``claims`` one higher, so that an event whose worker died applying it
        is known when it is claimed again.
        """
        ...

    def list_events(
        self,
        *,
        since: datetime | None = None,
        types: Collection[str] | None = None,
        after: str | None = None,
        limit: int = 100,
    ) -> Sequence[ProcessedEvent]:
        """Stored events in an order the storage keeps, for replay: up to ``limit``.

        Only those received at or after ``since``, of one of ``types``, and
        after the event ``after`` (the id of the last event of the previous
        page) in that order. The order is stable, so paging visits every
        stored event once: events keep their place when their outcome
        changes, and it is the order they were first stored
        (`InMemoryStorage`, SQLite) or received (PostgreSQL), which differ
        only for events stored out of received order.

        Raises:
            InvalidArgument: ``after`` names no stored event.
        """
        ...

    # -- mirrored Stripe records ---------------------------------------------
    def mirror(self, record: MirrorRecord) -> MirrorResult:
        """Upsert a Stripe record keyed by (kind, tenant, mode, Stripe id), guarded by marker.

        A record older than the stored one is skipped (``STALE``); one with the
        same marker is written and reported as ``TIE``.
        """
        ...

    def insert_mirror(self, record: MirrorRecord) -> bool:
        """Store ``record`` if nothing is stored under its key; True when it was inserted.

        A stored record is left as it is, whatever its marker. Handlers try
        this first for an object they have not seen, and read, merge and
        `mirror` only when a record was there.
        """
        ...

    def get_mirror(self, kind: type[R], tenant: str, mode: Mode, stripe_id: str) -> R | None:
        """The stored record, or None."""
        ...

    def mirrors_for_customer(
        self, kind: type[R], tenant: str, mode: Mode, stripe_customer_id: str
    ) -> Sequence[R]:
        """Every record of that kind under that Stripe customer (indexed lookup)."""
        ...

    # -- outbox --------------------------------------------------------------
    def put_outbox(self, entry: OutboxEntry) -> None:
        """Insert or replace the outbox entry with ``entry.id``."""
        ...

    def get_outbox(self, entry_id: str) -> OutboxEntry | None:
        """The entry, or None."""
        ...

    def due_outbox(self, now: datetime, *, limit: int) -> Sequence[OutboxEntry]:
        """Pending entries whose next attempt is due at ``now``, oldest first."""
        ...

    def outbox_with_state(self, state: OutboxState, *, limit: int = 100) -> Sequence[OutboxEntry]:
        """Entries in that state, oldest first (for example the failed list)."""
        ...

    def outbox_for_customer(self, tenant: str, customer_id: str) -> Sequence[OutboxEntry]:
        """The customer's pending entries, oldest first (indexed lookup)."""
        ...

    # -- Connect onboarding in progress (issue 3) ------------------------------
    def put_pending_connection(self, pending: PendingConnection) -> None:
        """Insert or replace the pending connection with ``pending.key``."""
        ...

    def get_pending_connection(self, key: str) -> PendingConnection | None:
        """The pending connection, or None."""
        ...

    def take_pending_connection(self, key: str) -> PendingConnection | None:
        """Remove the pending connection and return it; None when there is none.

        Atomic: of two concurrent transactions taking the same key, exactly one
        gets it once both commit (a single-use OAuth ``state``).
        """
        ...

    # -- invitations (issue 3) --------------------------------------------------
    def insert_invitation(self, invitation: Invitation) -> bool:
        """Insert if absent, keyed by (tenant, mode, Stripe customer id); True when inserted.

        Atomic: of two concurrent transactions inserting the same key, exactly
        one sees True once both commit.
        """
        ...

    def get_invitation(self, tenant: str, mode: Mode, stripe_customer_id: str) -> Invitation | None:
        """The invitation, or None."""
        ...

    def put_invitation(self, invitation: Invitation) -> None:
        """Insert or replace the invitation with that key."""
        ...

    def claim_invitation(
        self, tenant: str, mode: Mode, stripe_customer_id: str, *, now: datetime, until: datetime
    ) -> Invitation | None:
        """Lease a pending invitation that is due at ``now`` until ``until``; None otherwise.

        The returned invitation has ``next_attempt_at=until``, so nobody else
        claims it meanwhile. Of two concurrent claims, at most one succeeds.
        """
        ...

    def due_invitations(self, now: datetime, *, limit: int) -> Sequence[Invitation]:
        """Pending invitations due at ``now``, oldest first (indexed lookup)."""
        ...

    # -- products, subscriptions and access (issue 4) ----------------------------
    def list_products(self, tenant: str, *, after: str | None, limit: int) -> Sequence[Product]:
        """Up to ``limit`` products of the tenant with id > ``after``, ordered by id."""
        ...

    def add_reference(self, reference: StripeReference) -> bool:
        """Store the reference unless it is stored already; True when it was new.

        References are facts that never change, so they are only ever added.
        """
        ...

    def references_from(self, tenant: str, mode: Mode, source_id: str) -> Sequence[StripeReference]:
        """The references that ``source_id`` states, ordered by (relation, target) (indexed)."""
        ...

    def references_to(self, tenant: str, mode: Mode, target_id: str) -> Sequence[StripeReference]:
        """The references that name ``target_id``, ordered by (relation, source) (indexed)."""
        ...

    def set_subscription_products(
        self, tenant: str, mode: Mode, subscription_id: str, stripe_product_ids: Collection[str]
    ) -> None:
        """Index the subscription under exactly these Stripe products (replacing the old set)."""
        ...

    def subscriptions_for_stripe_product(
        self, tenant: str, mode: Mode, stripe_product_id: str
    ) -> Sequence[str]:
        """Ids of the subscriptions indexed under that Stripe product, ordered (indexed)."""
        ...


class Storage(Protocol):
    """Where ``rational_billing`` keeps its state.

    Example::

        with storage.transaction() as tx:
            if tx.record_event(event):
                tx.mirror(subscription)
    """

    def transaction(self) -> AbstractContextManager[Transaction]:
        """A transaction scope: commit on normal exit, roll back when the block raises.

        Raises:
            StorageError: the backend failed; nothing was committed.
        """
        ...

    def close(self) -> None:
        """Release connections and files. The storage is unusable afterwards."""
        ...


@attrs.frozen
class Email:
    """One email to send. ``message_id`` is stable so that resends can be deduplicated."""

    to: str
    subject: str
    text: str
    message_id: str
    html: str | None = None
    sender: str | None = None


class Mailer(Protocol):
    """Sends email. Raising means "not sent": the caller keeps it and retries later."""

    def send(self, email: Email, *, mode: Mode) -> None:
        """Send ``email``; ``mode`` lets a host route test-mode mail elsewhere."""
        ...


class StripeAPI(Protocol):
    """The Stripe HTTP API as services see it: plain JSON in, plain JSON out.

    Implemented by `rational_billing.adapters.stripe_gateway.StripeGateway`,
    the only module that imports ``stripe``.
    """

    def request(
        self,
        method: str,
        path: str,
        *,
        mode: Mode,
        account: str | None,
        params: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Send one request for a tenant (``account=None``: the platform's own account).

        Mutating methods (POST, DELETE) require ``idempotency_key``; retries,
        rate limiting and error mapping happen inside.

        Raises:
            StripeAPIError: Stripe refused, or could not be reached after retries.
            ConfigError: no keys are configured for ``mode``.
        """
        ...

    def list_all(
        self,
        path: str,
        *,
        mode: Mode,
        account: str | None,
        params: Mapping[str, Any] | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Every object of a list endpoint, fetched lazily 100 at a time."""
        ...
