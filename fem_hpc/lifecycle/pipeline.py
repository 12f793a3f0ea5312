"""Stage-in, render and submit: from a committed task to a job its tracker follows."""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from .. import metrics
from ..config import SiteConfig
from ..diskguard import DiskGuard
from ..executors.base import Executor, ExecutorError, Job
from ..journal import Journal, TaskRecord
from ..model import Reason, State
from ..render import render_job
from ..staging.errors import StageError
from .executors import ExecutorPool
from .ports import Progress, StageStep
from .results import Results
from .tasks import TaskRegistry
from .transitions import Transitions

log = logging.getLogger("fem_hpc.lifecycle")


class Pipeline:
    def __init__(self, site: SiteConfig, journal: Journal, registry: TaskRegistry, transitions: Transitions,
                 executors: ExecutorPool, results: Results, guard: DiskGuard, steps: list[StageStep],
                 progress_observers: list[Callable[[str, str], None]], closing: Callable[[], bool]):
        self.site = site
        self.journal = journal
        self.registry = registry
        self.transitions = transitions
        self.executors = executors
        self.results = results
        self.guard = guard  # no new task starts while a disk is low (on_low_disk: queue)
        self.steps = steps  # stage-in steps before the executor's own (the Git checkout)
        self.progress_observers = progress_observers  # (task_id, text) of long steps, shown by `run`
        self.closing = closing

    def job_for(self, record: TaskRecord) -> Job:
        job = Job(task=record.task, workdir=Path(record.workdir or ""), native_id=record.native_id,
                  secret_env=self.registry.secret_env(record.id))
        submitted = [t["time"] for t in self.journal.transitions(record.id) if t["state"] == State.SUBMITTED.value]
        if submitted:
            job.submitted_at = submitted[0]
        return job

    def stage_and_submit(self, task_id: str) -> None:
        try:
            self._stage_and_submit(task_id)
        except Exception as exc:  # nothing may vanish silently: an unexpected error still ends the task
            log.exception("%s: unexpected error before submit", task_id, extra={"task_id": task_id})
            self.results.finish_early(task_id, Reason.SUBMIT, f"internal error before submit: {exc}")

    def _wait_for_disk(self, task_id: str) -> bool:
        """With on_low_disk: queue, a task waits here (RECEIVED, its message says why) until the
        disk guard clears; False when the service stops meanwhile (the next start carries on)."""
        noted: float | None = None
        while (why := self.guard.blocked()) is not None and self.guard.on_low_disk == "queue":
            if self.closing():
                return False
            rec = self.journal.get(task_id)
            if rec is None or rec.final or rec.cancel_requested:
                return True  # the caller finishes it (cancelled before it was submitted)
            if noted is None or time.monotonic() - noted > 60:  # the free space, refreshed once a minute
                log.warning("%s waits for disk space: %s", task_id, why, extra={"task_id": task_id})
                self._note(task_id, f"waiting for disk space: {why}")
                noted = time.monotonic()
            time.sleep(min(1.0, self.guard.cfg.check_seconds))
        if noted is not None:
            self._note(task_id, None)
        return True

    def _note(self, task_id: str, message: str | None) -> None:
        """The task's message for `status` and status requests; on a full disk it is only logged."""
        try:
            self.journal.update(task_id, message=message)
        except (sqlite3.Error, OSError) as exc:
            log.warning("%s: cannot note its message in the journal (%s)", task_id, exc, extra={"task_id": task_id})

    def _stage_and_submit(self, task_id: str) -> None:
        if not self._wait_for_disk(task_id):
            return
        record = self.journal.get(task_id)
        if record is None or record.final or self.closing():
            return
        job = self.job_for(record)
        if record.cancel_requested:
            self.results.finish_early(task_id, None, "cancelled before it was submitted", state=State.CANCELLED)
            return
        self.transitions.change(task_id, State.STAGING_IN)
        try:
            executor, _ = self.executors.start(record.executor or self.site.default_executor)
        except (KeyError, ExecutorError) as exc:
            self.results.finish_early(task_id, Reason.SUBMIT, f"executor {record.executor!r} unavailable: {exc}")
            return
        started = time.monotonic()
        try:
            self._prepare_workdir(job)
            progress = self._progress_for(task_id)
            for step in self.steps:
                step(job.task, job.workdir, self.site, progress)
            job.fem_dir.mkdir(parents=True, exist_ok=True)
            executor.stage_in(job, progress)
        except (StageError, ExecutorError, OSError) as exc:
            self.results.finish_early(task_id, Reason.STAGE_IN, str(exc))
            return
        log.debug("%s staged in %.2fs", task_id, time.monotonic() - started, extra={"task_id": task_id})
        metrics.stage_in(executor.name, time.monotonic() - started, job.workdir)
        if (rec := self.journal.get(task_id)) and rec.cancel_requested:
            self.results.finish_early(task_id, None, "cancelled before it was submitted", state=State.CANCELLED)
            return
        self.submit(task_id, job, executor, attempt=record.attempt)

    def _progress_for(self, task_id: str) -> Progress:
        """A callback for long stage-in steps (git clone, image pull): logged, and shown by `run`."""
        def progress(text: str) -> None:
            log.info("%s: %s", task_id, text, extra={"task_id": task_id})
            for observer in list(self.progress_observers):
                observer(task_id, text)
        return progress

    @staticmethod
    def _prepare_workdir(job: Job) -> None:
        """A fresh work dir. One left from an interrupted stage-in of this task (the journal says
        it is ours) is cleared, so two attempts never mix their files."""
        wd = job.workdir
        if wd.exists():
            fem = job.fem_dir
            if fem.exists():
                shutil.rmtree(fem)
            # A checkout goes into an empty dir. One into the work dir itself empties it; one that
            # lives in .fem/source (a task that mounts its source) went with .fem, and the work
            # dir's files (a legacy execution's earlier outputs, received files) stay.
            if job.task.source and job.source_dir == wd and any(wd.iterdir()):
                shutil.rmtree(wd)
        wd.mkdir(parents=True, exist_ok=True, mode=0o750)

    def submit(self, task_id: str, job: Job, executor: Executor, attempt: int) -> None:
        script = render_job(executor, job)
        tmp = job.script_path.with_suffix(".tmp")
        tmp.write_text(script)
        tmp.chmod(0o700)
        os.replace(tmp, job.script_path)
        # Intent first: a crash between submit and the next commit is found by job name at restart.
        self.journal.update(task_id, intent=1, attempt=attempt + 1)
        try:
            native_id = executor.submit(job)
        except (ExecutorError, OSError) as exc:
            self.journal.update(task_id, intent=0)
            self.results.finish_early(task_id, Reason.SUBMIT, f"submit failed: {exc}")
            return
        job.native_id = native_id
        job.submitted_at = time.time()
        self.transitions.change(task_id, State.SUBMITTED, native_id=native_id)
        self.track(executor.name, job)

    def track(self, executor_name: str, job: Job) -> None:
        """Hand a submitted job to its tracker. A cancel that arrived meanwhile (during submit, or
        before a restart) is carried out now, not just remembered."""
        _, tracker = self.executors.start(executor_name)
        tracker.track(job)
        rec = self.journal.get(job.task.id)
        if rec is not None and rec.cancel_requested:
            tracker.cancel(job.task.id)
