"""Shared by the retention tests: a fake clock, a site, and tasks recorded through the real journal."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from fem_hpc.config import SiteConfig, config_from_dict
from fem_hpc.journal import Journal, Message, Route
from fem_hpc.layout import task_workdir
from fem_hpc.model import State, parse_task


class FakeClock:
    def __init__(self, start: float | None = None):
        self.t = time.time() if start is None else start

    def __call__(self) -> float:
        return self.t

    def at(self, t: float) -> FakeClock:
        self.t = t
        return self


def make_site(tmp_path: Path, **retention: Any) -> SiteConfig:
    return config_from_dict({
        "node": "gcnode", "state_dir": str(tmp_path / "state"), "work_root": str(tmp_path / "work"),
        "executors": {"local": {"kill_grace_seconds": 1}},
        "policy": {"git": ["file://*"], "images": ["127.0.0.1:5000/*"]},
        "retention": {"workdirs_days": 7, "keep_failed_days": 14, "journal_days": 30, "idempotency_days": 365,
                      **retention},
    })


def event(task_id: str) -> Any:
    return lambda seq: Message([("fem.events", f"gcnode.{task_id}.status")], {"type": "status"},
                               body=json.dumps({"seq": seq}).encode())


def add_task(journal: Journal, site: SiteConfig, task_id: str, state: State = State.COMPLETED,
             workdir: Path | None = None, executor: str = "local", **task: Any) -> Path:
    """A task through the journal as the agent records it, with a real work dir and archive."""
    parsed, errors = parse_task({"id": task_id, "command": ["true"], **task})
    assert parsed is not None, errors
    wd = workdir or task_workdir(site.work_root, parsed)
    journal.insert(parsed, executor=executor, workdir=wd, route=Route("v1"), event=event(task_id))
    (wd / ".fem").mkdir(parents=True, exist_ok=True)
    (wd / ".fem" / "outputs.tar.gz").write_bytes(b"x" * 4000)
    (wd / "result.txt").write_text("42\n")
    if state != State.RECEIVED:
        journal.transition(task_id, State.RUNNING, event(task_id))
    if state.final:
        journal.transition(task_id, state, event(task_id), exit_code=0 if state == State.COMPLETED else 1,
                           finished="2026-11-30T10:00:00.000000Z", result_json="{}")
    return wd


def confirm(journal: Journal) -> None:
    """What the publisher does once the broker confirmed the rows: delete them from the outbox."""
    rows = journal.pending(limit=10_000)
    if rows:
        journal.delete(*[r.id for r in rows])
