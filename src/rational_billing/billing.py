"""`Billing`: the one object that wires services to their adapters.

Everything a host app calls hangs off it: ``billing.tenants``,
``billing.customers``, ``billing.webhooks`` and ``billing.sync``. It is the
only place that picks concrete adapters; services see ports.
"""

from __future__ import annotations

from datetime import UTC, datetime

from ._config import BillingConfig
from .domain.access import AccessPolicy
from .ports import Clock, Mailer, Storage, StripeAPI
from .services._outbox import Outbox
from .services.customers import CustomerService
from .services.tenants import TenantService
from .services.webhooks import WebhookRouter

__all__ = ["Billing", "SyncService"]


def _utcnow() -> datetime:
    return datetime.now(UTC)


class SyncService:
    """Reconciliation with Stripe. For now: draining the outbox."""

    def __init__(self, *, outbox: Outbox) -> None:
        self._outbox = outbox

    def push_pending(self) -> int:
        """Push every local change still owed to Stripe; returns how many Stripe accepted."""
        return self._outbox.push_pending()


class Billing:
    """The library's entry point: configuration plus collaborators, wired once.

    Args:
        config: keys, secrets and options (`BillingConfig`).
        storage: where state lives; by default `SQLStorage` on ``config.storage_url``.
        mailer: sends invitations; by default `ConsoleMailer`.
        policy: the `AccessPolicy` for access decisions.
        clock: returns the current aware UTC time; injectable for tests.
        stripe: the Stripe API port; by default a `StripeGateway` for ``config``.

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
    ) -> None:
        self.config = config
        self.policy = policy or AccessPolicy()
        self.clock: Clock = clock or _utcnow
        self.storage: Storage = storage if storage is not None else _default_storage(config)
        self.mailer: Mailer = mailer if mailer is not None else _default_mailer()
        self.stripe: StripeAPI = stripe if stripe is not None else _default_gateway(config)

        self.webhooks = WebhookRouter(config=config, storage=self.storage, clock=self.clock)
        outbox = Outbox(storage=self.storage, stripe=self.stripe, clock=self.clock)
        self.sync = SyncService(outbox=outbox)
        self.tenants = TenantService(
            config=config,
            storage=self.storage,
            clock=self.clock,
            on_connected=self.webhooks.apply_held,
        )
        self.customers = CustomerService(storage=self.storage, outbox=outbox, clock=self.clock)

        # The dispatch table: one place, exact event types.
        self.webhooks.register("customer.updated", self.customers.on_customer_updated)

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
