"""`CustomerService`: local customers, their Stripe links, and sync in both directions.

This is the first slice: create (local only), get, list, update with the
outbox push, delete, ``create_in_stripe``, and ``customer.updated`` from Stripe.
Linking to existing customers, guarded remapping and invitations come with
the customers issue.
"""

from __future__ import annotations

import enum
import logging
import uuid
from collections.abc import Iterator, Mapping
from datetime import datetime
from typing import Any, Final

import attrs

from .._config import Mode
from ..domain.models import Customer, EventOutcome, SyncState
from ..errors import CustomerNotFound, InvalidArgument
from ..ports import Clock, Storage, Transaction
from ._outbox import CREATE_CUSTOMER, UPDATE_CUSTOMER, Outbox, new_entry
from ._validate import check_email, check_local_id, check_metadata, check_mode
from .tenants import require_tenant
from .webhooks import EventContext, HandlerResult

__all__ = ["UNSET", "CustomerService"]

log = logging.getLogger("rational_billing.customers")

#: Metadata keys the library writes on Stripe customers; never copied back.
_OWN_KEYS = frozenset({"rational_customer_id", "rational_tenant"})
_PAGE = 100


class _Unset(enum.Enum):
    UNSET = "UNSET"

    def __repr__(self) -> str:
        return "UNSET"


#: Marks an argument of `CustomerService.update` that was not passed.
UNSET: Final = _Unset.UNSET


def _visible_metadata(metadata: Mapping[str, Any] | None) -> dict[str, str]:
    return {k: str(v) for k, v in (metadata or {}).items() if k not in _OWN_KEYS}


class CustomerService:
    """Customers of a tenant: created locally, linked to Stripe when billing starts.

    Example::

        customer = billing.customers.create("acme", email="ada@example.com")
        billing.customers.create_in_stripe("acme", customer.id, mode=Mode.TEST)
    """

    def __init__(self, *, storage: Storage, outbox: Outbox, clock: Clock) -> None:
        self._storage = storage
        self._outbox = outbox
        self._clock = clock

    # -- local ---------------------------------------------------------------------
    def create(
        self,
        tenant: str,
        *,
        email: str | None,
        name: str | None = None,
        metadata: Mapping[str, str] | None = None,
        customer_id: str | None = None,
    ) -> Customer:
        """Create a customer locally. No Stripe call is made.

        Raises:
            TenantNotFound: the tenant was never registered.
            InvalidArgument: a malformed id, email or metadata, or the id is taken.
        """
        customer_id = f"rc_{uuid.uuid4().hex}" if customer_id is None else customer_id
        check_local_id(customer_id, "customer id")
        customer = Customer(
            id=customer_id,
            tenant=tenant,
            email=check_email(email),
            name=_check_name(name),
            metadata=check_metadata(metadata),
            created_at=self._clock(),
        )
        with self._storage.transaction() as tx:
            require_tenant(tx, tenant)
            if not tx.insert_customer(customer):
                raise InvalidArgument(f"tenant {tenant!r} already has a customer {customer_id!r}")
        return customer

    def get(self, tenant: str, customer_id: str) -> Customer:
        """The customer.

        Raises:
            CustomerNotFound: no such customer in that tenant.
        """
        with self._storage.transaction() as tx:
            return _require_customer(tx, tenant, customer_id)

    def list(self, tenant: str, *, page_size: int = _PAGE) -> Iterator[Customer]:
        """Every customer of the tenant, ordered by id, fetched lazily page by page."""
        if page_size < 1:
            raise InvalidArgument("page_size must be at least 1")
        after: str | None = None
        while True:
            with self._storage.transaction() as tx:
                page = list(tx.list_customers(tenant, after=after, limit=page_size))
            yield from page
            if len(page) < page_size:
                return
            after = page[-1].id

    def delete(self, tenant: str, customer_id: str) -> None:
        """Delete the local customer. Stripe is not touched.

        Raises:
            CustomerNotFound: no such customer in that tenant.
        """
        with self._storage.transaction() as tx:
            if not tx.delete_customer(tenant, customer_id):
                raise CustomerNotFound(tenant, customer_id)

    def update(
        self,
        tenant: str,
        customer_id: str,
        *,
        email: str | _Unset | None = UNSET,
        name: str | _Unset | None = UNSET,
        metadata: Mapping[str, str | None] | _Unset = UNSET,
    ) -> Customer:
        """Change email, name or metadata; a linked customer's change is pushed to Stripe.

        Metadata merges as Stripe's does: a None value deletes the key. The
        change and its outbox entry are written in one transaction, then pushed
        synchronously. While Stripe is down this still returns, with
        ``sync_state`` 'pending'; `Billing.sync.push_pending` retries later.

        Raises:
            CustomerNotFound: no such customer in that tenant.
            InvalidArgument: a malformed email, name or metadata.
        """
        changes: dict[str, Any] = {}
        if email is not UNSET:
            changes["email"] = check_email(email)
        if name is not UNSET:
            changes["name"] = _check_name(name)
        meta_patch = None if metadata is UNSET else check_metadata(metadata, allow_none_values=True)
        now = self._clock()
        with self._storage.transaction() as tx:
            customer = _require_customer(tx, tenant, customer_id)
            new_meta = dict(customer.metadata)
            for key, value in (meta_patch or {}).items():
                if value is None:
                    new_meta.pop(key, None)
                else:
                    new_meta[key] = value
            if meta_patch is not None and new_meta != dict(customer.metadata):
                changes["metadata"] = new_meta
            changes = {k: v for k, v in changes.items() if getattr(customer, k) != v}
            if not changes:
                return customer
            customer = attrs.evolve(customer, **changes, local_changed_at=now)
            if customer.link is not None:
                params = _stripe_update_params(changes, meta_patch)
                params["stripe_customer_id"] = customer.link.stripe_customer_id
                tx.put_outbox(
                    new_entry(
                        tenant=tenant,
                        mode=customer.link.mode,
                        operation=UPDATE_CUSTOMER,
                        customer_id=customer_id,
                        params=params,
                        now=now,
                    )
                )
                customer = attrs.evolve(customer, sync_state=SyncState.PENDING)
            tx.put_customer(customer)
        if customer.link is None:
            return customer
        self._outbox.push_customer(tenant, customer_id)
        return self.get(tenant, customer_id)

    # -- Stripe --------------------------------------------------------------------
    def create_in_stripe(self, tenant: str, customer_id: str, *, mode: Mode | str) -> Customer:
        """Create the customer in Stripe, in ``mode``, on the tenant's account, and link it.

        Exactly one Stripe customer is made per local customer, across retries,
        timeouts and crashes: the request and its idempotency key are frozen in
        an outbox entry before anything is sent. If Stripe cannot be reached,
        this returns the customer with ``sync_state`` 'pending' and the entry
        is pushed later by `Billing.sync.push_pending`.

        Raises:
            TenantNotFound, TenantNotConnected: the tenant cannot bill in ``mode``.
            CustomerNotFound: no such customer.
            InvalidArgument: the customer is already linked in the other mode.
        """
        wanted = check_mode(mode)
        with self._storage.transaction() as tx:
            require_tenant(tx, tenant, wanted)
            customer = _require_customer(tx, tenant, customer_id)
            if customer.link is not None:
                if customer.link.mode is wanted:
                    return customer
                raise InvalidArgument(
                    f"customer {customer_id!r} is linked in {customer.link.mode.value} mode; "
                    "unlink it before creating it in another mode"
                )
            pending = [
                e
                for e in tx.outbox_for_customer(tenant, customer_id)
                if e.operation == CREATE_CUSTOMER
            ]
            if not pending:
                metadata = dict(customer.metadata)
                metadata.update(rational_customer_id=customer.id, rational_tenant=tenant)
                params: dict[str, Any] = {"metadata": metadata}
                if customer.email is not None:
                    params["email"] = customer.email
                if customer.name is not None:
                    params["name"] = customer.name
                tx.put_outbox(
                    new_entry(
                        tenant=tenant,
                        mode=wanted,
                        operation=CREATE_CUSTOMER,
                        customer_id=customer_id,
                        params=params,
                        now=self._clock(),
                    )
                )
                tx.put_customer(attrs.evolve(customer, sync_state=SyncState.PENDING))
        self._outbox.push_customer(tenant, customer_id)
        return self.get(tenant, customer_id)

    # -- webhook handlers ------------------------------------------------------------
    def on_customer_updated(self, ctx: EventContext) -> HandlerResult | None:
        """``customer.updated``: copy email, name and metadata, unless local is newer.

        The newest change wins: the event's ``created`` time against the time
        of the last local change. An event that only echoes our own push
        changes nothing, so there is no ping-pong.
        """
        obj = ctx.object
        stripe_id = obj.get("id")
        if not isinstance(stripe_id, str):
            return HandlerResult(EventOutcome.IGNORED, "customer object has no id")
        customer = ctx.tx.customer_by_link(ctx.tenant.id, ctx.mode, stripe_id)
        if customer is None:
            return HandlerResult(
                EventOutcome.IGNORED, f"no local customer is linked to {stripe_id}"
            )
        if customer.stripe_marker is not None and ctx.created < customer.stripe_marker:
            return HandlerResult(EventOutcome.STALE, "a newer Stripe change was already applied")
        if customer.local_changed_at is not None and ctx.created < _floor(
            customer.local_changed_at
        ):
            return HandlerResult(EventOutcome.STALE, "the local change is newer")
        incoming = {
            "email": obj.get("email") if isinstance(obj.get("email"), str) else None,
            "name": obj.get("name") if isinstance(obj.get("name"), str) else None,
            "metadata": _visible_metadata(obj.get("metadata")),
        }
        changes: dict[str, Any] = {k: v for k, v in incoming.items() if _value(customer, k) != v}
        updated = attrs.evolve(customer, stripe_marker=ctx.created, **changes)
        ctx.tx.put_customer(updated)
        if not changes:
            return HandlerResult(EventOutcome.APPLIED, "echo of the local state; nothing changed")
        return None


def _value(customer: Customer, field: str) -> Any:
    value = getattr(customer, field)
    return dict(value) if field == "metadata" else value


def _floor(moment: datetime) -> datetime:
    return moment.replace(microsecond=0)


def _check_name(name: object) -> str | None:
    if name is None:
        return None
    if not isinstance(name, str) or len(name) > 256:
        raise InvalidArgument("name must be a string of at most 256 characters")
    return name


def _require_customer(tx: Transaction, tenant: str, customer_id: str) -> Customer:
    customer = tx.get_customer(tenant, customer_id)
    if customer is None:
        if tx.get_tenant(tenant) is None:
            require_tenant(tx, tenant)
        raise CustomerNotFound(tenant, customer_id)
    return customer


def _stripe_update_params(
    changes: Mapping[str, Any], meta_patch: Mapping[str, Any] | None
) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if "email" in changes:
        params["email"] = changes["email"] or ""
    if "name" in changes:
        params["name"] = changes["name"] or ""
    if "metadata" in changes and meta_patch is not None:
        params["metadata"] = {k: ("" if v is None else v) for k, v in meta_patch.items()}
    return params
