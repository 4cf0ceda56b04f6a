"""Webhook ingest benchmark: floors and our code, measured in one run (DESIGN.md §5).

Run it with ``nox -s bench`` (or ``python benchmarks/webhooks.py``; ``--help``
for sizes). It builds signed deliveries of mixed, realistic types from
``../shared/stripe-fixtures`` (30% of them delivered twice, shuffled), then
measures, one after the other on the same machine:

floors (written plainly, not tuned):
  parse    header parse + HMAC-SHA256 + ``json.loads``, per delivery;
  sqlite   the same, plus insert-if-absent of the event id and an upsert of
           the object's JSON guarded by the event time, through raw
           ``sqlite3``, one transaction per delivery, a WAL file;
  pg       the same statements through raw psycopg in 4 processes, one
           savepoint per delivery, committed in batches of 50;
ours:
  memory   ``billing.webhooks.handle()`` on InMemoryStorage;
  sqlite   ``handle()`` on SQLStorage over a SQLite file (WAL);
  pg       ``handle()`` in 4 processes on one PostgreSQL database;
  inbox    ``receive()`` in 4 processes, then ``process_pending()`` in 4
           worker processes, on PostgreSQL.

It prints deliveries per second, each ratio to its floor against the target,
and the duplicate effects found (must be 0): a custom ``invoice.paid`` handler
leaves one fresh row per application, so an event applied twice shows up as
two rows; invitation emails are counted per message id when that handler
exists.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import logging
import multiprocessing
import pickle
import sqlite3
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from queue import Empty
from typing import Any

import _events
import _pg
import attrs
from _events import SECRET, Delivery

from rational_billing import Billing, BillingConfig, Customer, CustomerLink, Mode, ModeKeys
from rational_billing.testing import InMemoryStorage, RecordingMailer

TOLERANCE = 24 * 3600  # the deliveries are signed once, before the run
WORKERS = 4
BATCH = 50
MARKED_TYPE = "invoice.paid"


# -- results ---------------------------------------------------------------------------


@attrs.frozen
class Result:
    """One measured phase."""

    name: str
    deliveries: int
    seconds: float
    floor: Result | None = None
    target: str = ""
    notes: str = ""

    @property
    def rate(self) -> float:
        return self.deliveries / self.seconds

    @property
    def micros(self) -> float:
        return self.seconds / self.deliveries * 1e6

    def ratio(self) -> tuple[str, bool | None]:
        if self.floor is None:
            return "", None
        if self.target.startswith("<="):
            ratio = self.micros / self.floor.micros
            return f"{ratio:.2f}x time", ratio <= float(self.target[2:].rstrip("x"))
        ratio = self.rate / self.floor.rate
        return f"{ratio:.0%} rate", ratio >= float(self.target[2:].rstrip("%")) / 100


def _report(results: Sequence[Result]) -> None:
    print()
    print(
        f"{'phase':<34}{'deliveries':>11}{'seconds':>9}{'per s':>9}{'us each':>9}"
        f"  {'vs floor':<13}{'target':<13}ok"
    )
    for r in results:
        ratio, ok = r.ratio()
        flag = "" if ok is None else ("yes" if ok else "NO")
        target = (
            "" if not r.target else (f"{r.target} time" if "x" in r.target else f"{r.target} rate")
        )
        print(
            f"{r.name:<34}{r.deliveries:>11}{r.seconds:>9.2f}{r.rate:>9.0f}{r.micros:>9.1f}"
            f"  {ratio:<13}{target:<13}{flag}"
        )
        if r.notes:
            print(f"{'':<4}{r.notes}")


# -- the floors --------------------------------------------------------------------------


def _floor_parse(delivery: Delivery, key: bytes) -> dict[str, Any]:
    """Header parse + HMAC + json.loads, written the plain way."""
    items = dict(part.split("=", 1) for part in delivery.headers["Stripe-Signature"].split(","))
    if abs(time.time() - int(items["t"])) > TOLERANCE:
        raise ValueError("stale")
    signed = items["t"].encode() + b"." + delivery.payload
    expected = hmac.new(key, signed, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, items["v1"]):
        raise ValueError("bad signature")
    event: dict[str, Any] = json.loads(delivery.payload)
    return event


def floor_parse(stream: list[Delivery]) -> Result:
    key = SECRET.encode()
    start = time.perf_counter()
    for delivery in stream:
        _floor_parse(delivery, key)
    return Result("floor: parse + HMAC + json.loads", len(stream), time.perf_counter() - start)


_SQLITE_SCHEMA = (
    "CREATE TABLE events (id TEXT PRIMARY KEY)",
    "CREATE TABLE objects (account TEXT, id TEXT, created INTEGER, data TEXT,"
    " PRIMARY KEY (account, id))",
)
_INSERT_EVENT = "INSERT INTO events (id) VALUES ({0}) ON CONFLICT DO NOTHING"
_UPSERT_OBJECT = (
    "INSERT INTO objects (account, id, created, data) VALUES ({0}, {0}, {0}, {0})"
    " ON CONFLICT (account, id) DO UPDATE SET created = excluded.created, data = excluded.data"
    " WHERE excluded.created >= objects.created"
)


def floor_sqlite(stream: list[Delivery], folder: Path) -> Result:
    key = SECRET.encode()
    conn = sqlite3.connect(folder / "floor.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    for ddl in _SQLITE_SCHEMA:
        conn.execute(ddl)
    insert, upsert = _INSERT_EVENT.format("?"), _UPSERT_OBJECT.format("?")
    start = time.perf_counter()
    for delivery in stream:
        event = _floor_parse(delivery, key)
        conn.execute("BEGIN IMMEDIATE")
        if conn.execute(insert, (event["id"],)).rowcount == 1:
            obj = event["data"]["object"]
            params = (event.get("account") or "", obj["id"], event["created"], json.dumps(obj))
            conn.execute(upsert, params)
        conn.execute("COMMIT")
    seconds = time.perf_counter() - start
    conn.close()
    return Result("floor: raw sqlite3, tx per delivery", len(stream), seconds)


def _pg_floor_worker(url: str, path: Path, barrier: Any, queue: Any) -> None:
    import psycopg

    deliveries = _load(path)
    key = SECRET.encode()
    insert, upsert = _INSERT_EVENT.format("%s"), _UPSERT_OBJECT.format("%s")
    retries = 0
    with psycopg.connect(_pg.libpq(url)) as conn:
        barrier.wait()
        for i in range(0, len(deliveries), BATCH):
            while True:
                try:
                    _pg_floor_batch(conn, deliveries[i : i + BATCH], key, insert, upsert)
                    break
                except psycopg.errors.DeadlockDetected:
                    # Batches of 4 processes holding inserted ids can deadlock;
                    # any real implementation retries the batch, and so does the floor.
                    retries += 1
        queue.put({"end": time.monotonic(), "retries": retries})


def _pg_floor_batch(
    conn: Any, deliveries: list[Delivery], key: bytes, insert: str, upsert: str
) -> None:
    with conn.transaction():
        for delivery in deliveries:
            event = _floor_parse(delivery, key)
            with conn.transaction():  # a savepoint per delivery
                if conn.execute(insert, (event["id"],)).rowcount == 1:
                    obj = event["data"]["object"]
                    account = event.get("account") or ""
                    conn.execute(upsert, (account, obj["id"], event["created"], json.dumps(obj)))


def floor_pg(cluster: str, paths: list[Path], total: int) -> Result:
    import psycopg

    url = _pg.new_database(cluster)
    with psycopg.connect(_pg.libpq(url), autocommit=True) as conn:
        for ddl in _SQLITE_SCHEMA:
            conn.execute(ddl.replace("INTEGER", "BIGINT"))
    seconds, results = _parallel(_pg_floor_worker, [(url, path) for path in paths])
    retries = sum(r["retries"] for r in results)
    notes = f"batches retried after a deadlock: {retries}" if retries else ""
    return Result(f"floor: raw psycopg, {WORKERS} procs", total, seconds, notes=notes)


# -- our side: one Billing, as a host app would wire it -------------------------------------


class _CountingStripe:
    """A Stripe port that answers at once, as a very fast Stripe would, and counts the calls.

    Handlers call Stripe after the commit only for what the library owes it
    (tagging a customer created in Stripe, re-fetching one on a same-second
    tie); the benchmark reports how many calls that was.
    """

    def __init__(self) -> None:
        self.calls = 0

    def request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        self.calls += 1
        stripe_id = path.rsplit("/", 1)[-1]
        params = kwargs.get("params") or {}
        return {
            "id": stripe_id,
            "object": "customer",
            "email": f"{stripe_id}@example.com",
            "name": None,
            "metadata": dict(params.get("metadata") or {}),
            "livemode": False,
            "created": int(time.time()),
        }

    def list_all(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return iter(())


class _ErrorCounter(logging.Handler):
    """Counts error logs (failed handlers, failed deferred work) instead of printing them."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.count = 0
        self.first: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        if self.first is None:
            self.first = record.getMessage()


@attrs.define
class _Ours:
    billing: Billing
    mailer: RecordingMailer
    stripe: _CountingStripe
    errors: _ErrorCounter

    def summary(self) -> dict[str, Any]:
        return {
            "emails": [sent.email.message_id for sent in self.mailer.sent],
            "stripe_calls": self.stripe.calls,
            "errors": self.errors.count,
            "first_error": self.errors.first,
        }


def _ours(storage: Any) -> _Ours:
    errors = _ErrorCounter()
    logger = logging.getLogger("rational_billing")
    logger.handlers[:] = [errors]
    logger.propagate = False
    logger.setLevel(logging.ERROR)
    mailer, stripe = RecordingMailer(), _CountingStripe()
    config = BillingConfig(
        test=ModeKeys(secret_key="sk_test_bench", webhook_secrets=(SECRET,)),
        webhook_tolerance=TOLERANCE,
    )
    billing = Billing(config=config, storage=storage, mailer=mailer, stripe=stripe)

    @billing.webhooks.on(MARKED_TYPE)
    def mark(ctx: Any) -> None:
        # A host app's own handler. A fresh row per application: doubles would show.
        marker = f"mark-{ctx.event['id']}-{uuid.uuid4().hex[:8]}"
        ctx.tx.insert_customer(Customer(id=marker, tenant=ctx.tenant.id, email=None))

    return _Ours(billing, mailer, stripe, errors)


def _tenant(account: str | None) -> str:
    return "direct" if account is None else f"t-{account[-4:]}"


def _setup(billing: Billing) -> None:
    """Every tenant connected; half of each tenant's Stripe customers linked locally."""
    billing.tenants.register_direct("direct", modes=frozenset({Mode.TEST}))
    for connected in _events.ACCOUNTS:
        billing.tenants.connect(_tenant(connected), connected, modes=frozenset({Mode.TEST}))
    with billing.storage.transaction() as tx:
        for account in (None, *_events.ACCOUNTS):
            for stripe_id in _events.customers_of(account)[::2]:
                tx.put_customer(
                    Customer(
                        id=f"local-{stripe_id}",
                        tenant=_tenant(account),
                        email=f"{stripe_id}@example.com",
                        link=CustomerLink(Mode.TEST, stripe_id),
                    )
                )


def _check(billing: Billing, unique: list[Delivery], summaries: list[dict[str, Any]]) -> str:
    """Duplicate and missing effects, stored outcomes, emails, Stripe calls and errors."""
    markers: Counter[str] = Counter()
    with billing.storage.transaction() as tx:
        for account in (None, *_events.ACCOUNTS):
            after: str | None = None
            while customers := tx.list_customers(_tenant(account), after=after, limit=1000):
                for customer in customers:
                    if customer.id.startswith("mark-"):
                        markers[customer.id.rsplit("-", 1)[0].removeprefix("mark-")] += 1
                after = customers[-1].id
        outcomes: Counter[str] = Counter()
        cursor = None
        while events := tx.list_events(after=cursor, limit=1000):
            outcomes.update(event.outcome.value for event in events)
            cursor = (events[-1].received_at, events[-1].event_id)
    marked = {d.event_id for d in unique if d.type == MARKED_TYPE}
    doubled = sum(n - 1 for n in markers.values() if n > 1)
    missing = len(marked - set(markers))
    emails = Counter(m for s in summaries for m in s["emails"])
    email_doubles = sum(n - 1 for n in emails.values() if n > 1)
    errors = sum(s["errors"] for s in summaries)
    first = next((s["first_error"] for s in summaries if s["first_error"]), None)
    stored = sum(outcomes.values())
    text = (
        f"duplicate effects: {doubled + email_doubles} "
        f"({doubled} {MARKED_TYPE} rows, {email_doubles} emails of {sum(emails.values())}); "
        f"missing: {missing}; stored events: {stored}/{len(unique)} "
        f"{dict(sorted(outcomes.items()))}; Stripe calls: "
        f"{sum(s['stripe_calls'] for s in summaries)}; errors logged: {errors}"
    )
    return text + (f" (first: {first})" if first else "")


def ours_memory(stream: list[Delivery], unique: list[Delivery], floor: Result) -> Result:
    ours = _ours(InMemoryStorage())
    _setup(ours.billing)
    handle = ours.billing.webhooks.handle
    start = time.perf_counter()
    for delivery in stream:
        handle(delivery.payload, delivery.headers)
    seconds = time.perf_counter() - start
    notes = _check(ours.billing, unique, [ours.summary()])
    return Result("ours: handle(), InMemoryStorage", len(stream), seconds, floor, "<=3x", notes)


def ours_sqlite(
    stream: list[Delivery], unique: list[Delivery], floor: Result, folder: Path
) -> Result:
    from rational_billing.storage.sql import SQLStorage

    ours = _ours(SQLStorage(f"sqlite:///{folder / 'ours.db'}"))
    _setup(ours.billing)
    handle = ours.billing.webhooks.handle
    start = time.perf_counter()
    for delivery in stream:
        handle(delivery.payload, delivery.headers)
    seconds = time.perf_counter() - start
    notes = _check(ours.billing, unique, [ours.summary()])
    ours.billing.close()
    return Result("ours: handle(), SQLite file", len(stream), seconds, floor, ">=60%", notes)


def _pg_handle_worker(url: str, path: Path, barrier: Any, queue: Any) -> None:
    from rational_billing.storage.sql import SQLStorage

    deliveries = _load(path)
    ours = _ours(SQLStorage(url))
    handle = ours.billing.webhooks.handle
    with ours.billing.storage.transaction() as tx:  # connect and check the schema first
        tx.direct_tenant()
    barrier.wait()
    statuses = Counter(handle(d.payload, d.headers).status_code for d in deliveries)
    queue.put({"end": time.monotonic(), "statuses": statuses, **ours.summary()})
    ours.billing.close()


def _pg_receive_worker(url: str, path: Path, barrier: Any, queue: Any) -> None:
    from rational_billing.storage.sql import SQLStorage

    deliveries = _load(path)
    ours = _ours(SQLStorage(url))
    receive = ours.billing.webhooks.receive
    with ours.billing.storage.transaction() as tx:
        tx.direct_tenant()
    barrier.wait()
    statuses = Counter(receive(d.payload, d.headers).status_code for d in deliveries)
    queue.put({"end": time.monotonic(), "statuses": statuses, **ours.summary()})
    ours.billing.close()


def _pg_process_worker(url: str, _path: Path, barrier: Any, queue: Any) -> None:
    from rational_billing.storage.sql import SQLStorage

    ours = _ours(SQLStorage(url))
    with ours.billing.storage.transaction() as tx:
        tx.direct_tenant()
    barrier.wait()
    processed = 0
    while taken := ours.billing.webhooks.process_pending(BATCH):
        processed += taken
    queue.put({"end": time.monotonic(), "processed": processed, **ours.summary()})
    ours.billing.close()


def _prepared_database(cluster: str) -> tuple[str, Billing]:
    from rational_billing.storage.sql import SQLStorage

    url = _pg.new_database(cluster)
    billing = _ours(SQLStorage(url)).billing
    _setup(billing)
    return url, billing


def ours_pg(
    cluster: str, paths: list[Path], total: int, unique: list[Delivery], floor: Result
) -> Result:
    url, billing = _prepared_database(cluster)
    seconds, results = _parallel(_pg_handle_worker, [(url, path) for path in paths])
    statuses: Counter[int] = sum((r["statuses"] for r in results), Counter())
    notes = f"statuses {dict(statuses)}; " + _check(billing, unique, results)
    billing.close()
    return Result(f"ours: handle(), {WORKERS} procs, PG", total, seconds, floor, ">=60%", notes)


def ours_inbox(
    cluster: str, paths: list[Path], total: int, unique: list[Delivery], floor: Result
) -> list[Result]:
    url, billing = _prepared_database(cluster)
    received, results = _parallel(_pg_receive_worker, [(url, path) for path in paths])
    statuses: Counter[int] = sum((r["statuses"] for r in results), Counter())
    processed, work = _parallel(_pg_process_worker, [(url, path) for path in paths])
    applied = sum(r["processed"] for r in work)
    notes = f"receive statuses {dict(statuses)}; workers took {applied} events; " + _check(
        billing, unique, work
    )
    billing.close()
    return [
        Result(f"ours: receive(), {WORKERS} procs, PG", total, received),
        Result(f"ours: process_pending(), {WORKERS} workers", applied, processed),
        Result(
            "ours: inbox end to end (both)",
            total,
            received + processed,
            floor,
            ">=60%",
            notes,
        ),
    ]


# -- processes -------------------------------------------------------------------------------


def _save(deliveries: list[Delivery], path: Path) -> Path:
    path.write_bytes(pickle.dumps(deliveries, protocol=pickle.HIGHEST_PROTOCOL))
    return path


def _load(path: Path) -> list[Delivery]:
    deliveries: list[Delivery] = pickle.loads(path.read_bytes())
    return deliveries


def _parallel(
    target: Callable[..., None], args: list[tuple[Any, ...]]
) -> tuple[float, list[dict[str, Any]]]:
    """Run ``target`` in fresh processes released together; seconds until the last one ends."""
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(len(args) + 1)
    queue = context.Queue()
    processes = [context.Process(target=target, args=(*a, barrier, queue)) for a in args]
    for process in processes:
        process.start()
    barrier.wait(timeout=600)
    start = time.monotonic()
    results: list[dict[str, Any]] = []
    while len(results) < len(processes):
        try:
            results.append(queue.get(timeout=1))
        except Empty:
            if any(p.exitcode not in (None, 0) for p in processes):
                for process in processes:
                    process.kill()
                raise RuntimeError("a benchmark process failed; see its traceback above") from None
    for process in processes:
        process.join(60)
        if process.exitcode != 0:
            raise RuntimeError(f"a benchmark process failed with exit code {process.exitcode}")
    return max(r["end"] for r in results) - start, results


# -- main -----------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20_000, help="distinct events (20000)")
    parser.add_argument("--duplicates", type=float, default=0.3, help="share delivered twice (0.3)")
    parser.add_argument("--no-postgres", action="store_true", help="skip the PostgreSQL parts")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    unique = _events.build(args.events)
    stream = _events.with_duplicates(unique, args.duplicates)
    kinds = Counter(d.type for d in unique)
    size = sum(len(d.payload) for d in unique) / len(unique)
    print(
        f"built {len(unique)} signed events ({size:.0f} bytes on average, "
        f"{len(kinds)} types; most common: {', '.join(t for t, _ in kinds.most_common(4))}) "
        f"and a stream of {len(stream)} deliveries with {args.duplicates:.0%} redelivered, "
        f"in {time.perf_counter() - started:.1f}s"
    )
    results: list[Result] = []

    def measured(*phase: Result) -> None:
        for result in phase:
            print(f"  measured {result.name}: {result.rate:.0f}/s", flush=True)
        results.extend(phase)

    with tempfile.TemporaryDirectory(prefix="rb-bench-") as tmp:
        folder = Path(tmp)
        parse = floor_parse(stream)
        measured(parse, ours_memory(stream, unique, parse))
        sqlite_floor = floor_sqlite(stream, folder)
        measured(sqlite_floor, ours_sqlite(stream, unique, sqlite_floor, folder))
        if not args.no_postgres:
            paths = [
                _save(part, folder / f"slice{i}.pickle")
                for i, part in enumerate(_events.slices(stream, WORKERS))
            ]
            with _pg.cluster() as cluster:
                if cluster is not None:
                    pg_floor = floor_pg(cluster, paths, len(stream))
                    measured(pg_floor, ours_pg(cluster, paths, len(stream), unique, pg_floor))
                    measured(*ours_inbox(cluster, paths, len(stream), unique, pg_floor))
    _report(results)
    print(f"\ntotal time {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
