"""rational_billing.contrib.django: the webhook view and URL include, driven by Django's real test client.

Django's settings can be configured once per process: a session fixture does it
(unless something else already has) with CSRF middleware on, and each test
sets its own ``ROOT_URLCONF`` and ``RATIONAL_BILLING`` with ``override_settings``.
"""

from __future__ import annotations

import importlib
import json
import sys
import types
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from rational_billing import (
    Billing,
    BillingConfig,
    EventOutcome,
    ModeKeys,
)
from rational_billing.errors import ConfigError
from rational_billing.testing import (
    InMemoryStorage,
    RecordingMailer,
    build_customer,
    make_event,
    sign_payload,
)
from tests.helpers import NoStripe, link_directly, stored_event

SECRET = "whsec_django_test"
NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
TS = int(NOW.timestamp())
URL = "/stripe/webhooks/"
UNUSUAL_NAME = 'Zoë Ünïcødé 🚀 \u2028 \\"quoted\\"'

#: Set per test through monkeypatch, for RATIONAL_BILLING given as a dotted path.
CURRENT: Billing | None = None


def current_billing() -> Billing | None:
    """The Billing of the running test (RATIONAL_BILLING as a dotted path to a callable)."""
    return CURRENT


def _billing() -> Billing:
    config = BillingConfig(test=ModeKeys(secret_key="sk_test_abc", webhook_secrets=(SECRET,)))
    billing = Billing(
        config=config,
        storage=InMemoryStorage(),
        mailer=RecordingMailer(),
        clock=lambda: NOW,
        stripe=NoStripe(),
    )
    billing.tenants.register_direct("acme")
    return billing


def _event(email: str = "new@example.com", name: str = "New") -> dict[str, Any]:
    return make_event(
        "customer.updated", build_customer(id="cus_D1", email=email, name=name), created=TS
    )


def _urlconf(*patterns: Any) -> types.ModuleType:
    module = types.ModuleType("rb_test_urls")
    module.urlpatterns = list(patterns)  # type: ignore[attr-defined]
    return module


#: CSRF protection on, so the tests prove the webhook view is exempt.
MIDDLEWARE = [
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
]


@pytest.fixture(scope="session")
def django_configured() -> None:
    """Configure Django once for the session, unless something (an example app) already did."""
    import django
    from django.conf import settings

    if not settings.configured:
        settings.configure(
            DEBUG=False,
            SECRET_KEY="rb-tests-not-secret",
            ALLOWED_HOSTS=["testserver"],
            INSTALLED_APPS=[],
            MIDDLEWARE=MIDDLEWARE,
            ROOT_URLCONF=None,
            USE_TZ=True,
        )
        django.setup()


@pytest.fixture(autouse=True)
def _django_settings(django_configured: None) -> Iterator[None]:
    """The settings these tests rely on, whoever configured Django first."""
    from django.test import override_settings

    with override_settings(
        MIDDLEWARE=MIDDLEWARE, ALLOWED_HOSTS=["testserver"], RATIONAL_BILLING=None
    ):
        yield


@pytest.fixture
def billing() -> Billing:
    """A Billing with a direct tenant, one test secret and a fixed clock."""
    return _billing()


@pytest.fixture
def site(
    django_configured: None, billing: Billing, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Any]:
    """The project's urls include the adapter under stripe/, RATIONAL_BILLING names the Billing."""
    from django.test import override_settings
    from django.urls import include, path

    monkeypatch.setattr(sys.modules[__name__], "CURRENT", billing)
    urlconf = _urlconf(path("stripe/", include("rational_billing.contrib.django")))
    with override_settings(ROOT_URLCONF=urlconf, RATIONAL_BILLING=f"{__name__}.current_billing"):
        yield urlconf


def _client(*, enforce_csrf_checks: bool = True, **kw: Any) -> Any:
    from django.test import Client

    return Client(enforce_csrf_checks=enforce_csrf_checks, **kw)


def _post(payload: bytes, headers: dict[str, str], *, url: str = URL, **kw: Any) -> Any:
    kw.setdefault("content_type", "application/json")
    return _client().post(url, data=payload, headers=headers, **kw)


def test_signed_event_is_applied_and_answered_200(site: Any, billing: Billing) -> None:
    """A signed customer.updated posted with CSRF checks on is applied and answered 200."""
    customer = link_directly(billing, "cus_D1")
    event = _event()
    payload = json.dumps(event).encode()
    response = _post(payload, sign_payload(payload, SECRET, timestamp=TS))
    assert response.status_code == 200
    assert json.loads(response.content) == {"status": "applied"}
    assert response["Content-Type"] == "application/json"
    assert billing.customers.get("acme", customer.id).email == "new@example.com"
    assert stored_event(billing, event["id"]).outcome is EventOutcome.APPLIED


@pytest.mark.parametrize("tamper", ["wrong_secret", "body_byte", "no_header"])
def test_bad_signature_is_answered_400_and_stores_nothing(
    site: Any, billing: Billing, tamper: str
) -> None:
    """A wrong secret, an altered body or a missing header gets 400 and changes nothing."""
    customer = link_directly(billing, "cus_D1")
    event = _event(email="evil@example.com")
    payload = json.dumps(event).encode()
    headers = sign_payload(payload, SECRET, timestamp=TS)
    if tamper == "wrong_secret":
        headers = sign_payload(payload, "whsec_someone_else", timestamp=TS)
    elif tamper == "body_byte":
        payload = payload.replace(b"evil@", b"evjl@")
    else:
        del headers["Stripe-Signature"]
    response = _post(payload, headers)
    assert response.status_code == 400
    assert json.loads(response.content)["status"] == "rejected"
    assert stored_event(billing, event["id"]) is None
    assert billing.customers.get("acme", customer.id).email == "old@example.com"


@pytest.mark.parametrize(
    "content_type",
    ["application/json", "application/x-www-form-urlencoded", "text/plain; charset=latin-1"],
)
def test_body_bytes_reach_the_router_untouched(
    site: Any, billing: Billing, content_type: str
) -> None:
    """Unusual whitespace and raw UTF-8 verify, whatever the content type claims."""
    customer = link_directly(billing, "cus_D1")
    event = _event(name=UNUSUAL_NAME)
    text = json.dumps(event, ensure_ascii=False, indent="\t").replace("\n", " \r\n ")
    payload = b"\xef\xbb\xbf" + text.encode("utf-8") + b" \n\t"
    headers = sign_payload(payload, SECRET, timestamp=TS)
    reencoded = json.dumps(json.loads(payload)).encode()
    assert billing.webhooks.handle(reencoded, headers).status_code == 400  # sanity check
    # generic() sends the bytes as they are; post() would transcode them to the charset.
    response = _client().generic("POST", URL, payload, content_type=content_type, headers=headers)
    assert response.status_code == 200, response.content
    assert billing.customers.get("acme", customer.id).name == UNUSUAL_NAME


@pytest.mark.parametrize("method", ["get", "put", "delete", "patch", "head"])
def test_other_methods_than_post_get_405(site: Any, method: str) -> None:
    """GET, PUT, DELETE, PATCH and HEAD on the webhook URL are answered 405 Method Not Allowed."""
    response = getattr(_client(), method)(URL)
    assert response.status_code == 405
    assert response["Allow"] == "POST"


@pytest.mark.parametrize("name", ["stripe-signature", "STRIPE-SIGNATURE", "sTrIpE-sIgNaTuRe"])
def test_signature_header_name_is_case_insensitive(site: Any, billing: Billing, name: str) -> None:
    """The Stripe-Signature header is found whatever the case of its name."""
    customer = link_directly(billing, "cus_D1")
    payload = json.dumps(_event()).encode()
    signature = sign_payload(payload, SECRET, timestamp=TS)["Stripe-Signature"]
    assert _post(payload, {name: signature}).status_code == 200
    assert billing.customers.get("acme", customer.id).email == "new@example.com"


def test_failing_handler_is_answered_500_so_stripe_retries(site: Any, billing: Billing) -> None:
    """A handler that raises makes the view answer 500 and leaves the customer unchanged."""
    customer = link_directly(billing, "cus_D1")

    @billing.webhooks.on("customer.updated")
    def broken(ctx: Any) -> None:
        raise RuntimeError("downstream hiccup")

    payload = json.dumps(_event()).encode()
    response = _post(payload, sign_payload(payload, SECRET, timestamp=TS))
    assert response.status_code == 500
    assert billing.customers.get("acme", customer.id).email == "old@example.com"


def test_include_is_namespaced_for_reverse(site: Any) -> None:
    """include('rational_billing.contrib.django') is reversible as rational_billing:webhooks."""
    from django.urls import reverse

    assert reverse("rational_billing:webhooks") == URL


def test_setting_may_hold_the_billing_itself(site: Any, billing: Billing) -> None:
    """RATIONAL_BILLING may be the Billing object rather than a dotted path."""
    from django.test import override_settings

    from rational_billing.contrib.django import get_billing

    with override_settings(RATIONAL_BILLING=billing):
        assert get_billing() is billing


def test_setting_may_be_a_dotted_path_to_a_billing(
    site: Any, billing: Billing, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RATIONAL_BILLING may be the dotted path of a Billing object."""
    from django.test import override_settings

    from rational_billing.contrib.django import get_billing

    monkeypatch.setattr(sys.modules[__name__], "THE_BILLING", billing, raising=False)
    with override_settings(RATIONAL_BILLING=f"{__name__}.THE_BILLING"):
        assert get_billing() is billing


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (None, "set RATIONAL_BILLING"),
        ("tests.nowhere.billing", "cannot be imported"),
        ("os.getcwd", "must lead to a Billing"),
        (42, "must lead to a Billing"),
    ],
)
def test_misconfigured_setting_raises_config_error(
    site: Any, billing: Billing, value: Any, message: str
) -> None:
    """A missing or wrong RATIONAL_BILLING raises ConfigError, which Django turns into a 500."""
    from django.test import override_settings

    customer = link_directly(billing, "cus_D1")
    payload = json.dumps(_event()).encode()
    headers = sign_payload(payload, SECRET, timestamp=TS)
    with override_settings(RATIONAL_BILLING=value):
        with pytest.raises(ConfigError, match=message):
            _post(payload, headers)
        response = _client(raise_request_exception=False).post(
            URL, data=payload, headers=headers, content_type="application/json"
        )
    assert response.status_code == 500
    assert billing.customers.get("acme", customer.id).email == "old@example.com"


def test_urls_with_an_explicit_billing_need_no_setting(
    django_configured: None, billing: Billing
) -> None:
    """include(urls(billing)) serves that Billing even when RATIONAL_BILLING is unset."""
    from django.test import override_settings
    from django.urls import include, path, reverse

    from rational_billing.contrib.django import urls

    customer = link_directly(billing, "cus_D1")
    urlconf = _urlconf(path("hooks/", include(urls(billing))))
    payload = json.dumps(_event()).encode()
    with override_settings(ROOT_URLCONF=urlconf, RATIONAL_BILLING=None):
        assert reverse("rational_billing:webhooks") == "/hooks/webhooks/"
        response = _post(
            payload, sign_payload(payload, SECRET, timestamp=TS), url="/hooks/webhooks/"
        )
    assert response.status_code == 200
    assert billing.customers.get("acme", customer.id).email == "new@example.com"


def test_make_view_serves_the_billing_it_was_given(django_configured: None) -> None:
    """make_view(billing) on two paths keeps two Billings apart, with CSRF still exempt."""
    from django.test import override_settings
    from django.urls import path

    from rational_billing.contrib.django import make_view

    first, second = _billing(), _billing()
    c1, c2 = link_directly(first, "cus_D1"), link_directly(second, "cus_D1")
    urlconf = _urlconf(path("one/", make_view(first)), path("two/", make_view(second)))
    payload = json.dumps(_event()).encode()
    with override_settings(ROOT_URLCONF=urlconf):
        response = _post(payload, sign_payload(payload, SECRET, timestamp=TS), url="/two/")
        assert _client().get("/two/").status_code == 405
    assert response.status_code == 200
    assert first.customers.get("acme", c1.id).email == "old@example.com"
    assert second.customers.get("acme", c2.id).email == "new@example.com"


def test_make_view_rejects_something_that_is_not_a_billing(django_configured: None) -> None:
    """make_view with anything but a Billing raises ConfigError when the URLs are built."""
    from rational_billing.contrib.django import make_view

    with pytest.raises(ConfigError, match="needs a Billing"):
        make_view(object())  # type: ignore[arg-type]


def test_import_without_django_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without Django installed, importing the adapter raises ConfigError naming the extra."""
    importlib.import_module("rational_billing.contrib.django")
    for name in [m for m in sys.modules if m == "django" or m.startswith("django.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "django", None)
    monkeypatch.delitem(sys.modules, "rational_billing.contrib.django")
    with pytest.raises(ConfigError, match=r"pip install 'rational-billing\[django\]'"):
        importlib.import_module("rational_billing.contrib.django")
