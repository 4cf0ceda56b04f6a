"""The outbox: local changes owed to Stripe, pushed with frozen parameters and keys (§4a.8).

An entry is written in the same storage transaction as the local change. It
freezes its request parameters and idempotency key, so a retry after a
timeout, a crash or a restart sends exactly the same request and Stripe
creates nothing twice.

- A retryable failure keeps the entry pending with a backoff.
- A permanent 4xx moves it to the failed list with its error.
- An entry older than 23 h, or one that keeps getting the same 5xx, is first
  checked against Stripe's state, because Stripe may have forgotten the key.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any

import attrs

from .._config import Mode
from ..domain.models import Customer, CustomerLink, OutboxEntry, OutboxState, SyncState
from ..errors import StripeAPIError
from ..ports import Clock, Storage, StripeAPI, Transaction

__all__ = ["CREATE_CUSTOMER", "UPDATE_CUSTOMER", "Outbox", "new_entry"]

log = logging.getLogger("rational_billing.outbox")

CREATE_CUSTOMER = "customer.create"
UPDATE_CUSTOMER = "customer.update"

_KEY_TTL = timedelta(hours=23)
_MAX_BACKOFF = timedelta(hours=1)
_SAME_5XX_LIMIT = 5


def new_entry(
    *,
    tenant: str,
    mode: Mode,
    operation: str,
    customer_id: str,
    params: Mapping[str, Any],
    now: datetime,
) -> OutboxEntry:
    """A pending entry with a fresh idempotency key (one per local operation)."""
    return OutboxEntry(
        id=uuid.uuid4().hex,
        tenant=tenant,
        mode=mode,
        operation=operation,
        customer_id=customer_id,
        params=params,
        idempotency_key=f"rb-{uuid.uuid4()}",
        created_at=now,
    )


def _backoff(attempts: int) -> timedelta:
    return min(timedelta(seconds=2 ** min(attempts, 20)), _MAX_BACKOFF)


class Outbox:
    """Pushes outbox entries to Stripe and records what happened."""

    def __init__(self, *, storage: Storage, stripe: StripeAPI, clock: Clock) -> None:
        self._storage = storage
        self._stripe = stripe
        self._clock = clock
        self._operations: dict[str, Callable[[OutboxEntry, str | None], dict[str, Any]]] = {
            CREATE_CUSTOMER: self._create_customer,
            UPDATE_CUSTOMER: self._update_customer,
        }

    # -- draining --------------------------------------------------------------
    def push_pending(self, *, limit: int = 1000) -> int:
        """Push every due entry, oldest first; returns how many Stripe accepted."""
        with self._storage.transaction() as tx:
            due = list(tx.due_outbox(self._clock(), limit=limit))
        blocked: set[tuple[str, str]] = set()
        done = 0
        for entry in due:
            owner = (entry.tenant, entry.customer_id)
            if owner in blocked:
                continue  # keep one customer's changes in order
            if self.push(entry):
                done += 1
            else:
                blocked.add(owner)
        return done

    def push_customer(self, tenant: str, customer_id: str) -> bool:
        """Push the customer's pending entries in order; True when none is left."""
        with self._storage.transaction() as tx:
            pending = list(tx.outbox_for_customer(tenant, customer_id))
        now = self._clock()
        for entry in pending:
            if entry.next_attempt_at is not None and entry.next_attempt_at > now:
                return False
            if not self.push(entry):
                return False
        return True

    def push(self, entry: OutboxEntry) -> bool:
        """Send one entry; True when Stripe accepted it (now or earlier)."""
        with self._storage.transaction() as tx:
            current = tx.get_outbox(entry.id)
        if current is None or current.state is not OutboxState.PENDING:
            return current is not None and current.state is OutboxState.DONE
        operation = self._operations[current.operation]
        account = self._account(current)
        try:
            if account is _NO_TENANT:
                raise StripeAPIError(f"tenant {current.tenant!r} is gone", status=None)
            result = operation(current, account)  # type: ignore[arg-type]
        except StripeAPIError as exc:
            self._failed_attempt(current, exc)
            return False
        self._succeeded(current, result)
        return True

    # -- operations ------------------------------------------------------------------
    def _create_customer(self, entry: OutboxEntry, account: str | None) -> dict[str, Any]:
        if entry.attempts and self._clock() - entry.created_at > _KEY_TTL:
            found = self._find_created_customer(entry, account)
            if found is not None:
                return found
        return self._stripe.request(
            "POST",
            "/v1/customers",
            mode=entry.mode,
            account=account,
            params=entry.params,
            idempotency_key=entry.idempotency_key,
        )

    def _find_created_customer(
        self, entry: OutboxEntry, account: str | None
    ) -> dict[str, Any] | None:
        """The Stripe customer this entry already created, found by email and metadata.

        Lists rather than searches: Search lags by about a minute (§4a.8).
        """
        email = entry.params.get("email")
        if not email:
            return None
        for obj in self._stripe.list_all(
            "/v1/customers", mode=entry.mode, account=account, params={"email": email}
        ):
            metadata = obj.get("metadata") or {}
            if (
                metadata.get("rational_customer_id") == entry.customer_id
                and metadata.get("rational_tenant") == entry.tenant
                and not obj.get("deleted")
            ):
                return obj
        return None

    def _update_customer(self, entry: OutboxEntry, account: str | None) -> dict[str, Any]:
        stripe_id = entry.params["stripe_customer_id"]
        params = {k: v for k, v in entry.params.items() if k != "stripe_customer_id"}
        return self._stripe.request(
            "POST",
            f"/v1/customers/{stripe_id}",
            mode=entry.mode,
            account=account,
            params=params,
            idempotency_key=entry.idempotency_key,
        )

    # -- bookkeeping --------------------------------------------------------------------
    def _account(self, entry: OutboxEntry) -> str | object | None:
        with self._storage.transaction() as tx:
            tenant = tx.get_tenant(entry.tenant)
        if tenant is None:
            return _NO_TENANT
        return tenant.stripe_account_id

    def _succeeded(self, entry: OutboxEntry, result: Mapping[str, Any]) -> None:
        with self._storage.transaction() as tx:
            stripe_id = result.get("id") if isinstance(result.get("id"), str) else None
            tx.put_outbox(
                attrs.evolve(
                    entry,
                    state=OutboxState.DONE,
                    attempts=entry.attempts + 1,
                    last_error=None,
                    stripe_id=stripe_id,
                )
            )
            customer = tx.get_customer(entry.tenant, entry.customer_id)
            if customer is None:
                return
            if entry.operation == CREATE_CUSTOMER and stripe_id is not None:
                customer = self._attach_created(tx, customer, entry, stripe_id)
            if not tx.outbox_for_customer(entry.tenant, entry.customer_id):
                customer = attrs.evolve(customer, sync_state=SyncState.SYNCED)
            tx.put_customer(customer)
        log.info(
            "outbox %s %s for %s/%s: done",
            entry.id,
            entry.operation,
            entry.tenant,
            entry.customer_id,
        )

    def _attach_created(
        self, tx: Transaction, customer: Customer, entry: OutboxEntry, stripe_id: str
    ) -> Customer:
        if customer.link is not None:
            return customer
        holder = tx.customer_by_link(entry.tenant, entry.mode, stripe_id)
        if holder is not None and holder.id != customer.id:
            log.error(
                "Stripe customer %s created for %s is already linked to %s; not linking",
                stripe_id,
                customer.id,
                holder.id,
            )
            return customer
        return attrs.evolve(customer, link=CustomerLink(entry.mode, stripe_id))

    def _failed_attempt(self, entry: OutboxEntry, exc: StripeAPIError) -> None:
        now = self._clock()
        attempts = entry.attempts + 1
        message = str(exc)[:1000]
        permanent = not exc.retryable
        if not permanent and exc.status is not None and exc.status >= 500:
            permanent = attempts >= _SAME_5XX_LIMIT and entry.last_error == message
        with self._storage.transaction() as tx:
            if permanent:
                updated = attrs.evolve(
                    entry, state=OutboxState.FAILED, attempts=attempts, last_error=message
                )
            else:
                updated = attrs.evolve(
                    entry,
                    attempts=attempts,
                    last_error=message,
                    next_attempt_at=now + _backoff(attempts),
                )
            tx.put_outbox(updated)
            customer = tx.get_customer(entry.tenant, entry.customer_id)
            if customer is not None:
                state = SyncState.FAILED if permanent else SyncState.PENDING
                tx.put_customer(attrs.evolve(customer, sync_state=state))
        log.warning(
            "outbox %s %s for %s/%s %s: %s",
            entry.id,
            entry.operation,
            entry.tenant,
            entry.customer_id,
            "failed permanently" if permanent else f"will retry (attempt {attempts})",
            message,
        )


_NO_TENANT = object()
