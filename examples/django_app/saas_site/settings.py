"""Settings of the example project: only what the example needs.

``RATIONAL_BILLING`` names the function that returns the project's one
`Billing`; `rational_billing.contrib.django` reads it.
"""

from __future__ import annotations

import os

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "dev-only-not-a-secret")
DEBUG = os.environ.get("DJANGO_DEBUG") == "1"
ALLOWED_HOSTS = ["localhost", "127.0.0.1", "testserver"]

# No app needs models: rational_billing keeps its own tables (SQLStorage).
INSTALLED_APPS: list[str] = []

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
    # On, as in any real project: the webhook view is exempt (the signature is
    # the check), everything else stays protected.
    "django.middleware.csrf.CsrfViewMiddleware",
]

ROOT_URLCONF = "saas_site.urls"
USE_TZ = True

RATIONAL_BILLING = "saas_site.billing.get_billing"
