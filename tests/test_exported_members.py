"""The public surface: what `__all__` promises is exactly what exists."""

from __future__ import annotations

import importlib

import pytest

PUBLIC = {
    "rational_billing": {
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
    },
    "rational_billing.errors": {
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
    },
    "rational_billing.testing": {
        "InMemoryStorage",
        "RecordingMailer",
        "make_event",
        "sign_payload",
        "build_customer",
        "stripe_id",
        "build_charge",
        "build_dispute",
        "build_invoice",
        "build_invoice_payment",
        "build_price",
        "build_product",
        "build_refund",
        "build_subscription",
        "build_account",
        "build_account_link",
        "build_deleted_customer",
        "build_oauth_token",
    },
    "rational_billing.storage.sql": {"SQLStorage"},
    "rational_billing.contrib.flask": {"blueprint", "get_billing", "init_app"},
    "rational_billing.contrib.django": {
        "get_billing",
        "make_view",
        "urls",
        "webhook_view",
        "urlpatterns",
    },
}


@pytest.mark.parametrize("module_name", sorted(PUBLIC))
def test_all_is_pinned(module_name: str) -> None:
    """Each public module's __all__ lists exactly the pinned names."""
    module = importlib.import_module(module_name)
    assert set(module.__all__) == PUBLIC[module_name]
    assert len(module.__all__) == len(set(module.__all__))


@pytest.mark.parametrize("module_name", sorted(PUBLIC))
def test_every_exported_name_exists_and_is_documented(module_name: str) -> None:
    """Every name in __all__ resolves, and classes and functions carry a docstring."""
    module = importlib.import_module(module_name)
    for name in module.__all__:
        obj = getattr(module, name)
        if isinstance(obj, type) or callable(obj):
            assert (obj.__doc__ or "").strip(), f"{module_name}.{name} has no docstring"


def test_errors_share_one_root() -> None:
    """Every exported error derives from BillingError."""
    errors = importlib.import_module("rational_billing.errors")
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.BillingError)
