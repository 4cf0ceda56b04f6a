"""Four processes on one PostgreSQL database, the same stream with duplicates: no double effects.

Each process builds its own `Billing` and `SQLStorage` (multiprocessing with
``spawn``, as separate hosts would). Two of them call ``handle()`` for every
delivery; the other two call ``receive()`` and run ``process_pending()`` in
between and at the end, so synchronous deliveries, inbox writes and workers
race for the same events. A custom handler leaves a fresh row per
application, so an event applied twice would leave two rows; invitation
emails go to one shared file, so a second email would show there.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from rational_billing import (
    Billing,
    BillingConfig,
    Customer,
    CustomerLink,
    Email,
    EventOutcome,
    Mode,
    ModeKeys,
)
from rational_billing.storage.sql import SQLStorage
from rational_billing.testing import build_customer, make_event, sign_payload

pytestmark = pytest.mark.postgres

SECRET = "whsec_multiprocess"
ACCOUNT = "acct_1MULTIPROC"
PROCESSES = 4
MARKED = ("customer.created", "customer.updated", "invoice.paid")
START = 1_790_000_000


class _FileMailer:
    """Appends one JSON line per email to a file shared by every process."""

    def __init__(self, path: str) -> None:
        self._path = path

    def send(self, email: Email, *, mode: Mode) -> None:
        line = json.dumps({"to": email.to, "message_id": email.message_id, "pid": os.getpid()})
        # One write() of a short line with O_APPEND: lines never interleave.
        fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)


def _email(stripe_id: str) -> str:
    """The email a Stripe customer of the stream has (as the fake Stripe reports it too)."""
    return f"{stripe_id[4:7].lower()}{int(stripe_id[7:])}@example.com"


class _FakeStripe:
    """Answers the calls handlers make after the commit (tagging, re-fetching a customer)."""

    def request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        stripe_id = path.rsplit("/", 1)[-1]
        params = kwargs.get("params") or {}
        return build_customer(
            id=stripe_id, email=_email(stripe_id), metadata=params.get("metadata")
        )

    def list_all(self, *args: Any, **kwargs: Any) -> Any:
        return iter(())


def _billing(url: str, mail_path: str) -> Billing:
    config = BillingConfig(test=ModeKeys(secret_key="sk_test_mp", webhook_secrets=(SECRET,)))
    billing = Billing(
        config=config,
        storage=SQLStorage(url),
        mailer=_FileMailer(mail_path),
        stripe=_FakeStripe(),
    )

    def mark(ctx: Any) -> None:
        # A fresh id per application: an event applied twice leaves two rows.
        marker = f"mark-{ctx.event['id']}-{uuid.uuid4().hex}"
        ctx.tx.insert_customer(Customer(id=marker, tenant=ctx.tenant.id, email=None))

    for event_type in MARKED:
        billing.webhooks.on(event_type)(mark)
    return billing


def _worker(
    role: str, url: str, mail_path: str, stream: list[tuple[bytes, dict[str, str]]], start: Any
) -> dict[str, Any]:
    billing = _billing(url, mail_path)
    statuses: Counter[int] = Counter()
    start.wait(60)
    try:
        for n, (payload, headers) in enumerate(stream):
            if role == "handle":
                statuses[billing.webhooks.handle(payload, headers).status_code] += 1
            else:
                statuses[billing.webhooks.receive(payload, headers).status_code] += 1
                if n % 7 == 0:
                    billing.webhooks.process_pending(limit=5)
        if role == "inbox":
            while billing.webhooks.process_pending(limit=10):
                pass
    finally:
        billing.close()
    return {"role": role, "statuses": statuses}


def _run(args: tuple[Any, ...]) -> dict[str, Any]:
    return _worker(*args)


def _events(rng: random.Random) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    created = START
    for i in range(40):  # customers created in Stripe: one invitation each
        created += 1
        stripe_id = f"cus_NEW{i:03d}"
        obj = build_customer(id=stripe_id, email=_email(stripe_id), metadata={})
        events.append(make_event("customer.created", obj, created=created, account=ACCOUNT))
    for _ in range(100):  # edits of linked customers, in both tenants
        created += 1
        n = rng.randrange(20)
        obj = build_customer(id=f"cus_OLD{n:03d}", email=f"v{created}@example.com")
        account = ACCOUNT if n % 2 else None
        events.append(make_event("customer.updated", obj, created=created, account=account))
    for i in range(80):
        created += 1
        obj = {"id": f"in_{i:04d}", "object": "invoice", "customer": "cus_OLD001"}
        events.append(make_event("invoice.paid", obj, created=created, account=ACCOUNT))
    for i in range(20):  # no handler: recorded as ignored
        events.append(make_event("payout.paid", {"id": f"po_{i}", "object": "payout"}))
    return events


def test_four_processes_apply_every_event_exactly_once(pg_storage_url: str, tmp_path: Path) -> None:
    """4 processes, one shuffled stream with 30% duplicates: each event applied once, one email each."""
    rng = random.Random(20261125)
    mail_path = str(tmp_path / "mail.jsonl")
    setup = _billing(pg_storage_url, mail_path)
    setup.tenants.register_direct("acme", modes=frozenset({Mode.TEST}))
    setup.tenants.connect("beta", ACCOUNT, modes=frozenset({Mode.TEST}))
    with setup.storage.transaction() as tx:
        for n in range(20):
            tenant = "beta" if n % 2 else "acme"
            link = CustomerLink(Mode.TEST, f"cus_OLD{n:03d}")
            tx.put_customer(
                Customer(id=f"old-{n}", tenant=tenant, email="x@example.com", link=link)
            )

    events = _events(rng)
    deliveries = [*events, *rng.sample(events, int(len(events) * 0.3))]
    rng.shuffle(deliveries)
    stream = []
    for event in deliveries:
        payload = json.dumps(event).encode()
        stream.append((payload, sign_payload(payload, SECRET)))

    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        start = manager.Barrier(PROCESSES)
        roles = ["handle", "inbox"] * (PROCESSES // 2)
        jobs = [(role, pg_storage_url, mail_path, stream, start) for role in roles]
        with context.Pool(PROCESSES) as pool:
            results = pool.map(_run, jobs)

    for result in results:
        assert set(result["statuses"]) == {200}, result
    by_id = {e["id"]: e for e in events}
    with setup.storage.transaction() as tx:
        stored = list(tx.list_events(limit=10_000))
        markers = Counter(
            c.id.rsplit("-", 1)[0].removeprefix("mark-")
            for tenant in ("acme", "beta")
            for c in tx.list_customers(tenant, after=None, limit=10_000)
            if c.id.startswith("mark-")
        )
        created_links = [
            tx.customer_by_link("beta", Mode.TEST, f"cus_NEW{i:03d}") for i in range(40)
        ]
        beta = [c for c in tx.list_customers("beta", after=None, limit=10_000)]
    setup.close()

    # Every event stored once, and settled: nothing pending or failed is left behind.
    assert sorted(e.event_id for e in stored) == sorted(by_id)
    outcomes = Counter(e.outcome for e in stored)
    assert outcomes[EventOutcome.PENDING] == outcomes[EventOutcome.FAILED] == 0
    assert all((e.attempts, e.claims) == (1, 0) for e in stored if e.type in MARKED)
    # Every handled event applied exactly once.
    assert markers == {eid: 1 for eid, e in by_id.items() if e["type"] in MARKED}
    # One local customer and one invitation email per Stripe-created customer.
    assert all(c is not None for c in created_links)
    new_rows = [c for c in beta if c.link and c.link.stripe_customer_id.startswith("cus_NEW")]
    assert len(new_rows) == 40
    lines = [json.loads(line) for line in Path(mail_path).read_text().splitlines()]
    assert Counter(line["to"] for line in lines) == {f"new{i}@example.com": 1 for i in range(40)}
    assert len({line["message_id"] for line in lines}) == 40
