"""Access rules: which Stripe states grant a product. Pure: no I/O.

The policy value lives here from the start because `Billing` takes it; the
rules that read it grow with the subscriptions work.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta

import attrs

from ..errors import ConfigError

__all__ = ["AccessPolicy"]

_KNOWN_STATUSES = frozenset(
    {
        "active",
        "trialing",
        "past_due",
        "unpaid",
        "paused",
        "incomplete",
        "incomplete_expired",
        "canceled",
    }
)


def _statuses(value: object) -> frozenset[str]:
    if isinstance(value, str):
        raise ConfigError("granting_statuses must be a set of statuses, not one string")
    if not isinstance(value, Iterable):
        raise ConfigError("granting_statuses must be a set of statuses")
    return frozenset(str(v) for v in value)


@attrs.frozen
class AccessPolicy:
    """What grants access, and what a failed payment, dispute or refund takes away.

    Args:
        granting_statuses: subscription statuses that grant their products.
        past_due_grace: how long ``past_due`` still grants access, counted from
            the first failed payment of the latest unpaid invoice (§4a.9).
        revoke_on_lost_dispute: a lost dispute revokes the disputed subscription.
        suspend_on_open_dispute: an open dispute suspends access until it closes.
        revoke_on_full_refund: a fully refunded invoice revokes its subscription.

    Raises:
        ConfigError: an unknown status, or a negative grace period.
    """

    granting_statuses: frozenset[str] = attrs.field(
        default=frozenset({"active", "trialing"}), converter=_statuses
    )
    past_due_grace: timedelta = timedelta(0)
    revoke_on_lost_dispute: bool = True
    suspend_on_open_dispute: bool = False
    revoke_on_full_refund: bool = False

    def __attrs_post_init__(self) -> None:
        unknown = sorted(self.granting_statuses - _KNOWN_STATUSES)
        if unknown:
            raise ConfigError(f"unknown subscription status(es) in granting_statuses: {unknown}")
        if self.past_due_grace < timedelta(0):
            raise ConfigError("past_due_grace must not be negative")
