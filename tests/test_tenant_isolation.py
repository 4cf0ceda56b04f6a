"""Tenant and mode isolation of webhooks (§4.3), with adversarial ``account`` values.

Four tenants hold customers linked to the *same* Stripe customer id, in both
modes: ``alpha`` (connected as acct_A), ``beta`` (acct_B), ``solo`` (the direct
tenant) and ``gone`` (acct_C, disconnected). Every event is validly signed; only
its ``account``, ``livemode`` and signing secret vary. The properties:

- an event for one account changes at most that account's tenant, and only the
  record in the event's mode;
- a test event never changes a live record;
- a ``livemode=true`` event verified only by a test secret is rejected;
- an unknown, malformed or disconnected account changes nobody.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rational_billing import (
    Billing,
    BillingConfig,
    Customer,
    CustomerLink,
    EventOutcome,
    Mode,
    ModeKeys,
    Storage,
)
from rational_billing.testing import (
    InMemoryStorage,
    RecordingMailer,
    build_customer,
    make_event,
    sign_payload,
)
from tests.helpers import NoStripe

TEST_SECRET = "whsec_iso_test"
LIVE_SECRET = "whsec_iso_live"
NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
TS = int(NOW.timestamp())
SHARED_ID = "cus_SHARED"
ACCOUNTS = {"alpha": "acct_A", "beta": "acct_B", "gone": "acct_C"}
DIRECT = "solo"
TENANTS = ("alpha", "beta", DIRECT, "gone")
#: The tenant an exact account value routes to (None: the disconnected one, ignored).
ROUTES: dict[str, str | None] = {"acct_A": "alpha", "acct_B": "beta", "acct_C": None}
_ABSENT: Any = object()
NUL_ACCOUNT = "acct_A\u0000"

#: Values that look like, contain or imitate a connected account, but are not one.
ADVERSARIAL = [
    "acct_a",
    "ACCT_A",
    "acct_A ",
    " acct_A",
    "acct_A\u0000",
    "acct_A\u0001",
    "acct_A\n",
    "acct_A\u200b",
    "acct_\uff21",  # fullwidth A
    "acct_AB",
    "acct_",
    "acct_A,acct_B",
    "acct_B/acct_A",
    "acct_A\\",
    "acct_1UNKNOWN",
    "acct_C_",
    "",
    "A",
    0,
    1,
    True,
    False,
    1.5,
    [],
    ["acct_A"],
    {"id": "acct_A"},
    {"account": "acct_B"},
]


def _platform(storage: Storage) -> tuple[Billing, dict[tuple[str, Mode], str]]:
    """The four tenants, each with a customer linked to cus_SHARED in each mode."""
    config = BillingConfig(
        test=ModeKeys(secret_key="sk_test_iso", webhook_secrets=(TEST_SECRET,)),
        live=ModeKeys(secret_key="sk_live_iso", webhook_secrets=(LIVE_SECRET,)),
    )
    billing = Billing(
        config=config,
        storage=storage,
        mailer=RecordingMailer(),
        clock=lambda: NOW,
        stripe=NoStripe(),
    )
    both = frozenset(Mode)
    for tenant, account in ACCOUNTS.items():
        billing.tenants.connect(tenant, account, modes=both)
    billing.tenants.register_direct(DIRECT, modes=both)
    ids: dict[tuple[str, Mode], str] = {}
    for tenant in TENANTS:
        for mode in Mode:
            customer = billing.customers.create(
                tenant, email="old@example.com", name=f"{tenant} {mode.value}"
            )
            with storage.transaction() as tx:
                tx.put_customer(attrs.evolve(customer, link=CustomerLink(mode, SHARED_ID)))
            ids[(tenant, mode)] = customer.id
    billing.tenants.disconnect("gone")
    return billing, ids


def _state(billing: Billing, ids: dict[tuple[str, Mode], str]) -> dict[tuple[str, Mode], Customer]:
    return {key: billing.customers.get(key[0], cid) for key, cid in ids.items()}


def _deliver(
    billing: Billing,
    account: Any,
    *,
    livemode: bool,
    secret: str,
    email: str,
    created: int = TS,
) -> Any:
    event = make_event(
        "customer.updated",
        build_customer(id=SHARED_ID, email=email, livemode=livemode),
        created=created,
        livemode=livemode,
    )
    if account is not _ABSENT:
        event["account"] = account
    payload = json.dumps(event).encode()
    return billing.webhooks.handle(payload, sign_payload(payload, secret, timestamp=TS))


def _well_formed_unknown(account: Any) -> bool:
    return (
        isinstance(account, str)
        and account not in ROUTES
        and account.startswith("acct_")
        and account[5:].isascii()
        and account[5:].isalnum()
    )


def _changed(
    before: dict[tuple[str, Mode], Customer], after: dict[tuple[str, Mode], Customer]
) -> set[tuple[str, Mode]]:
    return {key for key in before if before[key] != after[key]}


# -- properties (hypothesis, InMemoryStorage) --------------------------------------------

accounts = st.one_of(
    st.sampled_from([_ABSENT, None, *ROUTES, *ADVERSARIAL]),
    st.from_regex(r"acct_[A-Za-z0-9]{1,24}", fullmatch=True),
    st.text(max_size=12).map(lambda s: "acct_" + s),
    st.text(max_size=12),
    st.integers(),
    st.lists(st.sampled_from([*ROUTES, "x"]), max_size=3),
)


@attrs.frozen
class Delivery:
    """One signed delivery: who it claims to be for, in which mode, signed with what."""

    account: Any
    livemode: bool
    secret: str


deliveries = st.builds(
    Delivery,
    account=accounts,
    livemode=st.booleans(),
    secret=st.sampled_from([TEST_SECRET, LIVE_SECRET]),
)


@settings(max_examples=150)
@given(stream=st.lists(deliveries, min_size=1, max_size=8))
def test_events_change_only_their_own_tenant_and_mode(stream: list[Delivery]) -> None:
    """Any stream of signed events leaves each tenant exactly as its own events alone would."""
    billing, ids = _platform(InMemoryStorage())
    expected = {key: "old@example.com" for key in ids}
    for n, delivery in enumerate(stream):
        email = f"e{n}@example.com"
        mode = Mode.from_livemode(delivery.livemode)
        before = _state(billing, ids)
        response = _deliver(
            billing,
            delivery.account,
            livemode=delivery.livemode,
            secret=delivery.secret,
            email=email,
            created=TS + n,
        )
        changed = _changed(before, _state(billing, ids))
        if delivery.livemode and delivery.secret == TEST_SECRET:
            assert response.status_code == 400
            assert changed == set()
            continue
        if delivery.account is _ABSENT:
            target: str | None = DIRECT
        elif isinstance(delivery.account, str) and delivery.account in ROUTES:
            target = ROUTES[delivery.account]
        elif delivery.account is None:
            # A null account is either the platform's own (direct) or rejected, nothing else.
            target = DIRECT if response.outcome is EventOutcome.APPLIED else None
        else:
            target = None
        if target is not None:
            assert (response.status_code, response.outcome) == (200, EventOutcome.APPLIED)
            expected[(target, mode)] = email
            assert changed == {(target, mode)}
        else:
            assert changed == set()
            if _well_formed_unknown(delivery.account):
                assert (response.status_code, response.outcome) == (200, EventOutcome.HELD)
            elif delivery.account == "acct_C":
                assert (response.status_code, response.outcome) == (200, EventOutcome.IGNORED)
            else:
                assert response.status_code in (200, 400)
                assert response.outcome in (None, EventOutcome.HELD)
    assert {key: c.email for key, c in _state(billing, ids).items()} == expected


@settings(max_examples=100)
@given(account=accounts, secret=st.sampled_from([TEST_SECRET, LIVE_SECRET]))
def test_test_event_never_changes_a_live_record(account: Any, secret: str) -> None:
    """A livemode=false event, whatever its account and secret, leaves every live-linked customer alone."""
    billing, ids = _platform(InMemoryStorage())
    before = _state(billing, ids)
    _deliver(billing, account, livemode=False, secret=secret, email="test@example.com")
    changed = _changed(before, _state(billing, ids))
    assert all(mode is Mode.TEST for _, mode in changed)


@settings(max_examples=100)
@given(account=accounts)
def test_live_event_verified_only_by_a_test_secret_is_rejected(account: Any) -> None:
    """A livemode=true event signed only with a test secret gets 400 and changes nothing, for any account."""
    billing, ids = _platform(InMemoryStorage())
    before = _state(billing, ids)
    response = _deliver(billing, account, livemode=True, secret=TEST_SECRET, email="x@example.com")
    assert response.status_code == 400
    assert _state(billing, ids) == before


def test_duplicate_account_keys_route_to_one_tenant_only() -> None:
    """A body naming two accounts (duplicate JSON keys) changes at most one tenant."""
    billing, ids = _platform(InMemoryStorage())
    before = _state(billing, ids)
    event = make_event(
        "customer.updated", build_customer(id=SHARED_ID, email="dup@example.com"), created=TS
    )
    text = json.dumps(event)
    payload = (text[:-1] + ', "account": "acct_A", "account": "acct_B"}').encode()
    response = billing.webhooks.handle(payload, sign_payload(payload, TEST_SECRET, timestamp=TS))
    changed = _changed(before, _state(billing, ids))
    assert response.status_code in (200, 400)
    assert len(changed) <= 1
    assert changed <= {("alpha", Mode.TEST), ("beta", Mode.TEST)}


def test_held_event_is_applied_only_to_the_tenant_that_connects_its_account() -> None:
    """An event held for an unknown account changes nobody until that account connects, then only its tenant."""
    billing, ids = _platform(InMemoryStorage())
    before = _state(billing, ids)
    response = _deliver(
        billing, "acct_NEWCOMER", livemode=False, secret=TEST_SECRET, email="held@example.com"
    )
    assert response.outcome is EventOutcome.HELD
    billing.tenants.connect("beta", "acct_B", modes=frozenset(Mode))  # reconnecting someone else
    assert _state(billing, ids) == before
    # A new tenant with a linked customer, not connected yet (no public API registers one).
    with billing.storage.transaction() as tx:
        tx.put_tenant(
            attrs.evolve(billing.tenants.get("alpha"), id="delta", stripe_account_id=None)
        )
    customer = billing.customers.create("delta", email="old@example.com")
    with billing.storage.transaction() as tx:
        tx.put_customer(attrs.evolve(customer, link=CustomerLink(Mode.TEST, SHARED_ID)))
    billing.tenants.connect("delta", "acct_NEWCOMER", modes=frozenset(Mode))
    assert billing.customers.get("delta", customer.id).email == "held@example.com"
    assert _state(billing, ids) == before


def test_event_for_a_disconnected_tenant_changes_nothing() -> None:
    """An event for the account of a disconnected tenant is acknowledged, ignored and changes nothing."""
    billing, ids = _platform(InMemoryStorage())
    before = _state(billing, ids)
    for livemode, secret in ((False, TEST_SECRET), (True, LIVE_SECRET)):
        response = _deliver(
            billing, "acct_C", livemode=livemode, secret=secret, email="x@example.com"
        )
        assert (response.status_code, response.outcome) == (200, EventOutcome.IGNORED)
    assert _state(billing, ids) == before


# -- the same table against every storage backend ---------------------------------------


@pytest.fixture(
    params=[
        "memory",
        "sqlite",
        pytest.param("postgres", marks=pytest.mark.postgres),
    ]
)
def make_storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], Storage]]:
    """Builds a fresh storage of each backend."""
    opened: list[Storage] = []

    def build() -> Storage:
        if request.param == "memory":
            storage: Storage = InMemoryStorage()
        else:
            from rational_billing.storage.sql import SQLStorage

            if request.param == "sqlite":
                url = f"sqlite:///{tmp_path / f'iso{len(opened)}.db'}"
            else:
                url = request.getfixturevalue("pg_storage_url")
            storage = SQLStorage(url)
        opened.append(storage)
        return storage

    yield build
    for storage in opened:
        storage.close()


@pytest.mark.parametrize("livemode", [False, True], ids=["test", "live"])
def test_adversarial_accounts_change_nobody_on_every_backend(
    make_storage: Callable[[], Storage], livemode: bool
) -> None:
    """Each adversarial account value, on each storage backend, changes no tenant at all."""
    billing, ids = _platform(make_storage())
    secret = LIVE_SECRET if livemode else TEST_SECRET
    before = _state(billing, ids)
    # NUL has its own test below: PostgreSQL cannot store it at all.
    for n, account in enumerate([*(a for a in ADVERSARIAL if a != NUL_ACCOUNT), "acct_C"]):
        response = _deliver(
            billing, account, livemode=livemode, secret=secret, email=f"a{n}@example.com"
        )
        assert response.status_code in (200, 400), (account, response)
        if _well_formed_unknown(account):
            assert response.outcome is EventOutcome.HELD, (account, response)
    assert _state(billing, ids) == before
    for n, (account, tenant) in enumerate((("acct_A", "alpha"), (_ABSENT, DIRECT))):
        response = _deliver(
            billing, account, livemode=livemode, secret=secret, email=f"ok{n}@example.com"
        )
        assert response.outcome is EventOutcome.APPLIED
        mode = Mode.from_livemode(livemode)
        assert _changed(before, _state(billing, ids)) >= {(tenant, mode)}
    assert _changed(before, _state(billing, ids)) == {("alpha", mode), (DIRECT, mode)}


@pytest.mark.parametrize(
    "backend",
    [
        "memory",
        "sqlite",
        pytest.param("postgres", marks=pytest.mark.postgres),
    ],
)
def test_account_with_a_nul_byte_is_answered_without_a_server_error(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """A signed event whose account is 'acct_A' plus a NUL byte gets 200 or 400, never 500, and changes nobody."""
    if backend == "memory":
        storage: Storage = InMemoryStorage()
    else:
        from rational_billing.storage.sql import SQLStorage

        url = (
            f"sqlite:///{tmp_path / 'nul.db'}"
            if backend == "sqlite"
            else request.getfixturevalue("pg_storage_url")
        )
        storage = SQLStorage(url)
    try:
        billing, ids = _platform(storage)
        before = _state(billing, ids)
        response = _deliver(
            billing, NUL_ACCOUNT, livemode=False, secret=TEST_SECRET, email="nul@example.com"
        )
        assert response.status_code in (200, 400), response
        assert _state(billing, ids) == before
    finally:
        storage.close()
