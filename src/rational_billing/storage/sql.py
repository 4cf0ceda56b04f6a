"""`SQLStorage`: the `Storage` port on SQLAlchemy Core, over a SQLite file or PostgreSQL.

Every model is stored as JSON (through the package's private cattrs converter)
in a ``data`` column, next to the key columns that the lookups of `Transaction`
use, each of them indexed. Times that order results are stored as integer
microseconds since the epoch, and text keys use the ``C`` collation on
PostgreSQL, so that both backends sort exactly as Python does.

Concurrency:

- SQLite: WAL journal, a busy timeout, and ``BEGIN IMMEDIATE`` for every
  transaction, so that concurrent writers (threads or processes) queue up
  instead of failing with "database is locked" when a read turns into a write.
- PostgreSQL (psycopg 3, READ COMMITTED): ``record_event`` is
  ``INSERT ... ON CONFLICT DO NOTHING`` and ``mirror`` locks the stored row
  (``SELECT ... FOR UPDATE``) before it compares markers, so concurrent workers
  neither double-apply an event nor move a record backwards.

The schema is created and migrated by the first transaction of each
`SQLStorage`, under ``pg_advisory_xact_lock`` (PostgreSQL) or
``BEGIN IMMEDIATE`` (SQLite), with its version in ``rb_schema_version``, so
several workers starting together are safe.

This module needs the ``sql`` extra; without SQLAlchemy, importing it raises
`ConfigError` saying ``pip install 'rational-billing[sql]'``.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, Final, TypeVar

from cattrs.errors import BaseValidationError

from .._config import Mode, redact_url
from ..domain._serde import structure, unstructure
from ..domain.models import (
    Customer,
    Dispute,
    EventOutcome,
    Invoice,
    MirrorResult,
    OutboxEntry,
    OutboxState,
    ProcessedEvent,
    Product,
    Refund,
    Subscription,
    Tenant,
    utc,
)
from ..errors import ConfigError, StorageError
from ..ports import Clock, MirrorRecord, Transaction

_MISSING_EXTRA: Final = (
    "SQLStorage needs the 'sql' extra (SQLAlchemy and psycopg): pip install 'rational-billing[sql]'"
)

try:
    import sqlalchemy as sa
    from sqlalchemy.dialects import postgresql as sa_postgresql
    from sqlalchemy.dialects import sqlite as sa_sqlite
except ImportError as exc:
    raise ConfigError(_MISSING_EXTRA) from exc

__all__ = ["SQLStorage"]

T = TypeVar("T")
R = TypeVar("R", Subscription, Invoice, Dispute, Refund)

#: How long a SQLite writer waits for the write lock before giving up.
_SQLITE_BUSY_TIMEOUT_S: Final = 30.0
#: The key of the PostgreSQL advisory lock that serialises schema migrations.
_MIGRATION_LOCK_KEY: Final = 0x72625F736368656D  # "rb_schem"

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND: Final = timedelta(microseconds=1)


def _micros(value: datetime) -> int:
    """Microseconds since the epoch: exact, and sorted alike by every backend."""
    return (utc(value) - _EPOCH) // _MICROSECOND


def _utcnow() -> datetime:
    return datetime.now(UTC)


# -- URLs ---------------------------------------------------------------------

_EXPECTED_URL: Final = "expected sqlite:///path.db or postgresql+psycopg://user@host/dbname"


def _parse_url(url: str) -> sa.URL:
    """The SQLAlchemy URL to connect to, or `ConfigError` (which never shows the password)."""
    if not isinstance(url, str):
        raise ConfigError(f"the storage URL must be a string, got {type(url).__name__}")
    if "://" not in url:
        # Without a scheme there is no telling which part is a password: show none of it.
        raise ConfigError(f"malformed storage URL (no scheme://): {_EXPECTED_URL}")
    try:
        parsed = sa.make_url(url)
    except (sa.exc.ArgumentError, ValueError):
        # SQLAlchemy's own message repeats the URL, password included: do not chain it.
        raise ConfigError(f"malformed storage URL {redact_url(url)!r}: {_EXPECTED_URL}") from None
    if parsed.drivername in ("sqlite", "sqlite+pysqlite"):
        if not parsed.database or parsed.database == ":memory:" or "mode=memory" in url:
            raise ConfigError(
                f"storage URL {redact_url(url)!r} names an in-memory SQLite database, which "
                "each connection would see empty: use InMemoryStorage, or a file "
                "(sqlite:///billing.db)"
            )
        return parsed
    if parsed.drivername in ("postgresql", "postgresql+psycopg"):
        if parsed.host is not None and "@" in parsed.host:
            raise ConfigError(
                f"malformed storage URL {redact_url(url)!r}: percent-encode '@' in the "
                "user name or password as %40"
            )
        return parsed.set(drivername="postgresql+psycopg")
    raise ConfigError(
        f"unsupported storage URL scheme {parsed.drivername!r} in {redact_url(url)!r}: {_EXPECTED_URL}"
    )


# -- schema (version 1) ---------------------------------------------------------

#: Text keys sort bytewise on PostgreSQL too (the database's locale may not).
_KEY = sa.String().with_variant(sa.String(collation="C"), "postgresql")

_metadata = sa.MetaData()

_tenants = sa.Table(
    "rb_tenants",
    _metadata,
    sa.Column("id", _KEY, primary_key=True),
    # The account `tenant_by_account` finds it by: its acct_... unless it is direct.
    sa.Column("account_key", _KEY, nullable=True),
    # 1 for the one direct tenant, NULL for every other one.
    sa.Column("direct_key", sa.SmallInteger, nullable=True),
    sa.Column("data", sa.Text, nullable=False),
    sa.Index("ux_rb_tenants_account", "account_key", unique=True),
    sa.Index("ux_rb_tenants_direct", "direct_key", unique=True),
)

_customers = sa.Table(
    "rb_customers",
    _metadata,
    sa.Column("tenant", _KEY, primary_key=True),
    sa.Column("id", _KEY, primary_key=True),
    sa.Column("link_mode", sa.String(8), nullable=True),
    sa.Column("link_stripe_customer_id", _KEY, nullable=True),
    sa.Column("data", sa.Text, nullable=False),
    sa.Index("ux_rb_customers_link", "tenant", "link_mode", "link_stripe_customer_id", unique=True),
)

_products = sa.Table(
    "rb_products",
    _metadata,
    sa.Column("tenant", _KEY, primary_key=True),
    sa.Column("id", _KEY, primary_key=True),
    sa.Column("stripe_test_product_id", _KEY, nullable=True),
    sa.Column("stripe_live_product_id", _KEY, nullable=True),
    sa.Column("data", sa.Text, nullable=False),
    sa.Index("ix_rb_products_test", "tenant", "stripe_test_product_id"),
    sa.Index("ix_rb_products_live", "tenant", "stripe_live_product_id"),
)

_events = sa.Table(
    "rb_events",
    _metadata,
    sa.Column("event_id", _KEY, primary_key=True),
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Column("account", _KEY, nullable=True),
    sa.Column("received_us", sa.BigInteger, nullable=False),
    sa.Column("data", sa.Text, nullable=False),
    sa.Index("ix_rb_events_outcome", "outcome", "received_us"),
    sa.Index("ix_rb_events_outcome_account", "outcome", "account", "received_us"),
)

_mirrors = sa.Table(
    "rb_mirrors",
    _metadata,
    sa.Column("kind", sa.String(16), primary_key=True),
    sa.Column("tenant", _KEY, primary_key=True),
    sa.Column("mode", sa.String(8), primary_key=True),
    sa.Column("stripe_id", _KEY, primary_key=True),
    sa.Column("stripe_customer_id", _KEY, nullable=True),
    sa.Column("marker_us", sa.BigInteger, nullable=False),
    sa.Column("data", sa.Text, nullable=False),
    sa.Index("ix_rb_mirrors_customer", "kind", "tenant", "mode", "stripe_customer_id"),
)

_outbox = sa.Table(
    "rb_outbox",
    _metadata,
    sa.Column("id", _KEY, primary_key=True),
    sa.Column("tenant", _KEY, nullable=False),
    sa.Column("customer_id", _KEY, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("next_attempt_us", sa.BigInteger, nullable=True),
    sa.Column("created_us", sa.BigInteger, nullable=False),
    sa.Column("data", sa.Text, nullable=False),
    sa.Index("ix_rb_outbox_due", "state", "next_attempt_us"),
    sa.Index("ix_rb_outbox_customer", "tenant", "customer_id", "state"),
)

_schema_version = sa.Table(
    "rb_schema_version",
    sa.MetaData(),
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("applied_at", sa.String(40), nullable=False),
)


def _create_tables_v1(conn: sa.Connection) -> None:
    # The Table objects above are schema version 1. A later version appends a
    # step with explicit DDL (ALTER ...) and freezes version 1's tables here.
    for table in (_tenants, _customers, _products, _events, _mirrors, _outbox):
        table.create(conn)


#: Step N brings the schema from version N-1 to N. Released steps never change.
_MIGRATIONS: tuple[Callable[[sa.Connection], None], ...] = (_create_tables_v1,)

_KIND_NAMES: Final[Mapping[type[Any], str]] = {
    Subscription: "subscription",
    Invoice: "invoice",
    Dispute: "dispute",
    Refund: "refund",
}


# -- encoding -------------------------------------------------------------------


def _dump(model: object) -> str:
    return json.dumps(unstructure(model), separators=(",", ":"))


def _load(cls: type[T], data: str) -> T:
    try:
        return structure(json.loads(data), cls)
    except (ValueError, BaseValidationError) as exc:
        raise StorageError(f"a stored {cls.__name__} cannot be read back: {exc}") from exc


def _describe(exc: sa.exc.SQLAlchemyError) -> str:
    """A short message for a SQLAlchemy error: its category, the driver's error, no SQL."""
    if isinstance(exc, sa.exc.DBAPIError) and exc.orig is not None:
        detail = " ".join(str(exc.orig).split()) or "no detail"
        return f"{type(exc).__name__} ({type(exc.orig).__name__}): {detail}"
    return f"{type(exc).__name__}: {exc}"


# -- statements -----------------------------------------------------------------


def _p(name: str) -> sa.BindParameter[Any]:
    # WHERE parameters are prefixed, so that they never clash with the column
    # names that INSERT and UPDATE take their values from.
    return sa.bindparam(f"k_{name}")


class _Queries:
    """Every statement, built once per storage: SQLAlchemy then only reuses compiled SQL."""

    def __init__(self, *, postgres: bool) -> None:
        insert = sa_postgresql.insert if postgres else sa_sqlite.insert

        def ignore(table: sa.Table, *keys: str) -> sa.Insert:
            # Insert-if-absent: rowcount says whether it inserted, which
            # SQLAlchemy only keeps for an INSERT when asked to.
            stmt = insert(table).on_conflict_do_nothing(index_elements=list(keys))
            return stmt.execution_options(preserve_rowcount=True)

        def upsert(table: sa.Table, *keys: str) -> sa.Insert:
            stmt = insert(table)
            values = {c.name: stmt.excluded[c.name] for c in table.columns if c.name not in keys}
            return stmt.on_conflict_do_update(index_elements=list(keys), set_=values)

        limit = _p("limit")
        t, c, p, e, m, o = _tenants, _customers, _products, _events, _mirrors, _outbox

        self.tenant = sa.select(t.c.data).where(t.c.id == _p("id"))
        self.tenant_by_account = sa.select(t.c.data).where(t.c.account_key == _p("account"))
        self.direct_tenant = sa.select(t.c.data).where(t.c.direct_key == 1)
        self.release_account = (
            sa.update(t)
            .where(t.c.account_key == _p("account"), t.c.id != _p("id"))
            .values(account_key=None)
        )
        self.release_direct = (
            sa.update(t).where(t.c.direct_key == 1, t.c.id != _p("id")).values(direct_key=None)
        )
        self.put_tenant = upsert(t, "id")

        self.customer = sa.select(c.c.data).where(c.c.tenant == _p("tenant"), c.c.id == _p("id"))
        link = (
            c.c.tenant == _p("tenant"),
            c.c.link_mode == _p("mode"),
            c.c.link_stripe_customer_id == _p("stripe_id"),
        )
        self.customer_by_link = sa.select(c.c.data).where(*link)
        self.link_holder = sa.select(c.c.id).where(*link)
        self.insert_customer = ignore(c, "tenant", "id")
        self.put_customer = upsert(c, "tenant", "id")
        self.delete_customer = sa.delete(c).where(c.c.tenant == _p("tenant"), c.c.id == _p("id"))
        customers = sa.select(c.c.data).where(c.c.tenant == _p("tenant")).order_by(c.c.id)
        self.customers_first = customers.limit(limit)
        self.customers_after = customers.where(c.c.id > _p("after")).limit(limit)

        self.product = sa.select(p.c.data).where(p.c.tenant == _p("tenant"), p.c.id == _p("id"))
        self.put_product = upsert(p, "tenant", "id")
        self.products_by_stripe = {
            mode: sa.select(p.c.data)
            .where(p.c.tenant == _p("tenant"), column == _p("stripe_id"))
            .order_by(p.c.id)
            for mode, column in (
                (Mode.TEST, p.c.stripe_test_product_id),
                (Mode.LIVE, p.c.stripe_live_product_id),
            )
        }

        self.record_event = ignore(e, "event_id")
        self.event = sa.select(e.c.data).where(e.c.event_id == _p("event_id"))
        self.update_event = sa.update(e).where(e.c.event_id == _p("event_id"))
        by_outcome = (
            sa.select(e.c.data)
            .where(e.c.outcome == _p("outcome"))
            .order_by(e.c.received_us, e.c.event_id)
            .limit(limit)
        )
        self.events_with_outcome = by_outcome
        self.events_with_outcome_for = by_outcome.where(e.c.account == _p("account"))

        mirror_key = (
            m.c.kind == _p("kind"),
            m.c.tenant == _p("tenant"),
            m.c.mode == _p("mode"),
            m.c.stripe_id == _p("stripe_id"),
        )
        self.lock_mirror = sa.select(m.c.marker_us).where(*mirror_key).with_for_update()
        self.insert_mirror = ignore(m, "kind", "tenant", "mode", "stripe_id")
        self.update_mirror = sa.update(m).where(*mirror_key)
        self.mirror = sa.select(m.c.data).where(*mirror_key)
        self.mirrors_for_customer = (
            sa.select(m.c.data)
            .where(
                m.c.kind == _p("kind"),
                m.c.tenant == _p("tenant"),
                m.c.mode == _p("mode"),
                m.c.stripe_customer_id == _p("stripe_customer_id"),
            )
            .order_by(m.c.stripe_id)
        )

        self.put_outbox = upsert(o, "id")
        self.outbox = sa.select(o.c.data).where(o.c.id == _p("id"))
        self.due_outbox = (
            sa.select(o.c.data)
            .where(
                o.c.state == OutboxState.PENDING.value,
                sa.or_(o.c.next_attempt_us.is_(None), o.c.next_attempt_us <= _p("now")),
            )
            .order_by(o.c.created_us, o.c.id)
            .limit(limit)
        )
        self.outbox_for_customer = (
            sa.select(o.c.data)
            .where(
                o.c.tenant == _p("tenant"),
                o.c.customer_id == _p("customer_id"),
                o.c.state == OutboxState.PENDING.value,
            )
            .order_by(o.c.created_us, o.c.id)
        )
        self.outbox_with_state = (
            sa.select(o.c.data)
            .where(o.c.state == _p("state"))
            .order_by(o.c.created_us, o.c.id)
            .limit(limit)
        )


# -- the transaction ------------------------------------------------------------


class _SQLTransaction:
    """The `Transaction` port over one SQLAlchemy connection inside BEGIN ... COMMIT.

    After a statement fails, the transaction refuses further work (PostgreSQL
    would anyway), and a block that swallowed the error still ends in a
    rollback and a `StorageError` rather than in a silent partial commit.
    """

    __slots__ = ("_conn", "_q", "failed")

    def __init__(self, conn: sa.Connection, queries: _Queries) -> None:
        self._conn = conn
        self._q = queries
        #: Why the transaction can no longer commit, once a statement has failed.
        self.failed: str | None = None

    def failure(self) -> str | None:
        """Why the transaction can no longer commit, or None."""
        return self.failed

    def _run(
        self, stmt: sa.Executable, params: Mapping[str, Any] | None = None
    ) -> sa.CursorResult[Any]:
        if self.failed is not None:
            raise StorageError(
                f"the transaction was aborted by an earlier error ({self.failed}); "
                "leave the block so that it rolls back"
            )
        try:
            return self._conn.execute(stmt, params)
        except sa.exc.SQLAlchemyError as exc:
            self.failed = _describe(exc)
            raise StorageError(self.failed) from exc

    def _one(self, cls: type[T], stmt: sa.Executable, params: Mapping[str, Any]) -> T | None:
        data = self._run(stmt, params).scalar_one_or_none()
        return None if data is None else _load(cls, data)

    def _all(self, cls: type[T], stmt: sa.Executable, params: Mapping[str, Any]) -> list[T]:
        return [_load(cls, data) for data in self._run(stmt, params).scalars()]

    # -- tenants -------------------------------------------------------------
    def get_tenant(self, tenant_id: str) -> Tenant | None:
        return self._one(Tenant, self._q.tenant, {"k_id": tenant_id})

    def tenant_by_account(self, stripe_account_id: str) -> Tenant | None:
        return self._one(Tenant, self._q.tenant_by_account, {"k_account": stripe_account_id})

    def direct_tenant(self) -> Tenant | None:
        return self._one(Tenant, self._q.direct_tenant, {})

    def put_tenant(self, tenant: Tenant) -> None:
        # As in InMemoryStorage, the latest tenant to claim an account (or to
        # be direct) is the one the lookups find.
        account_key = None if tenant.direct else tenant.stripe_account_id
        if account_key is not None:
            self._run(self._q.release_account, {"k_account": account_key, "k_id": tenant.id})
        if tenant.direct:
            self._run(self._q.release_direct, {"k_id": tenant.id})
        row = {
            "id": tenant.id,
            "account_key": account_key,
            "direct_key": 1 if tenant.direct else None,
            "data": _dump(tenant),
        }
        self._run(self._q.put_tenant, row)

    # -- customers -----------------------------------------------------------
    def get_customer(self, tenant: str, customer_id: str) -> Customer | None:
        return self._one(Customer, self._q.customer, {"k_tenant": tenant, "k_id": customer_id})

    def customer_by_link(self, tenant: str, mode: Mode, stripe_customer_id: str) -> Customer | None:
        params = {"k_tenant": tenant, "k_mode": mode.value, "k_stripe_id": stripe_customer_id}
        return self._one(Customer, self._q.customer_by_link, params)

    def _link_conflict(self, customer: Customer) -> StorageError | None:
        """The error to raise when another customer of the tenant holds ``customer``'s link."""
        link = customer.link
        if link is None:
            return None
        params = {
            "k_tenant": customer.tenant,
            "k_mode": link.mode.value,
            "k_stripe_id": link.stripe_customer_id,
        }
        holder: str | None = self._run(self._q.link_holder, params).scalar_one_or_none()
        if holder is None or holder == customer.id:
            return None
        return StorageError(
            f"Stripe customer {link.stripe_customer_id!r} is already linked "
            f"to customer {holder!r} of tenant {customer.tenant!r}"
        )

    def insert_customer(self, customer: Customer) -> bool:
        conflict = self._link_conflict(customer)
        if conflict is not None:
            if self.get_customer(customer.tenant, customer.id) is not None:
                return False
            raise conflict
        return self._run(self._q.insert_customer, _customer_row(customer)).rowcount == 1

    def put_customer(self, customer: Customer) -> None:
        # Checked first, so that a taken link is a clear error that leaves the
        # transaction usable; the unique index still catches a concurrent race.
        conflict = self._link_conflict(customer)
        if conflict is not None:
            raise conflict
        self._run(self._q.put_customer, _customer_row(customer))

    def delete_customer(self, tenant: str, customer_id: str) -> bool:
        params = {"k_tenant": tenant, "k_id": customer_id}
        return self._run(self._q.delete_customer, params).rowcount == 1

    def list_customers(self, tenant: str, *, after: str | None, limit: int) -> Sequence[Customer]:
        params: dict[str, Any] = {"k_tenant": tenant, "k_limit": limit}
        if after is None:
            return self._all(Customer, self._q.customers_first, params)
        params["k_after"] = after
        return self._all(Customer, self._q.customers_after, params)

    # -- products ------------------------------------------------------------
    def get_product(self, tenant: str, product_id: str) -> Product | None:
        return self._one(Product, self._q.product, {"k_tenant": tenant, "k_id": product_id})

    def put_product(self, product: Product) -> None:
        row = {
            "tenant": product.tenant,
            "id": product.id,
            "stripe_test_product_id": product.stripe_test_product_id,
            "stripe_live_product_id": product.stripe_live_product_id,
            "data": _dump(product),
        }
        self._run(self._q.put_product, row)

    def products_by_stripe_product(
        self, tenant: str, mode: Mode, stripe_product_id: str
    ) -> Sequence[Product]:
        params = {"k_tenant": tenant, "k_stripe_id": stripe_product_id}
        return self._all(Product, self._q.products_by_stripe[mode], params)

    # -- events --------------------------------------------------------------
    def record_event(self, event: ProcessedEvent) -> bool:
        # ON CONFLICT DO NOTHING waits for a concurrent insert of the same id
        # to commit or roll back, so exactly one transaction sees rowcount 1.
        return self._run(self._q.record_event, _event_row(event)).rowcount == 1

    def get_event(self, event_id: str) -> ProcessedEvent | None:
        return self._one(ProcessedEvent, self._q.event, {"k_event_id": event_id})

    def update_event(self, event: ProcessedEvent) -> None:
        row = _event_row(event)
        del row["event_id"]
        row["k_event_id"] = event.event_id
        if self._run(self._q.update_event, row).rowcount != 1:
            raise StorageError(f"no stored event {event.event_id!r} to update")

    def events_with_outcome(
        self, outcome: EventOutcome, *, account: str | None = None, limit: int = 100
    ) -> Sequence[ProcessedEvent]:
        params = {"k_outcome": outcome.value, "k_limit": limit}
        if account is None:
            return self._all(ProcessedEvent, self._q.events_with_outcome, params)
        params["k_account"] = account
        return self._all(ProcessedEvent, self._q.events_with_outcome_for, params)

    # -- mirrors -------------------------------------------------------------
    def mirror(self, record: MirrorRecord) -> MirrorResult:
        key = {
            "k_kind": _kind_name(type(record)),
            "k_tenant": record.tenant,
            "k_mode": record.mode.value,
            "k_stripe_id": record.stripe_id,
        }
        marker = _micros(record.marker)
        values = {
            "stripe_customer_id": record.stripe_customer_id,
            "marker_us": marker,
            "data": _dump(record),
        }
        # At most two rounds: when the insert finds a row that a concurrent
        # transaction committed meanwhile, the second round locks and compares it.
        for _ in range(2):
            stored = self._run(self._q.lock_mirror, key).scalar_one_or_none()
            if stored is None:
                row = {name[2:]: value for name, value in key.items()} | values
                if self._run(self._q.insert_mirror, row).rowcount == 1:
                    return MirrorResult.INSERTED
                continue
            if marker < stored:
                return MirrorResult.STALE
            self._run(self._q.update_mirror, key | values)
            return MirrorResult.TIE if marker == stored else MirrorResult.APPLIED
        raise StorageError(
            f"{type(record).__name__} {record.stripe_id!r} kept changing during its upsert"
        )

    def get_mirror(self, kind: type[R], tenant: str, mode: Mode, stripe_id: str) -> R | None:
        params = {
            "k_kind": _kind_name(kind),
            "k_tenant": tenant,
            "k_mode": mode.value,
            "k_stripe_id": stripe_id,
        }
        return self._one(kind, self._q.mirror, params)

    def mirrors_for_customer(
        self, kind: type[R], tenant: str, mode: Mode, stripe_customer_id: str
    ) -> Sequence[R]:
        params = {
            "k_kind": _kind_name(kind),
            "k_tenant": tenant,
            "k_mode": mode.value,
            "k_stripe_customer_id": stripe_customer_id,
        }
        return self._all(kind, self._q.mirrors_for_customer, params)

    # -- outbox --------------------------------------------------------------
    def put_outbox(self, entry: OutboxEntry) -> None:
        row = {
            "id": entry.id,
            "tenant": entry.tenant,
            "customer_id": entry.customer_id,
            "state": entry.state.value,
            "next_attempt_us": None
            if entry.next_attempt_at is None
            else _micros(entry.next_attempt_at),
            "created_us": _micros(entry.created_at),
            "data": _dump(entry),
        }
        self._run(self._q.put_outbox, row)

    def get_outbox(self, entry_id: str) -> OutboxEntry | None:
        return self._one(OutboxEntry, self._q.outbox, {"k_id": entry_id})

    def due_outbox(self, now: datetime, *, limit: int) -> Sequence[OutboxEntry]:
        params = {"k_now": _micros(now), "k_limit": limit}
        return self._all(OutboxEntry, self._q.due_outbox, params)

    def outbox_with_state(self, state: OutboxState, *, limit: int = 100) -> Sequence[OutboxEntry]:
        params = {"k_state": state.value, "k_limit": limit}
        return self._all(OutboxEntry, self._q.outbox_with_state, params)

    def outbox_for_customer(self, tenant: str, customer_id: str) -> Sequence[OutboxEntry]:
        params = {"k_tenant": tenant, "k_customer_id": customer_id}
        return self._all(OutboxEntry, self._q.outbox_for_customer, params)


def _customer_row(customer: Customer) -> dict[str, Any]:
    link = customer.link
    return {
        "tenant": customer.tenant,
        "id": customer.id,
        "link_mode": None if link is None else link.mode.value,
        "link_stripe_customer_id": None if link is None else link.stripe_customer_id,
        "data": _dump(customer),
    }


def _event_row(event: ProcessedEvent) -> dict[str, Any]:
    return {
        "event_id": event.event_id,
        "outcome": event.outcome.value,
        "account": event.account,
        "received_us": _micros(event.received_at),
        "data": _dump(event),
    }


def _kind_name(kind: type[Any]) -> str:
    try:
        return _KIND_NAMES[kind]
    except KeyError:
        raise StorageError(f"{kind.__name__} is not a mirrored kind of record") from None


# -- the storage ----------------------------------------------------------------


class SQLStorage:
    """The `Storage` port on a SQLite file or a PostgreSQL database (SQLAlchemy Core).

    Args:
        url: ``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db``,
            or ``postgresql+psycopg://user:password@host:5432/dbname`` (plain
            ``postgresql://`` means the same).
        clock: when schema migrations are recorded as applied (for tests).

    Nothing connects until the first transaction, which also creates or
    migrates the schema. The storage is thread-safe: each thread's
    transactions use their own connection, and a `transaction` opened inside
    another one on the same thread joins it (as a savepoint, so that an inner
    block that raises undoes only its own writes).

    Raises:
        ConfigError: a malformed or unsupported URL (the message never shows
            the password), or the ``sql`` extra is not installed.

    Example::

        storage = SQLStorage("sqlite:///billing.db")
        with storage.transaction() as tx:
            tx.put_tenant(tenant)
        storage.close()
    """

    def __init__(self, url: str, *, clock: Clock | None = None) -> None:
        parsed = _parse_url(url)
        self._display = redact_url(url)
        self._postgres = parsed.get_backend_name() == "postgresql"
        self._clock = clock or _utcnow
        self._queries = _Queries(postgres=self._postgres)
        self._local = threading.local()
        self._schema_lock = threading.Lock()
        self._schema_ready = False
        self._closed = False
        try:
            if self._postgres:
                self._engine = sa.create_engine(parsed)
            else:
                self._engine = sa.create_engine(
                    parsed, connect_args={"timeout": _SQLITE_BUSY_TIMEOUT_S}
                )
                sa.event.listen(self._engine, "connect", _on_sqlite_connect)
                sa.event.listen(self._engine, "begin", _on_sqlite_begin)
        except ImportError as exc:
            raise ConfigError(_MISSING_EXTRA) from exc
        except sa.exc.ArgumentError:
            raise ConfigError(f"unusable storage URL {self._display!r}: {_EXPECTED_URL}") from None

    def __repr__(self) -> str:
        return f"<SQLStorage {self._display}>"

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """A transaction: commit on normal exit, roll back if the block raises.

        Raises:
            StorageError: the database could not be reached, a statement or the
                commit failed (nothing was committed), or the storage is closed.
        """
        current: _SQLTransaction | None = getattr(self._local, "tx", None)
        if current is not None:
            yield from self._savepoint(current)
            return
        if self._closed:
            raise StorageError("SQLStorage is closed")
        self._ensure_schema()
        conn = self._connect()
        try:
            try:
                conn.begin()
            except sa.exc.SQLAlchemyError as exc:
                raise StorageError(f"cannot begin a transaction: {_describe(exc)}") from exc
            tx = _SQLTransaction(conn, self._queries)
            self._local.tx = tx
            try:
                yield tx
            except BaseException as exc:
                _rollback(conn, exc)
                raise
            finally:
                self._local.tx = None
            if tx.failed is not None:
                _rollback(conn, None)
                raise StorageError(
                    f"rolled back: a statement in this transaction failed ({tx.failed})"
                )
            try:
                conn.commit()
            except sa.exc.SQLAlchemyError as exc:
                raise StorageError(f"commit failed: {_describe(exc)}") from exc
        finally:
            conn.close()

    def _savepoint(self, tx: _SQLTransaction) -> Iterator[Transaction]:
        aborted = tx.failure()
        if aborted is not None:
            raise StorageError(f"the enclosing transaction was aborted earlier ({aborted})")
        try:
            savepoint = tx._conn.begin_nested()
        except sa.exc.SQLAlchemyError as exc:
            tx.failed = _describe(exc)
            raise StorageError(tx.failed) from exc
        try:
            yield tx
        except BaseException as exc:
            if _rollback(savepoint, exc):
                tx.failed = None  # the savepoint undid whatever failed
            raise
        if tx.failed is not None:
            failed = tx.failed
            if _rollback(savepoint, None):
                tx.failed = None
            raise StorageError(f"rolled back: a statement in this block failed ({failed})")
        try:
            savepoint.commit()
        except sa.exc.SQLAlchemyError as exc:
            tx.failed = _describe(exc)
            raise StorageError(tx.failed) from exc

    def close(self) -> None:
        """Close every pooled connection; later transactions raise `StorageError`."""
        self._closed = True
        self._engine.dispose()

    # -- connections and schema -------------------------------------------------
    def _connect(self) -> sa.Connection:
        try:
            return self._engine.connect()
        except sa.exc.SQLAlchemyError as exc:
            raise StorageError(f"cannot connect to {self._display}: {_describe(exc)}") from exc

    def _ensure_schema(self) -> None:
        if self._schema_ready:
            return
        with self._schema_lock:
            if not self._schema_ready:
                self._migrate()
                self._schema_ready = True

    def _migrate(self) -> None:
        """Create or upgrade the schema, one worker at a time."""
        conn = self._connect()
        try:
            with conn.begin():  # BEGIN IMMEDIATE on SQLite: one migrator at a time
                if self._postgres:
                    conn.execute(
                        sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY}
                    )
                _schema_version.create(conn, checkfirst=True)
                current = conn.execute(
                    sa.select(sa.func.coalesce(sa.func.max(_schema_version.c.version), 0))
                ).scalar_one()
                if current > len(_MIGRATIONS):
                    raise StorageError(
                        f"the database at {self._display} has schema version {current}, newer "
                        f"than this rational_billing knows ({len(_MIGRATIONS)}): upgrade it"
                    )
                for version, step in enumerate(_MIGRATIONS[current:], start=current + 1):
                    step(conn)
                    conn.execute(
                        sa.insert(_schema_version),
                        {"version": version, "applied_at": utc(self._clock()).isoformat()},
                    )
        except sa.exc.SQLAlchemyError as exc:
            raise StorageError(
                f"cannot create or migrate the schema at {self._display}: {_describe(exc)}"
            ) from exc
        finally:
            conn.close()


def _rollback(target: sa.Connection | sa.NestedTransaction, exc: BaseException | None) -> bool:
    """Roll back; True when that worked. A failure is noted on ``exc``, never hidden."""
    try:
        target.rollback()
    except sa.exc.SQLAlchemyError as rollback_error:
        if exc is None:
            raise StorageError(f"rollback failed: {_describe(rollback_error)}") from rollback_error
        exc.add_note(f"rational_billing: the rollback failed too: {_describe(rollback_error)}")
        return False
    return True


def _on_sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy emit BEGIN itself (see _on_sqlite_begin); sqlite3's own
    # transaction handling would begin lazily and DEFERRED.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {int(_SQLITE_BUSY_TIMEOUT_S * 1000)}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


def _on_sqlite_begin(conn: sa.Connection) -> None:
    # IMMEDIATE takes the write lock up front: a DEFERRED transaction that
    # reads and then writes fails with SQLITE_BUSY when another writer got in
    # first, and busy_timeout cannot help it.
    conn.exec_driver_sql("BEGIN IMMEDIATE")
