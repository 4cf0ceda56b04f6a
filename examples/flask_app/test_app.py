"""Tests of the Flask example: the host app's own tests, with Flask's test client.

They use the testing helpers a host app gets from ``rational_billing.testing``
(in-memory storage, a recording mailer, signed events) and a small fake of
the Stripe API, so they make no network call.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from rational_billing import Billing, BillingConfig, Mode, ModeKeys
from rational_billing.errors import StripeAPIError
from rational_billing.storage.sql import SQLStorage
from rational_billing.testing import (
    InMemoryStorage,
    RecordingMailer,
    build_customer,
    make_event,
    sign_payload,
)

from .app import create_app

WEBHOOK_SECRET = "whsec_example_flask"
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


def _billing(storage: Any) -> tuple[Billing, FakeStripe]:
    stripe = FakeStripe()
    config = BillingConfig(
        test=ModeKeys(secret_key="sk_test_example", webhook_secrets=(WEBHOOK_SECRET,))
    )
    billing = Billing(
        config=config, storage=storage, mailer=RecordingMailer(), clock=lambda: NOW, stripe=stripe
    )
    billing.tenants.connect("acme", ACCOUNT, modes=frozenset({Mode.TEST}))
    return billing, stripe


@pytest.fixture
def billing() -> tuple[Billing, FakeStripe]:
    """A Billing in memory, with tenant 'acme' connected in test mode and a fake Stripe."""
    return _billing(InMemoryStorage())


@pytest.fixture
def client(billing: tuple[Billing, FakeStripe]) -> FlaskClient:
    """Flask's test client for the example app."""
    return create_app(billing[0]).test_client()


def _customer_updated(stripe_id: str, email: str) -> dict[str, Any]:
    obj = build_customer(id=stripe_id, email=email)
    return make_event("customer.updated", obj, account=ACCOUNT, created=int(NOW.timestamp()) + 1)


def _post_event(client: FlaskClient, event: dict[str, Any], secret: str = WEBHOOK_SECRET) -> Any:
    payload = json.dumps(event).encode()
    headers = sign_payload(payload, secret, timestamp=int(NOW.timestamp()))
    return client.post("/stripe/webhooks", data=payload, headers=headers)


def test_reports_need_a_customer_linked_to_stripe(
    client: FlaskClient, billing: tuple[Billing, FakeStripe]
) -> None:
    """A new customer gets 402 on the paid feature; once linked to Stripe, 200."""
    b, stripe = billing
    customer = b.customers.create("acme", email="ada@example.com")
    url = f"/acme/customers/{customer.id}/reports"
    assert client.get(url).status_code == 402
    stripe.customers["cus_Ada"] = build_customer(id="cus_Ada", email="ada@example.com")
    b.customers.link("acme", customer.id, mode=Mode.TEST, stripe_customer_id="cus_Ada")
    assert client.get(url).status_code == 200


def test_unknown_customer_is_404(client: FlaskClient) -> None:
    """The paid feature answers 404 for a customer the tenant does not have."""
    assert client.get("/acme/customers/nobody/reports").status_code == 404


def test_signed_stripe_event_updates_the_linked_customer(
    client: FlaskClient, billing: tuple[Billing, FakeStripe]
) -> None:
    """A signed customer.updated from the tenant's account reaches the customer through the endpoint."""
    b, stripe = billing
    customer = b.customers.create("acme", email="ada@example.com")
    stripe.customers["cus_Ada"] = build_customer(id="cus_Ada", email="ada@example.com")
    b.customers.link("acme", customer.id, mode=Mode.TEST, stripe_customer_id="cus_Ada")
    response = _post_event(client, _customer_updated("cus_Ada", "ada@lovelace.example"))
    assert response.status_code == 200
    assert b.customers.get("acme", customer.id).email == "ada@lovelace.example"


def test_forged_stripe_event_is_rejected(
    client: FlaskClient, billing: tuple[Billing, FakeStripe]
) -> None:
    """An event signed with another secret gets 400 and changes nothing."""
    b, stripe = billing
    customer = b.customers.create("acme", email="ada@example.com")
    stripe.customers["cus_Ada"] = build_customer(id="cus_Ada", email="ada@example.com")
    b.customers.link("acme", customer.id, mode=Mode.TEST, stripe_customer_id="cus_Ada")
    event = _customer_updated("cus_Ada", "mallory@example.com")
    assert _post_event(client, event, secret="whsec_forged").status_code == 400
    assert b.customers.get("acme", customer.id).email == "ada@example.com"


def test_sql_storage_keeps_webhook_effects(tmp_path: Path) -> None:
    """With SQLStorage on a SQLite file, a webhook's effect is still there after reopening."""
    url = f"sqlite:///{tmp_path / 'billing.db'}"
    b, stripe = _billing(SQLStorage(url))
    customer = b.customers.create("acme", email="ada@example.com")
    stripe.customers["cus_Ada"] = build_customer(id="cus_Ada", email="ada@example.com")
    b.customers.link("acme", customer.id, mode=Mode.TEST, stripe_customer_id="cus_Ada")
    client = create_app(b).test_client()
    assert _post_event(client, _customer_updated("cus_Ada", "ada@sql.example")).status_code == 200
    b.close()
    reopened = Billing(config=b.config, storage=SQLStorage(url), stripe=FakeStripe())
    try:
        assert reopened.customers.get("acme", customer.id).email == "ada@sql.example"
    finally:
        reopened.close()


def test_app_builds_its_billing_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a Billing passed in, the app reads RB_* variables and stores in RB_STORAGE_URL."""
    monkeypatch.setenv("RB_TEST_SECRET_KEY", "sk_test_from_env")
    monkeypatch.setenv("RB_TEST_WEBHOOK_SECRETS", WEBHOOK_SECRET)
    monkeypatch.setenv("RB_STORAGE_URL", f"sqlite:///{tmp_path / 'env.db'}")
    app = create_app()
    event = make_event("customer.updated", build_customer(), account="acct_1NotConnectedYet")
    payload = json.dumps(event).encode()
    client = app.test_client()
    response = client.post(
        "/stripe/webhooks", data=payload, headers=sign_payload(payload, WEBHOOK_SECRET)
    )
    assert (response.status_code, response.get_json()["status"]) == (200, "held")
    assert client.post("/stripe/webhooks", data=payload, headers={}).status_code == 400
    app.extensions["rational_billing"].close()
