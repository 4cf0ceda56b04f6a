"""Tests of the Django example: the project's own tests, with Django's test client.

They replace the project's Billing with one on in-memory storage and a small
fake of the Stripe API (``override_settings(RATIONAL_BILLING=...)``), and send
signed events made with ``rational_billing.testing``. One test runs the real
wiring: ``RB_*`` variables and ``SQLStorage`` on a SQLite file.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from django.test import Client, override_settings

from rational_billing import Billing, BillingConfig, Mode, ModeKeys
from rational_billing.errors import StripeAPIError
from rational_billing.testing import (
    InMemoryStorage,
    RecordingMailer,
    build_customer,
    make_event,
    sign_payload,
)

WEBHOOK_SECRET = "whsec_example_django"
ACCOUNT = "acct_1ExampleAcme"
NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


class FakeStripe:
    """Just enough of the Stripe API (the `StripeAPI` port) for linking customers."""

    def __init__(self) -> None:
        self.customers: dict[str, dict[str, Any]] = {}

    def request(self, method: str, path: str, **kw: Any) -> dict[str, Any]:
        customer = self.customers.get(path.rsplit("/", 1)[-1])
        if customer is None:
            raise StripeAPIError("No such customer", status=404)
        if method == "POST":  # only metadata updates are needed here
            for key, value in (kw.get("params") or {}).get("metadata", {}).items():
                if value in (None, ""):
                    customer["metadata"].pop(key, None)
                else:
                    customer["metadata"][key] = value
        return customer

    def list_all(self, path: str, **kw: Any) -> Any:
        return iter(self.customers.values())


@pytest.fixture
def stripe() -> FakeStripe:
    """The fake Stripe API, with one customer, cus_Ada, on the tenant's account."""
    fake = FakeStripe()
    fake.customers["cus_Ada"] = build_customer(id="cus_Ada", email="ada@example.com")
    return fake


@pytest.fixture
def billing(stripe: FakeStripe) -> Iterator[Billing]:
    """A Billing in memory with tenant 'acme' connected in test mode, used by the project."""
    config = BillingConfig(
        test=ModeKeys(secret_key="sk_test_example", webhook_secrets=(WEBHOOK_SECRET,))
    )
    billing = Billing(
        config=config,
        storage=InMemoryStorage(),
        mailer=RecordingMailer(),
        clock=lambda: NOW,
        stripe=stripe,
    )
    billing.tenants.connect("acme", ACCOUNT, modes=frozenset({Mode.TEST}))
    with override_settings(RATIONAL_BILLING=billing):
        yield billing


def _post_event(event: dict[str, Any], secret: str = WEBHOOK_SECRET) -> Any:
    payload = json.dumps(event).encode()
    headers = sign_payload(payload, secret, timestamp=int(NOW.timestamp()))
    client = Client(enforce_csrf_checks=True)
    return client.post(
        "/stripe/webhooks/", data=payload, content_type="application/json", headers=headers
    )


def _customer_updated(email: str) -> dict[str, Any]:
    obj = build_customer(id="cus_Ada", email=email)
    return make_event("customer.updated", obj, account=ACCOUNT, created=int(NOW.timestamp()) + 1)


def test_reports_need_a_customer_linked_to_stripe(billing: Billing) -> None:
    """A new customer gets 402 on the paid feature; once linked to Stripe, 200."""
    customer = billing.customers.create("acme", email="ada@example.com")
    url = f"/acme/customers/{customer.id}/reports/"
    assert Client().get(url).status_code == 402
    billing.customers.link("acme", customer.id, mode=Mode.TEST, stripe_customer_id="cus_Ada")
    response = Client().get(url)
    assert response.status_code == 200
    assert response.json()["customer"] == customer.id


def test_unknown_customer_is_404(billing: Billing) -> None:
    """The paid feature answers 404 for a customer the tenant does not have."""
    assert Client().get("/acme/customers/nobody/reports/").status_code == 404


def test_signed_stripe_event_updates_the_linked_customer(billing: Billing) -> None:
    """A signed customer.updated from the tenant's account reaches the customer, CSRF checks on."""
    customer = billing.customers.create("acme", email="ada@example.com")
    billing.customers.link("acme", customer.id, mode=Mode.TEST, stripe_customer_id="cus_Ada")
    response = _post_event(_customer_updated("ada@lovelace.example"))
    assert response.status_code == 200
    assert billing.customers.get("acme", customer.id).email == "ada@lovelace.example"


def test_forged_stripe_event_is_rejected(billing: Billing) -> None:
    """An event signed with another secret gets 400 and changes nothing."""
    customer = billing.customers.create("acme", email="ada@example.com")
    billing.customers.link("acme", customer.id, mode=Mode.TEST, stripe_customer_id="cus_Ada")
    response = _post_event(_customer_updated("mallory@example.com"), secret="whsec_forged")
    assert response.status_code == 400
    assert billing.customers.get("acme", customer.id).email == "ada@example.com"


def test_webhook_url_accepts_only_post(billing: Billing) -> None:
    """GET on the webhook URL is 405."""
    assert Client().get("/stripe/webhooks/").status_code == 405


def test_project_billing_comes_from_the_environment_with_sql_storage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real setting builds the Billing from RB_* variables, on SQLStorage in RB_STORAGE_URL."""
    from saas_site.billing import get_billing

    monkeypatch.setenv("RB_TEST_SECRET_KEY", "sk_test_from_env")
    monkeypatch.setenv("RB_TEST_WEBHOOK_SECRETS", WEBHOOK_SECRET)
    monkeypatch.setenv("RB_STORAGE_URL", f"sqlite:///{tmp_path / 'site.db'}")
    get_billing.cache_clear()
    try:
        event = make_event("customer.updated", build_customer(), account="acct_1NotConnectedYet")
        payload = json.dumps(event).encode()
        response = Client().post(
            "/stripe/webhooks/",
            data=payload,
            content_type="application/json",
            headers=sign_payload(payload, WEBHOOK_SECRET),
        )
        assert (response.status_code, response.json()["status"]) == (200, "held")
        assert type(get_billing().storage).__name__ == "SQLStorage"
    finally:
        get_billing().close()
        get_billing.cache_clear()
