"""Access: the policy a host sets, and the answers an access check gives. Pure: no I/O.

`AccessPolicy` says which states grant a product; `AccessSummary` (with
`Grant`, `Denial` and `DenialReason`) says what a customer was granted and
why not the rest. The rules that apply the policy are in ``access_rules``.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import Any

import attrs

from .._config import Mode
from ..errors import ConfigError
from .models import CustomerLink
from .normalize import SUBSCRIPTION_STATUSES

__all__ = ["AccessPolicy", "AccessSummary", "Denial", "DenialReason", "Grant"]


def _freeze(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping))


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
        unknown = sorted(self.granting_statuses - SUBSCRIPTION_STATUSES)
        if unknown:
            raise ConfigError(f"unknown subscription status(es) in granting_statuses: {unknown}")
        if self.past_due_grace < timedelta(0):
            raise ConfigError("past_due_grace must not be negative")


# -- what an access check answers ----------------------------------------------------


class DenialReason(enum.Enum):
    """Why a product is not granted (`AccessSummary.denied`)."""

    NO_LINK = "no_link"  # the customer is not linked to a Stripe customer
    NO_SUBSCRIPTION = "no_subscription"  # no subscription of the linked customer has the product
    STATUS = "status"  # the subscription's status grants nothing (canceled, incomplete, ...)
    UNPAID_BEYOND_GRACE = "unpaid_beyond_grace"  # past_due, and the grace period is over
    LOST_DISPUTE = "lost_dispute"  # a payment of the subscription was disputed and lost
    OPEN_DISPUTE = "open_dispute"  # an open dispute, with suspend_on_open_dispute
    FULL_REFUND = "full_refund"  # an invoice of the subscription was refunded in full
    UNMAPPED_PRODUCT = "unmapped_product"  # the product maps to no Stripe product in that mode
    DISCONNECTED_TENANT = "disconnected_tenant"  # the tenant (or that mode) is not connected


@attrs.frozen
class Denial:
    """Why one product is denied: the reason, a sentence for people, and the subscription."""

    reason: DenialReason
    message: str
    subscription_id: str | None = None
    status: str | None = None

    def __str__(self) -> str:
        return self.message


@attrs.frozen
class Grant:
    """Which subscription grants a product, its status, and when a grace period ends.

    ``grace_until`` is set while a ``past_due`` subscription still grants
    access (`AccessPolicy.past_due_grace`); access ends then without any event.
    """

    subscription_id: str
    status: str
    mode: Mode
    grace_until: datetime | None = None


@attrs.frozen
class AccessSummary:
    """Everything a customer is granted, and why every other product of the tenant is not.

    ``products`` is the set of local product ids granted, ``grants`` says by
    which subscription, and ``denied`` maps every other product id of the
    tenant to a `Denial`. ``unmapped_stripe_products`` lists Stripe products
    the customer subscribes to that no local product maps to.

    Example::

        summary = billing.subscriptions.access("acme", "cust_1")
        if "pro" not in summary.products:
            print(summary.denied["pro"].message)
    """

    tenant: str
    customer_id: str
    link: CustomerLink | None
    products: frozenset[str] = frozenset()
    grants: Mapping[str, Grant] = attrs.field(factory=dict, converter=_freeze)
    denied: Mapping[str, Denial] = attrs.field(factory=dict, converter=_freeze)
    unmapped_stripe_products: frozenset[str] = frozenset()
