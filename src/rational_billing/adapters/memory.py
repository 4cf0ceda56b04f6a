"""`InMemoryStorage`: the `Storage` port in process memory, for tests and embedding.

Thread-safe: one re-entrant lock serialises transactions, and an undo log
rolls back a transaction whose block raised.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, TypeVar

import attrs

from .._config import Mode
from ..domain.models import (
    Customer,
    EventOutcome,
    Invitation,
    InvitationState,
    MirrorResult,
    OutboxEntry,
    OutboxState,
    PendingConnection,
    ProcessedEvent,
    Product,
    Relation,
    StripeReference,
    Tenant,
)
from ..errors import InvalidArgument, StorageError
from ..ports import MirrorRecord

__all__ = ["InMemoryStorage"]

R = TypeVar("R")
_MISSING: Any = object()


class InMemoryStorage:
    """Keeps everything in dicts, with the same contract as `SQLStorage`.

    Example::

        billing = Billing(config=config, storage=InMemoryStorage(), mailer=RecordingMailer())
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._closed = False
        self._tenants: dict[str, Tenant] = {}
        self._tenant_by_account: dict[str, str] = {}
        self._customers: dict[tuple[str, str], Customer] = {}
        self._customer_by_link: dict[tuple[str, Mode, str], str] = {}
        self._products: dict[tuple[str, str], Product] = {}
        self._products_by_stripe: dict[tuple[str, Mode, str], dict[str, None]] = {}
        self._events: dict[str, ProcessedEvent] = {}
        self._mirrors: dict[tuple[type[Any], str, Mode, str], MirrorRecord] = {}
        # (kind, tenant, mode, Stripe customer) -> Stripe id -> the record, as in _mirrors.
        self._mirrors_by_customer: dict[tuple[type[Any], str, Mode, str], dict[str, Any]] = {}
        self._outbox: dict[str, OutboxEntry] = {}
        # Secondary indexes (key -> ordered set of primary keys), so no lookup scans.
        self._customers_by_tenant: dict[str, dict[str, None]] = {}
        self._events_by_outcome: dict[EventOutcome, dict[str, None]] = {}
        self._outbox_by_state: dict[OutboxState, dict[str, None]] = {}
        self._outbox_by_customer: dict[tuple[str, str], dict[str, None]] = {}
        # Connect onboarding and invitations (issue 3).
        self._pending_connections: dict[str, PendingConnection] = {}
        self._invitations: dict[tuple[str, Mode, str], Invitation] = {}
        self._invitations_pending: dict[tuple[str, Mode, str], None] = {}
        # Inbox leases: event id -> until when a worker holds it (claim_events).
        self._event_leases: dict[str, datetime] = {}
        # Products, references and the subscription-product index (issue 4).
        self._products_by_tenant: dict[str, dict[str, None]] = {}
        self._references_from: dict[tuple[str, Mode, str], dict[tuple[Relation, str], None]] = {}
        self._references_to: dict[tuple[str, Mode, str], dict[tuple[Relation, str], None]] = {}
        self._subscription_products: dict[tuple[str, Mode, str], frozenset[str]] = {}
        self._subscriptions_by_product: dict[tuple[str, Mode, str], dict[str, None]] = {}
        self._depth = 0
        self._undo: list[Callable[[], None]] = []
        # Stateless (it only reaches the dicts while the lock is held): one serves every block.
        self._tx = _MemoryTransaction(self)

    def __repr__(self) -> str:
        return f"<InMemoryStorage tenants={len(self._tenants)} customers={len(self._customers)}>"

    def transaction(self) -> _Scope:
        """A transaction: commit on normal exit, roll back if the block raises."""
        return _Scope(self)

    def close(self) -> None:
        """Mark the storage closed; later transactions raise `StorageError`."""
        with self._lock:
            self._closed = True

    # -- undo-logged writes ----------------------------------------------------
    def _set(self, table: dict[Any, Any], key: Any, value: Any) -> None:
        old = table.get(key, _MISSING)
        table[key] = value
        self._undo.append(lambda: _restore(table, key, old))

    def _pop(self, table: dict[Any, Any], key: Any) -> Any:
        old = table.pop(key, _MISSING)
        if old is not _MISSING:
            self._undo.append(lambda: _restore(table, key, old))
        return None if old is _MISSING else old

    def _index_add(self, index: dict[Any, dict[Any, None]], key: Any, member: Any) -> None:
        members = index.get(key)
        if members is None:
            members = {}
            self._set(index, key, members)
        if member not in members:
            self._set(members, member, None)

    def _index_remove(self, index: dict[Any, dict[Any, None]], key: Any, member: Any) -> None:
        members = index.get(key)
        if members is not None and member in members:
            self._pop(members, member)


def _restore(table: dict[Any, Any], key: Any, old: Any) -> None:
    if old is _MISSING:
        table.pop(key, None)
    else:
        table[key] = old


class _Scope:
    """One `InMemoryStorage.transaction` block.

    A plain class rather than a ``@contextmanager`` generator: every
    ``has_access`` opens one, and the generator machinery cost more than the
    lookups themselves (DESIGN.md §5: p50 ≤ 5 µs).
    """

    __slots__ = ("_mark", "_outer", "_s")

    def __init__(self, storage: InMemoryStorage) -> None:
        self._s = storage

    def __enter__(self) -> _MemoryTransaction:
        s = self._s
        s._lock.acquire()
        if s._closed:
            s._lock.release()
            raise StorageError("InMemoryStorage is closed")
        self._outer = s._depth == 0
        self._mark = len(s._undo)
        s._depth += 1
        return s._tx

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        s = self._s
        try:
            if exc_type is not None:
                mark = self._mark
                for undo in reversed(s._undo[mark:]):
                    undo()
                del s._undo[mark:]
        finally:
            s._depth -= 1
            if self._outer:
                s._undo.clear()
            s._lock.release()


class _MemoryTransaction:
    """The `Transaction` port over `InMemoryStorage`'s dicts (the lock is held)."""

    __slots__ = ("_s",)

    def __init__(self, storage: InMemoryStorage) -> None:
        self._s = storage

    # -- tenants -------------------------------------------------------------
    def get_tenant(self, tenant_id: str) -> Tenant | None:
        return self._s._tenants.get(tenant_id)

    def tenant_by_account(self, stripe_account_id: str) -> Tenant | None:
        tenant_id = self._s._tenant_by_account.get(stripe_account_id)
        return None if tenant_id is None else self._s._tenants.get(tenant_id)

    def direct_tenant(self) -> Tenant | None:
        tenant_id = self._s._tenant_by_account.get("")
        return None if tenant_id is None else self._s._tenants.get(tenant_id)

    def put_tenant(self, tenant: Tenant) -> None:
        s = self._s
        old = s._tenants.get(tenant.id)
        if old is not None:
            old_key = "" if old.direct else old.stripe_account_id
            if old_key is not None and s._tenant_by_account.get(old_key) == old.id:
                s._pop(s._tenant_by_account, old_key)
        s._set(s._tenants, tenant.id, tenant)
        key = "" if tenant.direct else tenant.stripe_account_id
        if key is not None:
            s._set(s._tenant_by_account, key, tenant.id)

    # -- customers -----------------------------------------------------------
    def get_customer(self, tenant: str, customer_id: str) -> Customer | None:
        return self._s._customers.get((tenant, customer_id))

    def lock_customer(self, tenant: str, customer_id: str) -> Customer | None:
        # The storage lock already serialises whole transactions.
        return self._s._customers.get((tenant, customer_id))

    def customer_by_link(self, tenant: str, mode: Mode, stripe_customer_id: str) -> Customer | None:
        customer_id = self._s._customer_by_link.get((tenant, mode, stripe_customer_id))
        return None if customer_id is None else self._s._customers.get((tenant, customer_id))

    def insert_customer(self, customer: Customer) -> bool:
        if (customer.tenant, customer.id) in self._s._customers:
            return False
        self.put_customer(customer)
        return True

    def put_customer(self, customer: Customer) -> None:
        s = self._s
        key = (customer.tenant, customer.id)
        old = s._customers.get(key)
        link_key = None
        if customer.link is not None:
            link_key = (customer.tenant, customer.link.mode, customer.link.stripe_customer_id)
            holder = s._customer_by_link.get(link_key)
            if holder is not None and holder != customer.id:
                raise StorageError(
                    f"Stripe customer {customer.link.stripe_customer_id!r} is already linked "
                    f"to customer {holder!r} of tenant {customer.tenant!r}"
                )
        if old is not None and old.link is not None:
            s._pop(s._customer_by_link, (old.tenant, old.link.mode, old.link.stripe_customer_id))
        if link_key is not None:
            s._set(s._customer_by_link, link_key, customer.id)
        s._set(s._customers, key, customer)
        s._index_add(s._customers_by_tenant, customer.tenant, customer.id)

    def delete_customer(self, tenant: str, customer_id: str) -> bool:
        s = self._s
        old = s._pop(s._customers, (tenant, customer_id))
        if old is None:
            return False
        s._index_remove(s._customers_by_tenant, tenant, customer_id)
        if old.link is not None:
            s._pop(s._customer_by_link, (tenant, old.link.mode, old.link.stripe_customer_id))
        return True

    def list_customers(self, tenant: str, *, after: str | None, limit: int) -> Sequence[Customer]:
        members = self._s._customers_by_tenant.get(tenant, {})
        ids = sorted(cid for cid in members if after is None or cid > after)
        return [self._s._customers[(tenant, cid)] for cid in ids[:limit]]

    # -- products ------------------------------------------------------------
    def get_product(self, tenant: str, product_id: str) -> Product | None:
        return self._s._products.get((tenant, product_id))

    def put_product(self, product: Product) -> None:
        s = self._s
        old = s._products.get((product.tenant, product.id))
        for mode in Mode:
            old_sid = None if old is None else old.stripe_product_id(mode)
            if old_sid is not None:
                index = s._products_by_stripe.get((product.tenant, mode, old_sid))
                if index is not None and product.id in index:
                    s._pop(index, product.id)
            new_sid = product.stripe_product_id(mode)
            if new_sid is not None:
                key = (product.tenant, mode, new_sid)
                index = s._products_by_stripe.get(key)
                if index is None:
                    index = {}
                    s._set(s._products_by_stripe, key, index)
                s._set(index, product.id, None)
        s._set(s._products, (product.tenant, product.id), product)
        s._index_add(s._products_by_tenant, product.tenant, product.id)

    def products_by_stripe_product(
        self, tenant: str, mode: Mode, stripe_product_id: str
    ) -> Sequence[Product]:
        ids = self._s._products_by_stripe.get((tenant, mode, stripe_product_id), {})
        return [self._s._products[(tenant, pid)] for pid in ids]

    # -- events --------------------------------------------------------------
    def record_event(self, event: ProcessedEvent) -> bool:
        if event.event_id in self._s._events:
            return False
        self._put_event(event)
        return True

    def _put_event(self, event: ProcessedEvent) -> None:
        s = self._s
        old = s._events.get(event.event_id)
        if old is not None:
            s._index_remove(s._events_by_outcome, old.outcome, old.event_id)
            if event.event_id in s._event_leases:
                s._pop(s._event_leases, event.event_id)  # a write ends the lease
        s._set(s._events, event.event_id, event)
        s._index_add(s._events_by_outcome, event.outcome, event.event_id)

    def get_event(self, event_id: str) -> ProcessedEvent | None:
        return self._s._events.get(event_id)

    def update_event(self, event: ProcessedEvent) -> None:
        old = self._s._events.get(event.event_id)
        if old is None:
            raise StorageError(f"no stored event {event.event_id!r} to update")
        if old.payload is not None and event.payload is not old.payload:
            event = attrs.evolve(event, payload=old.payload)  # the body is written once
        self._put_event(event)

    def update_events(self, events: Sequence[ProcessedEvent]) -> None:
        for event in events:
            self.update_event(event)

    def events_with_outcome(
        self, outcome: EventOutcome, *, account: str | None = None, limit: int = 100
    ) -> Sequence[ProcessedEvent]:
        events = self._s._events
        found = [
            events[eid]
            for eid in self._s._events_by_outcome.get(outcome, {})
            if account is None or events[eid].account == account
        ]
        found.sort(key=lambda e: (e.received_at, e.event_id))
        return found[:limit]

    # -- webhook inbox -------------------------------------------------------
    def lock_event(self, event_id: str) -> ProcessedEvent | None:
        # The storage lock already serialises whole transactions.
        return self._s._events.get(event_id)

    def _due_at(self, event: ProcessedEvent) -> datetime | None:
        due: datetime | None
        if event.outcome is EventOutcome.PENDING:
            due = event.next_attempt_at or event.received_at
        elif event.outcome is EventOutcome.FAILED:
            due = event.next_attempt_at
        else:
            return None
        lease = self._s._event_leases.get(event.event_id)
        return due if due is None or lease is None else max(due, lease)

    def lock_events(self, event_ids: Sequence[str]) -> Sequence[ProcessedEvent]:
        events = self._s._events
        return [events[i] for i in sorted(set(event_ids)) if i in events]

    def claim_events(
        self, now: datetime, *, limit: int, lease: timedelta
    ) -> Sequence[ProcessedEvent]:
        s = self._s
        due: list[tuple[datetime, str]] = []
        for outcome in (EventOutcome.PENDING, EventOutcome.FAILED):
            for event_id in s._events_by_outcome.get(outcome, {}):
                at = self._due_at(s._events[event_id])
                if at is not None and at <= now:
                    due.append((at, event_id))
        due.sort()
        claimed = []
        for _, event_id in due[:limit]:
            event = s._events[event_id]
            event = attrs.evolve(event, claims=event.claims + 1)
            self._put_event(event)
            s._set(s._event_leases, event_id, now + lease)
            claimed.append(event)
        return claimed

    def list_events(
        self,
        *,
        since: datetime | None = None,
        types: Collection[str] | None = None,
        after: str | None = None,
        limit: int = 100,
    ) -> Sequence[ProcessedEvent]:
        events: Iterator[ProcessedEvent] = iter(self._s._events.values())  # in stored order
        if after is not None:
            if after not in self._s._events:
                raise InvalidArgument(
                    f"list_events(after={after!r}): no such stored event to continue after"
                )
            events = itertools.dropwhile(lambda e: e.event_id != after, events)
            next(events)  # the cursor's own event
        wanted = None if types is None else frozenset(types)
        found = (
            e
            for e in events
            if (since is None or e.received_at >= since) and (wanted is None or e.type in wanted)
        )
        return list(itertools.islice(found, limit))

    # -- mirrors -------------------------------------------------------------
    def mirror(self, record: MirrorRecord) -> MirrorResult:
        s = self._s
        kind = type(record)
        key = (kind, record.tenant, record.mode, record.stripe_id)
        old = s._mirrors.get(key)
        if old is None:
            result = MirrorResult.INSERTED
        elif record.marker < old.marker:
            return MirrorResult.STALE
        else:
            result = MirrorResult.TIE if record.marker == old.marker else MirrorResult.APPLIED
        old_customer = None if old is None else old.stripe_customer_id
        if old_customer is not None and old_customer != record.stripe_customer_id:
            index = s._mirrors_by_customer.get((kind, record.tenant, record.mode, old_customer))
            if index is not None and record.stripe_id in index:
                s._pop(index, record.stripe_id)
        s._set(s._mirrors, key, record)
        if record.stripe_customer_id is not None:
            ckey = (kind, record.tenant, record.mode, record.stripe_customer_id)
            index = s._mirrors_by_customer.get(ckey)
            if index is None:
                index = {}
                s._set(s._mirrors_by_customer, ckey, index)
            s._set(index, record.stripe_id, record)
        return result

    def insert_mirror(self, record: MirrorRecord) -> bool:
        if (type(record), record.tenant, record.mode, record.stripe_id) in self._s._mirrors:
            return False
        self.mirror(record)
        return True

    def get_mirror(self, kind: type[R], tenant: str, mode: Mode, stripe_id: str) -> R | None:
        found = self._s._mirrors.get((kind, tenant, mode, stripe_id))
        return found  # type: ignore[return-value]

    def mirrors_for_customer(
        self, kind: type[R], tenant: str, mode: Mode, stripe_customer_id: str
    ) -> Sequence[R]:
        found = self._s._mirrors_by_customer.get((kind, tenant, mode, stripe_customer_id))
        return [] if found is None else list(found.values())

    # -- outbox --------------------------------------------------------------
    def put_outbox(self, entry: OutboxEntry) -> None:
        s = self._s
        old = s._outbox.get(entry.id)
        if old is not None:
            s._index_remove(s._outbox_by_state, old.state, old.id)
            s._index_remove(s._outbox_by_customer, (old.tenant, old.customer_id), old.id)
        s._set(s._outbox, entry.id, entry)
        s._index_add(s._outbox_by_state, entry.state, entry.id)
        if entry.state is OutboxState.PENDING:
            s._index_add(s._outbox_by_customer, (entry.tenant, entry.customer_id), entry.id)

    def get_outbox(self, entry_id: str) -> OutboxEntry | None:
        return self._s._outbox.get(entry_id)

    def due_outbox(self, now: datetime, *, limit: int) -> Sequence[OutboxEntry]:
        pending = self._s._outbox_by_state.get(OutboxState.PENDING, {})
        due = [
            entry
            for entry in map(self._s._outbox.__getitem__, pending)
            if entry.next_attempt_at is None or entry.next_attempt_at <= now
        ]
        due.sort(key=lambda e: (e.created_at, e.id))
        return due[:limit]

    def outbox_with_state(self, state: OutboxState, *, limit: int = 100) -> Sequence[OutboxEntry]:
        found = [self._s._outbox[i] for i in self._s._outbox_by_state.get(state, {})]
        found.sort(key=lambda e: (e.created_at, e.id))
        return found[:limit]

    def outbox_for_customer(self, tenant: str, customer_id: str) -> Sequence[OutboxEntry]:
        ids = self._s._outbox_by_customer.get((tenant, customer_id), {})
        found = [self._s._outbox[i] for i in ids]
        found.sort(key=lambda e: (e.created_at, e.id))
        return found

    # -- Connect onboarding in progress (issue 3) ------------------------------
    def put_pending_connection(self, pending: PendingConnection) -> None:
        self._s._set(self._s._pending_connections, pending.key, pending)

    def get_pending_connection(self, key: str) -> PendingConnection | None:
        return self._s._pending_connections.get(key)

    def take_pending_connection(self, key: str) -> PendingConnection | None:
        found: PendingConnection | None = self._s._pop(self._s._pending_connections, key)
        return found

    # -- invitations (issue 3) --------------------------------------------------
    def insert_invitation(self, invitation: Invitation) -> bool:
        key = (invitation.tenant, invitation.mode, invitation.stripe_customer_id)
        if key in self._s._invitations:
            return False
        self.put_invitation(invitation)
        return True

    def get_invitation(self, tenant: str, mode: Mode, stripe_customer_id: str) -> Invitation | None:
        return self._s._invitations.get((tenant, mode, stripe_customer_id))

    def put_invitation(self, invitation: Invitation) -> None:
        s = self._s
        key = (invitation.tenant, invitation.mode, invitation.stripe_customer_id)
        s._set(s._invitations, key, invitation)
        if invitation.state is InvitationState.PENDING:
            if key not in s._invitations_pending:
                s._set(s._invitations_pending, key, None)
        elif key in s._invitations_pending:
            s._pop(s._invitations_pending, key)

    def claim_invitation(
        self, tenant: str, mode: Mode, stripe_customer_id: str, *, now: datetime, until: datetime
    ) -> Invitation | None:
        found = self._s._invitations.get((tenant, mode, stripe_customer_id))
        if found is None or not _invitation_due(found, now):
            return None
        claimed = attrs.evolve(found, next_attempt_at=until)
        self.put_invitation(claimed)
        return claimed

    def due_invitations(self, now: datetime, *, limit: int) -> Sequence[Invitation]:
        invitations = self._s._invitations
        due = [
            invitations[key]
            for key in self._s._invitations_pending
            if _invitation_due(invitations[key], now)
        ]
        due.sort(key=lambda i: (i.created_at, i.tenant, i.stripe_customer_id))
        return due[:limit]

    # -- products, references and the subscription-product index (issue 4) ------
    def list_products(self, tenant: str, *, after: str | None, limit: int) -> Sequence[Product]:
        ids = sorted(
            pid
            for pid in self._s._products_by_tenant.get(tenant, {})
            if after is None or pid > after
        )
        return [self._s._products[(tenant, pid)] for pid in ids[:limit]]

    def add_reference(self, reference: StripeReference) -> bool:
        s = self._s
        r = reference
        forward = (r.relation, r.target_id)
        if forward in s._references_from.get((r.tenant, r.mode, r.source_id), {}):
            return False
        s._index_add(s._references_from, (r.tenant, r.mode, r.source_id), forward)
        s._index_add(s._references_to, (r.tenant, r.mode, r.target_id), (r.relation, r.source_id))
        return True

    def references_from(self, tenant: str, mode: Mode, source_id: str) -> Sequence[StripeReference]:
        found = self._s._references_from.get((tenant, mode, source_id), {})
        return [
            StripeReference(tenant, mode, source_id, relation, target)
            for relation, target in sorted(found, key=lambda k: (k[0].value, k[1]))
        ]

    def references_to(self, tenant: str, mode: Mode, target_id: str) -> Sequence[StripeReference]:
        found = self._s._references_to.get((tenant, mode, target_id), {})
        return [
            StripeReference(tenant, mode, source, relation, target_id)
            for relation, source in sorted(found, key=lambda k: (k[0].value, k[1]))
        ]

    def set_subscription_products(
        self, tenant: str, mode: Mode, subscription_id: str, stripe_product_ids: Collection[str]
    ) -> None:
        s = self._s
        key = (tenant, mode, subscription_id)
        new = frozenset(stripe_product_ids)
        old = s._subscription_products.get(key, frozenset())
        if new == old:
            return
        for product in old - new:
            s._index_remove(s._subscriptions_by_product, (tenant, mode, product), subscription_id)
        for product in new - old:
            s._index_add(s._subscriptions_by_product, (tenant, mode, product), subscription_id)
        s._set(s._subscription_products, key, new)

    def subscriptions_for_stripe_product(
        self, tenant: str, mode: Mode, stripe_product_id: str
    ) -> Sequence[str]:
        return sorted(self._s._subscriptions_by_product.get((tenant, mode, stripe_product_id), {}))


def _invitation_due(invitation: Invitation, now: datetime) -> bool:
    return invitation.state is InvitationState.PENDING and (
        invitation.next_attempt_at is None or invitation.next_attempt_at <= now
    )
