"""From a job's end to its result: stage-out, the chunks, the final transition. Also the tracker's
listener (RUNNING, pending reasons, pauses, the end) and the early end of a task that never ran.

A stage-out that cannot reach the cluster (outputs built where the job ran) stays in STAGING_OUT,
paused, and is tried again later with backoff; so does one that finds the disk (or the journal)
full: a job that ended well is never turned FAILED by a full disk, its outputs go back once there is
space. A remote work dir outlives the result: the retention pass (ops/gc.py) removes it once the
broker confirmed the result."""

from __future__ import annotations

import errno
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor as Pool
from pathlib import Path

from .. import metrics
from ..backoff import Backoff
from ..config import SiteConfig
from ..executors.base import Executor, ExecutorError, Job, NativeStatus, TransportError
from ..journal import Journal
from ..layout import FEM_DIR
from ..model import OutputsInfo, Reason, ResultEvent, State, utcnow
from ..staging.outputs import Archive, StageOutError, build_archive, tail
from .later import Retries
from .outcome import Outcome
from .tasks import TaskRegistry
from .transitions import Transitions

log = logging.getLogger("fem_hpc.lifecycle")

DISK_FULL_RETRY_SECONDS = 60.0  # the longest wait between two stage-out tries on a full disk


def disk_full(exc: BaseException) -> bool:
    """A write failed for lack of space (or quota): waiting helps, failing the task would not."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(exc, sqlite3.OperationalError) and "full" in str(exc)


class Results:
    def __init__(self, site: SiteConfig, journal: Journal, registry: TaskRegistry, transitions: Transitions,
                 out_pool: Pool, closing: Callable[[], bool], executor_for: Callable[[str], Executor],
                 retries: Retries):
        self.site = site
        self.executor_for = executor_for  # the executor instance of a configured name
        self.retries = retries
        self.journal = journal
        self.registry = registry
        self.transitions = transitions
        self.out_pool = out_pool
        self.closing = closing
        self._stop = threading.Event()

    # -- the tracker's listener ---------------------------------------------------------------
    def on_running(self, job: Job, status: NativeStatus) -> None:
        self.transitions.change(job.task.id, State.RUNNING, message=status.message)

    def on_pending(self, job: Job, status: NativeStatus) -> None:
        # Queued again after it ran (PBS rerun, Slurm requeue): the task is back to SUBMITTED, an
        # event that says why. Otherwise why the scheduler holds the job (Priority, Resources, ...):
        # shown by `status` and in the reply to a status request; the state has not changed.
        record = self.journal.get(job.task.id)
        if record is not None and record.state == State.RUNNING:
            self.transitions.change(job.task.id, State.SUBMITTED, message=status.message or "queued again")
            return
        self.journal.update(job.task.id, message=f"pending: {status.message}" if status.message else None)

    def on_final(self, job: Job, outcome: Outcome) -> None:
        self.out_pool.submit(self.stage_out_guarded, job, outcome)

    def on_paused(self, job: Job, message: str) -> None:
        # The cluster is unreachable: the task keeps its state, its message says why nothing moves.
        self.journal.update(job.task.id, message=message)

    def on_resumed(self, job: Job) -> None:
        self.journal.update(job.task.id, message=None)

    # -- stage-out ------------------------------------------------------------------------------
    def stage_out_guarded(self, job: Job, outcome: Outcome) -> None:
        try:
            self.stage_out(job, outcome)
        except Exception as exc:
            if disk_full(exc) and not self.closing():
                self._retry_when_space(job, outcome, exc)
                return
            log.exception("%s: stage-out failed unexpectedly", job.task.id, extra={"task_id": job.task.id})
            self.finish_early(job.task.id, Reason.STAGE_OUT, f"internal error in stage-out: {exc}")

    def stage_out(self, job: Job, outcome: Outcome) -> None:
        task_id = job.task.id
        record = self.journal.get(task_id)
        if record is None or record.final:
            return
        if record.state == State.SUBMITTED and outcome.started:
            self.transitions.change(task_id, State.RUNNING)  # it ran, only too briefly for a poll to see
        if record.state != State.STAGING_OUT:
            self.transitions.change(task_id, State.STAGING_OUT, message=outcome.message,
                                    exit_code=outcome.exit_code,
                                    reason=outcome.reason.value if outcome.reason else None,
                                    started=outcome.started, finished=outcome.finished,
                                    outcome=outcome.state.value)
        cfg = self.site.stage_out
        note = outcome.message
        started = time.monotonic()
        executor = self.executor_for(record.executor or self.site.default_executor)
        try:
            try:
                archive = self._archive(executor, job, job.task.outputs)
            except (StageOutError, ExecutorError, OSError) as exc:
                if isinstance(exc, TransportError) or disk_full(exc):
                    raise  # not the outputs' fault: tried again later
                outcome = Outcome(State.FAILED, Reason.STAGE_OUT, outcome.exit_code, str(exc), outcome.started,
                                  outcome.finished)
                note = str(exc)
                archive = self._logs_only(executor, job)  # the logs still go back
        except TransportError as exc:
            self._retry_stage_out(executor, job, outcome, exc)
            return
        self.retries.done(f"out:{task_id}")
        if archive.skipped:
            note = "; ".join(filter(None, [note, *archive.skipped]))
        info = OutputsInfo(size=archive.size, sha256=archive.sha256, chunks=archive.chunks(cfg.chunk_bytes))
        self.transitions.chunks(self.registry.view(task_id), archive.path, info, cfg.chunk_bytes)
        result = ResultEvent(
            node=self.site.node, task_id=task_id, seq=0, state=outcome.state, exit_code=outcome.exit_code,
            reason=outcome.reason, started=outcome.started, finished=outcome.finished or utcnow(),
            outputs=info,
            stdout_tail=tail(job.fem_dir / "stdout", cfg.tail_bytes),
            stderr_tail=tail(job.fem_dir / "stderr", cfg.tail_bytes),
            labels=job.task.labels, native_id=job.native_id)
        metrics.stage_out(record.executor, time.monotonic() - started, archive.size)
        # A remote work dir stays until the broker confirmed the result: the retention pass removes it.
        self.final(task_id, result, note, executor=record.executor)

    def _archive(self, executor: Executor, job: Job, patterns: list[str]) -> Archive:
        """The archive built where the job ran (and brought here), or here from the work dir."""
        cfg = self.site.stage_out
        fetched = executor.fetch_outputs(job, patterns, max_bytes=cfg.max_bytes, compress_level=cfg.compress_level)
        if fetched is not None:
            return fetched
        return build_archive(job.workdir, patterns, max_bytes=cfg.max_bytes, compress_level=cfg.compress_level)

    def _logs_only(self, executor: Executor, job: Job) -> Archive:
        try:
            return self._archive(executor, job, [])
        except TransportError:
            raise
        except (StageOutError, ExecutorError, OSError) as exc:  # even the logs are out of reach
            log.warning("%s: no logs could be fetched: %s", job.task.id, exc, extra={"task_id": job.task.id})
            return build_archive(job.workdir, [], max_bytes=self.site.stage_out.max_bytes)

    def _retry_stage_out(self, executor: Executor, job: Job, outcome: Outcome, exc: TransportError) -> None:
        task_id = job.task.id
        self.journal.update(task_id, message=exc.pause_message)
        delay = self.retries.schedule(f"out:{task_id}", executor.settings.retry_max_seconds,
                                      self.out_pool.submit, self.stage_out_guarded, job, outcome)
        if delay is not None:
            log.warning("%s: stage-out %s (%s); retried in %.0fs", task_id, exc.pause_message, exc, delay,
                        extra={"task_id": task_id})

    def _retry_when_space(self, job: Job, outcome: Outcome, exc: BaseException) -> None:
        task_id = job.task.id
        message = f"stage-out waiting for disk space ({exc})"
        try:
            self.journal.update(task_id, message=message)
        except (sqlite3.Error, OSError):
            pass  # the journal's disk is the full one: the log line says it
        delay = self.retries.schedule(f"out:{task_id}", DISK_FULL_RETRY_SECONDS, self.out_pool.submit,
                                      self.stage_out_guarded, job, outcome)
        if delay is not None:
            log.warning("%s: %s; retried in %.0fs", task_id, message, delay, extra={"task_id": task_id})

    # -- the end ---------------------------------------------------------------------------------
    def final(self, task_id: str, result: ResultEvent, message: str | None, *, executor: str | None) -> bool:
        """Commit the final transition, retrying while the journal cannot be written (disk full):
        the task stays where it was until then, so its result (and any reply the frontend sends
        with it) is never lost; a restart in the meantime redoes the stage-out."""
        backoff = Backoff(cap=30.0, base=1.0)
        while True:
            try:
                self.transitions.final(task_id, result, message)
                break
            except (sqlite3.Error, OSError) as exc:
                if self.closing():
                    log.error("%s: cannot write its final state (%s); it is finished at the next start",
                              task_id, exc, extra={"task_id": task_id})
                    return False
                delay = backoff.next()
                log.error("%s: cannot write its final state (%s); retrying in %.0fs", task_id, exc, delay,
                          extra={"task_id": task_id})
                self._stop.wait(delay)
        metrics.completion(executor, result.state.value, result.reason.value if result.reason else None)
        self.registry.finished(task_id)
        return True

    def finish_early(self, task_id: str, reason: Reason | None, message: str, state: State = State.FAILED) -> None:
        """End a task that never ran (stage-in, submit or cancel before submit)."""
        record = self.journal.get(task_id)
        if record is None or record.final:
            return
        workdir = Path(record.workdir or "")
        result = ResultEvent(node=self.site.node, task_id=task_id, seq=0, state=state, reason=reason,
                             finished=utcnow(),
                             stdout_tail=tail(workdir / FEM_DIR / "stdout", self.site.stage_out.tail_bytes),
                             stderr_tail=tail(workdir / FEM_DIR / "stderr", self.site.stage_out.tail_bytes),
                             labels=record.task.labels, native_id=record.native_id)
        self.final(task_id, result, message, executor=record.executor)

    def stop(self) -> None:
        self._stop.set()
