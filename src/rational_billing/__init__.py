"""rational_billing: bill a platform's customers through each tenant's own Stripe account.

The public surface is ``__all__`` below; everything else is private and may
change without notice.
"""

from __future__ import annotations

from ._config import BillingConfig, Mode, ModeKeys, RateLimits
from .billing import Billing
from .domain.access import AccessPolicy, AccessSummary, Denial, DenialReason, Grant
from .domain.models import (
    Customer,
    CustomerLink,
    EventOutcome,
    Invitation,
    InvitationState,
    OutboxEntry,
    OutboxState,
    Product,
    SyncState,
    Tenant,
    TenantStatus,
)
from .ports import Email, Mailer, Storage, Transaction
from .services.customers import UNSET
from .services.invitations import InvitationSettings, InvitationTemplate
from .services.tenants import OnboardingStatus
from .services.webhooks import ReplayReport, WebhookResponse

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
    "ReplayReport",
    "UNSET",
    # tenants, customers and invitations (issue 3)
    "Invitation",
    "InvitationSettings",
    "InvitationState",
    "InvitationTemplate",
    "OnboardingStatus",
    "OutboxEntry",
    "OutboxState",
    # products, subscriptions and access (issue 4)
    "AccessSummary",
    "Denial",
    "DenialReason",
    "Grant",
]
