"""At start: carry on with every task the journal holds as not final."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Executor as Pool

from ..backoff import Backoff
from ..config import SiteConfig
from ..journal import Journal, TaskRecord
from ..layout import read_marker
from ..model import Reason, State
from .outcome import Outcome, decide
from .pipeline import Pipeline
from .ports import TaskView
from .results import Results
from .tasks import TaskRegistry
from .transitions import Transitions

log = logging.getLogger("fem_hpc.lifecycle")


class Recovery:
    def __init__(self, site: SiteConfig, journal: Journal, registry: TaskRegistry, transitions: Transitions,
                 pipeline: Pipeline, results: Results, pool: Pool, out_pool: Pool, closing: Callable[[], bool]):
        self.site = site
        self.journal = journal
        self.registry = registry
        self.transitions = transitions
        self.pipeline = pipeline
        self.results = results
        self.pool = pool
        self.out_pool = out_pool
        self.closing = closing
        self._stop = threading.Event()

    def recover(self, skip_protocols: tuple[str, ...] = ()) -> int:
        """Re-adopt every active task (but those of `skip_protocols`); returns how many."""
        records = [r for r in self.journal.active() if r.protocol not in skip_protocols]
        for record in records:
            try:
                self._recover_one(record)
            except Exception as exc:
                log.exception("%s: recovery failed", record.id, extra={"task_id": record.id})
                self.results.finish_early(record.id, Reason.LOST, f"could not be re-adopted after a restart: {exc}")
        return len(records)

    def _recover_one(self, record: TaskRecord) -> None:
        self.registry.remember(TaskView.of(record))
        log.info("%s re-adopting (state %s, native id %s)", record.id, record.state.value, record.native_id,
                 extra={"task_id": record.id, "native_id": record.native_id})
        if record.state == State.STAGING_OUT:
            outcome = Outcome(State(record.outcome or State.FAILED.value),
                              Reason(record.reason) if record.reason else None, record.exit_code, record.message,
                              record.started, record.finished)
            self.out_pool.submit(self.results.stage_out_guarded, self.pipeline.job_for(record), outcome)
        elif record.native_id:
            self.pipeline.track(record.executor or self.site.default_executor, self.pipeline.job_for(record))
        elif record.intent:
            self.pool.submit(self._readopt_intent, record.id)
        else:
            self.pool.submit(self.pipeline.stage_and_submit, record.id)

    def _readopt_intent(self, task_id: str) -> None:
        """The submit was journalled as intended but its native id was never written: look for the
        job by name before anything is submitted again, so one task never gets two jobs."""
        record = self.journal.get(task_id)
        if record is None or record.final:
            return
        executor, _ = self.pipeline.executors.start(record.executor or self.site.default_executor)
        job = self.pipeline.job_for(record)
        backoff = Backoff(cap=30.0, base=1.0, jitter=False)
        while not self.closing():
            try:
                native_id = executor.find_by_name(job)
                break
            except Exception as exc:
                delay = backoff.next()
                log.warning("%s: cannot look for its job yet (%s); retrying in %.0fs", task_id, exc, delay,
                            extra={"task_id": task_id})
                self._stop.wait(delay)
        else:
            return
        marker = read_marker(job.marker_path)
        if native_id is None and marker is not None:  # it ran and ended: the marker decides
            self.results.on_final(job, decide(marker, None, record.cancel_requested, job))
            return
        if native_id is not None:
            job.native_id = native_id
            self.transitions.change(task_id, State.SUBMITTED, native_id=native_id, message="re-adopted after a restart")
            self.pipeline.track(executor.name, job)
            return
        log.info("%s: no job found for the journalled intent; submitting it now", task_id,
                 extra={"task_id": task_id})
        self.pipeline.submit(task_id, job, executor, attempt=record.attempt)

    def stop(self) -> None:
        self._stop.set()
