"""Flask adapter: a blueprint that feeds Stripe webhooks to ``billing.webhooks.handle``.

Example::

    from flask import Flask
    from rational_billing.contrib.flask import get_billing, init_app

    app = Flask(__name__)
    init_app(app, billing)  # POST /stripe/webhooks

    @app.get("/reports/<customer_id>")
    def reports(customer_id):
        customer = get_billing().customers.get("acme", customer_id)
        ...

The view hands ``request.get_data()`` (the raw body bytes, never parsed or
decoded by Flask) and the request headers to the router, and answers with the
router's status code and small JSON body: 200 for applied, duplicate, ignored,
stale and held events, 400 for a bad signature or body, 500 so that Stripe
retries. Other methods than POST get 405.

This module needs the ``flask`` extra; without Flask, importing it raises
`ConfigError` saying ``pip install 'rational-billing[flask]'``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final, cast

from ..billing import Billing
from ..errors import ConfigError

_MISSING_EXTRA: Final = (
    "rational_billing.contrib.flask needs the 'flask' extra: pip install 'rational-billing[flask]'"
)

try:
    from flask import Blueprint, Flask, Response, current_app, request
except ImportError as exc:
    raise ConfigError(_MISSING_EXTRA) from exc

__all__ = ["blueprint", "get_billing", "init_app"]

#: The key under ``app.extensions`` where `init_app` stores the `Billing`.
EXTENSION_KEY: Final = "rational_billing"


def get_billing() -> Billing:
    """The `Billing` that `init_app` stored on the current app.

    Raises:
        ConfigError: `init_app` was not called for the current app.
        RuntimeError: called outside an application context (Flask's own error).
    """
    billing = current_app.extensions.get(EXTENSION_KEY)
    if not isinstance(billing, Billing):
        raise ConfigError(
            "no Billing on this Flask app: call rational_billing.contrib.flask.init_app(app, billing)"
        )
    return billing


def blueprint(
    billing: Billing | None = None,
    *,
    name: str = "rational_billing",
    rule: str = "/webhooks",
    endpoint: str = "webhooks",
) -> Blueprint:
    """A blueprint with one view, ``POST <rule>``, that hands webhooks to ``billing``.

    With ``billing=None`` the view uses the `Billing` that `init_app` stored on
    the app handling the request, which suits application factories. The view
    is named ``f"{name}.{endpoint}"`` for ``url_for``.

    Example::

        app.register_blueprint(blueprint(billing), url_prefix="/stripe")
    """
    bp = Blueprint(name, __name__)

    def receive_webhook() -> Response:
        target = billing if billing is not None else get_billing()
        # request.headers is werkzeug's case-insensitive EnvironHeaders; it has
        # the .get/.items the router uses, without copying.
        headers = cast("Mapping[str, str]", request.headers)
        result = target.webhooks.handle(request.get_data(), headers)
        return Response(result.body, status=result.status_code, mimetype="application/json")

    receive_webhook.__doc__ = "Verify and apply one Stripe webhook delivery."
    bp.add_url_rule(rule, endpoint=endpoint, view_func=receive_webhook, methods=["POST"])
    return bp


def init_app(
    app: Flask,
    billing: Billing,
    *,
    url_prefix: str = "/stripe",
    endpoint: str = "webhooks",
    rule: str = "/webhooks",
) -> Flask:
    """Store ``billing`` on ``app`` and mount the webhook view at ``url_prefix + rule``.

    After this, `get_billing` returns ``billing`` inside the app's contexts and
    ``url_for("rational_billing." + endpoint)`` names the webhook URL (by
    default ``/stripe/webhooks``).

    Raises:
        ConfigError: ``billing`` is not a `Billing`.
    """
    if not isinstance(billing, Billing):
        raise ConfigError(f"init_app needs a Billing, got {type(billing).__name__}")
    app.extensions[EXTENSION_KEY] = billing
    app.register_blueprint(
        blueprint(rule=rule, endpoint=endpoint), url_prefix=url_prefix.rstrip("/") or None
    )
    return app
