"""The durable journal: tasks, their transitions, native ids, and the outbox of messages to send.

SQLite in WAL mode. A task is committed here before its message is acked, and every event is
written to the outbox in the same transaction as the state change it reports, so a crash at any
point either loses nothing or re-sends (receivers drop duplicates by `seq`).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .model import FINAL_STATES, State, Task

SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY,
    execution_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    executor TEXT,
    state TEXT NOT NULL,
    seq INTEGER NOT NULL DEFAULT 0,
    native_id TEXT,
    attempt INTEGER NOT NULL DEFAULT 0,
    intent INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    task_json TEXT,
    protocol TEXT NOT NULL DEFAULT 'v1',
    reply_to TEXT,
    correlation_id TEXT,
    workdir TEXT,
    message TEXT,
    exit_code INTEGER,
    reason TEXT,
    started TEXT,
    finished TEXT,
    result_json TEXT,
    outcome TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS tasks_state ON tasks(state);
CREATE INDEX IF NOT EXISTS tasks_execution ON tasks(execution_id);
CREATE TABLE IF NOT EXISTS transitions (
    task_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    state TEXT NOT NULL,
    time REAL NOT NULL,
    native_id TEXT,
    message TEXT,
    PRIMARY KEY (task_id, seq)
);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id TEXT,
    destinations TEXT NOT NULL,
    properties TEXT NOT NULL,
    body BLOB,
    file_path TEXT,
    file_offset INTEGER,
    file_length INTEGER,
    created REAL NOT NULL
);
"""


# Retention (fem_hpc/ops/gc.py): the clocks of the retention settings, and what is left of a
# compacted task. New tables rather than new columns, so older journals gain them in place.
RETENTION_SCHEMA = """
CREATE TABLE IF NOT EXISTS retention (
    task_id TEXT PRIMARY KEY,
    confirmed REAL NOT NULL,  -- when the GC saw the final task with no outbox row left
    workdir_removed REAL
);
CREATE TABLE IF NOT EXISTS tombstones (
    id TEXT PRIMARY KEY,
    execution_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    executor TEXT,
    protocol TEXT NOT NULL,
    state TEXT NOT NULL,
    exit_code INTEGER,
    reason TEXT,
    finished TEXT,
    labels TEXT,
    seq INTEGER NOT NULL,
    confirmed REAL NOT NULL,
    compacted REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS tombstones_confirmed ON tombstones(confirmed);
CREATE INDEX IF NOT EXISTS outbox_task ON outbox(task_id);
CREATE INDEX IF NOT EXISTS tasks_workdir ON tasks(workdir);
"""


class Compacted(sqlite3.IntegrityError):
    """A submit of a task id that retention has compacted into a tombstone. A subclass of
    sqlite3.Error on purpose: the service puts the message back, and the redelivery is answered
    from the tombstone."""


@dataclass
class Tombstone:
    """What is kept of a compacted task (for `retention.idempotency_days`)."""

    id: str
    execution_id: str
    user_id: str
    executor: str | None
    protocol: str
    state: State
    exit_code: int | None
    reason: str | None
    finished: str | None
    labels: dict[str, str]
    seq: int
    confirmed: float
    compacted: float

    def note(self) -> str:
        day = (self.finished or "")[:10] or time.strftime("%Y-%m-%d", time.gmtime(self.confirmed))
        return f"finished on {day}, outputs expired"


@dataclass
class WorkdirDue:
    """A work dir the retention settings let go, with the tasks that used it."""

    workdir: str
    task_ids: list[str]
    states: list[str]
    confirmed: float  # the latest confirmation of its tasks


@dataclass
class CompactionDue:
    task_id: str
    workdir: str | None
    workdir_removed: bool
    confirmed: float
    transitions: int
    json_bytes: int  # the task's and its result's JSON: most of what compaction frees


@dataclass
class TaskRecord:
    id: str
    execution_id: str
    user_id: str
    executor: str | None
    state: State
    seq: int
    native_id: str | None
    attempt: int
    intent: bool
    cancel_requested: bool
    task_json: str | None
    protocol: str
    reply_to: str | None
    correlation_id: str | None
    workdir: str | None
    message: str | None
    exit_code: int | None
    reason: str | None
    started: str | None
    finished: str | None
    result_json: str | None
    outcome: str | None
    created: float
    updated: float

    @property
    def task(self) -> Task:
        assert self.task_json is not None
        return Task.model_validate_json(self.task_json)

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES


@dataclass
class OutboxRow:
    id: int
    task_id: str | None
    destinations: list[tuple[str, str]]  # (exchange, routing_key)
    properties: dict[str, Any]
    body: bytes | None
    file_path: str | None
    file_offset: int | None
    file_length: int | None

    def payload(self) -> bytes:
        if self.body is not None:
            return bytes(self.body)
        assert self.file_path is not None and self.file_offset is not None and self.file_length is not None
        with open(self.file_path, "rb") as f:
            f.seek(self.file_offset)
            return f.read(self.file_length)


@dataclass
class Message:
    """One message to put in the outbox; `seq` is filled by the journal for task events."""

    destinations: list[tuple[str, str]]
    properties: dict[str, Any]
    body: bytes | None = None
    file_ref: tuple[str, int, int] | None = None


class Journal:
    def __init__(self, path: Path, outbox: bool = True):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.outbox_enabled = outbox
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        self._db.executescript(RETENTION_SCHEMA)
        self._outbox_cv = threading.Condition(self._lock)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # -- tasks -------------------------------------------------------------------
    @staticmethod
    def _record(row: sqlite3.Row) -> TaskRecord:
        d = dict(row)
        d["state"] = State(d["state"])
        d["intent"] = bool(d["intent"])
        d["cancel_requested"] = bool(d["cancel_requested"])
        return TaskRecord(**d)

    def get(self, task_id: str) -> TaskRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM tasks WHERE id=?", (task_id,)).fetchone()
        return self._record(row) if row else None

    def active(self) -> list[TaskRecord]:
        finals = tuple(s.value for s in FINAL_STATES)
        with self._lock:
            rows = self._db.execute(
                f"SELECT * FROM tasks WHERE state NOT IN ({','.join('?' * len(finals))}) ORDER BY created",
                finals,
            ).fetchall()
        return [self._record(r) for r in rows]

    def by_execution(self, execution_id: str) -> list[TaskRecord]:
        """Tasks of one execution, newest first."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM tasks WHERE execution_id=? ORDER BY created DESC",
                                    (execution_id,)).fetchall()
        return [self._record(r) for r in rows]

    def all(self, limit: int = 1000) -> list[TaskRecord]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM tasks ORDER BY created DESC LIMIT ?", (limit,)).fetchall()
        return [self._record(r) for r in rows]

    def counts_by_state(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM tasks GROUP BY state").fetchall()
        return {r[0]: r[1] for r in rows}

    def insert(
        self,
        task: Task,
        *,
        executor: str,
        workdir: Path,
        protocol: str = "v1",
        reply_to: str | None = None,
        correlation_id: str | None = None,
        event: Any = None,
    ) -> tuple[TaskRecord, bool]:
        """Record a new task in state RECEIVED. Returns (record, created); an existing id is
        returned untouched with created=False (the idempotency key)."""
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT * FROM tasks WHERE id=?", (task.id,)).fetchone()
            if row:
                return self._record(row), False
            if db.execute("SELECT 1 FROM tombstones WHERE id=?", (task.id,)).fetchone():
                raise Compacted(task.id)  # retention compacted it while this duplicate was on its way in
            db.execute(
                "INSERT INTO tasks (id, execution_id, user_id, executor, state, task_json, protocol,"
                " reply_to, correlation_id, workdir, created, updated) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (task.id, task.execution, task.user_id, executor, State.RECEIVED.value,
                 task.model_dump_json(), protocol, reply_to, correlation_id, str(workdir), now, now),
            )
            if event is not None:
                self._append_event(db, task.id, State.RECEIVED, event, now)
            row = db.execute("SELECT * FROM tasks WHERE id=?", (task.id,)).fetchone()
        return self._record(row), True

    def _append_event(self, db: sqlite3.Connection, task_id: str, state: State | None, event: Any,
                      now: float, native_id: str | None = None, message: str | None = None) -> int:
        """Bump the task's seq and, if wanted, queue `event(seq)` -> Message in the outbox."""
        seq = db.execute("UPDATE tasks SET seq=seq+1, updated=? WHERE id=? RETURNING seq",
                         (now, task_id)).fetchone()[0]
        if state is not None:
            db.execute("INSERT INTO transitions VALUES (?,?,?,?,?,?)",
                       (task_id, seq, state.value, now, native_id, message))
        msg = event(seq) if callable(event) else event
        if msg is not None and self.outbox_enabled:
            self._put(db, task_id, msg, now)
        return seq

    def _put(self, db: sqlite3.Connection, task_id: str | None, msg: Message, now: float) -> None:
        path, offset, length = msg.file_ref if msg.file_ref else (None, None, None)
        db.execute(
            "INSERT INTO outbox (task_id, destinations, properties, body, file_path, file_offset,"
            " file_length, created) VALUES (?,?,?,?,?,?,?,?)",
            (task_id, json.dumps(msg.destinations), json.dumps(msg.properties), msg.body, path, offset,
             length, now),
        )
        self._outbox_cv.notify_all()

    def transition(self, task_id: str, state: State, event: Any = None, *, message: str | None = None,
                   also: list[Any] | None = None, **fields: Any) -> int:
        """Move a task to `state` (updating any extra columns) and queue its event, then the `also`
        events (e.g. the result after the terminal status), all in one transaction; returns seq."""
        now = time.time()
        cols = {"state": state.value, "message": message, **fields}
        with self._tx() as db:
            db.execute(
                f"UPDATE tasks SET {', '.join(f'{k}=?' for k in cols)} WHERE id=?",
                (*cols.values(), task_id),
            )
            seq = self._append_event(db, task_id, state, event, now, fields.get("native_id"), message)
            for extra in also or []:
                seq = self._append_event(db, task_id, None, extra, now)
            return seq

    def update(self, task_id: str, **fields: Any) -> None:
        """Change columns without an event (intent, native id, cancel flag)."""
        with self._tx() as db:
            db.execute(
                f"UPDATE tasks SET {', '.join(f'{k}=?' for k in fields)}, updated=? WHERE id=?",
                (*fields.values(), time.time(), task_id),
            )

    def event(self, task_id: str, event: Any) -> int:
        """Queue an event that is not a state change (a chunk, a re-sent status); returns its seq."""
        return self.events(task_id, [event])

    def events(self, task_id: str, events: list[Any]) -> int:
        """Queue several events of one task in one transaction (one fsync for all the chunks)."""
        seq = 0
        with self._tx() as db:
            now = time.time()
            for event in events:
                seq = self._append_event(db, task_id, None, event, now)
        return seq

    def transitions(self, task_id: str) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM transitions WHERE task_id=? ORDER BY seq", (task_id,))
            return [dict(r) for r in rows.fetchall()]

    # -- outbox ------------------------------------------------------------------
    def put(self, msg: Message, task_id: str | None = None) -> None:
        """Queue a message that is not a task event (health report, legacy reply)."""
        if not self.outbox_enabled:
            return
        with self._tx() as db:
            self._put(db, task_id, msg, time.time())

    def pending(self, limit: int = 100, after_id: int = 0) -> list[OutboxRow]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM outbox WHERE id>? ORDER BY id LIMIT ?", (after_id, limit)
            ).fetchall()
        return [
            OutboxRow(
                id=r["id"], task_id=r["task_id"], destinations=[tuple(d) for d in json.loads(r["destinations"])],
                properties=json.loads(r["properties"]), body=r["body"], file_path=r["file_path"],
                file_offset=r["file_offset"], file_length=r["file_length"],
            )
            for r in rows
        ]

    def outbox_depth(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]

    def delete(self, *row_ids: int) -> None:
        with self._tx() as db:
            db.executemany("DELETE FROM outbox WHERE id=?", [(i,) for i in row_ids])

    def wait_outbox(self, timeout: float) -> None:
        with self._outbox_cv:
            self._outbox_cv.wait(timeout)

    # -- retention (the SQL of fem_hpc/ops/gc.py) -----------------------------------------
    def mark_confirmed(self, now: float, limit: int) -> int:
        """Start the retention clock of final tasks with no outbox row left: the broker confirmed
        every event of theirs, the result included. Returns how many were marked."""
        finals = tuple(s.value for s in FINAL_STATES)
        with self._tx() as db:
            return db.execute(
                f"INSERT INTO retention (task_id, confirmed) SELECT id, ? FROM tasks t WHERE state IN "
                f"({','.join('?' * len(finals))}) AND NOT EXISTS (SELECT 1 FROM retention r WHERE r.task_id=t.id)"
                " AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.task_id=t.id) LIMIT ?",
                (now, *finals, limit)).rowcount

    def workdirs_due(self, completed_before: float | None, failed_before: float | None,
                     limit: int) -> list[WorkdirDue]:
        """Work dirs not removed yet whose every task was confirmed before its cutoff (FAILED ones
        before `failed_before`; None = never) and has nothing in the outbox (a re-sent result may
        still read its archive), oldest first. A dir shared by several tasks (a legacy execution)
        is due when the last of them is."""
        never = float("-inf")  # `confirmed >= -inf` holds for every row: never due
        with self._lock:
            rows = self._db.execute(
                "SELECT t.workdir, GROUP_CONCAT(t.id, ' '), GROUP_CONCAT(t.state, ' '), MAX(r.confirmed)"
                " FROM tasks t LEFT JOIN retention r ON r.task_id=t.id WHERE t.workdir IS NOT NULL"
                " GROUP BY t.workdir HAVING SUM(r.workdir_removed IS NULL) > 0 AND SUM(r.confirmed IS NULL"
                " OR r.confirmed >= (CASE WHEN t.state='FAILED' THEN ? ELSE ? END)"
                " OR EXISTS (SELECT 1 FROM outbox o WHERE o.task_id=t.id)) = 0"
                " ORDER BY MAX(r.confirmed) LIMIT ?",
                (never if failed_before is None else failed_before,
                 never if completed_before is None else completed_before, limit)).fetchall()
        return [WorkdirDue(r[0], r[1].split(" "), r[2].split(" "), r[3]) for r in rows]

    def mark_workdirs_removed(self, workdirs: list[str], now: float) -> None:
        """One transaction for a pass's removals (a crash before it only means they are seen gone next time)."""
        with self._tx() as db:
            db.executemany("UPDATE retention SET workdir_removed=? WHERE workdir_removed IS NULL AND task_id IN"
                           " (SELECT id FROM tasks WHERE workdir=?)", [(now, w) for w in workdirs])

    def compaction_due(self, before: float, limit: int, going: tuple[str, ...] = ()) -> list[CompactionDue]:
        """Confirmed tasks whose clock started before `before`, whose work dir was removed (or is
        one of `going`, removed in the same pass), with no outbox row; oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT t.id, t.workdir, r.workdir_removed IS NOT NULL, r.confirmed, (SELECT COUNT(*) FROM"
                " transitions x WHERE x.task_id=t.id), IFNULL(LENGTH(t.task_json), 0) +"
                " IFNULL(LENGTH(t.result_json), 0) FROM retention r JOIN tasks t ON t.id=r.task_id"
                " WHERE r.confirmed < ? AND (r.workdir_removed IS NOT NULL OR t.workdir IN"
                f" ({','.join('?' * len(going))}))"
                " AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.task_id=t.id) ORDER BY r.confirmed LIMIT ?",
                (before, *going, limit)).fetchall()
        return [CompactionDue(r[0], r[1], bool(r[2]), r[3], r[4], r[5]) for r in rows]

    def compact(self, task_ids: list[str], now: float) -> int:
        """Replace confirmed tasks by tombstones in one transaction: the task's row, transitions,
        retention row and any outbox row left of it go. Returns how many were compacted."""
        done = 0
        with self._tx() as db:
            for task_id in task_ids:
                made = db.execute(
                    "INSERT OR REPLACE INTO tombstones SELECT t.id, t.execution_id, t.user_id, t.executor,"
                    " t.protocol, t.state, t.exit_code, t.reason, t.finished, json_extract(t.task_json,"
                    " '$.labels'), t.seq, r.confirmed, ? FROM tasks t JOIN retention r ON r.task_id=t.id"
                    " WHERE t.id=?", (now, task_id)).rowcount
                if made:
                    for table, column in (("transitions", "task_id"), ("outbox", "task_id"),
                                          ("retention", "task_id"), ("tasks", "id")):
                        db.execute(f"DELETE FROM {table} WHERE {column}=?", (task_id,))
                    done += 1
        return done

    def tombstones_due(self, before: float, limit: int) -> list[str]:
        with self._lock:
            rows = self._db.execute("SELECT id FROM tombstones WHERE confirmed < ? ORDER BY confirmed LIMIT ?",
                                    (before, limit)).fetchall()
        return [r[0] for r in rows]

    def drop_tombstones(self, task_ids: list[str]) -> None:
        with self._tx() as db:
            db.executemany("DELETE FROM tombstones WHERE id=?", [(i,) for i in task_ids])

    @staticmethod
    def _tombstone(row: sqlite3.Row) -> Tombstone:
        d = dict(row)
        d["state"] = State(d["state"])
        d["labels"] = json.loads(d["labels"]) if d["labels"] else {}
        return Tombstone(**d)

    def tombstone(self, task_id: str) -> Tombstone | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM tombstones WHERE id=?", (task_id,)).fetchone()
        return self._tombstone(row) if row else None

    def tombstone_events(self, task_id: str, events: list[Any]) -> Tombstone | None:
        """Queue `make(tombstone, seq)` -> Message for each of `events`, with the next seqs of a
        compacted task, in one transaction. None (and nothing queued) when there is no tombstone."""
        if self.tombstone(task_id) is None:  # the common case, a read: no write lock for every submit
            return None
        with self._tx() as db:
            row = db.execute("SELECT * FROM tombstones WHERE id=?", (task_id,)).fetchone()
            if row is None:
                return None
            tomb = self._tombstone(row)
            now = time.time()
            for make in events:
                tomb.seq += 1
                msg = make(tomb, tomb.seq)
                if msg is not None and self.outbox_enabled:
                    self._put(db, task_id, msg, now)
            db.execute("UPDATE tombstones SET seq=? WHERE id=?", (tomb.seq, task_id))
        return tomb

    def retention_clocks(self) -> dict[str, float | None]:
        """When the oldest kept item of each kind started its clock (None: there is none):
        kept work dirs, final tasks still waiting for the broker, journal rows, tombstones."""
        finals = tuple(s.value for s in FINAL_STATES)
        queries = {
            "workdirs": ("SELECT MIN(confirmed) FROM retention WHERE workdir_removed IS NULL", ()),
            "unconfirmed": (f"SELECT MIN(updated) FROM tasks t WHERE state IN ({','.join('?' * len(finals))})"
                            " AND NOT EXISTS (SELECT 1 FROM retention r WHERE r.task_id=t.id)", finals),
            "journal": ("SELECT MIN(confirmed) FROM retention", ()),
            "tombstones": ("SELECT MIN(confirmed) FROM tombstones", ()),
        }
        with self._lock:
            return {kind: self._db.execute(sql, args).fetchone()[0] for kind, (sql, args) in queries.items()}
