"""rational_billing.contrib.flask: the webhook blueprint, driven by Flask's real test client."""

from __future__ import annotations

import importlib
import json
import sys
from datetime import UTC, datetime
from typing import Any

import pytest
from flask import Flask, url_for
from flask.testing import FlaskClient

from rational_billing import (
    Billing,
    BillingConfig,
    EventOutcome,
    ModeKeys,
)
from rational_billing.contrib.flask import blueprint, get_billing, init_app
from rational_billing.errors import ConfigError
from rational_billing.testing import (
    InMemoryStorage,
    RecordingMailer,
    build_customer,
    make_event,
    sign_payload,
)
from tests.helpers import NoStripe, link_directly, stored_event

SECRET = "whsec_flask_test"
NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
TS = int(NOW.timestamp())
# Odd but valid JSON: CRLF, tabs, trailing blanks, non-ASCII left unescaped. Any
# decode/re-encode on the way would change these bytes and break the signature.
UNUSUAL_NAME = 'Zoë Ünïcødé 🚀 \u2028 \\"quoted\\"'


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
        "customer.updated", build_customer(id="cus_F1", email=email, name=name), created=TS
    )


@pytest.fixture
def billing() -> Billing:
    """A Billing with a direct tenant, one test secret and a fixed clock."""
    return _billing()


@pytest.fixture
def app(billing: Billing) -> Flask:
    """A Flask app with the webhook endpoint mounted by init_app."""
    flask_app = Flask(__name__)
    init_app(flask_app, billing)
    return flask_app


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    """Flask's real test client for the app."""
    return app.test_client()


def _post(client: FlaskClient, payload: bytes, headers: dict[str, str], **kw: Any) -> Any:
    kw.setdefault("content_type", "application/json")
    return client.post("/stripe/webhooks", data=payload, headers=headers, **kw)


def test_signed_event_is_applied_and_answered_200(client: FlaskClient, billing: Billing) -> None:
    """A signed customer.updated posted to /stripe/webhooks is applied and answered 200."""
    customer = link_directly(billing, "cus_F1")
    event = _event()
    payload = json.dumps(event).encode()
    response = _post(client, payload, sign_payload(payload, SECRET, timestamp=TS))
    assert response.status_code == 200
    assert response.get_json() == {"status": "applied"}
    assert response.mimetype == "application/json"
    assert billing.customers.get("acme", customer.id).email == "new@example.com"
    assert stored_event(billing, event["id"]).outcome is EventOutcome.APPLIED


def test_duplicate_delivery_is_answered_200_duplicate(
    client: FlaskClient, billing: Billing
) -> None:
    """A second delivery of the same event is answered 200 'duplicate'."""
    link_directly(billing, "cus_F1")
    payload = json.dumps(_event()).encode()
    headers = sign_payload(payload, SECRET, timestamp=TS)
    assert _post(client, payload, headers).status_code == 200
    again = _post(client, payload, headers)
    assert (again.status_code, again.get_json()["status"]) == (200, "duplicate")


@pytest.mark.parametrize("tamper", ["wrong_secret", "body_byte", "no_header"])
def test_bad_signature_is_answered_400_and_stores_nothing(
    client: FlaskClient, billing: Billing, tamper: str
) -> None:
    """A wrong secret, an altered body or a missing header gets 400 and changes nothing."""
    customer = link_directly(billing, "cus_F1")
    event = _event(email="evil@example.com")
    payload = json.dumps(event).encode()
    headers = sign_payload(payload, SECRET, timestamp=TS)
    if tamper == "wrong_secret":
        headers = sign_payload(payload, "whsec_someone_else", timestamp=TS)
    elif tamper == "body_byte":
        payload = payload.replace(b"evil@", b"evjl@")
    else:
        del headers["Stripe-Signature"]
    response = _post(client, payload, headers)
    assert response.status_code == 400
    assert response.get_json()["status"] == "rejected"
    assert stored_event(billing, event["id"]) is None
    assert billing.customers.get("acme", customer.id).email == "old@example.com"


@pytest.mark.parametrize(
    "content_type",
    ["application/json", "application/x-www-form-urlencoded", "text/plain; charset=latin-1"],
)
def test_body_bytes_reach_the_router_untouched(
    client: FlaskClient, billing: Billing, content_type: str
) -> None:
    """Unusual whitespace and raw UTF-8 verify, whatever the content type claims."""
    customer = link_directly(billing, "cus_F1")
    event = _event(name=UNUSUAL_NAME)
    text = json.dumps(event, ensure_ascii=False, indent="\t").replace("\n", " \r\n ")
    payload = b"\xef\xbb\xbf" + text.encode("utf-8") + b" \n\t"
    headers = sign_payload(payload, SECRET, timestamp=TS)
    # Sanity check: the same JSON re-encoded would not verify.
    reencoded = json.dumps(json.loads(payload)).encode()
    assert billing.webhooks.handle(reencoded, headers).status_code == 400
    response = _post(client, payload, headers, content_type=content_type)
    assert response.status_code == 200, response.get_json()
    assert billing.customers.get("acme", customer.id).name == UNUSUAL_NAME


@pytest.mark.parametrize("method", ["get", "put", "delete", "patch"])
def test_other_methods_than_post_get_405(client: FlaskClient, method: str) -> None:
    """GET, PUT, DELETE and PATCH on the webhook URL are answered 405 Method Not Allowed."""
    response = getattr(client, method)("/stripe/webhooks")
    assert response.status_code == 405
    assert "POST" in response.headers["Allow"]


@pytest.mark.parametrize("name", ["stripe-signature", "STRIPE-SIGNATURE", "sTrIpE-sIgNaTuRe"])
def test_signature_header_name_is_case_insensitive(
    client: FlaskClient, billing: Billing, name: str
) -> None:
    """The Stripe-Signature header is found whatever the case of its name."""
    customer = link_directly(billing, "cus_F1")
    payload = json.dumps(_event()).encode()
    signature = sign_payload(payload, SECRET, timestamp=TS)["Stripe-Signature"]
    assert _post(client, payload, {name: signature}).status_code == 200
    assert billing.customers.get("acme", customer.id).email == "new@example.com"


def test_failing_handler_is_answered_500_so_stripe_retries(
    client: FlaskClient, billing: Billing
) -> None:
    """A handler that raises makes the endpoint answer 500 and leaves the customer unchanged."""
    customer = link_directly(billing, "cus_F1")

    @billing.webhooks.on("customer.updated")
    def broken(ctx: Any) -> None:
        raise RuntimeError("downstream hiccup")

    payload = json.dumps(_event()).encode()
    response = _post(client, payload, sign_payload(payload, SECRET, timestamp=TS))
    assert response.status_code == 500
    assert billing.customers.get("acme", customer.id).email == "old@example.com"


def test_init_app_stores_billing_and_names_the_endpoint(app: Flask, billing: Billing) -> None:
    """init_app puts the Billing in app.extensions, get_billing returns it, url_for finds the view."""
    assert app.extensions["rational_billing"] is billing
    with app.test_request_context():
        assert get_billing() is billing
        assert url_for("rational_billing.webhooks") == "/stripe/webhooks"


def test_init_app_takes_a_custom_prefix_and_endpoint(billing: Billing) -> None:
    """url_prefix and endpoint place and name the view as asked."""
    flask_app = Flask(__name__)
    init_app(flask_app, billing, url_prefix="/hooks/stripe/", endpoint="incoming")
    link_directly(billing, "cus_F1")
    payload = json.dumps(_event()).encode()
    client = flask_app.test_client()
    headers = sign_payload(payload, SECRET, timestamp=TS)
    assert client.post("/hooks/stripe/webhooks", data=payload, headers=headers).status_code == 200
    with flask_app.test_request_context():
        assert url_for("rational_billing.incoming") == "/hooks/stripe/webhooks"


def test_init_app_rejects_something_that_is_not_a_billing() -> None:
    """Passing anything but a Billing to init_app raises ConfigError at start-up."""
    with pytest.raises(ConfigError, match="needs a Billing"):
        init_app(Flask(__name__), object())  # type: ignore[arg-type]


def test_get_billing_without_init_app_raises_config_error() -> None:
    """get_billing on an app without init_app raises ConfigError naming init_app."""
    with Flask(__name__).app_context(), pytest.raises(ConfigError, match="init_app"):
        get_billing()


def test_blueprint_with_explicit_billing_serves_that_billing(billing: Billing) -> None:
    """blueprint(billing) works without init_app and routes to the Billing it was given."""
    flask_app = Flask(__name__)
    flask_app.register_blueprint(blueprint(billing, rule="/in"), url_prefix="/stripe")
    customer = link_directly(billing, "cus_F1")
    payload = json.dumps(_event()).encode()
    headers = sign_payload(payload, SECRET, timestamp=TS)
    assert (
        flask_app.test_client().post("/stripe/in", data=payload, headers=headers).status_code == 200
    )
    assert billing.customers.get("acme", customer.id).email == "new@example.com"


def test_each_app_routes_to_its_own_billing() -> None:
    """Two apps with init_app and different Billings never apply each other's events."""
    first, second = _billing(), _billing()
    one, two = Flask("one"), Flask("two")
    init_app(one, first)
    init_app(two, second)
    c1, c2 = link_directly(first, "cus_F1"), link_directly(second, "cus_F1")
    payload = json.dumps(_event()).encode()
    headers = sign_payload(payload, SECRET, timestamp=TS)
    assert (
        one.test_client().post("/stripe/webhooks", data=payload, headers=headers).status_code == 200
    )
    assert first.customers.get("acme", c1.id).email == "new@example.com"
    assert second.customers.get("acme", c2.id).email == "old@example.com"


def test_import_without_flask_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without Flask installed, importing the adapter raises ConfigError naming the extra."""
    monkeypatch.setitem(sys.modules, "flask", None)
    monkeypatch.delitem(sys.modules, "rational_billing.contrib.flask")
    with pytest.raises(ConfigError, match=r"pip install 'rational-billing\[flask\]'"):
        importlib.import_module("rational_billing.contrib.flask")
