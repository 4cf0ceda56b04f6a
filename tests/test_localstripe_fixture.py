"""The localstripe launcher and fixtures: loopback only, in memory, signed webhooks."""

from __future__ import annotations

import ast
import hashlib
import hmac
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

import rational_billing
from rational_billing import demo
from rational_billing.demo import LocalStripe, configure_webhook, start_localstripe
from rational_billing.errors import ConfigError
from tests.fixtures.localstripe import (
    LocalStripeAPI,
    LocalStripeHTTPError,
    RegisterWebhook,
    unique_email,
)
from tests.fixtures.webhook_sink import WebhookSink

PICKLE = Path("/tmp/localstripe.pickle")  # localstripe's fixed path
PACKAGE = Path(rational_billing.__file__).parent
LAUNCHER = PACKAGE / "demo" / "localstripe_server.py"
SECRET = "whsec_localstripe_fixture_test"

localstripe_only = pytest.mark.localstripe


def _env_with_package() -> dict[str, str]:
    """The environment, with the source root of the package under test on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE.parent), env.get("PYTHONPATH")]))
    return env


def _listening_addresses(port: int) -> set[str] | None:
    """Local addresses (hex, as in /proc/net/tcp*) listening on ``port``; None off Linux."""
    tables = [Path("/proc/net/tcp"), Path("/proc/net/tcp6")]
    if not tables[0].exists():
        return None
    found = set()
    for table in tables:
        if not table.exists():
            continue
        for line in table.read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].rsplit(":", 1)
            if int(hex_port, 16) == port and fields[3] == "0A":  # 0A: LISTEN
                found.add(address)
    return found


def _verify_signature(header: str, body: bytes, secret: str) -> int:
    """Check a ``t=…,v1=…`` Stripe-Signature; return its timestamp."""
    parts = dict(item.split("=", 1) for item in header.split(","))
    timestamp = parts["t"]
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    assert hmac.compare_digest(expected.hexdigest(), parts["v1"])
    return int(timestamp)


@localstripe_only
def test_binds_loopback_only(localstripe: LocalStripe) -> None:
    """The server listens on 127.0.0.1 alone, not on every interface."""
    assert localstripe.host == "127.0.0.1"
    assert localstripe.url == f"http://127.0.0.1:{localstripe.port}"
    with socket.create_connection(("127.0.0.1", localstripe.port), timeout=2):
        pass
    # Another loopback address reaches a socket bound to all interfaces, not this one.
    with pytest.raises(OSError):  # noqa: PT011  (refused on Linux; unreachable elsewhere)
        socket.create_connection(("127.0.0.2", localstripe.port), timeout=1).close()
    addresses = _listening_addresses(localstripe.port)
    if addresses is not None:
        assert addresses == {"0100007F"}  # 127.0.0.1, and nothing on IPv6


@localstripe_only
def test_creates_customer_over_http(localstripe: LocalStripe) -> None:
    """A customer created with a Bearer sk_test_ key can be retrieved and found by email."""
    email = unique_email()
    with requests.Session() as http:
        http.trust_env = False
        http.headers["Authorization"] = "Bearer sk_test_any_key_works"
        created = http.post(
            f"{localstripe.url}/v1/customers",
            data={"email": email, "name": "Ada", "metadata[rational_customer_id]": "c1"},
            timeout=5,
        )
        assert created.status_code == 200, created.text
        customer = created.json()
        assert customer["id"].startswith("cus_")
        assert customer["livemode"] is False

        fetched = http.get(f"{localstripe.url}/v1/customers/{customer['id']}", timeout=5).json()
        assert fetched["email"] == email
        assert fetched["metadata"] == {"rational_customer_id": "c1"}

        listed = http.get(
            f"{localstripe.url}/v1/customers", params={"email": email}, timeout=5
        ).json()
        assert [c["id"] for c in listed["data"]] == [customer["id"]]

        anonymous = requests.get(f"{localstripe.url}/v1/customers", timeout=5)
        assert anonymous.status_code == 401


@localstripe_only
def test_api_helper_encodes_like_stripe(localstripe_api: LocalStripeAPI) -> None:
    """The fixture client form-encodes nested params and raises on error statuses."""
    customer = localstripe_api.post(
        "/v1/customers", email=unique_email(), payment_method="pm_card_visa"
    )
    product = localstripe_api.post("/v1/products", name="Pro")
    plan = localstripe_api.post(
        "/v1/plans", product=product["id"], amount=1500, currency="usd", interval="month"
    )
    localstripe_api.post(
        f"/v1/customers/{customer['id']}",
        invoice_settings={"default_payment_method": "pm_card_visa"},
    )
    subscription = localstripe_api.post(
        "/v1/subscriptions", customer=customer["id"], items=[{"plan": plan["id"], "quantity": 2}]
    )
    assert subscription["quantity"] == 2
    assert subscription["plan"]["id"] == plan["id"]
    with pytest.raises(LocalStripeHTTPError) as caught:
        localstripe_api.get("/v1/customers/cus_doesnotexist")
    assert caught.value.status == 404


@localstripe_only
def test_store_is_not_pickled(localstripe_api: LocalStripeAPI) -> None:
    """Writes never reach /tmp/localstripe.pickle (another process may write it, never ours)."""
    before = PICKLE.stat() if PICKLE.exists() else None
    marker = unique_email("pickle-marker")
    localstripe_api.post("/v1/customers", email=marker)
    localstripe_api.post("/v1/products", name=marker)

    if not PICKLE.exists():
        return
    after = PICKLE.stat()
    if before is not None and (after.st_mtime_ns, after.st_size) == (
        before.st_mtime_ns,
        before.st_size,
    ):
        return
    # Something else wrote the shared file meanwhile: it must not hold our objects.
    try:
        data = PICKLE.read_bytes()
    except PermissionError:
        pytest.skip("another user's /tmp/localstripe.pickle changed and cannot be read")
    assert marker.encode() not in data


_PICKLE_PROBE = """
import builtins, io, sys
touched = []
real_open = builtins.open

def fake_open(file, mode="r", *args, **kwargs):
    # Record, but never touch, the shared pickle file.
    if "localstripe.pickle" in str(file):
        touched.append(mode)
        if "r" in mode:
            raise FileNotFoundError(file)
        return io.BytesIO()
    return real_open(file, mode, *args, **kwargs)

builtins.open = fake_open
from rational_billing.demo import localstripe_server
from localstripe.resources import store
if sys.argv[1] == "patched":
    localstripe_server._keep_store_in_memory()
store["customer:cus_probe"] = object()
del store["customer:cus_probe"]
store.try_load_from_disk()
print(sorted(set(touched)))
"""


@localstripe_only
@pytest.mark.parametrize(("variant", "expected"), [("patched", "[]"), ("stock", "['rb', 'wb']")])
def test_launcher_disables_pickle_dump_and_load(variant: str, expected: str) -> None:
    """The launcher's patch stops both the dump and the load (stock localstripe does both)."""
    result = subprocess.run(
        [sys.executable, "-c", _PICKLE_PROBE, variant],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env_with_package(),
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected


@localstripe_only
def test_webhook_is_signed_and_delivered(
    localstripe_api: LocalStripeAPI,
    localstripe_webhook: RegisterWebhook,
    webhook_sink: WebhookSink,
) -> None:
    """A registered endpoint receives the event with a Stripe-Signature that verifies."""
    webhook_sink.handler = lambda body, headers: 204
    localstripe_webhook(webhook_sink.url, SECRET, events=["customer.created"])
    customer = localstripe_api.post("/v1/customers", email=unique_email())

    delivery = webhook_sink.wait_for_event(
        "customer.created", where=lambda event: event["data"]["object"]["id"] == customer["id"]
    )
    signature = delivery.header("stripe-signature")
    assert signature is not None
    timestamp = _verify_signature(signature, delivery.body, SECRET)
    assert abs(timestamp - time.time()) < 300
    assert delivery.status == 204
    assert delivery.header("Content-Type") == "application/json; charset=utf-8"
    event = delivery.json()
    assert event["id"].startswith("evt_")
    assert event["data"]["object"]["email"] == customer["email"]
    with pytest.raises(AssertionError):
        _verify_signature(signature, delivery.body, "whsec_some_other_secret")


@localstripe_only
def test_removed_webhook_gets_nothing(
    localstripe_api: LocalStripeAPI, webhook_sink: WebhookSink, localstripe: LocalStripe
) -> None:
    """After DELETE /_config/webhooks/{name} that endpoint is skipped; the others still receive."""
    configure_webhook(localstripe.url, "fixture-test-a", webhook_sink.url + "a", SECRET)
    configure_webhook(localstripe.url, "fixture-test-b", webhook_sink.url + "b", SECRET)
    demo.remove_webhook(localstripe.url, "fixture-test-a")
    try:
        customer = localstripe_api.post("/v1/customers", email=unique_email())
        webhook_sink.wait_for_event(
            "customer.created", where=lambda e: e["data"]["object"]["id"] == customer["id"]
        )
    finally:
        demo.remove_webhook(localstripe.url, "fixture-test-b")
    # Endpoints are served in the order registered, so "a" would have come first.
    ours = [
        d.path
        for d in webhook_sink.deliveries
        if d.event_type == "customer.created" and d.json()["data"]["object"]["id"] == customer["id"]
    ]
    assert ours == ["/b"]


@localstripe_only
def test_fresh_server_is_empty_and_stops_cleanly(fresh_localstripe: LocalStripe) -> None:
    """A function-scoped server starts with an empty store."""
    api = LocalStripeAPI(fresh_localstripe.url)
    try:
        assert api.get("/v1/customers")["data"] == []
        assert api.get("/v1/events")["data"] == []
    finally:
        api.close()


@localstripe_only
def test_sigterm_stops_with_status_zero() -> None:
    """stop() sends SIGTERM; the server exits 0 and frees its port."""
    server = start_localstripe()
    assert server.running
    assert server.stop() == 0
    assert not server.running
    assert server.stop() == 0  # again: harmless
    with pytest.raises(OSError):  # noqa: PT011  (connection refused)
        socket.create_connection(("127.0.0.1", server.port), timeout=1).close()


@localstripe_only
def test_start_failure_is_reported() -> None:
    """A server that cannot bind raises RuntimeError with what it printed."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match="could not listen"):
            start_localstripe(port=port)


def test_missing_localstripe_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without localstripe installed, start_localstripe says which extra to install."""
    monkeypatch.setattr(demo, "_localstripe_installed", lambda: False)
    with pytest.raises(ConfigError, match=r"rational-billing\[demo\]"):
        start_localstripe()


def test_configure_webhook_validates_arguments() -> None:
    """Bad names, targets, secrets or URLs raise ConfigError before any request."""
    base = "http://127.0.0.1:9"
    with pytest.raises(ConfigError, match="name"):
        configure_webhook(base, "a/b", "http://127.0.0.1:1/", SECRET)
    with pytest.raises(ConfigError, match="target"):
        configure_webhook(base, "n", "ftp://example.test/", SECRET)
    with pytest.raises(ConfigError, match="secret"):
        configure_webhook(base, "n", "http://127.0.0.1:1/", "")
    with pytest.raises(ConfigError, match="events"):
        configure_webhook(base, "n", "http://127.0.0.1:1/", SECRET, events="customer.created")
    with pytest.raises(ConfigError, match="localstripe URL"):
        configure_webhook("file:///etc/passwd", "n", "http://127.0.0.1:1/", SECRET)


def test_library_never_imports_localstripe() -> None:
    """No module of the package but the launcher imports localstripe or the launcher."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path == LAUNCHER:
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [alias.name for alias in node.names]
            if any(
                name == "localstripe"
                or name.startswith("localstripe.")
                or name.endswith("localstripe_server")
                for name in names
            ):
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert offenders == []


def test_importing_demo_does_not_load_localstripe() -> None:
    """Importing the package and its demo helpers leaves localstripe unimported."""
    probe = (
        "import sys, rational_billing, rational_billing.demo; print('localstripe' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env_with_package(),
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
