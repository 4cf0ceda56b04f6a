"""Thin adapters that mount ``billing.webhooks.handle`` in web frameworks.

- `rational_billing.contrib.flask`: ``init_app(app, billing)`` and a blueprint
  (needs the ``flask`` extra).
- `rational_billing.contrib.django`: a view and a URL include (needs the
  ``django`` extra).

Both hand the request's raw body bytes to the router untouched: the
signature is computed over those exact bytes, so a decoded and re-encoded body
would never verify. Importing this package imports neither framework.
"""
