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

Each floor and the code compared with it run in interleaved rounds (a block
of the stream each, the order alternating), because these machines change
speed within seconds.

It prints deliveries per second, each ratio to its floor against the target,
and the duplicate effects found (must be 0): a host handler on every handled
type counts each event once its transaction has committed, in every process,
so an event applied twice counts 2; invitation emails are counted per
message id.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import multiprocessing
import pickle
import sqlite3
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from queue import Empty
from typing import Any, Protocol, TypeVar

import _events
import _pg
import attrs
from _events import SECRET, Delivery

from rational_billing import Billing, BillingConfig, Customer, CustomerLink, Mode, ModeKeys
from rational_billing.testing import InMemoryStorage, RecordingMailer

TOLERANCE = 24 * 3600  # the deliveries are signed once, before the run
WORKERS = 4
BATCH = 50
T = TypeVar("T")


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
        if not self.target:  # shown against the floor, for information
            return f"({self.rate / self.floor.rate:.0%} rate)", None
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


def _blocks(deliveries: list[Delivery], rounds: int) -> list[list[Delivery]]:
    """``deliveries`` in ``rounds`` consecutive blocks, in stream order."""
    n = len(deliveries)
    return [deliveries[n * i // rounds : n * (i + 1) // rounds] for i in range(rounds)]


class FloorParse:
    name = "floor: parse + HMAC + json.loads"

    def __init__(self, stream: list[Delivery], rounds: int) -> None:
        self.blocks = _blocks(stream, rounds)
        self.key = SECRET.encode()

    def run(self, block: int) -> float:
        key = self.key
        start = time.perf_counter()
        for delivery in self.blocks[block]:
            _floor_parse(delivery, key)
        return time.perf_counter() - start

    def finish(self) -> str:
        return ""


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


class FloorSQLite:
    """Parse, then one transaction per delivery through raw sqlite3 on a WAL file."""

    name = "floor: raw sqlite3, tx per delivery"

    def __init__(self, stream: list[Delivery], rounds: int, folder: Path) -> None:
        self.blocks = _blocks(stream, rounds)
        self.key = SECRET.encode()
        self.conn = sqlite3.connect(folder / "floor.db", isolation_level=None)
        self.conn.execute("PRAGMA journal_mode = WAL")
        for ddl in _SQLITE_SCHEMA:
            self.conn.execute(ddl)
        self.insert, self.upsert = _INSERT_EVENT.format("?"), _UPSERT_OBJECT.format("?")

    def run(self, block: int) -> float:
        conn, key, insert, upsert = self.conn, self.key, self.insert, self.upsert
        start = time.perf_counter()
        for delivery in self.blocks[block]:
            event = _floor_parse(delivery, key)
            conn.execute("BEGIN IMMEDIATE")
            if conn.execute(insert, (event["id"],)).rowcount == 1:
                obj = event["data"]["object"]
                params = (event.get("account") or "", obj["id"], event["created"], json.dumps(obj))
                conn.execute(upsert, params)
            conn.execute("COMMIT")
        return time.perf_counter() - start

    def finish(self) -> str:
        self.conn.close()
        return ""


def _pg_floor_worker(url: str, path: Path, rounds: int, control: _Control) -> None:
    import psycopg

    blocks = _blocks(_load(path), rounds)
    key = SECRET.encode()
    insert, upsert = _INSERT_EVENT.format("%s"), _UPSERT_OBJECT.format("%s")
    retries = 0
    with psycopg.connect(_pg.libpq(url)) as conn:
        for deliveries in control.blocks(blocks):
            for i in range(0, len(deliveries), BATCH):
                while True:
                    try:
                        _pg_floor_batch(conn, deliveries[i : i + BATCH], key, insert, upsert)
                        break
                    except psycopg.errors.DeadlockDetected:
                        # Batches of 4 processes holding inserted ids can deadlock;
                        # any real implementation retries the batch, and so does the floor.
                        retries += 1
    control.report({"retries": retries})


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


def floor_pg(cluster: str, paths: list[Path], rounds: int) -> Pool:
    import psycopg

    url = _pg.new_database(cluster)
    with psycopg.connect(_pg.libpq(url), autocommit=True) as conn:
        for ddl in _SQLITE_SCHEMA:
            conn.execute(ddl.replace("INTEGER", "BIGINT"))

    def summary(results: list[dict[str, Any]]) -> str:
        retries = sum(r["retries"] for r in results)
        return f"batches retried after a deadlock: {retries}" if retries else ""

    name = f"floor: raw psycopg, {WORKERS} procs"
    return Pool(name, _pg_floor_worker, [(url, path, rounds) for path in paths], summary)


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
    #: Event id -> how many committed transactions applied it (must be 1).
    applied: Counter[str]

    def summary(self) -> dict[str, Any]:
        return {
            "emails": [sent.email.message_id for sent in self.mailer.sent],
            "applied": self.applied,
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
    applied: Counter[str] = Counter()

    def count(ctx: Any) -> None:
        # A host handler on every handled type: it runs inside the event's
        # transaction and counts the event once that transaction has
        # committed, so an event applied twice (in any process) counts 2.
        # (As light as it can be: it is timed as part of handle().)
        event_id = ctx.event["id"]

        def counted() -> None:
            applied[event_id] += 1

        ctx.after_commit(counted)

    for event_type in sorted(billing.webhooks.handled_types):
        billing.webhooks.on(event_type)(count)
    return _Ours(billing, mailer, stripe, errors, applied)


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
    with billing.storage.transaction() as tx:
        outcomes: Counter[str] = Counter()
        cursor = None
        while events := tx.list_events(after=cursor, limit=1000):
            outcomes.update(event.outcome.value for event in events)
            cursor = events[-1].event_id
    applied: Counter[str] = sum((s["applied"] for s in summaries), Counter())
    # Every event of a handled type reaches the handlers once (all tenants serve test mode).
    handled = {d.event_id for d in unique if d.type in billing.webhooks.handled_types}
    doubled = sum(n - 1 for n in applied.values() if n > 1)
    missing = len(handled - set(applied))
    emails = Counter(m for s in summaries for m in s["emails"])
    email_doubles = sum(n - 1 for n in emails.values() if n > 1)
    errors = sum(s["errors"] for s in summaries)
    first = next((s["first_error"] for s in summaries if s["first_error"]), None)
    stored = sum(outcomes.values())
    text = (
        f"duplicate effects: {doubled + email_doubles} ({doubled} events applied twice of "
        f"{len(handled)} handled, {email_doubles} emails of {sum(emails.values())}); "
        f"missing: {missing}; stored events: {stored}/{len(unique)} "
        f"{dict(sorted(outcomes.items()))}; Stripe calls: "
        f"{sum(s['stripe_calls'] for s in summaries)}; errors logged: {errors}"
    )
    return text + (f" (first: {first})" if first else "")


class OursInProcess:
    """``billing.webhooks.handle()`` in this process, on the storage given."""

    def __init__(
        self, name: str, storage: Any, stream: list[Delivery], unique: list[Delivery], rounds: int
    ) -> None:
        self.name = name
        self.blocks = _blocks(stream, rounds)
        self.unique = unique
        self.ours = _ours(storage)
        _setup(self.ours.billing)

    def run(self, block: int) -> float:
        handle = self.ours.billing.webhooks.handle
        start = time.perf_counter()
        for delivery in self.blocks[block]:
            handle(delivery.payload, delivery.headers)
        return time.perf_counter() - start

    def finish(self) -> str:
        notes = _check(self.ours.billing, self.unique, [self.ours.summary()])
        self.ours.billing.close()
        return notes


def _worker_billing(url: str) -> _Ours:
    from rational_billing.storage.sql import SQLStorage

    ours = _ours(SQLStorage(url))
    with ours.billing.storage.transaction() as tx:  # connect and check the schema first
        tx.direct_tenant()
    return ours


def _pg_delivery_worker(method: str, url: str, path: Path, rounds: int, control: _Control) -> None:
    """Each round, pass this process's next block of deliveries to ``handle`` or ``receive``."""
    ours = _worker_billing(url)
    deliver = getattr(ours.billing.webhooks, method)
    statuses: Counter[int] = Counter()
    for deliveries in control.blocks(_blocks(_load(path), rounds)):
        statuses.update(deliver(d.payload, d.headers).status_code for d in deliveries)
    control.report({"statuses": statuses, **ours.summary()})
    ours.billing.close()


def _pg_process_worker(url: str, _path: Path, rounds: int, control: _Control) -> None:
    ours = _worker_billing(url)
    processed = 0
    for _ in control.blocks([None] * rounds):
        # Each round applies what that round's receivers stored, until nothing is due.
        while taken := ours.billing.webhooks.process_pending(BATCH):
            processed += taken
    control.report({"processed": processed, **ours.summary()})
    ours.billing.close()


def _prepared_database(cluster: str) -> tuple[str, Billing]:
    from rational_billing.storage.sql import SQLStorage

    url = _pg.new_database(cluster)
    billing = _ours(SQLStorage(url)).billing
    _setup(billing)
    return url, billing


def ours_pg(cluster: str, paths: list[Path], rounds: int, unique: list[Delivery]) -> Pool:
    url, billing = _prepared_database(cluster)

    def summary(results: list[dict[str, Any]]) -> str:
        statuses: Counter[int] = sum((r["statuses"] for r in results), Counter())
        notes = f"statuses {dict(statuses)}; " + _check(billing, unique, results)
        billing.close()
        return notes

    name = f"ours: handle(), {WORKERS} procs, PG"
    args = [("handle", url, path, rounds) for path in paths]
    return Pool(name, _pg_delivery_worker, args, summary)


class Inbox:
    """``receive()`` in 4 processes, then ``process_pending()`` in 4 workers, per round."""

    def __init__(self, cluster: str, paths: list[Path], rounds: int, unique: list[Delivery]):
        url, self.billing = _prepared_database(cluster)
        self.unique = unique
        self.name = "ours: inbox end to end (both)"
        args = [(url, path, rounds) for path in paths]
        self.received: list[dict[str, Any]] = []
        self.receivers = Pool(
            f"ours: receive(), {WORKERS} procs, PG",
            _pg_delivery_worker,
            [("receive", *a) for a in args],
            self.received.extend,
        )
        self.workers = Pool(
            f"ours: process_pending(), {WORKERS} workers", _pg_process_worker, args, self._check
        )
        self.receive_s = self.process_s = 0.0

    def _check(self, results: list[dict[str, Any]]) -> str:
        statuses: Counter[int] = sum((r["statuses"] for r in self.received), Counter())
        applied = sum(r["processed"] for r in results)
        return f"receive statuses {dict(statuses)}; workers took {applied} events; " + _check(
            self.billing, self.unique, results + self.received
        )

    def run(self, block: int) -> float:
        received = self.receivers.run(block)
        processed = self.workers.run(block)
        self.receive_s += received
        self.process_s += processed
        return received + processed

    def finish(self) -> str:
        self.receivers.finish()
        notes = self.workers.finish()
        self.billing.close()
        return notes


# -- processes ---------------------------------------------------------------------------


def _save(deliveries: list[Delivery], path: Path) -> Path:
    path.write_bytes(pickle.dumps(deliveries, protocol=pickle.HIGHEST_PROTOCOL))
    return path


def _load(path: Path) -> list[Delivery]:
    deliveries: list[Delivery] = pickle.loads(path.read_bytes())
    return deliveries


class _Control:
    """A worker's side of a `Pool`: wait for each round, run it, say when it is done."""

    def __init__(self, go: Any, done: Any, queue: Any) -> None:
        self.go, self.done, self.queue = go, done, queue

    def blocks(self, blocks: list[T]) -> Iterator[T]:
        self.go.wait()  # connected and loaded: ready
        for block in blocks:
            self.go.wait()
            yield block
            self.done.wait()

    def report(self, summary: dict[str, Any]) -> None:
        self.queue.put(summary)


def _run_worker(target: Callable[..., None], args: tuple[Any, ...], control: _Control) -> None:
    target(*args, control)


class Pool:
    """Worker processes that run one round each time `run` is called, all together.

    The processes start (connect, load their slice) before the first round, so
    a round times the work only: from releasing every worker to the last one
    finishing.
    """

    def __init__(
        self,
        name: str,
        target: Callable[..., None],
        args: list[tuple[Any, ...]],
        summary: Callable[[list[dict[str, Any]]], str | None],
    ) -> None:
        self.name = name
        self.summary = summary
        context = multiprocessing.get_context("spawn")
        self.go = context.Barrier(len(args) + 1)
        self.done = context.Barrier(len(args) + 1)
        self.queue = context.Queue()
        self.processes = [
            context.Process(
                target=_run_worker, args=(target, a, _Control(self.go, self.done, self.queue))
            )
            for a in args
        ]
        for process in self.processes:
            process.start()
        self._wait(self.go)

    def _wait(self, barrier: Any) -> None:
        while True:
            try:
                barrier.wait(timeout=5)
                return
            except threading.BrokenBarrierError:
                if any(p.exitcode not in (None, 0) for p in self.processes):
                    self._kill()
                    raise RuntimeError(
                        f"{self.name}: a benchmark process failed; see its traceback above"
                    ) from None
                barrier.reset()

    def _kill(self) -> None:
        for process in self.processes:
            process.kill()

    def run(self, block: int) -> float:
        start = time.monotonic()
        self._wait(self.go)
        self._wait(self.done)
        return time.monotonic() - start

    def finish(self) -> str:
        results: list[dict[str, Any]] = []
        while len(results) < len(self.processes):
            try:
                results.append(self.queue.get(timeout=1))
            except Empty:
                if any(p.exitcode not in (None, 0) for p in self.processes):
                    self._kill()
                    raise RuntimeError(f"{self.name}: a benchmark process failed") from None
        for process in self.processes:
            process.join(60)
        return self.summary(results) or ""


class Phase(Protocol):
    name: str

    def run(self, block: int) -> float: ...

    def finish(self) -> str: ...


def interleaved(phases: Sequence[Phase], rounds: int) -> list[tuple[float, str]]:
    """Run the phases round by round, alternating their order; each one's seconds and notes.

    The machines here change speed by up to 2x within seconds, so phases
    that ran one after the other would be compared under different
    conditions. Each round runs every phase on its next block of the stream
    (the order reversed every other round), so that a floor and our code see
    the same machine.
    """
    seconds = [0.0] * len(phases)
    for block in range(rounds):
        order = range(len(phases)) if block % 2 == 0 else reversed(range(len(phases)))
        for i in order:
            seconds[i] += phases[i].run(block)
    return [(spent, phase.finish()) for spent, phase in zip(seconds, phases, strict=True)]


# -- main -----------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = _events.stream_arguments(__doc__.split("\n\n")[0])
    parser.add_argument("--no-postgres", action="store_true", help="skip the PostgreSQL parts")
    args = parser.parse_args(argv)
    rounds = args.rounds

    started = time.perf_counter()
    unique = _events.build(args.events)
    stream = _events.with_duplicates(unique, args.duplicates)
    kinds = Counter(d.type for d in unique)
    size = sum(len(d.payload) for d in unique) / len(unique)
    print(
        f"built {len(unique)} signed events ({size:.0f} bytes on average, "
        f"{len(kinds)} types; most common: {', '.join(t for t, _ in kinds.most_common(4))}) "
        f"and a stream of {len(stream)} deliveries with {args.duplicates:.0%} redelivered, "
        f"in {time.perf_counter() - started:.1f}s; each pair below is measured in "
        f"{rounds} interleaved rounds"
    )
    results: list[Result] = []

    def measured(*phase: Result) -> None:
        for result in phase:
            print(f"  measured {result.name}: {result.rate:.0f}/s", flush=True)
        results.extend(phase)

    from rational_billing.storage.sql import SQLStorage

    with tempfile.TemporaryDirectory(prefix="rb-bench-") as tmp:
        folder = Path(tmp)
        n = len(stream)
        parse = FloorParse(stream, rounds)
        memory = OursInProcess(
            "ours: handle(), InMemoryStorage", InMemoryStorage(), stream, unique, rounds
        )
        (p_s, _), (m_s, m_notes) = interleaved([parse, memory], rounds)
        floor = Result(parse.name, n, p_s)
        measured(floor, Result(memory.name, n, m_s, floor, "<=3x", m_notes))

        sqlite_floor = FloorSQLite(stream, rounds, folder)
        storage = SQLStorage(f"sqlite:///{folder / 'ours.db'}")
        sqlite = OursInProcess("ours: handle(), SQLite file", storage, stream, unique, rounds)
        (f_s, _), (o_s, o_notes) = interleaved([sqlite_floor, sqlite], rounds)
        floor = Result(sqlite_floor.name, n, f_s)
        measured(floor, Result(sqlite.name, n, o_s, floor, ">=60%", o_notes))

        if not args.no_postgres:
            paths = [
                _save(part, folder / f"slice{i}.pickle")
                for i, part in enumerate(_events.slices(stream, WORKERS))
            ]
            with _pg.cluster() as cluster:
                if cluster is not None:
                    inbox = Inbox(cluster, paths, rounds, unique)
                    pools: list[Phase] = [
                        floor_pg(cluster, paths, rounds),
                        ours_pg(cluster, paths, rounds, unique),
                        inbox,
                    ]
                    timed = interleaved(pools, rounds)
                    (f_s, f_notes), (h_s, h_notes), (i_s, i_notes) = timed
                    floor = Result(pools[0].name, n, f_s, notes=f_notes)
                    # The target (DESIGN.md §5) is for the 4 inbox workers, which
                    # apply stored events in batches as the floor does; handle()
                    # commits once per delivery, and the end-to-end line adds the
                    # receiving, both shown against the same floor for information.
                    measured(
                        floor,
                        Result(pools[1].name, n, h_s, floor, "", h_notes),
                        Result(inbox.receivers.name, n, inbox.receive_s),
                        Result(inbox.workers.name, len(unique), inbox.process_s, floor, ">=60%"),
                        Result(inbox.name, n, i_s, floor, "", i_notes),
                    )
    _report(results)
    print(f"\ntotal time {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
