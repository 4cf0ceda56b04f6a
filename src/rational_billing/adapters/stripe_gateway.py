"""`StripeGateway`: the `StripeAPI` port over HTTP, the only module that imports ``stripe``.

It keeps one ``stripe.StripeClient`` per mode, each with its own HTTP client,
and sends ``Stripe-Account`` and ``Idempotency-Key`` per request. The ``stripe``
package's module globals (``stripe.api_key``, ``stripe.default_http_client``,
...) are never set.

Responses are plain JSON (``raw_request`` plus ``json.loads``): no SDK objects
are built on the way in (§4a.12). Every attempt waits for the (account, mode)
token bucket; retries follow `RetryPolicy`; errors become `StripeAPIError`
with the HTTP status, Stripe's error code, the ``Request-Id`` and whether a
retry may help. Messages are scrubbed of anything that looks like a key.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, cast

import stripe

from .._config import BillingConfig, Mode, RateLimits
from ..errors import ConfigError, InvalidArgument, StripeAPIError
from ._ratelimit import RateLimiter
from ._retry import AttemptFailed, RetryPolicy, call_with_retries, header, retry_after, should_retry

__all__ = ["StripeGateway", "redact"]

_log = logging.getLogger("rational_billing.stripe")

_MUTATING = frozenset({"post", "delete"})
_METHODS = frozenset({"get"}) | _MUTATING
_PAGE_SIZE = 100
_MAX_IDEMPOTENCY_KEY = 255
#: Top-level names that ``StripeClient.raw_request`` takes as options rather
#: than as API parameters; sending them would silently change the request.
_RESERVED_PARAMS = frozenset(
    {
        "api_key",
        "stripe_version",
        "stripe_account",
        "stripe_context",
        "max_network_retries",
        "idempotency_key",
        "content_type",
        "headers",
        "base",
        "usage",
    }
)
_SECRET_PATTERN = re.compile(r"(?<![A-Za-z0-9])(?:sk|rk|whsec)_[A-Za-z0-9_*]+")


def redact(text: str) -> str:
    """``text`` with anything shaped like a secret key or webhook secret replaced.

    Stripe echoes (masked) keys in some error messages; none may reach ours.

    Example::

        >>> redact("Invalid API Key provided: sk_test_****1234")
        'Invalid API Key provided: [redacted]'
    """
    return _SECRET_PATTERN.sub("[redacted]", text)


def _plain(value: Any) -> Any:
    """Mappings to dicts and sequences to lists, so that Stripe's form encoder nests them."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


class StripeGateway:
    """Talks to Stripe (or a Stripe-compatible server at ``config.api_base``).

    Args:
        config: the keys per mode, ``api_base`` and the rate limits.
        retry: how failed calls are repeated (default `RetryPolicy()`);
            ``RetryPolicy.none()`` in tests.
        clock: monotonic seconds, for the rate limiter (default `time.monotonic`).
        sleep: how to wait, for retries and rate limits (default `time.sleep`).
        rate_limits: overrides ``config.rate_limits``.
        timeout: seconds before one HTTP attempt is abandoned (then retried).

    Thread-safe: one instance may serve every tenant, mode and thread.

    Example::

        gateway = StripeGateway(BillingConfig(test=ModeKeys(secret_key="sk_test_...")))
        customer = gateway.request(
            "POST", "/v1/customers", mode=Mode.TEST, account="acct_123",
            params={"email": "ada@example.com"}, idempotency_key=entry.idempotency_key,
        )
    """

    def __init__(
        self,
        config: BillingConfig,
        *,
        retry: RetryPolicy | None = None,
        clock: Callable[[], float] | None = None,
        sleep: Callable[[float], None] | None = None,
        rate_limits: RateLimits | None = None,
        timeout: float = 80.0,
    ) -> None:
        self._config = config
        self._retry = retry if retry is not None else RetryPolicy()
        self._sleep = sleep or time.sleep
        self._limiter = RateLimiter(
            rate_limits if rate_limits is not None else config.rate_limits,
            clock=clock,
            sleep=self._sleep,
        )
        self._timeout = timeout
        self._lock = threading.Lock()
        self._clients: dict[Mode, tuple[stripe.StripeClient, stripe.RequestsClient]] = {}

    def __repr__(self) -> str:
        modes = ",".join(sorted(m.value for m in self._config.modes))
        base = self._config.api_base or stripe.DEFAULT_API_BASE
        return f"<StripeGateway modes={modes} api_base={base!r}>"

    def __enter__(self) -> StripeGateway:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close this thread's HTTP sessions. The gateway reopens them if used again."""
        with self._lock:
            clients = list(self._clients.values())
        for _, http_client in clients:
            cast("Callable[[], None]", http_client.close)()

    # -- the StripeAPI port ----------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        mode: Mode,
        account: str | None,
        params: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Send one request and return Stripe's JSON object as a plain dict.

        ``account=None`` calls the platform's own account; ``acct_…`` adds the
        ``Stripe-Account`` header. POST and DELETE need the caller's
        ``idempotency_key``, stored with the local operation, so that a retry,
        here or after a crash, can never apply twice. Paths under ``/oauth/``
        go to the Connect host. ``None`` values in ``params`` are not sent;
        send ``""`` to clear a field (for example a metadata key).

        Raises:
            InvalidArgument: an unknown method, a malformed path or account, a
                mutating call without an idempotency key, or a parameter name
                that the SDK would take as an option.
            ConfigError: no keys are configured for ``mode``.
            StripeAPIError: Stripe refused (``status``, ``code``, ``request_id``),
                or could not be reached after retries (``status=None``).
        """
        verb = method.lower()
        if verb not in _METHODS:
            raise InvalidArgument(f"unsupported HTTP method {method!r}: use GET, POST or DELETE")
        _check_path(path)
        if account is not None and not (isinstance(account, str) and account.startswith("acct_")):
            raise InvalidArgument(f"account must be None or an acct_… id, got {account!r}")
        if idempotency_key is not None and not (
            isinstance(idempotency_key, str) and 0 < len(idempotency_key) <= _MAX_IDEMPOTENCY_KEY
        ):
            raise InvalidArgument(
                "idempotency_key must be a non-empty string of at most 255 characters"
            )
        if verb in _MUTATING and idempotency_key is None:
            raise InvalidArgument(
                f"{method.upper()} {path} needs an idempotency_key: generate one per local "
                "operation and store it with the operation, so that retries reuse it"
            )
        body = _plain(params or {})
        reserved = sorted(_RESERVED_PARAMS.intersection(body))
        if reserved:
            raise InvalidArgument(
                f"parameter(s) {', '.join(reserved)} cannot be sent through "
                "StripeClient.raw_request"
            )
        client = self._client(mode)
        options: dict[str, Any] = {}
        if account is not None:
            options["stripe_account"] = account
        if idempotency_key is not None:
            options["idempotency_key"] = idempotency_key
        if path.startswith("/oauth/"):
            options["base"] = "connect"
        raw_request = cast("Callable[..., Any]", client.raw_request)
        where = f"{verb.upper()} {path} ({mode.value} mode, {account or 'platform account'})"
        search = path.rstrip("/").endswith("/search")

        def attempt() -> dict[str, Any]:
            self._limiter.acquire(account, mode, search=search)
            try:
                response = raw_request(verb, path, **options, **body)
            except stripe.StripeError as exc:
                failure, cause = _failure(exc, where=where, mode=mode), _transport_cause(exc)
            else:
                return _decode(response.body, where=where, mode=mode, headers=response.headers)
            # Raised outside the except block so that Stripe's exception, whose
            # body may echo a key, is not even kept as __context__.
            raise failure from cause

        return call_with_retries(attempt, self._retry, sleep=self._sleep)

    def list_page(
        self,
        path: str,
        *,
        mode: Mode,
        account: str | None,
        params: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """One raw page of a list (or search) endpoint: ``{"object": "list", "data": [...], ...}``.

        Raises:
            StripeAPIError: as `request`, or the answer is not a list page.
        """
        page = self.request("GET", path, mode=mode, account=account, params=params)
        if not isinstance(page.get("data"), list):
            raise StripeAPIError(
                f"GET {path} ({mode.value} mode) did not answer with a list page", mode=mode
            )
        return page

    def list_pages(
        self,
        path: str,
        *,
        mode: Mode,
        account: str | None,
        params: Mapping[str, Any] | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Every page of a list endpoint, fetched lazily, ``limit=100`` unless ``params`` has one.

        ``starting_after`` in ``params`` resumes after that id (a checkpoint);
        ``ending_before`` pages backwards. Search endpoints follow ``next_page``.
        """
        query: dict[str, Any] = {"limit": _PAGE_SIZE, **_plain(params or {})}
        backwards = query.get("ending_before") is not None
        while True:
            page = self.list_page(path, mode=mode, account=account, params=query)
            yield page
            data = page["data"]
            if not page.get("has_more") or not data:
                return
            if page.get("object") == "search_result":
                if not page.get("next_page"):
                    return
                query["page"] = page["next_page"]
            elif backwards:
                query["ending_before"] = data[0]["id"]
            else:
                query["starting_after"] = data[-1]["id"]

    def list_all(
        self,
        path: str,
        *,
        mode: Mode,
        account: str | None,
        params: Mapping[str, Any] | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Every object of a list endpoint, in Stripe's order, fetched lazily 100 at a time.

        N objects cost ceil(N/100) calls (one more when N is a multiple of 100
        and Stripe still said ``has_more``), and memory holds one page at a time.

        Raises:
            StripeAPIError: as `request`, while iterating.
        """
        for page in self.list_pages(path, mode=mode, account=account, params=params):
            yield from page["data"]

    # -- internals -----------------------------------------------------------------

    def _client(self, mode: Mode) -> stripe.StripeClient:
        entry = self._clients.get(mode)
        if entry is not None:
            return entry[0]
        keys = self._config.keys_for(mode)
        if keys is None:
            raise ConfigError(
                f"no keys are configured for {mode.value} mode: "
                f"set BillingConfig({mode.value}=ModeKeys(secret_key=...))"
            )
        with self._lock:
            entry = self._clients.get(mode)
            if entry is None:
                # Our own HTTP client, so that stripe.default_http_client stays untouched.
                http_client = stripe.RequestsClient(timeout=self._timeout)
                base = self._config.api_base
                client = stripe.StripeClient(
                    keys.secret_key,
                    base_addresses=(
                        {"api": base.rstrip("/"), "connect": base.rstrip("/")} if base else None
                    ),
                    max_network_retries=0,  # RetryPolicy retries, not the SDK
                    http_client=http_client,
                )
                entry = (client, http_client)
                self._clients[mode] = entry
        return entry[0]


def _check_path(path: str) -> None:
    if not isinstance(path, str) or not path.startswith(("/v1/", "/oauth/")):
        raise InvalidArgument(f"path must start with /v1/ or /oauth/, got {path!r}")
    if "?" in path or "#" in path or "//" in path or any(c.isspace() for c in path):
        raise InvalidArgument(f"path must be a bare path (parameters go in params), got {path!r}")


def _transport_cause(exc: stripe.StripeError) -> BaseException | None:
    """What to chain our error to: the network error, never Stripe's error body."""
    if isinstance(exc, stripe.APIConnectionError):
        return exc.__cause__
    return None


def _failure(exc: stripe.StripeError, *, where: str, mode: Mode) -> AttemptFailed:
    """Turn one failed attempt into the `StripeAPIError` to raise, and retry hints."""
    headers = exc.headers or {}
    status = exc.http_status
    request_id = header(headers, "Request-Id")
    if status is None and isinstance(exc, stripe.APIConnectionError):
        detail = _network_detail(exc)
        retryable = exc.should_retry and should_retry(None, headers)
        error = StripeAPIError(
            redact(f"could not reach Stripe for {where}: {detail}"),
            status=None,
            retryable=retryable,
            mode=mode,
        )
        _log.info("Stripe unreachable for %s (retryable=%s)", where, retryable)
        return AttemptFailed(error)
    code, message = _error_details(exc.json_body)
    retryable = status is not None and should_retry(status, headers)
    label = f"[{code}] " if code else ""
    error = StripeAPIError(
        redact(f"Stripe refused {where}: {label}{message}"),
        status=status,
        code=code,
        request_id=request_id,
        retryable=retryable,
        mode=mode,
    )
    _log.info(
        "Stripe refused %s: status=%s code=%s request_id=%s retryable=%s",
        where,
        status,
        code,
        request_id,
        retryable,
    )
    return AttemptFailed(error, retry_after=retry_after(headers))


def _network_detail(exc: stripe.APIConnectionError) -> str:
    """The SDK's message without its boilerplate: just the network error when it names one."""
    text = " ".join(str(exc.user_message or type(exc).__name__).split())
    marker = "(Network error: "
    if marker in text:
        return text.split(marker, 1)[1].removesuffix(")")
    return text


def _error_details(body: object) -> tuple[str | None, str]:
    """Stripe's error ``code`` and message from an error body (API or OAuth shape)."""
    if not isinstance(body, dict):
        return None, "an unexpected response (not a Stripe error object)"
    error = body.get("error")
    if isinstance(error, str):  # OAuth: {"error": "invalid_grant", "error_description": "..."}
        description = body.get("error_description")
        return error, str(description) if description else error
    if not isinstance(error, dict):
        return None, "an unexpected response (not a Stripe error object)"
    code = error.get("code")
    kind = error.get("type")
    message = error.get("message") or kind or "no message"
    if kind and kind not in ("invalid_request_error", message):
        message = f"{message} ({kind})"
    return (str(code) if code else None), str(message)


def _decode(body: object, *, where: str, mode: Mode, headers: Mapping[str, str]) -> dict[str, Any]:
    try:
        data = json.loads(cast("str | bytes", body))
    except (TypeError, ValueError):
        data = None
    if not isinstance(data, dict):
        raise StripeAPIError(
            f"{where} answered with something other than a JSON object",
            request_id=header(headers, "Request-Id"),
            mode=mode,
        )
    return data
