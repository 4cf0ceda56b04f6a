"""A Flask host app that bills its tenants' customers with rational_billing.

It shows the three things every host app does:

1. build one `Billing` at start-up (from ``RB_*`` environment variables, with
   `SQLStorage` on ``RB_STORAGE_URL``, a SQLite file by default);
2. mount the Stripe webhook endpoint with ``init_app`` (``POST /stripe/webhooks``);
3. gate a paid feature on local data, without calling Stripe per request.

Run it (after ``pip install 'rational-billing[flask,sql]'``)::

    export RB_TEST_SECRET_KEY=sk_test_... RB_TEST_WEBHOOK_SECRETS=whsec_...
    flask --app app run
"""

from __future__ import annotations

from typing import Any

from flask import Flask, jsonify

from rational_billing import Billing, BillingConfig
from rational_billing.contrib.flask import get_billing, init_app
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


def create_app(billing: Billing | None = None) -> Flask:
    """The app. Tests pass their own `Billing`; production builds it from the environment."""
    app = Flask(__name__)
    init_app(app, billing if billing is not None else Billing(config=BillingConfig.from_env()))

    @app.get("/<tenant>/customers/<customer_id>/reports")
    def reports(tenant: str, customer_id: str) -> Any:
        """The paid feature: 402 until the customer pays."""
        if not can_use(get_billing(), tenant, customer_id, REPORTS):
            return jsonify(error="subscribe to use reports"), 402
        return jsonify(customer=customer_id, report="all numbers are up")

    @app.errorhandler(CustomerNotFound)
    @app.errorhandler(TenantNotConnected)
    def not_found(error: Exception) -> Any:
        return jsonify(error=str(error)), 404

    return app
