"""`TenantService`: which Stripe account, in which modes, each tenant bills through.

This is the minimal slice: registering already-connected accounts and the one
direct tenant. OAuth and Account Links onboarding come with the tenants issue.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import attrs

from .._config import BillingConfig, Mode
from ..domain.models import Tenant, TenantStatus
from ..errors import InvalidArgument, TenantNotConnected, TenantNotFound
from ..ports import Clock, Storage, Transaction
from ._validate import check_local_id, check_stripe_id

__all__ = ["TenantService", "require_tenant"]


def require_tenant(tx: Transaction, tenant_id: str, mode: Mode | None = None) -> Tenant:
    """The tenant, connected (in ``mode`` when given).

    Raises:
        TenantNotFound: never registered.
        TenantNotConnected: disconnected, or not connected in ``mode``.
    """
    tenant = tx.get_tenant(tenant_id)
    if tenant is None:
        raise TenantNotFound(f"unknown tenant {tenant_id!r}", tenant=tenant_id, mode=mode)
    if not tenant.connected:
        raise TenantNotConnected(
            f"tenant {tenant_id!r} is disconnected", tenant=tenant_id, mode=mode
        )
    if mode is not None and mode not in tenant.modes:
        raise TenantNotConnected(
            f"tenant {tenant_id!r} is not connected in {mode.value} mode",
            tenant=tenant_id,
            mode=mode,
        )
    return tenant


def _check_modes(modes: Iterable[Mode], config: BillingConfig) -> frozenset[Mode]:
    if isinstance(modes, str | Mode):
        raise InvalidArgument("modes must be a set of modes, such as frozenset({Mode.TEST})")
    found = frozenset(Mode.parse(m) for m in modes)
    if not found:
        raise InvalidArgument("a connection covers at least one mode")
    missing = found - config.modes
    if missing:
        names = ", ".join(sorted(m.value for m in missing))
        raise InvalidArgument(f"no keys are configured for {names} mode; configure them first")
    return found


class TenantService:
    """Registers tenants and their Stripe connections.

    Example::

        billing.tenants.connect("acme", "acct_1Nv0FGQ9RKHgCVdK", modes=frozenset({Mode.TEST}))
        billing.tenants.register_direct("solo")
    """

    def __init__(
        self,
        *,
        config: BillingConfig,
        storage: Storage,
        clock: Clock,
        on_connected: Callable[[str | None], object] | None = None,
    ) -> None:
        self._config = config
        self._storage = storage
        self._clock = clock
        self._on_connected = on_connected

    def connect(
        self,
        tenant: str,
        stripe_account_id: str,
        *,
        modes: Iterable[Mode] = frozenset({Mode.TEST, Mode.LIVE}),
    ) -> Tenant:
        """Register an account that is already connected to the platform, in ``modes``.

        Events held for that account are applied right after.

        Raises:
            InvalidArgument: a malformed id, no modes, or a mode without keys.
            InvalidArgument: the account is already connected to another tenant.
        """
        check_local_id(tenant, "tenant id")
        check_stripe_id(stripe_account_id, "acct_", "Stripe account id")
        wanted = _check_modes(modes, self._config)
        with self._storage.transaction() as tx:
            holder = tx.tenant_by_account(stripe_account_id)
            if holder is not None and holder.id != tenant:
                raise InvalidArgument(
                    f"account {stripe_account_id} is already connected to tenant {holder.id!r}"
                )
            record = Tenant(
                id=tenant,
                stripe_account_id=stripe_account_id,
                modes=wanted,
                status=TenantStatus.CONNECTED,
                direct=False,
                connected_at=self._clock(),
            )
            tx.put_tenant(record)
        if self._on_connected is not None:
            self._on_connected(stripe_account_id)
        return record

    def register_direct(self, tenant: str, *, modes: Iterable[Mode] | None = None) -> Tenant:
        """Name the one tenant that bills through the platform's own account (§4a.1).

        Platform events without ``account`` are routed to it; events held
        because there was no direct tenant are applied right after.

        Raises:
            InvalidArgument: another tenant is already direct, or a bad id or mode.
        """
        check_local_id(tenant, "tenant id")
        wanted = _check_modes(self._config.modes if modes is None else modes, self._config)
        with self._storage.transaction() as tx:
            current = tx.direct_tenant()
            if current is not None and current.id != tenant:
                raise InvalidArgument(f"tenant {current.id!r} is already the direct tenant")
            record = Tenant(
                id=tenant,
                stripe_account_id=None,
                modes=wanted,
                status=TenantStatus.CONNECTED,
                direct=True,
                connected_at=self._clock(),
            )
            tx.put_tenant(record)
        if self._on_connected is not None:
            self._on_connected(None)
        return record

    def disconnect(self, tenant: str) -> Tenant:
        """Mark the tenant disconnected: its calls raise `TenantNotConnected`, its data stays.

        Raises:
            TenantNotFound: the tenant was never registered.
        """
        with self._storage.transaction() as tx:
            record = tx.get_tenant(tenant)
            if record is None:
                raise TenantNotFound(f"unknown tenant {tenant!r}", tenant=tenant)
            record = attrs.evolve(
                record, status=TenantStatus.DISCONNECTED, disconnected_at=self._clock()
            )
            tx.put_tenant(record)
        return record

    def get(self, tenant: str) -> Tenant:
        """The tenant record.

        Raises:
            TenantNotFound: the tenant was never registered.
        """
        with self._storage.transaction() as tx:
            record = tx.get_tenant(tenant)
        if record is None:
            raise TenantNotFound(f"unknown tenant {tenant!r}", tenant=tenant)
        return record
