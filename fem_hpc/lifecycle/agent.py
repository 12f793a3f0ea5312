"""The task lifecycle's front door: intake -> stage-in -> render -> submit -> track -> stage-out -> result.

The Agent wires the parts (intake, pipeline, results, recovery, the executor pool) and owns the
two worker pools. It is protocol-agnostic: the messages of every event come from the frontend of
the task's protocol, written in the same journal transaction as the state change.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..config import SiteConfig
from ..diskguard import DiskGuard
from ..journal import Journal, Route, TaskRecord
from ..model import State
from .executors import ExecutorPool
from .intake import Intake, IntakeResult
from .later import Later, Retries
from .pipeline import Pipeline
from .ports import Frontend, StageStep
from .recovery import Recovery
from .results import Results
from .tasks import TaskRegistry
from .transitions import Observer, Transitions

log = logging.getLogger("fem_hpc.lifecycle")

LOCAL = Route("cli")  # a task of `fem-hpc run`: nobody listens over the broker


class Agent:
    def __init__(self, site: SiteConfig, journal: Journal, *, frontends: Mapping[str, Frontend] | None = None,
                 steps: list[StageStep] | None = None, workers: int | None = None):
        self.site = site
        self.journal = journal
        self.observers: list[Observer] = []  # display hooks (progress lines of `run`), after each commit
        self.progress_observers: list[Callable[[str, str], None]] = []  # (task_id, text) of long stage-in steps
        self._closing = False
        n = workers or site.workers
        self._pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="fem-task")
        # Stage-out has its own workers: a finished job's result must not wait behind a burst of
        # stage-ins and submits (a slow sbatch would otherwise delay every result).
        self._out_pool = ThreadPoolExecutor(max_workers=max(2, n // 2), thread_name_prefix="fem-stageout")
        self.disk_guard = DiskGuard(site)  # retention: no new task starts while a disk is low
        self.registry = TaskRegistry(journal)
        # Retries of submits and stage-outs while a cluster is unreachable wait here, not in a worker.
        self.later = Later()
        self.retries = Retries(self.later)
        self.transitions = Transitions(site.node, journal, self.registry, dict(frontends or {}), self.observers)
        self.results = Results(site, journal, self.registry, self.transitions, self._out_pool, self.closing,
                               lambda name: self.executors.start(name)[0], self.retries)
        self.executors = ExecutorPool(site, self.results)
        self.pipeline = Pipeline(site, journal, self.registry, self.transitions, self.executors, self.results,
                                 self.disk_guard, list(steps or []), self.progress_observers, self.closing,
                                 self.retries, self._pool.submit)
        self.intake_ = Intake(site, journal, self.registry, self.transitions, self.disk_guard,
                              lambda task_id: self._pool.submit(self.pipeline.stage_and_submit, task_id))
        self.recovery = Recovery(site, journal, self.registry, self.transitions, self.pipeline, self.results,
                                 self._pool, self._out_pool, self.closing)

    def closing(self) -> bool:
        return self._closing

    # -- requests ----------------------------------------------------------------------------
    def intake(self, data: Any, route: Route = LOCAL, *, workdir: Path | None = None,
               secret_env: dict[str, str] | None = None) -> IntakeResult:
        """Validate, check policy, journal. Returns once the task is committed (then ack)."""
        return self.intake_.accept(data, route, workdir=workdir, secret_env=secret_env)

    def status(self, task_id: str, to: Route) -> State:
        record = self.journal.get(task_id)
        return self.transitions.answer(task_id, record, record.message if record else None, to)

    def cancel(self, task_id: str, to: Route | None = None) -> State:
        """Stop a task. `to`, when given, hears at once; the CANCELLED events follow on the task's own route."""
        record = self.journal.get(task_id)
        if record is None or record.final or record.state == State.STAGING_OUT:
            note = None if record is None else f"already {record.state.value.lower()}; nothing to cancel"
            return self.transitions.answer(task_id, record, note, to) if to is not None else (
                record.state if record is not None else State.UNKNOWN)
        self.journal.update(task_id, cancel_requested=1)
        log.info("%s cancel requested", task_id, extra={"task_id": task_id, "native_id": record.native_id})
        if to is not None:
            self.transitions.answer(task_id, record, "cancel requested", to)
        # A tracked job is stopped now; one still staging is stopped by its stage-in worker, which
        # checks the flag before it submits anything.
        if record.executor:
            _, tracker = self.executors.start(record.executor)
            tracker.cancel(task_id)
        return record.state

    def wait(self, task_id: str, timeout: float | None = None) -> TaskRecord | None:
        done = self.registry.final_event(task_id)
        rec = self.journal.get(task_id)
        if rec is not None and rec.final:
            return rec
        done.wait(timeout)
        return self.journal.get(task_id)

    def recover(self, skip_protocols: tuple[str, ...] = ()) -> int:
        """Carry on with every task the journal holds as not final. Returns how many.
        `serve` skips tasks of `fem-hpc run` processes, which follow their own tasks."""
        return self.recovery.recover(skip_protocols)

    def executors_health(self) -> dict[str, dict[str, Any]]:
        return self.executors.health()

    def close(self) -> None:
        """Stop tracking; jobs keep running and are re-adopted at the next start."""
        self._closing = True
        self.later.stop()
        self.results.stop()
        self.recovery.stop()
        self._pool.shutdown(wait=True, cancel_futures=False)
        self._out_pool.shutdown(wait=True, cancel_futures=False)
        self.executors.close()
