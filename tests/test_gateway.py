"""`StripeGateway` on the wire, against `responses`: headers, keys, retries, errors, pagination."""

from __future__ import annotations

import copy
import json
import math
import traceback
import types
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from types import MappingProxyType
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
import requests
import responses
import stripe

from rational_billing import BillingConfig, Mode, ModeKeys, RateLimits
from rational_billing.adapters._retry import RetryPolicy
from rational_billing.adapters.stripe_gateway import StripeGateway, redact
from rational_billing.errors import ConfigError, InvalidArgument, StripeAPIError

API = "https://api.stripe.com"
TEST_KEY = "sk_test_x"
LIVE_KEY = "sk_live_y"
ACCOUNT = "acct_1Tenant"


class FakeTime:
    """A monotonic clock that only moves when the gateway sleeps on it."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture(autouse=True)
def _private_stripe_config_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Keep the SDK's telemetry id file (written on the first request) out of $HOME."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("xdg")))


@pytest.fixture
def mock() -> Iterator[responses.RequestsMock]:
    """Every HTTP call goes to `responses`; unregistered URLs fail the test."""
    with responses.RequestsMock(assert_all_requests_are_fired=True) as rsps:
        yield rsps


@pytest.fixture
def fake() -> FakeTime:
    """A fresh fake clock recording every sleep."""
    return FakeTime()


def _config(**kwargs: Any) -> BillingConfig:
    return BillingConfig(
        test=ModeKeys(secret_key=TEST_KEY), live=ModeKeys(secret_key=LIVE_KEY), **kwargs
    )


@pytest.fixture
def gateway(fake: FakeTime) -> Iterator[StripeGateway]:
    """A gateway for both modes with deterministic waits (0.5, 1, 2, ...) on a fake clock."""
    with StripeGateway(
        _config(), retry=RetryPolicy(jitter=False), clock=fake.clock, sleep=fake.sleep
    ) as gw:
        yield gw


def _query(call: Any) -> list[tuple[str, str]]:
    return parse_qsl(urlsplit(call.request.url).query, keep_blank_values=True)


def _form(call: Any) -> list[tuple[str, str]]:
    body = call.request.body
    text = body.decode() if isinstance(body, bytes) else (body or "")
    return parse_qsl(text, keep_blank_values=True)


def _error(status: int, code: str | None = "some_code", message: str = "nope") -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "type": "invalid_request_error"}}


# -- headers: account, key, idempotency ---------------------------------------------


def test_platform_call_sends_no_stripe_account(
    gateway: StripeGateway, mock: responses.RequestsMock
) -> None:
    """A call for the platform's own account carries no Stripe-Account header."""
    mock.get(f"{API}/v1/customers/cus_1", json={"id": "cus_1", "object": "customer"})
    gateway.request("GET", "/v1/customers/cus_1", mode=Mode.TEST, account=None)
    assert "Stripe-Account" not in mock.calls[0].request.headers


def test_connected_account_call_sends_stripe_account(
    gateway: StripeGateway, mock: responses.RequestsMock
) -> None:
    """A call for a connected account carries its acct_ id in Stripe-Account."""
    mock.get(f"{API}/v1/customers/cus_1", json={"id": "cus_1", "object": "customer"})
    gateway.request("GET", "/v1/customers/cus_1", mode=Mode.TEST, account=ACCOUNT)
    assert mock.calls[0].request.headers["Stripe-Account"] == ACCOUNT


@pytest.mark.parametrize(("mode", "key"), [(Mode.TEST, TEST_KEY), (Mode.LIVE, LIVE_KEY)])
def test_each_mode_uses_its_own_key(
    gateway: StripeGateway, mock: responses.RequestsMock, mode: Mode, key: str
) -> None:
    """The bearer key is the one configured for the request's mode."""
    mock.get(f"{API}/v1/balance", json={"object": "balance"})
    gateway.request("GET", "/v1/balance", mode=mode, account=ACCOUNT)
    assert mock.calls[0].request.headers["Authorization"] == f"Bearer {key}"


def test_both_modes_in_one_gateway_keep_their_keys(
    gateway: StripeGateway, mock: responses.RequestsMock
) -> None:
    """Interleaved test and live calls each use their own key."""
    mock.get(f"{API}/v1/balance", json={"object": "balance"})
    for mode in (Mode.TEST, Mode.LIVE, Mode.TEST):
        gateway.request("GET", "/v1/balance", mode=mode, account=None)
    keys = [call.request.headers["Authorization"] for call in mock.calls]
    assert keys == [f"Bearer {TEST_KEY}", f"Bearer {LIVE_KEY}", f"Bearer {TEST_KEY}"]


def test_post_sends_the_callers_idempotency_key(
    gateway: StripeGateway, mock: responses.RequestsMock
) -> None:
    """The Idempotency-Key header is exactly the key the caller stored with its operation."""
    mock.post(f"{API}/v1/customers", json={"id": "cus_1", "object": "customer"})
    gateway.request(
        "POST",
        "/v1/customers",
        mode=Mode.TEST,
        account=ACCOUNT,
        params={"email": "ada@example.com"},
        idempotency_key="op-7f3a",
    )
    headers = mock.calls[0].request.headers
    assert headers["Idempotency-Key"] == "op-7f3a"
    assert headers["Stripe-Account"] == ACCOUNT


@pytest.mark.parametrize("method", ["POST", "DELETE", "post"])
def test_mutating_call_without_idempotency_key_is_refused(
    gateway: StripeGateway, mock: responses.RequestsMock, method: str
) -> None:
    """POST and DELETE without the caller's idempotency key raise before any HTTP call."""
    with pytest.raises(InvalidArgument, match="idempotency_key"):
        gateway.request(method, "/v1/customers/cus_1", mode=Mode.TEST, account=None)
    assert len(mock.calls) == 0


def test_unconfigured_mode_is_a_config_error(mock: responses.RequestsMock) -> None:
    """A call in a mode without keys raises ConfigError naming that mode, without HTTP."""
    gateway = StripeGateway(BillingConfig(test=ModeKeys(secret_key=TEST_KEY)))
    with pytest.raises(ConfigError, match="live"):
        gateway.request("GET", "/v1/balance", mode=Mode.LIVE, account=None)
    assert len(mock.calls) == 0


@pytest.mark.parametrize(
    "case",
    [
        ("PATCH", "/v1/customers", None, None),
        ("GET", "v1/customers", None, None),
        ("GET", "https://evil.example/v1/customers", None, None),
        ("GET", "/v1/customers?limit=1", None, None),
        ("GET", "/v2/core/events", None, None),
        ("GET", "/v1/customers", "cus_1", None),
        ("GET", "/v1/customers", "", None),
        ("GET", "/v1/customers", None, {"usage": "off_session"}),
        ("GET", "/v1/customers", None, {"api_key": "sk_test_other"}),
    ],
)
def test_malformed_requests_are_refused(
    gateway: StripeGateway,
    mock: responses.RequestsMock,
    case: tuple[str, str, str | None, dict[str, Any] | None],
) -> None:
    """Bad methods, paths, accounts or SDK-reserved parameter names raise InvalidArgument."""
    method, path, account, params = case
    with pytest.raises(InvalidArgument):
        gateway.request(method, path, mode=Mode.TEST, account=account, params=params)
    assert len(mock.calls) == 0


# -- parameters and responses --------------------------------------------------------


def test_get_params_go_in_the_query_string(
    gateway: StripeGateway, mock: responses.RequestsMock
) -> None:
    """GET parameters, nested dicts and lists included, are encoded in Stripe's query form."""
    mock.get(f"{API}/v1/subscriptions", json={"object": "list", "data": [], "has_more": False})
    gateway.request(
        "GET",
        "/v1/subscriptions",
        mode=Mode.TEST,
        account=None,
        params={
            "status": "all",
            "created": {"gte": 1700000000},
            "expand": ("data.customer", "data.items"),
            "test_clock": None,
        },
    )
    call = mock.calls[0]
    assert call.request.body is None
    assert _query(call) == [
        ("status", "all"),
        ("created[gte]", "1700000000"),
        ("expand[0]", "data.customer"),
        ("expand[1]", "data.items"),
    ]


def test_post_params_are_form_encoded(gateway: StripeGateway, mock: responses.RequestsMock) -> None:
    """POST parameters are a form body: nested mappings, lists of dicts, booleans, blanks."""
    mock.post(f"{API}/v1/subscriptions", json={"id": "sub_1", "object": "subscription"})
    gateway.request(
        "POST",
        "/v1/subscriptions",
        mode=Mode.TEST,
        account=ACCOUNT,
        params={
            "customer": "cus_1",
            "items": [{"price": "price_1", "quantity": 2}],
            "metadata": MappingProxyType({"rational_customer_id": "c-1", "old": ""}),
            "cancel_at_period_end": True,
            "description": None,
        },
        idempotency_key="op-1",
    )
    call = mock.calls[0]
    assert call.request.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert urlsplit(call.request.url).query == ""
    assert _form(call) == [
        ("customer", "cus_1"),
        ("items[0][price]", "price_1"),
        ("items[0][quantity]", "2"),
        ("metadata[rational_customer_id]", "c-1"),
        ("metadata[old]", ""),
        ("cancel_at_period_end", "true"),
    ]


def test_delete_sends_the_key_and_no_body(
    gateway: StripeGateway, mock: responses.RequestsMock
) -> None:
    """DELETE carries the caller's idempotency key and returns Stripe's deletion object."""
    mock.delete(f"{API}/v1/customers/cus_1", json={"id": "cus_1", "deleted": True})
    result = gateway.request(
        "DELETE", "/v1/customers/cus_1", mode=Mode.LIVE, account=ACCOUNT, idempotency_key="op-del"
    )
    assert result == {"id": "cus_1", "deleted": True}
    assert mock.calls[0].request.headers["Idempotency-Key"] == "op-del"
    assert not mock.calls[0].request.body


def test_get_may_carry_an_idempotency_key(
    gateway: StripeGateway, mock: responses.RequestsMock
) -> None:
    """A GET with a key sends it; one without sends none (the gateway never invents keys)."""
    mock.get(f"{API}/v1/balance", json={"object": "balance"})
    gateway.request("GET", "/v1/balance", mode=Mode.TEST, account=None, idempotency_key="k")
    gateway.request("GET", "/v1/balance", mode=Mode.TEST, account=None)
    assert mock.calls[0].request.headers["Idempotency-Key"] == "k"
    assert "Idempotency-Key" not in mock.calls[1].request.headers


def test_responses_are_plain_json_dicts(
    gateway: StripeGateway, mock: responses.RequestsMock
) -> None:
    """The result is what json.loads gives: dicts and lists, never SDK objects."""
    body = {
        "id": "sub_1",
        "object": "subscription",
        "items": {"object": "list", "data": [{"id": "si_1", "price": {"id": "price_1"}}]},
        "metadata": {},
    }
    mock.get(f"{API}/v1/subscriptions/sub_1", json=body)
    result = gateway.request("GET", "/v1/subscriptions/sub_1", mode=Mode.TEST, account=None)
    assert result == body
    assert type(result) is dict
    assert type(result["items"]) is dict
    assert type(result["items"]["data"][0]["price"]) is dict
    assert not isinstance(result, stripe.StripeObject)


def test_api_base_replaces_api_and_connect_hosts(mock: responses.RequestsMock) -> None:
    """With api_base set, API calls and OAuth calls both go to that server."""
    base = "http://127.0.0.1:12111"
    mock.get(f"{base}/v1/balance", json={"object": "balance"})
    mock.post(f"{base}/oauth/token", json={"stripe_user_id": ACCOUNT})
    gateway = StripeGateway(_config(api_base=base + "/"), retry=RetryPolicy.none())
    gateway.request("GET", "/v1/balance", mode=Mode.TEST, account=None)
    token = gateway.request(
        "POST",
        "/oauth/token",
        mode=Mode.TEST,
        account=None,
        params={"grant_type": "authorization_code", "code": "ac_1"},
        idempotency_key="oauth-1",
    )
    assert token == {"stripe_user_id": ACCOUNT}
    assert [call.request.url.split("?")[0] for call in mock.calls] == [
        f"{base}/v1/balance",
        f"{base}/oauth/token",
    ]


def test_oauth_goes_to_the_connect_host_by_default(
    gateway: StripeGateway, mock: responses.RequestsMock
) -> None:
    """/oauth/ paths use connect.stripe.com; an OAuth error keeps its code."""
    mock.post(
        "https://connect.stripe.com/oauth/token",
        status=400,
        json={"error": "invalid_grant", "error_description": "Authorization code expired"},
    )
    with pytest.raises(StripeAPIError) as info:
        gateway.request(
            "POST",
            "/oauth/token",
            mode=Mode.TEST,
            account=None,
            params={"grant_type": "authorization_code", "code": "ac_1"},
            idempotency_key="oauth-1",
        )
    assert info.value.code == "invalid_grant"
    assert info.value.status == 400
    assert "Authorization code expired" in str(info.value)


# -- errors -------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "code"), [(400, "parameter_missing"), (402, "card_declined")])
def test_client_errors_are_final_and_mapped(
    gateway: StripeGateway, fake: FakeTime, mock: responses.RequestsMock, status: int, code: str
) -> None:
    """A 4xx is raised after one attempt with its status, code, request id and retryable=False."""
    mock.post(
        f"{API}/v1/invoices/in_1/pay",
        status=status,
        json=_error(status, code, "declined"),
        headers={"Request-Id": "req_abc"},
    )
    with pytest.raises(StripeAPIError) as info:
        gateway.request(
            "POST", "/v1/invoices/in_1/pay", mode=Mode.TEST, account=ACCOUNT, idempotency_key="k"
        )
    err = info.value
    assert (err.status, err.code, err.request_id, err.retryable) == (status, code, "req_abc", False)
    assert err.mode is Mode.TEST
    assert len(mock.calls) == 1
    assert fake.sleeps == []
    assert "req_abc" in str(err)


def test_not_found_is_a_plain_stripe_api_error(
    gateway: StripeGateway, mock: responses.RequestsMock
) -> None:
    """A 404 carries resource_missing; deciding "customer not found" is left to the caller."""
    mock.get(
        f"{API}/v1/customers/cus_gone",
        status=404,
        json=_error(404, "resource_missing", "No such customer: 'cus_gone'"),
        headers={"request-id": "req_404"},
    )
    with pytest.raises(StripeAPIError) as info:
        gateway.request("GET", "/v1/customers/cus_gone", mode=Mode.TEST, account=ACCOUNT)
    assert type(info.value) is StripeAPIError
    assert info.value.status == 404
    assert info.value.code == "resource_missing"
    assert info.value.request_id == "req_404"
    assert len(mock.calls) == 1


@pytest.mark.parametrize("status", [409, 429, 500, 503])
def test_retryable_statuses_are_retried_with_the_same_key(
    gateway: StripeGateway, fake: FakeTime, mock: responses.RequestsMock, status: int
) -> None:
    """409, 429 and 5xx are retried, every attempt with the caller's idempotency key."""
    url = f"{API}/v1/customers"
    mock.post(url, status=status, json=_error(status, "lock_timeout"))
    mock.post(url, status=status, json=_error(status, "lock_timeout"))
    mock.post(url, json={"id": "cus_1", "object": "customer"})
    result = gateway.request(
        "POST", "/v1/customers", mode=Mode.TEST, account=ACCOUNT, idempotency_key="op-same"
    )
    assert result["id"] == "cus_1"
    assert [c.request.headers["Idempotency-Key"] for c in mock.calls] == ["op-same"] * 3
    assert [c.request.headers["Stripe-Account"] for c in mock.calls] == [ACCOUNT] * 3
    assert fake.sleeps == [0.5, 1.0]


def test_exhausted_retries_raise_a_retryable_error(
    gateway: StripeGateway, fake: FakeTime, mock: responses.RequestsMock
) -> None:
    """After the last attempt the mapped error is raised with retryable=True."""
    mock.post(
        f"{API}/v1/customers",
        status=503,
        json=_error(503, None, "try later"),
        headers={"Request-Id": "req_last"},
    )
    with pytest.raises(StripeAPIError) as info:
        gateway.request(
            "POST", "/v1/customers", mode=Mode.TEST, account=None, idempotency_key="op-1"
        )
    assert len(mock.calls) == 4
    assert {c.request.headers["Idempotency-Key"] for c in mock.calls} == {"op-1"}
    assert fake.sleeps == [0.5, 1.0, 2.0]
    assert (info.value.status, info.value.retryable, info.value.request_id) == (
        503,
        True,
        "req_last",
    )


def test_should_retry_false_overrides_a_5xx(
    gateway: StripeGateway, fake: FakeTime, mock: responses.RequestsMock
) -> None:
    """Stripe-Should-Retry: false stops retries even for a 500."""
    mock.post(
        f"{API}/v1/customers",
        status=500,
        json=_error(500, None, "replayed"),
        headers={"Stripe-Should-Retry": "false"},
    )
    with pytest.raises(StripeAPIError) as info:
        gateway.request(
            "POST", "/v1/customers", mode=Mode.TEST, account=None, idempotency_key="op-1"
        )
    assert len(mock.calls) == 1
    assert info.value.retryable is False
    assert fake.sleeps == []


def test_should_retry_true_overrides_a_4xx(
    gateway: StripeGateway, mock: responses.RequestsMock
) -> None:
    """Stripe-Should-Retry: true makes even a 400 worth another attempt."""
    url = f"{API}/v1/customers"
    mock.post(url, status=400, json=_error(400), headers={"Stripe-Should-Retry": "true"})
    mock.post(url, json={"id": "cus_1"})
    result = gateway.request(
        "POST", "/v1/customers", mode=Mode.TEST, account=None, idempotency_key="op-1"
    )
    assert result == {"id": "cus_1"}
    assert len(mock.calls) == 2


def test_non_json_5xx_is_retried(
    gateway: StripeGateway, fake: FakeTime, mock: responses.RequestsMock
) -> None:
    """A 502 with an HTML body from a proxy is retried like any 5xx."""
    url = f"{API}/v1/balance"
    mock.get(url, status=502, body="<html>Bad Gateway</html>", content_type="text/html")
    mock.get(url, json={"object": "balance"})
    assert gateway.request("GET", "/v1/balance", mode=Mode.TEST, account=None) == {
        "object": "balance"
    }
    assert fake.sleeps == [0.5]


def test_retry_after_is_honoured(
    gateway: StripeGateway, fake: FakeTime, mock: responses.RequestsMock
) -> None:
    """A 429 with Retry-After waits that many seconds before the next attempt."""
    url = f"{API}/v1/customers"
    mock.get(url, status=429, json=_error(429, "rate_limit"), headers={"Retry-After": "3"})
    mock.get(url, json={"object": "list", "data": [], "has_more": False})
    gateway.request("GET", "/v1/customers", mode=Mode.TEST, account=None)
    assert fake.sleeps == [3.0]


def test_retry_after_is_capped(fake: FakeTime, mock: responses.RequestsMock) -> None:
    """A Retry-After longer than retry_after_cap waits only the cap."""
    url = f"{API}/v1/customers"
    mock.get(url, status=429, json=_error(429, "rate_limit"), headers={"Retry-After": "600"})
    mock.get(url, json={"object": "list", "data": [], "has_more": False})
    gateway = StripeGateway(
        _config(),
        retry=RetryPolicy(retry_after_cap=30.0),
        clock=fake.clock,
        sleep=fake.sleep,
    )
    gateway.request("GET", "/v1/customers", mode=Mode.TEST, account=None)
    assert fake.sleeps == [30.0]


def test_connection_error_is_retried(
    gateway: StripeGateway, fake: FakeTime, mock: responses.RequestsMock
) -> None:
    """A connection error is retried, with the same idempotency key, and may then succeed."""
    url = f"{API}/v1/customers"
    mock.post(url, body=requests.exceptions.ConnectionError("connection reset"))
    mock.post(url, json={"id": "cus_1"})
    result = gateway.request(
        "POST", "/v1/customers", mode=Mode.TEST, account=ACCOUNT, idempotency_key="op-net"
    )
    assert result == {"id": "cus_1"}
    assert [c.request.headers["Idempotency-Key"] for c in mock.calls] == ["op-net", "op-net"]
    assert fake.sleeps == [0.5]


def test_connection_error_after_retries_is_mapped(
    gateway: StripeGateway, fake: FakeTime, mock: responses.RequestsMock
) -> None:
    """When Stripe stays unreachable: StripeAPIError with status None and retryable=True."""
    mock.get(f"{API}/v1/balance", body=requests.exceptions.ConnectionError("refused"))
    with pytest.raises(StripeAPIError) as info:
        gateway.request("GET", "/v1/balance", mode=Mode.LIVE, account=None)
    err = info.value
    assert (err.status, err.retryable, err.request_id, err.mode) == (None, True, None, Mode.LIVE)
    assert "refused" in str(err)
    assert isinstance(err.__cause__, requests.exceptions.ConnectionError)
    assert len(mock.calls) == 4
    assert fake.sleeps == [0.5, 1.0, 2.0]


def test_no_key_in_error_messages(gateway: StripeGateway, mock: responses.RequestsMock) -> None:
    """A 401 that echoes the key yields an error whose message, repr and traceback hide it."""
    echoed = f"Invalid API Key provided: {TEST_KEY}****abcd; webhook whsec_abc123 rk_live_9"
    mock.get(
        f"{API}/v1/balance",
        status=401,
        json={"error": {"message": echoed, "type": "invalid_request_error"}},
        headers={"Request-Id": "req_401"},
    )
    with pytest.raises(StripeAPIError) as info:
        gateway.request("GET", "/v1/balance", mode=Mode.TEST, account=None)
    err = info.value
    chain: list[BaseException] = []
    link: BaseException | None = err
    while link is not None:
        chain.append(link)
        link = link.__cause__ or link.__context__
    shown = " ".join(
        [repr(err), *traceback.format_exception(err)] + [f"{e} {vars(e)}" for e in chain]
    )
    for secret in ("sk_test_", TEST_KEY, "whsec_", "rk_live_"):
        assert secret not in shown
    assert "Invalid API Key provided" in str(err)
    assert (err.status, err.request_id, err.retryable) == (401, "req_401", False)


def test_redact_leaves_ordinary_words_alone() -> None:
    """Redaction hides key-shaped tokens only, not words such as risk_level or task_id."""
    assert redact("risk_level task_id sk_test_abc rk_live_x whsec_1") == (
        "risk_level task_id [redacted] [redacted] [redacted]"
    )


def test_gateway_repr_has_no_key() -> None:
    """The gateway's repr names its modes, never a key."""
    text = repr(StripeGateway(_config()))
    assert "sk_" not in text
    assert "live" in text
    assert "test" in text


def test_one_gateway_serves_many_threads(mock: responses.RequestsMock) -> None:
    """Concurrent calls in both modes for several accounts each get the right key and account."""
    mock.get(f"{API}/v1/balance", json={"object": "balance"})
    gateway = StripeGateway(_config(), retry=RetryPolicy.none(), sleep=lambda _: None)
    jobs = [(mode, f"acct_{n}") for n in range(6) for mode in Mode]

    def run(job: tuple[Mode, str]) -> None:
        mode, account = job
        for _ in range(5):
            gateway.request("GET", "/v1/balance", mode=mode, account=account)

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        list(pool.map(run, jobs))
    seen = Counter(
        (c.request.headers["Authorization"], c.request.headers["Stripe-Account"])
        for c in mock.calls
    )
    expected = {
        (f"Bearer {TEST_KEY if mode is Mode.TEST else LIVE_KEY}", account): 5
        for mode, account in jobs
    }
    assert seen == expected


# -- pagination -----------------------------------------------------------------------


def _serve_list(mock: responses.RequestsMock, path: str, objects: list[dict[str, Any]]) -> None:
    """A list endpoint over ``objects`` that honours limit and starting_after like Stripe."""

    def callback(request: Any) -> tuple[int, dict[str, str], str]:
        query = dict(parse_qsl(urlsplit(request.url).query))
        limit = int(query.get("limit", 10))
        start = 0
        if "starting_after" in query:
            ids = [o["id"] for o in objects]
            start = ids.index(query["starting_after"]) + 1
        page = objects[start : start + limit]
        body = {
            "object": "list",
            "url": path,
            "data": page,
            "has_more": start + limit < len(objects),
        }
        return 200, {"Request-Id": f"req_{start}"}, json.dumps(body)

    mock.add_callback(responses.GET, f"{API}{path}", callback=callback)


def _customers(count: int) -> list[dict[str, Any]]:
    return [{"id": f"cus_{n:05d}", "object": "customer", "email": None} for n in range(count)]


@pytest.mark.parametrize("count", [1, 99, 100, 101, 250, 1000])
def test_list_all_needs_ceil_n_over_100_calls(
    gateway: StripeGateway, mock: responses.RequestsMock, count: int
) -> None:
    """Listing N objects makes ceil(N/100) calls with limit=100 and yields all of them in order."""
    objects = _customers(count)
    _serve_list(mock, "/v1/customers", objects)
    listed = list(gateway.list_all("/v1/customers", mode=Mode.TEST, account=ACCOUNT))
    assert listed == objects
    assert len(mock.calls) == math.ceil(count / 100)
    assert all(dict(_query(c))["limit"] == "100" for c in mock.calls)
    assert all(c.request.headers["Stripe-Account"] == ACCOUNT for c in mock.calls)
    assert all(type(o) is dict for o in listed)


def test_list_all_of_nothing_makes_one_call(
    gateway: StripeGateway, mock: responses.RequestsMock
) -> None:
    """An empty list costs exactly one call."""
    _serve_list(mock, "/v1/customers", [])
    assert list(gateway.list_all("/v1/customers", mode=Mode.TEST, account=None)) == []
    assert len(mock.calls) == 1


def test_list_all_is_lazy(gateway: StripeGateway, mock: responses.RequestsMock) -> None:
    """Pages are fetched only as the iteration reaches them."""
    _serve_list(mock, "/v1/customers", _customers(250))
    listing = gateway.list_all("/v1/customers", mode=Mode.TEST, account=None)
    assert len(mock.calls) == 0
    first = [next(listing) for _ in range(100)]
    assert len(mock.calls) == 1
    assert first[-1]["id"] == "cus_00099"
    next(listing)
    assert len(mock.calls) == 2
    assert dict(_query(mock.calls[1]))["starting_after"] == "cus_00099"


def test_list_all_keeps_filters_and_resumes_from_a_checkpoint(
    gateway: StripeGateway, mock: responses.RequestsMock
) -> None:
    """Caller filters go on every page, and starting_after resumes after a checkpoint."""
    objects = _customers(300)
    _serve_list(mock, "/v1/customers", objects)
    listed = list(
        gateway.list_all(
            "/v1/customers",
            mode=Mode.LIVE,
            account=None,
            params={"starting_after": "cus_00049", "created": {"gte": 1}},
        )
    )
    assert listed == objects[50:]
    assert len(mock.calls) == 3
    assert all(("created[gte]", "1") in _query(c) for c in mock.calls)


def test_list_pages_yields_raw_pages(gateway: StripeGateway, mock: responses.RequestsMock) -> None:
    """list_pages yields Stripe's page objects, for callers that checkpoint per page."""
    _serve_list(mock, "/v1/customers", _customers(150))
    pages = list(gateway.list_pages("/v1/customers", mode=Mode.TEST, account=None))
    assert [len(p["data"]) for p in pages] == [100, 50]
    assert [p["has_more"] for p in pages] == [True, False]


def test_list_page_rejects_a_non_list_answer(
    gateway: StripeGateway, mock: responses.RequestsMock
) -> None:
    """A list call answered with something other than a list page raises StripeAPIError."""
    mock.get(f"{API}/v1/customers", json={"object": "customer", "id": "cus_1"})
    with pytest.raises(StripeAPIError, match="list page"):
        gateway.list_page("/v1/customers", mode=Mode.TEST, account=None)


def test_search_pagination_follows_next_page(
    gateway: StripeGateway, mock: responses.RequestsMock
) -> None:
    """Search endpoints are paged with next_page rather than starting_after."""
    url = f"{API}/v1/customers/search"
    mock.get(
        url,
        json={
            "object": "search_result",
            "data": [{"id": "cus_1"}],
            "has_more": True,
            "next_page": "pg_2",
        },
    )
    mock.get(
        url,
        json={"object": "search_result", "data": [{"id": "cus_2"}], "has_more": False},
    )
    listed = list(
        gateway.list_all(
            "/v1/customers/search", mode=Mode.TEST, account=None, params={"query": "email:'a'"}
        )
    )
    assert [o["id"] for o in listed] == ["cus_1", "cus_2"]
    assert dict(_query(mock.calls[1]))["page"] == "pg_2"


# -- rate limits ----------------------------------------------------------------------


def test_calls_wait_for_the_rate_limit(fake: FakeTime, mock: responses.RequestsMock) -> None:
    """More calls than one second's budget are spread out at the mode's rate."""
    mock.get(f"{API}/v1/balance", json={"object": "balance"})
    gateway = StripeGateway(
        _config(rate_limits=RateLimits(test=10.0)),
        retry=RetryPolicy.none(),
        clock=fake.clock,
        sleep=fake.sleep,
    )
    for _ in range(30):
        gateway.request("GET", "/v1/balance", mode=Mode.TEST, account=ACCOUNT)
    assert fake.now == pytest.approx((30 - 10) / 10)


def test_rate_limits_argument_overrides_the_config(
    fake: FakeTime, mock: responses.RequestsMock
) -> None:
    """rate_limits= replaces config.rate_limits; accounts are limited separately."""
    mock.get(f"{API}/v1/balance", json={"object": "balance"})
    gateway = StripeGateway(
        _config(),
        retry=RetryPolicy.none(),
        clock=fake.clock,
        sleep=fake.sleep,
        rate_limits=RateLimits(live=2.0),
    )
    for account in ("acct_a", "acct_b"):
        for _ in range(4):
            gateway.request("GET", "/v1/balance", mode=Mode.LIVE, account=account)
    assert fake.now == pytest.approx(2 * (4 - 2) / 2)


# -- stripe's module globals ------------------------------------------------------------


def _stripe_globals() -> dict[str, Any]:
    """Every plain value among the ``stripe`` module's globals (and its default HTTP client)."""
    snapshot: dict[str, Any] = {}
    for name, value in vars(stripe).items():
        if name.startswith("__") or isinstance(value, types.ModuleType | type) or callable(value):
            continue
        snapshot[name] = copy.copy(value)
    snapshot["default_http_client"] = stripe.default_http_client
    return snapshot


@pytest.fixture
def sentinel_globals(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Give stripe's main globals odd values, so that any use or overwrite of them shows."""
    values: dict[str, Any] = {
        "api_key": "sk_test_from_the_global",
        "api_base": "https://global-api.invalid",
        "connect_api_base": "https://global-connect.invalid",
        "api_version": "2011-01-01",
        "proxy": "http://global-proxy.invalid:1",
        "max_network_retries": 5,
        "default_http_client": object(),  # breaks any request that would use it
    }
    for name, value in values.items():
        monkeypatch.setattr(stripe, name, value)
    return values


def test_stripe_module_globals_are_never_touched(
    mock: responses.RequestsMock, sentinel_globals: dict[str, Any]
) -> None:
    """Building gateways and calling Stripe in both modes leaves every stripe global as it was."""
    before = _stripe_globals()
    assert {"api_key", "api_base", "max_network_retries", "proxy", "verify_ssl_certs"} <= set(
        before
    )
    mock.get(f"{API}/v1/balance", json={"object": "balance"})
    mock.post(f"{API}/v1/customers", status=400, json=_error(400))
    mock.get("http://127.0.0.1:9/v1/balance", json={"object": "balance"})
    for config in (_config(), _config(api_base="http://127.0.0.1:9")):
        with StripeGateway(config, retry=RetryPolicy.none()) as gateway:
            for mode in Mode:
                gateway.request("GET", "/v1/balance", mode=mode, account=ACCOUNT)
            gateway.request("GET", "/v1/balance", mode=Mode.TEST, account=None)
    with pytest.raises(StripeAPIError):
        StripeGateway(_config(), retry=RetryPolicy.none()).request(
            "POST", "/v1/customers", mode=Mode.TEST, account=None, idempotency_key="k"
        )
    after = _stripe_globals()
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert after[name] == value, name
    for name, value in sentinel_globals.items():
        assert getattr(stripe, name) is value, name


def test_stripe_module_globals_are_never_read(
    mock: responses.RequestsMock, sentinel_globals: dict[str, Any]
) -> None:
    """The gateway ignores stripe.api_key, api_base, api_version and max_network_retries."""
    mock.get(f"{API}/v1/balance", status=500, json=_error(500))
    with pytest.raises(StripeAPIError):
        StripeGateway(_config(), retry=RetryPolicy.none()).request(
            "GET", "/v1/balance", mode=Mode.LIVE, account=None
        )
    assert len(mock.calls) == 1
    headers = mock.calls[0].request.headers
    assert headers["Authorization"] == f"Bearer {LIVE_KEY}"
    assert headers["Stripe-Version"] != sentinel_globals["api_version"]
