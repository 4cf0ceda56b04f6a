"""URLs: Stripe webhooks at ``POST /stripe/webhooks/``, and the paid feature."""

from __future__ import annotations

from django.urls import include, path

from . import views

urlpatterns = [
    path("stripe/", include("rational_billing.contrib.django")),
    path(
        "<str:tenant>/customers/<str:customer_id>/reports/",
        views.reports,
        name="reports",
    ),
]
