"""Replay: stored events applied again through the handlers, idempotently, from code and the CLI."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import attrs
import pytest

from rational_billing import BillingConfig, EventOutcome, ModeKeys
from rational_billing.billing import Billing
from rational_billing.cli import main
from rational_billing.errors import InvalidArgument
from rational_billing.storage.sql import SQLStorage
from rational_billing.testing import (
    InMemoryStorage,
    RecordingMailer,
    build_customer,
    make_event,
    sign_payload,
)
from tests.helpers import NoStripe, link_directly, stored_event

SECRET = "whsec_test_replay"
T0 = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


class _Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


def _config(storage_url: str = "memory://") -> BillingConfig:
    return BillingConfig(
        test=ModeKeys(secret_key="sk_test_abc", webhook_secrets=(SECRET,)),
        storage_url=storage_url,
    )


def _billing(storage: Any, clock: _Clock, mailer: RecordingMailer | None = None) -> Billing:
    billing = Billing(
        config=_config(),
        storage=storage,
        mailer=mailer if mailer is not None else RecordingMailer(),
        clock=clock,
        stripe=NoStripe(),
    )
    billing.tenants.register_direct("acme")
    return billing


@pytest.fixture
def clock() -> _Clock:
    """A hand-moved clock starting at T0."""
    return _Clock()


@pytest.fixture
def mailer() -> RecordingMailer:
    """Records invitation emails."""
    return RecordingMailer()


@pytest.fixture
def billing(clock: _Clock, mailer: RecordingMailer) -> Billing:
    """A Billing on InMemoryStorage with the direct tenant 'acme'."""
    return _billing(InMemoryStorage(), clock, mailer)


def _deliver(billing: Billing, event: dict[str, Any]) -> Any:
    payload = json.dumps(event).encode()
    headers = sign_payload(payload, SECRET, timestamp=int(billing.clock().timestamp()))
    return billing.webhooks.handle(payload, headers)


def _updated(stripe_id: str, email: str) -> dict[str, Any]:
    obj = build_customer(id=stripe_id, email=email, name="New")
    return make_event("customer.updated", obj, created=int(T0.timestamp()))


def test_replay_applies_an_event_that_found_nothing_to_change(billing: Billing) -> None:
    """An event ignored because no customer was linked yet takes effect when replayed."""
    event = _updated("cus_A1", "new@example.com")
    assert _deliver(billing, event).outcome is EventOutcome.IGNORED
    customer = link_directly(billing, "cus_A1")
    report = billing.webhooks.replay([event["id"]])
    assert (report.replayed, dict(report.outcomes)) == (1, {EventOutcome.APPLIED: 1})
    assert (report.failed, report.missing) == ((), ())
    assert billing.customers.get("acme", customer.id).email == "new@example.com"
    stored = stored_event(billing, event["id"])
    assert (stored.outcome, stored.attempts) == (EventOutcome.APPLIED, 2)


def test_replaying_customer_created_never_invites_twice(
    billing: Billing, mailer: RecordingMailer
) -> None:
    """A Stripe-created customer replayed twice still has one local customer and one email."""
    obj = build_customer(id="cus_NEW1", email="ada@example.com", name="Ada")
    event = make_event("customer.created", obj, created=int(T0.timestamp()) - 60)
    assert _deliver(billing, event).status_code == 200
    for _ in range(2):
        report = billing.webhooks.replay([event["id"]])
        assert report.replayed == 1
        assert report.failed == ()
    linked = [c for c in billing.customers.list("acme") if c.link is not None]
    assert [c.link.stripe_customer_id for c in linked if c.link] == ["cus_NEW1"]
    assert [sent.email.to for sent in mailer.sent] == ["ada@example.com"]


def test_replaying_an_applied_update_changes_nothing_more(billing: Billing) -> None:
    """Replaying an applied customer.updated leaves the same state as one delivery."""
    customer = link_directly(billing, "cus_A1")
    event = _updated("cus_A1", "new@example.com")
    _deliver(billing, event)
    before = billing.customers.get("acme", customer.id)
    report = billing.webhooks.replay([event["id"]])
    assert report.replayed == 1
    assert billing.customers.get("acme", customer.id) == before


def test_replay_selects_by_time_and_type(billing: Billing, clock: _Clock) -> None:
    """since and types narrow the replay to events received at or after a time, of those types."""
    seen: list[tuple[str, str]] = []

    @billing.webhooks.on("customer.updated")
    @billing.webhooks.on("invoice.paid")
    def record(ctx: Any) -> None:
        seen.append((ctx.type, ctx.event["id"]))

    early = _updated("cus_A1", "a@example.com")
    _deliver(billing, early)
    clock.now = T0 + timedelta(hours=1)
    late = _updated("cus_A1", "b@example.com")
    _deliver(billing, late)
    paid = make_event("invoice.paid", {"id": "in_1", "object": "invoice"}, created=1)
    _deliver(billing, paid)
    seen.clear()

    report = billing.webhooks.replay(since=T0 + timedelta(minutes=30))
    # Both were received at the same instant: which goes first is the storage's order.
    assert sorted(seen) == sorted([("customer.updated", late["id"]), ("invoice.paid", paid["id"])])
    assert report.replayed == 2
    seen.clear()
    billing.webhooks.replay(types=["customer.updated"])
    assert seen == [("customer.updated", early["id"]), ("customer.updated", late["id"])]
    seen.clear()
    billing.webhooks.replay([paid["id"], early["id"]], types=["customer.updated"])
    assert seen == [("customer.updated", early["id"])]


def test_replay_walks_every_page(billing: Billing) -> None:
    """A replay of more events than one page applies every one of them once."""
    events = [
        make_event("invoice.paid", {"id": f"in_{i}", "object": "invoice"}) for i in range(230)
    ]
    for event in events:
        assert _deliver(billing, event).outcome is EventOutcome.IGNORED  # no handler yet
    seen: list[str] = []

    @billing.webhooks.on("invoice.paid")
    def record(ctx: Any) -> None:
        seen.append(ctx.event["id"])

    report = billing.webhooks.replay(types=["invoice.paid"])
    assert report.replayed == 230
    assert sorted(seen) == sorted(e["id"] for e in events)


def test_replay_reports_unknown_ids(billing: Billing) -> None:
    """Ids that are not stored are listed as missing; the others are replayed."""
    event = _updated("cus_A1", "a@example.com")
    _deliver(billing, event)
    report = billing.webhooks.replay(["evt_unknown", event["id"]])
    assert (report.replayed, report.missing) == (1, ("evt_unknown",))


def test_replay_failure_rolls_back_and_is_recorded(billing: Billing, clock: _Clock) -> None:
    """A handler raising during replay rolls its effects back, and the event is failed with a retry."""
    customer = link_directly(billing, "cus_A1")
    event = _updated("cus_A1", "first@example.com")
    _deliver(billing, event)
    with billing.storage.transaction() as tx:
        current = tx.get_customer("acme", customer.id)
        tx.put_customer(attrs.evolve(current, email="changed@example.com", stripe_marker=None))

    @billing.webhooks.on("customer.updated")
    def broken(ctx: Any) -> None:
        raise RuntimeError("handler bug")

    report = billing.webhooks.replay([event["id"]])
    assert report.failed == (event["id"],)
    assert dict(report.outcomes) == {EventOutcome.FAILED: 1}
    assert billing.customers.get("acme", customer.id).email == "changed@example.com"
    stored = stored_event(billing, event["id"])
    assert stored.outcome is EventOutcome.FAILED
    assert "handler bug" in stored.reason
    assert stored.next_attempt_at == clock.now + timedelta(seconds=60)  # second attempt failed


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ("evt_1", {}),
        (None, {"types": "invoice.paid"}),
        (None, {"since": datetime(2026, 1, 1)}),
    ],
)
def test_replay_rejects_ambiguous_arguments(
    billing: Billing, args: Any, kwargs: dict[str, Any]
) -> None:
    """A bare string instead of a list, or a naive datetime, raises InvalidArgument."""
    with pytest.raises(InvalidArgument):
        billing.webhooks.replay(args, **kwargs)


# -- the command line -----------------------------------------------------------------


def _env(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    for name in ("RB_LIVE_SECRET_KEY", "RB_API_BASE", "RB_WEBHOOK_TOLERANCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RB_TEST_SECRET_KEY", "sk_test_abc")
    monkeypatch.setenv("RB_TEST_WEBHOOK_SECRETS", SECRET)
    monkeypatch.setenv("RB_STORAGE_URL", url)


def test_cli_replays_an_event_by_id(
    tmp_path: Path,
    clock: _Clock,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`rational-billing events replay --id` applies the stored event with the configured storage."""
    url = f"sqlite:///{tmp_path / 'billing.db'}"
    billing = _billing(SQLStorage(url), clock)
    event = _updated("cus_A1", "cli@example.com")
    assert _deliver(billing, event).outcome is EventOutcome.IGNORED
    customer = link_directly(billing, "cus_A1")
    billing.close()

    _env(monkeypatch, url)
    assert main(["events", "replay", "--id", event["id"]]) == 0
    assert "replayed 1 event(s): 1 applied" in capsys.readouterr().out
    after = SQLStorage(url)
    with after.transaction() as tx:
        assert tx.get_customer("acme", customer.id).email == "cli@example.com"
    after.close()


def test_cli_filters_by_type_and_since_and_reports_missing(
    tmp_path: Path,
    clock: _Clock,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--type and --since select events; an unknown --id makes the exit status 1."""
    url = f"sqlite:///{tmp_path / 'billing.db'}"
    billing = _billing(SQLStorage(url), clock)
    _deliver(billing, _updated("cus_A1", "a@example.com"))
    billing.close()
    _env(monkeypatch, url)

    assert main(["events", "replay", "--type", "customer.updated", "--since", "2026-11-25"]) == 0
    assert "replayed 1 event(s)" in capsys.readouterr().out
    assert main(["events", "replay", "--since", "2026-11-26T00:00:00Z"]) == 0
    assert "replayed 0 event(s)" in capsys.readouterr().out
    assert main(["events", "replay", "--id", "evt_nope"]) == 1
    assert "evt_nope is not stored" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["events", "replay"], "pass --since, --type or --id"),
        (["events", "replay", "--since", "yesterday"], "not an ISO 8601 time"),
    ],
)
def test_cli_refuses_unbounded_or_malformed_replays(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
) -> None:
    """Without a filter, or with a malformed time, the command exits 2 and replays nothing."""
    _env(monkeypatch, f"sqlite:///{tmp_path / 'billing.db'}")
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "billing.db").exists()
