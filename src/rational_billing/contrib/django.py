"""Django adapter: a view and a URL include that feed Stripe webhooks to ``billing.webhooks.handle``.

The `Billing` comes from the ``RATIONAL_BILLING`` setting, which is a `Billing`,
or the dotted path of one, or the dotted path of a zero-argument callable that
returns one (called on every request, so make it return a shared instance,
for example with `functools.cache`)::

    # settings.py
    RATIONAL_BILLING = "myproject.billing.get_billing"

    # urls.py
    from django.urls import include, path

    urlpatterns = [path("stripe/", include("rational_billing.contrib.django"))]  # POST /stripe/webhooks/

Or pass the `Billing` explicitly, without the setting::

    urlpatterns = [path("stripe/", include(urls(billing)))]
    # or a single view: path("stripe/webhooks/", make_view(billing))

The view is exempt from CSRF (Stripe cannot send a token; the signature is the
check), answers 405 to anything but POST, and hands ``request.body`` (the raw
bytes, never decoded or parsed) and ``request.headers`` to the router. It
answers with the router's status code and small JSON body: 200 for applied,
duplicate, ignored, stale and held events, 400 for a bad signature or body, 500
so that Stripe retries.

This module needs the ``django`` extra; without Django, importing it raises
`ConfigError` saying ``pip install 'rational-billing[django]'``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from ..billing import Billing
from ..errors import ConfigError

_MISSING_EXTRA: Final = "rational_billing.contrib.django needs the 'django' extra: pip install 'rational-billing[django]'"

try:
    from django.conf import settings
    from django.http import HttpRequest, HttpResponse
    from django.urls import URLPattern, path
    from django.utils.module_loading import import_string
    from django.views.decorators.csrf import csrf_exempt
    from django.views.decorators.http import require_POST
except ImportError as exc:
    raise ConfigError(_MISSING_EXTRA) from exc

__all__ = ["get_billing", "make_view", "urls", "webhook_view", "urlpatterns"]

#: The Django setting that names the `Billing`.
SETTING: Final = "RATIONAL_BILLING"

#: The URL namespace of `urlpatterns` and `urls`: ``reverse("rational_billing:webhooks")``.
app_name: Final = "rational_billing"

View = Callable[[HttpRequest], HttpResponse]


def get_billing() -> Billing:
    """The `Billing` named by the ``RATIONAL_BILLING`` setting.

    The setting holds a `Billing`, or the dotted path of a `Billing` or of a
    zero-argument callable returning one.

    Raises:
        ConfigError: the setting is missing, cannot be imported, or does not
            lead to a `Billing`.
    """
    value: Any = getattr(settings, SETTING, None)
    if value is None:
        raise ConfigError(
            f"set {SETTING} to a Billing or the dotted path of one (or of a function returning one)"
        )
    if isinstance(value, str):
        try:
            value = import_string(value)
        except ImportError as exc:
            raise ConfigError(f"{SETTING} = {value!r} cannot be imported: {exc}") from exc
        if not isinstance(value, Billing) and callable(value):
            value = value()
    if not isinstance(value, Billing):
        raise ConfigError(f"{SETTING} must lead to a Billing, got {type(value).__name__}")
    return value


def make_view(billing: Billing | None = None) -> View:
    """A CSRF-exempt, POST-only view that hands webhooks to ``billing``.

    With ``billing=None`` the view calls `get_billing` on every request.

    Raises:
        ConfigError: ``billing`` is given and is not a `Billing`.
    """
    if billing is not None and not isinstance(billing, Billing):
        raise ConfigError(f"make_view needs a Billing, got {type(billing).__name__}")

    def receive_webhook(request: HttpRequest) -> HttpResponse:
        """Verify and apply one Stripe webhook delivery."""
        target = billing if billing is not None else get_billing()
        # request.body is the raw bytes; request.headers is case-insensitive.
        result = target.webhooks.handle(request.body, request.headers)
        return HttpResponse(result.body, status=result.status_code, content_type="application/json")

    view: View = csrf_exempt(require_POST(receive_webhook))
    return view


#: The webhook view for the ``RATIONAL_BILLING`` setting.
webhook_view: View = make_view()


def _patterns(view: View) -> list[URLPattern]:
    return [path("webhooks/", view, name="webhooks")]


def urls(billing: Billing | None = None) -> tuple[list[URLPattern], str]:
    """URL patterns for ``include()``: ``path("stripe/", include(urls(billing)))``.

    They serve ``webhooks/`` under the namespace ``rational_billing``. With
    ``billing=None`` the view reads the ``RATIONAL_BILLING`` setting.

    Raises:
        ConfigError: ``billing`` is given and is not a `Billing`.
    """
    return _patterns(make_view(billing)), app_name


#: For ``include("rational_billing.contrib.django")``: the view for the setting.
urlpatterns: list[URLPattern] = _patterns(webhook_view)
