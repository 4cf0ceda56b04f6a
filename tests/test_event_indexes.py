"""Schema version 5: waiting events (held, failed, pending) have an index; final ones do not."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import attrs
import pytest

from rational_billing._config import Mode
from rational_billing.domain.models import EventOutcome, ProcessedEvent
from rational_billing.storage import sql as sql_module
from rational_billing.storage.sql import SQLStorage

T0 = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)


def _event(event_id: str, outcome: EventOutcome, account: str | None, n: int) -> ProcessedEvent:
    return ProcessedEvent(
        event_id=event_id,
        type="invoice.paid",
        mode=Mode.TEST,
        created=T0,
        outcome=outcome,
        tenant=None,
        account=account,
        received_at=T0 + timedelta(seconds=n),
        payload=b"{}",
    )


@pytest.fixture
def db(tmp_path: Path) -> Path:
    """The path of a SQLite file that does not exist yet."""
    return tmp_path / "billing.db"


def _indexes(path: Path) -> set[str]:
    with sqlite3.connect(path) as raw:
        rows = raw.execute("SELECT name FROM sqlite_master WHERE type = 'index'").fetchall()
    raw.close()
    return {name for (name,) in rows}


def _store(storage: SQLStorage, events: list[ProcessedEvent]) -> None:
    with storage.transaction() as tx:
        for event in events:
            assert tx.record_event(event)


def _at_version(
    db: Path, monkeypatch: pytest.MonkeyPatch, version: int, events: list[ProcessedEvent]
) -> None:
    """A database at schema ``version`` holding ``events``; later storages migrate it on."""
    with monkeypatch.context() as patch:
        patch.setattr(sql_module, "_MIGRATIONS", sql_module._MIGRATIONS[:version])
        old = SQLStorage(f"sqlite:///{db}")
        _store(old, events)
        old.close()


def test_upgrade_from_version_4_keeps_held_events_findable(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A version 4 database upgraded to 5 swaps the outcome indexes and still finds held events."""
    events = [
        _event("evt_h2", EventOutcome.HELD, "acct_1", 2),
        _event("evt_a", EventOutcome.APPLIED, "acct_1", 1),
        _event("evt_h1", EventOutcome.HELD, "acct_1", 1),
        _event("evt_h3", EventOutcome.HELD, "acct_2", 3),
        _event("evt_f", EventOutcome.FAILED, None, 4),
    ]
    _at_version(db, monkeypatch, 4, events)
    assert {"ix_rb_events_outcome", "ix_rb_events_outcome_account"} <= _indexes(db)

    storage = SQLStorage(f"sqlite:///{db}")
    try:
        with storage.transaction() as tx:
            held = [e.event_id for e in tx.events_with_outcome(EventOutcome.HELD)]
            mine = [e.event_id for e in tx.events_with_outcome(EventOutcome.HELD, account="acct_1")]
            failed = [e.event_id for e in tx.events_with_outcome(EventOutcome.FAILED)]
            applied = [e.event_id for e in tx.events_with_outcome(EventOutcome.APPLIED)]
    finally:
        storage.close()
    assert held == ["evt_h1", "evt_h2", "evt_h3"]
    assert mine == ["evt_h1", "evt_h2"]
    assert failed == ["evt_f"]
    assert applied == ["evt_a"]
    indexes = _indexes(db)
    assert "ix_rb_events_waiting" in indexes
    assert not {"ix_rb_events_outcome", "ix_rb_events_outcome_account"} & indexes
    with sqlite3.connect(db) as raw:
        versions = [v for (v,) in raw.execute("SELECT version FROM rb_schema_version")]
    raw.close()
    assert versions == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("outcome", [EventOutcome.HELD, EventOutcome.FAILED, EventOutcome.PENDING])
def test_waiting_events_are_looked_up_through_the_partial_index(
    db: Path, outcome: EventOutcome
) -> None:
    """Held, failed and pending events of an account are found by the index, not a table scan."""
    storage = SQLStorage(f"sqlite:///{db}")
    try:
        _store(storage, [_event("evt_1", outcome, "acct_1", 1)])
        with storage.transaction() as tx:
            found = tx.events_with_outcome(outcome, account="acct_1")
            conn = tx._dbapi  # type: ignore[attr-defined]
            form = sql_module._driver_form(
                storage._queries.events_with_outcome_for[outcome],
                frozenset({"k_limit", "k_account"}),
                tx._dialect,  # type: ignore[attr-defined]
            )
            args = {"k_limit": 10, "k_account": "acct_1", **form.defaults}
            plan = " ".join(row[-1] for row in conn.execute(f"EXPLAIN QUERY PLAN {form.sql}", args))
    finally:
        storage.close()
    assert [e.event_id for e in found] == ["evt_1"]
    assert "ix_rb_events_waiting" in plan
    assert "TEMP B-TREE" not in plan


def test_upgrade_to_version_6_keeps_events_in_received_order(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Version 6 rebuilds rb_events with seq, in received order, and drops the received index."""
    # Stored out of received order, two in the same instant, minutes apart.
    events = [
        _event("evt_late", EventOutcome.APPLIED, None, 600),
        _event("evt_b", EventOutcome.HELD, "acct_1", 1),
        _event("evt_a", EventOutcome.FAILED, None, 1),
        _event("evt_mid", EventOutcome.PENDING, None, 120),
    ]
    _at_version(db, monkeypatch, 5, events)
    assert "ix_rb_events_received" in _indexes(db)

    storage = SQLStorage(f"sqlite:///{db}")
    try:
        with storage.transaction() as tx:
            every = [e.event_id for e in tx.list_events()]
            since = [e.event_id for e in tx.list_events(since=T0 + timedelta(seconds=100))]
            held = [e.event_id for e in tx.events_with_outcome(EventOutcome.HELD)]
            due = [
                e.event_id
                for e in tx.claim_events(
                    T0 + timedelta(hours=1), limit=10, lease=timedelta(minutes=5)
                )
            ]
            stored = {e.event_id: e for e in tx.list_events()}
        _store(storage, [_event("evt_new", EventOutcome.APPLIED, None, 0)])  # received earliest
        with storage.transaction() as tx:
            after = [e.event_id for e in tx.list_events(after="evt_late")]
            from_start = [e.event_id for e in tx.list_events(since=T0)]
    finally:
        storage.close()
    assert every == ["evt_a", "evt_b", "evt_mid", "evt_late"]  # received order, ties by id
    assert since == ["evt_mid", "evt_late"]
    assert held == ["evt_b"]
    assert due == ["evt_mid"]
    assert stored == {e.event_id: e for e in events} | {
        "evt_mid": attrs.evolve(events[3], claims=1)
    }
    assert after == ["evt_new"]  # stored last, listed last
    assert from_start == ["evt_a", "evt_b", "evt_mid", "evt_late", "evt_new"]
    indexes = _indexes(db)
    assert "ix_rb_events_received" not in indexes
    assert {"ix_rb_events_due", "ix_rb_events_waiting"} <= indexes
    with sqlite3.connect(db) as raw:
        versions = [v for (v,) in raw.execute("SELECT version FROM rb_schema_version")]
        minutes = raw.execute(
            "SELECT minute, first_seq FROM rb_event_minutes ORDER BY 1"
        ).fetchall()
    raw.close()
    assert versions == [1, 2, 3, 4, 5, 6]
    assert len(minutes) == 3  # T0's minute holds evt_a, evt_b and evt_new; then 2 and 10 minutes on


@pytest.mark.parametrize("shape", [(False, None), (True, None), (True, 2), (False, 1)])
def test_a_page_of_events_starts_from_its_seq(db: Path, shape: tuple[bool, int | None]) -> None:
    """SQLite finds a page by seq and the first seq of a minute by key: no scan from the start."""
    storage = SQLStorage(f"sqlite:///{db}")
    try:
        _store(storage, [_event("evt_1", EventOutcome.APPLIED, None, 1)])
        with storage.transaction() as tx:
            conn = tx._dbapi  # type: ignore[attr-defined]
            page = sql_module._list_events_sqlite(*shape)
            plans = []
            for stmt in (page, storage._queries.first_seq_since):
                sql = str(stmt.compile(dialect=tx._dialect))  # type: ignore[attr-defined]
                args = {"k_from": 0, "k_since": 0, "k_limit": 10, "k_event_id": "evt_1"}
                args |= {f"k_type_{i}": "x" for i in range(shape[1] or 0)}
                plans.append(
                    " ".join(row[-1] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", args))
                )
    finally:
        storage.close()
    assert "USING INTEGER PRIMARY KEY (rowid>?)" in plans[0], plans[0]
    assert "rb_event_minutes USING INTEGER PRIMARY KEY (rowid>?)" in plans[1], plans[1]
