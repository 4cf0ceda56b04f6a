"""The access rules: how `AccessPolicy` judges a subscription, and history merges. Pure.

`judge` decides whether one subscription grants its products now, given the
facts the tracker gathered from local data (its latest unpaid invoice, lost
or open disputes, fully refunded invoices). It compares against ``now``, the
injected clock, so a grace period ends without any event (§4a.9).

The merge functions fold event history into a record in a way that does not
depend on delivery order, so that shuffled and duplicated deliveries end in
the state of one in-order delivery (§4.1, §4a.5):

- ``Invoice.first_failed_at`` is the earliest failure seen (a minimum);
- ``Subscription.past_due_since`` is the time of the latest event that changed
  the status to ``past_due`` (``previous_attributes.status`` says so), or,
  without such an event, the first time the current ``past_due`` spell was seen
  (see `merge_past_due`).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

import attrs

from .access import AccessPolicy, DenialReason
from .models import Invoice, Refund, Subscription

__all__ = [
    "OPEN_DISPUTE_STATUSES",
    "REFUND_COUNTING_STATUSES",
    "UNPAID_INVOICE_STATUSES",
    "SubscriptionFacts",
    "Verdict",
    "best_verdict",
    "is_full_refund",
    "judge",
    "merge_invoice",
    "merge_past_due",
    "refunded_amount",
]

#: Disputes that are open. ``warning_*`` are inquiries, which never change access.
OPEN_DISPUTE_STATUSES = frozenset({"needs_response", "under_review"})
LOST_DISPUTE_STATUS = "lost"
#: Refunds that count towards a full refund (the money is gone or going back).
REFUND_COUNTING_STATUSES = frozenset({"succeeded", "pending", "requires_action"})
UNPAID_INVOICE_STATUSES = frozenset({"open", "uncollectible"})
#: Statuses that end a subscription; they explain a denial only when nothing else does.
_ENDED = frozenset({"canceled", "incomplete_expired"})


@attrs.frozen
class SubscriptionFacts:
    """A subscription and the related local facts its access depends on."""

    subscription: Subscription
    #: The subscription's latest unpaid invoice, for the grace period.
    unpaid_invoice: Invoice | None = None
    #: A lost dispute on one of its payments (the dispute id).
    lost_dispute: str | None = None
    #: An open (not ``warning_*``) dispute on one of its payments.
    open_dispute: str | None = None
    #: One of its invoices refunded in full (the invoice id).
    refunded_invoice: str | None = None


@attrs.frozen
class Verdict:
    """Whether one subscription grants its products now, and why (not)."""

    granted: bool
    subscription: Subscription
    grace_until: datetime | None = None
    reason: DenialReason | None = None
    message: str = ""


def judge(policy: AccessPolicy, facts: SubscriptionFacts, now: datetime) -> Verdict:
    """Apply ``policy`` to one subscription at ``now``."""
    sub = facts.subscription
    verdict = _judge_status(policy, facts, now)
    if not verdict.granted:
        return verdict
    if facts.lost_dispute is not None and policy.revoke_on_lost_dispute:
        return _deny(
            sub,
            DenialReason.LOST_DISPUTE,
            f"dispute {facts.lost_dispute} on a payment of {sub.stripe_id} was lost",
        )
    if facts.refunded_invoice is not None and policy.revoke_on_full_refund:
        return _deny(
            sub,
            DenialReason.FULL_REFUND,
            f"invoice {facts.refunded_invoice} of {sub.stripe_id} was refunded in full",
        )
    if facts.open_dispute is not None and policy.suspend_on_open_dispute:
        return _deny(
            sub,
            DenialReason.OPEN_DISPUTE,
            f"dispute {facts.open_dispute} on a payment of {sub.stripe_id} is open",
        )
    return verdict


def _deny(sub: Subscription, reason: DenialReason, message: str) -> Verdict:
    return Verdict(False, sub, reason=reason, message=message)


def _judge_status(policy: AccessPolicy, facts: SubscriptionFacts, now: datetime) -> Verdict:
    sub = facts.subscription
    if sub.status in policy.granting_statuses:
        return Verdict(True, sub)
    if sub.status != "past_due":
        return _deny(sub, DenialReason.STATUS, f"subscription {sub.stripe_id} is {sub.status}")
    invoice = facts.unpaid_invoice
    if invoice is not None and invoice.status == "uncollectible":
        # Stripe stopped retrying: no payment is coming for the grace to wait for.
        return _deny(
            sub,
            DenialReason.UNPAID_BEYOND_GRACE,
            f"subscription {sub.stripe_id} is past_due and invoice {invoice.stripe_id} "
            "was marked uncollectible",
        )
    start = grace_start(sub, invoice)
    until = start + policy.past_due_grace
    if now < until:
        return Verdict(True, sub, grace_until=until)
    return _deny(
        sub,
        DenialReason.UNPAID_BEYOND_GRACE,
        f"subscription {sub.stripe_id} is past_due since {start.isoformat()} and the "
        f"grace period ended at {until.isoformat()}",
    )


def grace_start(sub: Subscription, unpaid_invoice: Invoice | None) -> datetime:
    """Where ``past_due_grace`` counts from (§4a.9).

    The first failed payment of the latest unpaid invoice; without one, the
    event that made the subscription past_due; without that, its marker.
    """
    if unpaid_invoice is not None and unpaid_invoice.first_failed_at is not None:
        return unpaid_invoice.first_failed_at
    if sub.past_due_since is not None:
        return sub.past_due_since
    return sub.marker


def best_verdict(verdicts: Iterable[Verdict]) -> Verdict | None:
    """The verdict that explains a product: a grant if any, else the most telling denial.

    Among grants, one without a grace deadline wins, then the latest deadline.
    Among denials, a live subscription's reason beats an ended one's, then the
    most recent subscription's.
    """
    found = sorted(verdicts, key=_rank, reverse=True)
    return found[0] if found else None


def _rank(v: Verdict) -> tuple[int, int, float, datetime, str]:
    sub = v.subscription
    no_deadline = 1 if v.grace_until is None else 0
    deadline = v.grace_until.timestamp() if v.grace_until is not None else 0.0
    live = 0 if sub.status in _ENDED else 1
    return (int(v.granted), no_deadline if v.granted else live, deadline, sub.marker, sub.stripe_id)


# -- refunds ----------------------------------------------------------------------


def refunded_amount(refunds: Iterable[Refund]) -> int:
    """The amount the refunds give back (failed and canceled ones give back nothing)."""
    return sum(r.amount for r in refunds if r.status in REFUND_COUNTING_STATUSES)


def is_full_refund(refunded: int, amount_paid: int) -> bool:
    """True when ``refunded`` equals (or exceeds) what was paid on the invoice (§4a.10)."""
    return amount_paid > 0 and refunded >= amount_paid


# -- history merges -------------------------------------------------------------------


def merge_invoice(stored: Invoice | None, incoming: Invoice, failed_at: datetime | None) -> Invoice:
    """``incoming`` with the earliest failure known: the stored one or ``failed_at``.

    ``failed_at`` is the ``created`` time of an ``invoice.payment_failed`` (or
    ``payment_action_required``) event. A minimum does not depend on order.
    """
    candidates = [
        t
        for t in (
            incoming.first_failed_at,
            None if stored is None else stored.first_failed_at,
            failed_at,
        )
        if t is not None
    ]
    first = min(candidates) if candidates else None
    if first == incoming.first_failed_at:
        return incoming
    return attrs.evolve(incoming, first_failed_at=first)


def merge_past_due(
    stored: Subscription | None, incoming: Subscription, *, transition: bool, applied: bool
) -> Subscription | None:
    """The subscription to store with its past_due history folded in; None when nothing changes.

    ``incoming`` is what an event (or a fetch) showed at ``incoming.marker``.
    ``transition`` is true when the event changed the status to ``past_due``
    (``previous_attributes`` has ``status``). ``applied`` says whether
    ``incoming`` is at least as new as ``stored``: then it is the state to
    store; otherwise (a stale event) only its history is folded into ``stored``.

    Every fact is a maximum or a minimum, so the result does not depend on the
    order of delivery as long as every event arrives:

    - ``past_due_changed_at``: the latest change to past_due;
    - ``not_past_due_at``: the latest time it was seen in another status;
    - ``past_due_seen_at``: the first time it was seen past_due after that.

    ``past_due_since`` is the change to past_due when it is not older than the
    last time the subscription was seen in another status, else the first sighting.
    """
    applied = applied or stored is None  # nothing stored: the incoming state is all there is
    base = incoming if applied or stored is None else stored
    changed = None if stored is None else stored.past_due_changed_at
    not_past_due = None if stored is None else stored.not_past_due_at
    seen = None if stored is None else stored.past_due_seen_at
    at = incoming.marker
    if incoming.status == "past_due":
        if transition:
            changed = at if changed is None else max(changed, at)
        if not_past_due is None or at > not_past_due:
            seen = at if seen is None else min(seen, at)
    else:
        if not_past_due is None or at > not_past_due:
            not_past_due = at
        if seen is not None and seen <= not_past_due:
            seen = None
    if changed is not None and (not_past_due is None or changed >= not_past_due):
        since: datetime | None = changed
    else:
        since = seen
    merged = attrs.evolve(
        base,
        past_due_since=since,
        past_due_changed_at=changed,
        not_past_due_at=not_past_due,
        past_due_seen_at=seen,
    )
    if not applied and merged == stored:
        return None
    return merged
