"""`WebhookRouter`: verify, route and apply Stripe webhook events exactly once.

The flow of `WebhookRouter.handle`:

1. verify the ``Stripe-Signature`` header against every configured secret
   (400 and nothing stored when it fails);
2. parse the body with ``json.loads`` into plain data (400 when malformed);
3. check that a ``livemode=true`` event was verified by a live secret (§4a.2);
4. in one storage transaction: resolve the tenant from ``account``, insert the
   event id if absent (a duplicate answers 200), run the handlers registered
   for the exact type, and store the outcome;
5. after the commit, run the work the handlers deferred (emails, revalidation).

A handler that raises rolls the transaction back; the failure is recorded in a
transaction of its own and the answer is 500, so Stripe retries.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import attrs

from .._config import BillingConfig, Mode
from ..domain.models import EventOutcome, ProcessedEvent, Tenant
from ..errors import BillingError, WebhookError, WebhookPayloadError, WebhookSignatureError
from ..ports import Clock, Storage, Transaction
from ._signature import SigningSecret, verify_signature

__all__ = ["EventContext", "Handler", "HandlerResult", "WebhookResponse", "WebhookRouter"]

log = logging.getLogger("rational_billing.webhooks")

#: Stored outcomes that a new delivery (or a connection) applies again.
_REAPPLY = frozenset({EventOutcome.FAILED, EventOutcome.HELD})


@attrs.frozen
class WebhookResponse:
    """What to answer Stripe: ``status_code``, plus what happened, for logs and tests."""

    status_code: int
    outcome: EventOutcome | None = None
    event_id: str | None = None
    message: str = ""

    @property
    def body(self) -> bytes:
        """A small JSON body for the HTTP response."""
        data: dict[str, Any] = {"status": self.outcome.value if self.outcome else "rejected"}
        if self.message:
            data["message"] = self.message
        return json.dumps(data).encode()


@attrs.frozen
class HandlerResult:
    """A handler's verdict when it did not simply apply the event."""

    outcome: EventOutcome
    reason: str | None = None


@attrs.define
class EventContext:
    """What a handler sees: the verified event, its tenant and mode, and the transaction."""

    tx: Transaction
    tenant: Tenant
    mode: Mode
    event: Mapping[str, Any]
    created: datetime
    _after_commit: list[Callable[[], None]]

    @property
    def type(self) -> str:
        """The event type, such as ``customer.updated``."""
        return str(self.event["type"])

    @property
    def object(self) -> Mapping[str, Any]:
        """``data.object``: the Stripe object the event is about."""
        obj: Mapping[str, Any] = self.event["data"]["object"]
        return obj

    def after_commit(self, work: Callable[[], None]) -> None:
        """Run ``work`` once the event's transaction has committed (never if it rolls back)."""
        self._after_commit.append(work)


#: A handler receives the context and returns None (applied) or a `HandlerResult`.
Handler = Callable[[EventContext], HandlerResult | None]


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is not None:
        return value
    lowered = name.lower()
    for key, value in headers.items():
        if key.lower() == lowered:
            return value
    return None


def _parse_event(payload: bytes) -> dict[str, Any]:
    try:
        event = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise WebhookPayloadError("the body is not JSON") from exc
    if not isinstance(event, dict):
        raise WebhookPayloadError("the body is not a JSON object")
    event_id = event.get("id")
    if not isinstance(event_id, str) or not event_id.startswith("evt_"):
        raise WebhookPayloadError("the event has no evt_ id")
    if not isinstance(event.get("type"), str) or not event["type"]:
        raise WebhookPayloadError(f"event {event_id} has no type")
    if not isinstance(event.get("livemode"), bool):
        raise WebhookPayloadError(f"event {event_id} has no livemode flag")
    created = event.get("created")
    if not isinstance(created, int) or isinstance(created, bool) or created < 0:
        raise WebhookPayloadError(f"event {event_id} has no valid created time")
    data = event.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("object"), dict):
        raise WebhookPayloadError(f"event {event_id} has no data.object")
    account = event.get("account")
    if account is not None and (not isinstance(account, str) or not account.startswith("acct_")):
        raise WebhookPayloadError(f"event {event_id} has a malformed account")
    return event


class WebhookRouter:
    """Receives Stripe webhooks for every tenant and mode and applies them exactly once.

    Built-in handlers are registered by `Billing`; `on` adds custom ones, which
    run after the built-in ones in the same transaction.

    Example::

        @billing.webhooks.on("invoice.paid")
        def notify(ctx):
            ...

        response = billing.webhooks.handle(request.body, request.headers)
    """

    def __init__(self, *, config: BillingConfig, storage: Storage, clock: Clock) -> None:
        self._config = config
        self._storage = storage
        self._clock = clock
        self._handlers: dict[str, list[Handler]] = {}
        self._custom: dict[str, list[Handler]] = {}
        secrets: list[SigningSecret] = []
        for mode in Mode:
            keys = config.keys_for(mode)
            if keys is not None:
                secrets.extend((s.encode(), mode) for s in keys.webhook_secrets)
        self._secrets = tuple(secrets)

    # -- registration ----------------------------------------------------------
    def register(self, event_type: str, handler: Handler) -> None:
        """Register a built-in handler for one exact event type (used by `Billing`)."""
        self._handlers.setdefault(event_type, []).append(handler)

    def on(self, event_type: str) -> Callable[[Handler], Handler]:
        """Decorator: run the function for events of exactly ``event_type``.

        It runs after the built-in handlers, inside the same transaction; if it
        raises, the whole event rolls back and Stripe is asked to retry.
        """
        if not event_type or "*" in event_type:
            raise ValueError("register handlers by exact event type, such as 'invoice.paid'")

        def decorator(handler: Handler) -> Handler:
            self._custom.setdefault(event_type, []).append(handler)
            return handler

        return decorator

    @property
    def handled_types(self) -> frozenset[str]:
        """Every event type with at least one handler."""
        return frozenset(self._handlers) | frozenset(self._custom)

    # -- ingestion ---------------------------------------------------------------
    def handle(self, payload: bytes, headers: Mapping[str, str]) -> WebhookResponse:
        """Verify and apply one delivery; never raises for bad input.

        Returns 200 for applied, duplicate, ignored, stale and held events, 400
        for a bad signature or body (nothing stored), 500 when applying failed
        (rolled back, the failure recorded) so that Stripe retries.
        """
        try:
            event = self._verify(payload, headers)
        except WebhookError as exc:
            log.warning("webhook rejected: %s", exc)
            return WebhookResponse(400, message=str(exc))
        return self._apply(event, payload)

    def _verify(self, payload: bytes, headers: Mapping[str, str]) -> dict[str, Any]:
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise WebhookPayloadError("pass the raw body bytes, untouched")
        body = bytes(payload)
        modes = verify_signature(
            body,
            _header(headers, "Stripe-Signature"),
            self._secrets,
            now=self._clock().timestamp(),
            tolerance=self._config.webhook_tolerance,
        )
        event = _parse_event(body)
        if event["livemode"] and Mode.LIVE not in modes:
            raise WebhookSignatureError(
                f"live-mode event {event['id']} is not signed with a live webhook secret"
            )
        return event

    def _apply(self, event: dict[str, Any], payload: bytes) -> WebhookResponse:
        event_id: str = event["id"]
        mode = Mode.from_livemode(event["livemode"])
        account: str | None = event.get("account")
        created = datetime.fromtimestamp(event["created"], UTC)
        after: list[Callable[[], None]] = []
        record = ProcessedEvent(
            event_id=event_id,
            type=event["type"],
            mode=mode,
            created=created,
            outcome=EventOutcome.PENDING,
            account=account,
            api_version=event.get("api_version")
            if isinstance(event.get("api_version"), str)
            else None,
            payload=bytes(payload),
            received_at=self._clock(),
        )
        try:
            with self._storage.transaction() as tx:
                outcome, reason, tenant_id = self._apply_in(tx, event, record, mode, created, after)
        except Exception as exc:
            log.exception("webhook %s (%s) failed and was rolled back", event_id, event["type"])
            self._record_failure(record, exc)
            return WebhookResponse(500, EventOutcome.FAILED, event_id, "processing failed; retry")
        self._run_after_commit(after, event_id)
        log.info(
            "webhook %s %s tenant=%s mode=%s: %s%s",
            event_id,
            event["type"],
            tenant_id,
            mode.value,
            outcome.value,
            f" ({reason})" if reason else "",
        )
        return WebhookResponse(200, outcome, event_id, reason or "")

    def _apply_in(
        self,
        tx: Transaction,
        event: dict[str, Any],
        record: ProcessedEvent,
        mode: Mode,
        created: datetime,
        after: list[Callable[[], None]],
    ) -> tuple[EventOutcome, str | None, str | None]:
        account = record.account
        tenant = tx.tenant_by_account(account) if account else tx.direct_tenant()
        if not tx.record_event(record):
            stored = tx.get_event(record.event_id)
            if stored is None or stored.outcome not in _REAPPLY:
                return EventOutcome.DUPLICATE, None, stored.tenant if stored else None
            record = attrs.evolve(record, attempts=stored.attempts)
        if tenant is None:
            reason = (
                f"account {account} is not connected yet" if account else "no direct tenant yet"
            )
            tx.update_event(attrs.evolve(record, outcome=EventOutcome.HELD, reason=reason))
            return EventOutcome.HELD, reason, None
        outcome, why = self._dispatch(tx, tenant, event, mode, created, after)
        tx.update_event(
            attrs.evolve(
                record, tenant=tenant.id, outcome=outcome, reason=why, attempts=record.attempts + 1
            )
        )
        return outcome, why, tenant.id

    def _dispatch(
        self,
        tx: Transaction,
        tenant: Tenant,
        event: dict[str, Any],
        mode: Mode,
        created: datetime,
        after: list[Callable[[], None]],
    ) -> tuple[EventOutcome, str | None]:
        if not tenant.connected:
            return EventOutcome.IGNORED, f"tenant {tenant.id} is disconnected"
        if mode not in tenant.modes:
            return EventOutcome.IGNORED, f"tenant {tenant.id} is not connected in {mode.value} mode"
        event_type = event["type"]
        builtin = self._handlers.get(event_type, ())
        custom = self._custom.get(event_type, ())
        if not builtin and not custom:
            return EventOutcome.IGNORED, f"no handler for {event_type}"
        ctx = EventContext(tx, tenant, mode, event, created, after)
        outcome, reason = EventOutcome.APPLIED, None
        for handler in builtin:
            result = handler(ctx)
            if result is not None:
                outcome, reason = result.outcome, result.reason
        for handler in custom:
            handler(ctx)
        return outcome, reason

    def _record_failure(self, record: ProcessedEvent, exc: BaseException) -> None:
        failed = attrs.evolve(
            record,
            outcome=EventOutcome.FAILED,
            reason=f"{type(exc).__name__}: {exc}"[:1000],
            attempts=record.attempts + 1,
        )
        try:
            with self._storage.transaction() as tx:
                stored = tx.get_event(record.event_id)
                if stored is None:
                    tx.record_event(failed)
                elif stored.outcome is EventOutcome.FAILED:
                    tx.update_event(attrs.evolve(failed, attempts=stored.attempts + 1))
        except BillingError:
            log.exception("could not record the failure of webhook %s", record.event_id)

    def _run_after_commit(self, work: list[Callable[[], None]], event_id: str) -> None:
        for job in work:
            try:
                job()
            except Exception:
                # Deferred work is durable (an invitation row, a revalidation
                # marker) and retried by sync.push_pending(): the event stays applied.
                log.exception("deferred work after webhook %s failed; it will be retried", event_id)

    # -- held events --------------------------------------------------------------
    def apply_held(self, account: str | None) -> int:
        """Apply the events held for ``account`` (None: the direct tenant), oldest first.

        Called when that account is connected. Returns how many were applied.
        """
        applied = 0
        with self._storage.transaction() as tx:
            held = [
                e
                for e in tx.events_with_outcome(EventOutcome.HELD, account=account, limit=10_000)
                if e.account == account
            ]
        for stored in held:
            if stored.payload is None:
                continue
            event = json.loads(stored.payload)
            response = self._apply(event, stored.payload)
            applied += response.status_code == 200
        return applied
