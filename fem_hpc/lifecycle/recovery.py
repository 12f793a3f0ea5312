"""At start: carry on with every task the journal holds as not final."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Executor as Pool

from ..config import SiteConfig
from ..journal import Journal, TaskRecord
from ..model import Reason, State
from .outcome import Outcome
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
            # The submit was journalled as intended but its native id was never written: its job
            # is looked for by name before anything is submitted again.
            self.pool.submit(self._readopt_intent, record.id)
        else:
            self.pool.submit(self.pipeline.stage_and_submit, record.id)

    def _readopt_intent(self, task_id: str) -> None:
        try:
            self.pipeline.resume_submit(task_id, True, "re-adopted after a restart")
        except Exception as exc:
            log.exception("%s: re-adoption failed", task_id, extra={"task_id": task_id})
            self.results.finish_early(task_id, Reason.LOST, f"could not be re-adopted after a restart: {exc}")

    def stop(self) -> None:
        self._stop.set()
