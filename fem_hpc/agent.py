"""The task lifecycle: intake -> stage-in -> render -> submit -> track -> stage-out -> result.

The agent is transport-agnostic: `serve` feeds it from the broker and publishes its outbox,
`run` feeds it one task and watches its events. Every state change is committed to the journal
together with its event, so a restart carries on from what is written there.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from . import metrics
from .config import SiteConfig
from .diskguard import DiskGuard
from .events import chunk_message, event_message
from .executors import registry
from .executors.base import Executor, ExecutorError, Job, NativeStatus
from .journal import Journal, Message, TaskRecord, Tombstone
from .layout import ARCHIVE_NAME, FEM_DIR, read_marker, task_workdir
from .model import (
    ID_PATTERN,
    FieldError,
    OutputsInfo,
    Reason,
    ResultEvent,
    State,
    StatusEvent,
    Task,
    parse_task,
    utcnow,
)
from .policy import check_policy, effective_task, executor_for
from .render import render_job
from .staging.outputs import StageOutError, build_archive, tail
from .tracker import Outcome, Tracker, decide

log = logging.getLogger("fem_hpc.agent")

Observer = Callable[[str, BaseModel], None]


class StageInError(Exception):
    """Stage-in failed; the message says what and is sent to the orchestrator."""


@dataclass
class IntakeResult:
    record: TaskRecord | None
    created: bool
    errors: list[FieldError] = field(default_factory=list)


@dataclass
class _Route:
    reply_to: str | None
    correlation_id: str | None
    labels: dict[str, str]
    protocol: str


class Agent:
    def __init__(self, site: SiteConfig, journal: Journal, *, workers: int | None = None):
        self.site = site
        self.journal = journal
        self.node = site.node
        self.exchange = site.broker.events_exchange
        self.observers: list[Observer] = []
        # Stage-in steps before the executor's own: hook(job, site, progress), e.g. staging.git.
        self.stage_in_hooks: list[Callable[[Job, Any, Callable[[str], None]], None]] = []
        self.progress_observers: list[Callable[[str, str], None]] = []  # (task_id, text) of long steps
        self._executors: dict[str, Executor] = {}
        self._trackers: dict[str, Tracker] = {}
        self._routes: dict[str, _Route] = {}
        self._finals: dict[str, threading.Event] = {}
        self.secret_env: dict[str, dict[str, str]] = {}  # by task id; memory only, never journalled
        self._lock = threading.RLock()
        self._pool = ThreadPoolExecutor(max_workers=workers or site.workers, thread_name_prefix="fem-task")
        # Stage-out has its own workers: a finished job's result must not wait behind a burst of
        # stage-ins and submits (a slow sbatch would otherwise delay every result).
        self._out_pool = ThreadPoolExecutor(max_workers=max(2, (workers or site.workers) // 2),
                                            thread_name_prefix="fem-stageout")
        self._closing = False
        self.disk_guard = DiskGuard(site)  # retention: no new task starts while a disk is low

    # -- executors ----------------------------------------------------------------------
    def executor(self, name: str) -> Executor:
        with self._lock:
            if name not in self._executors:
                executor = registry.create(name, self.site)
                tracker = Tracker(executor, self, lost_grace=executor.settings.lost_grace_seconds)
                tracker.start()
                self._executors[name] = executor
                self._trackers[name] = tracker
            return self._executors[name]

    def tracker(self, name: str) -> Tracker:
        self.executor(name)
        return self._trackers[name]

    @property
    def trackers(self) -> dict[str, Tracker]:
        with self._lock:
            return dict(self._trackers)

    def close(self) -> None:
        """Stop tracking; jobs keep running and are re-adopted at the next start."""
        self._closing = True
        self._pool.shutdown(wait=True, cancel_futures=False)
        self._out_pool.shutdown(wait=True, cancel_futures=False)
        for tracker in self.trackers.values():
            tracker.stop()
        for executor in list(self._executors.values()):
            executor.close()

    # -- events ---------------------------------------------------------------------------
    def _route(self, task_id: str) -> _Route:
        with self._lock:
            route = self._routes.get(task_id)
        if route is None:
            rec = self.journal.get(task_id)
            assert rec is not None, task_id
            labels = rec.task.labels if rec.task_json else {}
            route = _Route(rec.reply_to, rec.correlation_id, labels, rec.protocol)
            with self._lock:
                self._routes[task_id] = route
        return route

    def _message(self, event: BaseModel, route: _Route, reply_to: str | None = None,
                 correlation_id: str | None = None) -> Message:
        # A legacy orchestrator's reply queue speaks the legacy framing only: v1 events of its
        # tasks go to the topic exchange alone.
        target = reply_to if reply_to is not None else (route.reply_to if route.protocol == "v1" else None)
        corr = correlation_id if reply_to is not None else route.correlation_id
        return event_message(self.node, self.exchange, event, target, corr)

    def _notify(self, task_id: str, event: BaseModel) -> None:
        for observer in list(self.observers):
            try:
                observer(task_id, event)
            except Exception:
                log.exception("event observer failed", extra={"task_id": task_id})

    def _status_event(self, task_id: str, state: State, seq: int, route: _Route, *, native_id: str | None,
                      message: str | None) -> StatusEvent:
        return StatusEvent(node=self.node, task_id=task_id, seq=seq, state=state, time=utcnow(),
                           native_id=native_id, message=message, labels=route.labels)

    def _transition(self, task_id: str, state: State, *, message: str | None = None,
                    native_id: str | None = None, **fields: Any) -> None:
        route = self._route(task_id)
        if native_id is not None:
            fields["native_id"] = native_id
        else:
            rec = self.journal.get(task_id)
            native_id = rec.native_id if rec else None
        built: list[StatusEvent] = []

        def make(seq: int) -> Message:
            ev = self._status_event(task_id, state, seq, route, native_id=native_id, message=message)
            built.append(ev)
            return self._message(ev, route)

        self.journal.transition(task_id, state, make, message=message, **fields)
        log.info("%s %s%s", task_id, state.value, f": {message}" if message else "",
                 extra={"task_id": task_id, "native_id": native_id})
        self._notify(task_id, built[0])

    # -- intake ---------------------------------------------------------------------------
    def workdir_for(self, task: Task) -> Path:
        return task_workdir(self.site.work_root, task)

    def intake(self, data: Any, *, reply_to: str | None = None, correlation_id: str | None = None,
               protocol: str = "v1", workdir: Path | None = None,
               secret_env: dict[str, str] | None = None) -> IntakeResult:
        """Validate, check policy, journal. Returns once the task is committed (then ack)."""
        task, errors = parse_task(data)
        if task is not None:
            errors = check_policy(task, self.site)
        if task is None or errors:
            task_id = data.get("id") if isinstance(data, dict) else None
            labels = data.get("labels") if isinstance(data, dict) else None
            named = (task.executor or self.site.default_executor) if task is not None else None
            executor = named if named in self.site.executors else None
            self.reject(task_id, errors, reply_to=reply_to, correlation_id=correlation_id, labels=labels,
                        executor=executor)
            return IntakeResult(None, False, errors)
        task = effective_task(task, self.site)
        # Retention and the disk guard: a task id compacted long ago runs nothing; on a low disk
        # with on_low_disk: reject a new task is refused (with queue it waits in stage-in).
        if (settled := self._late_duplicate(task.id, reply_to, correlation_id, protocol)
                or self._disk_refusal(task, reply_to, correlation_id)) is not None:
            return settled
        route = _Route(reply_to, correlation_id, task.labels, protocol)
        built: list[StatusEvent] = []

        def make(seq: int) -> Message:
            ev = self._status_event(task.id, State.RECEIVED, seq, route, native_id=None, message=None)
            built.append(ev)
            return self._message(ev, route)

        record, created = self.journal.insert(
            task, executor=executor_for(task, self.site), workdir=workdir or self.workdir_for(task),
            protocol=protocol, reply_to=reply_to, correlation_id=correlation_id, event=make)
        if not created:
            log.info("%s already known (%s): re-sending its state", task.id, record.state.value,
                     extra={"task_id": task.id, "native_id": record.native_id})
            metrics.intake(record.executor, "duplicate")
            self.resend(record, reply_to=reply_to, correlation_id=correlation_id)
            return IntakeResult(record, False)
        with self._lock:
            self._routes[task.id] = route
            self._finals[task.id] = threading.Event()
            if secret_env:
                self.secret_env[task.id] = dict(secret_env)
        log.info("%s RECEIVED (executor %s)", task.id, record.executor, extra={"task_id": task.id, "native_id": None})
        metrics.intake(record.executor, "accepted")
        self._notify(task.id, built[0])
        self._pool.submit(self._stage_and_submit, task.id)
        return IntakeResult(record, True)

    def reject(self, task_id: Any, errors: list[FieldError], *, reply_to: str | None = None,
               correlation_id: str | None = None, labels: Any = None, executor: str | None = None) -> ResultEvent:
        """A REJECTED result. Nothing is journalled as a task, so a corrected resubmit with the
        same id is accepted later. `executor` (a configured name, when known) labels the metric."""
        tid = task_id if isinstance(task_id, str) and re.fullmatch(ID_PATTERN, task_id) else ""
        labels = labels if isinstance(labels, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()) else {}
        result = ResultEvent(node=self.node, task_id=tid, seq=1, state=State.REJECTED, errors=errors,
                             labels=labels, finished=utcnow())
        log.warning("rejected task %s: %s", tid or "(no valid id)",
                    "; ".join(f"{e.field}: {e.message}" for e in errors), extra={"task_id": tid or None})
        metrics.intake(executor, "rejected")
        msg = event_message(self.node, self.exchange, result, reply_to, correlation_id)
        if tid:
            self.journal.put(msg)
        elif reply_to:  # no valid id: no routing key on the topic exchange, reply only
            msg.destinations = [("", reply_to)]
            self.journal.put(msg)
        self._notify(tid, result)
        return result

    # -- queries ----------------------------------------------------------------------------
    def _reply_status(self, task_id: str, record: TaskRecord | None, message: str | None, *,
                      reply_to: str | None, correlation_id: str | None) -> State:
        """One status event with the task's current state for whoever asked (and fem.events);
        UNKNOWN, outside any task's seq, for a task this node never saw."""
        if record is None and (tomb := self.journal.tombstone_events(
                task_id, [lambda t, seq: self._tombstone_status(t, seq, reply_to or None, correlation_id)])):
            return tomb.state  # compacted by retention: its final state, from the tombstone
        if record is None:
            ev = StatusEvent(node=self.node, task_id=task_id, seq=0, state=State.UNKNOWN, time=utcnow(),
                             message="this node has never seen this task")
            self.journal.put(event_message(self.node, self.exchange, ev, reply_to, correlation_id))
            return State.UNKNOWN
        route = self._route(task_id)
        self.journal.event(task_id, lambda seq: self._message(
            self._status_event(task_id, record.state, seq, route, native_id=record.native_id, message=message),
            route, reply_to or "", correlation_id))
        return record.state

    def resend(self, record: TaskRecord, *, reply_to: str | None, correlation_id: str | None) -> None:
        """Re-send a task's current status (and its result when final), with fresh seqs."""
        route = self._route(record.id)
        self._reply_status(record.id, record, record.message, reply_to=reply_to, correlation_id=correlation_id)
        if record.final and record.result_json:
            stored = ResultEvent.model_validate_json(record.result_json)
            archive = Path(record.workdir or "") / FEM_DIR / ARCHIVE_NAME
            if stored.outputs is not None:
                if archive.is_file() and archive.stat().st_size == stored.outputs.size:
                    self._enqueue_chunks(record.id, archive, stored.outputs, reply_to or "", correlation_id)
                else:  # the work dir was cleaned since: say so rather than promise chunks
                    stored = stored.model_copy(update={"outputs": None})
            self.journal.event(record.id, lambda seq: self._message(
                stored.model_copy(update={"seq": seq}), route, reply_to or "", correlation_id))

    def _enqueue_chunks(self, task_id: str, archive: Path, info: OutputsInfo, reply_to: str | None,
                        correlation_id: str | None) -> None:
        chunk = self.site.stage_out.chunk_bytes
        makers = []
        for index in range(info.chunks):
            offset = index * chunk
            length = min(chunk, info.size - offset)
            makers.append(lambda seq, i=index, o=offset, n=length: chunk_message(
                self.node, self.exchange, task_id, seq, i, info.chunks, info.sha256, (str(archive), o, n),
                reply_to, correlation_id))
        self.journal.events(task_id, makers)  # rows hold file references, not the bytes

    def status(self, task_id: str, *, reply_to: str | None, correlation_id: str | None) -> State:
        record = self.journal.get(task_id)
        return self._reply_status(task_id, record, record.message if record else None, reply_to=reply_to,
                                  correlation_id=correlation_id)

    def cancel(self, task_id: str, *, reply_to: str | None = None, correlation_id: str | None = None) -> State:
        record = self.journal.get(task_id)
        if record is None or record.final or record.state == State.STAGING_OUT:
            note = None if record is None else f"already {record.state.value.lower()}; nothing to cancel"
            return self._reply_status(task_id, record, note, reply_to=reply_to, correlation_id=correlation_id)
        self.journal.update(task_id, cancel_requested=1)
        log.info("%s cancel requested", task_id, extra={"task_id": task_id, "native_id": record.native_id})
        if reply_to:  # the canceller hears at once; the CANCELLED events follow on the task's own route
            self._reply_status(task_id, record, "cancel requested", reply_to=reply_to, correlation_id=correlation_id)
        # A tracked job is stopped now; one still staging is stopped by its stage-in worker, which
        # checks the flag before it submits anything.
        if record.executor:
            self.tracker(record.executor).cancel(task_id)
        return record.state

    def wait(self, task_id: str, timeout: float | None = None) -> TaskRecord | None:
        with self._lock:
            done = self._finals.setdefault(task_id, threading.Event())
        rec = self.journal.get(task_id)
        if rec is not None and rec.final:
            return rec
        done.wait(timeout)
        return self.journal.get(task_id)

    # -- stage-in and submit ----------------------------------------------------------------
    def _job(self, record: TaskRecord) -> Job:
        job = Job(task=record.task, workdir=Path(record.workdir or ""), native_id=record.native_id,
                  secret_env=self.secret_env.get(record.id, {}))
        submitted = [t["time"] for t in self.journal.transitions(record.id) if t["state"] == State.SUBMITTED.value]
        if submitted:
            job.submitted_at = submitted[0]
        return job

    def _stage_and_submit(self, task_id: str) -> None:
        try:
            self._stage_and_submit_inner(task_id)
        except Exception as exc:  # nothing may vanish silently: an unexpected error still ends the task
            log.exception("%s: unexpected error before submit", task_id, extra={"task_id": task_id})
            self._finish_early(task_id, Reason.SUBMIT, f"internal error before submit: {exc}")

    def _stage_and_submit_inner(self, task_id: str) -> None:
        if not self._wait_for_disk(task_id):
            return
        record = self.journal.get(task_id)
        if record is None or record.final or self._closing:
            return
        job = self._job(record)
        if record.cancel_requested:
            self._finish_early(task_id, None, "cancelled before it was submitted", state=State.CANCELLED)
            return
        self._transition(task_id, State.STAGING_IN)
        try:
            executor = self.executor(record.executor or self.site.default_executor)
        except (KeyError, ExecutorError) as exc:
            self._finish_early(task_id, Reason.SUBMIT, f"executor {record.executor!r} unavailable: {exc}")
            return
        started = time.monotonic()
        try:
            self._prepare_workdir(job)
            progress = self._progress_for(task_id)
            for hook in self.stage_in_hooks:
                hook(job, self.site, progress)
            job.fem_dir.mkdir(parents=True, exist_ok=True)
            executor.stage_in(job, progress)
        except (StageInError, ExecutorError, OSError) as exc:
            self._finish_early(task_id, Reason.STAGE_IN, str(exc))
            return
        log.debug("%s staged in %.2fs", task_id, time.monotonic() - started, extra={"task_id": task_id})
        metrics.stage_in(executor.name, time.monotonic() - started, job.workdir)
        if (rec := self.journal.get(task_id)) and rec.cancel_requested:
            self._finish_early(task_id, None, "cancelled before it was submitted", state=State.CANCELLED)
            return
        self._submit(task_id, job, executor, attempt=record.attempt)

    def _progress_for(self, task_id: str) -> Callable[[str], None]:
        """A callback for long stage-in steps (git clone, image pull): logged, and shown by `run`."""
        def progress(text: str) -> None:
            log.info("%s: %s", task_id, text, extra={"task_id": task_id})
            for observer in list(self.progress_observers):
                observer(task_id, text)
        return progress

    def _prepare_workdir(self, job: Job) -> None:
        """A fresh work dir. One left from an interrupted stage-in of this task (the journal says
        it is ours) is cleared, so two attempts never mix their files."""
        wd = job.workdir
        if wd.exists():
            fem = job.fem_dir
            if fem.exists():
                shutil.rmtree(fem)
            if job.task.source and any(wd.iterdir()):
                shutil.rmtree(wd)
        wd.mkdir(parents=True, exist_ok=True, mode=0o750)

    def _submit(self, task_id: str, job: Job, executor: Executor, attempt: int) -> None:
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
            self._finish_early(task_id, Reason.SUBMIT, f"submit failed: {exc}")
            return
        job.native_id = native_id
        job.submitted_at = time.time()
        self._transition(task_id, State.SUBMITTED, native_id=native_id)
        self._track(executor.name, job)

    def _track(self, executor_name: str, job: Job) -> None:
        """Hand a submitted job to its tracker. A cancel that arrived meanwhile (during submit, or
        before a restart) is carried out now, not just remembered."""
        tracker = self.tracker(executor_name)
        tracker.track(job)
        rec = self.journal.get(job.task.id)
        if rec is not None and rec.cancel_requested:
            tracker.cancel(job.task.id)

    # -- tracker callbacks ---------------------------------------------------------------------
    def on_running(self, job: Job, status: NativeStatus) -> None:
        self._transition(job.task.id, State.RUNNING, message=status.message)

    def on_pending(self, job: Job, status: NativeStatus) -> None:
        # Why the scheduler holds the job (Priority, Resources, ...): shown by `status` and in the
        # reply to a status request; not an event of its own, the state has not changed.
        self.journal.update(job.task.id, message=f"pending: {status.message}" if status.message else None)

    def on_final(self, job: Job, outcome: Outcome) -> None:
        self._out_pool.submit(self._stage_out_guarded, job, outcome)

    # -- stage-out -------------------------------------------------------------------------------
    def _stage_out_guarded(self, job: Job, outcome: Outcome) -> None:
        try:
            self._stage_out(job, outcome)
        except Exception as exc:
            log.exception("%s: stage-out failed unexpectedly", job.task.id, extra={"task_id": job.task.id})
            self._finish_early(job.task.id, Reason.STAGE_OUT, f"internal error in stage-out: {exc}")

    def _stage_out(self, job: Job, outcome: Outcome) -> None:
        task_id = job.task.id
        record = self.journal.get(task_id)
        if record is None or record.final:
            return
        if record.state == State.SUBMITTED and outcome.started:
            self._transition(task_id, State.RUNNING)  # it ran, only too briefly for a poll to see
        if record.state != State.STAGING_OUT:
            self._transition(task_id, State.STAGING_OUT, message=outcome.message, exit_code=outcome.exit_code,
                             reason=outcome.reason.value if outcome.reason else None, started=outcome.started,
                             finished=outcome.finished, outcome=outcome.state.value)
        cfg = self.site.stage_out
        note = outcome.message
        started = time.monotonic()
        try:
            archive = build_archive(job.workdir, job.task.outputs, max_bytes=cfg.max_bytes,
                                    compress_level=cfg.compress_level)
        except (StageOutError, OSError) as exc:
            outcome = Outcome(State.FAILED, Reason.STAGE_OUT, outcome.exit_code, str(exc), outcome.started,
                              outcome.finished)
            note = str(exc)
            archive = build_archive(job.workdir, [], max_bytes=cfg.max_bytes)  # the logs still go back
        if archive.skipped:
            note = "; ".join(filter(None, [note, *archive.skipped]))
        route = self._route(task_id)
        total = archive.chunks(cfg.chunk_bytes)
        info = OutputsInfo(size=archive.size, sha256=archive.sha256, chunks=total)
        if self.journal.outbox_enabled:
            self._enqueue_chunks(task_id, archive.path, info, route.reply_to if route.protocol == "v1" else None,
                                 route.correlation_id)
        result = ResultEvent(
            node=self.node, task_id=task_id, seq=0, state=outcome.state, exit_code=outcome.exit_code,
            reason=outcome.reason, started=outcome.started, finished=outcome.finished or utcnow(),
            outputs=info,
            stdout_tail=tail(job.fem_dir / "stdout", cfg.tail_bytes),
            stderr_tail=tail(job.fem_dir / "stderr", cfg.tail_bytes),
            labels=route.labels, native_id=job.native_id)
        metrics.stage_out(record.executor, time.monotonic() - started, archive.size)
        self._final(task_id, result, note)

    def _final(self, task_id: str, result: ResultEvent, message: str | None) -> None:
        """The terminal status event and the result, committed together."""
        route = self._route(task_id)
        rec = self.journal.get(task_id)
        native_id = rec.native_id if rec else None
        built: list[BaseModel] = []

        def status(seq: int) -> Message:
            ev = self._status_event(task_id, result.state, seq, route, native_id=native_id, message=message)
            built.append(ev)
            return self._message(ev, route)

        def final_result(seq: int) -> Message:
            ev = result.model_copy(update={"seq": seq})
            built.append(ev)
            return self._message(ev, route)

        self.journal.transition(
            task_id, result.state, status, message=message, exit_code=result.exit_code,
            reason=result.reason.value if result.reason else None, started=result.started,
            finished=result.finished, result_json=result.model_dump_json(), also=[final_result])
        log.info("%s %s%s", task_id, result.state.value, f": {message}" if message else "",
                 extra={"task_id": task_id, "native_id": native_id})
        metrics.completion(rec.executor if rec else None, result.state.value,
                           result.reason.value if result.reason else None)
        for ev in built:
            self._notify(task_id, ev)
        with self._lock:
            done = self._finals.setdefault(task_id, threading.Event())
            self._routes.pop(task_id, None)
            self.secret_env.pop(task_id, None)
        done.set()

    def _finish_early(self, task_id: str, reason: Reason | None, message: str,
                      state: State = State.FAILED) -> None:
        """End a task that never ran (stage-in, submit or cancel before submit)."""
        record = self.journal.get(task_id)
        if record is None or record.final:
            return
        workdir = Path(record.workdir or "")
        stdout = tail(workdir / FEM_DIR / "stdout", self.site.stage_out.tail_bytes)
        stderr = tail(workdir / FEM_DIR / "stderr", self.site.stage_out.tail_bytes)
        result = ResultEvent(node=self.node, task_id=task_id, seq=0, state=state, reason=reason,
                             finished=utcnow(), stdout_tail=stdout, stderr_tail=stderr,
                             labels=self._route(task_id).labels, native_id=record.native_id)
        self._final(task_id, result, message)

    # -- restart -----------------------------------------------------------------------------------
    def recover(self, skip_protocols: tuple[str, ...] = ()) -> int:
        """Carry on with every task the journal holds as not final. Returns how many.
        `serve` skips tasks of `fem-hpc run` processes, which follow their own tasks."""
        records = [r for r in self.journal.active() if r.protocol not in skip_protocols]
        for record in records:
            try:
                self._recover_one(record)
            except Exception as exc:
                log.exception("%s: recovery failed", record.id, extra={"task_id": record.id})
                self._finish_early(record.id, Reason.LOST, f"could not be re-adopted after a restart: {exc}")
        return len(records)

    def _recover_one(self, record: TaskRecord) -> None:
        with self._lock:
            self._finals.setdefault(record.id, threading.Event())
        log.info("%s re-adopting (state %s, native id %s)", record.id, record.state.value, record.native_id,
                 extra={"task_id": record.id, "native_id": record.native_id})
        if record.state == State.STAGING_OUT:
            job = self._job(record)
            outcome = Outcome(State(record.outcome or State.FAILED.value),
                              Reason(record.reason) if record.reason else None, record.exit_code, record.message,
                              record.started, record.finished)
            self._out_pool.submit(self._stage_out_guarded, job, outcome)
            return
        if record.native_id:
            self._track(record.executor or self.site.default_executor, self._job(record))
            return
        if record.intent:
            self._pool.submit(self._readopt_intent, record.id)
            return
        self._pool.submit(self._stage_and_submit, record.id)

    def _readopt_intent(self, task_id: str) -> None:
        """The submit was journalled as intended but its native id was never written: look for the
        job by name before anything is submitted again, so one task never gets two jobs."""
        record = self.journal.get(task_id)
        if record is None or record.final:
            return
        executor = self.executor(record.executor or self.site.default_executor)
        job = self._job(record)
        delay = 1.0
        while not self._closing:
            try:
                native_id = executor.find_by_name(job)
                break
            except Exception as exc:
                log.warning("%s: cannot look for its job yet (%s); retrying", task_id, exc,
                            extra={"task_id": task_id})
                time.sleep(delay)
                delay = min(delay * 2, 30)
        else:
            return
        marker = read_marker(job.marker_path)
        if native_id is None and marker is not None:  # it ran and ended: the marker decides
            self.on_final(job, decide(marker, None, record.cancel_requested, job))
            return
        if native_id is not None:
            job.native_id = native_id
            self._transition(task_id, State.SUBMITTED, native_id=native_id, message="re-adopted after a restart")
            self._track(executor.name, job)
            return
        log.info("%s: no job found for the journalled intent; submitting it now", task_id,
                 extra={"task_id": task_id})
        self._submit(task_id, job, executor, attempt=record.attempt)

    # -- retention and the disk guard (fem_hpc/diskguard.py, fem_hpc/ops/gc.py) -----------------
    def _tombstone_status(self, tomb: Tombstone, seq: int, reply_to: str | None,
                          correlation_id: str | None) -> Message:
        ev = StatusEvent(node=self.node, task_id=tomb.id, seq=seq, state=tomb.state, time=utcnow(),
                         message=tomb.note(), labels=tomb.labels)
        return event_message(self.node, self.exchange, ev, reply_to, correlation_id)

    def _late_duplicate(self, task_id: str, reply_to: str | None, correlation_id: str | None,
                        protocol: str) -> IntakeResult | None:
        """A submit of a task retention compacted: its final state ("finished on <date>, outputs
        expired") and a result without outputs, from the tombstone, with fresh seqs. Runs nothing."""
        target = reply_to if protocol == "v1" else None  # a legacy reply queue takes legacy framing only

        def result(tomb: Tombstone, seq: int) -> Message:
            ev = ResultEvent(node=self.node, task_id=tomb.id, seq=seq, state=tomb.state, exit_code=tomb.exit_code,
                             reason=Reason(tomb.reason) if tomb.reason else None, finished=tomb.finished,
                             labels=tomb.labels)
            return event_message(self.node, self.exchange, ev, target, correlation_id)

        tomb = self.journal.tombstone_events(
            task_id, [lambda t, seq: self._tombstone_status(t, seq, target, correlation_id), result])
        if tomb is None:
            return None
        log.info("%s was compacted by retention (%s): answered from its tombstone, not run again", task_id,
                 tomb.note(), extra={"task_id": task_id, "native_id": None})
        metrics.intake(tomb.executor, "duplicate")
        # The legacy handler answers with the errors it is given; a v1 orchestrator has its events.
        note = [FieldError(field="id", message=f"task {task_id} {tomb.note()}")] if protocol == "legacy" else []
        return IntakeResult(None, False, note)

    def _disk_refusal(self, task: Task, reply_to: str | None, correlation_id: str | None) -> IntakeResult | None:
        """With on_low_disk: reject, a new task is REJECTED while a disk is low (a known id is not)."""
        if self.disk_guard.on_low_disk != "reject" or (why := self.disk_guard.blocked()) is None \
                or self.journal.get(task.id) is not None:
            return None
        errors = [FieldError(field="node", message=f"not enough disk space to take new tasks: {why}")]
        self.reject(task.id, errors, reply_to=reply_to, correlation_id=correlation_id, labels=task.labels,
                    executor=task.executor or self.site.default_executor)
        return IntakeResult(None, False, errors)

    def _wait_for_disk(self, task_id: str) -> bool:
        """With on_low_disk: queue, a task waits here (RECEIVED, its message says why) until the
        disk guard clears; False when the service stops meanwhile (the next start carries on)."""
        noted: float | None = None
        while (why := self.disk_guard.blocked()) is not None and self.disk_guard.on_low_disk == "queue":
            if self._closing:
                return False
            rec = self.journal.get(task_id)
            if rec is None or rec.final or rec.cancel_requested:
                return True  # the caller finishes it (cancelled before it was submitted)
            if noted is None or time.monotonic() - noted > 60:  # the free space, refreshed once a minute
                log.warning("%s waits for disk space: %s", task_id, why, extra={"task_id": task_id})
                self._note(task_id, f"waiting for disk space: {why}")
                noted = time.monotonic()
            time.sleep(min(1.0, self.disk_guard.cfg.check_seconds))
        if noted is not None:
            self._note(task_id, None)
        return True

    def _note(self, task_id: str, message: str | None) -> None:
        """The task's message for `status` and status requests; on a full disk it is only logged."""
        try:
            self.journal.update(task_id, message=message)
        except (sqlite3.Error, OSError) as exc:
            log.warning("%s: cannot note its message in the journal (%s)", task_id, exc, extra={"task_id": task_id})

    # -- health --------------------------------------------------------------------------------------
    def executors_health(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for name in self.site.executors:
            try:
                checks = self.executor(name).checks()
                tracker = self._trackers[name]
                out[name] = {"works": all(c.status != "error" for c in checks) and not tracker.stale,
                             "stale": tracker.stale, "tracked": len(tracker),
                             "checks": [c.model_dump() for c in checks]}
            except Exception as exc:
                out[name] = {"works": False, "error": str(exc)}
        return out
