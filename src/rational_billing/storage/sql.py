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

import base64
import enum
import json
import os
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime, timedelta
from types import MappingProxyType, TracebackType
from typing import Any, Final, TypeVar

import attrs
import orjson
from cattrs.errors import BaseValidationError

from .._config import Mode, redact_url
from ..domain._serde import iso, structure, unstructure_for_orjson
from ..domain.models import (
    Customer,
    Dispute,
    EventOutcome,
    Invitation,
    InvitationState,
    Invoice,
    MirrorResult,
    OutboxEntry,
    OutboxState,
    PendingConnection,
    ProcessedEvent,
    Product,
    Refund,
    Relation,
    StripeReference,
    Subscription,
    Tenant,
    utc,
)
from ..errors import ConfigError, InvalidArgument, StorageError
from ..ports import Clock, MirrorRecord, Transaction

_MISSING_EXTRA: Final = (
    "SQLStorage needs the 'sql' extra (SQLAlchemy and psycopg): pip install 'rational-billing[sql]'"
)

try:
    import sqlalchemy as sa
    from sqlalchemy.dialects import postgresql as sa_postgresql
    from sqlalchemy.dialects import sqlite as sa_sqlite
    from sqlalchemy.pool import PoolProxiedConnection
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


def _events_table(metadata: sa.MetaData, *extra: sa.Column[Any]) -> sa.Table:
    return sa.Table(
        "rb_events",
        metadata,
        sa.Column("event_id", _KEY, primary_key=True),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("account", _KEY, nullable=True),
        sa.Column("received_us", sa.BigInteger, nullable=False),
        sa.Column("data", sa.Text, nullable=False),
        *extra,
        sa.Index("ix_rb_events_outcome", "outcome", "received_us"),
        sa.Index("ix_rb_events_outcome_account", "outcome", "account", "received_us"),
    )


def _events_v2_columns() -> tuple[sa.Column[Any], ...]:
    return (
        # Schema version 2 (the webhook inbox): the raw body outside the JSON
        # (no base64, never rewritten by a changed outcome), the type for
        # replay filters, and when a worker may claim the event (NULL: never).
        sa.Column("event_type", _KEY, nullable=True),
        sa.Column("payload", sa.LargeBinary, nullable=True),
        sa.Column("due_us", sa.BigInteger, nullable=True),
    )


#: rb_events as schema version 1 created it (frozen: version 2 adds columns).
_events_v1 = _events_table(sa.MetaData())
_events = _events_table(_metadata, *_events_v2_columns())

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

# Schema version 3 (tenants and customers): Connect onboarding in progress, and
# the one invitation per Stripe-created customer.
_pending_connections = sa.Table(
    "rb_pending_connections",
    _metadata,
    sa.Column("key", _KEY, primary_key=True),
    sa.Column("tenant", _KEY, nullable=False),
    sa.Column("data", sa.Text, nullable=False),
)

_invitations = sa.Table(
    "rb_invitations",
    _metadata,
    sa.Column("tenant", _KEY, primary_key=True),
    sa.Column("mode", sa.String(8), primary_key=True),
    sa.Column("stripe_customer_id", _KEY, primary_key=True),
    sa.Column("state", sa.String(16), nullable=False),
    # When a pending invitation may next be sent; NULL once it is not pending.
    sa.Column("due_us", sa.BigInteger, nullable=True),
    sa.Column("created_us", sa.BigInteger, nullable=False),
    sa.Column("data", sa.Text, nullable=False),
    sa.Index("ix_rb_invitations_due", "due_us"),
)

# Schema version 4 (products, subscriptions and access): the references that
# lead a dispute or refund to its invoice (§4a.10), and subscriptions indexed
# by the Stripe products of their items (for customers_with_access and impact).
_references = sa.Table(
    "rb_references",
    _metadata,
    sa.Column("tenant", _KEY, primary_key=True),
    sa.Column("mode", sa.String(8), primary_key=True),
    sa.Column("source_id", _KEY, primary_key=True),
    sa.Column("relation", sa.String(16), primary_key=True),
    sa.Column("target_id", _KEY, primary_key=True),
    # Every column, so that a lookup by target is found and ordered by the index alone.
    sa.Index("ix_rb_references_target", "tenant", "mode", "target_id", "relation", "source_id"),
)

_subscription_products = sa.Table(
    "rb_subscription_products",
    _metadata,
    sa.Column("tenant", _KEY, primary_key=True),
    sa.Column("mode", sa.String(8), primary_key=True),
    sa.Column("stripe_product_id", _KEY, primary_key=True),
    sa.Column("subscription_id", _KEY, primary_key=True),
    sa.Index("ix_rb_subscription_products_sub", "tenant", "mode", "subscription_id"),
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
    for table in (_tenants, _customers, _products, _events_v1, _mirrors, _outbox):
        table.create(conn)


def _events_inbox_v2(conn: sa.Connection) -> None:
    """Version 2: the webhook inbox (claimable events) and replay (by time and type)."""
    for column in _events_v2_columns():
        ddl = sa.schema.CreateColumn(column).compile(dialect=conn.dialect)
        conn.execute(sa.text(f"ALTER TABLE rb_events ADD COLUMN {ddl}"))
    # Partial: only the few events a worker may claim are in it (both backends
    # use it for ``due_us <= :now``, which implies NOT NULL).
    conn.execute(
        sa.text(
            "CREATE INDEX ix_rb_events_due ON rb_events (due_us, event_id) WHERE due_us IS NOT NULL"
        )
    )
    conn.execute(sa.text("CREATE INDEX ix_rb_events_received ON rb_events (received_us, event_id)"))
    e = _events
    # Version 1 kept the payload base64-encoded inside ``data``: move it out,
    # a page at a time so that a large table is not loaded at once.
    page = (
        sa.select(e.c.event_id, e.c.data, e.c.received_us)
        .where(e.c.event_id > sa.bindparam("after"))
        .order_by(e.c.event_id)
        .limit(500)
    )
    after = ""
    while rows := conn.execute(page, {"after": after}).all():
        after = rows[-1][0]
        for event_id, data, received_us in rows:
            _move_payload_v2(conn, event_id, data, received_us)


def _move_payload_v2(conn: sa.Connection, event_id: str, data: str, received_us: int) -> None:
    fields = _json_value(data)
    raw = fields.pop("payload", None)
    pending = fields.get("outcome") == EventOutcome.PENDING.value
    conn.execute(
        sa.update(_events).where(_events.c.event_id == event_id),
        {
            "data": _json_text(fields),
            "payload": None if raw is None else base64.b64decode(raw),
            "event_type": fields.get("type"),
            "due_us": received_us if pending else None,
        },
    )


def _connections_and_invitations_v3(conn: sa.Connection) -> None:
    """Version 3: pending Connect onboardings and invitations."""
    for table in (_pending_connections, _invitations):
        table.create(conn)


#: Version 4 replaces these version 1 indexes by ones that end with the column the
#: lookup orders by. Without statistics, SQLite otherwise picks the primary key
#: for its order and filters every row of the tenant (measured: 2.7 ms instead
#: of 0.1 ms for one customer's subscriptions among 5,000). The Table objects
#: above still describe version 1, which creates the old indexes.
_V4_INDEXES: Final = (
    ("ix_rb_mirrors_customer", "rb_mirrors", "kind, tenant, mode, stripe_customer_id, stripe_id"),
    ("ix_rb_products_test", "rb_products", "tenant, stripe_test_product_id, id"),
    ("ix_rb_products_live", "rb_products", "tenant, stripe_live_product_id, id"),
)


def _references_and_product_index_v4(conn: sa.Connection) -> None:
    """Version 4: Stripe references, the subscription-product index, and ordered lookups."""
    for table in (_references, _subscription_products):
        table.create(conn)
    for name, table_name, columns in _V4_INDEXES:
        conn.execute(sa.text(f"DROP INDEX IF EXISTS {name}"))
        conn.execute(sa.text(f"CREATE INDEX {name}_v4 ON {table_name} ({columns})"))


#: The outcomes that `events_with_outcome` finds through an index from version 5:
#: events waiting for something (a connection, a retry, a worker), which are few.
#: Every other outcome is final; listing those reads the events in received order
#: (from version 6 on SQLite, with no index for it: all of them, sorted).
_WAITING_OUTCOMES: Final = (EventOutcome.HELD, EventOutcome.FAILED, EventOutcome.PENDING)


def _waiting_events_index_v5(conn: sa.Connection) -> None:
    """Version 5: one partial index for waiting events instead of two over every event.

    Versions 1-4 indexed every event twice by outcome, so each webhook wrote
    two more index pages (a bigger WAL frame set to fsync on SQLite) for
    lookups that only ever ask for held, failed or pending events. Queries
    name the outcome as a literal, so both backends can use the partial index.
    """
    conn.execute(sa.text("DROP INDEX IF EXISTS ix_rb_events_outcome"))
    conn.execute(sa.text("DROP INDEX IF EXISTS ix_rb_events_outcome_account"))
    waiting = " OR ".join(f"outcome = '{o.value}'" for o in _WAITING_OUTCOMES)
    conn.execute(
        sa.text(
            "CREATE INDEX ix_rb_events_waiting ON rb_events "
            f"(outcome, account, received_us, event_id) WHERE {waiting}"
        )
    )


#: SQLite: the minute of received time an event falls in, for `_stored_order_v6`.
_MINUTE_US: Final = 60_000_000


def _stored_order_v6(conn: sa.Connection) -> None:
    """Version 6, SQLite only: replay in stored order, without an index entry per event.

    ``ix_rb_events_received`` served only `list_events`, and every stored
    event wrote a page of it. SQLite now keeps events in the order they were
    first stored, by an explicit ``seq INTEGER PRIMARY KEY`` (an implicit
    rowid may be renumbered by ``VACUUM``), and pages by it; ``since`` starts
    from ``rb_event_minutes``, the lowest ``seq`` of each minute of received
    time, which an event writes only when it is the first of its minute. The
    table is rebuilt, existing events numbered in received order.
    PostgreSQL keeps its index, where an index entry is not a page fsynced per
    event. docs/decisions.md has the why.
    """
    if conn.dialect.name != "sqlite":
        return
    conn.execute(
        sa.text(
            "CREATE TABLE rb_events_v6 (seq INTEGER PRIMARY KEY, event_id VARCHAR NOT NULL UNIQUE, "
            "outcome VARCHAR(16) NOT NULL, account VARCHAR, received_us BIGINT NOT NULL, "
            "data TEXT NOT NULL, event_type VARCHAR, payload BLOB, due_us BIGINT)"
        )
    )
    columns = "event_id, outcome, account, received_us, data, event_type, payload, due_us"
    conn.execute(
        sa.text(
            f"INSERT INTO rb_events_v6 ({columns}) SELECT {columns} FROM rb_events "  # noqa: S608 (constants only)
            "ORDER BY received_us, event_id"
        )
    )
    conn.execute(sa.text("DROP TABLE rb_events"))  # and its indexes
    conn.execute(sa.text("ALTER TABLE rb_events_v6 RENAME TO rb_events"))
    conn.execute(
        sa.text(
            "CREATE INDEX ix_rb_events_due ON rb_events (due_us, event_id) WHERE due_us IS NOT NULL"
        )
    )
    waiting = " OR ".join(f"outcome = '{o.value}'" for o in _WAITING_OUTCOMES)
    conn.execute(
        sa.text(
            "CREATE INDEX ix_rb_events_waiting ON rb_events "
            f"(outcome, account, received_us, event_id) WHERE {waiting}"
        )
    )
    conn.execute(
        sa.text(
            "CREATE TABLE rb_event_minutes (minute INTEGER PRIMARY KEY, first_seq INTEGER NOT NULL)"
        )
    )
    conn.execute(
        sa.text(
            "INSERT INTO rb_event_minutes (minute, first_seq) "  # noqa: S608 (constants only)
            f"SELECT received_us / {_MINUTE_US}, min(seq) FROM rb_events GROUP BY 1"
        )
    )
    # Kept by SQLite itself, so that no writer can miss it and no statement
    # round trip is spent on it: an insert-if-absent that inserts nothing
    # fires neither trigger.
    lower_the_minute = (
        "INSERT INTO rb_event_minutes (minute, first_seq) "  # noqa: S608 (constants only)
        f"VALUES (new.received_us / {_MINUTE_US}, new.seq) "
        "ON CONFLICT (minute) DO UPDATE SET first_seq = excluded.first_seq "
        "WHERE excluded.first_seq < rb_event_minutes.first_seq"
    )
    for name, when in (("stored", "INSERT"), ("moved", "UPDATE OF received_us")):
        conn.execute(
            sa.text(
                f"CREATE TRIGGER rb_events_{name} AFTER {when} ON rb_events "
                f"BEGIN {lower_the_minute}; END"
            )
        )


#: Step N brings the schema from version N-1 to N. Released steps never change.
_MIGRATIONS: tuple[Callable[[sa.Connection], None], ...] = (
    _create_tables_v1,
    _events_inbox_v2,
    _connections_and_invitations_v3,
    _references_and_product_index_v4,
    _waiting_events_index_v5,
    _stored_order_v6,
)

_KIND_NAMES: Final[Mapping[type[Any], str]] = {
    Subscription: "subscription",
    Invoice: "invoice",
    Dispute: "dispute",
    Refund: "refund",
}


# -- encoding -------------------------------------------------------------------


def _json_text(value: Any) -> str:
    """``value`` as the JSON text of a column.

    orjson, or the json module for what orjson refuses and JSON allows: a
    string with a lone surrogate (``"\\udce9"``, which reaches us from JSON
    that the json module parsed) or an integer beyond 64 bits. Datetimes
    (UTC) and enums are written as orjson writes them.
    """
    try:
        return orjson.dumps(value, default=_orjson_default).decode()
    except TypeError:
        return json.dumps(value, separators=(",", ":"), default=_json_default)


def _orjson_default(value: Any) -> Any:
    """A datetime subclass (freezegun's, say), which orjson does not write itself."""
    if isinstance(value, datetime):
        return iso(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _json_default(value: Any) -> Any:
    """What orjson writes for the values the json module does not know: `_json_text`."""
    if isinstance(value, datetime):
        return iso(value)
    if isinstance(value, enum.Enum):
        return value.value
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _json_value(text: str) -> Any:
    """A JSON column read back: orjson, or the json module for text orjson refuses.

    Versions before orjson wrote lone surrogates as escapes, and `_json_text`
    still does; the json module reads them.
    """
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


def _dump(model: object) -> str:
    return _json_text(unstructure_for_orjson(model))


def _load(cls: type[T], data: str) -> T:
    try:
        return structure(_json_value(data), cls)
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
        self.lock_customer = self.customer.with_for_update()
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
        self._version_2(limit)

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
        self.v3 = _OnboardingQueries(ignore=ignore, upsert=upsert)

        self._version_4(limit, ignore)

    def _version_4(self, limit: sa.BindParameter[Any], ignore: Callable[..., sa.Insert]) -> None:
        """Products, references and the subscription-product index (schema version 4)."""
        p = _products
        products = sa.select(p.c.data).where(p.c.tenant == _p("tenant")).order_by(p.c.id)
        self.products_first = products.limit(limit)
        self.products_after = products.where(p.c.id > _p("after")).limit(limit)
        rf, sp = _references, _subscription_products
        self.add_reference = ignore(rf, "tenant", "mode", "source_id", "relation", "target_id")
        in_mode = (rf.c.tenant == _p("tenant"), rf.c.mode == _p("mode"))
        self.references_from = (
            sa.select(rf.c.relation, rf.c.target_id)
            .where(*in_mode, rf.c.source_id == _p("id"))
            .order_by(rf.c.relation, rf.c.target_id)
        )
        self.references_to = (
            sa.select(rf.c.relation, rf.c.source_id)
            .where(*in_mode, rf.c.target_id == _p("id"))
            .order_by(rf.c.relation, rf.c.source_id)
        )
        sub_key = (
            sp.c.tenant == _p("tenant"),
            sp.c.mode == _p("mode"),
            sp.c.subscription_id == _p("subscription_id"),
        )
        self.subscription_products = sa.select(sp.c.stripe_product_id).where(*sub_key)
        self.unindex_subscription_product = sa.delete(sp).where(
            *sub_key, sp.c.stripe_product_id == _p("stripe_product_id")
        )
        self.index_subscription_product = ignore(
            sp, "tenant", "mode", "stripe_product_id", "subscription_id"
        )
        self.subscriptions_for_product = (
            sa.select(sp.c.subscription_id)
            .where(
                sp.c.tenant == _p("tenant"),
                sp.c.mode == _p("mode"),
                sp.c.stripe_product_id == _p("stripe_product_id"),
            )
            .order_by(sp.c.subscription_id)
        )

    def _version_2(self, limit: sa.BindParameter[Any]) -> None:
        """The statements of schema version 2 (the webhook inbox), and per-storage caches."""
        #: (statement, parameter names) -> its `_DriverForm`, or None (see `_driver_form`).
        self.driver_forms: dict[tuple[sa.Executable, frozenset[str]], _DriverForm] = {}
        #: id(statement) -> (statement, parameter names, form) of its last run: the
        #: lookup of the common case, one statement always run with the same names,
        #: without building and hashing a key (a statement's hash is a Python call).
        self.last_forms: dict[int, tuple[sa.Executable, frozenset[str], _DriverForm]] = {}
        #: Stored tenant JSON -> the `Tenant` it reads as (tenants are looked up per webhook).
        self.tenants: dict[str, Tenant] = {}
        e = _events
        event = sa.select(e.c.data, e.c.payload)
        self.event = event.where(e.c.event_id == _p("event_id"))
        self.lock_event = self.event.with_for_update()
        # The body is written once: an update keeps it, or fills it in when missing.
        body = sa.bindparam("k_payload", type_=sa.LargeBinary)
        self.update_event = (
            sa.update(e)
            .where(e.c.event_id == _p("event_id"))
            .values(payload=sa.func.coalesce(e.c.payload, body))
        )
        # The outcome is written into the SQL (one statement per outcome) so that
        # the partial index of waiting events (version 5) can serve it.
        self.events_with_outcome: dict[EventOutcome, sa.Select[Any]] = {}
        self.events_with_outcome_for: dict[EventOutcome, sa.Select[Any]] = {}
        for outcome in EventOutcome:
            by_outcome = (
                event.where(e.c.outcome == sa.literal_column(f"'{outcome.value}'"))
                .order_by(e.c.received_us, e.c.event_id)
                .limit(limit)
            )
            self.events_with_outcome[outcome] = by_outcome
            self.events_with_outcome_for[outcome] = by_outcome.where(e.c.account == _p("account"))
        # The inbox: due_us is set only while an event is pending or awaits a
        # retry, so the claim walks the index in due order and nothing else.
        self.due_events = (
            sa.select(e.c.event_id, e.c.data, e.c.payload)
            .where(e.c.due_us <= _p("now"))
            .order_by(e.c.due_us, e.c.event_id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        # Run once per claimed event, in one executemany (no IN list to expand):
        # the lease, and the event with its claim counted.
        self.lease_event = (
            sa.update(e)
            .where(e.c.event_id == _p("event_id"))
            .values(due_us=_p("until"), data=_p("data"))
        )
        #: (since?, number of types or None, after?) -> the listing statement.
        self.list_events: dict[tuple[bool, int | None, bool], sa.Executable] = {}
        # Where a page of list_events starts (schema version 6): SQLite pages
        # by seq and finds the first of a minute in rb_event_minutes, which
        # triggers lower to a stored or updated event's seq when it is lower.
        self.event_received = sa.select(e.c.received_us).where(e.c.event_id == _p("event_id"))
        self.event_seq = sa.text("SELECT seq FROM rb_events WHERE event_id = :k_event_id")
        self.first_seq_since = sa.text(
            f"SELECT min(first_seq) FROM rb_event_minutes WHERE minute >= :k_since / {_MINUTE_US}"  # noqa: S608 (constants only)
        )
        #: Number of ids -> the statement locking that many events (`_lock_events`).
        self.lock_events: dict[int, sa.Select[Any]] = {}


class _OnboardingQueries:
    """The statements of schema version 3: pending Connect onboardings and invitations."""

    def __init__(
        self, *, ignore: Callable[..., sa.Insert], upsert: Callable[..., sa.Insert]
    ) -> None:
        pc, iv = _pending_connections, _invitations
        self.pending_connection = sa.select(pc.c.data).where(pc.c.key == _p("key"))
        self.put_pending_connection = upsert(pc, "key")
        self.delete_pending_connection = sa.delete(pc).where(pc.c.key == _p("key"))
        invitation_key = (
            iv.c.tenant == _p("tenant"),
            iv.c.mode == _p("mode"),
            iv.c.stripe_customer_id == _p("stripe_customer_id"),
        )
        self.invitation = sa.select(iv.c.data).where(*invitation_key)
        self.lock_invitation = self.invitation.with_for_update()
        self.insert_invitation = ignore(iv, "tenant", "mode", "stripe_customer_id")
        self.put_invitation = upsert(iv, "tenant", "mode", "stripe_customer_id")
        self.due_invitations = (
            sa.select(iv.c.data)
            .where(iv.c.due_us <= _p("now"))
            .order_by(iv.c.created_us, iv.c.tenant, iv.c.stripe_customer_id)
            .limit(_p("limit"))
        )


def _lock_events(count: int) -> sa.Select[Any]:
    """Lock ``count`` events by id (k_event_id_0...), in id order: FOR UPDATE on PostgreSQL."""
    e = _events
    ids = [_p(f"event_id_{i}") for i in range(count)]
    return (
        sa.select(e.c.data, e.c.payload)
        .where(e.c.event_id.in_(ids))
        .order_by(e.c.event_id)
        .with_for_update()
    )


def _list_events(since: bool, types: int | None, after: bool) -> sa.Select[Any]:
    """PostgreSQL: stored events in received order; ``types`` filters on that many types."""
    e = _events
    stmt = sa.select(e.c.data, e.c.payload).order_by(e.c.received_us, e.c.event_id)
    if since:
        stmt = stmt.where(e.c.received_us >= _p("since"))
    if types is not None:
        stmt = stmt.where(e.c.event_type.in_([_p(f"type_{i}") for i in range(types)]))
    if after:
        stmt = stmt.where(
            sa.or_(
                e.c.received_us > _p("after_us"),
                sa.and_(e.c.received_us == _p("after_us"), e.c.event_id > _p("after_id")),
            )
        )
    return stmt.limit(_p("limit"))


def _list_events_sqlite(since: bool, types: int | None) -> sa.TextClause:
    """SQLite: stored events in stored order from seq ``k_from`` (schema version 6)."""
    where = ["seq >= :k_from"]
    if since:
        where.append("received_us >= :k_since")
    if types is not None:
        where.append(f"event_type IN ({', '.join(f':k_type_{i}' for i in range(types))})")
    return sa.text(
        f"SELECT data, payload FROM rb_events WHERE {' AND '.join(where)} "  # noqa: S608 (constants only)
        "ORDER BY seq LIMIT :k_limit"
    )


# -- running statements on the driver ----------------------------------------------


@attrs.frozen
class _DriverForm:
    """A statement as the driver runs it: its SQL, and the parameters the caller does not pass."""

    sql: str
    #: Values of parameters the caller does not pass (such as SQLite's OFFSET).
    defaults: Mapping[str, Any]


def _driver_form(stmt: sa.Executable, keys: frozenset[str], dialect: sa.Dialect) -> _DriverForm:
    """The SQL SQLAlchemy compiles for ``stmt`` with these parameters, to run on the cursor.

    SQLAlchemy's per-execution work (building the execution context, events,
    result metadata) costs about ten times the driver's own call on SQLite,
    for statements that are already compiled. So every statement runs its
    compiled SQL on the driver's cursor, with parameters passed by name, and
    must not need SQLAlchemy at execution time: no type processing of a
    parameter or a result, no IN list expanded per call. A test compiles every
    statement on both dialects, so that a statement breaking this rule fails
    there rather than here.
    """
    if not isinstance(stmt, sa.ClauseElement):
        raise StorageError(f"internal error: not a statement: {stmt!r}")
    compiled = stmt.compile(dialect=dialect, column_keys=sorted(keys))
    if (
        not isinstance(compiled, sa.sql.compiler.SQLCompiler)
        or compiled.positional
        or compiled.escaped_bind_names
        or "POSTCOMPILE" in compiled.string
    ):
        raise StorageError(f"internal error: a statement cannot run on the driver: {compiled}")
    for bind in compiled.binds.values():
        # Both drivers take bytes for a binary column as they are.
        if isinstance(bind.type, sa.LargeBinary):
            continue
        if bind.type.dialect_impl(dialect).bind_processor(dialect) is not None:
            raise StorageError(f"internal error: parameter {bind.key} needs type processing")
    for column in getattr(stmt, "selected_columns", ()):
        if column.type.dialect_impl(dialect).result_processor(dialect, None) is not None:
            raise StorageError(f"internal error: column {column} needs type processing")
    defaults = {
        name: bind.value
        for name, bind in compiled.binds.items()
        if name not in keys and not bind.required
    }
    return _DriverForm(compiled.string, defaults)


_NO_PARAMS: Final[Mapping[str, Any]] = MappingProxyType({})
_TENANT_CACHE: Final = 4096


# -- the transaction ------------------------------------------------------------


class _SQLTransaction:
    """The `Transaction` port over one pooled driver connection, inside BEGIN ... COMMIT.

    The transaction is driven on the driver's connection itself (``BEGIN
    IMMEDIATE`` on SQLite, psycopg's implicit ``BEGIN``, savepoints by name),
    not through SQLAlchemy's `Connection`, whose bookkeeping cost several times
    an empty SQLite transaction; SQLAlchemy builds the statements, compiles
    them once and pools the connections.

    After a statement fails, the transaction refuses further work (PostgreSQL
    would anyway), and a block that swallowed the error still ends in a
    rollback and a `StorageError` rather than in a silent partial commit.
    """

    __slots__ = (
        "_absent_mirrors",
        "_cursor",
        "_customer_memo",
        "_dbapi",
        "_dialect",
        "_postgres",
        "_q",
        "_rowcount",
        "_savepoints",
        "_tenant_memo",
        "broken",
        "failed",
        "failed_transient",
    )

    def __init__(self, dbapi_connection: Any, dialect: sa.Dialect, queries: _Queries) -> None:
        self._dbapi = dbapi_connection
        self._dialect = dialect
        self._postgres = dialect.name == "postgresql"
        self._q = queries
        self._cursor: Any = None
        #: The row count of the last statement `_run` ran.
        self._rowcount = -1
        self._savepoints = 0
        #: Why the transaction can no longer commit, once a statement has failed.
        self.failed: str | None = None
        #: Whether that failure may pass if the transaction runs again.
        self.failed_transient = False
        #: The connection was lost: the pool must not hand it out again.
        self.broken = False
        #: Tenant lookups already made in this transaction (a batch of webhooks
        #: asks for the same few tenants again and again). Forgotten whenever
        #: this transaction writes a tenant or rolls back to a savepoint.
        self._tenant_memo: dict[tuple[str, str], Tenant | None] = {}
        #: Mirror keys that `get_mirror` found absent in this transaction: their
        #: `mirror` tries the insert first. Only a hint: either order is correct.
        self._absent_mirrors: set[tuple[str, str, str, str]] = set()
        #: Customer rows this transaction holds locked, by (tenant, id): on
        #: PostgreSQL those it read FOR UPDATE; on SQLite every one it read,
        #: since BEGIN IMMEDIATE holds the database's write lock. No one else
        #: can change them before the commit, so they are not read again. A
        #: customer this transaction writes is forgotten (read afresh when
        #: asked for), and so is every one when a savepoint rolls back.
        self._customer_memo: dict[tuple[str, str], Customer] = {}

    def forget(self) -> None:
        """Drop the remembered tenant lookups and customers (a savepoint rolled back)."""
        self._tenant_memo.clear()
        self._customer_memo.clear()

    def failure(self) -> str | None:
        """Why the transaction can no longer commit, or None."""
        return self.failed

    # -- driving the transaction (used by SQLStorage) ---------------------------
    def _error(self, sql: str, params: Any, exc: Any) -> StorageError:
        """`StorageError` for a driver error, noting a lost connection."""
        dialect = self._dialect
        wrapped = sa.exc.DBAPIError.instance(
            sql, params, exc, dialect.loaded_dbapi.Error, dialect=dialect
        )
        transient = _transient(exc)
        if dialect.is_disconnect(exc, self._dbapi, self._cursor):
            self.broken = True
            # The server rolled the transaction back: running it again on a
            # new connection is safe, unless the COMMIT itself was cut off
            # (it may have committed).
            transient = sql != "COMMIT"
        error = StorageError(_describe(wrapped), transient=transient)
        error.__cause__ = wrapped
        return error

    def _control(self, sql: str) -> None:
        """Run a transaction-control statement (BEGIN, SAVEPOINT ...) on the cursor."""
        try:
            if self._cursor is None:
                self._cursor = self._dbapi.cursor()
            self._cursor.execute(sql)
        except self._dialect.loaded_dbapi.Error as exc:
            error = self._error(sql, (), exc)
            raise error from error.__cause__

    def begin(self) -> None:
        # IMMEDIATE takes SQLite's write lock up front: a DEFERRED transaction
        # that reads and then writes fails with SQLITE_BUSY when another writer
        # got in first, and busy_timeout cannot help it. psycopg sends BEGIN
        # itself, with the first statement.
        if self._dialect.name == "sqlite":
            self._control("BEGIN IMMEDIATE")

    def commit(self) -> None:
        try:
            self._dbapi.commit()
        except self._dialect.loaded_dbapi.Error as exc:
            error = self._error("COMMIT", (), exc)
            raise error from error.__cause__

    def rollback(self) -> None:
        try:
            self._dbapi.rollback()
        except self._dialect.loaded_dbapi.Error as exc:
            error = self._error("ROLLBACK", (), exc)
            raise error from error.__cause__

    def in_transaction(self) -> bool:
        """Whether the driver still has a transaction open (a rollback failed), or cannot say."""
        try:
            if not self._postgres:
                return bool(self._dbapi.in_transaction)
            from psycopg.pq import TransactionStatus

            return bool(self._dbapi.info.transaction_status != TransactionStatus.IDLE)
        except self._dialect.loaded_dbapi.Error:
            return True  # unusable (closed, say): not worth keeping

    def savepoint(self) -> str:
        self._savepoints += 1
        name = f"rb_savepoint_{self._savepoints}"
        self._control(f"SAVEPOINT {name}")
        return name

    def release(self, name: str) -> None:
        self._control(f"RELEASE SAVEPOINT {name}")

    def rollback_to(self, name: str) -> None:
        self._control(f"ROLLBACK TO SAVEPOINT {name}")

    # -- statements --------------------------------------------------------------
    def _run(self, stmt: sa.Executable, params: Mapping[str, Any] = _NO_PARAMS) -> list[Any]:
        """Run ``stmt``; the rows it returned (none for a write), its row count in `_rowcount`."""
        if self.failed is not None:
            raise StorageError(
                f"the transaction was aborted by an earlier error ({self.failed}); "
                "leave the block so that it rolls back"
            )
        last = self._q.last_forms.get(id(stmt))
        if last is not None and last[0] is stmt and params.keys() == last[1]:
            form = last[2]
        else:
            form = self._form(stmt, frozenset(params))
        args = {**form.defaults, **params} if form.defaults else params
        try:
            cursor = self._cursor
            if cursor is None:
                cursor = self._cursor = self._dbapi.cursor()
            cursor.execute(form.sql, args)
            self._rowcount = cursor.rowcount
            return cursor.fetchall() if cursor.description is not None else []
        except self._dialect.loaded_dbapi.Error as exc:
            error = self._error(form.sql, args, exc)
            self.failed, self.failed_transient = str(error), error.transient
            raise error from error.__cause__

    def _form(self, stmt: sa.Executable, keys: frozenset[str]) -> _DriverForm:
        """``stmt``'s `_DriverForm` for these parameter names, compiled once."""
        forms = self._q.driver_forms
        form = forms.get((stmt, keys))
        if form is None:
            form = forms[(stmt, keys)] = _driver_form(stmt, keys, self._dialect)
        self._q.last_forms[id(stmt)] = (stmt, keys, form)
        return form

    def _write(self, stmt: sa.Executable, params: Mapping[str, Any]) -> int:
        """Run a write; the rows it inserted, updated or deleted."""
        self._run(stmt, params)
        return self._rowcount

    def _row(self, stmt: sa.Executable, params: Mapping[str, Any] = _NO_PARAMS) -> Any:
        """The one row ``stmt`` returned, or None."""
        rows = self._run(stmt, params)
        if len(rows) > 1:
            raise StorageError(f"expected at most one row, got {len(rows)}")
        return rows[0] if rows else None

    def _scalar(self, stmt: sa.Executable, params: Mapping[str, Any] = _NO_PARAMS) -> Any:
        """The first column of the one row ``stmt`` returned, or None."""
        row = self._row(stmt, params)
        return None if row is None else row[0]

    def _column(self, stmt: sa.Executable, params: Mapping[str, Any]) -> list[Any]:
        """The first column of every row ``stmt`` returned."""
        return [row[0] for row in self._run(stmt, params)]

    def _run_many(self, stmt: sa.Executable, rows: Sequence[Mapping[str, Any]]) -> int:
        """Run one statement for each of ``rows`` (psycopg pipelines them); rows changed."""
        if not rows:
            return 0
        if self.failed is not None:
            raise StorageError(f"the transaction was aborted by an earlier error ({self.failed})")
        form = self._form(stmt, frozenset(rows[0]))
        try:
            if self._cursor is None:
                self._cursor = self._dbapi.cursor()
            self._cursor.executemany(form.sql, rows)
            return int(self._cursor.rowcount)
        except self._dialect.loaded_dbapi.Error as exc:
            error = self._error(form.sql, rows[0], exc)
            self.failed, self.failed_transient = str(error), error.transient
            raise error from error.__cause__

    def _one(self, cls: type[T], stmt: sa.Executable, params: Mapping[str, Any]) -> T | None:
        data = self._scalar(stmt, params)
        return None if data is None else _load(cls, data)

    def _all(self, cls: type[T], stmt: sa.Executable, params: Mapping[str, Any]) -> list[T]:
        return [_load(cls, row[0]) for row in self._run(stmt, params)]

    # -- tenants -------------------------------------------------------------
    def _tenant(
        self, memo_key: tuple[str, str], stmt: sa.Executable, params: Mapping[str, Any]
    ) -> Tenant | None:
        memo = self._tenant_memo
        if memo_key in memo and self.failed is None:  # after a failure, _run raises
            return memo[memo_key]
        found = self._read_tenant(stmt, params)
        memo[memo_key] = found
        return found

    def _read_tenant(self, stmt: sa.Executable, params: Mapping[str, Any]) -> Tenant | None:
        data = self._scalar(stmt, params)
        if data is None:
            return None
        # Tenants are frozen, so one read of the same stored JSON can be shared.
        cache = self._q.tenants
        tenant = cache.get(data)
        if tenant is None:
            tenant = _load(Tenant, data)
            if len(cache) >= _TENANT_CACHE:
                cache.clear()
            cache[data] = tenant
        return tenant

    def get_tenant(self, tenant_id: str) -> Tenant | None:
        return self._tenant(("id", tenant_id), self._q.tenant, {"k_id": tenant_id})

    def tenant_by_account(self, stripe_account_id: str) -> Tenant | None:
        params = {"k_account": stripe_account_id}
        return self._tenant(("account", stripe_account_id), self._q.tenant_by_account, params)

    def direct_tenant(self) -> Tenant | None:
        return self._tenant(("direct", ""), self._q.direct_tenant, {})

    def put_tenant(self, tenant: Tenant) -> None:
        # As in InMemoryStorage, the latest tenant to claim an account (or to
        # be direct) is the one the lookups find.
        self._tenant_memo.clear()
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
        return self._customer(tenant, customer_id, self._q.customer, lock=False)

    def lock_customer(self, tenant: str, customer_id: str) -> Customer | None:
        return self._customer(tenant, customer_id, self._q.lock_customer, lock=True)

    def _customer(
        self, tenant: str, customer_id: str, stmt: sa.Executable, *, lock: bool
    ) -> Customer | None:
        key = (tenant, customer_id)
        found = self._customer_memo.get(key) if self.failed is None else None
        if found is None:  # (after a failure, _run raises)
            found = self._one(Customer, stmt, {"k_tenant": tenant, "k_id": customer_id})
            if found is not None and (lock or not self._postgres):
                self._customer_memo[key] = found
        return found

    def customer_by_link(self, tenant: str, mode: Mode, stripe_customer_id: str) -> Customer | None:
        params = {"k_tenant": tenant, "k_mode": mode.value, "k_stripe_id": stripe_customer_id}
        found = self._one(Customer, self._q.customer_by_link, params)
        if found is not None and not self._postgres:
            self._customer_memo.setdefault((tenant, found.id), found)
        return found

    def _link_conflict(self, customer: Customer) -> StorageError | None:
        """The error to raise when another customer of the tenant holds ``customer``'s link."""
        link = customer.link
        if link is None:
            return None
        held = self._customer_memo.get((customer.tenant, customer.id))
        if held is not None and held.link == link:
            return None  # it holds that link, locked: the unique index keeps it its own
        params = {
            "k_tenant": customer.tenant,
            "k_mode": link.mode.value,
            "k_stripe_id": link.stripe_customer_id,
        }
        holder: str | None = self._scalar(self._q.link_holder, params)
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
        self._customer_memo.pop((customer.tenant, customer.id), None)
        return self._write(self._q.insert_customer, _customer_row(customer)) == 1

    def put_customer(self, customer: Customer) -> None:
        # Checked first, so that a taken link is a clear error that leaves the
        # transaction usable; the unique index still catches a concurrent race.
        conflict = self._link_conflict(customer)
        if conflict is not None:
            raise conflict
        self._customer_memo.pop((customer.tenant, customer.id), None)
        self._run(self._q.put_customer, _customer_row(customer))

    def delete_customer(self, tenant: str, customer_id: str) -> bool:
        self._customer_memo.pop((tenant, customer_id), None)
        params = {"k_tenant": tenant, "k_id": customer_id}
        return self._write(self._q.delete_customer, params) == 1

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
        return self._write(self._q.record_event, _event_row(event)) == 1

    def get_event(self, event_id: str) -> ProcessedEvent | None:
        row = self._row(self._q.event, {"k_event_id": event_id})
        return None if row is None else _load_event(row)

    def update_event(self, event: ProcessedEvent) -> None:
        if self._write(self._q.update_event, _event_update(event)) != 1:
            raise StorageError(f"no stored event {event.event_id!r} to update")

    def update_events(self, events: Sequence[ProcessedEvent]) -> None:
        # One executemany: psycopg pipelines it into about one round trip.
        updated = self._run_many(self._q.update_event, [_event_update(e) for e in events])
        if updated != len(events):
            ids = ", ".join(repr(e.event_id) for e in events[:5])
            raise StorageError(f"some of the events {ids}... are not stored")

    def events_with_outcome(
        self, outcome: EventOutcome, *, account: str | None = None, limit: int = 100
    ) -> Sequence[ProcessedEvent]:
        params: dict[str, Any] = {"k_limit": limit}
        stmt = self._q.events_with_outcome[outcome]
        if account is not None:
            params["k_account"] = account
            stmt = self._q.events_with_outcome_for[outcome]
        return [_load_event(row) for row in self._run(stmt, params)]

    def lock_event(self, event_id: str) -> ProcessedEvent | None:
        # FOR UPDATE on PostgreSQL; SQLite's BEGIN IMMEDIATE already serialises writers.
        row = self._row(self._q.lock_event, {"k_event_id": event_id})
        return None if row is None else _load_event(row)

    def lock_events(self, event_ids: Sequence[str]) -> Sequence[ProcessedEvent]:
        ids = sorted(set(event_ids))
        if not ids:
            return []
        stmt = self._q.lock_events.get(len(ids))
        if stmt is None:
            stmt = self._q.lock_events[len(ids)] = _lock_events(len(ids))
        params = {f"k_event_id_{i}": event_id for i, event_id in enumerate(ids)}
        return [_load_event(row) for row in self._run(stmt, params)]

    def claim_events(
        self, now: datetime, *, limit: int, lease: timedelta
    ) -> Sequence[ProcessedEvent]:
        params = {"k_now": _micros(now), "k_limit": limit}
        rows = self._run(self._q.due_events, params)
        if not rows:
            return []
        claimed = [_load_event(row, 1) for row in rows]
        claimed = [attrs.evolve(e, claims=e.claims + 1) for e in claimed]
        # The lease moves the due time: a crashed worker's events fall due again.
        until = _micros(now + lease)
        leases = [
            {"k_event_id": e.event_id, "k_until": until, "k_data": _event_data(e)} for e in claimed
        ]
        self._run_many(self._q.lease_event, leases)
        return claimed

    def list_events(
        self,
        *,
        since: datetime | None = None,
        types: Collection[str] | None = None,
        after: str | None = None,
        limit: int = 100,
    ) -> Sequence[ProcessedEvent]:
        # The cursor first: an unknown one is an error even when nothing would match.
        position: int | None = None
        if after is not None:
            cursor = self._q.event_received if self._postgres else self._q.event_seq
            position = self._cursor_position(cursor, after)
        params: dict[str, Any] = {"k_limit": limit}
        if since is not None:
            params["k_since"] = _micros(since)
        wanted: int | None = None
        if types is not None:
            names = sorted(set(types))
            if not names:
                return []
            wanted = len(names)
            params.update((f"k_type_{i}", name) for i, name in enumerate(names))
        stmt: sa.Executable | None
        if self._postgres:
            if position is not None:
                params["k_after_us"], params["k_after_id"] = position, after
            shape = (since is not None, wanted, after is not None)
            stmt = self._q.list_events.get(shape)
            if stmt is None:
                stmt = self._q.list_events[shape] = _list_events(*shape)
        else:
            if position is not None:
                start = position + 1  # pages after the first continue from their cursor
            elif since is not None:
                start = self._scalar(self._q.first_seq_since, {"k_since": params["k_since"]})
                if start is None:
                    return []  # nothing received in or after that minute
            else:
                start = 0
            params["k_from"] = start
            shape = (since is not None, wanted, False)
            stmt = self._q.list_events.get(shape)
            if stmt is None:
                stmt = self._q.list_events[shape] = _list_events_sqlite(since is not None, wanted)
        return [_load_event(row) for row in self._run(stmt, params)]

    def _cursor_position(self, stmt: sa.Executable, event_id: str) -> int:
        found = self._scalar(stmt, {"k_event_id": event_id})
        if found is None:
            raise InvalidArgument(
                f"list_events(after={event_id!r}): no such stored event to continue after"
            )
        return int(found)

    # -- mirrors -------------------------------------------------------------
    def mirror(self, record: MirrorRecord) -> MirrorResult:
        row = _mirror_row(record)
        key = _mirror_key(row)
        marker = row["marker_us"]
        hint = (row["kind"], record.tenant, row["mode"], record.stripe_id)
        if hint in self._absent_mirrors:
            # Read as absent earlier in this transaction: most likely still
            # absent, so insert at once; if a row is there after all, the
            # rounds below lock and compare it as usual.
            self._absent_mirrors.discard(hint)
            if self._write(self._q.insert_mirror, row) == 1:
                return MirrorResult.INSERTED
        # At most two rounds: when the insert finds a row that a concurrent
        # transaction committed meanwhile, the second round locks and compares it.
        for _ in range(2):
            stored = self._scalar(self._q.lock_mirror, key)
            if stored is None:
                if self._write(self._q.insert_mirror, row) == 1:
                    return MirrorResult.INSERTED
                continue
            if marker < stored:
                return MirrorResult.STALE
            self._run(self._q.update_mirror, key | {c: row[c] for c in _MIRROR_VALUES})
            return MirrorResult.TIE if marker == stored else MirrorResult.APPLIED
        raise StorageError(
            f"{type(record).__name__} {record.stripe_id!r} kept changing during its upsert"
        )

    def insert_mirror(self, record: MirrorRecord) -> bool:
        # ON CONFLICT DO NOTHING waits for a concurrent insert of the same key
        # to commit or roll back, so exactly one transaction inserts.
        return self._write(self._q.insert_mirror, _mirror_row(record)) == 1

    def get_mirror(self, kind: type[R], tenant: str, mode: Mode, stripe_id: str) -> R | None:
        params = {
            "k_kind": _kind_name(kind),
            "k_tenant": tenant,
            "k_mode": mode.value,
            "k_stripe_id": stripe_id,
        }
        found = self._one(kind, self._q.mirror, params)
        if found is None:
            self._absent_mirrors.add((params["k_kind"], tenant, mode.value, stripe_id))
        return found

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

    # -- Connect onboarding in progress (issue 3) ------------------------------
    def put_pending_connection(self, pending: PendingConnection) -> None:
        row = {"key": pending.key, "tenant": pending.tenant, "data": _dump(pending)}
        self._run(self._q.v3.put_pending_connection, row)

    def get_pending_connection(self, key: str) -> PendingConnection | None:
        return self._one(PendingConnection, self._q.v3.pending_connection, {"k_key": key})

    def take_pending_connection(self, key: str) -> PendingConnection | None:
        found = self.get_pending_connection(key)
        if found is None:
            return None
        # A concurrent taker's DELETE waits for ours to commit, then removes
        # nothing: only the transaction whose DELETE removed the row gets it.
        deleted = self._write(self._q.v3.delete_pending_connection, {"k_key": key})
        return found if deleted == 1 else None

    # -- invitations (issue 3) --------------------------------------------------
    def insert_invitation(self, invitation: Invitation) -> bool:
        return self._write(self._q.v3.insert_invitation, _invitation_row(invitation)) == 1

    def get_invitation(self, tenant: str, mode: Mode, stripe_customer_id: str) -> Invitation | None:
        params = _invitation_key(tenant, mode, stripe_customer_id)
        return self._one(Invitation, self._q.v3.invitation, params)

    def put_invitation(self, invitation: Invitation) -> None:
        self._run(self._q.v3.put_invitation, _invitation_row(invitation))

    def claim_invitation(
        self, tenant: str, mode: Mode, stripe_customer_id: str, *, now: datetime, until: datetime
    ) -> Invitation | None:
        params = _invitation_key(tenant, mode, stripe_customer_id)
        found = self._one(Invitation, self._q.v3.lock_invitation, params)
        if found is None or found.state is not InvitationState.PENDING:
            return None
        if found.next_attempt_at is not None and found.next_attempt_at > now:
            return None
        claimed = attrs.evolve(found, next_attempt_at=until)
        self.put_invitation(claimed)
        return claimed

    def due_invitations(self, now: datetime, *, limit: int) -> Sequence[Invitation]:
        params = {"k_now": _micros(now), "k_limit": limit}
        return self._all(Invitation, self._q.v3.due_invitations, params)

    # -- products, references and the subscription-product index (issue 4) ------
    def list_products(self, tenant: str, *, after: str | None, limit: int) -> Sequence[Product]:
        params: dict[str, Any] = {"k_tenant": tenant, "k_limit": limit}
        if after is None:
            return self._all(Product, self._q.products_first, params)
        params["k_after"] = after
        return self._all(Product, self._q.products_after, params)

    def add_reference(self, reference: StripeReference) -> bool:
        row = {
            "tenant": reference.tenant,
            "mode": reference.mode.value,
            "source_id": reference.source_id,
            "relation": reference.relation.value,
            "target_id": reference.target_id,
        }
        return self._write(self._q.add_reference, row) == 1

    def references_from(self, tenant: str, mode: Mode, source_id: str) -> Sequence[StripeReference]:
        params = {"k_tenant": tenant, "k_mode": mode.value, "k_id": source_id}
        return [
            StripeReference(tenant, mode, source_id, Relation(relation), target)
            for relation, target in map(tuple, self._run(self._q.references_from, params))
        ]

    def references_to(self, tenant: str, mode: Mode, target_id: str) -> Sequence[StripeReference]:
        params = {"k_tenant": tenant, "k_mode": mode.value, "k_id": target_id}
        return [
            StripeReference(tenant, mode, source, Relation(relation), target_id)
            for relation, source in map(tuple, self._run(self._q.references_to, params))
        ]

    def set_subscription_products(
        self, tenant: str, mode: Mode, subscription_id: str, stripe_product_ids: Collection[str]
    ) -> None:
        key = {"k_tenant": tenant, "k_mode": mode.value, "k_subscription_id": subscription_id}
        old = set(self._column(self._q.subscription_products, key))
        new = set(stripe_product_ids)
        for product in sorted(old - new):
            self._run(self._q.unindex_subscription_product, key | {"k_stripe_product_id": product})
        for product in sorted(new - old):
            row = {
                "tenant": tenant,
                "mode": mode.value,
                "stripe_product_id": product,
                "subscription_id": subscription_id,
            }
            self._run(self._q.index_subscription_product, row)

    def subscriptions_for_stripe_product(
        self, tenant: str, mode: Mode, stripe_product_id: str
    ) -> Sequence[str]:
        params = {
            "k_tenant": tenant,
            "k_mode": mode.value,
            "k_stripe_product_id": stripe_product_id,
        }
        return list(self._column(self._q.subscriptions_for_product, params))


#: The columns of a mirrored record besides its key (what an update sets).
_MIRROR_VALUES: Final = ("stripe_customer_id", "marker_us", "data")


def _mirror_row(record: MirrorRecord) -> dict[str, Any]:
    """A mirrored record's columns: its key (kind, tenant, mode, stripe_id), then the others."""
    return {
        "kind": _kind_name(type(record)),
        "tenant": record.tenant,
        "mode": record.mode.value,
        "stripe_id": record.stripe_id,
        "stripe_customer_id": record.stripe_customer_id,
        "marker_us": _micros(record.marker),
        "data": _dump(record),
    }


def _mirror_key(row: Mapping[str, Any]) -> dict[str, Any]:
    """The key of a `_mirror_row`, as ``k_`` parameters."""
    return {
        "k_kind": row["kind"],
        "k_tenant": row["tenant"],
        "k_mode": row["mode"],
        "k_stripe_id": row["stripe_id"],
    }


def _invitation_key(tenant: str, mode: Mode, stripe_customer_id: str) -> dict[str, Any]:
    return {"k_tenant": tenant, "k_mode": mode.value, "k_stripe_customer_id": stripe_customer_id}


def _invitation_row(invitation: Invitation) -> dict[str, Any]:
    due: int | None = None
    if invitation.state is InvitationState.PENDING:
        due = _micros(invitation.next_attempt_at or invitation.created_at)
    return {
        "tenant": invitation.tenant,
        "mode": invitation.mode.value,
        "stripe_customer_id": invitation.stripe_customer_id,
        "state": invitation.state.value,
        "due_us": due,
        "created_us": _micros(invitation.created_at),
        "data": _dump(invitation),
    }


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
    outcome = event.outcome
    due: datetime | None = None
    if outcome is EventOutcome.PENDING:
        due = event.next_attempt_at or event.received_at
    elif outcome is EventOutcome.FAILED:
        due = event.next_attempt_at
    return {
        "event_id": event.event_id,
        "outcome": outcome.value,
        "account": event.account,
        "received_us": _micros(event.received_at),
        "data": _event_data(event),
        "event_type": event.type,
        "payload": event.payload,
        "due_us": None if due is None else _micros(due),
    }


def _event_update(event: ProcessedEvent) -> dict[str, Any]:
    """`_event_row` as the parameters of ``update_event``."""
    row = _event_row(event)
    del row["event_id"]
    row["k_event_id"] = event.event_id
    row["k_payload"] = row.pop("payload")
    return row


def _event_data(event: ProcessedEvent) -> str:
    """``data`` for an event: the converter's JSON of it, less the body (it has a column).

    Written out by hand because every webhook writes its event twice; a test
    checks that it matches the converter field for field.
    """
    return _json_text(
        {
            "event_id": event.event_id,
            "type": event.type,
            "mode": event.mode,
            "created": event.created,
            "outcome": event.outcome,
            "tenant": event.tenant,
            "account": event.account,
            "api_version": event.api_version,
            "reason": event.reason,
            "attempts": event.attempts,
            "received_at": event.received_at,
            "next_attempt_at": event.next_attempt_at,
            "claims": event.claims,
        }
    )


def _load_event(row: Any, at: int = 0) -> ProcessedEvent:
    """The event in a result row holding ``data, payload`` from column ``at``.

    Read by hand, as `_event_data` writes it; anything else (a row written by
    an older version, say) goes through the converter, which names what is wrong.
    """
    data: str = row[at]
    payload: bytes | None = None if row[at + 1] is None else bytes(row[at + 1])
    try:
        fields = _json_value(data)
        next_attempt = fields["next_attempt_at"]
        return ProcessedEvent(
            event_id=fields["event_id"],
            type=fields["type"],
            mode=Mode(fields["mode"]),
            created=datetime.fromisoformat(fields["created"]),
            outcome=EventOutcome(fields["outcome"]),
            tenant=fields["tenant"],
            account=fields["account"],
            api_version=fields["api_version"],
            reason=fields["reason"],
            payload=payload,
            attempts=fields["attempts"],
            received_at=datetime.fromisoformat(fields["received_at"]),
            next_attempt_at=None if next_attempt is None else datetime.fromisoformat(next_attempt),
            claims=fields.get("claims", 0),  # absent before schema version 6's code
        )
    except (ValueError, TypeError, KeyError):
        pass
    event = _load(ProcessedEvent, data)
    return event if payload is None else attrs.evolve(event, payload=payload)


def _kind_name(kind: type[Any]) -> str:
    try:
        return _KIND_NAMES[kind]
    except KeyError:
        raise StorageError(f"{kind.__name__} is not a mirrored kind of record") from None


# -- the storage ----------------------------------------------------------------


#: This process's id, kept current across fork(): os.getpid() is a system
#: call, and every transaction asks (see `SQLStorage._forget_parents_connections`).
_pid = [os.getpid()]
if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork()
    os.register_at_fork(after_in_child=lambda: _pid.__setitem__(0, os.getpid()))


def _process_id() -> int:
    return _pid[0]


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
        #: Connections between two transactions, still checked out of the pool
        #: (see `_checkout`). deque's append and pop are atomic: no lock needed.
        self._idle: deque[PoolProxiedConnection] = deque()
        self._idle_pid = _process_id()
        self._inherited: deque[PoolProxiedConnection] = deque()  # see _forget_parents_connections
        self._fork_lock = threading.Lock()
        try:
            if self._postgres:
                # A pooled connection is checked before use: after a server
                # restart the pool hands out none of the dead ones (kept
                # connections are dropped when one of them is found dead).
                self._engine = sa.create_engine(parsed, pool_pre_ping=True)
            else:
                # Named parameters, as psycopg's: statements run on the driver
                # with the caller's dict (see _driver_form).
                self._engine = sa.create_engine(
                    parsed,
                    connect_args={"timeout": _SQLITE_BUSY_TIMEOUT_S},
                    paramstyle="named",
                )
                sa.event.listen(self._engine, "connect", _on_sqlite_connect)
                sa.event.listen(self._engine, "begin", _on_sqlite_begin)
        except ImportError as exc:
            raise ConfigError(_MISSING_EXTRA) from exc
        except sa.exc.ArgumentError:
            raise ConfigError(f"unusable storage URL {self._display!r}: {_EXPECTED_URL}") from None
        #: How many connections are kept between transactions: the pool's size.
        self._keep_idle: int = getattr(self._engine.pool, "size", lambda: 5)()

    def __repr__(self) -> str:
        return f"<SQLStorage {self._display}>"

    def transaction(self) -> AbstractContextManager[Transaction]:
        """A transaction: commit on normal exit, roll back if the block raises.

        Inside another transaction of this thread, a savepoint of it.

        Raises:
            StorageError: the database could not be reached, a statement or the
                commit failed (nothing was committed), or the storage is closed.
        """
        return _SQLScope(self)

    def _open(self) -> tuple[PoolProxiedConnection, _SQLTransaction]:
        """Begin a transaction on a kept or pooled connection, for `_SQLScope`."""
        if self._closed:
            raise StorageError("SQLStorage is closed")
        self._ensure_schema()
        pooled = self._checkout()
        tx = _SQLTransaction(pooled.dbapi_connection, self._engine.dialect, self._queries)
        try:
            tx.begin()
            self._local.tx = tx
        except StorageError as exc:
            self._checkin(pooled, tx)
            raise StorageError(
                f"cannot begin a transaction: {exc}", transient=exc.transient
            ) from exc.__cause__
        except BaseException:
            self._local.tx = None
            self._checkin(pooled, tx)  # still in a transaction, say: closed, not kept
            raise
        return pooled, tx

    def _close(
        self, pooled: PoolProxiedConnection, tx: _SQLTransaction, exc: BaseException | None
    ) -> None:
        """End what `_open` began: roll back after ``exc``, else commit (for `_SQLScope`)."""
        try:
            self._local.tx = None
            if exc is not None:
                _rollback(tx, exc)
                return
            if tx.failed is not None:
                failure = StorageError(
                    f"rolled back: a statement in this transaction failed ({tx.failed})",
                    transient=tx.failed_transient,
                )
                _rollback(tx, failure)  # a failed rollback is noted on it
                raise failure
            try:
                tx.commit()
            except StorageError as failed:
                _rollback(tx, failed)  # SQLite keeps a transaction whose COMMIT failed open
                raise StorageError(
                    f"commit failed: {failed}", transient=failed.transient
                ) from failed.__cause__
        finally:
            self._checkin(pooled, tx)

    @contextmanager
    def _savepoint(self, tx: _SQLTransaction) -> Iterator[Transaction]:
        aborted = tx.failure()
        if aborted is not None:
            raise StorageError(f"the enclosing transaction was aborted earlier ({aborted})")
        try:
            name = tx.savepoint()
        except StorageError as exc:
            tx.failed = str(exc)
            raise
        try:
            yield tx
        except BaseException as exc:
            tx.forget()  # a tenant or customer written inside the savepoint is undone
            if _rollback_to(tx, name, exc):
                tx.failed = None  # the savepoint undid whatever failed
            raise
        if tx.failed is not None:
            failed = tx.failed
            tx.forget()
            if _rollback_to(tx, name, None):
                tx.failed = None
            raise StorageError(f"rolled back: a statement in this block failed ({failed})")
        try:
            tx.release(name)
        except StorageError as exc:
            tx.failed = str(exc)
            raise

    def close(self) -> None:
        """Close every pooled connection; later transactions raise `StorageError`."""
        self._forget_parents_connections()  # in a forked child, closing them would end the parent's
        self._closed = True
        self._close_idle()
        self._engine.dispose()

    # -- connections and schema -------------------------------------------------
    def _connect(self) -> sa.Connection:
        try:
            return self._engine.connect()
        except sa.exc.SQLAlchemyError as exc:
            raise StorageError(f"cannot connect to {self._display}: {_describe(exc)}") from exc

    def _checkout(self) -> PoolProxiedConnection:
        """A driver connection for one transaction: an idle one, else one from the pool.

        A connection goes back to the pool only when the storage closes, it
        broke, or more than the pool's size are idle: a pool checkout and
        checkin cost about three times an empty SQLite transaction. The pool
        still bounds how many exist, since the idle ones never left it, and
        any thread takes any idle one.
        """
        self._forget_parents_connections()
        try:
            return self._idle.pop()
        except IndexError:
            pass
        try:
            return self._engine.raw_connection()
        except sa.exc.SQLAlchemyError as exc:
            raise StorageError(f"cannot connect to {self._display}: {_describe(exc)}") from exc

    def _checkin(self, pooled: PoolProxiedConnection, tx: _SQLTransaction) -> None:
        """Keep the connection for the next transaction, unless it broke or the storage closed."""
        if tx.broken:
            pooled.invalidate()
            # The server dropped this one, so it may have dropped every idle
            # one too (a restart): let the next transactions connect afresh.
            self._close_idle(invalidate=True)
        if tx.broken or self._closed or tx.in_transaction() or len(self._idle) >= self._keep_idle:
            pooled.close()
            return
        self._idle.append(pooled)
        if self._is_closed():  # close() ran meanwhile and may have missed it
            self._close_idle()

    def _forget_parents_connections(self) -> None:
        """In a forked child: forget the parent's connections, unclosed, as SQLAlchemy advises.

        Closing them would end the parent's sessions (they share the
        sockets). The first thread of the child to get here does it; the new
        pool is in place before any thread can take from it.
        """
        if self._idle_pid == _process_id():
            return
        with self._fork_lock:
            if self._idle_pid == _process_id():
                return
            self._engine.dispose(close=False)
            # Kept referenced, never used: dropping them would only make
            # psycopg warn that a connection was deleted while open.
            self._inherited = self._idle
            self._idle = deque()
            self._idle_pid = _process_id()

    def _close_idle(self, *, invalidate: bool = False) -> None:
        while True:
            try:
                pooled = self._idle.pop()
            except IndexError:
                return
            if invalidate:
                pooled.invalidate()
            pooled.close()

    def _is_closed(self) -> bool:
        return self._closed

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


#: PostgreSQL's deadlock_detected, serialization_failure and lock_not_available.
_TRANSIENT_SQLSTATES: Final = frozenset({"40P01", "40001", "55P03"})


def _transient(exc: Any) -> bool:
    """Whether a driver error may pass if the transaction runs again at once.

    SQLite's "database is locked" is not: it comes after the 30 s busy
    timeout, and waiting that long again would keep Stripe waiting minutes.
    """
    return getattr(exc, "sqlstate", None) in _TRANSIENT_SQLSTATES


def _rollback(tx: _SQLTransaction, exc: BaseException | None) -> bool:
    """Roll back; True when that worked. A failure is noted on ``exc``, never hidden."""
    return _undo(tx.rollback, exc)


def _rollback_to(tx: _SQLTransaction, savepoint: str, exc: BaseException | None) -> bool:
    """Roll back to ``savepoint``; True when that worked (see `_rollback`)."""
    return _undo(lambda: tx.rollback_to(savepoint), exc)


class _SQLScope:
    """One `SQLStorage.transaction` block: a transaction, or a savepoint of the thread's own.

    A plain class rather than a ``@contextmanager`` generator, which cost
    every webhook delivery about 3% of its time (see `InMemoryStorage`'s
    ``_Scope``).
    """

    __slots__ = ("_entered", "_nested", "_pooled", "_storage", "_tx")

    def __init__(self, storage: SQLStorage) -> None:
        self._storage = storage
        self._nested: AbstractContextManager[Transaction] | None = None
        self._entered = False

    def __enter__(self) -> Transaction:
        if self._entered:
            # As a generator's would: it holds one transaction's state.
            raise StorageError(
                "this transaction() block was entered already: call transaction() again"
            )
        self._entered = True
        storage = self._storage
        current: _SQLTransaction | None = getattr(storage._local, "tx", None)
        if current is not None:
            self._nested = storage._savepoint(current)
            return self._nested.__enter__()
        self._pooled, self._tx = storage._open()
        return self._tx

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if self._nested is not None:
            return bool(self._nested.__exit__(exc_type, exc, tb))
        self._storage._close(self._pooled, self._tx, exc)
        return False


def _undo(rollback: Callable[[], None], exc: BaseException | None) -> bool:
    try:
        rollback()
    except StorageError as rollback_error:
        if exc is None:
            raise StorageError(f"rollback failed: {rollback_error}") from rollback_error
        exc.add_note(f"rational_billing: the rollback failed too: {rollback_error}")
        return False
    return True


def _on_sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy emit BEGIN itself (see _on_sqlite_begin); sqlite3's own
    # transaction handling would begin lazily and DEFERRED.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {int(_SQLITE_BUSY_TIMEOUT_S * 1000)}")
        _use_wal(cursor)
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


def _use_wal(cursor: Any, *, timeout: float = _SQLITE_BUSY_TIMEOUT_S) -> None:
    """Put the database in WAL mode (a no-op once it is), retrying while it is locked.

    Several processes or threads opening a new file at once each switch it:
    a switch needs the file to itself, and SQLite answers "database is
    locked" at once, without its busy timeout, to a connection that could
    otherwise deadlock with another one switching. Each retry starts afresh;
    none starts after ``timeout`` seconds (one that waits in SQLite's busy
    handler may itself take up to the busy timeout).
    """
    import sqlite3  # here: a PostgreSQL-only deployment may run a Python built without it

    deadline = time.monotonic() + timeout
    while True:
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            # The primary code: SQLITE_BUSY_RECOVERY, SQLITE_LOCKED_SHAREDCACHE... too.
            code = getattr(exc, "sqlite_errorcode", None)
            busy = code is not None and code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
            if not busy or time.monotonic() >= deadline:
                raise
        time.sleep(random.uniform(0.001, 0.01))  # noqa: S311 (jitter, not security)


def _on_sqlite_begin(conn: sa.Connection) -> None:
    # SQLAlchemy's own transactions (migrations) begin IMMEDIATE too, as
    # _SQLTransaction.begin does.
    conn.connection.driver_connection.execute("BEGIN IMMEDIATE")  # type: ignore[union-attr]
