"""A read-only view of a journal file, for `fem-hpc status` and `doctor`."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

STATUS_COLUMNS = ("id", "user_id", "executor", "native_id", "state", "created", "updated", "message",
                  "exit_code", "reason")


class JournalReader:
    """A read-only view of a journal file, safe while `serve` writes it (WAL): for `fem-hpc status`
    and `doctor`, which must never create, lock or change it."""

    def __init__(self, path: Path, timeout: float = 10.0):
        self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=timeout)
        self._db.row_factory = sqlite3.Row

    def __enter__(self) -> JournalReader:
        return self

    def __exit__(self, *_: Any) -> None:
        self._db.close()

    def task_rows(self, task_id: str | None = None) -> list[dict[str, Any]]:
        """The status columns of every task (or of one), newest first."""
        query = f"SELECT {', '.join(STATUS_COLUMNS)} FROM tasks"
        args: tuple[Any, ...] = ()
        if task_id:
            query += " WHERE id=?"
            args = (task_id,)
        return [dict(r) for r in self._db.execute(query + " ORDER BY created DESC", args)]

    def counts_by_state(self) -> dict[str, int]:
        return {r[0]: r[1] for r in self._db.execute("SELECT state, COUNT(*) FROM tasks GROUP BY state")}

    def outbox_depth(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
