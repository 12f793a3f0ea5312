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
from ..diskguard import DiskGuard
from ..journal import Journal, Message, Route, TaskRecord, Tombstone
from ..layout import ARCHIVE_NAME, FEM_DIR, task_workdir
from ..model import FieldError, Reason, ResultEvent, State, StatusEvent, parse_task
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
    settled: str | None = None  # a task retention compacted long ago: what became of it (runs nothing)


class Intake:
    def __init__(self, site: SiteConfig, journal: Journal, registry: TaskRegistry, transitions: Transitions,
                 guard: DiskGuard, start: Callable[[str], None]):
        self.site = site
        self.guard = guard
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
        if (settled := self._settled(task.id, route)) is not None:
            return settled
        if (refused := self._refused_for_disk(task.id)) is not None:
            return refused
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

    # -- retention and the disk guard (fem_hpc/diskguard.py, fem_hpc/ops/gc.py) ------------------
    def _settled(self, task_id: str, route: Route) -> IntakeResult | None:
        """A submit of a task retention compacted: its final state ("finished on <date>, outputs
        expired") and a result without outputs, from the tombstone, through the requester's
        frontend, with fresh seqs. Runs nothing."""

        def status(tomb: Tombstone, seq: int) -> list[Message]:
            return self.transitions.messages(None, self.transitions.tombstone_status(tomb, seq), to=route)

        def result(tomb: Tombstone, seq: int) -> list[Message]:
            ev = ResultEvent(node=self.site.node, task_id=tomb.id, seq=seq, state=tomb.state,
                             exit_code=tomb.exit_code, reason=Reason(tomb.reason) if tomb.reason else None,
                             finished=tomb.finished, labels=tomb.labels)
            return self.transitions.messages(None, ev, to=route)

        tomb = self.journal.retention.tombstone_events(task_id, [status, result])
        if tomb is None:
            return None
        log.info("%s was compacted by retention (%s): answered from its tombstone, not run again", task_id,
                 tomb.note(), extra={"task_id": task_id, "native_id": None})
        metrics.intake(tomb.executor, "duplicate")
        return IntakeResult(None, False, settled=f"task {task_id} {tomb.note()}")

    def _refused_for_disk(self, task_id: str) -> IntakeResult | None:
        """With on_low_disk: reject, a new task is refused while a disk is low (a known id is not)."""
        if self.guard.on_low_disk != "reject" or (why := self.guard.blocked()) is None \
                or self.journal.get(task_id) is not None:
            return None
        metrics.intake(None, "rejected")
        return IntakeResult(None, False, [FieldError(field="node",
                                                     message=f"not enough disk space to take new tasks: {why}")])
