"""What `SQLStorage` promises beyond the storage contract: URLs, schema, backend details."""

from __future__ import annotations

import importlib
import socket
import sqlite3
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs
import pytest
from sqlalchemy.pool import QueuePool

from rational_billing._config import Mode
from rational_billing.domain.models import (
    Customer,
    CustomerLink,
    MirrorResult,
    OutboxEntry,
    Subscription,
    Tenant,
)
from rational_billing.errors import ConfigError, StorageError
from rational_billing.storage import sql as sql_module
from rational_billing.storage.sql import SQLStorage

SECRET = "s3cr3t-Pa55"
CLOCK_TIME = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)


def _customer(customer_id: str, link: str | None = None) -> Customer:
    return Customer(
        id=customer_id,
        tenant="t1",
        email=None,
        link=None if link is None else CustomerLink(Mode.TEST, link),
        created_at=CLOCK_TIME,
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _full_text(exc: BaseException) -> str:
    """The message and the whole printed traceback, chained exceptions included."""
    return "".join(traceback.format_exception(exc))


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """The URL of a SQLite file that does not exist yet."""
    return f"sqlite:///{tmp_path / 'billing.db'}"


@pytest.fixture
def open_storage() -> Iterator[Callable[..., SQLStorage]]:
    """Opens SQLStorage instances and closes all of them after the test."""
    opened: list[SQLStorage] = []

    def open_(url: str, **kwargs: Any) -> SQLStorage:
        storage = SQLStorage(url, **kwargs)
        opened.append(storage)
        return storage

    yield open_
    for storage in opened:
        storage.close()


def _touch(storage: SQLStorage) -> None:
    with storage.transaction() as tx:
        tx.get_tenant("t1")


def _put(storage: SQLStorage, customer: Customer) -> None:
    with storage.transaction() as tx:
        tx.put_customer(customer)


def _count_steps(monkeypatch: pytest.MonkeyPatch, *, delay: float = 0.0) -> list[int]:
    """Append a migration step that records each time it runs."""
    runs: list[int] = []
    lock = threading.Lock()

    def step(conn: Any) -> None:
        with lock:
            runs.append(1)
        time.sleep(delay)  # widens the window in which a second migrator could slip in
        conn.exec_driver_sql("CREATE TABLE rb_test_extra (x INTEGER)")

    monkeypatch.setattr(sql_module, "_MIGRATIONS", (*sql_module._MIGRATIONS, step))
    return runs


# -- URLs -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://user:{SECRET}@db.example:notaport/billing",
        f"not a url {SECRET}",
        f"mysql://user:{SECRET}@db.example/billing",
        f"postgresql+psycopg2://user:{SECRET}@db.example/billing",
        f"postgresql://user:{SECRET}@oops@db.example/billing",
        "sqlite://",
        "sqlite:///:memory:",
    ],
)
def test_bad_url_raises_config_error_without_the_password(url: str) -> None:
    """A malformed, unsupported or in-memory URL raises ConfigError that hides the password."""
    with pytest.raises(ConfigError) as raised:
        SQLStorage(url)
    assert SECRET not in _full_text(raised.value)


def test_config_error_message_names_what_is_expected() -> None:
    """The ConfigError for an unsupported scheme names the scheme and the accepted forms."""
    with pytest.raises(ConfigError, match="mysql") as raised:
        SQLStorage(f"mysql://user:{SECRET}@db.example/billing")
    assert "sqlite:///" in str(raised.value)
    assert "user:***@db.example" in str(raised.value)


def test_plain_postgresql_url_means_psycopg(open_storage: Callable[..., SQLStorage]) -> None:
    """postgresql:// is rewritten to postgresql+psycopg://, and repr hides the password."""
    storage = open_storage(f"postgresql://user:{SECRET}@127.0.0.1:1/billing")
    assert storage._engine.url.drivername == "postgresql+psycopg"
    assert SECRET not in repr(storage)
    assert "user:***@127.0.0.1:1/billing" in repr(storage)


def test_repr_hides_a_password_in_the_query(open_storage: Callable[..., SQLStorage]) -> None:
    """A password passed as a query parameter is hidden as well."""
    storage = open_storage(f"postgresql://user@127.0.0.1/billing?password={SECRET}&sslmode=disable")
    assert SECRET not in repr(storage)
    assert "sslmode=disable" in repr(storage)


def test_unreachable_postgres_raises_storage_error(
    open_storage: Callable[..., SQLStorage],
) -> None:
    """A server that does not answer gives StorageError, chained, without the password."""
    storage = open_storage(f"postgresql://user:{SECRET}@127.0.0.1:{_free_port()}/billing")
    with pytest.raises(StorageError, match="cannot connect") as raised:
        _touch(storage)
    assert raised.value.__cause__ is not None
    assert SECRET not in str(raised.value)


def test_unopenable_sqlite_file_raises_storage_error(
    tmp_path: Path, open_storage: Callable[..., SQLStorage]
) -> None:
    """A SQLite file in a folder that does not exist gives StorageError."""
    storage = open_storage(f"sqlite:///{tmp_path / 'missing' / 'billing.db'}")
    with pytest.raises(StorageError):
        _touch(storage)


def test_missing_sql_extra_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Importing the module without SQLAlchemy raises ConfigError naming the sql extra."""
    monkeypatch.setitem(sys.modules, "sqlalchemy", None)
    monkeypatch.delitem(sys.modules, "rational_billing.storage.sql")
    with pytest.raises(ConfigError, match=r"pip install 'rational-billing\[sql\]'"):
        importlib.import_module("rational_billing.storage.sql")


def test_missing_psycopg_names_the_sql_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """A PostgreSQL URL without psycopg installed raises ConfigError naming the sql extra."""
    monkeypatch.setitem(sys.modules, "psycopg", None)
    with pytest.raises(ConfigError, match=r"pip install 'rational-billing\[sql\]'"):
        SQLStorage("postgresql://user@127.0.0.1/billing")


# -- schema -----------------------------------------------------------------------


def test_first_transaction_records_the_schema_version(
    sqlite_url: str, open_storage: Callable[..., SQLStorage]
) -> None:
    """The first transaction creates the schema and records every version at the clock's time."""
    storage = open_storage(sqlite_url, clock=lambda: CLOCK_TIME)
    assert not Path(sqlite_url.removeprefix("sqlite:///")).exists()  # nothing before first use
    _touch(storage)
    with sqlite3.connect(sqlite_url.removeprefix("sqlite:///")) as raw:
        rows = raw.execute("SELECT version, applied_at FROM rb_schema_version").fetchall()
        tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    raw.close()
    versions = range(1, len(sql_module._MIGRATIONS) + 1)
    assert rows == [(version, CLOCK_TIME.isoformat()) for version in versions]
    assert {
        "rb_tenants",
        "rb_customers",
        "rb_products",
        "rb_events",
        "rb_mirrors",
        "rb_outbox",
        "rb_schema_version",
    } <= tables


def test_reopening_does_not_rerun_migrations(
    sqlite_url: str, open_storage: Callable[..., SQLStorage], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A migration step runs once per database, however often it is opened."""
    _touch(open_storage(sqlite_url))
    runs = _count_steps(monkeypatch)
    for _ in range(3):
        _touch(open_storage(sqlite_url))
    assert runs == [1]
    with sqlite3.connect(sqlite_url.removeprefix("sqlite:///")) as raw:
        versions = [r[0] for r in raw.execute("SELECT version FROM rb_schema_version")]
    raw.close()
    assert versions == list(range(1, len(sql_module._MIGRATIONS) + 1))


def test_newer_schema_is_refused(sqlite_url: str, open_storage: Callable[..., SQLStorage]) -> None:
    """A database migrated by a newer release raises StorageError instead of being used."""
    _touch(open_storage(sqlite_url))
    with sqlite3.connect(sqlite_url.removeprefix("sqlite:///")) as raw:
        raw.execute("INSERT INTO rb_schema_version VALUES (99, 'later')")
    raw.close()
    with pytest.raises(StorageError, match="schema version 99"):
        _touch(open_storage(sqlite_url))


def test_concurrent_migration_on_sqlite(
    sqlite_url: str, open_storage: Callable[..., SQLStorage], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Several storages opening one new SQLite file at once migrate it exactly once."""
    runs = _count_steps(monkeypatch, delay=0.2)
    storages = [open_storage(sqlite_url) for _ in range(4)]
    start = threading.Barrier(len(storages))

    def open_(storage: SQLStorage) -> None:
        start.wait(timeout=30)
        _touch(storage)

    with ThreadPoolExecutor(len(storages)) as pool:
        list(pool.map(open_, storages))
    assert runs == [1]


# -- SQLite -----------------------------------------------------------------------


def test_many_storages_opening_new_sqlite_files_at_once_all_connect(tmp_path: Path) -> None:
    """Switching a new file to WAL from 4 threads at once never fails with 'database is locked'.

    SQLite refuses a switch at once, without its busy timeout, to a connection
    that could deadlock with another one switching; before the retry about 1
    file in 40 failed so.
    """
    failures: list[str] = []
    for attempt in range(30):
        url = f"sqlite:///{tmp_path / f'new{attempt}.db'}"
        storages = [SQLStorage(url) for _ in range(4)]
        start = threading.Barrier(len(storages))

        def open_(storage: SQLStorage, start: threading.Barrier = start) -> None:
            start.wait(timeout=30)
            try:
                _touch(storage)
            except StorageError as exc:
                failures.append(str(exc))

        try:
            with ThreadPoolExecutor(len(storages)) as pool:
                list(pool.map(open_, storages))
        finally:
            for storage in storages:
                storage.close()
    assert failures == []


class _LockedCursor:
    """A cursor whose ``PRAGMA journal_mode = WAL`` fails ``locked`` times with ``error``."""

    def __init__(self, locked: int, error: int = sqlite3.SQLITE_BUSY) -> None:
        self.locked, self.error, self.calls = locked, error, 0

    def execute(self, statement: str) -> None:
        assert statement == "PRAGMA journal_mode = WAL"
        self.calls += 1
        if self.calls <= self.locked:
            exc = sqlite3.OperationalError("database is locked")
            exc.sqlite_errorcode = self.error  # type: ignore[attr-defined]
            raise exc


def test_switching_to_wal_retries_while_the_file_is_locked() -> None:
    """A locked file is tried again until the switch goes through; other errors raise at once."""
    cursor = _LockedCursor(locked=3)
    sql_module._use_wal(cursor)
    assert cursor.calls == 4

    # Extended codes count by their primary code (SQLITE_LOCKED_SHAREDCACHE = 262).
    shared_cache = _LockedCursor(locked=2, error=sqlite3.SQLITE_LOCKED | (1 << 8))
    sql_module._use_wal(shared_cache)
    assert shared_cache.calls == 3

    broken = _LockedCursor(locked=1, error=sqlite3.SQLITE_IOERR)
    with pytest.raises(sqlite3.OperationalError):
        sql_module._use_wal(broken)
    assert broken.calls == 1

    forever = _LockedCursor(locked=10**9)
    started = time.monotonic()
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        sql_module._use_wal(forever, timeout=0.5)
    assert time.monotonic() - started < 10
    assert forever.calls > 1


def test_sqlite_uses_wal_busy_timeout_and_foreign_keys(
    sqlite_url: str, open_storage: Callable[..., SQLStorage]
) -> None:
    """SQLite files are in WAL mode, and every connection waits for locks and checks FKs."""
    storage = open_storage(sqlite_url)
    _touch(storage)
    with sqlite3.connect(sqlite_url.removeprefix("sqlite:///")) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    raw.close()
    with storage._engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_sqlite_read_modify_write_from_many_storages_loses_nothing(
    sqlite_url: str, open_storage: Callable[..., SQLStorage]
) -> None:
    """BEGIN IMMEDIATE serialises writers of separate storages: no lost update, no 'locked'."""
    entry = OutboxEntry(
        id="ob_1",
        tenant="t1",
        mode=Mode.TEST,
        operation="customer.update",
        customer_id="c1",
        params={},
        idempotency_key="key-1",
        created_at=CLOCK_TIME,
    )
    with open_storage(sqlite_url).transaction() as tx:
        tx.put_outbox(entry)
    storages = [open_storage(sqlite_url) for _ in range(4)]
    rounds = 15

    def bump(storage: SQLStorage) -> None:
        for _ in range(rounds):
            with storage.transaction() as tx:
                current = tx.get_outbox("ob_1")
                assert current is not None
                tx.put_outbox(attrs.evolve(current, attempts=current.attempts + 1))

    with ThreadPoolExecutor(len(storages)) as pool:
        list(pool.map(bump, storages))
    with storages[0].transaction() as tx:
        final = tx.get_outbox("ob_1")
    assert final is not None
    assert final.attempts == rounds * len(storages)


def test_corrupt_row_raises_storage_error(
    sqlite_url: str, open_storage: Callable[..., SQLStorage]
) -> None:
    """A stored row that no longer decodes raises StorageError naming the model."""
    storage = open_storage(sqlite_url)
    with storage.transaction() as tx:
        tx.put_customer(_customer("c1"))
    with sqlite3.connect(sqlite_url.removeprefix("sqlite:///")) as raw:
        raw.execute("UPDATE rb_customers SET data = '{\"id\": 1}'")
    raw.close()
    with pytest.raises(StorageError, match="Customer"), storage.transaction() as tx:
        tx.get_customer("t1", "c1")


# -- both backends --------------------------------------------------------------


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def any_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh database URL on each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'billing.db'}"
    url: str = request.getfixturevalue("pg_storage_url")
    return url


def test_close_disposes_the_pool(any_url: str) -> None:
    """close() closes every connection, the one kept between transactions too; twice is fine."""
    storage = SQLStorage(any_url)
    _touch(storage)
    _touch(storage)
    pool = storage._engine.pool
    assert isinstance(pool, QueuePool)
    assert pool.checkedout() == 1  # kept for the next transaction, reused by the second one
    storage.close()
    assert (pool.checkedout(), pool.checkedin()) == (0, 0)
    storage.close()
    with pytest.raises(StorageError, match="closed"), storage.transaction():
        pass


def test_threads_share_the_connections_kept_between_transactions(any_url: str) -> None:
    """Connections kept between transactions serve any thread, within the pool's bounds."""
    storage = SQLStorage(any_url)
    _touch(storage)
    start = threading.Barrier(8)

    def work(n: int) -> None:
        start.wait(timeout=30)
        for i in range(20):
            with storage.transaction() as tx:
                tx.put_customer(_customer(f"c{n}-{i}"))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(work, range(8)))
    with storage.transaction() as tx:
        assert len(tx.list_customers("t1", after=None, limit=1000)) == 160
    assert len(storage._idle) <= 8
    storage.close()


@pytest.mark.parametrize("where", ["after BEGIN", "in the block", "instead of COMMIT"])
def test_an_interrupted_transaction_leaves_no_lock_behind(
    where: str, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A KeyboardInterrupt at any step rolls back and frees SQLite's write lock."""
    monkeypatch.setattr(sql_module, "_SQLITE_BUSY_TIMEOUT_S", 0.5)  # fail fast if it is held
    storage, other = SQLStorage(sqlite_url), SQLStorage(sqlite_url)
    _touch(storage)
    tx_class = sql_module._SQLTransaction
    begin, commit = tx_class.begin, tx_class.commit

    def begin_then_interrupt(self: Any) -> None:
        begin(self)
        raise KeyboardInterrupt

    def interrupt(self: Any) -> None:
        raise KeyboardInterrupt

    if where == "after BEGIN":
        monkeypatch.setattr(tx_class, "begin", begin_then_interrupt)
    elif where == "instead of COMMIT":
        monkeypatch.setattr(tx_class, "commit", interrupt)

    def write() -> None:
        with storage.transaction() as tx:
            tx.put_customer(_customer("c1"))
            if where == "in the block":
                raise KeyboardInterrupt

    # Kept, as an error reporter would keep it: its traceback holds the frames.
    with pytest.raises(KeyboardInterrupt) as interrupted:
        write()
    monkeypatch.setattr(tx_class, "begin", begin)
    monkeypatch.setattr(tx_class, "commit", commit)
    _put(other, _customer("c2"))  # waits 0.5 s and fails if a lock was left held
    assert interrupted.traceback
    with storage.transaction() as tx:
        assert tx.get_customer("t1", "c1") is None
        assert tx.get_customer("t1", "c2") is not None
    storage.close()
    other.close()


def test_a_transaction_block_is_entered_once(sqlite_url: str) -> None:
    """Entering the same transaction() object again raises, and commits nothing half-way."""
    storage = SQLStorage(sqlite_url)
    scope = storage.transaction()
    with scope as tx:
        tx.put_customer(_customer("c1"))
        with pytest.raises(StorageError, match="entered already"), scope:
            pass  # pragma: no cover
    with pytest.raises(StorageError, match="entered already"), scope:
        pass  # pragma: no cover
    other = SQLStorage(sqlite_url)
    _put(other, _customer("c2"))  # no lock left held
    with storage.transaction() as tx:
        assert [c.id for c in tx.list_customers("t1", after=None, limit=10)] == ["c1", "c2"]
    storage.close()
    other.close()


@pytest.mark.parametrize("dialect_name", ["sqlite", "postgresql"])
def test_every_statement_runs_on_the_driver(dialect_name: str) -> None:
    """Each statement compiles once to SQL that the driver runs as is, with named parameters.

    Transactions run statements on the driver's cursor, without SQLAlchemy at
    execution time: a statement needing type processing or an IN list expanded
    per call would raise StorageError in use, so it fails here first.
    """
    from sqlalchemy import ClauseElement, Table
    from sqlalchemy.dialects import postgresql, sqlite

    dialect = sqlite.dialect(paramstyle="named") if dialect_name == "sqlite" else None
    dialect = dialect or postgresql.psycopg.dialect()  # type: ignore[attr-defined]
    queries = sql_module._Queries(postgres=dialect_name == "postgresql")
    found = 0
    pending: list[Any] = [vars(queries), vars(queries.v3)]
    while pending:
        for value in pending.pop().values():
            if isinstance(value, dict):
                pending.append(value)
            elif isinstance(value, ClauseElement):
                # INSERT and UPDATE take their values from the columns' names.
                table = getattr(value, "table", None)
                columns = frozenset(table.columns.keys() if isinstance(table, Table) else ())
                form = sql_module._driver_form(value, columns, dialect)
                assert "POSTCOMPILE" not in form.sql
                found += 1
    lock = sql_module._driver_form(sql_module._lock_events(3), frozenset(), dialect)
    assert lock.sql.count("k_event_id_") == 3
    for shape in [(False, None, False), (True, 3, True)]:
        form = sql_module._driver_form(sql_module._list_events(*shape), frozenset(), dialect)
        assert form.sql.count(":k_type_" if dialect_name == "sqlite" else "%(k_type_") == (
            shape[1] or 0
        )
    assert found > 40


@pytest.mark.postgres
def test_a_lost_connection_is_not_reused(
    pg_storage_url: str, open_storage: Callable[..., SQLStorage]
) -> None:
    """The server dropping a connection fails that transaction only; the next one reconnects."""
    import psycopg

    storage = open_storage(pg_storage_url)
    with storage.transaction() as tx:
        tx.put_customer(_customer("c1"))

    def write_after_the_server_dropped_us() -> None:
        with storage.transaction() as tx:
            pid = tx._dbapi.info.backend_pid  # type: ignore[attr-defined]
            with psycopg.connect(pg_storage_url.replace("+psycopg", ""), autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            tx.put_customer(_customer("c2"))

    with pytest.raises(StorageError, match="OperationalError") as raised:
        write_after_the_server_dropped_us()
    assert raised.value.transient  # rolled back by the server: safe to run again
    with storage.transaction() as tx:
        assert tx.get_customer("t1", "c1") is not None
        assert tx.get_customer("t1", "c2") is None


@pytest.mark.postgres
def test_after_a_server_restart_only_one_transaction_fails(
    pg_storage_url: str, open_storage: Callable[..., SQLStorage]
) -> None:
    """Every session dropped at once: the first failure drops the idle connections too."""
    import psycopg

    storage = open_storage(pg_storage_url)
    together = threading.Barrier(8)

    def overlap() -> None:
        with storage.transaction() as tx:
            tx.get_customer("t1", "c1")
            together.wait(timeout=10)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: overlap(), range(8)))
    # 5 kept between transactions (the pool's size), 3 back in the pool.
    assert len(storage._idle) == 5
    name = pg_storage_url.rsplit("/", 1)[1]
    with psycopg.connect(pg_storage_url.replace("+psycopg", ""), autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )
    with pytest.raises(StorageError):
        _touch(storage)
    for n in range(3):
        with storage.transaction() as tx:
            tx.put_customer(_customer(f"c{n}"))


def test_a_forked_child_does_not_use_the_parents_connections(any_url: str) -> None:
    """After fork, the child connects afresh; the parent's connection keeps working."""
    import multiprocessing

    storage = SQLStorage(any_url)
    with storage.transaction() as tx:
        tx.put_customer(_customer("parent-1"))
    kept = list(storage._idle)
    assert kept
    context = multiprocessing.get_context("fork")
    child = context.Process(target=_write_in_child, args=(storage, [id(c) for c in kept]))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    with storage.transaction() as tx:  # the parent's own connection, still sound
        tx.put_customer(_customer("parent-2"))
        ids = [c.id for c in tx.list_customers("t1", after=None, limit=10)]
    assert ids == ["child-1", "parent-1", "parent-2"]
    assert list(storage._idle) == kept
    storage.close()


def _write_in_child(storage: SQLStorage, parents: list[int]) -> None:
    with storage.transaction() as tx:
        tx.put_customer(_customer("child-1"))
    # The child kept a connection of its own, none of the parent's.
    assert storage._idle
    assert not {id(c) for c in storage._idle} & set(parents)
    storage.close()  # closes the child's connections only


def _close_in_child(storage: SQLStorage) -> None:
    storage.close()


def test_closing_in_a_forked_child_leaves_the_parents_sessions(any_url: str) -> None:
    """A child that closes the storage without using it does not end the parent's sessions."""
    import multiprocessing

    storage = SQLStorage(any_url)
    with storage.transaction() as tx:
        tx.put_customer(_customer("before"))
    child = multiprocessing.get_context("fork").Process(target=_close_in_child, args=(storage,))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    with storage.transaction() as tx:
        tx.put_customer(_customer("after"))
    storage.close()


# -- PostgreSQL ---------------------------------------------------------------------


@pytest.mark.postgres
def test_concurrent_migration_on_postgres(
    pg_storage_url: str, open_storage: Callable[..., SQLStorage], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Several storages (threads) starting on one new database migrate it exactly once."""
    runs = _count_steps(monkeypatch, delay=0.2)
    storages = [open_storage(pg_storage_url) for _ in range(6)]
    start = threading.Barrier(len(storages))

    def open_(storage: SQLStorage) -> None:
        start.wait(timeout=30)
        _touch(storage)

    with ThreadPoolExecutor(len(storages)) as pool:
        list(pool.map(open_, storages))
    assert runs == [1]
    _touch(open_storage(pg_storage_url))
    assert runs == [1]


@pytest.mark.postgres
def test_test_databases_do_not_collate_bytewise(pg_storage_url: str) -> None:
    """The per-test database sorts text by locale, so the contract's id-order test bites."""
    import psycopg

    with psycopg.connect(pg_storage_url.replace("+psycopg", "")) as conn:
        row = conn.execute("SELECT 'a' < 'B'").fetchone()
    assert row == (True,)


@pytest.mark.postgres
def test_failed_statement_aborts_the_transaction(
    pg_storage_url: str, open_storage: Callable[..., SQLStorage]
) -> None:
    """After a database error, later reads and the commit raise; nothing is committed.

    Reads the transaction made before the error and remembers raise too.
    """
    storage = open_storage(pg_storage_url)
    with storage.transaction() as tx:
        tx.put_customer(_customer("c0"))

    def swallow_an_error() -> None:
        with storage.transaction() as tx:
            assert tx.lock_customer("t1", "c0") is not None
            assert tx.direct_tenant() is None
            tx.put_customer(_customer("c1"))
            with pytest.raises(StorageError, match="DataError"):
                tx.put_customer(_customer("bad\x00id"))
            with pytest.raises(StorageError, match="aborted"):
                tx.get_customer("t1", "c1")
            with pytest.raises(StorageError, match="aborted"):
                tx.lock_customer("t1", "c0")
            with pytest.raises(StorageError, match="aborted"):
                tx.direct_tenant()

    with pytest.raises(StorageError, match="rolled back"):
        swallow_an_error()
    with storage.transaction() as tx:
        assert tx.get_customer("t1", "c1") is None


@pytest.mark.postgres
def test_failed_statement_in_a_nested_block_spares_the_outer_one(
    pg_storage_url: str, open_storage: Callable[..., SQLStorage]
) -> None:
    """A nested block that swallowed a database error rolls back alone; the outer one commits."""
    storage = open_storage(pg_storage_url)

    def swallow_an_error() -> None:
        with storage.transaction() as inner:
            inner.put_customer(_customer("c2"))
            with pytest.raises(StorageError):
                inner.put_customer(_customer("bad\x00id"))

    with storage.transaction() as outer:
        outer.put_customer(_customer("c1"))
        with pytest.raises(StorageError, match="rolled back"):
            swallow_an_error()
        outer.put_customer(_customer("c3"))
    with storage.transaction() as tx:
        ids = [c.id for c in tx.list_customers("t1", after=None, limit=10)]
    assert ids == ["c1", "c3"]


@pytest.mark.postgres
def test_concurrent_link_race_is_an_integrity_storage_error(
    pg_storage_url: str, open_storage: Callable[..., SQLStorage]
) -> None:
    """Two transactions linking one Stripe customer at once: the loser gets an IntegrityError."""
    import psycopg

    storage = open_storage(pg_storage_url)
    _touch(storage)
    first_wrote = threading.Event()

    def first() -> None:
        with storage.transaction() as tx:
            tx.put_customer(_customer("c1", link="cus_X"))
            first_wrote.set()
            # Commit only once the other transaction waits on the unique index.
            with psycopg.connect(pg_storage_url.replace("+psycopg", "")) as admin:
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    waiting = admin.execute("SELECT count(*) FROM pg_locks WHERE NOT granted")
                    row = waiting.fetchone()
                    if row is not None and row[0] > 0:
                        break
                    time.sleep(0.01)

    with ThreadPoolExecutor(1) as pool:
        done = pool.submit(first)
        assert first_wrote.wait(timeout=30)
        with pytest.raises(StorageError, match="IntegrityError") as raised:
            _put(storage, _customer("c2", link="cus_X"))
        done.result()
    assert "UniqueViolation" in str(raised.value)
    with storage.transaction() as tx:
        assert tx.customer_by_link("t1", Mode.TEST, "cus_X") == _customer("c1", link="cus_X")


# -- per-transaction shortcuts: remembered tenants, insert-first mirrors -------------------


def _tenant_for(tenant_id: str, account: str) -> Tenant:
    return Tenant(
        id=tenant_id,
        stripe_account_id=account,
        modes=frozenset({Mode.TEST}),
        connected_at=CLOCK_TIME,
    )


def test_tenant_lookups_in_a_transaction_see_its_own_tenant_writes(any_url: str) -> None:
    """A tenant written in a transaction is what later lookups in it find, and a savepoint undoes it."""
    storage = SQLStorage(any_url)
    try:
        with storage.transaction() as tx:
            tx.put_tenant(_tenant_for("t1", "acct_1"))
        with storage.transaction() as tx:
            first = tx.tenant_by_account("acct_1")
            assert first is not None and first.id == "t1"
            assert tx.get_tenant("t2") is None
            tx.put_tenant(_tenant_for("t2", "acct_1"))  # t2 claims the account
            moved = tx.tenant_by_account("acct_1")
            assert moved is not None and moved.id == "t2"
            assert tx.get_tenant("t2") is not None

            def claim_and_fail() -> None:
                with storage.transaction() as inner:
                    inner.put_tenant(_tenant_for("t3", "acct_1"))
                    assert inner.tenant_by_account("acct_1") == _tenant_for("t3", "acct_1")
                    raise RuntimeError("undo the savepoint")

            with pytest.raises(RuntimeError, match="undo the savepoint"):
                claim_and_fail()
            back = tx.tenant_by_account("acct_1")
            assert back is not None and back.id == "t2"
            assert tx.get_tenant("t3") is None
        with storage.transaction() as tx:
            after = tx.tenant_by_account("acct_1")
            assert after is not None and after.id == "t2"
    finally:
        storage.close()


def test_mirror_read_as_absent_then_stored_elsewhere_is_still_compared(pg_storage_url: str) -> None:
    """A record read as absent, then stored newer by another transaction, is stale, not inserted twice."""
    storage = SQLStorage(pg_storage_url)
    newer = Subscription(
        tenant="t1",
        mode=Mode.TEST,
        stripe_id="sub_1",
        stripe_customer_id="cus_A",
        status="active",
        marker=CLOCK_TIME,
    )
    older = attrs.evolve(newer, status="past_due", marker=CLOCK_TIME.replace(year=2029))
    try:
        with storage.transaction() as tx:
            assert tx.get_mirror(Subscription, "t1", Mode.TEST, "sub_1") is None

            def elsewhere() -> MirrorResult:
                with storage.transaction() as other:
                    return other.mirror(newer)

            with ThreadPoolExecutor(1) as pool:
                assert pool.submit(elsewhere).result(30) is MirrorResult.INSERTED
            assert tx.mirror(older) is MirrorResult.STALE
        with storage.transaction() as tx:
            assert tx.get_mirror(Subscription, "t1", Mode.TEST, "sub_1") == newer
            assert tx.get_mirror(Subscription, "t1", Mode.TEST, "sub_2") is None
            assert tx.mirror(attrs.evolve(newer, stripe_id="sub_2")) is MirrorResult.INSERTED
            assert tx.mirror(attrs.evolve(newer, stripe_id="sub_2")) is MirrorResult.TIE
    finally:
        storage.close()
