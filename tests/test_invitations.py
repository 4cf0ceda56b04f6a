"""Customers created in Stripe: auto-link, or a local customer and exactly one invitation (§4a.6-7).

Also the other direction of the two-way sync under duplicated and reordered
``customer.*`` deliveries (Hypothesis), and concurrent deliveries on
PostgreSQL with threads.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rational_billing import (
    Billing,
    BillingConfig,
    CustomerLink,
    EventOutcome,
    InvitationSettings,
    InvitationState,
    InvitationTemplate,
    Mode,
    ModeKeys,
    Storage,
)
from rational_billing.errors import ConfigError, MailRejected, StripeAPIError
from rational_billing.services.invitations import MAX_ATTEMPTS, message_id_for
from rational_billing.storage.sql import SQLStorage
from rational_billing.testing import (
    InMemoryStorage,
    RecordingMailer,
    build_customer,
    build_deleted_customer,
    make_event,
    sign_payload,
)

ACCOUNT = "acct_1INVITESAAAAAA"
SECRET = "whsec_invites"
LIVE_SECRET = "whsec_invites_live"
NOW = datetime(2026, 5, 4, 10, 0, tzinfo=UTC)


class StripeState:
    """A StripeAPI double answering from what 'Stripe holds now'; records every call."""

    def __init__(self) -> None:
        self.customers: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, str, Mode, str | None]] = []
        self._lock = threading.Lock()

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
        with self._lock:
            self.calls.append((method, path, mode, account))
        if method == "GET" and path.startswith("/v1/customers/"):
            found = self.customers.get(path.rsplit("/", 1)[1])
            if found is None:
                raise StripeAPIError("No such customer", status=404, code="resource_missing")
            return dict(found)
        raise AssertionError(f"unexpected {method} {path}")

    def list_all(self, path: str, **kwargs: Any) -> Iterator[dict[str, Any]]:
        raise AssertionError(f"unexpected list {path}")


def _billing(
    storage: Storage | None = None,
    stripe: StripeState | None = None,
    *,
    mailer: RecordingMailer | None = None,
    settings: InvitationSettings | None = None,
) -> Billing:
    config = BillingConfig(
        test=ModeKeys(secret_key="sk_test_invites", webhook_secrets=(SECRET,)),
        live=ModeKeys(secret_key="sk_live_invites", webhook_secrets=(LIVE_SECRET,)),
    )
    billing = Billing(
        config=config,
        storage=storage if storage is not None else InMemoryStorage(),
        mailer=mailer if mailer is not None else RecordingMailer(),
        clock=lambda: NOW,
        stripe=stripe if stripe is not None else StripeState(),
        invitations=settings,
    )
    billing.tenants.connect("acme", ACCOUNT, modes=billing.config.modes)
    return billing


def _deliver(billing: Billing, event: dict[str, Any]) -> Any:
    payload = json.dumps(event).encode()
    secret = LIVE_SECRET if event["livemode"] else SECRET
    return billing.webhooks.handle(
        payload, sign_payload(payload, secret, timestamp=int(NOW.timestamp()))
    )


def _created(customer: dict[str, Any], *, at: int | None = None, **kwargs: Any) -> dict[str, Any]:
    moment = int(NOW.timestamp()) - 60 if at is None else at
    return make_event("customer.created", customer, account=ACCOUNT, created=moment, **kwargs)


def _held(billing: Billing, **fields: Any) -> dict[str, Any]:
    """A Stripe customer that Stripe holds (the revalidation after customer.created finds it)."""
    customer = build_customer(**fields)
    _stripe(billing).customers[customer["id"]] = customer
    return customer


def _mailer(billing: Billing) -> RecordingMailer:
    mailer = billing.mailer
    assert isinstance(mailer, RecordingMailer)
    return mailer


def _stripe(billing: Billing) -> StripeState:
    stripe = billing.stripe
    assert isinstance(stripe, StripeState)
    return stripe


def _snapshot(billing: Billing) -> Any:
    storage = billing.storage
    assert isinstance(storage, InMemoryStorage)
    return (dict(storage._customers), dict(storage._invitations), dict(storage._outbox))


def test_customer_created_in_stripe_gets_a_local_customer_and_one_invitation() -> None:
    """A new Stripe customer becomes a linked local customer and receives one invitation email."""
    settings = InvitationSettings(
        signup_link=lambda c: f"https://app.example.com/join/{c.tenant}/{c.id}",
        template=InvitationTemplate(
            subject="Join {tenant}, {name}", text="Hi {name} <{email}>: {signup_url} ({mode})"
        ),
        sender="Billing <billing@example.com>",
        message_id_domain="mail.example.com",
    )
    billing = _billing(settings=settings)
    remote = _held(
        billing, id="cus_NEW1", email="grace@example.com", name="Grace", metadata={"plan": "pro"}
    )
    response = _deliver(billing, _created(remote))
    assert (response.status_code, response.outcome) == (200, EventOutcome.APPLIED)
    (customer,) = billing.customers.list("acme")
    assert customer.link is not None
    assert (customer.link.mode, customer.link.stripe_customer_id) == (Mode.TEST, "cus_NEW1")
    assert (customer.email, customer.name, dict(customer.metadata)) == (
        "grace@example.com",
        "Grace",
        {"plan": "pro"},
    )
    ((email, mode),) = _mailer(billing).sent
    assert mode is Mode.TEST
    assert email.to == "grace@example.com"
    assert email.subject == "Join acme, Grace"
    assert email.text == (
        f"Hi Grace <grace@example.com>: https://app.example.com/join/acme/{customer.id} (test)"
    )
    assert email.sender == "Billing <billing@example.com>"
    assert email.message_id == message_id_for("acme", customer.id, "mail.example.com")
    assert email.message_id.endswith("@mail.example.com")
    invitation = billing.invitations.get("acme", "cus_NEW1", mode=Mode.TEST)
    assert invitation is not None and invitation.state is InvitationState.SENT
    assert (invitation.customer_id, invitation.attempts) == (customer.id, 1)
    # After the commit, the customer was revalidated once from the tenant's account.
    assert _stripe(billing).calls == [("GET", "/v1/customers/cus_NEW1", Mode.TEST, ACCOUNT)]


def test_the_default_invitation_names_the_tenant_and_works_without_a_link() -> None:
    """With no settings, the default template is used and says nothing about a link."""
    billing = _billing()
    remote = _held(billing, id="cus_DEF", email="d@example.com", name=None)
    _deliver(billing, _created(remote))
    ((email, _),) = _mailer(billing).sent
    assert "acme" in email.subject
    assert email.text.startswith("Hello d@example.com,")
    assert "http" not in email.text


def test_duplicate_and_distinct_deliveries_make_one_customer_and_one_email() -> None:
    """The same event twice, and another event for the same Stripe customer, change nothing more."""
    billing = _billing()
    remote = _held(billing, id="cus_DUP", email="dup@example.com")
    event = _created(remote)
    assert _deliver(billing, event).outcome is EventOutcome.APPLIED
    before = _snapshot(billing)
    assert _deliver(billing, event).outcome is EventOutcome.DUPLICATE
    again = _created(remote)  # a new event id for the same Stripe customer
    assert _deliver(billing, again).outcome is EventOutcome.APPLIED  # already linked: nothing to do
    assert _snapshot(billing) == before
    assert len(list(billing.customers.list("acme"))) == 1
    assert len(_mailer(billing).sent) == 1


def test_a_failed_send_keeps_the_invitation_pending_with_its_error() -> None:
    """The mailer fails once: the webhook still answers 200 and the invitation waits, with the error."""
    mailer = RecordingMailer(fail_times=1)
    billing = _billing(mailer=mailer)
    remote = _held(billing, id="cus_FAIL", email="fail@example.com")
    response = _deliver(billing, _created(remote))
    assert (response.status_code, response.outcome) == (200, EventOutcome.APPLIED)
    invitation = billing.invitations.get("acme", "cus_FAIL", mode=Mode.TEST)
    assert invitation is not None and invitation.state is InvitationState.PENDING
    assert invitation.attempts == 1 and "told to fail" in (invitation.last_error or "")
    assert mailer.sent == []


def test_push_pending_retries_a_failed_invitation_after_its_backoff() -> None:
    """A pending invitation is not resent before its backoff, then exactly once after it."""
    now = [NOW]
    mailer = RecordingMailer(fail_times=1)
    config = BillingConfig(test=ModeKeys(secret_key="sk_test_x", webhook_secrets=(SECRET,)))
    billing = Billing(
        config=config,
        storage=InMemoryStorage(),
        mailer=mailer,
        clock=lambda: now[0],
        stripe=StripeState(),
    )
    billing.tenants.connect("acme", ACCOUNT, modes=frozenset({Mode.TEST}))
    _deliver(billing, _created(_held(billing, id="cus_RETRY", email="retry@example.com")))
    assert mailer.sent == [] and mailer.attempts == 1
    assert billing.sync.push_pending() == 0  # backoff not elapsed
    assert mailer.attempts == 1
    now[0] += timedelta(seconds=3)
    assert billing.sync.push_pending() == 1
    assert billing.sync.push_pending() == 0
    ((email, _),) = mailer.sent
    (customer,) = billing.customers.list("acme")
    assert email.message_id == message_id_for("acme", customer.id, "rational-billing.invalid")
    invitation = billing.invitations.get("acme", "cus_RETRY", mode=Mode.TEST)
    assert invitation is not None
    assert (invitation.state, invitation.attempts) == (InvitationState.SENT, 2)


def test_a_stripe_customer_without_email_is_recorded_and_not_mailed() -> None:
    """No email address: the customer is created, the invitation recorded as no_email, nothing sent."""
    billing = _billing()
    _deliver(billing, _created(_held(billing, id="cus_NOMAIL", email=None)))
    (customer,) = billing.customers.list("acme")
    assert customer.email is None
    invitation = billing.invitations.get("acme", "cus_NOMAIL", mode=Mode.TEST)
    assert invitation is not None and invitation.state is InvitationState.NO_EMAIL
    assert billing.sync.push_pending() == 0
    assert _mailer(billing).attempts == 0


def test_a_live_mode_customer_is_invited_with_the_mailer_told_live() -> None:
    """Invitations go out in both modes; the Mailer is told which."""
    billing = _billing()
    remote = _held(billing, id="cus_LIVEINV", email="live@example.com", livemode=True)
    event = _created(remote, livemode=True)
    assert _deliver(billing, event).outcome is EventOutcome.APPLIED
    ((_, mode),) = _mailer(billing).sent
    assert mode is Mode.LIVE
    (customer,) = billing.customers.list("acme")
    assert customer.link is not None and customer.link.mode is Mode.LIVE


def test_metadata_naming_an_unlinked_local_customer_links_it_without_an_invitation() -> None:
    """metadata.rational_customer_id of an unlinked customer of the tenant: link it, send nothing."""
    billing = _billing()
    local = billing.customers.create("acme", email="own@example.com", customer_id="c_own")
    remote = _held(
        billing, id="cus_OWN", email="own@example.com", metadata={"rational_customer_id": "c_own"}
    )
    response = _deliver(billing, _created(remote))
    assert response.outcome is EventOutcome.APPLIED and "metadata" in response.message
    linked = billing.customers.get("acme", local.id)
    assert linked.link is not None and linked.link.stripe_customer_id == "cus_OWN"
    assert len(list(billing.customers.list("acme"))) == 1
    assert billing.invitations.get("acme", "cus_OWN", mode=Mode.TEST) is None
    assert _mailer(billing).sent == []


@pytest.mark.parametrize(
    "metadata",
    [
        {"rational_customer_id": "c_taken"},
        {"rational_customer_id": "c_free", "rational_tenant": "someone-else"},
    ],
    ids=["linked elsewhere", "another tenant"],
)
def test_metadata_naming_a_customer_linked_elsewhere_is_a_conflict_that_changes_nothing(
    metadata: dict[str, str],
) -> None:
    """A conflict is recorded on the event (ignored, with the reason) and nothing else changes."""
    billing = _billing()
    _held(billing, id="cus_FIRST", email="t@example.com")
    billing.customers.create("acme", email="t@example.com", customer_id="c_taken")
    billing.customers.create("acme", email="f@example.com", customer_id="c_free")
    storage = billing.storage
    assert isinstance(storage, InMemoryStorage)
    with storage.transaction() as tx:
        customer = tx.get_customer("acme", "c_taken")
        assert customer is not None
        tx.put_customer(attrs.evolve(customer, link=CustomerLink(Mode.TEST, "cus_FIRST")))
    before = _snapshot(billing)
    remote = build_customer(id="cus_SECOND", email="x@example.com", metadata=metadata)
    response = _deliver(billing, _created(remote))
    assert (response.status_code, response.outcome) == (200, EventOutcome.IGNORED)
    assert response.message.startswith("conflict:")
    assert _snapshot(billing) == before
    stored = storage._events[response.event_id]
    assert stored.reason is not None and stored.reason.startswith("conflict:")
    assert _mailer(billing).sent == []


def test_metadata_naming_an_unknown_customer_creates_and_invites() -> None:
    """A rational_customer_id that names nobody here falls back to creating and inviting."""
    billing = _billing()
    remote = _held(
        billing,
        id="cus_GHOST",
        email="ghost@example.com",
        metadata={"rational_customer_id": "c_gone"},
    )
    assert _deliver(billing, _created(remote)).outcome is EventOutcome.APPLIED
    (customer,) = billing.customers.list("acme")
    assert customer.id != "c_gone" and dict(customer.metadata) == {}
    assert len(_mailer(billing).sent) == 1


def test_customer_deleted_unlinks_but_keeps_the_local_customer() -> None:
    """customer.deleted removes the link (access ends) and keeps the customer and its data."""
    billing = _billing()
    remote = _held(billing, id="cus_DEL", email="del@example.com")
    _deliver(billing, _created(remote))
    (customer,) = billing.customers.list("acme")
    deleted = make_event(
        "customer.deleted", remote, account=ACCOUNT, created=int(NOW.timestamp()) - 10
    )
    assert _deliver(billing, deleted).outcome is EventOutcome.APPLIED
    kept = billing.customers.get("acme", customer.id)
    assert kept.link is None and kept.email == "del@example.com"
    assert _deliver(billing, make_event("customer.deleted", remote, account=ACCOUNT)).outcome is (
        EventOutcome.IGNORED
    )


@pytest.mark.parametrize(
    ("template", "field"),
    [({"subject": "{nope}", "text": "x"}, "subject"), ({"subject": "x", "text": "{0}"}, "text")],
)
def test_a_template_with_an_unknown_placeholder_is_a_config_error(
    template: dict[str, str], field: str
) -> None:
    """Unknown placeholders are caught when the template is built, naming the field."""
    with pytest.raises(ConfigError, match=field):
        InvitationTemplate(**template)


def test_bad_invitation_settings_are_config_errors() -> None:
    """A non-callable link or a malformed Message-ID domain is refused at construction."""
    with pytest.raises(ConfigError):
        InvitationSettings(signup_link="https://x.example")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        InvitationSettings(message_id_domain="not a domain")


def test_a_failing_signup_link_is_retried_like_a_failed_send() -> None:
    """When the host's link builder raises, the invitation stays pending with the error."""

    def broken(customer: Any) -> str:
        raise RuntimeError("link service down")

    billing = _billing(settings=InvitationSettings(signup_link=broken))
    response = _deliver(billing, _created(_held(billing, id="cus_LINK", email="l@example.com")))
    assert response.status_code == 200
    invitation = billing.invitations.get("acme", "cus_LINK", mode=Mode.TEST)
    assert invitation is not None and invitation.state is InvitationState.PENDING
    assert "link service down" in (invitation.last_error or "")


# -- duplicated and reordered deliveries (Hypothesis) -------------------------------------

BASE = int(NOW.timestamp()) - 1000


def _history(updates: int, deleted: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One Stripe customer's events in the order Stripe made them, and its final state."""
    state = build_customer(id="cus_HYPO", email="v0@example.com", name="Name 0", created=BASE)
    events = [
        make_event("customer.created", state, account=ACCOUNT, created=BASE, event_id="evt_c")
    ]
    for i in range(1, updates + 1):
        state = {
            **state,
            "email": f"v{i}@example.com",
            "name": f"Name {i}",
            "metadata": {"n": str(i)},
        }
        events.append(
            make_event(
                "customer.updated",
                state,
                account=ACCOUNT,
                created=BASE + 10 * i,
                event_id=f"evt_u{i}",
            )
        )
    final: dict[str, Any] = state
    if deleted:
        events.append(
            make_event(
                "customer.deleted", state, account=ACCOUNT, created=BASE + 500, event_id="evt_d"
            )
        )
        final = build_deleted_customer("cus_HYPO")
    return events, final


def _outcome(events: list[dict[str, Any]], final: dict[str, Any]) -> Any:
    stripe = StripeState()
    stripe.customers["cus_HYPO"] = final
    billing = _billing(stripe=stripe)
    for event in events:
        assert _deliver(billing, event).status_code == 200
    customers = [
        (c.email, c.name, dict(c.metadata), c.link) for c in billing.customers.list("acme")
    ]
    invitation = billing.invitations.get("acme", "cus_HYPO", mode=Mode.TEST)
    sent = [(e.to, mode) for e, mode in _mailer(billing).sent]
    return customers, None if invitation is None else invitation.state, sent


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    updates=st.integers(0, 3),
    deleted=st.booleans(),
    data=st.data(),
)
def test_duplicated_and_reordered_customer_events_end_where_in_order_delivery_ends(
    updates: int, deleted: bool, data: st.DataObject
) -> None:
    """Any order and any duplication of one customer's events yields the in-order result."""
    events, final = _history(updates, deleted)
    copies = [e for e in events for _ in range(data.draw(st.integers(1, 3)))]
    shuffled = data.draw(st.permutations(copies))
    expected = _outcome(events, final)
    assert _outcome(list(shuffled), final) == expected
    customers, state, sent = expected
    assert len(customers) == 1 and state is InvitationState.SENT and len(sent) == 1
    ((email, name, _, link),) = customers
    if deleted:
        assert link is None and email == "v0@example.com"
    else:
        assert link is not None and (email, name) == (f"v{updates}@example.com", f"Name {updates}")


# -- concurrent deliveries on PostgreSQL --------------------------------------------------


@pytest.mark.postgres
@pytest.mark.parametrize("same_event", [True, False], ids=["same event", "distinct events"])
def test_concurrent_deliveries_on_postgres_make_one_customer_and_one_invitation(
    pg_storage_url: str, same_event: bool
) -> None:
    """Eight threads delivering customer.created at once: one customer, one row, one email."""
    storage = SQLStorage(pg_storage_url)
    stripe = StripeState()
    remote = build_customer(id="cus_RACE", email="race@example.com")
    stripe.customers["cus_RACE"] = remote
    billing = _billing(storage, stripe)
    threads = 8
    shared = _created(remote)
    events = [shared if same_event else _created(remote) for _ in range(threads)]
    start = threading.Barrier(threads)

    def deliver(event: dict[str, Any]) -> Any:
        start.wait(timeout=30)
        return _deliver(billing, event)

    try:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            results = list(pool.map(deliver, events))
        assert [r.status_code for r in results] == [200] * threads
        (customer,) = billing.customers.list("acme")
        assert customer.link is not None and customer.link.stripe_customer_id == "cus_RACE"
        invitation = billing.invitations.get("acme", "cus_RACE", mode=Mode.TEST)
        assert invitation is not None and invitation.state is InvitationState.SENT
        assert [e.to for e, _ in _mailer(billing).sent] == ["race@example.com"]
        assert billing.sync.push_pending() == 0
    finally:
        billing.close()


class _RejectingMailer:
    """A mailer whose server refuses every recipient for good."""

    def __init__(self) -> None:
        self.attempts = 0

    def send(self, email: Any, *, mode: Mode) -> None:
        self.attempts += 1
        raise MailRejected(f"the server refused {email.to!r} for good")


def test_a_permanent_refusal_marks_the_invitation_failed_and_stops_retrying() -> None:
    """A 5xx refusal ends the retries: the invitation is kept as failed with its error."""
    mailer = _RejectingMailer()
    billing = _billing(mailer=mailer)  # type: ignore[arg-type]
    _deliver(billing, _created(_held(billing, id="cus_BOUNCE", email="nobody@example.com")))
    invitation = billing.invitations.get("acme", "cus_BOUNCE", mode=Mode.TEST)
    assert invitation is not None
    assert invitation.state is InvitationState.FAILED
    assert "refused" in (invitation.last_error or "")
    assert billing.sync.push_pending() == 0
    assert mailer.attempts == 1


def test_an_invitation_that_keeps_failing_is_given_up_after_max_attempts() -> None:
    """Transient failures are retried with backoff, but never forever."""
    now = [NOW]
    mailer = RecordingMailer(fail_times=10_000)
    config = BillingConfig(test=ModeKeys(secret_key="sk_test_x", webhook_secrets=(SECRET,)))
    billing = Billing(
        config=config,
        storage=InMemoryStorage(),
        mailer=mailer,
        clock=lambda: now[0],
        stripe=StripeState(),
    )
    billing.tenants.connect("acme", ACCOUNT, modes=frozenset({Mode.TEST}))
    _deliver(billing, _created(_held(billing, id="cus_FLAKY", email="flaky@example.com")))
    for _ in range(MAX_ATTEMPTS + 5):
        now[0] += timedelta(hours=2)
        billing.sync.push_pending()
    invitation = billing.invitations.get("acme", "cus_FLAKY", mode=Mode.TEST)
    assert invitation is not None
    assert (invitation.state, invitation.attempts) == (InvitationState.FAILED, MAX_ATTEMPTS)
    assert mailer.attempts == MAX_ATTEMPTS
