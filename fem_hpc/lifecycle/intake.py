"""Intake: validate -> site policy -> effective task -> journal. The task is committed (with its
RECEIVED event) before the caller acks the message; a known id is answered, never run twice."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import metrics
from ..config import SiteConfig
from ..journal import Journal, Message, Route, TaskRecord
from ..layout import ARCHIVE_NAME, FEM_DIR, task_workdir
from ..model import FieldError, State, StatusEvent, parse_task
from ..policy import check_policy, effective_task, executor_for
from .ports import TaskView
from .tasks import TaskRegistry
from .transitions import Transitions

log = logging.getLogger("fem_hpc.lifecycle")


@dataclass
class IntakeResult:
    record: TaskRecord | None
    created: bool
    errors: list[FieldError] = field(default_factory=list)
    executor: str | None = None  # the configured executor a rejected task named, when known


class Intake:
    def __init__(self, site: SiteConfig, journal: Journal, registry: TaskRegistry, transitions: Transitions,
                 start: Callable[[str], None]):
        self.site = site
        self.journal = journal
        self.registry = registry
        self.transitions = transitions
        self.start = start  # hands a committed task to the stage-in workers

    def accept(self, data: Any, route: Route, *, workdir: Path | None = None,
               secret_env: dict[str, str] | None = None) -> IntakeResult:
        task, errors = parse_task(data)
        if task is not None:
            errors = check_policy(task, self.site)
        if task is None or errors:
            named = (task.executor or self.site.default_executor) if task is not None else None
            executor = named if named in self.site.executors else None
            shown = data.get("id") if isinstance(data, dict) else "(not an object)"
            log.warning("rejected task %s: %s", shown, "; ".join(f"{e.field}: {e.message}" for e in errors),
                        extra={"task_id": task.id if task is not None else None, "native_id": None})
            metrics.intake(executor, "rejected")
            return IntakeResult(None, False, errors, executor)
        task = effective_task(task, self.site)
        view = TaskView(task, route, workdir or task_workdir(self.site.work_root, task))
        built: list[StatusEvent] = []

        def received(seq: int) -> list[Message]:
            ev = self.transitions.status_event(view, State.RECEIVED, seq, None)
            built.append(ev)
            return self.transitions.messages(view, ev)

        record, created = self.journal.insert(task, executor=executor_for(task, self.site), workdir=view.workdir,
                                              route=route, event=received)
        if not created:
            log.info("%s already known (%s): re-sending its state", task.id, record.state.value,
                     extra={"task_id": task.id, "native_id": record.native_id})
            metrics.intake(record.executor, "duplicate")
            archive = Path(record.workdir or "") / FEM_DIR / ARCHIVE_NAME
            self.transitions.resend(record, route, self.site.stage_out.chunk_bytes, archive)
            return IntakeResult(record, False)
        self.registry.remember(view, secret_env)
        log.info("%s RECEIVED (executor %s)", task.id, record.executor, extra={"task_id": task.id, "native_id": None})
        metrics.intake(record.executor, "accepted")
        self.transitions.notify(task.id, built[0])
        self.start(task.id)
        return IntakeResult(record, True)
