"""The project's own views: a paid feature gated on local billing data."""

from __future__ import annotations

from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_GET

from rational_billing import Billing
from rational_billing.contrib.django import get_billing
from rational_billing.errors import CustomerNotFound, TenantNotConnected

#: The local product that the reports feature needs.
REPORTS = "reports"


def can_use(billing: Billing, tenant: str, customer_id: str, product_id: str) -> bool:
    """Whether the customer may use the product, from local data only.

    TODO: switch to ``billing.subscriptions.has_access(tenant, customer_id,
    product_id)`` once subscriptions are wired into `Billing`; until then a
    customer linked to Stripe counts as a paying one (see README.md).

    Raises:
        CustomerNotFound: no such customer in that tenant.
    """
    return billing.customers.get(tenant, customer_id).link is not None


@require_GET
def reports(request: HttpRequest, tenant: str, customer_id: str) -> JsonResponse:
    """The paid feature: 402 until the customer pays, 404 for an unknown customer."""
    try:
        allowed = can_use(get_billing(), tenant, customer_id, REPORTS)
    except (CustomerNotFound, TenantNotConnected) as exc:
        return JsonResponse({"error": str(exc)}, status=404)
    if not allowed:
        return JsonResponse({"error": "subscribe to use reports"}, status=402)
    return JsonResponse({"customer": customer_id, "report": "all numbers are up"})
