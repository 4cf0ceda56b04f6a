"""Invitations: the email a customer created in Stripe receives (DESIGN.md §4a.7).

When a ``customer.created`` event makes a new local customer, the webhook's
transaction also writes an `Invitation` row, keyed by the Stripe customer, so
there is exactly one however often or concurrently the event arrives. The
email goes out right after the commit; a failed send stays pending and
`Billing.sync.push_pending` retries it with a backoff. Its ``Message-ID`` is
derived from the tenant and the local customer, so a resend after a crash can
be recognised downstream. A Stripe customer without an email address gets a
row in state ``no_email`` and no email.

The host chooses the words and the link::

    billing = Billing(
        config=config,
        invitations=InvitationSettings(
            signup_link=lambda customer: f"https://app.example.com/join/{customer.id}",
            template=InvitationTemplate(
                subject="Welcome to {tenant}",
                text="Hi {name}, finish signing up: {signup_url}",
            ),
            sender="Example <billing@example.com>",
        ),
    )
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable
from datetime import timedelta

import attrs

from .._config import Mode
from ..domain.models import Customer, Invitation, InvitationState
from ..errors import ConfigError, MailRejected
from ..ports import Clock, Email, Mailer, Storage, Transaction
from ._validate import check_local_id, check_mode, check_stripe_id

__all__ = [
    "DEFAULT_TEMPLATE",
    "InvitationContext",
    "InvitationService",
    "InvitationSettings",
    "InvitationTemplate",
    "message_id_for",
]

log = logging.getLogger("rational_billing.invitations")

#: How long a sender holds an invitation before another one may try it.
_LEASE = timedelta(minutes=10)
_MAX_BACKOFF = timedelta(hours=1)
#: Attempts before an invitation that keeps failing is marked failed: with the
#: backoff (2 s doubling, at most 1 h apart) that is about a day of trying.
MAX_ATTEMPTS = 30
_DOMAIN = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.\-]{0,251}[A-Za-z0-9])?$")
_PLACEHOLDERS = ("name", "email", "tenant", "customer_id", "mode", "signup_url")


@attrs.frozen
class InvitationContext:
    """What an invitation template is rendered from.

    Templates see ``{name}``, ``{email}``, ``{tenant}``, ``{customer_id}``,
    ``{mode}`` and ``{signup_url}``; ``signup_url`` is None here (``""`` in the
    text) when no sign-up link is configured.
    """

    tenant: str
    customer_id: str
    email: str
    name: str
    mode: Mode
    stripe_customer_id: str
    signup_url: str | None


def _check_placeholders(value: str | None, field: str) -> None:
    if value is None:
        return
    if not isinstance(value, str):
        raise ConfigError(f"InvitationTemplate.{field} must be a string")
    try:
        value.format_map(dict.fromkeys(_PLACEHOLDERS, "x"))
    except (KeyError, IndexError, ValueError, AttributeError) as exc:
        raise ConfigError(
            f"InvitationTemplate.{field} has a bad placeholder ({exc!r}); "
            f"use {', '.join('{' + p + '}' for p in _PLACEHOLDERS)}"
        ) from None


@attrs.frozen
class InvitationTemplate:
    """The invitation's subject and body, as ``str.format`` templates.

    Placeholders: ``{name}`` (the customer's name, or the email when there is
    none), ``{email}``, ``{tenant}``, ``{customer_id}``, ``{mode}`` and
    ``{signup_url}``. ``text_without_link``, when set, is used instead of
    ``text`` when no sign-up link is configured. Subclass and override
    `render` for anything a format string cannot say.

    Raises:
        ConfigError: an unknown placeholder or a malformed format string.

    Example::

        InvitationTemplate(subject="Join {tenant}", text="Hi {name}: {signup_url}")
    """

    subject: str
    text: str
    html: str | None = None
    text_without_link: str | None = None

    def __attrs_post_init__(self) -> None:
        for field in ("subject", "text", "html", "text_without_link"):
            _check_placeholders(getattr(self, field), field)

    def render(self, context: InvitationContext) -> tuple[str, str, str | None]:
        """``(subject, text, html)`` for one invitation."""
        values = {
            "name": context.name,
            "email": context.email,
            "tenant": context.tenant,
            "customer_id": context.customer_id,
            "mode": context.mode.value,
            "signup_url": context.signup_url or "",
        }
        text = self.text
        if context.signup_url is None and self.text_without_link is not None:
            text = self.text_without_link
        subject = " ".join(self.subject.format_map(values).split())  # one header line
        html = None if self.html is None else self.html.format_map(values)
        return subject, text.format_map(values), html


#: The template used unless the host supplies one.
DEFAULT_TEMPLATE = InvitationTemplate(
    subject="You're invited to {tenant}",
    text=(
        "Hello {name},\n\n"
        "An account has been created for you at {tenant}.\n"
        "Finish signing up here: {signup_url}\n"
    ),
    text_without_link=(
        "Hello {name},\n\n"
        "An account has been created for you at {tenant}.\n"
        "You will hear from them about how to sign in.\n"
    ),
)


@attrs.frozen
class InvitationSettings:
    """How invitations look and where they point; pass to ``Billing(invitations=...)``.

    Args:
        signup_link: builds the sign-up URL for a customer, such as
            ``lambda customer: f"https://app.example.com/join/{customer.id}"``.
            None: the email carries no link (``text_without_link``).
        template: the words (`InvitationTemplate`; `DEFAULT_TEMPLATE` by default).
        sender: the ``From`` address; None lets the mailer decide.
        message_id_domain: the domain part of the stable ``Message-ID``.

    Raises:
        ConfigError: a malformed ``message_id_domain`` or a non-callable ``signup_link``.
    """

    signup_link: Callable[[Customer], str] | None = None
    template: InvitationTemplate = DEFAULT_TEMPLATE
    sender: str | None = None
    message_id_domain: str = "rational-billing.invalid"

    def __attrs_post_init__(self) -> None:
        if self.signup_link is not None and not callable(self.signup_link):
            raise ConfigError("InvitationSettings.signup_link must be callable (customer) -> str")
        if not isinstance(self.template, InvitationTemplate):
            raise ConfigError("InvitationSettings.template must be an InvitationTemplate")
        if not isinstance(self.message_id_domain, str) or not _DOMAIN.match(self.message_id_domain):
            raise ConfigError(
                f"malformed message_id_domain {self.message_id_domain!r}: use a host name"
            )


def message_id_for(tenant: str, customer_id: str, domain: str) -> str:
    """The stable ``Message-ID`` of a customer's invitation (without angle brackets)."""
    digest = hashlib.sha256(f"{tenant}\x1f{customer_id}".encode()).hexdigest()[:40]
    return f"invitation.{digest}@{domain}"


def _backoff(attempts: int) -> timedelta:
    return min(timedelta(seconds=2 ** min(attempts, 20)), _MAX_BACKOFF)


class InvitationService:
    """Records, sends and retries invitation emails: ``billing.invitations``.

    Example::

        billing.invitations.get("acme", "cus_123", mode=Mode.TEST).state  # InvitationState.SENT
    """

    def __init__(
        self,
        *,
        storage: Storage,
        mailer: Mailer,
        clock: Clock,
        settings: InvitationSettings | None = None,
    ) -> None:
        self._storage = storage
        self._mailer = mailer
        self._clock = clock
        self._settings = settings if settings is not None else InvitationSettings()

    def record(
        self, tx: Transaction, customer: Customer, *, mode: Mode, stripe_customer_id: str
    ) -> bool:
        """Write the customer's invitation in ``tx`` unless the Stripe customer has one.

        Returns True when this call wrote it, False when one already existed
        (a duplicate or concurrent delivery): the caller then changes nothing.
        """
        invitation = Invitation(
            tenant=customer.tenant,
            mode=mode,
            stripe_customer_id=stripe_customer_id,
            customer_id=customer.id,
            email=customer.email,
            message_id=message_id_for(
                customer.tenant, customer.id, self._settings.message_id_domain
            ),
            created_at=self._clock(),
            state=InvitationState.PENDING if customer.email else InvitationState.NO_EMAIL,
        )
        return tx.insert_invitation(invitation)

    def get(self, tenant: str, stripe_customer_id: str, *, mode: Mode | str) -> Invitation | None:
        """The invitation for that Stripe customer, or None.

        Raises:
            InvalidArgument: a malformed tenant id, Stripe id or mode.
        """
        check_local_id(tenant, "tenant id")
        check_stripe_id(stripe_customer_id, "cus_", "Stripe customer id")
        wanted = check_mode(mode)
        with self._storage.transaction() as tx:
            return tx.get_invitation(tenant, wanted, stripe_customer_id)

    def send(self, tenant: str, mode: Mode, stripe_customer_id: str) -> bool:
        """Send the invitation if it is pending and due; True when it went out now.

        A failure is recorded with a backoff and retried by `send_pending`;
        it never raises for a mailer failure.
        """
        now = self._clock()
        with self._storage.transaction() as tx:
            invitation = tx.claim_invitation(
                tenant, mode, stripe_customer_id, now=now, until=now + _LEASE
            )
            customer = (
                None if invitation is None else tx.get_customer(tenant, invitation.customer_id)
            )
        if invitation is None:
            return False
        if not ((customer is not None and customer.email) or invitation.email):
            with self._storage.transaction() as tx:
                tx.put_invitation(attrs.evolve(invitation, state=InvitationState.NO_EMAIL))
            return False
        try:
            email = self._compose(invitation, customer)
            self._mailer.send(email, mode=invitation.mode)
        except Exception as exc:  # noqa: BLE001 - the host's mailer or link: kept, retried
            self._failed(invitation, exc)
            return False
        with self._storage.transaction() as tx:
            tx.put_invitation(
                attrs.evolve(
                    invitation,
                    state=InvitationState.SENT,
                    attempts=invitation.attempts + 1,
                    next_attempt_at=None,
                    last_error=None,
                    sent_at=self._clock(),
                )
            )
        log.info(
            "invitation %s for %s/%s (%s mode) sent",
            invitation.message_id,
            tenant,
            invitation.customer_id,
            mode.value,
        )
        return True

    def send_pending(self, *, limit: int = 100) -> int:
        """Send every due invitation; returns how many went out."""
        with self._storage.transaction() as tx:
            due = list(tx.due_invitations(self._clock(), limit=limit))
        return sum(self.send(i.tenant, i.mode, i.stripe_customer_id) for i in due)

    def _compose(self, invitation: Invitation, customer: Customer | None) -> Email:
        if customer is None:
            customer = Customer(
                id=invitation.customer_id,
                tenant=invitation.tenant,
                email=invitation.email,
                created_at=invitation.created_at,
            )
        to = customer.email or invitation.email or ""
        settings = self._settings
        signup_url = None if settings.signup_link is None else str(settings.signup_link(customer))
        context = InvitationContext(
            tenant=invitation.tenant,
            customer_id=customer.id,
            email=to,
            name=customer.name or to,
            mode=invitation.mode,
            stripe_customer_id=invitation.stripe_customer_id,
            signup_url=signup_url,
        )
        subject, text, html = settings.template.render(context)
        return Email(
            to=to,
            subject=subject,
            text=text,
            message_id=invitation.message_id,
            html=html,
            sender=settings.sender,
        )

    def _failed(self, invitation: Invitation, exc: BaseException) -> None:
        attempts = invitation.attempts + 1
        message = f"{type(exc).__name__}: {exc}"[:1000]
        # A refusal for good, or a mailer that keeps failing, ends the retries:
        # the row stays, visible as failed with its error (never retried forever).
        final = isinstance(exc, MailRejected) or attempts >= MAX_ATTEMPTS
        with self._storage.transaction() as tx:
            current = tx.get_invitation(
                invitation.tenant, invitation.mode, invitation.stripe_customer_id
            )
            if current is None or current.state is not InvitationState.PENDING:
                return
            if final:
                updated = attrs.evolve(
                    current,
                    state=InvitationState.FAILED,
                    attempts=attempts,
                    last_error=message,
                    next_attempt_at=None,
                )
            else:
                updated = attrs.evolve(
                    current,
                    attempts=attempts,
                    last_error=message,
                    next_attempt_at=self._clock() + _backoff(attempts),
                )
            tx.put_invitation(updated)
        log.log(
            logging.ERROR if final else logging.WARNING,
            "invitation %s for %s/%s not sent (attempt %d), %s: %s",
            invitation.message_id,
            invitation.tenant,
            invitation.customer_id,
            attempts,
            "giving up" if final else "will retry",
            message,
        )
