"""`WebhookRouter`: verify, route and apply Stripe webhook events exactly once.

Three ways in, one way to apply:

- `WebhookRouter.handle` verifies a delivery and applies it before answering;
- `WebhookRouter.receive` verifies it and only stores it as ``pending``;
  workers apply it later with `WebhookRouter.process_pending` (inbox mode);
- `WebhookRouter.replay` applies stored events again.

Verification: the ``Stripe-Signature`` header is checked against the
configured secrets (400 and nothing stored when it fails), the body is parsed
with orjson into plain dicts and lists (400 when malformed), and a
``livemode=true`` event must be verified by a live secret (§4a.2).

Applying (shared by every way in): in one storage transaction, resolve the
tenant from ``account``, insert the event id if absent (a duplicate answers
200), run the handlers registered for the exact type, and store the outcome;
after the commit, run the work the handlers deferred (emails, revalidation).
A stored event that is ``pending``, ``failed`` or ``held`` is applied again
when it is delivered again, under a row lock, so that two deliveries (or a
delivery and a worker) never both apply it. A handler that raises rolls the
transaction back; the failure is recorded in a transaction of its own, with
the time of the next retry, and `handle` answers 500 so that Stripe retries.
"""

from __future__ import annotations

import json
import logging
import random
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any, Final

import attrs
import orjson

from .._config import BillingConfig, Mode
from ..domain.models import EventOutcome, ProcessedEvent, Tenant
from ..errors import (
    InvalidArgument,
    StorageError,
    WebhookError,
    WebhookPayloadError,
    WebhookSignatureError,
)
from ..ports import Clock, Storage, Transaction
from ._signature import SignatureVerifier, SigningSecret

__all__ = [
    "EventContext",
    "Handler",
    "HandlerResult",
    "ReplayReport",
    "WebhookResponse",
    "WebhookRouter",
]

log = logging.getLogger("rational_billing.webhooks")

_PENDING: Final = EventOutcome.PENDING
_FAILED: Final = EventOutcome.FAILED
_HELD: Final = EventOutcome.HELD
_APPLIED: Final = EventOutcome.APPLIED
_DUPLICATE: Final = EventOutcome.DUPLICATE

#: Stored outcomes that a new delivery, a worker or a connection applies (again).
_REAPPLY: Final = frozenset({_PENDING, _FAILED, _HELD})

#: Retries of failed events: 30 s, 1 min, 2 min, ... capped at 1 h between
#: attempts; after `MAX_ATTEMPTS` the event stays ``failed`` (visible, and
#: replayable by hand) and is not retried on its own.
RETRY_BASE: Final = timedelta(seconds=30)
RETRY_CAP: Final = timedelta(hours=1)
MAX_ATTEMPTS: Final = 25
#: An event that this many inbox workers claimed without recording an outcome
#: (they died applying it: out of memory, killed at a time limit) is given up.
MAX_UNFINISHED_CLAIMS: Final = 5
#: How long a worker holds the events it claimed before others may take them.
DEFAULT_LEASE: Final = timedelta(minutes=5)
#: `WebhookRouter.process_pending` applies claimed events this many per transaction.
APPLY_BATCH: Final = 50
#: How many times an event is applied when the storage fails transiently
#: (`StorageError.transient`: a deadlock between workers, say) before it is
#: recorded failed.
TRANSIENT_TRIES: Final = 3

# Stripe ids are ASCII letters and digits after their prefix. Anything else
# (a NUL, a space, a look-alike letter) is not an event Stripe sent, and some
# databases cannot even store it.
_EVENT_ID: Final = re.compile(r"evt_[A-Za-z0-9_]{1,255}")
_ACCOUNT_ID: Final = re.compile(r"acct_[A-Za-z0-9]{1,255}")
_EVENT_TYPE: Final = re.compile(r"[A-Za-z0-9_.\-]{1,255}")

_REPLAY_PAGE = 100
_HELD_BATCH = 10_000


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
        return orjson.dumps(data)


@attrs.frozen
class HandlerResult:
    """A handler's verdict when it did not simply apply the event."""

    outcome: EventOutcome
    reason: str | None = None


def _frozen_counts(counts: Mapping[EventOutcome, int]) -> Mapping[EventOutcome, int]:
    return MappingProxyType(dict(counts))


@attrs.frozen
class ReplayReport:
    """What `WebhookRouter.replay` did.

    ``outcomes`` counts the replayed events by their new outcome; ``failed``
    lists the ids whose handlers raised (rolled back, recorded ``failed`` and
    scheduled for a retry); ``missing`` lists requested ids that are not
    stored, or stored without their body.
    """

    replayed: int = 0
    outcomes: Mapping[EventOutcome, int] = attrs.field(factory=dict, converter=_frozen_counts)
    failed: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()


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


_BOM: Final = b"\xef\xbb\xbf"


def _loads(payload: bytes, *, stored: bool) -> Any:
    try:
        # UTF-8 only, as Stripe sends it; a byte order mark is allowed (RFC 8259 §8.1).
        return orjson.loads(payload[3:] if payload.startswith(_BOM) else payload)
    except orjson.JSONDecodeError:  # invalid UTF-8 included
        if not stored:
            raise
    # Stored before orjson, when the json module parsed bodies: what it took applies.
    return json.loads(payload)


def _parse_event(payload: bytes, *, stored: bool = False) -> dict[str, Any]:
    try:
        event = _loads(payload, stored=stored)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise WebhookPayloadError("the body is not JSON") from exc
    if type(event) is not dict:
        raise WebhookPayloadError("the body is not a JSON object")
    event_id = event.get("id")
    if type(event_id) is not str or not _EVENT_ID.fullmatch(event_id):
        raise WebhookPayloadError("the event has no evt_ id")
    event_type = event.get("type")
    if type(event_type) is not str or not _EVENT_TYPE.fullmatch(event_type):
        raise WebhookPayloadError(f"event {event_id} has no valid type")
    if type(event.get("livemode")) is not bool:
        raise WebhookPayloadError(f"event {event_id} has no livemode flag")
    created = event.get("created")
    if type(created) is not int or created < 0:
        raise WebhookPayloadError(f"event {event_id} has no valid created time")
    data = event.get("data")
    if type(data) is not dict or type(data.get("object")) is not dict:
        raise WebhookPayloadError(f"event {event_id} has no data.object")
    account = event.get("account")
    if account is not None and (type(account) is not str or not _ACCOUNT_ID.fullmatch(account)):
        raise WebhookPayloadError(f"event {event_id} has a malformed account")
    return event


def _stored_body(stored: ProcessedEvent) -> tuple[dict[str, Any] | None, str]:
    """A stored event's parsed body, or None and why it cannot be applied."""
    if stored.payload is None:
        return None, "the stored event has no body to apply"
    try:
        return _parse_event(stored.payload, stored=True), ""
    except WebhookPayloadError as exc:
        return None, f"the stored body cannot be applied: {exc}"


def _sort_claimed(
    claimed: Sequence[ProcessedEvent],
) -> tuple[list[ProcessedEvent], list[ProcessedEvent], list[ProcessedEvent]]:
    """Claimed events as (batch, suspects, writes): see `WebhookRouter._claim`.

    Every recorded outcome sets ``claims`` back to 0, so an event whose claim
    made it more than 1 was claimed before by a worker that never recorded
    one: it died. The writes release every suspect but the first (as it was
    before this claim: due again at once) and give up the events claimed
    `MAX_UNFINISHED_CLAIMS` times without an outcome.
    """
    batch: list[ProcessedEvent] = []
    suspects: list[ProcessedEvent] = []
    writes: list[ProcessedEvent] = []
    for event in claimed:
        unfinished = event.claims - 1
        if unfinished >= MAX_UNFINISHED_CLAIMS:
            reason = (
                f"given up: {unfinished} workers claimed it and never recorded an outcome "
                "(they may have died applying it)"
            )
            log.error("webhook %s: %s", event.event_id, reason)
            writes.append(
                attrs.evolve(event, outcome=_FAILED, reason=reason, next_attempt_at=None, claims=0)
            )
        elif unfinished:
            if suspects:
                writes.append(attrs.evolve(event, claims=event.claims - 1))
            else:
                suspects.append(event)
        else:
            batch.append(event)
    return batch, suspects, writes


class _StoredMeanwhile(Exception):
    """A concurrent delivery stored the event first: roll back ours, answer 'duplicate'."""


def _new_record(
    event: Mapping[str, Any],
    payload: bytes,
    outcome: EventOutcome,
    received_at: datetime,
    *,
    tenant: str | None = None,
    reason: str | None = None,
    attempts: int = 0,
    next_attempt_at: datetime | None = None,
) -> ProcessedEvent:
    api_version = event.get("api_version")
    return ProcessedEvent(
        event_id=event["id"],
        type=event["type"],
        mode=Mode.LIVE if event["livemode"] else Mode.TEST,
        created=datetime.fromtimestamp(event["created"], UTC),
        outcome=outcome,
        tenant=tenant,
        account=event.get("account"),
        api_version=api_version if type(api_version) is str else None,
        reason=reason,
        payload=payload,
        attempts=attempts,
        received_at=received_at,
        next_attempt_at=next_attempt_at,
    )


def _retry_at(now: datetime, attempts: int) -> datetime | None:
    """When a worker retries an event that has failed ``attempts`` times (None: give up)."""
    if attempts >= MAX_ATTEMPTS:
        return None
    delay: timedelta = min(RETRY_BASE * 2 ** max(attempts - 1, 0), RETRY_CAP)
    return now + delay


class WebhookRouter:
    """Receives Stripe webhooks for every tenant and mode and applies them exactly once.

    Built-in handlers are registered by `Billing`; `on` adds custom ones, which
    run after the built-in ones in the same transaction.

    Example::

        @billing.webhooks.on("invoice.paid")
        def notify(ctx):
            ...

        response = billing.webhooks.handle(request.body, request.headers)

    Inbox mode, for scale: the endpoint only stores the event, and workers (in
    any number of processes or hosts sharing PostgreSQL) apply it::

        response = billing.webhooks.receive(request.body, request.headers)  # the endpoint
        while True:                                                          # each worker
            if not billing.webhooks.process_pending(limit=50):
                time.sleep(1)
    """

    def __init__(self, *, config: BillingConfig, storage: Storage, clock: Clock) -> None:
        self._config = config
        self._storage = storage
        self._clock = clock
        self._tolerance = config.webhook_tolerance
        self._handlers: dict[str, list[Handler]] = {}
        self._custom: dict[str, list[Handler]] = {}
        secrets: list[SigningSecret] = []
        for mode in Mode:
            keys = config.keys_for(mode)
            if keys is not None:
                secrets.extend((s.encode(), mode) for s in keys.webhook_secrets)
        self._verifier = SignatureVerifier(secrets)

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
        now = self._clock()
        try:
            event, body = self._verify(payload, headers, now)
        except WebhookError as exc:
            log.warning("webhook rejected: %s", exc)
            return WebhookResponse(400, message=str(exc))
        return self._apply(event, body, now)

    def receive(self, payload: bytes, headers: Mapping[str, str]) -> WebhookResponse:
        """Verify one delivery and store it ``pending`` for `process_pending`; never raises.

        The same checks as `handle` (400, nothing stored, when they fail); then
        one insert-if-absent. Returns 200 with outcome ``pending`` for a new
        event, 200 ``duplicate`` for an id already stored (left as it is), and
        500 when the storage failed, so that Stripe delivers it again.
        """
        now = self._clock()
        try:
            event, body = self._verify(payload, headers, now)
        except WebhookError as exc:
            log.warning("webhook rejected: %s", exc)
            return WebhookResponse(400, message=str(exc))
        record = _new_record(event, body, _PENDING, now, next_attempt_at=now)
        try:
            with self._storage.transaction() as tx:
                inserted = tx.record_event(record)
        except Exception:
            log.exception("could not store webhook %s; asking Stripe to retry", record.event_id)
            return WebhookResponse(500, None, record.event_id, "could not store the event; retry")
        if not inserted:
            return WebhookResponse(200, _DUPLICATE, record.event_id)
        return WebhookResponse(200, _PENDING, record.event_id, "queued")

    def _verify(
        self, payload: bytes, headers: Mapping[str, str], moment: datetime
    ) -> tuple[dict[str, Any], bytes]:
        if type(payload) is not bytes:
            if not isinstance(payload, bytes | bytearray | memoryview):
                raise WebhookPayloadError("pass the raw body bytes, untouched")
            payload = bytes(payload)
        header = _header(headers, "Stripe-Signature")
        now = moment.timestamp()
        mode = self._verifier.verify(payload, header, now=now, tolerance=self._tolerance)
        event = _parse_event(payload)
        if (
            event["livemode"]
            and mode is not Mode.LIVE
            and not self._verifier.verified_by_live(
                payload, header, now=now, tolerance=self._tolerance
            )
        ):
            raise WebhookSignatureError(
                f"live-mode event {event['id']} is not signed with a live webhook secret"
            )
        return event, payload

    # -- inbox workers -------------------------------------------------------------
    def process_pending(self, limit: int = 100, *, lease: timedelta = DEFAULT_LEASE) -> int:
        """Apply up to ``limit`` stored events that are due; returns how many were taken.

        Due: events stored by `receive` and failed events whose retry time has
        come. Safe to run in several processes and hosts at once. Events are
        taken in batches of up to `APPLY_BATCH`: the claim leases a batch for
        ``lease`` in a transaction of its own (PostgreSQL: ``FOR UPDATE SKIP
        LOCKED``, so other workers take other events); then the batch is
        locked in one statement and applied in one transaction, each event
        exactly as `handle` would apply it, and its deferred work (emails)
        runs once it has committed. An event that a redelivery applied
        meanwhile is skipped; a redelivery during the batch waits for it and
        answers ``duplicate``. If anything in a batch raises, the batch rolls
        back and its events are applied again one transaction each, so that a
        failing event is recorded ``failed`` on its own (and retried with
        backoff) and the others are applied. A worker that dies mid-batch
        (killed, out of memory) leaves its batch leased: the others go on
        with other events and take it once the lease has run out, one event
        per claim, so that an event that kills its worker is found out (and
        given up after `MAX_UNFINISHED_CLAIMS` claims) without holding up
        the rest.

        Raises:
            InvalidArgument: ``limit`` is not a positive integer.
            StorageError: the claim failed, after retrying a transient
                failure (if its commit was cut off, what it may have leased
                falls due again when the lease runs out).
        """
        if type(limit) is not int or limit < 1:
            raise InvalidArgument(f"limit must be a positive integer, got {limit!r}")
        taken = 0
        while taken < limit:
            wanted = min(APPLY_BATCH, limit - taken)
            claimed = self._claim_and_apply(wanted, lease)
            taken += claimed
            if claimed < wanted:
                break
        return taken

    def _claim(
        self, limit: int, lease: timedelta
    ) -> tuple[list[ProcessedEvent], ProcessedEvent | None]:
        """Lease up to ``limit`` due events in a transaction of their own.

        Returns the events to apply as a batch and at most one *suspect*: an
        event claimed before by a worker that never recorded an outcome for
        it (it died). A suspect is applied on its own, and the other suspects
        are released at once for the next claims, so that an event that
        kills its worker holds up nothing else. An event claimed
        `MAX_UNFINISHED_CLAIMS` times without an outcome is given up
        (recorded failed). A transient storage failure is retried.
        """
        attempt = 1
        while True:
            try:
                with self._storage.transaction() as tx:
                    claimed = tx.claim_events(self._clock(), limit=limit, lease=lease)
                    batch, suspects, writes = _sort_claimed(claimed)
                    tx.update_events(writes)
                return batch, (suspects[0] if suspects else None)
            except StorageError as exc:
                if not exc.transient or attempt >= TRANSIENT_TRIES:
                    raise
                log.info("claiming webhooks: %s; trying again", exc)
                attempt += 1

    def _claim_and_apply(self, limit: int, lease: timedelta) -> int:
        """Claim up to ``limit`` due events and apply them; returns how many were taken.

        The claim commits first, so that a worker that dies while applying
        (killed, out of memory) leaves its events leased: the others go on
        with other events, and take these when the lease runs out, one at a
        time (see `_claim`). The batch is applied first, then the suspect, on
        its own.
        """
        batch, suspect = self._claim(limit, lease)
        if batch:
            self._apply_batch(batch)
        if suspect is not None:
            self._apply_stored(suspect, force=False)
        return len(batch) + (suspect is not None)

    def _apply_batch(self, claimed: Sequence[ProcessedEvent]) -> None:
        """Apply claimed events in one transaction; one transaction each if that fails.

        The batch is locked in one statement (`Transaction.lock_events`); an
        event that a redelivery or another worker applied meanwhile is
        skipped. If applying raises, the batch rolls back and its events are
        applied again one transaction each (each locked as `handle` locks it).
        """
        ready: list[tuple[ProcessedEvent, dict[str, Any], bytes]] = []
        done: list[tuple[dict[str, Any], EventOutcome, str | None, str | None]] = []
        deferred: list[tuple[str, list[Callable[[], None]]]] = []
        failing: int | None = None  # the event being applied, while one is
        try:
            with self._storage.transaction() as tx:
                locked = {e.event_id: e for e in tx.lock_events([e.event_id for e in claimed])}
                # The batch's outcomes are written together, at its end.
                updates: list[ProcessedEvent] = []
                for claim in claimed:
                    stored = locked.get(claim.event_id)
                    if stored is None or stored.outcome not in _REAPPLY:
                        continue  # applied meanwhile (a redelivery, or after our lease)
                    event, problem = _stored_body(stored)
                    if event is None:
                        log.error("webhook %s cannot be applied: %s", stored.event_id, problem)
                        updates.append(
                            attrs.evolve(
                                stored,
                                outcome=_FAILED,
                                reason=problem,
                                next_attempt_at=None,
                                claims=0,
                            )
                        )
                        continue
                    assert stored.payload is not None
                    ready.append((stored, event, stored.payload))
                for current, (stored, event, payload) in enumerate(ready):
                    failing = current
                    after: list[Callable[[], None]] = []
                    outcome, reason, tenant_id = self._apply_in(
                        tx, event, payload, stored.received_at, False, after, stored, updates
                    )
                    done.append((event, outcome, reason, tenant_id))
                    if after:
                        deferred.append((event["id"], after))
                failing = None
                tx.update_events(updates)
        except Exception as exc:
            # Nothing of the batch committed. An event whose handler raised
            # is recorded failed (its handlers ran once, as in `handle`); the
            # others, and every event when the storage failed (such as a
            # deadlock between two workers' batches), are applied again one
            # transaction each.
            log.warning(
                "a batch of %d webhooks rolled back; applying them one by one",
                len(claimed),
                exc_info=True,
            )
            if isinstance(exc, StorageError):
                failing = None
            if failing is not None:
                stored, event, payload = ready[failing]
                now = self._clock()
                self._record_failure(event, payload, exc, now, stored.received_at, False)
            for claim in claimed:
                if failing is None or claim.event_id != ready[failing][0].event_id:
                    self._apply_stored(claim, force=False)
            return
        for event_id, work in deferred:
            self._run_after_commit(work, event_id)
        if log.isEnabledFor(logging.INFO):
            for event, outcome, reason, tenant_id in done:
                log.info(
                    "webhook %s %s tenant=%s: %s%s",
                    event["id"],
                    event["type"],
                    tenant_id,
                    outcome.value,
                    f" ({reason})" if reason else "",
                )

    def _apply_stored(self, stored: ProcessedEvent, *, force: bool) -> WebhookResponse | None:
        """Apply a stored event from its body; None when the body is gone or unreadable."""
        event, problem = _stored_body(stored)
        if event is None or stored.payload is None:
            self._give_up(stored, problem)
            return None
        return self._apply(
            event,
            stored.payload,
            self._clock(),
            received_at=stored.received_at,
            force=force,
        )

    def _give_up(self, stored: ProcessedEvent, reason: str) -> None:
        log.error("webhook %s cannot be applied: %s", stored.event_id, reason)
        with self._storage.transaction() as tx:
            current = tx.lock_event(stored.event_id)
            if current is not None and current.outcome in _REAPPLY:
                tx.update_event(
                    attrs.evolve(
                        current, outcome=_FAILED, reason=reason, next_attempt_at=None, claims=0
                    )
                )

    # -- applying (shared by handle, process_pending, apply_held and replay) ----------
    def _apply(
        self,
        event: dict[str, Any],
        payload: bytes,
        now: datetime,
        *,
        received_at: datetime | None = None,
        force: bool = False,
    ) -> WebhookResponse:
        event_id: str = event["id"]
        attempt = 1
        while True:
            after: list[Callable[[], None]] = []
            try:
                with self._storage.transaction() as tx:
                    outcome, reason, tenant_id = self._apply_in(
                        tx, event, payload, received_at or now, force, after
                    )
                break
            except _StoredMeanwhile:
                return WebhookResponse(200, _DUPLICATE, event_id)
            except StorageError as exc:
                if exc.transient and attempt < TRANSIENT_TRIES:
                    # A deadlock with a concurrent transaction, say: nothing
                    # was committed, so run the event again.
                    log.info("webhook %s: %s; applying it again", event_id, exc)
                    attempt += 1
                    time.sleep(random.uniform(0, 0.01 * attempt))  # noqa: S311 (jitter)
                    continue
                log.exception("webhook %s (%s) failed and was rolled back", event_id, event["type"])
                return self._failed(event, payload, exc, now, received_at, force)
            except Exception as exc:
                log.exception("webhook %s (%s) failed and was rolled back", event_id, event["type"])
                return self._failed(event, payload, exc, now, received_at, force)
        if after:
            self._run_after_commit(after, event_id)
        if log.isEnabledFor(logging.INFO):
            log.info(
                "webhook %s %s tenant=%s: %s%s",
                event_id,
                event["type"],
                tenant_id,
                outcome.value,
                f" ({reason})" if reason else "",
            )
        return WebhookResponse(200, outcome, event_id, reason or "")

    def _failed(
        self,
        event: dict[str, Any],
        payload: bytes,
        exc: Exception,
        now: datetime,
        received_at: datetime | None,
        force: bool,
    ) -> WebhookResponse:
        self._record_failure(event, payload, exc, now, received_at, force)
        return WebhookResponse(500, _FAILED, event["id"], "processing failed; retry")

    def _apply_in(
        self,
        tx: Transaction,
        event: dict[str, Any],
        payload: bytes,
        received_at: datetime,
        force: bool,
        after: list[Callable[[], None]],
        claimed: ProcessedEvent | None = None,
        updates: list[ProcessedEvent] | None = None,
    ) -> tuple[EventOutcome, str | None, str | None]:
        # A stored event is locked, so that a concurrent delivery or worker
        # applying it waits and then sees our outcome. One that this
        # transaction claimed is locked already.
        stored = claimed if claimed is not None else tx.lock_event(event["id"])
        if stored is not None and not (force or stored.outcome in _REAPPLY):
            return _DUPLICATE, None, stored.tenant
        account: str | None = event.get("account")
        tenant = tx.tenant_by_account(account) if account else tx.direct_tenant()
        attempts = 0 if stored is None else stored.attempts
        if tenant is None:
            outcome: EventOutcome = _HELD
            why: str | None = (
                f"account {account} is not connected yet" if account else "no direct tenant yet"
            )
        else:
            outcome, why = self._dispatch(tx, tenant, event, after)
            attempts += 1
        tenant_id = None if tenant is None else tenant.id
        if stored is not None:
            record = attrs.evolve(
                stored,
                outcome=outcome,
                reason=why,
                tenant=tenant_id,
                attempts=attempts,
                payload=stored.payload or payload,
                next_attempt_at=None,
                claims=0,
            )
            if updates is None:
                tx.update_event(record)
            else:
                updates.append(record)  # written by the caller with the others
        elif not tx.record_event(
            _new_record(
                event,
                payload,
                outcome,
                received_at,
                tenant=tenant_id,
                reason=why,
                attempts=attempts,
            )
        ):
            # The id is inserted if absent in the same transaction as the effects:
            # a concurrent delivery got there first (PostgreSQL made us wait for
            # its commit), so ours roll back.
            raise _StoredMeanwhile
        return outcome, why, tenant_id

    def _dispatch(
        self,
        tx: Transaction,
        tenant: Tenant,
        event: dict[str, Any],
        after: list[Callable[[], None]],
    ) -> tuple[EventOutcome, str | None]:
        mode = Mode.LIVE if event["livemode"] else Mode.TEST
        if not tenant.connected:
            return EventOutcome.IGNORED, f"tenant {tenant.id} is disconnected"
        if mode not in tenant.modes:
            return EventOutcome.IGNORED, f"tenant {tenant.id} is not connected in {mode.value} mode"
        event_type: str = event["type"]
        builtin = self._handlers.get(event_type, ())
        custom = self._custom.get(event_type, ())
        if not builtin and not custom:
            return EventOutcome.IGNORED, f"no handler for {event_type}"
        created = datetime.fromtimestamp(event["created"], UTC)
        ctx = EventContext(tx, tenant, mode, event, created, after)
        outcome, reason = _APPLIED, None
        for handler in builtin:
            result = handler(ctx)
            if result is not None:
                outcome, reason = result.outcome, result.reason
        for handler in custom:
            handler(ctx)
        return outcome, reason

    def _record_failure(
        self,
        event: dict[str, Any],
        payload: bytes,
        exc: BaseException,
        now: datetime,
        received_at: datetime | None,
        force: bool,
    ) -> None:
        reason = f"{type(exc).__name__}: {exc}"[:1000]
        try:
            with self._storage.transaction() as tx:
                stored = tx.lock_event(event["id"])
                if stored is None:
                    failed = _new_record(event, payload, _FAILED, received_at or now)
                    tx.record_event(
                        attrs.evolve(
                            failed, reason=reason, attempts=1, next_attempt_at=_retry_at(now, 1)
                        )
                    )
                elif force or stored.outcome in _REAPPLY:
                    attempts = stored.attempts + 1
                    tx.update_event(
                        attrs.evolve(
                            stored,
                            outcome=_FAILED,
                            reason=reason,
                            attempts=attempts,
                            payload=stored.payload or payload,
                            next_attempt_at=_retry_at(now, attempts),
                            claims=0,
                        )
                    )
                # Otherwise a concurrent delivery applied it meanwhile: keep that.
        except Exception:
            log.exception("could not record the failure of webhook %s", event["id"])

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
                for e in tx.events_with_outcome(_HELD, account=account, limit=_HELD_BATCH)
                if e.account == account
            ]
        for stored in held:
            response = self._apply_stored(stored, force=False)
            applied += response is not None and response.status_code == 200
        return applied

    # -- replay ---------------------------------------------------------------------
    def replay(
        self,
        event_ids: Iterable[str] | None = None,
        *,
        since: datetime | None = None,
        types: Iterable[str] | None = None,
    ) -> ReplayReport:
        """Apply stored events again, through the same handlers, whatever their outcome.

        Selects the events with the ids given (in that order), else every
        stored event in the storage's order (`Transaction.list_events`: the
        order stored, or received on PostgreSQL); ``since`` (received at or after)
        and ``types`` narrow either selection. Each event is applied in a
        transaction of its own, as `handle` would. Handlers are idempotent
        (ordered upserts, insert-if-absent rows such as invitations), so a
        replay repairs missed effects and never doubles one. The stored
        outcome becomes the replay's.

        Raises:
            InvalidArgument: ``since`` is naive, or ``event_ids``/``types`` is a
                bare string.
            StorageError: listing the stored events failed.
        """
        if isinstance(event_ids, str) or isinstance(types, str):
            raise InvalidArgument("pass event ids and types as lists, not a single string")
        if since is not None and since.tzinfo is None:
            raise InvalidArgument("since must be an aware datetime (for example in UTC)")
        wanted = None if types is None else frozenset(types)
        counts: dict[EventOutcome, int] = {}
        failed: list[str] = []
        missing: list[str] = []
        replayed = 0
        for stored in self._replay_selection(event_ids, since, wanted, missing):
            response = self._apply_stored(stored, force=True)
            if response is None:
                missing.append(stored.event_id)
                continue
            replayed += 1
            if response.outcome is not None:
                counts[response.outcome] = counts.get(response.outcome, 0) + 1
            if response.status_code != 200:
                failed.append(stored.event_id)
        return ReplayReport(replayed, counts, tuple(failed), tuple(missing))

    def _replay_selection(
        self,
        event_ids: Iterable[str] | None,
        since: datetime | None,
        types: frozenset[str] | None,
        missing: list[str],
    ) -> Iterable[ProcessedEvent]:
        if event_ids is not None:
            for event_id in event_ids:
                with self._storage.transaction() as tx:
                    stored = tx.get_event(event_id)
                if stored is None:
                    missing.append(event_id)
                elif (since is None or stored.received_at >= since) and (
                    types is None or stored.type in types
                ):
                    yield stored
            return
        after: str | None = None
        while True:
            with self._storage.transaction() as tx:
                page = tx.list_events(since=since, types=types, after=after, limit=_REPLAY_PAGE)
            yield from page
            if len(page) < _REPLAY_PAGE:
                return
            after = page[-1].event_id
