"""Where `handle()` on SQLite spends its time: the SQL, or the Python around it.

Run it with ``nox -s bench`` (it is one of the scripts that session runs) or
``python benchmarks/sqlite_breakdown.py``. It records every statement,
``BEGIN``, ``COMMIT`` and ``ROLLBACK`` that ``handle()`` sends to SQLite for
each delivery of the stream (follow-up transactions included), with their
parameters, and then measures in interleaved rounds:

  floor     the SQLite floor of ``webhooks.py``, unchanged;
  replayed  the floor's parse + HMAC + ``json.loads``, then exactly the
            recorded statements through raw ``sqlite3`` on a copy of the
            database as it was before the stream: our writes and reads with
            none of our Python;
  ours      ``handle()`` on a fresh ``SQLStorage``, as in ``webhooks.py``.

With ``--by-type`` it times each delivery on its own instead, ours and then
its replay, and prints them per event type (redeliveries apart), sorted by
each type's share of the gap: where the Python goes.

Each phase's time is also split into this process's user and system CPU time
and the rest (waiting: fsync, the machine's other work).

``replayed`` is the floor of our own storage layout: what ``handle()`` would
cost if the Python around the statements took no time. The script checks
that the replay left every table as the recording did, row for row.

It reaches into ``SQLStorage``'s private transaction class to record the
statements; it is a diagnostic, not a target (the target is in ``webhooks.py``).
"""

from __future__ import annotations

import resource
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import _events
from _events import SECRET, Delivery
from webhooks import FloorSQLite, OursInProcess, _blocks, _floor_parse, interleaved

from rational_billing.storage import sql

#: One recorded call: ("run", sql, params), ("many", sql, rows), ("control", sql),
#: ("commit",) or ("rollback",).
Op = tuple[Any, ...]


class Recorder:
    """Records the driver calls of `SQLStorage` transactions while installed."""

    def __init__(self) -> None:
        self.ops: list[Op] | None = None
        tx = sql._SQLTransaction
        self.originals = {
            name: getattr(tx, name)
            for name in ("_run", "_run_many", "_control", "commit", "rollback")
        }

    def install(self) -> None:
        tx, original, recorder = sql._SQLTransaction, self.originals, self

        def run(self: Any, stmt: Any, params: Any = sql._NO_PARAMS) -> Any:
            rows = original["_run"](self, stmt, params)
            form = self._q.driver_forms[(stmt, frozenset(params))]
            recorder.add(("run", form.sql, {**form.defaults, **params}))
            return rows

        def run_many(self: Any, stmt: Any, rows: Any) -> int:
            count: int = original["_run_many"](self, stmt, rows)
            if rows:
                form = self._q.driver_forms[(stmt, frozenset(rows[0]))]
                recorder.add(("many", form.sql, [dict(row) for row in rows]))
            return count

        def control(self: Any, statement: str) -> None:
            recorder.add(("control", statement))
            original["_control"](self, statement)

        def commit(self: Any) -> None:
            recorder.add(("commit",))
            original["commit"](self)

        def rollback(self: Any) -> None:
            recorder.add(("rollback",))
            original["rollback"](self)

        for name, method in zip(
            self.originals, (run, run_many, control, commit, rollback), strict=True
        ):
            setattr(tx, name, method)

    def uninstall(self) -> None:
        for name, method in self.originals.items():
            setattr(sql._SQLTransaction, name, method)

    def add(self, op: Op) -> None:
        if self.ops is not None:
            self.ops.append(op)


def record(stream: list[Delivery], unique: list[Delivery], folder: Path) -> list[list[Op]]:
    """The driver calls of ``handle()`` for each delivery; leaves ``before.db`` behind."""
    path = folder / "recorded.db"
    storage = sql.SQLStorage(f"sqlite:///{path}")
    ours = OursInProcess("recording", storage, stream, unique, 1)
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    shutil.copy(path, folder / "before.db")
    recorder, recorded = Recorder(), []
    handle = ours.ours.billing.webhooks.handle
    recorder.install()
    try:
        for delivery in stream:
            recorder.ops = []
            handle(delivery.payload, delivery.headers)
            recorded.append(recorder.ops)
    finally:
        recorder.uninstall()
    ours.finish()
    return recorded


class Replayed:
    """Parse as the floor does, then the recorded calls through raw sqlite3."""

    name = "replayed: parse, then our statements through raw sqlite3"

    def __init__(self, stream: list[Delivery], ops: list[list[Op]], rounds: int, path: Path):
        self.blocks = _blocks(list(zip(stream, ops, strict=True)), rounds)
        self.key = SECRET.encode()
        self.path = path
        self.conn = sqlite3.connect(path, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.execute("PRAGMA foreign_keys = ON")
        self.commits = 0.0

    def run(self, block: int) -> float:
        key, clock = self.key, time.perf_counter
        start = clock()
        for delivery, ops in self.blocks[block]:
            _floor_parse(delivery, key)
            self.apply(ops)
        return clock() - start

    def apply(self, ops: list[Op]) -> None:
        """One delivery's recorded calls."""
        conn, clock = self.conn, time.perf_counter
        for op in ops:
            kind = op[0]
            if kind == "run":
                conn.execute(op[1], op[2]).fetchall()
            elif kind == "many":
                conn.executemany(op[1], op[2])
            elif kind == "control":
                conn.execute(op[1])
            elif kind == "commit":
                began = clock()
                conn.execute("COMMIT")
                self.commits += clock() - began
            else:
                conn.execute("ROLLBACK")

    def finish(self) -> str:
        self.conn.close()
        return ""


class TimedCommits:
    """Sums the seconds spent in `SQLStorage`'s commits while installed."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.original = sql._SQLTransaction.commit

    def install(self) -> None:
        original, timer = self.original, self

        def commit(self: Any) -> None:
            began = time.perf_counter()
            try:
                original(self)
            finally:
                timer.seconds += time.perf_counter() - began

        sql._SQLTransaction.commit = commit  # type: ignore[method-assign]

    def uninstall(self) -> None:
        sql._SQLTransaction.commit = self.original  # type: ignore[method-assign]


class TimedFloor(FloorSQLite):
    """The SQLite floor, unchanged, with the seconds spent in its COMMITs summed."""

    def __init__(self, stream: list[Delivery], rounds: int, folder: Path) -> None:
        super().__init__(stream, rounds, folder)
        self.commits = 0.0

    def run(self, block: int) -> float:
        self.conn = _CommitClock(self.conn, self)
        try:
            return super().run(block)
        finally:
            self.conn = self.conn.inner


class _CommitClock:
    def __init__(self, inner: sqlite3.Connection, floor: TimedFloor) -> None:
        self.inner, self.floor = inner, floor

    def execute(self, statement: str, *args: Any) -> sqlite3.Cursor:
        if statement != "COMMIT":
            return self.inner.execute(statement, *args)
        began = time.perf_counter()
        try:
            return self.inner.execute(statement)
        finally:
            self.floor.commits += time.perf_counter() - began


class CPUTimed:
    """A phase with the CPU time of its rounds summed: user, system (the rest is waiting)."""

    def __init__(self, phase: Any) -> None:
        self.phase, self.name = phase, phase.name
        self.user = self.system = 0.0

    def run(self, block: int) -> float:
        before = resource.getrusage(resource.RUSAGE_SELF)
        try:
            return float(self.phase.run(block))
        finally:
            after = resource.getrusage(resource.RUSAGE_SELF)
            self.user += after.ru_utime - before.ru_utime
            self.system += after.ru_stime - before.ru_stime

    def finish(self) -> str:
        return str(self.phase.finish())


def _contents(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every table's rows, sorted."""
    with sqlite3.connect(path) as conn:
        query = "SELECT name FROM sqlite_master WHERE type = 'table'"
        tables = [name for (name,) in conn.execute(query)]
        return {t: sorted(conn.execute(f'SELECT * FROM "{t}"'), key=repr) for t in tables}


def by_type(
    stream: list[Delivery], unique: list[Delivery], ops: list[list[Op]], rounds: int, folder: Path
) -> None:
    """Per event type (first deliveries and redeliveries apart): ours against the replay.

    Each delivery is timed on its own, ours and then its replay, block by
    block as in the interleaved phases; the table is sorted by each kind's
    share of the gap between the two.
    """
    first: set[str] = set()
    kinds = []
    for delivery in stream:
        kinds.append(delivery.type + (" (again)" if delivery.event_id in first else ""))
        first.add(delivery.event_id)
    replay = Replayed(stream, ops, rounds, folder / "before.db")
    storage = sql.SQLStorage(f"sqlite:///{folder / 'by-type.db'}")
    ours = OursInProcess("ours", storage, stream, unique, rounds)
    handle, key, clock = ours.ours.billing.webhooks.handle, SECRET.encode(), time.perf_counter
    spent: dict[str, list[float]] = {kind: [0.0, 0.0, 0.0, 0.0] for kind in kinds}
    size = len(stream)
    for block in (range(size * r // rounds, size * (r + 1) // rounds) for r in range(rounds)):
        for i in block:
            began = clock()
            handle(stream[i].payload, stream[i].headers)
            spent[kinds[i]][0] += clock() - began
        for i in block:
            began = clock()
            _floor_parse(stream[i], key)
            replay.apply(ops[i])
            totals = spent[kinds[i]]
            totals[1] += clock() - began
            totals[2] += 1
            totals[3] += len(ops[i])
    replay.finish()
    ours.finish()
    gap = sum(t[0] - t[1] for t in spent.values())
    print(
        f"\n{'event type':<40} {'count':>6} {'calls':>6} {'ours us':>8} {'replay us':>10} "
        f"{'gap us':>7} {'share of gap':>13}"
    )
    for kind, (o, r, count, c) in sorted(spent.items(), key=lambda kv: kv[1][1] - kv[1][0]):
        print(
            f"{kind:<40} {count:6.0f} {c / count:6.1f} {o / count * 1e6:8.1f} "
            f"{r / count * 1e6:10.1f} {(o - r) / count * 1e6:7.1f} {(o - r) / gap:13.1%}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = _events.stream_arguments(__doc__.split("\n\n")[0])
    parser.add_argument("--no-postgres", action="store_true", help="accepted; nothing here uses it")
    parser.add_argument(
        "--by-type",
        action="store_true",
        help="instead of the phases: ours against the replay for each event type",
    )
    args = parser.parse_args(argv)

    unique = _events.build(args.events)
    stream = _events.with_duplicates(unique, args.duplicates)
    with tempfile.TemporaryDirectory(prefix="rb-breakdown-") as tmp:
        folder = Path(tmp)
        started = time.perf_counter()
        ops = record(stream, unique, folder)
        calls = sum(len(o) for o in ops) / len(stream)
        print(
            f"recorded {calls:.2f} driver calls a delivery (BEGIN and COMMIT included) over "
            f"{len(stream)} deliveries in {time.perf_counter() - started:.0f}s"
        )
        if args.by_type:
            by_type(stream, unique, ops, args.rounds, folder)
            return 0
        floor = TimedFloor(stream, args.rounds, folder)
        replayed = Replayed(stream, ops, args.rounds, folder / "before.db")
        storage = sql.SQLStorage(f"sqlite:///{folder / 'ours.db'}")
        ours = OursInProcess("ours: handle(), SQLite file", storage, stream, unique, args.rounds)
        commits = TimedCommits()
        phases = [CPUTimed(phase) for phase in (floor, replayed, ours)]
        commits.install()
        try:
            seconds = [s for s, _ in interleaved(phases, args.rounds)]
        finally:
            commits.uninstall()
        same = _contents(folder / "before.db") == _contents(folder / "recorded.db")

    n = len(stream)
    print(
        f"\n{'phase':<58} {'us each':>8} {'of which COMMIT':>16} {'user':>7} {'system':>7} "
        f"{'waiting':>8} {'floor rate':>11}"
    )
    timed = zip(phases, seconds, (floor.commits, replayed.commits, commits.seconds), strict=True)
    for phase, spent, in_commit in timed:
        waiting = spent - phase.user - phase.system
        print(
            f"{phase.name:<58} {spent / n * 1e6:8.1f} {in_commit / n * 1e6:16.1f} "
            f"{phase.user / n * 1e6:7.1f} {phase.system / n * 1e6:7.1f} {waiting / n * 1e6:8.1f} "
            f"{seconds[0] / spent:11.0%}"
        )
    print(
        "\nuser and system: this process's CPU time in the phase (getrusage); waiting: the "
        "rest (fsync, and the machine's other work)"
    )
    print(f"\nthe replay left every table as the recording did: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
