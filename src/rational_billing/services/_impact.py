"""What a customer can access through a link: the input to a remap's impact.

`CustomerService` asks an ``access_for_link`` callable which products a
customer would have through a given link (or through none), and reports the
difference as the ``impact`` of `RemapConfirmationRequired`. `Billing` injects
the policy-aware version from the subscriptions service when it exists; this
module holds the default, which reads the current subscriptions only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from ..domain.models import CustomerLink, Subscription
from ..ports import Transaction

__all__ = ["AccessForLink", "DEFAULT_GRANTING", "current_access", "describe_impact"]

#: Returns the local product ids a customer of the tenant is granted through ``link``.
AccessForLink = Callable[[Transaction, str, CustomerLink | None], frozenset[str]]

#: Subscription statuses that grant access by default (DESIGN.md §3).
DEFAULT_GRANTING = frozenset({"active", "trialing"})


def current_access(tx: Transaction, tenant_id: str, link: CustomerLink | None) -> frozenset[str]:
    """The products that active or trialing subscriptions under ``link`` grant, from local data.

    Example::

        current_access(tx, "acme", CustomerLink(Mode.TEST, "cus_123"))  # frozenset({"pro"})
    """
    if link is None:
        return frozenset()
    granted: set[str] = set()
    subscriptions = tx.mirrors_for_customer(
        Subscription, tenant_id, link.mode, link.stripe_customer_id
    )
    for subscription in subscriptions:
        if subscription.status not in DEFAULT_GRANTING:
            continue
        for item in subscription.items:
            if item.stripe_product_id is None:
                continue
            for product in tx.products_by_stripe_product(
                tenant_id, link.mode, item.stripe_product_id
            ):
                granted.add(product.id)
    return frozenset(granted)


def describe_impact(
    *,
    tenant: str,
    customer_id: str,
    before: CustomerLink | None,
    after: CustomerLink | None,
    access_before: frozenset[str],
    access_after: frozenset[str],
) -> Mapping[str, object]:
    """The ``impact`` of a link change: which products are gained and lost, and the links."""
    return {
        "tenant": tenant,
        "customer_id": customer_id,
        "from": _describe_link(before),
        "to": _describe_link(after),
        "gained": tuple(sorted(access_after - access_before)),
        "lost": tuple(sorted(access_before - access_after)),
    }


def _describe_link(link: CustomerLink | None) -> Mapping[str, str] | None:
    if link is None:
        return None
    return {"mode": link.mode.value, "stripe_customer_id": link.stripe_customer_id}
