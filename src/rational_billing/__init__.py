"""rational_billing: bill a platform's customers through each tenant's own Stripe account.

The public surface is ``__all__`` below; everything else is private and may
change without notice.
"""

from __future__ import annotations

from ._config import BillingConfig, Mode, ModeKeys, RateLimits
from .billing import Billing
from .domain.access import AccessPolicy
from .domain.models import (
    Customer,
    CustomerLink,
    EventOutcome,
    Product,
    SyncState,
    Tenant,
    TenantStatus,
)
from .ports import Email, Mailer, Storage, Transaction
from .services.customers import UNSET
from .services.webhooks import WebhookResponse

__all__ = [
    "Billing",
    "BillingConfig",
    "Mode",
    "ModeKeys",
    "RateLimits",
    "AccessPolicy",
    "Customer",
    "CustomerLink",
    "EventOutcome",
    "Product",
    "SyncState",
    "Tenant",
    "TenantStatus",
    "Email",
    "Mailer",
    "Storage",
    "Transaction",
    "WebhookResponse",
    "UNSET",
]
