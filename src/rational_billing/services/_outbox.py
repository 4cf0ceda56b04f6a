"""The outbox: local changes owed to Stripe, pushed with frozen parameters and keys (§4a.8).

An entry is written in the same storage transaction as the local change. It
freezes its request parameters and idempotency key, so a retry after a
timeout, a crash or a restart sends exactly the same request and Stripe
creates nothing twice.

- A retryable failure keeps the entry pending with a backoff (capped at 1 h).
- A permanent 4xx moves it to the failed list with its error.
- An entry that keeps getting the same 5xx (Stripe replays a saved 5xx under
  the same key) is resolved by checking Stripe's state: done when its effect
  is there, failed when it is not, and kept pending when Stripe cannot even be
  read (an outage, not a saved answer).
- An entry older than 23 h is first checked against Stripe's state, because
  Stripe may have forgotten its key: ``create_in_stripe`` lists customers
  with that email and reads their metadata (never Search, which lags).

Operations:

- ``customer.create``: ``POST /v1/customers``; the customer service links the
  result (and queues whatever changed locally meanwhile).
- ``customer.update``: ``POST /v1/customers/{id}`` with the changed fields.
- ``customer.tag``: ``POST /v1/customers/{id}`` writing or clearing our own
  metadata (``rational_customer_id``) on link and unlink; a customer that no
  longer exists has nothing to tag, so 404 completes it.
- ``customer.refresh``: ``GET /v1/customers/{id}``, applied by the customer
  service; used to revalidate after a same-second tie or a Stripe-created
  customer, so that reordered events converge on Stripe's state.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import attrs

from .._config import Mode
from ..domain.models import Customer, OutboxEntry, OutboxState, SyncState, Tenant
from ..errors import StripeAPIError
from ..ports import Clock, Storage, StripeAPI, Transaction

__all__ = [
    "CREATE_CUSTOMER",
    "REFRESH_CUSTOMER",
    "TAG_CUSTOMER",
    "UPDATE_CUSTOMER",
    "Outbox",
    "ResultHandler",
    "cancel_pending",
    "new_entry",
    "settled",
    "settled_state",
]

log = logging.getLogger("rational_billing.outbox")

CREATE_CUSTOMER = "customer.create"
UPDATE_CUSTOMER = "customer.update"
TAG_CUSTOMER = "customer.tag"
REFRESH_CUSTOMER = "customer.refresh"

_KEY_TTL = timedelta(hours=23)
_MAX_BACKOFF = timedelta(hours=1)
_SAME_5XX_LIMIT = 5
#: Operations that change Stripe, so that Stripe may replay a saved 5xx for them.
_MUTATING = frozenset({CREATE_CUSTOMER, UPDATE_CUSTOMER, TAG_CUSTOMER})

#: Applies what Stripe answered to the customer, inside the transaction that marks
#: the entry done: ``handler(tx, entry, customer, result)`` gets the customer as
#: locked there (None when it is gone) and returns it as it should be stored, or
#: None to leave it as it is. The outbox stores it, with its settled sync state.
ResultHandler = Callable[
    [Transaction, OutboxEntry, Customer | None, Mapping[str, Any]], Customer | None
]


def new_entry(
    *,
    tenant: str,
    mode: Mode,
    operation: str,
    customer_id: str,
    params: Mapping[str, Any],
    now: datetime,
) -> OutboxEntry:
    """A pending entry with a fresh idempotency key (one per local operation).

    Entries are pushed in (``created_at``, ``id``) order; the id starts with the
    wall-clock nanoseconds so that two entries written in the same instant of
    an injected (or coarse) clock still go out in the order they were written.
    """
    return OutboxEntry(
        id=f"{time.time_ns():016x}{uuid.uuid4().hex[:16]}",
        tenant=tenant,
        mode=mode,
        operation=operation,
        customer_id=customer_id,
        params=params,
        idempotency_key=f"rb-{uuid.uuid4()}",
        created_at=now,
    )


def cancel_pending(
    tx: Transaction,
    tenant: str,
    customer_id: str,
    *,
    operations: Iterable[str],
    reason: str,
    stripe_customer_id: str | None = None,
    created_before: datetime | None = None,
) -> list[OutboxEntry]:
    """Cancel the customer's pending entries of ``operations``; returns the ones still pending.

    Only entries aimed at ``stripe_customer_id`` (when given) and written
    before ``created_before`` (when given) are cancelled. A cancelled entry is
    never sent; its ``last_error`` says why. What is returned is the
    customer's queue as it now stands (pass it to `settled`).
    """
    wanted = frozenset(operations)
    remaining = []
    for entry in tx.outbox_for_customer(tenant, customer_id):
        if (
            entry.operation not in wanted
            or (
                stripe_customer_id is not None
                and entry.params.get("stripe_customer_id") != stripe_customer_id
            )
            or (created_before is not None and entry.created_at >= created_before)
        ):
            remaining.append(entry)
            continue
        tx.put_outbox(attrs.evolve(entry, state=OutboxState.CANCELLED, last_error=reason[:1000]))
    return remaining


def settled(customer: Customer, pending: Sequence[OutboxEntry]) -> Customer:
    """``customer`` with the sync state it settles in: pending while ``pending`` has entries.

    ``pending`` is the customer's queue (`Transaction.outbox_for_customer`)
    as it stands in the transaction that stores the customer.
    """
    if pending:
        state = SyncState.PENDING
    else:
        state = SyncState.LOCAL if customer.link is None else SyncState.SYNCED
    return customer if customer.sync_state is state else attrs.evolve(customer, sync_state=state)


def settled_state(tx: Transaction, customer: Customer) -> SyncState:
    """The customer's sync state once nothing else happens: pending while entries remain."""
    return settled(customer, tx.outbox_for_customer(customer.tenant, customer.id)).sync_state


def _backoff(attempts: int) -> timedelta:
    return min(timedelta(seconds=2 ** min(attempts, 20)), _MAX_BACKOFF)


class Outbox:
    """Pushes outbox entries to Stripe and records what happened.

    Example::

        outbox.push_pending()          # every due entry, oldest first
        outbox.push_customer("acme", "rc_1")  # one customer's entries, in order
    """

    def __init__(self, *, storage: Storage, stripe: StripeAPI, clock: Clock) -> None:
        self._storage = storage
        self._stripe = stripe
        self._clock = clock
        self._operations: dict[str, Callable[[OutboxEntry, str | None], dict[str, Any]]] = {
            CREATE_CUSTOMER: self._create_customer,
            UPDATE_CUSTOMER: self._update_customer,
            TAG_CUSTOMER: self._tag_customer,
            REFRESH_CUSTOMER: self._refresh_customer,
        }
        self._result_handlers: dict[str, ResultHandler] = {}

    def on_result(self, operation: str, handler: ResultHandler) -> None:
        """Apply Stripe's answer to ``operation`` entries with ``handler`` (one per operation)."""
        self._result_handlers[operation] = handler

    # -- reading -------------------------------------------------------------------
    def failed(self, *, limit: int = 100) -> Sequence[OutboxEntry]:
        """Entries Stripe refused for good, oldest first, each with its ``last_error``."""
        with self._storage.transaction() as tx:
            return list(tx.outbox_with_state(OutboxState.FAILED, limit=limit))

    # -- draining --------------------------------------------------------------
    def push_pending(self, *, limit: int = 1000) -> int:
        """Push every due entry, oldest first; returns how many Stripe accepted.

        Each customer's entries go out in the order they were written: one
        waiting out its backoff holds back the ones written after it.
        """
        with self._storage.transaction() as tx:
            due = list(tx.due_outbox(self._clock(), limit=limit))
        owners = dict.fromkeys((entry.tenant, entry.customer_id) for entry in due)
        return sum(self._push_queue(tenant, customer_id)[0] for tenant, customer_id in owners)

    def push_customer(self, tenant: str, customer_id: str) -> bool:
        """Push the customer's pending entries in order; True when none is left."""
        return self._push_queue(tenant, customer_id)[1]

    def _push_queue(self, tenant: str, customer_id: str) -> tuple[int, bool]:
        """Push the customer's entries in order until one is not due or fails.

        Returns how many Stripe accepted and whether none is left. Entries
        written while pushing (the update that follows a create) go out too.
        The first entry goes out as read with the queue; each later one is
        read again first, since pushing the ones before it took time.
        """
        accepted = 0
        pending: Sequence[OutboxEntry] | None = None
        while True:
            owner: Tenant | None = None
            if pending is None:
                with self._storage.transaction() as tx:
                    pending = list(tx.outbox_for_customer(tenant, customer_id))
                    owner = tx.get_tenant(tenant) if pending else None
            if not pending:
                return accepted, True
            now = self._clock()
            queue, pending = pending, None
            for position, entry in enumerate(queue):
                if entry.next_attempt_at is not None and entry.next_attempt_at > now:
                    return accepted, False
                if position == 0 and owner is not None:
                    done, pending = self._send(entry, owner)
                else:
                    done, pending = self._push(entry)
                if not done:
                    return accepted, False
                accepted += 1
                if pending is not None:
                    break  # go on with the queue as it now stands, read as this one was recorded

    def push(self, entry: OutboxEntry) -> bool:
        """Send one entry; True when Stripe accepted it (now or earlier)."""
        return self._push(entry)[0]

    def _push(self, entry: OutboxEntry) -> tuple[bool, list[OutboxEntry] | None]:
        """`push`, and the customer's queue as it stands after, when that was read."""
        with self._storage.transaction() as tx:
            current = tx.get_outbox(entry.id)
            owner = None if current is None else tx.get_tenant(current.tenant)
        if current is None or current.state is not OutboxState.PENDING:
            return current is not None and current.state is OutboxState.DONE, None
        return self._send(current, owner)

    def _send(
        self, current: OutboxEntry, tenant: Tenant | None
    ) -> tuple[bool, list[OutboxEntry] | None]:
        """Send a pending entry read with its tenant in one transaction, and record the answer.

        Returns whether Stripe accepted it, and the customer's queue as it
        stands once that was recorded (None when it was not read).
        """
        if tenant is None or not tenant.connected or current.mode not in tenant.modes:
            # Kept, not failed: the entry goes out once the tenant is connected again.
            waiting = StripeAPIError(
                f"tenant {current.tenant!r} is not connected in {current.mode.value} mode",
                retryable=True,
                tenant=current.tenant,
                mode=current.mode,
            )
            self._failed_attempt(current, waiting, permanent=False)
            return False, None
        account = None if tenant.direct else tenant.stripe_account_id
        try:
            result = self._operations[current.operation](current, account)
        except StripeAPIError as exc:
            if current.operation not in _MUTATING or not _repeats_5xx(current, exc):
                self._failed_attempt(current, exc, permanent=not exc.retryable)
                return False, None
            # Stripe may be replaying a saved 5xx under this key: its state decides.
            try:
                found = self._effect_in_stripe(current, account)
            except StripeAPIError:
                self._failed_attempt(current, exc, permanent=False)  # cannot tell: keep it
                return False, None
            if found is None:
                self._failed_attempt(current, exc, permanent=True)
                return False, None
            result = found
        return True, self._succeeded(current, result)

    # -- operations ------------------------------------------------------------------
    def _older_than_keys(self, entry: OutboxEntry) -> bool:
        # A crash may have sent an entry without recording the attempt, so age
        # alone decides: after 23 h Stripe may have forgotten the key.
        return self._clock() - entry.created_at > _KEY_TTL

    def _create_customer(self, entry: OutboxEntry, account: str | None) -> dict[str, Any]:
        if self._older_than_keys(entry):
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

    def _post_to_customer(self, entry: OutboxEntry, account: str | None) -> dict[str, Any]:
        stripe_id, params = _target(entry)
        if self._older_than_keys(entry):
            applied = self._applied_customer(entry, account)
            if applied is not None:
                return applied
        return self._stripe.request(
            "POST",
            f"/v1/customers/{stripe_id}",
            mode=entry.mode,
            account=account,
            params=params,
            idempotency_key=entry.idempotency_key,
        )

    def _applied_customer(self, entry: OutboxEntry, account: str | None) -> dict[str, Any] | None:
        """The Stripe customer when it already holds every value the entry sets, else None."""
        stripe_id, params = _target(entry)
        current = self._stripe.request(
            "GET", f"/v1/customers/{stripe_id}", mode=entry.mode, account=account
        )
        return current if _already_applied(current, params) else None

    def _effect_in_stripe(self, entry: OutboxEntry, account: str | None) -> dict[str, Any] | None:
        """What Stripe holds when the entry's effect is there (§4a.8), else None."""
        if entry.operation == CREATE_CUSTOMER:
            return self._find_created_customer(entry, account)
        return self._applied_customer(entry, account)

    def _update_customer(self, entry: OutboxEntry, account: str | None) -> dict[str, Any]:
        return self._post_to_customer(entry, account)

    def _tag_customer(self, entry: OutboxEntry, account: str | None) -> dict[str, Any]:
        try:
            return self._post_to_customer(entry, account)
        except StripeAPIError as exc:
            if exc.status == 404:
                # Gone from Stripe: there is no metadata left to write or clear.
                return {"id": entry.params["stripe_customer_id"], "deleted": True}
            raise

    def _refresh_customer(self, entry: OutboxEntry, account: str | None) -> dict[str, Any]:
        stripe_id = entry.params["stripe_customer_id"]
        try:
            return self._stripe.request(
                "GET", f"/v1/customers/{stripe_id}", mode=entry.mode, account=account
            )
        except StripeAPIError as exc:
            if exc.status == 404:
                return {"id": stripe_id, "object": "customer", "deleted": True}
            raise

    # -- bookkeeping --------------------------------------------------------------------
    def _succeeded(self, entry: OutboxEntry, result: Mapping[str, Any]) -> list[OutboxEntry] | None:
        """Record the entry done and apply Stripe's answer; returns the customer's queue after.

        None when the queue was not read: the entry was cancelled (or finished
        by another worker) meanwhile, or the customer is gone.
        """
        remaining: list[OutboxEntry] | None = None
        with self._storage.transaction() as tx:
            # The customer is locked first, as by every writer of a customer, so
            # that concurrent writers queue on it and never deadlock.
            customer = tx.lock_customer(entry.tenant, entry.customer_id)
            current = tx.get_outbox(entry.id)
            if current is not None and current.state is not OutboxState.PENDING:
                return None  # cancelled (or finished by another worker) meanwhile
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
            handler = self._result_handlers.get(entry.operation)
            if handler is not None:
                customer = handler(tx, entry, customer, result) or customer
            if customer is not None:
                remaining = list(tx.outbox_for_customer(entry.tenant, entry.customer_id))
                tx.put_customer(settled(customer, remaining))
        log.info(
            "outbox %s %s for %s/%s: done",
            entry.id,
            entry.operation,
            entry.tenant,
            entry.customer_id,
        )
        return remaining

    def _failed_attempt(self, entry: OutboxEntry, exc: StripeAPIError, *, permanent: bool) -> None:
        now = self._clock()
        attempts = entry.attempts + 1
        message = str(exc)[:1000]
        with self._storage.transaction() as tx:
            customer = tx.lock_customer(entry.tenant, entry.customer_id)
            current = tx.get_outbox(entry.id)
            if current is not None and current.state is not OutboxState.PENDING:
                return
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


def _repeats_5xx(entry: OutboxEntry, exc: StripeAPIError) -> bool:
    return (
        exc.status is not None
        and exc.status >= 500
        and entry.attempts + 1 >= _SAME_5XX_LIMIT
        and _same_failure(entry.last_error, exc)
    )


def _target(entry: OutboxEntry) -> tuple[str, dict[str, Any]]:
    """The Stripe customer an entry writes to, and the parameters it sends."""
    params = {k: v for k, v in entry.params.items() if k != "stripe_customer_id"}
    return str(entry.params["stripe_customer_id"]), params


def _same_failure(last_error: str | None, exc: StripeAPIError) -> bool:
    """True when ``last_error`` records the same answer as ``exc`` (request ids differ)."""
    if last_error is None or not exc.args:
        return False
    return last_error.startswith(str(exc.args[0])[:900]) and f"status={exc.status}" in last_error


def _already_applied(current: Mapping[str, Any], params: Mapping[str, Any]) -> bool:
    """True when the Stripe object already holds every value ``params`` would set."""
    if current.get("deleted"):
        return False
    for key, value in params.items():
        if key == "metadata" and isinstance(value, Mapping):
            metadata = current.get("metadata") or {}
            for meta_key, meta_value in value.items():
                if (metadata.get(meta_key) or "") != (meta_value or ""):
                    return False
        elif (current.get(key) or "") != (value or ""):
            return False
    return True
