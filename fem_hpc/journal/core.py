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

from ..model import FINAL_STATES, State, Task
from .retention import RETENTION_SCHEMA, Compacted, RetentionTables

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


@dataclass(frozen=True)
class Route:
    """Where a task's events go, as its protocol frontend understands it. The lifecycle stores and
    passes it on without reading it; only the frontend named by `protocol` interprets the rest."""

    protocol: str
    reply_to: str | None = None
    correlation_id: str | None = None


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

    @property
    def route(self) -> Route:
        return Route(self.protocol, self.reply_to, self.correlation_id)


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
        self.retention = RetentionTables(self._db, self._lock, self._tx, self._put, lambda: self.outbox_enabled)

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
        route: Route,
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
                 task.model_dump_json(), route.protocol, route.reply_to, route.correlation_id, str(workdir),
                 now, now),
            )
            if event is not None:
                self._append_event(db, task.id, State.RECEIVED, event, now)
            row = db.execute("SELECT * FROM tasks WHERE id=?", (task.id,)).fetchone()
        return self._record(row), True

    def _append_event(self, db: sqlite3.Connection, task_id: str, state: State | None, event: Any,
                      now: float, native_id: str | None = None, message: str | None = None) -> int:
        """Bump the task's seq and queue what `event(seq)` returns (a Message, a list of them, or
        None) in the outbox, in the caller's transaction."""
        seq = db.execute("UPDATE tasks SET seq=seq+1, updated=? WHERE id=? RETURNING seq",
                         (now, task_id)).fetchone()[0]
        if state is not None:
            db.execute("INSERT INTO transitions VALUES (?,?,?,?,?,?)",
                       (task_id, seq, state.value, now, native_id, message))
        made = event(seq) if callable(event) else event
        if self.outbox_enabled:
            for msg in made if isinstance(made, list) else [made] if made is not None else []:
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
    def put(self, *msgs: Message, task_id: str | None = None) -> None:
        """Queue messages that are not task events (a health report, a legacy reply, a rejection),
        all in one transaction."""
        if not self.outbox_enabled or not msgs:
            return
        with self._tx() as db:
            now = time.time()
            for msg in msgs:
                self._put(db, task_id, msg, now)

    def pending(self, limit: int = 100) -> list[OutboxRow]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM outbox ORDER BY id LIMIT ?", (limit,)).fetchall()
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
