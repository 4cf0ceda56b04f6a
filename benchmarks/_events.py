"""Signed webhook deliveries for the benchmarks: realistic bodies, mixed types, duplicates.

Bodies are Stripe's own example objects from ``../shared/stripe-fixtures``
(with fresh ids that point at each other: a subscription's customer, an
invoice's subscription, a refund's charge); without that file the package's
testing builders are used and a message says so.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs

from rational_billing.testing import build_customer, make_event, sign_payload

FIXTURES = (
    Path(__file__).resolve().parents[2] / "shared" / "stripe-fixtures" / "openapi-fixtures3.json"
)

SECRET = "whsec_benchmark_secret"
#: Connected accounts the events are spread over (plus the platform's own, direct).
ACCOUNTS = tuple(f"acct_1BENCH{i:04d}" for i in range(8))
CUSTOMERS_PER_ACCOUNT = 400

#: Event types and their share of the stream, roughly as a subscription
#: business sees them (payments and invoices dominate).
MIX: Mapping[str, int] = {
    "customer.created": 4,
    "customer.updated": 14,
    "customer.subscription.created": 4,
    "customer.subscription.updated": 12,
    "customer.subscription.deleted": 2,
    "invoice.created": 6,
    "invoice.finalized": 6,
    "invoice.paid": 10,
    "invoice.payment_succeeded": 10,
    "invoice.payment_failed": 2,
    "invoice_payment.paid": 6,
    "payment_intent.succeeded": 10,
    "charge.succeeded": 10,
    "charge.refunded": 1,
    "charge.dispute.created": 1,
    "refund.created": 1,
    "product.updated": 1,
}

_RESOURCE = {
    "customer": "customer",
    "customer.subscription": "subscription",
    "invoice": "invoice",
    "invoice_payment": "invoice_payment",
    "payment_intent": "payment_intent",
    "charge.dispute": "dispute",
    "charge": "charge",
    "refund": "refund",
    "product": "product",
}


@attrs.frozen
class Delivery:
    """One signed delivery: the body, its headers, and what it is about."""

    payload: bytes
    headers: Mapping[str, str]
    event_id: str
    type: str
    account: str | None
    object_id: str


def load_fixtures() -> dict[str, Any] | None:
    """Stripe's example objects, or None (with a message) when the shared file is absent."""
    if not FIXTURES.exists():
        print(f"note: {FIXTURES} is absent; building bodies with rational_billing.testing")
        return None
    resources: dict[str, Any] = json.loads(FIXTURES.read_text())["resources"]
    return resources


def _resource_of(event_type: str) -> str:
    prefix = event_type.rsplit(".", 1)[0]
    return _RESOURCE[prefix]


def customers_of(account: str | None) -> list[str]:
    """The Stripe customer ids the deliveries use for ``account`` (None: the platform's own)."""
    index = 0 if account is None else ACCOUNTS.index(account) + 1
    return [f"cus_B{index:03d}{j:05d}" for j in range(CUSTOMERS_PER_ACCOUNT)]


class _World:
    """Consistent ids: customers per account, and the objects that point at them."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.customers = {account: customers_of(account) for account in (None, *ACCOUNTS)}
        self.counter = 0

    def fresh(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}_1Bench{self.counter:010d}"


def _object(
    fixtures: dict[str, Any] | None, resource: str, world: _World, account: str | None, created: int
) -> dict[str, Any]:
    customer = world.rng.choice(world.customers[account])
    number = int(customer[-5:])
    if resource == "customer":
        if fixtures is None:
            return build_customer(id=customer, email=f"c{number}@example.com", created=created)
        obj: dict[str, Any] = copy.deepcopy(fixtures["customer"])
        obj.update(id=customer, email=f"c{number}@example.com", name=f"Customer {number}")
        return obj
    if fixtures is None:
        prefix = {"subscription": "sub", "invoice": "in", "charge": "ch", "refund": "re"}
        return {
            "id": world.fresh(prefix.get(resource, resource[:3])),
            "object": resource,
            "customer": customer,
            "created": created,
            "livemode": False,
            "status": "active",
            "metadata": {},
        }
    obj = dict(copy.deepcopy(fixtures[resource]))
    # Few subscriptions per customer, so updates hit the same rows again.
    subscription = f"sub_1B{customer[4:]}{number % 3}"
    ids = {
        "subscription": subscription,
        "invoice": world.fresh("in"),
        "invoice_payment": world.fresh("inpay"),
        "payment_intent": world.fresh("pi"),
        "charge": world.fresh("ch"),
        "dispute": world.fresh("dp"),
        "refund": world.fresh("re"),
        "product": f"prod_BENCH{number % 20:02d}",
    }
    obj["id"] = ids[resource]
    obj["created"] = created
    if "customer" in obj:
        obj["customer"] = customer
    if resource == "invoice":
        obj["parent"] = {
            "type": "subscription_details",
            "quote_details": None,
            "subscription_details": {"metadata": {}, "subscription": subscription},
        }
    elif resource == "invoice_payment":
        obj["invoice"] = world.fresh("in")
        obj["payment"] = {"type": "payment_intent", "payment_intent": world.fresh("pi")}
    elif resource in ("dispute", "refund"):
        obj["charge"] = world.fresh("ch")
    return obj


def build(count: int, *, seed: int = 5, now: int | None = None) -> list[Delivery]:
    """``count`` distinct signed deliveries of mixed types, in ``created`` order."""
    rng = random.Random(seed)
    fixtures = load_fixtures()
    world = _World(rng)
    types = list(MIX)
    weights = [MIX[t] for t in types]
    stamp = int(time.time()) if now is None else now
    start = stamp - count
    deliveries = []
    for n in range(count):
        event_type = rng.choices(types, weights)[0]
        account = rng.choice((None, *ACCOUNTS))
        created = start + n
        obj = _object(fixtures, _resource_of(event_type), world, account, created)
        event = make_event(
            event_type,
            obj,
            account=account,
            created=created,
            event_id=f"evt_1Bench{n:010d}",
        )
        payload = json.dumps(event).encode()
        headers = sign_payload(payload, SECRET, timestamp=stamp)
        deliveries.append(
            Delivery(payload, headers, event["id"], event_type, account, str(obj["id"]))
        )
    return deliveries


def with_duplicates(
    deliveries: list[Delivery], share: float = 0.3, *, seed: int = 7
) -> list[Delivery]:
    """The stream Stripe would send: every delivery, ``share`` of them again, shuffled."""
    rng = random.Random(seed)
    again = rng.sample(deliveries, int(len(deliveries) * share))
    stream = [*deliveries, *again]
    rng.shuffle(stream)
    return stream


def slices(stream: list[Delivery], parts: int) -> Iterator[list[Delivery]]:
    """``parts`` interleaved slices, so that duplicates land in different processes."""
    for i in range(parts):
        yield stream[i::parts]


def stream_arguments(description: str) -> argparse.ArgumentParser:
    """A parser with the options every webhook benchmark takes: the stream's size and rounds."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--events", type=int, default=20_000, help="distinct events (20000)")
    parser.add_argument("--duplicates", type=float, default=0.3, help="share delivered twice (0.3)")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds (10)")
    return parser
