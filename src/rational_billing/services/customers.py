"""`CustomerService`: local customers, their Stripe links, and sync in both directions.

- ``create`` is local only: no Stripe call. ``get``, ``list``, ``update`` and
  ``delete`` work on local data; ``update`` of a linked customer also writes
  an outbox entry and pushes it (DESIGN.md §4a.8).
- ``link`` attaches an existing Stripe customer after checking, on the
  tenant's account and in that mode, that it exists (§4a.6);
  ``create_in_stripe`` makes exactly one new one. ``unlink`` and remapping are
  guarded by `RemapConfirmationRequired`, whose ``impact`` lists the products
  gained and lost.
- Webhook handlers: ``customer.updated`` (newest change wins, no echo loops),
  ``customer.deleted`` (unlink, keep the local customer) and
  ``customer.created`` (auto-link by metadata, or create the local customer
  and invite it).

The conflict rule: the newest change wins. A Stripe event is compared by its
``created`` second with the last local change; an event from the same second
is applied and, when it changed something, revalidated by re-fetching the
customer from Stripe after the local change has been pushed.
"""

from __future__ import annotations

import enum
import logging
import uuid
from collections.abc import Iterator, Mapping
from datetime import datetime
from typing import Any, Final

import attrs

from .._config import BillingConfig, Mode
from ..domain._serde import MAPPINGS as _MAPPINGS
from ..domain.models import Customer, CustomerLink, EventOutcome, OutboxEntry, SyncState, Tenant
from ..errors import (
    AlreadyLinked,
    InvalidArgument,
    NotLinked,
    RemapConfirmationRequired,
    StorageError,
    StripeAPIError,
    StripeCustomerNotFound,
    TenantNotConnected,
)
from ..ports import Clock, Storage, StripeAPI, Transaction
from ._impact import AccessForLink, current_access, describe_impact
from ._lookup import find_customer
from ._outbox import (
    CREATE_CUSTOMER,
    REFRESH_CUSTOMER,
    TAG_CUSTOMER,
    UPDATE_CUSTOMER,
    Outbox,
    cancel_pending,
    new_entry,
    settled,
    settled_state,
)
from ._validate import check_email, check_local_id, check_metadata, check_mode, check_stripe_id
from .invitations import InvitationService
from .tenants import require_tenant
from .webhooks import EventContext, HandlerResult

__all__ = ["UNSET", "CustomerService"]

log = logging.getLogger("rational_billing.customers")

#: Metadata keys the library writes on Stripe customers; never copied back.
_OWN_KEYS = frozenset({"rational_customer_id", "rational_tenant"})
#: The customer fields synced in both directions.
_SYNCED_FIELDS = frozenset({"email", "name", "metadata"})
_PAGE = 100
_CLEAR_TAG: Final[Mapping[str, str]] = {"rational_customer_id": "", "rational_tenant": ""}


class _Unset(enum.Enum):
    UNSET = "UNSET"

    def __repr__(self) -> str:
        return "UNSET"


#: Marks an argument of `CustomerService.update` that was not passed.
UNSET: Final = _Unset.UNSET


def _visible_metadata(metadata: object) -> dict[str, str]:
    if not isinstance(metadata, _MAPPINGS):
        return {}
    # Stripe deletes a key set to "", so an empty value means no key (some
    # Stripe-compatible servers keep it).
    return {
        str(k): str(v) for k, v in metadata.items() if k not in _OWN_KEYS and v not in ("", None)
    }


class CustomerService:
    """Customers of a tenant: created locally, linked to Stripe when billing starts.

    Example::

        customer = billing.customers.create("acme", email="ada@example.com")
        billing.customers.create_in_stripe("acme", customer.id, mode=Mode.TEST)
        billing.customers.link("acme", other.id, mode=Mode.TEST, stripe_customer_id="cus_123")
    """

    def __init__(
        self,
        *,
        storage: Storage,
        outbox: Outbox,
        clock: Clock,
        config: BillingConfig,
        stripe: StripeAPI,
        invitations: InvitationService,
        access_for_link: AccessForLink = current_access,
    ) -> None:
        self._storage = storage
        self._outbox = outbox
        self._clock = clock
        self._config = config
        self._stripe = stripe
        self._invitations = invitations
        self._access_for_link = access_for_link
        outbox.on_result(CREATE_CUSTOMER, self._apply_created)
        outbox.on_result(REFRESH_CUSTOMER, self._apply_refresh)

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
            TenantNotFound, TenantNotConnected: unknown or disconnected tenant.
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
            TenantNotFound: unknown tenant.
            CustomerNotFound: no such customer in that tenant.
        """
        with self._storage.transaction() as tx:
            return find_customer(tx, tenant, customer_id)

    def list(self, tenant: str, *, page_size: int = _PAGE) -> Iterator[Customer]:
        """Every customer of the tenant, ordered by id, fetched lazily page by page.

        Raises:
            InvalidArgument: ``page_size`` below 1.
            TenantNotFound: unknown tenant (when the first page is fetched).
        """
        if page_size < 1:
            raise InvalidArgument("page_size must be at least 1")
        after: str | None = None
        while True:
            with self._storage.transaction() as tx:
                if after is None and tx.get_tenant(tenant) is None:
                    require_tenant(tx, tenant)
                page = list(tx.list_customers(tenant, after=after, limit=page_size))
            yield from page
            if len(page) < page_size:
                return
            after = page[-1].id

    def delete(self, tenant: str, customer_id: str) -> None:
        """Delete the local customer. Stripe is not touched.

        A ``create_in_stripe`` still queued for it is cancelled, so no Stripe
        customer is made (and invited) for a customer that no longer exists.

        Raises:
            TenantNotFound: unknown tenant.
            CustomerNotFound: no such customer in that tenant.
        """
        with self._storage.transaction() as tx:
            find_customer(tx, tenant, customer_id, lock=True)
            cancel_pending(
                tx,
                tenant,
                customer_id,
                operations=(CREATE_CUSTOMER, REFRESH_CUSTOMER),
                reason="the local customer was deleted",
            )
            tx.delete_customer(tenant, customer_id)

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
            TenantNotFound, TenantNotConnected: unknown or disconnected tenant.
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
            customer = find_customer(tx, tenant, customer_id, lock=True)
            require_tenant(tx, tenant)
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
                tx.put_outbox(self._entry(customer, customer.link.mode, UPDATE_CUSTOMER, params))
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
            self._require_billing_tenant(tx, tenant, wanted)
            customer = find_customer(tx, tenant, customer_id, lock=True)
            if customer.link is not None:
                if customer.link.mode is wanted:
                    return customer
                raise InvalidArgument(
                    f"customer {customer_id!r} is linked in {customer.link.mode.value} mode; "
                    "unlink it before creating it in another mode"
                )
            if not _pending(tx, customer, CREATE_CUSTOMER):
                metadata = dict(customer.metadata)
                metadata.update(rational_customer_id=customer.id, rational_tenant=tenant)
                params: dict[str, Any] = {"metadata": metadata}
                if customer.email is not None:
                    params["email"] = customer.email
                if customer.name is not None:
                    params["name"] = customer.name
                tx.put_outbox(self._entry(customer, wanted, CREATE_CUSTOMER, params))
                tx.put_customer(attrs.evolve(customer, sync_state=SyncState.PENDING))
        self._outbox.push_customer(tenant, customer_id)
        return self.get(tenant, customer_id)

    def link(
        self,
        tenant: str,
        customer_id: str,
        *,
        mode: Mode | str,
        stripe_customer_id: str,
        confirm_remap: bool = False,
    ) -> Customer:
        """Link the customer to an existing Stripe customer, in ``mode`` (§4a.6).

        The Stripe customer is first retrieved on the tenant's account in that
        mode. Linking to the link the customer already has is a no-op (no
        Stripe call). Then ``metadata.rational_customer_id`` is written on the
        Stripe customer through the outbox. Changing an existing link (another
        Stripe customer, or the other mode) needs ``confirm_remap=True``.

        Raises:
            InvalidArgument: a malformed id or mode, or a ``create_in_stripe``
                for this customer is still pending.
            TenantNotFound, TenantNotConnected: unknown or disconnected tenant,
                or not connected (or no keys configured) in ``mode``.
            CustomerNotFound: no such customer.
            AlreadyLinked: another customer of the tenant is linked to it.
            RemapConfirmationRequired: the customer is linked elsewhere and
                ``confirm_remap`` is false; ``.impact`` says what would change.
            StripeCustomerNotFound: absent in that account and mode, or deleted.
            StripeAPIError: Stripe could not be asked.
        """
        check_local_id(tenant, "tenant id")
        check_local_id(customer_id, "customer id")
        check_stripe_id(stripe_customer_id, "cus_", "Stripe customer id")
        wanted = check_mode(mode)
        target = CustomerLink(wanted, stripe_customer_id)
        with self._storage.transaction() as tx:
            record = self._require_billing_tenant(tx, tenant, wanted)
            customer = find_customer(tx, tenant, customer_id)
            if customer.link == target:
                return customer
            self._check_linkable(tx, customer, target, confirm_remap)
        remote = self._retrieve(record, wanted, stripe_customer_id)
        try:
            with self._storage.transaction() as tx:
                self._require_billing_tenant(tx, tenant, wanted)
                customer = find_customer(tx, tenant, customer_id, lock=True)
                if customer.link == target:
                    return customer
                self._check_linkable(tx, customer, target, confirm_remap)
                if customer.link is not None:
                    tx.put_outbox(self._tag_entry(customer, customer.link, _CLEAR_TAG))
                tag = {"rational_customer_id": customer.id, "rational_tenant": tenant}
                if _own_tag(remote) != tag:
                    tx.put_outbox(self._tag_entry(customer, target, tag))
                linked = attrs.evolve(customer, link=target, stripe_marker=_floor(self._clock()))
                tx.put_customer(attrs.evolve(linked, sync_state=settled_state(tx, linked)))
        except StorageError as exc:
            # Another customer took the same Stripe customer in a concurrent
            # transaction, and the unique index refused ours: say so plainly.
            with self._storage.transaction() as tx:
                holder = tx.customer_by_link(tenant, wanted, stripe_customer_id)
            if holder is None or holder.id == customer_id:
                raise
            raise _already_linked(tenant, target, holder.id) from exc
        log.info(
            "customer %s/%s linked to %s (%s mode)",
            tenant,
            customer_id,
            stripe_customer_id,
            wanted.value,
        )
        self._outbox.push_customer(tenant, customer_id)
        return self.get(tenant, customer_id)

    def unlink(self, tenant: str, customer_id: str, *, confirm_remap: bool = False) -> Customer:
        """Remove the customer's Stripe link; its access through that link ends.

        ``metadata.rational_customer_id`` is cleared on the Stripe customer
        through the outbox. The local customer and its history stay.

        Raises:
            InvalidArgument: a malformed id.
            TenantNotFound, TenantNotConnected: unknown or disconnected tenant.
            CustomerNotFound: no such customer.
            NotLinked: the customer has no link.
            RemapConfirmationRequired: ``confirm_remap`` is false; ``.impact``
                lists the products the customer would lose.
        """
        check_local_id(tenant, "tenant id")
        check_local_id(customer_id, "customer id")
        with self._storage.transaction() as tx:
            require_tenant(tx, tenant)
            customer = find_customer(tx, tenant, customer_id, lock=True)
            if customer.link is None:
                raise NotLinked(tenant, customer_id)
            self._require_billing_tenant(tx, tenant, customer.link.mode)
            if not confirm_remap:
                raise self._remap_error(tx, customer, None, "unlinking")
            tx.put_outbox(self._tag_entry(customer, customer.link, _CLEAR_TAG))
            unlinked = attrs.evolve(customer, link=None, stripe_marker=None)
            tx.put_customer(attrs.evolve(unlinked, sync_state=settled_state(tx, unlinked)))
        log.info(
            "customer %s/%s unlinked from %s", tenant, customer_id, customer.link.stripe_customer_id
        )
        self._outbox.push_customer(tenant, customer_id)
        return self.get(tenant, customer_id)

    # -- webhook handlers ------------------------------------------------------------
    def on_customer_updated(self, ctx: EventContext) -> HandlerResult | None:
        """``customer.updated``: copy email, name and metadata, unless local is newer.

        The newest change wins: the event's ``created`` time against the time
        of the last local change. A strictly newer event also cancels local
        changes still waiting to be pushed, which are older. An event that only
        echoes our own push changes nothing, so there is no ping-pong; one from
        the same second that changes something is revalidated from Stripe.

        An event whose ``previous_attributes`` name none of email, name and
        metadata (a new card, a balance change) is no change to them: it
        neither cancels nor overwrites a local change still queued.
        """
        stripe_id = _customer_id(ctx.object)
        if stripe_id is None:
            return HandlerResult(EventOutcome.IGNORED, "customer object has no id")
        previous = ctx.event.get("data", {}).get("previous_attributes")
        if isinstance(previous, _MAPPINGS) and not _SYNCED_FIELDS.intersection(previous):
            return HandlerResult(EventOutcome.APPLIED, "no change to email, name or metadata")
        customer = _locked_by_link(ctx, stripe_id)
        if customer is None:
            return HandlerResult(
                EventOutcome.IGNORED, f"no local customer is linked to {stripe_id}"
            )
        if customer.stripe_marker is not None and ctx.created < customer.stripe_marker:
            return HandlerResult(EventOutcome.STALE, "a newer Stripe change was already applied")
        local = None if customer.local_changed_at is None else _floor(customer.local_changed_at)
        if local is not None and ctx.created < local:
            return HandlerResult(EventOutcome.STALE, "the local change is newer")
        if local is None or ctx.created > local:
            pending = cancel_pending(
                ctx.tx,
                customer.tenant,
                customer.id,
                operations=(UPDATE_CUSTOMER,),
                stripe_customer_id=stripe_id,
                reason=f"superseded by the newer Stripe change in {ctx.event.get('id')}",
            )
        else:
            pending = list(ctx.tx.outbox_for_customer(customer.tenant, customer.id))
        changes = _incoming_changes(customer, ctx.object)
        updated = attrs.evolve(customer, stripe_marker=ctx.created, **changes)
        if changes and ctx.created in (customer.stripe_marker, local):
            self._revalidate(ctx, updated)
            return HandlerResult(EventOutcome.APPLIED, "same-second change: revalidating")
        ctx.tx.put_customer(settled(updated, pending))
        if not changes:
            return HandlerResult(EventOutcome.APPLIED, "echo of the local state; nothing changed")
        return None

    def on_customer_deleted(self, ctx: EventContext) -> HandlerResult | None:
        """``customer.deleted``: unlink the customer (access ends); the local record stays."""
        stripe_id = _customer_id(ctx.object)
        if stripe_id is None:
            return HandlerResult(EventOutcome.IGNORED, "customer object has no id")
        customer = _locked_by_link(ctx, stripe_id)
        if customer is None:
            return HandlerResult(
                EventOutcome.IGNORED, f"no local customer is linked to {stripe_id}"
            )
        ctx.tx.put_customer(_unlinked_deleted(ctx.tx, customer, stripe_id))
        return None

    def on_customer_created(self, ctx: EventContext) -> HandlerResult | None:
        """``customer.created``: auto-link by metadata, or create the customer and invite it.

        - Already linked to a local customer (our own ``create_in_stripe``):
          nothing to do.
        - ``metadata.rational_customer_id`` names an unlinked local customer of
          this tenant: link it. Named but linked elsewhere, or another tenant's:
          a conflict, recorded on the event, and nothing changes (§4a.6).
        - Otherwise: a new local customer linked to it, and one invitation row
          (sent after the commit). A duplicate or concurrent delivery finds
          the row and changes nothing.
        """
        obj = ctx.object
        stripe_id = _customer_id(obj)
        if stripe_id is None:
            return HandlerResult(EventOutcome.IGNORED, "customer object has no id")
        tenant = ctx.tenant.id
        holder = ctx.tx.customer_by_link(tenant, ctx.mode, stripe_id)
        if holder is not None:
            return HandlerResult(
                EventOutcome.APPLIED, f"{stripe_id} is already linked to customer {holder.id}"
            )
        raw = obj.get("metadata")
        metadata: Mapping[str, Any] = raw if isinstance(raw, _MAPPINGS) else {}
        named = metadata.get("rational_customer_id")
        if isinstance(named, str) and named:
            result = self._auto_link(ctx, stripe_id, named, metadata.get("rational_tenant"))
            if result is not None:
                return result
        return self._create_from_stripe(ctx, stripe_id)

    # -- internals -------------------------------------------------------------------
    def _require_billing_tenant(self, tx: Transaction, tenant: str, mode: Mode) -> Tenant:
        record = require_tenant(tx, tenant)
        if mode not in self._config.modes:
            raise TenantNotConnected(
                f"no keys are configured for {mode.value} mode, so tenant {tenant!r} cannot "
                f"bill in it: add BillingConfig({mode.value}=ModeKeys(...))",
                tenant=tenant,
                mode=mode,
            )
        return require_tenant(tx, tenant, mode) if mode not in record.modes else record

    def _check_linkable(
        self, tx: Transaction, customer: Customer, target: CustomerLink, confirm_remap: bool
    ) -> None:
        holder = tx.customer_by_link(customer.tenant, target.mode, target.stripe_customer_id)
        if holder is not None and holder.id != customer.id:
            raise _already_linked(customer.tenant, target, holder.id)
        if _pending(tx, customer, CREATE_CUSTOMER):
            raise InvalidArgument(
                f"customer {customer.id!r} is still being created in Stripe "
                "(create_in_stripe is pending); push it first with billing.sync.push_pending()"
            )
        if customer.link is not None and not confirm_remap:
            raise self._remap_error(tx, customer, target, "remapping")

    def _remap_error(
        self, tx: Transaction, customer: Customer, target: CustomerLink | None, what: str
    ) -> RemapConfirmationRequired:
        before = self._access_for_link(tx, customer.tenant, customer.link)
        after = self._access_for_link(tx, customer.tenant, target)
        impact = describe_impact(
            tenant=customer.tenant,
            customer_id=customer.id,
            before=customer.link,
            after=target,
            access_before=before,
            access_after=after,
        )
        lost = ", ".join(sorted(before - after)) or "nothing"
        gained = ", ".join(sorted(after - before)) or "nothing"
        return RemapConfirmationRequired(
            f"{what} customer {customer.id!r} of tenant {customer.tenant!r} changes its access "
            f"(loses {lost}; gains {gained}): pass confirm_remap=True",
            impact=impact,
        )

    def _retrieve(self, tenant: Tenant, mode: Mode, stripe_customer_id: str) -> dict[str, Any]:
        account = None if tenant.direct else tenant.stripe_account_id
        where = f"on {account or 'the platform account'} in {mode.value} mode"
        try:
            found = self._stripe.request(
                "GET", f"/v1/customers/{stripe_customer_id}", mode=mode, account=account
            )
        except StripeAPIError as exc:
            if exc.status != 404:
                raise
            raise StripeCustomerNotFound(
                f"Stripe customer {stripe_customer_id} does not exist {where}",
                status=404,
                code=exc.code,
                request_id=exc.request_id,
                tenant=tenant.id,
                mode=mode,
            ) from exc
        if found.get("deleted"):
            raise StripeCustomerNotFound(
                f"Stripe customer {stripe_customer_id} was deleted {where}",
                status=200,
                tenant=tenant.id,
                mode=mode,
            )
        return found

    def _entry(
        self, customer: Customer, mode: Mode, operation: str, params: Mapping[str, Any]
    ) -> OutboxEntry:
        return new_entry(
            tenant=customer.tenant,
            mode=mode,
            operation=operation,
            customer_id=customer.id,
            params=params,
            now=self._clock(),
        )

    def _tag_entry(
        self, customer: Customer, link: CustomerLink, tag: Mapping[str, str]
    ) -> OutboxEntry:
        params = {"stripe_customer_id": link.stripe_customer_id, "metadata": dict(tag)}
        return self._entry(customer, link.mode, TAG_CUSTOMER, params)

    def _revalidate(self, ctx: EventContext, customer: Customer) -> None:
        """Store ``customer`` pending and re-fetch it from Stripe after the commit.

        The fetch is queued behind the customer's pending pushes.
        """
        assert customer.link is not None
        params = {"stripe_customer_id": customer.link.stripe_customer_id}
        ctx.tx.put_customer(attrs.evolve(customer, sync_state=SyncState.PENDING))
        ctx.tx.put_outbox(self._entry(customer, customer.link.mode, REFRESH_CUSTOMER, params))
        tenant, customer_id = customer.tenant, customer.id

        def push() -> None:  # after the commit; a failure stays queued for push_pending()
            self._outbox.push_customer(tenant, customer_id)

        ctx.after_commit(push)

    def _apply_created(
        self,
        tx: Transaction,
        entry: OutboxEntry,
        customer: Customer | None,
        result: Mapping[str, Any],
    ) -> Customer | None:
        """A ``customer.create`` answer: link the customer, then queue what changed meanwhile.

        An ``update`` made while the create waited in the outbox changed only
        local data (there was no link yet); the difference between the local
        customer and the frozen request that was sent is queued as an update
        right behind it.
        """
        stripe_id = result.get("id")
        if customer is None or customer.link is not None or not isinstance(stripe_id, str):
            return None
        holder = tx.customer_by_link(entry.tenant, entry.mode, stripe_id)
        if holder is not None and holder.id != customer.id:
            log.error(
                "Stripe customer %s created for %s/%s is already linked to %s; not linking",
                stripe_id,
                customer.tenant,
                customer.id,
                holder.id,
            )
            return None
        linked = attrs.evolve(
            customer, link=CustomerLink(entry.mode, stripe_id), stripe_marker=_floor(self._clock())
        )
        params = _catch_up_params(linked, entry.params)
        if params:
            params["stripe_customer_id"] = stripe_id
            tx.put_outbox(self._entry(linked, entry.mode, UPDATE_CUSTOMER, params))
        return linked

    def _apply_refresh(
        self,
        tx: Transaction,
        entry: OutboxEntry,
        customer: Customer | None,
        result: Mapping[str, Any],
    ) -> Customer | None:
        """A ``customer.refresh`` answer: Stripe's current state, stamped with the fetch time."""
        stripe_id = entry.params.get("stripe_customer_id")
        if customer is None or customer.link != CustomerLink(entry.mode, str(stripe_id)):
            return None  # relinked or unlinked meanwhile: the answer is about someone else
        if result.get("deleted"):
            return _unlinked_deleted(tx, customer, str(stripe_id))
        marker = _floor(self._clock())
        if customer.stripe_marker is not None and marker < customer.stripe_marker:
            return None
        if _pending(tx, customer, UPDATE_CUSTOMER):
            # A local change queued behind this fetch is newer than what Stripe
            # held; it is pushed next, and its echo brings the two sides together.
            return None
        changes = _incoming_changes(customer, result)
        return attrs.evolve(customer, stripe_marker=marker, **changes)

    def _auto_link(
        self, ctx: EventContext, stripe_id: str, named: str, named_tenant: object
    ) -> HandlerResult | None:
        """Link the customer the metadata names, or report the conflict; None: no such customer."""
        tenant = ctx.tenant.id
        if named_tenant not in (None, "", tenant):
            return _conflict(
                f"{stripe_id} names customer {named!r} of tenant {named_tenant!r}, "
                f"but arrived for tenant {tenant!r}"
            )
        candidate = ctx.tx.lock_customer(tenant, named)
        if candidate is None:
            return None
        if candidate.link is not None:
            where = f"{candidate.link.stripe_customer_id} ({candidate.link.mode.value} mode)"
            return _conflict(
                f"{stripe_id} names customer {named!r}, which is already linked to {where}"
            )
        # A create_in_stripe still queued for it would make a second Stripe customer.
        cancel_pending(
            ctx.tx,
            tenant,
            named,
            operations=(CREATE_CUSTOMER,),
            reason=f"linked to {stripe_id} by its customer.created event",
        )
        linked = attrs.evolve(
            candidate, link=CustomerLink(ctx.mode, stripe_id), stripe_marker=ctx.created
        )
        local = None if candidate.local_changed_at is None else _floor(candidate.local_changed_at)
        if local is None or ctx.created > local:
            linked = attrs.evolve(linked, **_incoming_changes(linked, ctx.object))
        self._revalidate(ctx, linked)
        return HandlerResult(
            EventOutcome.APPLIED, f"linked customer {named!r} by metadata.rational_customer_id"
        )

    def _create_from_stripe(self, ctx: EventContext, stripe_id: str) -> HandlerResult | None:
        obj = ctx.object
        email = obj.get("email")
        name = obj.get("name")
        customer = Customer(
            id=f"rc_{uuid.uuid4().hex}",
            tenant=ctx.tenant.id,
            email=email if _is_email(email) else None,
            name=name if isinstance(name, str) and len(name) <= 256 else None,
            metadata=_visible_metadata(obj.get("metadata")),
            link=CustomerLink(ctx.mode, stripe_id),
            sync_state=SyncState.SYNCED,
            created_at=self._clock(),
            stripe_marker=ctx.created,
        )
        # The invitation row is the claim: of duplicate or concurrent deliveries,
        # only the one that inserts it goes on (insert-if-absent in storage).
        if not self._invitations.record(
            ctx.tx, customer, mode=ctx.mode, stripe_customer_id=stripe_id
        ):
            return HandlerResult(
                EventOutcome.IGNORED, f"{stripe_id} was already handled (it has an invitation)"
            )
        self._revalidate(ctx, customer)
        tenant, mode = ctx.tenant.id, ctx.mode

        def invite() -> None:
            self._invitations.send(tenant, mode, stripe_id)

        ctx.after_commit(invite)
        return None


def _unlinked_deleted(tx: Transaction, customer: Customer, stripe_id: str) -> Customer:
    """``customer`` unlinked from the deleted ``stripe_id``, its queued writes to it cancelled.

    Returned with its settled sync state, for the caller to store.
    """
    pending = cancel_pending(
        tx,
        customer.tenant,
        customer.id,
        operations=(UPDATE_CUSTOMER, TAG_CUSTOMER, REFRESH_CUSTOMER),
        stripe_customer_id=stripe_id,
        reason=f"Stripe customer {stripe_id} was deleted",
    )
    log.info(
        "customer %s/%s unlinked: Stripe customer %s was deleted",
        customer.tenant,
        customer.id,
        stripe_id,
    )
    return settled(attrs.evolve(customer, link=None, stripe_marker=None), pending)


def _conflict(reason: str) -> HandlerResult:
    log.warning("customer.created conflict: %s; nothing changed", reason)
    return HandlerResult(EventOutcome.IGNORED, f"conflict: {reason}; nothing changed")


def _customer_id(obj: Mapping[str, Any]) -> str | None:
    stripe_id = obj.get("id")
    if isinstance(stripe_id, str) and stripe_id.startswith("cus_"):
        return stripe_id
    return None


def _own_tag(obj: Mapping[str, Any]) -> dict[str, str]:
    metadata = obj.get("metadata")
    if not isinstance(metadata, _MAPPINGS):
        return {}
    return {k: str(metadata[k]) for k in _OWN_KEYS if metadata.get(k)}


def _is_email(value: object) -> bool:
    try:
        return check_email(value) is not None
    except InvalidArgument:
        return False


def _incoming_changes(customer: Customer, obj: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of ``customer`` that the Stripe object ``obj`` holds differently."""
    email = obj.get("email")
    name = obj.get("name")
    incoming = {
        "email": email if isinstance(email, str) and email else None,
        "name": name if isinstance(name, str) and name else None,
        "metadata": _visible_metadata(obj.get("metadata")),
    }
    return {k: v for k, v in incoming.items() if _value(customer, k) != v}


def _pending(tx: Transaction, customer: Customer, operation: str) -> bool:
    return any(
        e.operation == operation for e in tx.outbox_for_customer(customer.tenant, customer.id)
    )


def _value(customer: Customer, field: str) -> Any:
    value = getattr(customer, field)
    return dict(value) if field == "metadata" else value


def _already_linked(tenant: str, target: CustomerLink, holder_id: str) -> AlreadyLinked:
    return AlreadyLinked(
        f"Stripe customer {target.stripe_customer_id} ({target.mode.value} mode) is "
        f"already linked to customer {holder_id!r} of tenant {tenant!r}",
        tenant=tenant,
        stripe_customer_id=target.stripe_customer_id,
        customer_id=holder_id,
    )


def _floor(moment: datetime) -> datetime:
    return moment.replace(microsecond=0)


def _check_name(name: object) -> str | None:
    if name is None:
        return None
    if not isinstance(name, str) or len(name) > 256:
        raise InvalidArgument("name must be a string of at most 256 characters")
    return name


def _locked_by_link(ctx: EventContext, stripe_id: str) -> Customer | None:
    """The customer linked to ``stripe_id`` in the event's tenant and mode, locked; or None."""
    target = CustomerLink(ctx.mode, stripe_id)
    for _ in range(3):  # the link may move between the lookup and the lock
        found = ctx.tx.customer_by_link(ctx.tenant.id, ctx.mode, stripe_id)
        if found is None:
            return None
        customer = ctx.tx.lock_customer(found.tenant, found.id)
        if customer is not None and customer.link == target:
            return customer
    return None


def _catch_up_params(customer: Customer, obj: Mapping[str, Any]) -> dict[str, Any]:
    """The update that makes a Stripe customer shaped like ``obj`` hold ``customer``'s fields."""
    differing = _incoming_changes(customer, obj)
    remote = _visible_metadata(obj.get("metadata"))
    meta_patch: dict[str, str | None] = {k: None for k in remote if k not in customer.metadata}
    meta_patch.update({k: v for k, v in customer.metadata.items() if remote.get(k) != v})
    return _stripe_update_params({k: getattr(customer, k) for k in differing}, meta_patch)


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
