"""``has_access`` latency on InMemoryStorage and on SQLite (DESIGN.md §5).

Run it with ``nox -s bench`` or ``python benchmarks/access.py`` (``--help``
for sizes). It stores a tenant with many linked customers, each with a
subscription (some past_due within their grace, some canceled, some disputed)
through the tracker's own mirroring code, then times ``has_access`` for
random (customer, product) pairs, one call at a time, and prints the
percentiles next to the targets: p50 ≤ 5 µs in memory, ≤ 200 µs on SQLite.
Nothing is asserted: these are numbers to compare between runs.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from rational_billing import (
    AccessPolicy,
    Billing,
    BillingConfig,
    Customer,
    CustomerLink,
    Mode,
    ModeKeys,
    Product,
)
from rational_billing.ports import Storage
from rational_billing.storage.sql import SQLStorage
from rational_billing.testing import (
    InMemoryStorage,
    RecordingMailer,
    build_dispute,
    build_invoice,
    build_price,
    build_subscription,
)

TENANT = "bench"
NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
PRODUCTS = ("basic", "pro", "team")
TARGETS_US = {"memory": 5.0, "sqlite": 200.0}


def _billing(storage: Storage) -> Billing:
    config = BillingConfig(test=ModeKeys(secret_key="sk_test_bench", webhook_secrets=("whsec_b",)))
    billing = Billing(
        config=config,
        storage=storage,
        mailer=RecordingMailer(),
        policy=AccessPolicy(past_due_grace=timedelta(days=3)),
        clock=lambda: NOW,
    )
    billing.tenants.connect(TENANT, "acct_1Bench", modes=frozenset({Mode.TEST}))
    return billing


def _populate(billing: Billing, customers: int, seed: int) -> None:
    rng = random.Random(seed)
    with billing.storage.transaction() as tx:
        for product in PRODUCTS:
            tx.put_product(
                Product(TENANT, product, product.title(), stripe_test_product_id=f"prod_{product}")
            )
    tracker = billing.subscriptions
    batch = 200
    for start in range(0, customers, batch):
        with billing.storage.transaction() as tx:
            for n in range(start, min(start + batch, customers)):
                stripe_customer = f"cus_bench{n:07d}"
                tx.put_customer(
                    Customer(
                        id=f"c{n:07d}",
                        tenant=TENANT,
                        email=None,
                        link=CustomerLink(Mode.TEST, stripe_customer),
                        created_at=NOW,
                    )
                )
                product = rng.choice(PRODUCTS)
                status = rng.choices(
                    ["active", "trialing", "past_due", "canceled"], weights=[70, 10, 10, 10]
                )[0]
                invoice_id = f"in_bench{n:07d}"
                sub = build_subscription(
                    customer=stripe_customer,
                    id=f"sub_bench{n:07d}",
                    prices=[build_price(product=f"prod_{product}", id=f"price_{product}")],
                    status=status,
                    latest_invoice=invoice_id,
                )
                marker = NOW - timedelta(days=1)
                tracker.mirror_object(tx, TENANT, Mode.TEST, sub, marker=marker)
                invoice = build_invoice(
                    customer=stripe_customer,
                    id=invoice_id,
                    subscription=sub["id"],
                    status="open" if status == "past_due" else "paid",
                    shape="legacy",
                    charge=f"ch_bench{n:07d}",
                )
                failed = marker if status == "past_due" else None
                tracker.mirror_object(
                    tx, TENANT, Mode.TEST, invoice, marker=marker, failed_at=failed
                )
                if rng.random() < 0.02:
                    dispute = build_dispute(charge=f"ch_bench{n:07d}", status="lost")
                    tracker.mirror_object(tx, TENANT, Mode.TEST, dispute, marker=marker)


def _noop(*args: object) -> None:
    pass


def _time(call: Callable[[], object], repeat: int) -> list[float]:
    timings = []
    clock = time.perf_counter_ns
    for _ in range(repeat):
        start = clock()
        call()
        timings.append((clock() - start) / 1000)
    return timings


def _measure(name: str, storage: Storage, customers: int, calls: int, seed: int) -> None:
    billing = _billing(storage)
    started = time.perf_counter()
    _populate(billing, customers, seed)
    setup = time.perf_counter() - started
    rng = random.Random(seed + 1)
    pairs = [(f"c{rng.randrange(customers):07d}", rng.choice(PRODUCTS)) for _ in range(calls)]
    has_access = billing.subscriptions.has_access
    iterator = iter(pairs * 2)
    _time(lambda: has_access(TENANT, *next(iterator)), min(calls, 1000))  # warm up
    iterator = iter(pairs)
    timings = sorted(_time(lambda: has_access(TENANT, *next(iterator)), calls))
    granted = sum(has_access(TENANT, c, p) for c, p in pairs[:1000])
    # The timing loop itself (the call through a lambda, the clock reads) costs this much:
    iterator = iter(pairs)
    harness = statistics.median(_time(lambda: _noop(TENANT, *next(iterator)), calls))

    def pct(q: float) -> float:
        return timings[min(len(timings) - 1, int(q * len(timings)))]

    target = TARGETS_US[name]
    p50 = statistics.median(timings)
    print(
        f"{name:7} customers={customers:>7} calls={calls:>6} setup={setup:6.1f}s "
        f"p50={p50:8.2f}µs p90={pct(0.9):8.2f}µs p99={pct(0.99):8.2f}µs "
        f"target p50≤{target:g}µs ({p50 / target:.2f} of it) granted={granted / 10:.0f}% "
        f"(timing loop: {harness:.2f}µs per call, included)"
    )
    billing.close()


def main() -> None:
    """Parse the sizes and print one line per storage."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=20_000)
    parser.add_argument("--calls", type=int, default=50_000)
    parser.add_argument("--seed", type=int, default=7)
    args, _ = parser.parse_known_args()  # nox passes the same arguments to every benchmark
    _measure("memory", InMemoryStorage(), args.customers, args.calls, args.seed)
    with tempfile.TemporaryDirectory(prefix="rb-bench-access-") as folder:
        storage = SQLStorage(f"sqlite:///{Path(folder) / 'access.db'}")
        _measure("sqlite", storage, args.customers, max(args.calls // 5, 1), args.seed)


if __name__ == "__main__":
    main()
