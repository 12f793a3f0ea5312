"""The journal's retention tables (the SQL of fem_hpc/ops/gc.py): when each final task's result
was confirmed by the broker, which work dirs (here, and on a cluster) are gone, and the tombstones that keep a compacted
task's id an idempotency key for `retention.idempotency_days`."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from ..model import FINAL_STATES, State

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
CREATE TABLE IF NOT EXISTS remote_workdirs (
    task_id TEXT PRIMARY KEY,  -- its work dir on a cluster without a shared file system is gone
    removed REAL NOT NULL
);
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
class RemoteDue:
    """A confirmed task whose work dir on a cluster (remote_work_root) may go."""

    task_id: str
    user_id: str
    execution_id: str
    state: str
    confirmed: float


@dataclass
class CompactionDue:
    task_id: str
    workdir: str | None
    workdir_removed: bool
    confirmed: float
    transitions: int
    json_bytes: int  # the task's and its result's JSON: most of what compaction frees


class RetentionTables:
    """The retention SQL, on the journal's own connection, lock and transactions."""

    def __init__(self, db: sqlite3.Connection, lock: Any, tx: Callable[[], AbstractContextManager[sqlite3.Connection]],
                 put: Callable[[sqlite3.Connection, str | None, Any, float], None], outbox: Callable[[], bool]):
        self._db = db
        self._lock = lock
        self._tx = tx
        self._put = put
        self._outbox = outbox

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

    def remote_due(self, executor: str, states: tuple[str, ...], before: float, limit: int) -> list[RemoteDue]:
        """Tasks of `executor` in one of `states`, confirmed at `before` or earlier (remote_keep_days 0:
        in the pass that saw the confirmation), whose remote work dir was not removed yet, with
        nothing in the outbox; oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT t.id, t.user_id, t.execution_id, t.state, r.confirmed FROM retention r JOIN tasks t"
                f" ON t.id=r.task_id WHERE t.executor=? AND t.state IN ({','.join('?' * len(states))})"
                " AND r.confirmed <= ? AND NOT EXISTS (SELECT 1 FROM remote_workdirs w WHERE w.task_id=t.id)"
                " AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.task_id=t.id) ORDER BY r.confirmed LIMIT ?",
                (executor, *states, before, limit)).fetchall()
        return [RemoteDue(r[0], r[1], r[2], r[3], r[4]) for r in rows]

    def mark_remote_removed(self, task_ids: list[str], now: float) -> None:
        with self._tx() as db:
            db.executemany("INSERT OR IGNORE INTO remote_workdirs VALUES (?, ?)", [(t, now) for t in task_ids])

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
                                          ("retention", "task_id"), ("remote_workdirs", "task_id"), ("tasks", "id")):
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
                made = make(tomb, tomb.seq)
                if self._outbox():
                    for msg in made if isinstance(made, list) else [made] if made is not None else []:
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
