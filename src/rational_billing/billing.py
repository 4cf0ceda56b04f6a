"""`Billing`: the one object that wires services to their adapters.

Everything a host app calls hangs off it: ``billing.tenants``,
``billing.customers``, ``billing.products``, ``billing.subscriptions``,
``billing.webhooks`` and ``billing.sync``. It is the
only place that picks concrete adapters; services see ports.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from ._config import BillingConfig
from .domain.access import AccessPolicy
from .domain.models import OutboxEntry
from .ports import Clock, Mailer, Storage, StripeAPI
from .services._outbox import Outbox
from .services.customers import CustomerService
from .services.invitations import InvitationService, InvitationSettings
from .services.products import ProductService
from .services.subscriptions import SubscriptionTracker
from .services.tenants import TenantService
from .services.webhooks import WebhookRouter

__all__ = ["Billing", "SyncService"]


def _utcnow() -> datetime:
    return datetime.now(UTC)


class SyncService:
    """Reconciliation with Stripe. For now: draining the outbox."""

    def __init__(self, *, outbox: Outbox, invitations: InvitationService | None = None) -> None:
        self._outbox = outbox
        self._invitations = invitations

    def push_pending(self) -> int:
        """Push every local change still owed to Stripe and send due invitations.

        Returns how many were delivered: outbox entries Stripe accepted plus
        invitations sent. Failures stay queued, with a backoff.
        """
        done = self._outbox.push_pending()
        if self._invitations is not None:
            done += self._invitations.send_pending()
        return done

    def failed(self, *, limit: int = 100) -> Sequence[OutboxEntry]:
        """Local changes Stripe refused for good (a permanent 4xx), oldest first.

        Each entry keeps its ``operation``, frozen ``params`` and ``last_error``;
        they are never retried on their own.
        """
        return self._outbox.failed(limit=limit)


class Billing:
    """The library's entry point: configuration plus collaborators, wired once.

    Args:
        config: keys, secrets and options (`BillingConfig`).
        storage: where state lives; by default `SQLStorage` on ``config.storage_url``.
        mailer: sends invitations; by default `ConsoleMailer`.
        policy: the `AccessPolicy` for access decisions.
        clock: returns the current aware UTC time; injectable for tests.
        stripe: the Stripe API port; by default a `StripeGateway` for ``config``.
        invitations: the invitation email's template, sign-up link and sender
            (`InvitationSettings`); by default the built-in template, no link.

    Example::

        billing = Billing(config=BillingConfig.from_env(), storage=InMemoryStorage(),
                          mailer=RecordingMailer())
        billing.tenants.register_direct("acme")
        customer = billing.customers.create("acme", email="ada@example.com")
    """

    def __init__(
        self,
        *,
        config: BillingConfig,
        storage: Storage | None = None,
        mailer: Mailer | None = None,
        policy: AccessPolicy | None = None,
        clock: Clock | None = None,
        stripe: StripeAPI | None = None,
        invitations: InvitationSettings | None = None,
    ) -> None:
        self.config = config
        self.policy = policy or AccessPolicy()
        self.clock: Clock = clock or _utcnow
        self.storage: Storage = storage if storage is not None else _default_storage(config)
        self.mailer: Mailer = mailer if mailer is not None else _default_mailer()
        self.stripe: StripeAPI = stripe if stripe is not None else _default_gateway(config)

        self.webhooks = WebhookRouter(config=config, storage=self.storage, clock=self.clock)
        self.subscriptions = SubscriptionTracker(
            storage=self.storage, stripe=self.stripe, policy=self.policy, clock=self.clock
        )
        self.products = ProductService(
            storage=self.storage,
            stripe=self.stripe,
            clock=self.clock,
            subscriptions=self.subscriptions,
        )
        outbox = Outbox(storage=self.storage, stripe=self.stripe, clock=self.clock)
        self.invitations = InvitationService(
            storage=self.storage, mailer=self.mailer, clock=self.clock, settings=invitations
        )
        self.sync = SyncService(outbox=outbox, invitations=self.invitations)
        self.tenants = TenantService(
            config=config,
            storage=self.storage,
            clock=self.clock,
            stripe=self.stripe,
            on_connected=self.webhooks.apply_held,
        )
        self.customers = CustomerService(
            storage=self.storage,
            outbox=outbox,
            clock=self.clock,
            config=config,
            stripe=self.stripe,
            invitations=self.invitations,
            access_for_link=self.subscriptions.access_for_link,
        )

        # The dispatch table: one place, exact event types.
        self.webhooks.register("customer.updated", self.customers.on_customer_updated)
        self.webhooks.register("customer.created", self.customers.on_customer_created)
        self.webhooks.register("customer.deleted", self.customers.on_customer_deleted)
        self.webhooks.register("account.application.deauthorized", self.tenants.on_deauthorized)
        # Products, subscriptions, invoices, disputes and refunds (docs/events.md).
        products, subs = self.products, self.subscriptions
        for event_type in ("product.created", "product.updated", "product.deleted"):
            self.webhooks.register(event_type, products.on_product_event)
        for event_type in (
            "price.created",
            "price.updated",
            "price.deleted",
            "plan.created",
            "plan.updated",
            "plan.deleted",
        ):
            self.webhooks.register(event_type, products.on_price_event)
        for event_type in (
            "customer.subscription.created",
            "customer.subscription.updated",
            "customer.subscription.deleted",
            "customer.subscription.paused",
            "customer.subscription.resumed",
            "customer.subscription.pending_update_applied",
            "customer.subscription.pending_update_expired",
            "customer.subscription.trial_will_end",
        ):
            self.webhooks.register(event_type, subs.on_subscription_event)
        for event_type in (
            "invoice.created",
            "invoice.updated",
            "invoice.finalized",
            "invoice.paid",
            "invoice.payment_succeeded",
            "invoice.marked_uncollectible",
            "invoice.voided",
        ):
            self.webhooks.register(event_type, subs.on_invoice_event)
        self.webhooks.register("invoice.payment_failed", subs.on_invoice_payment_failed)
        self.webhooks.register("invoice.payment_action_required", subs.on_invoice_payment_failed)
        self.webhooks.register("invoice.deleted", subs.on_invoice_deleted)
        for event_type in ("invoice_payment.paid", "charge.succeeded", "charge.refunded"):
            self.webhooks.register(event_type, subs.on_payment_event)
        for event_type in (
            "charge.dispute.created",
            "charge.dispute.updated",
            "charge.dispute.closed",
            "charge.dispute.funds_withdrawn",
            "charge.dispute.funds_reinstated",
        ):
            self.webhooks.register(event_type, subs.on_dispute_event)
        for event_type in ("refund.created", "refund.updated", "refund.failed"):
            self.webhooks.register(event_type, subs.on_refund_event)
        self.webhooks.register("charge.refund.updated", subs.on_refund_event)

    def __repr__(self) -> str:
        modes = ",".join(sorted(m.value for m in self.config.modes))
        return f"<Billing modes={modes} storage={self.storage!r}>"

    def close(self) -> None:
        """Release the storage's connections."""
        self.storage.close()


def _default_storage(config: BillingConfig) -> Storage:
    if config.storage_url == "memory://":
        from .adapters.memory import InMemoryStorage

        return InMemoryStorage()
    from .storage.sql import SQLStorage

    return SQLStorage(config.storage_url)


def _default_mailer() -> Mailer:
    from .adapters.mail import ConsoleMailer

    return ConsoleMailer()


def _default_gateway(config: BillingConfig) -> StripeAPI:
    from .adapters.stripe_gateway import StripeGateway

    return StripeGateway(config)
