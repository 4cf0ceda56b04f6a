"""`TenantService`: which Stripe account, in which modes, each tenant bills through.

Four ways in (DESIGN.md §4a.1):

- **OAuth** for Standard accounts: `TenantService.authorize_url` issues a
  single-use ``state`` (stored, expiring) and `TenantService.complete_oauth`
  exchanges the code for the ``acct_…``. OAuth with the test client id is a
  test-only connection; a live one covers live and test.
- **Account Links**, which Stripe now recommends: `TenantService.start_onboarding`
  creates the account (once) and an onboarding link;
  `TenantService.check_onboarding` connects the tenant once Stripe says the
  details were submitted. An account created with a test key is test-only.
- `TenantService.connect` registers an account that is already connected.
- `TenantService.register_direct` names the one tenant that uses the
  platform's own account.

Whenever an account becomes connected, the webhook events held for it are
applied. ``account.application.deauthorized`` marks the tenant disconnected:
its calls then raise `TenantNotConnected`, and its data stays.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import uuid
from collections.abc import Callable, Iterable, Mapping
from datetime import timedelta
from typing import Any
from urllib.parse import urlencode, urlsplit

import attrs

from .._config import BillingConfig, Mode
from ..domain.models import EventOutcome, PendingConnection, Tenant, TenantStatus
from ..errors import (
    ConfigError,
    InvalidArgument,
    OAuthStateError,
    RemapConfirmationRequired,
    StripeAPIError,
    TenantNotConnected,
    TenantNotFound,
)
from ..ports import Clock, Storage, StripeAPI, Transaction
from ._lookup import known_tenant
from ._validate import check_local_id, check_mode, check_stripe_id
from .webhooks import EventContext, HandlerResult

__all__ = ["OnboardingStatus", "TenantService", "require_tenant"]

log = logging.getLogger("rational_billing.tenants")

_CONNECT_HOST = "https://connect.stripe.com"
_SCOPES = frozenset({"read_write", "read_only"})
_OAUTH_CODE = re.compile(r"^[A-Za-z0-9_\-]{1,255}$")
_STATE = re.compile(r"^[A-Za-z0-9_\-]{16,255}$")
_OAUTH = "oauth"
_ACCOUNT_LINK = "account_link"


def require_tenant(tx: Transaction, tenant_id: str, mode: Mode | None = None) -> Tenant:
    """The tenant, connected (in ``mode`` when given).

    Raises:
        TenantNotFound: never registered.
        TenantNotConnected: disconnected, or not connected in ``mode``.
    """
    tenant = known_tenant(tx, tenant_id, mode)
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


def _modes_of(mode: Mode) -> frozenset[Mode]:
    """What a connection made with ``mode``'s credentials covers (§4a.1)."""
    return frozenset({Mode.LIVE, Mode.TEST}) if mode is Mode.LIVE else frozenset({Mode.TEST})


def _check_url(value: object, what: str) -> str:
    if not isinstance(value, str) or len(value) > 2048:
        raise InvalidArgument(f"{what} must be an http(s) URL")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc or any(c.isspace() for c in value):
        raise InvalidArgument(f"malformed {what} {value!r}: expected an http(s) URL")
    return value


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


@attrs.frozen
class OnboardingStatus:
    """Where an Account Links onboarding stands, as Stripe reports it.

    ``connected`` is true once the tenant is connected (Stripe says the
    details were submitted). ``currently_due`` lists what Stripe still needs.
    """

    tenant: str
    stripe_account_id: str
    details_submitted: bool
    charges_enabled: bool
    connected: bool
    currently_due: tuple[str, ...] = ()


class TenantService:
    """Registers tenants and their Stripe connections: ``billing.tenants``.

    Example::

        url = billing.tenants.authorize_url("acme", mode=Mode.LIVE,
                                            redirect_uri="https://app.example.com/stripe/back")
        # ... Stripe redirects back with ?code=...&state=...
        billing.tenants.complete_oauth(code, state)

        billing.tenants.connect("acme", "acct_1Nv0FGQ9RKHgCVdK", modes=frozenset({Mode.TEST}))
        billing.tenants.register_direct("solo")
    """

    def __init__(
        self,
        *,
        config: BillingConfig,
        storage: Storage,
        clock: Clock,
        stripe: StripeAPI | None = None,
        on_connected: Callable[[str | None], object] | None = None,
        state_ttl: timedelta = timedelta(hours=1),
    ) -> None:
        self._config = config
        self._storage = storage
        self._clock = clock
        self._stripe = stripe
        self._on_connected = on_connected
        self._state_ttl = state_ttl

    # -- already connected ---------------------------------------------------------
    def connect(
        self,
        tenant: str,
        stripe_account_id: str,
        *,
        modes: Iterable[Mode] = frozenset({Mode.TEST, Mode.LIVE}),
        confirm_remap: bool = False,
    ) -> Tenant:
        """Register an account that is already connected to the platform, in ``modes``.

        Events held for that account are applied right after. Registering the
        connection the tenant already has (say at every start-up) changes
        nothing, so it keeps its connection time: a deauthorization that
        Stripe sent after it is still applied, not taken for a stale one.

        Moving a tenant to another account (or off the platform's own account)
        is guarded like a remap: its linked customers' ``cus_`` ids belong to
        the old account, so without ``confirm_remap=True`` this raises.

        Raises:
            InvalidArgument: a malformed id, no modes, or a mode without keys.
            InvalidArgument: the account is already connected to another tenant.
            RemapConfirmationRequired: the tenant bills through another account.
        """
        check_local_id(tenant, "tenant id")
        check_stripe_id(stripe_account_id, "acct_", "Stripe account id")
        wanted = _check_modes(modes, self._config)
        with self._storage.transaction() as tx:
            record = tx.get_tenant(tenant)
            if (
                record is None
                or not record.connected
                or record.direct
                or (record.stripe_account_id, record.modes) != (stripe_account_id, wanted)
            ):
                record = self._record_connection(
                    tx, tenant, stripe_account_id, wanted, merge=False, confirm_remap=confirm_remap
                )
        self._connected(stripe_account_id)
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
        self._connected(None)
        return record

    def disconnect(self, tenant: str) -> Tenant:
        """Mark the tenant disconnected: its calls raise `TenantNotConnected`, its data stays.

        Stripe is not told; use `deauthorize` to revoke an OAuth connection.

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

    # -- OAuth (Standard accounts) -----------------------------------------------------
    def authorize_url(
        self, tenant: str, *, mode: Mode | str, redirect_uri: str, scope: str = "read_write"
    ) -> str:
        """The Stripe OAuth link that connects ``tenant``, with a fresh single-use ``state``.

        The ``state`` is stored (as a hash) and expires after ``state_ttl``
        (one hour by default); `complete_oauth` consumes it.

        Raises:
            InvalidArgument: a malformed tenant id, mode, redirect URI or scope,
                or the tenant is the direct tenant.
            ConfigError: no keys or no ``connect_client_id`` for ``mode``.
        """
        check_local_id(tenant, "tenant id")
        wanted = check_mode(mode)
        _check_url(redirect_uri, "redirect_uri")
        if scope not in _SCOPES:
            raise InvalidArgument(f"scope must be one of {sorted(_SCOPES)}, got {scope!r}")
        client_id = self._client_id(wanted)
        state = secrets.token_urlsafe(32)
        now = self._clock()
        pending = PendingConnection(
            key=f"{_OAUTH}:{_digest(state)}",
            tenant=tenant,
            mode=wanted,
            kind=_OAUTH,
            created_at=now,
            expires_at=now + self._state_ttl,
            redirect_uri=redirect_uri,
        )
        with self._storage.transaction() as tx:
            self._refuse_direct(tx, tenant)
            tx.put_pending_connection(pending)
        query = urlencode(
            {
                "response_type": "code",
                "client_id": client_id,
                "scope": scope,
                "state": state,
                "redirect_uri": redirect_uri,
            }
        )
        return f"{self._connect_host()}/oauth/authorize?{query}"

    def complete_oauth(self, code: str, state: str, *, confirm_remap: bool = False) -> Tenant:
        """Exchange the OAuth ``code`` and connect the tenant that ``state`` was issued for.

        The ``state`` is consumed first, so it completes at most one connection,
        even when Stripe then refuses the code. A ``livemode=false`` token makes
        a test-only connection; a live one covers live and test (§4a.1).
        Events held for the account are applied right after.

        Raises:
            OAuthStateError: ``state`` is unknown, already used or expired.
            InvalidArgument: a malformed ``code``, or the account is already
                connected to another tenant.
            StripeAPIError: Stripe refused the code (``code`` 'invalid_grant').
            RemapConfirmationRequired: the tenant already bills through another
                account. Stripe has connected the new one; its id is in
                ``impact["to_account"]``, and `connect` with ``confirm_remap=True``
                finishes the move.
        """
        if not isinstance(code, str) or not _OAUTH_CODE.match(code):
            raise InvalidArgument("malformed OAuth code: expected the ac_... value Stripe sent")
        if not isinstance(state, str) or not _STATE.match(state):
            raise OAuthStateError("malformed OAuth state")
        key = f"{_OAUTH}:{_digest(state)}"
        with self._storage.transaction() as tx:
            pending = tx.take_pending_connection(key)
        if pending is None or pending.kind != _OAUTH:
            raise OAuthStateError("unknown or already used OAuth state: start again")
        if pending.expires_at is not None and self._clock() > pending.expires_at:
            raise OAuthStateError(
                f"the OAuth state for tenant {pending.tenant!r} has expired: start again"
            )
        token = self._api().request(
            "POST",
            "/oauth/token",
            mode=pending.mode,
            account=None,
            params={"grant_type": "authorization_code", "code": code},
            idempotency_key=f"rb-oauth-{_digest(state)[:48]}",
        )
        account = token.get("stripe_user_id")
        check_stripe_id(account, "acct_", "stripe_user_id in Stripe's OAuth answer")
        assert isinstance(account, str)
        live = token.get("livemode") is True
        modes = _modes_of(Mode.LIVE if live else Mode.TEST)
        with self._storage.transaction() as tx:
            self._refuse_direct(tx, pending.tenant)
            record = self._record_connection(
                tx, pending.tenant, account, modes, merge=True, confirm_remap=confirm_remap
            )
        log.info(
            "tenant %s connected %s through OAuth (%s)",
            record.id,
            account,
            ", ".join(sorted(m.value for m in record.modes)),
        )
        self._connected(account)
        return record

    def deauthorize(self, tenant: str) -> Tenant:
        """Revoke the tenant's OAuth connection at Stripe, then mark it disconnected.

        Uses the live client id when the connection covers live mode, else
        the test one. The tenant's data stays.

        Raises:
            TenantNotFound: the tenant was never registered.
            InvalidArgument: the tenant is direct (it has no connection to revoke).
            ConfigError: no ``connect_client_id`` for that mode.
            StripeAPIError: Stripe refused; the tenant is left as it was.
        """
        with self._storage.transaction() as tx:
            record = tx.get_tenant(tenant)
        if record is None:
            raise TenantNotFound(f"unknown tenant {tenant!r}", tenant=tenant)
        if record.direct or record.stripe_account_id is None:
            raise InvalidArgument(f"tenant {tenant!r} uses the platform's own account")
        mode = (
            Mode.LIVE
            if Mode.LIVE in record.modes and Mode.LIVE in self._config.modes
            else Mode.TEST
        )
        client_id = self._client_id(mode)
        self._api().request(
            "POST",
            "/oauth/deauthorize",
            mode=mode,
            account=None,
            params={"client_id": client_id, "stripe_user_id": record.stripe_account_id},
            idempotency_key=f"rb-deauthorize-{uuid.uuid4()}",
        )
        return self.disconnect(tenant)

    # -- Account Links ---------------------------------------------------------------
    def start_onboarding(
        self,
        tenant: str,
        *,
        mode: Mode | str,
        refresh_url: str,
        return_url: str,
        country: str | None = None,
        email: str | None = None,
    ) -> str:
        """Create the tenant's Standard account (once) and an onboarding link; returns its URL.

        Calling it again (for example from ``refresh_url``, when a link
        expired) reuses the same account. After Stripe sends the user to
        ``return_url``, call `check_onboarding`.

        Raises:
            InvalidArgument: a malformed id, mode, URL or country, the tenant is
                direct, or it is already connected.
            ConfigError: no keys for ``mode``.
            StripeAPIError: Stripe refused.
        """
        check_local_id(tenant, "tenant id")
        wanted = check_mode(mode)
        _check_url(refresh_url, "refresh_url")
        _check_url(return_url, "return_url")
        if country is not None and not (
            isinstance(country, str) and len(country) == 2 and country.isalpha()
        ):
            raise InvalidArgument(f"country must be a two-letter code, got {country!r}")
        if wanted not in self._config.modes:
            raise ConfigError(f"no keys are configured for {wanted.value} mode")
        key = f"{_ACCOUNT_LINK}:{tenant}"
        with self._storage.transaction() as tx:
            self._refuse_direct(tx, tenant)
            existing = tx.get_tenant(tenant)
            if existing is not None and existing.connected:
                raise InvalidArgument(
                    f"tenant {tenant!r} is already connected to {existing.stripe_account_id}"
                )
            pending = tx.get_pending_connection(key)
            if pending is None or pending.mode is not wanted:
                pending = PendingConnection(
                    key=key,
                    tenant=tenant,
                    mode=wanted,
                    kind=_ACCOUNT_LINK,
                    created_at=self._clock(),
                    idempotency_key=f"rb-account-{uuid.uuid4()}",
                )
                tx.put_pending_connection(pending)
        account = pending.stripe_account_id
        if account is None:
            params: dict[str, Any] = {"type": "standard", "metadata": {"rational_tenant": tenant}}
            if country is not None:
                params["country"] = country.upper()
            if email is not None:
                params["email"] = email
            created = self._api().request(
                "POST",
                "/v1/accounts",
                mode=wanted,
                account=None,
                params=params,
                idempotency_key=pending.idempotency_key or f"rb-account-{uuid.uuid4()}",
            )
            account = created.get("id")
            check_stripe_id(account, "acct_", "account id in Stripe's answer")
            assert isinstance(account, str)
            with self._storage.transaction() as tx:
                tx.put_pending_connection(attrs.evolve(pending, stripe_account_id=account))
        link = self._api().request(
            "POST",
            "/v1/account_links",
            mode=wanted,
            account=None,
            params={
                "account": account,
                "refresh_url": refresh_url,
                "return_url": return_url,
                "type": "account_onboarding",
            },
            idempotency_key=f"rb-account-link-{uuid.uuid4()}",
        )
        url = link.get("url")
        if not isinstance(url, str):
            raise StripeAPIError("Stripe's account link has no url", mode=wanted, tenant=tenant)
        return url

    def check_onboarding(self, tenant: str) -> OnboardingStatus:
        """Ask Stripe how the tenant's onboarding stands; connect the tenant once it is done.

        Done means ``details_submitted``. The connection then covers the modes
        of the key the account was created with (a test key: test only), and
        the events held for the account are applied.

        Raises:
            TenantNotFound: no onboarding was started for the tenant.
            StripeAPIError: Stripe could not be asked.
        """
        check_local_id(tenant, "tenant id")
        with self._storage.transaction() as tx:
            pending = tx.get_pending_connection(f"{_ACCOUNT_LINK}:{tenant}")
            existing = tx.get_tenant(tenant)
        if pending is None or pending.stripe_account_id is None:
            if existing is None or existing.direct or existing.stripe_account_id is None:
                raise TenantNotFound(
                    f"no onboarding was started for tenant {tenant!r}", tenant=tenant
                )
            # Already connected (or disconnected since): report what Stripe says.
            mode = Mode.LIVE if Mode.LIVE in existing.modes & self._config.modes else Mode.TEST
            info = self._api().request(
                "GET", f"/v1/accounts/{existing.stripe_account_id}", mode=mode, account=None
            )
            return _status(tenant, existing.stripe_account_id, info, connected=existing.connected)
        account = pending.stripe_account_id
        info = self._api().request(
            "GET", f"/v1/accounts/{account}", mode=pending.mode, account=None
        )
        status = _status(tenant, account, info, connected=info.get("details_submitted") is True)
        if not status.details_submitted:
            return status
        with self._storage.transaction() as tx:
            current = tx.take_pending_connection(pending.key)
            if current is None:
                return status  # completed concurrently
            self._record_connection(tx, tenant, account, _modes_of(pending.mode), merge=True)
        log.info("tenant %s connected %s through Account Links", tenant, account)
        self._connected(account)
        return status

    # -- webhook handlers ------------------------------------------------------------
    def on_deauthorized(self, ctx: EventContext) -> HandlerResult | None:
        """``account.application.deauthorized``: the tenant is disconnected; its data stays.

        An event older than the tenant's current connection (it reconnected
        since) is stale. One about another platform's application is ignored.
        """
        tenant = ctx.tenant
        if tenant.direct:
            return HandlerResult(EventOutcome.IGNORED, "the direct tenant has no connection")
        application = ctx.object.get("id")
        ours = {
            keys.connect_client_id
            for mode in Mode
            if (keys := self._config.keys_for(mode)) is not None and keys.connect_client_id
        }
        if ours and isinstance(application, str) and application not in ours:
            return HandlerResult(EventOutcome.IGNORED, f"application {application} is not ours")
        if tenant.connected_at is not None and ctx.created < tenant.connected_at.replace(
            microsecond=0
        ):
            return HandlerResult(EventOutcome.STALE, "the tenant connected again since")
        ctx.tx.put_tenant(
            attrs.evolve(tenant, status=TenantStatus.DISCONNECTED, disconnected_at=ctx.created)
        )
        log.warning("tenant %s disconnected: Stripe account deauthorized the platform", tenant.id)
        return None

    # -- internals -------------------------------------------------------------------
    def _api(self) -> StripeAPI:
        if self._stripe is None:
            raise ConfigError("TenantService needs the Stripe API for onboarding")
        return self._stripe

    def _client_id(self, mode: Mode) -> str:
        keys = self._config.keys_for(mode)
        if keys is None:
            raise ConfigError(f"no keys are configured for {mode.value} mode")
        if not keys.connect_client_id:
            raise ConfigError(
                f"OAuth needs the {mode.value} mode's connect_client_id (ca_...): "
                f"set ModeKeys(connect_client_id=...)"
            )
        return keys.connect_client_id

    def _connect_host(self) -> str:
        base = self._config.api_base
        return base.rstrip("/") if base else _CONNECT_HOST

    def _refuse_direct(self, tx: Transaction, tenant: str) -> None:
        existing = tx.get_tenant(tenant)
        if existing is not None and existing.direct:
            raise InvalidArgument(
                f"tenant {tenant!r} is the direct tenant: it uses the platform's own account"
            )

    def _record_connection(
        self,
        tx: Transaction,
        tenant: str,
        account: str,
        modes: frozenset[Mode],
        *,
        merge: bool,
        confirm_remap: bool = False,
    ) -> Tenant:
        holder = tx.tenant_by_account(account)
        if holder is not None and holder.id != tenant:
            raise InvalidArgument(f"account {account} is already connected to tenant {holder.id!r}")
        existing = tx.get_tenant(tenant)
        moving = existing is not None and (
            existing.direct or existing.stripe_account_id not in (None, account)
        )
        if moving and not confirm_remap:
            assert existing is not None
            old = "the platform's own account" if existing.direct else existing.stripe_account_id
            raise RemapConfirmationRequired(
                f"tenant {tenant!r} bills through {old}; moving it to {account} sends every "
                "call for its linked customers there, where their cus_ ids do not exist. "
                "Relink them, or pass confirm_remap=True to accept that",
                impact={
                    "tenant": tenant,
                    "from_account": existing.stripe_account_id,
                    "from_direct": existing.direct,
                    "to_account": account,
                },
            )
        if (
            merge
            and existing is not None
            and existing.connected
            and existing.stripe_account_id == account
        ):
            modes = modes | existing.modes
        record = Tenant(
            id=tenant,
            stripe_account_id=account,
            modes=modes,
            status=TenantStatus.CONNECTED,
            direct=False,
            connected_at=self._clock(),
        )
        tx.put_tenant(record)
        return record

    def _connected(self, account: str | None) -> None:
        if self._on_connected is not None:
            self._on_connected(account)


def _status(
    tenant: str, account: str, info: Mapping[str, Any], *, connected: bool
) -> OnboardingStatus:
    requirements = info.get("requirements")
    due = requirements.get("currently_due") if isinstance(requirements, Mapping) else None
    return OnboardingStatus(
        tenant=tenant,
        stripe_account_id=account,
        details_submitted=info.get("details_submitted") is True,
        charges_enabled=info.get("charges_enabled") is True,
        connected=connected,
        currently_due=tuple(str(x) for x in due) if isinstance(due, list) else (),
    )
