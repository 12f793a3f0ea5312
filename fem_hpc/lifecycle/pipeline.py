"""Stage-in, render and submit: from a committed task to a job its tracker follows.

A submit that cannot reach the cluster (TransportError) never fails the task: it stays staged,
its status message says it is paused, and the submit is tried again later with backoff. Because
the submit may have reached the scheduler before the link dropped, the journal's intent stays
set and the retry first looks for the job by name (and for its marker), as a restart does: one
task never gets two jobs.
"""

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
from ..executors.base import Deferred, Executor, ExecutorError, Job, TransportError
from ..journal import Journal, TaskRecord
from ..model import Reason, State
from ..render import render_job
from ..staging.errors import StageError
from .executors import ExecutorPool
from .later import Retries
from .outcome import decide
from .ports import Progress, StageStep
from .results import Results
from .tasks import TaskRegistry
from .transitions import Transitions

log = logging.getLogger("fem_hpc.lifecycle")


class Pipeline:
    def __init__(self, site: SiteConfig, journal: Journal, registry: TaskRegistry, transitions: Transitions,
                 executors: ExecutorPool, results: Results, guard: DiskGuard, steps: list[StageStep],
                 progress_observers: list[Callable[[str, str], None]], closing: Callable[[], bool],
                 retries: Retries, run_later: Callable[..., object]):
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
        self.retries = retries
        self.run_later = run_later  # hands a retry to the stage-in pool

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
        if record.state != State.STAGING_IN:  # a retry after an outage is still the same stage-in
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
        except TransportError as exc:  # e.g. the image pull on an unreachable cluster: later, whole
            self._paused(task_id, executor, exc, adopt=False, restage=True)
            return
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
        try:
            executor.stage_remote(job)  # the staged work dir to where the job runs (no-op when shared)
        except TransportError as exc:
            self._paused(task_id, executor, exc, adopt=False)
            return
        except (ExecutorError, OSError) as exc:
            self.results.finish_early(task_id, Reason.STAGE_IN, str(exc))
            return
        # Intent first: a crash between submit and the next commit is found by job name at restart.
        self.journal.update(task_id, intent=1, attempt=attempt + 1)
        try:
            native_id = executor.submit(job)
        except Deferred as exc:  # the call budget: nothing was sent, the task waits its turn
            self.journal.update(task_id, intent=0)
            self._deferred(task_id, exc)
            return
        except TransportError as exc:
            self._paused(task_id, executor, exc, adopt=True)  # it may have reached the scheduler
            return
        except (ExecutorError, OSError) as exc:
            self.journal.update(task_id, intent=0)
            self.results.finish_early(task_id, Reason.SUBMIT, f"submit failed: {exc}")
            return
        self.retries.done(task_id)
        job.native_id = native_id
        job.submitted_at = time.time()
        self.transitions.change(task_id, State.SUBMITTED, native_id=native_id)
        self.track(executor.name, job)

    def _paused(self, task_id: str, executor: Executor, exc: TransportError | Exception, *, adopt: bool,
                restage: bool = False) -> None:
        """Keep the task staged and try again later; the status message says why it waits."""
        message = exc.pause_message if isinstance(exc, TransportError) else f"waiting to look for its job: {exc}"
        self.journal.update(task_id, message=message)
        again = (self.stage_and_submit, task_id) if restage else (self._resume_guarded, task_id, adopt)
        delay = self.retries.schedule(task_id, executor.settings.retry_max_seconds, self.run_later, *again)
        if delay is not None:
            log.warning("%s: %s (%s); submit retried in %.0fs", task_id, message, exc, delay,
                        extra={"task_id": task_id})

    def _deferred(self, task_id: str, exc: Deferred, adopt: bool = False) -> None:
        self.journal.update(task_id, message=f"waiting for the scheduler call budget ({exc})")
        self.retries.later.call(exc.retry_after, self.run_later, self._resume_guarded, task_id, adopt)

    def _resume_guarded(self, task_id: str, adopt: bool) -> None:
        try:
            self.resume_submit(task_id, adopt, "re-adopted: its submit had reached the scheduler")
        except Exception as exc:  # nothing may vanish silently
            log.exception("%s: unexpected error in a submit retry", task_id, extra={"task_id": task_id})
            self.results.finish_early(task_id, Reason.SUBMIT, f"internal error before submit: {exc}")

    def resume_submit(self, task_id: str, adopt: bool, found_note: str) -> None:
        """Carry on with a staged task whose submit did not get through, or whose submit intent
        is in the journal without a native id (after a restart): with `adopt`, its job is looked
        for by name first, and its marker, so one task never gets two jobs."""
        record = self.journal.get(task_id)
        if record is None or record.final or self.closing():
            return
        executor, _ = self.executors.start(record.executor or self.site.default_executor)
        job = self.job_for(record)
        if adopt or record.intent:
            try:
                native_id = executor.find_by_name(job)
                marker = executor.read_markers([job]).get(task_id) if native_id is None else None
            except Deferred as exc:
                self._deferred(task_id, exc, adopt=True)
                return
            except Exception as exc:  # unreachable, or the scheduler does not answer yet: later
                self._paused(task_id, executor, exc, adopt=True)
                return
            if native_id is None and marker is not None:  # it ran and ended: the marker decides
                self.retries.done(task_id)
                self.results.on_final(job, decide(marker, None, record.cancel_requested, job))
                return
            if native_id is not None:
                self.retries.done(task_id)
                job.native_id = native_id
                self.transitions.change(task_id, State.SUBMITTED, native_id=native_id, message=found_note)
                self.track(executor.name, job)
                return
            log.info("%s: no job found for the journalled intent; submitting it now", task_id,
                     extra={"task_id": task_id})
        if record.cancel_requested:
            self.retries.done(task_id)
            self.results.finish_early(task_id, None, "cancelled before it was submitted", state=State.CANCELLED)
            return
        self.submit(task_id, job, executor, attempt=record.attempt)

    def track(self, executor_name: str, job: Job) -> None:
        """Hand a submitted job to its tracker. A cancel that arrived meanwhile (during submit, or
        before a restart) is carried out now, not just remembered."""
        _, tracker = self.executors.start(executor_name)
        tracker.track(job)
        rec = self.journal.get(job.task.id)
        if rec is not None and rec.cancel_requested:
            tracker.cancel(job.task.id)
