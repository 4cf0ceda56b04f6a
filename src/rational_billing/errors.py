"""Every error that ``rational_billing`` raises on purpose.

All of them share one root, so ``except BillingError`` catches everything the
library means to raise, and nothing else::

    BillingError
    ├── ConfigError                 bad keys, secrets, modes, URLs or options
    ├── InvalidArgument             a malformed id or argument (also a ValueError)
    │   └── OAuthStateError         the OAuth state is unknown, already used or expired
    ├── TenantNotConnected          no connection for that tenant (or that mode)
    │   └── TenantNotFound          the tenant was never registered
    ├── CustomerNotFound            no local customer with that id
    ├── ProductNotFound             no local product with that id
    ├── NotLinked                   the customer has no Stripe link
    ├── AlreadyLinked               the Stripe customer is linked to someone else
    ├── RemapConfirmationRequired   .impact says who gains and loses what
    ├── WebhookError                a webhook was rejected (HTTP 400)
    │   ├── WebhookSignatureError   bad, missing, stale or wrong-mode signature
    │   └── WebhookPayloadError     the body is not a Stripe event
    ├── StripeAPIError              Stripe said no (.request_id, .retryable)
    │   ├── StripeCustomerNotFound  absent in that account and mode, or deleted
    │   └── StripeProductNotFound   absent in that account and mode, or deleted
    ├── StripeObjectError           a Stripe object lacks a field we need (also a ValueError)
    ├── MailRejected                the mail server refused an email for good
    └── StorageError                the storage backend failed

Errors carry context (tenant, mode, Stripe request id) as attributes. They never
carry a secret key or webhook secret, in their message or anywhere else.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._config import Mode

__all__ = [
    "BillingError",
    "ConfigError",
    "InvalidArgument",
    "OAuthStateError",
    "TenantNotConnected",
    "TenantNotFound",
    "CustomerNotFound",
    "ProductNotFound",
    "NotLinked",
    "AlreadyLinked",
    "RemapConfirmationRequired",
    "WebhookError",
    "WebhookSignatureError",
    "WebhookPayloadError",
    "StripeAPIError",
    "StripeCustomerNotFound",
    "StripeProductNotFound",
    "StripeObjectError",
    "StorageError",
    "MailRejected",
]


class BillingError(Exception):
    """Root of every error that ``rational_billing`` raises on purpose."""


class ConfigError(BillingError):
    """The configuration is invalid: a key in the wrong slot, a missing secret, a bad URL.

    The message names the offending setting, never its value when it is a secret.
    """


class InvalidArgument(BillingError, ValueError):
    """An argument is malformed, such as a Stripe id with the wrong prefix."""


class OAuthStateError(InvalidArgument):
    """The OAuth ``state`` is unknown, was already used, or has expired.

    Each ``state`` from `TenantService.authorize_url` completes at most one
    connection (CSRF protection): start again with a new authorize URL.
    """


class TenantNotConnected(BillingError):
    """The tenant has no usable Stripe connection, or none in the requested mode."""

    def __init__(self, message: str, *, tenant: str, mode: Mode | None = None) -> None:
        super().__init__(message)
        self.tenant = tenant
        self.mode = mode


class TenantNotFound(TenantNotConnected):
    """The tenant was never registered with ``billing.tenants``."""


class CustomerNotFound(BillingError):
    """No local customer has that id in that tenant."""

    def __init__(self, tenant: str, customer_id: str) -> None:
        super().__init__(f"tenant {tenant!r} has no customer {customer_id!r}")
        self.tenant = tenant
        self.customer_id = customer_id


class ProductNotFound(BillingError):
    """No local product has that id in that tenant."""

    def __init__(self, tenant: str, product_id: str) -> None:
        super().__init__(f"tenant {tenant!r} has no product {product_id!r}")
        self.tenant = tenant
        self.product_id = product_id


class NotLinked(BillingError):
    """The operation needs a Stripe link and the customer has none."""

    def __init__(self, tenant: str, customer_id: str) -> None:
        super().__init__(f"customer {customer_id!r} of tenant {tenant!r} is not linked to Stripe")
        self.tenant = tenant
        self.customer_id = customer_id


class AlreadyLinked(BillingError):
    """A Stripe customer may link to one local customer per tenant, and it already does."""

    def __init__(
        self, message: str, *, tenant: str, stripe_customer_id: str, customer_id: str
    ) -> None:
        super().__init__(message)
        self.tenant = tenant
        self.stripe_customer_id = stripe_customer_id
        self.customer_id = customer_id


class RemapConfirmationRequired(BillingError):
    """A change to a link or mapping could change access; pass ``confirm_remap=True``.

    ``impact`` describes what would change, for example which products a customer
    would gain and lose, so that a caller can show it before confirming.
    """

    def __init__(self, message: str, *, impact: Mapping[str, object]) -> None:
        super().__init__(message)
        self.impact = impact


class WebhookError(BillingError):
    """A webhook delivery was rejected; the endpoint answers 400 and stores nothing."""


class WebhookSignatureError(WebhookError):
    """The ``Stripe-Signature`` header is missing, garbled, stale or matches no allowed secret."""


class WebhookPayloadError(WebhookError):
    """The verified body is not a well-formed Stripe event."""


class StripeAPIError(BillingError):
    """Stripe answered with an error, or could not be reached.

    ``request_id`` is Stripe's ``Request-Id`` when there was a response;
    ``retryable`` says whether the same request may succeed later.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        request_id: str | None = None,
        retryable: bool = False,
        tenant: str | None = None,
        mode: Mode | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.request_id = request_id
        self.retryable = retryable
        self.tenant = tenant
        self.mode = mode

    def __str__(self) -> str:
        base = super().__str__()
        parts = [f"status={self.status}" if self.status is not None else None]
        parts.append(f"request_id={self.request_id}" if self.request_id else None)
        extra = ", ".join(p for p in parts if p)
        return f"{base} ({extra})" if extra else base


class StripeCustomerNotFound(StripeAPIError):
    """The Stripe customer is absent in that account and mode, or it was deleted."""


class StripeProductNotFound(StripeAPIError):
    """The Stripe product is absent in that account and mode, or it was deleted."""


class StripeObjectError(BillingError, ValueError):
    """A Stripe object lacks a field the library needs (an id, a customer), or has a wrong type.

    Webhook handlers record such an event as ignored, with this message as the
    reason, and change nothing.
    """


class MailRejected(BillingError):
    """The mail server refused the message for good (an SMTP 5xx); retrying cannot help.

    A `Mailer` raises it to say "do not try again"; any other exception means
    "not sent, try later".
    """


class StorageError(BillingError):
    """The storage backend failed or returned something it should not have.

    ``transient`` is True when running the same transaction again may well
    succeed: a deadlock or a serialization failure between concurrent
    transactions, or SQLite's write lock still held after the busy timeout.
    The library retries those itself where it owns the transaction (webhook
    events); a host that runs its own transactions may do the same.
    """

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient
