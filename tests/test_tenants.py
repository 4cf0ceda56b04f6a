"""Tenants: OAuth for Standard accounts, Account Links onboarding, deauthorization (§4a.1).

localstripe has no Connect, so these run against ``responses`` with the shapes
of Stripe's fixtures, checking the key, account header and idempotency key of
every request.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import responses

from rational_billing import Billing, BillingConfig, EventOutcome, Mode, ModeKeys, TenantStatus
from rational_billing.adapters._retry import RetryPolicy
from rational_billing.adapters.stripe_gateway import StripeGateway
from rational_billing.errors import (
    ConfigError,
    InvalidArgument,
    OAuthStateError,
    RemapConfirmationRequired,
    StripeAPIError,
    TenantNotConnected,
    TenantNotFound,
)
from rational_billing.testing import (
    InMemoryStorage,
    RecordingMailer,
    build_account,
    build_account_link,
    build_customer,
    build_oauth_token,
    make_event,
    sign_payload,
)

CONNECT = "https://connect.stripe.com"
API = "https://api.stripe.com"
KEYS = {Mode.TEST: "sk_test_tenants", Mode.LIVE: "sk_live_tenants"}
CLIENT_IDS = {Mode.TEST: "ca_TESTCLIENT", Mode.LIVE: "ca_LIVECLIENT"}
SECRET = "whsec_tenants"
ACCOUNT = "acct_1OAUTHAAAAAAAA"
REDIRECT = "https://app.example.com/stripe/oauth"


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = datetime(2026, 6, 1, 9, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    """A hand-moved clock."""
    return Clock()


def _billing(clock: Clock, *, client_ids: bool = True) -> Billing:
    def keys(mode: Mode) -> ModeKeys:
        return ModeKeys(
            secret_key=KEYS[mode],
            webhook_secrets=(SECRET,) if mode is Mode.TEST else ("whsec_live_tenants",),
            connect_client_id=CLIENT_IDS[mode] if client_ids else None,
        )

    config = BillingConfig(test=keys(Mode.TEST), live=keys(Mode.LIVE))
    gateway = StripeGateway(config, retry=RetryPolicy.none(), sleep=lambda _: None)
    return Billing(
        config=config,
        storage=InMemoryStorage(),
        mailer=RecordingMailer(),
        clock=clock,
        stripe=gateway,
    )


@pytest.fixture
def billing(clock: Clock) -> Billing:
    """Billing with test and live keys and Connect client ids."""
    return _billing(clock)


def _snapshot(billing: Billing) -> Any:
    storage = billing.storage
    assert isinstance(storage, InMemoryStorage)
    return (dict(storage._tenants), dict(storage._pending_connections), dict(storage._events))


def _state(url: str) -> str:
    return parse_qs(urlsplit(url).query)["state"][0]


def _form(call: Any) -> dict[str, list[str]]:
    return parse_qs(call.request.body or "", keep_blank_values=True)


def _check_platform(call: Any, mode: Mode) -> None:
    """A platform-level call: the mode's key, no Stripe-Account, an idempotency key if mutating."""
    headers = call.request.headers
    assert headers["Authorization"] == f"Bearer {KEYS[mode]}"
    assert "Stripe-Account" not in headers
    if call.request.method == "POST":
        assert headers["Idempotency-Key"].startswith("rb-")


def _deliver(billing: Billing, event: dict[str, Any], clock: Clock) -> Any:
    payload = json.dumps(event).encode()
    headers = sign_payload(payload, SECRET, timestamp=int(clock.now.timestamp()))
    return billing.webhooks.handle(payload, headers)


# -- OAuth -------------------------------------------------------------------------------


def test_authorize_url_carries_client_id_scope_redirect_and_a_fresh_state(
    billing: Billing,
) -> None:
    """The link points at Stripe's OAuth page with the mode's client id and a new state each time."""
    with responses.RequestsMock():  # no HTTP at all
        first = billing.tenants.authorize_url("acme", mode=Mode.TEST, redirect_uri=REDIRECT)
        second = billing.tenants.authorize_url(
            "acme", mode=Mode.LIVE, redirect_uri=REDIRECT, scope="read_only"
        )
    parts = urlsplit(first)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == f"{CONNECT}/oauth/authorize"
    query = parse_qs(parts.query)
    assert query["response_type"] == ["code"]
    assert query["client_id"] == [CLIENT_IDS[Mode.TEST]]
    assert query["scope"] == ["read_write"]
    assert query["redirect_uri"] == [REDIRECT]
    assert len(_state(first)) >= 32
    assert parse_qs(urlsplit(second).query)["client_id"] == [CLIENT_IDS[Mode.LIVE]]
    assert parse_qs(urlsplit(second).query)["scope"] == ["read_only"]
    assert _state(first) != _state(second)


@responses.activate
def test_complete_oauth_in_test_mode_makes_a_test_only_connection(billing: Billing) -> None:
    """A livemode=false token connects the tenant in test mode only, exchanged with the test key."""
    url = billing.tenants.authorize_url("acme", mode=Mode.TEST, redirect_uri=REDIRECT)
    responses.post(f"{CONNECT}/oauth/token", json=build_oauth_token(ACCOUNT, livemode=False))
    tenant = billing.tenants.complete_oauth("ac_CODE123", _state(url))
    assert (tenant.id, tenant.stripe_account_id) == ("acme", ACCOUNT)
    assert tenant.modes == frozenset({Mode.TEST})
    assert tenant.status is TenantStatus.CONNECTED
    (call,) = responses.calls
    _check_platform(call, Mode.TEST)
    assert _form(call) == {"grant_type": ["authorization_code"], "code": ["ac_CODE123"]}
    assert billing.tenants.get("acme") == tenant


@responses.activate
def test_complete_oauth_in_live_mode_covers_live_and_test(billing: Billing) -> None:
    """A livemode=true token connects the tenant in live and test mode, exchanged with the live key."""
    url = billing.tenants.authorize_url("acme", mode=Mode.LIVE, redirect_uri=REDIRECT)
    responses.post(f"{CONNECT}/oauth/token", json=build_oauth_token(ACCOUNT, livemode=True))
    tenant = billing.tenants.complete_oauth("ac_LIVE", _state(url))
    assert tenant.modes == frozenset({Mode.LIVE, Mode.TEST})
    (call,) = responses.calls
    _check_platform(call, Mode.LIVE)


@responses.activate
def test_a_state_completes_at_most_one_connection(billing: Billing) -> None:
    """Reusing a state fails with OAuthStateError and makes no call to Stripe."""
    url = billing.tenants.authorize_url("acme", mode=Mode.TEST, redirect_uri=REDIRECT)
    responses.post(f"{CONNECT}/oauth/token", json=build_oauth_token(ACCOUNT))
    billing.tenants.complete_oauth("ac_ONCE", _state(url))
    before = _snapshot(billing)
    with pytest.raises(OAuthStateError):
        billing.tenants.complete_oauth("ac_ONCE", _state(url))
    assert len(responses.calls) == 1
    assert _snapshot(billing) == before


@pytest.mark.parametrize(
    "state", ["x" * 43, "short", "has space in it, quite long", ""], ids=lambda s: repr(s[:8])
)
def test_an_unknown_or_malformed_state_is_refused_and_writes_nothing(
    billing: Billing, state: str
) -> None:
    """A state that was never issued is an OAuthStateError; nothing is called or stored."""
    billing.tenants.authorize_url("acme", mode=Mode.TEST, redirect_uri=REDIRECT)
    before = _snapshot(billing)
    with responses.RequestsMock(), pytest.raises(OAuthStateError):
        billing.tenants.complete_oauth("ac_CODE", state)
    assert _snapshot(billing) == before


def test_an_expired_state_is_refused(billing: Billing, clock: Clock) -> None:
    """A state older than its lifetime (1 h) is refused without calling Stripe."""
    url = billing.tenants.authorize_url("acme", mode=Mode.TEST, redirect_uri=REDIRECT)
    clock.now += timedelta(hours=1, seconds=1)
    with responses.RequestsMock(), pytest.raises(OAuthStateError, match="expired"):
        billing.tenants.complete_oauth("ac_LATE", _state(url))
    with pytest.raises(TenantNotFound):
        billing.tenants.get("acme")


@responses.activate
def test_a_refused_code_connects_nothing(billing: Billing) -> None:
    """Stripe's invalid_grant is a StripeAPIError with its code; the tenant stays unknown."""
    url = billing.tenants.authorize_url("acme", mode=Mode.TEST, redirect_uri=REDIRECT)
    responses.post(
        f"{CONNECT}/oauth/token",
        status=400,
        json={"error": "invalid_grant", "error_description": "Authorization code expired"},
    )
    with pytest.raises(StripeAPIError) as raised:
        billing.tenants.complete_oauth("ac_OLD", _state(url))
    assert raised.value.code == "invalid_grant"
    with pytest.raises(TenantNotFound):
        billing.tenants.get("acme")


@responses.activate
def test_an_account_already_held_by_another_tenant_is_refused(billing: Billing) -> None:
    """OAuth for an account connected to another tenant raises and leaves both as they were."""
    billing.tenants.connect("other", ACCOUNT, modes=frozenset({Mode.TEST}))
    url = billing.tenants.authorize_url("acme", mode=Mode.TEST, redirect_uri=REDIRECT)
    responses.post(f"{CONNECT}/oauth/token", json=build_oauth_token(ACCOUNT))
    with pytest.raises(InvalidArgument, match="already connected"):
        billing.tenants.complete_oauth("ac_DUP", _state(url))
    assert billing.tenants.get("other").stripe_account_id == ACCOUNT
    with pytest.raises(TenantNotFound):
        billing.tenants.get("acme")


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"tenant": "has space", "mode": Mode.TEST, "redirect_uri": REDIRECT}, InvalidArgument),
        ({"tenant": "acme", "mode": "sandbox", "redirect_uri": REDIRECT}, InvalidArgument),
        ({"tenant": "acme", "mode": Mode.TEST, "redirect_uri": "ftp://x/y"}, InvalidArgument),
        ({"tenant": "acme", "mode": Mode.TEST, "redirect_uri": "not a url"}, InvalidArgument),
        (
            {"tenant": "acme", "mode": Mode.TEST, "redirect_uri": REDIRECT, "scope": "admin"},
            InvalidArgument,
        ),
        ({"tenant": "solo", "mode": Mode.TEST, "redirect_uri": REDIRECT}, InvalidArgument),
    ],
)
def test_bad_authorize_arguments_raise_and_store_nothing(
    billing: Billing, kwargs: dict[str, Any], error: type[Exception]
) -> None:
    """Malformed ids, modes, URLs and scopes, and the direct tenant, are refused."""
    billing.tenants.register_direct("solo")
    before = _snapshot(billing)
    tenant = kwargs.pop("tenant")
    with pytest.raises(error):
        billing.tenants.authorize_url(tenant, **kwargs)
    assert _snapshot(billing) == before


def test_authorize_url_without_a_client_id_is_a_config_error(clock: Clock) -> None:
    """OAuth needs the mode's connect_client_id; without it the error names the setting."""
    billing = _billing(clock, client_ids=False)
    with pytest.raises(ConfigError, match="connect_client_id"):
        billing.tenants.authorize_url("acme", mode=Mode.TEST, redirect_uri=REDIRECT)


@responses.activate
def test_deauthorize_revokes_at_stripe_then_disconnects_keeping_data(billing: Billing) -> None:
    """deauthorize posts the live client id and account, then the tenant's calls raise; data stays."""
    billing.tenants.connect("acme", ACCOUNT, modes=frozenset({Mode.LIVE, Mode.TEST}))
    customer = billing.customers.create("acme", email="kept@example.com")
    responses.post(f"{CONNECT}/oauth/deauthorize", json={"stripe_user_id": ACCOUNT})
    tenant = billing.tenants.deauthorize("acme")
    assert tenant.status is TenantStatus.DISCONNECTED
    (call,) = responses.calls
    _check_platform(call, Mode.LIVE)
    assert _form(call) == {"client_id": [CLIENT_IDS[Mode.LIVE]], "stripe_user_id": [ACCOUNT]}
    with pytest.raises(TenantNotConnected):
        billing.customers.create("acme", email="new@example.com")
    assert billing.customers.get("acme", customer.id) == customer


@responses.activate
def test_deauthorize_refused_by_stripe_leaves_the_tenant_connected(billing: Billing) -> None:
    """When Stripe refuses the deauthorization, the local connection is unchanged."""
    billing.tenants.connect("acme", ACCOUNT, modes=frozenset({Mode.TEST}))
    responses.post(
        f"{CONNECT}/oauth/deauthorize",
        status=401,
        json={"error": "invalid_client", "error_description": "No such application"},
    )
    with pytest.raises(StripeAPIError):
        billing.tenants.deauthorize("acme")
    assert billing.tenants.get("acme").connected
    assert _form(responses.calls[0])["client_id"] == [CLIENT_IDS[Mode.TEST]]


def test_deauthorize_unknown_or_direct_tenant_is_refused(billing: Billing) -> None:
    """Deauthorizing an unknown or the direct tenant raises before any call."""
    billing.tenants.register_direct("solo")
    with responses.RequestsMock():
        with pytest.raises(TenantNotFound):
            billing.tenants.deauthorize("ghost")
        with pytest.raises(InvalidArgument):
            billing.tenants.deauthorize("solo")


# -- Account Links ------------------------------------------------------------------------


@responses.activate
def test_account_links_onboarding_creates_the_account_once_and_connects_when_done(
    billing: Billing,
) -> None:
    """The account is created once, links are made on demand, and completion connects test-only."""
    account = "acct_1ONBOARDAAAAAA"
    responses.post(f"{API}/v1/accounts", json=build_account(id=account))
    responses.post(f"{API}/v1/account_links", json=build_account_link(account))
    url = billing.tenants.start_onboarding(
        "acme",
        mode=Mode.TEST,
        refresh_url="https://app.example.com/onboard/refresh",
        return_url="https://app.example.com/onboard/done",
        country="us",
    )
    assert url.startswith("https://connect.stripe.com/setup/")
    create, link = responses.calls
    for call in responses.calls:
        _check_platform(call, Mode.TEST)
    assert _form(create)["type"] == ["standard"]
    assert _form(create)["country"] == ["US"]
    assert _form(create)["metadata[rational_tenant]"] == ["acme"]
    assert _form(link) == {
        "account": [account],
        "refresh_url": ["https://app.example.com/onboard/refresh"],
        "return_url": ["https://app.example.com/onboard/done"],
        "type": ["account_onboarding"],
    }

    # The refresh URL asks again: same account, a new link.
    billing.tenants.start_onboarding(
        "acme",
        mode=Mode.TEST,
        refresh_url="https://app.example.com/onboard/refresh",
        return_url="https://app.example.com/onboard/done",
    )
    assert [c.request.url for c in responses.calls[2:]] == [f"{API}/v1/account_links"]

    responses.get(f"{API}/v1/accounts/{account}", json=build_account(id=account))
    status = billing.tenants.check_onboarding("acme")
    assert (status.details_submitted, status.connected) == (False, False)
    assert "external_account" in status.currently_due
    with pytest.raises(TenantNotFound):
        billing.tenants.get("acme")

    responses.replace(
        responses.GET,
        f"{API}/v1/accounts/{account}",
        json=build_account(id=account, details_submitted=True, charges_enabled=True),
    )
    done = billing.tenants.check_onboarding("acme")
    assert (done.details_submitted, done.charges_enabled, done.connected) == (True, True, True)
    tenant = billing.tenants.get("acme")
    assert (tenant.stripe_account_id, tenant.modes) == (account, frozenset({Mode.TEST}))
    _check_platform(responses.calls[-1], Mode.TEST)


@responses.activate
def test_account_creation_retried_after_a_lost_answer_reuses_its_key(billing: Billing) -> None:
    """A failed account creation is retried with the same idempotency key: one account."""
    responses.post(f"{API}/v1/accounts", body=requests.ConnectionError("reset"))
    kwargs: dict[str, Any] = {
        "mode": Mode.TEST,
        "refresh_url": "https://app.example.com/r",
        "return_url": "https://app.example.com/d",
    }
    with pytest.raises(StripeAPIError):
        billing.tenants.start_onboarding("acme", **kwargs)
    responses.replace(responses.POST, f"{API}/v1/accounts", json=build_account(id="acct_1RETRY"))
    responses.post(f"{API}/v1/account_links", json=build_account_link("acct_1RETRY"))
    billing.tenants.start_onboarding("acme", **kwargs)
    creates = [c for c in responses.calls if c.request.url == f"{API}/v1/accounts"]
    assert len(creates) == 2
    assert len({c.request.headers["Idempotency-Key"] for c in creates}) == 1


def test_check_onboarding_of_an_unknown_tenant_raises(billing: Billing) -> None:
    """Asking about an onboarding that never started is TenantNotFound, with no call."""
    with responses.RequestsMock(), pytest.raises(TenantNotFound):
        billing.tenants.check_onboarding("ghost")


def test_start_onboarding_refuses_bad_urls_and_connected_tenants(billing: Billing) -> None:
    """Bad URLs or country, and an already connected tenant, raise before any call."""
    billing.tenants.connect("acme", ACCOUNT, modes=frozenset({Mode.TEST}))
    ok = {"refresh_url": "https://a.example/r", "return_url": "https://a.example/d"}
    with responses.RequestsMock():
        with pytest.raises(InvalidArgument, match="already connected"):
            billing.tenants.start_onboarding("acme", mode=Mode.TEST, **ok)
        with pytest.raises(InvalidArgument):
            billing.tenants.start_onboarding("new", mode=Mode.TEST, **{**ok, "return_url": "x"})
        with pytest.raises(InvalidArgument):
            billing.tenants.start_onboarding("new", mode=Mode.TEST, country="USA", **ok)


# -- webhooks -------------------------------------------------------------------------------


def test_deauthorized_event_disconnects_the_tenant_and_keeps_its_data(
    billing: Billing, clock: Clock
) -> None:
    """account.application.deauthorized marks the tenant disconnected; reads still work."""
    billing.tenants.connect("acme", ACCOUNT, modes=frozenset({Mode.TEST}))
    customer = billing.customers.create("acme", email="kept@example.com")
    clock.now += timedelta(minutes=5)
    application = {"id": CLIENT_IDS[Mode.TEST], "object": "application", "name": "Platform"}
    event = make_event(
        "account.application.deauthorized",
        application,
        account=ACCOUNT,
        created=int(clock.now.timestamp()),
    )
    response = _deliver(billing, event, clock)
    assert (response.status_code, response.outcome) == (200, EventOutcome.APPLIED)
    tenant = billing.tenants.get("acme")
    assert tenant.status is TenantStatus.DISCONNECTED
    with responses.RequestsMock(), pytest.raises(TenantNotConnected):
        billing.customers.create_in_stripe("acme", customer.id, mode=Mode.TEST)
    assert billing.customers.get("acme", customer.id) == customer


def test_a_deauthorization_older_than_the_connection_is_stale(
    billing: Billing, clock: Clock
) -> None:
    """A deauthorization from before the tenant reconnected does not disconnect it."""
    old = int(clock.now.timestamp()) - 60
    billing.tenants.connect("acme", ACCOUNT, modes=frozenset({Mode.TEST}))
    application = {"id": CLIENT_IDS[Mode.TEST], "object": "application", "name": None}
    event = make_event(
        "account.application.deauthorized", application, account=ACCOUNT, created=old
    )
    response = _deliver(billing, event, clock)
    assert response.outcome is EventOutcome.STALE
    assert billing.tenants.get("acme").connected


def test_another_platforms_deauthorization_is_ignored(billing: Billing, clock: Clock) -> None:
    """An application id that is not one of ours leaves the tenant connected."""
    billing.tenants.connect("acme", ACCOUNT, modes=frozenset({Mode.TEST}))
    clock.now += timedelta(minutes=1)
    event = make_event(
        "account.application.deauthorized",
        {"id": "ca_SOMEONEELSE", "object": "application", "name": None},
        account=ACCOUNT,
        created=int(clock.now.timestamp()),
    )
    assert _deliver(billing, event, clock).outcome is EventOutcome.IGNORED
    assert billing.tenants.get("acme").connected


def test_registering_the_same_connection_again_keeps_a_deauthorization_current(
    billing: Billing, clock: Clock
) -> None:
    """connect() again for the same account (say at start-up) does not make a later deauthorization stale."""
    billing.tenants.connect("acme", ACCOUNT, modes=frozenset({Mode.TEST}))
    deauthorized_at = int((clock.now + timedelta(minutes=5)).timestamp())
    clock.now += timedelta(minutes=10)
    again = billing.tenants.connect("acme", ACCOUNT, modes=frozenset({Mode.TEST}))
    assert again.connected_at == clock.now - timedelta(minutes=10)
    application = {"id": CLIENT_IDS[Mode.TEST], "object": "application", "name": None}
    event = make_event(
        "account.application.deauthorized", application, account=ACCOUNT, created=deauthorized_at
    )
    assert _deliver(billing, event, clock).outcome is EventOutcome.APPLIED
    assert billing.tenants.get("acme").status is TenantStatus.DISCONNECTED


@responses.activate
def test_events_held_for_an_account_are_applied_when_oauth_connects_it(
    billing: Billing, clock: Clock
) -> None:
    """A customer.created for a not-yet-connected account is held, then applied on connection."""
    created = build_customer(id="cus_HELD1", email="held@example.com")
    event = make_event(
        "customer.created", created, account=ACCOUNT, created=int(clock.now.timestamp())
    )
    assert _deliver(billing, event, clock).outcome is EventOutcome.HELD
    url = billing.tenants.authorize_url("acme", mode=Mode.TEST, redirect_uri=REDIRECT)
    responses.post(f"{CONNECT}/oauth/token", json=build_oauth_token(ACCOUNT))
    responses.get(f"{API}/v1/customers/cus_HELD1", json=created)
    billing.tenants.complete_oauth("ac_HELD", _state(url))
    (customer,) = billing.customers.list("acme")
    assert customer.link is not None and customer.link.stripe_customer_id == "cus_HELD1"
    mailer = billing.mailer
    assert isinstance(mailer, RecordingMailer)
    assert [e.to for e in mailer.to("held@example.com")] == ["held@example.com"]
    refresh = responses.calls[-1]
    assert refresh.request.headers["Stripe-Account"] == ACCOUNT
    assert refresh.request.headers["Authorization"] == f"Bearer {KEYS[Mode.TEST]}"


def test_moving_a_tenant_to_another_account_needs_confirmation(billing: Billing) -> None:
    """connect with a different account (or off the direct account) is guarded like a remap."""
    billing.tenants.connect("acme", "acct_1OLDACCOUNT", modes=frozenset({Mode.TEST}))
    before = _snapshot(billing)
    with pytest.raises(RemapConfirmationRequired) as info:
        billing.tenants.connect("acme", "acct_1NEWACCOUNT", modes=frozenset({Mode.TEST}))
    assert info.value.impact["from_account"] == "acct_1OLDACCOUNT"
    assert info.value.impact["to_account"] == "acct_1NEWACCOUNT"
    assert _snapshot(billing) == before
    moved = billing.tenants.connect(
        "acme", "acct_1NEWACCOUNT", modes=frozenset({Mode.TEST}), confirm_remap=True
    )
    assert moved.stripe_account_id == "acct_1NEWACCOUNT"
    billing.tenants.register_direct("solo")
    with pytest.raises(RemapConfirmationRequired):
        billing.tenants.connect("solo", "acct_1SOLOACCOUNT", modes=frozenset({Mode.TEST}))
