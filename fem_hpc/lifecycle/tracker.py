"""One tracker per executor instance (per cluster): a single thread that follows every job.

Two sources, cheap first:
- the exit-code marker each job's wrapper writes (`.fem/exit_code`), checked by a stat every
  `marker_interval` seconds, so completion is seen well within a second of the job's end;
- one batched `executor.poll(all jobs)` on the executor's adaptive interval, the safety net that
  sees pending/running states, jobs killed before the wrapper could write, and jobs that vanished.

A failed poll never fails a job: the tracker marks itself stale and backs off. A job missing
from the queue is decided by its marker, then the executor's second opinion (e.g. sacct), and
only after a grace period declared LOST. While the cluster cannot be reached at all (a
TransportError: SSH down, network cut) the tracker is *paused*: every job keeps its state, its
status message says so, and tracking resumes (with backoff) when the link is back. A poll the
scheduler call budget defers (Deferred) is just later.

Where the markers live is the executor's business (read_markers): a stat on this host's disk
every cycle, or one remote command per `marker_interval` for all jobs of a cluster without a
shared file system.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from .. import metrics
from ..backoff import Backoff
from ..executors.base import Deferred, Executor, Job, NativeStatus, TransportError
from ..layout import Marker
from ..model import Reason, State
from .markers import MarkerWatcher
from .outcome import Outcome, decide, requeued_after, vanished

log = logging.getLogger("fem_hpc.tracker")
OPINION_RETRY = 10.0  # seconds between two second opinions on one job missing from the queue


class Listener(Protocol):
    def on_running(self, job: Job, status: NativeStatus) -> None: ...

    def on_pending(self, job: Job, status: NativeStatus) -> None: ...

    def on_final(self, job: Job, outcome: Outcome) -> None: ...

    def on_paused(self, job: Job, message: str) -> None: ...

    def on_resumed(self, job: Job) -> None: ...


@dataclass
class _Tracked:
    job: Job
    cancel_requested: bool = False
    status: NativeStatus | None = None
    running_reported: bool = False
    pending_reason: str | None = None
    marker: Marker | None = None
    marker_at: float = 0.0
    polled_after_marker: bool = False
    final_seen_at: float | None = None
    missing_since: float | None = None
    opinion_at: float = 0.0  # earliest time of the next second opinion
    opinion: NativeStatus | None = None  # a final word from the second opinion, kept over later polls
    paused: bool = False
    cancel_failed: bool = False  # the cancel could not reach the cluster: sent again when it can
    last_seen: NativeStatus | None = None  # the scheduler's last word on the job while it was alive
    stale_marker: Marker | None = None  # an earlier run's marker (the job was requeued): not this run's end

    def requeued(self, st: NativeStatus, note: str) -> NativeStatus:
        """The scheduler runs the job again: its marker is the earlier run's. Forget it (and ignore
        it when read again, until the new run's marker replaces it) and follow the job afresh, as
        queued or running again; returns the status to report."""
        self.stale_marker, self.marker = self.marker, None
        self.marker_at, self.polled_after_marker = 0.0, False
        self.final_seen_at = self.missing_since = None
        self.running_reported = st.state == State.RUNNING
        self.pending_reason = note if st.state == State.SUBMITTED else None
        return st.model_copy(update={"message": note, "requeued": True})


def _gone(t: _Tracked, executor: Executor, lost_grace: float) -> Outcome:
    """A job gone from the queue, with no marker and no record of its end after the lost grace. On
    a scheduler that keeps no record of ended jobs (PBS without job history), one that left the
    queue before it ever started was deleted there; anything else is LOST."""
    no_record = executor.no_record_note()
    if t.stale_marker is not None:
        # Requeued, then gone with no new marker (e.g. a Slurm PREEMPTED that was not requeued after
        # all): the earlier run's marker is the only word on how the command ended.
        earlier = decide(t.stale_marker, None, t.cancel_requested, t.job, no_record=no_record, last_seen=t.last_seen)
        earlier.message = (f"left the queue after it was requeued, without a new exit-code marker; its earlier run: "
                           f"{earlier.message or earlier.state.value.lower()}")
        return earlier
    started = t.running_reported or executor.started_stamp(t.job) is not None
    return (vanished(t.last_seen, started, no_record) if no_record else None) or Outcome(
        State.FAILED, Reason.LOST, None, f"job {t.job.native_id} left the queue without an exit-code marker and "
        f"no record of its end was found within {lost_grace:.0f}s")


class Tracker:
    def __init__(self, executor: Executor, listener: Listener, *, marker_interval: float = 0.2,
                 lost_grace: float = 60.0, marker_grace: float = 3.0, signal_wait: float = 10.0,
                 clock: Callable[[], float] = time.time, watch_markers: bool = True, retry_cap: float = 30.0):
        self.executor = executor
        self.listener = listener
        self.marker_interval = marker_interval
        self.lost_grace = lost_grace
        self.marker_grace = marker_grace  # a job the scheduler says ended may write its marker late (NFS)
        self.signal_wait = signal_wait  # how long a stopped job waits for the scheduler's reason
        self.stale = False
        self.paused: TransportError | None = None  # set while the cluster cannot be reached
        self.clock = clock  # injected so tests drive grace periods without sleeping
        self.poll_errors = 0
        self.poll_count = 0  # successful batched polls (the scheduler-call budget of tests and benches)
        self._jobs: dict[str, _Tracked] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._next_poll = 0.0
        self._last_poll_at = 0.0
        self._next_markers = 0.0
        self._backoff = Backoff(cap=retry_cap, base=1.0, jitter=False)
        self._thread = threading.Thread(target=self._run, name=f"tracker-{executor.name}", daemon=True)
        # Markers are seen at once where inotify works; the stat loop is the fallback.
        local = watch_markers and executor.markers_are_local()
        self._watcher = MarkerWatcher(self._wake.set) if local else None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        if self._watcher is not None:
            self._watcher.close()

    def track(self, job: Job) -> None:
        if self._watcher is not None:
            self._watcher.add(job.fem_dir)
        with self._lock:
            self._jobs[job.task.id] = _Tracked(job)
            # See a new job's state soon, but a burst of submissions still shares one poll.
            self._next_poll = min(self._next_poll, self.clock() + self.executor.poll_interval(0.0))
        self._wake.set()

    def cancel(self, task_id: str) -> bool:
        with self._lock:
            t = self._jobs.get(task_id)
            if t is None:
                return False
            t.cancel_requested = True
        try:
            self.executor.cancel(t.job)
        except (TransportError, Deferred) as exc:
            t.cancel_failed = True  # sent again after the next poll that works
            log.warning("cancel of %s must wait: %s", task_id, exc, extra={"task_id": task_id,
                                                                          "native_id": t.job.native_id})
        except Exception as exc:  # the next poll shows whether it took effect
            log.warning("cancel of %s failed: %s", task_id, exc, extra={"task_id": task_id,
                                                                          "native_id": t.job.native_id})
        with self._lock:
            self._next_poll = 0.0
        self._wake.set()
        return True

    def __len__(self) -> int:
        with self._lock:
            return len(self._jobs)

    # -- the loop ---------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except Exception:  # a bug in one cycle must not stop tracking
                log.exception("tracker %s cycle failed", self.executor.name)
            self._wake.wait(self.sleep_for())
            self._wake.clear()

    def sleep_for(self) -> float:
        """Until the next cycle: one tick, or less when a remote marker read falls due before the
        tick ends (a fixed tick after each cycle would add up to a tick to every remote read, and
        so to the completion seen on an idle link)."""
        with self._lock:
            waiting = any(t.marker is None for t in self._jobs.values())
        if self.executor.marker_interval() is None or self.paused is not None or not waiting:
            return self.marker_interval
        return max(0.01, min(self.marker_interval, self._next_markers - self.clock()))

    def step(self) -> None:
        """One cycle: read markers, poll if due, decide. The thread calls it; tests call it directly
        with a fake clock."""
        with self._lock:
            tracked = list(self._jobs.values())
        now = self.clock()
        if not tracked:
            self.paused, self.stale = None, False  # nothing waits on the link (the next job asks again)
            return
        if not self._read_markers(tracked, now):
            return  # the cluster is unreachable: nothing to decide until it answers again
        # A job stopped by a signal (walltime, scancel by an admin) waits for the scheduler's
        # reason: ask about once a second meanwhile instead of on the slow schedule.
        waiting_for_reason = any(self._stopped(t) for t in tracked)
        polled = False
        if now >= self._next_poll or (waiting_for_reason and now - self._last_poll_at >= 1.0):
            polled = self._poll(tracked, now)
        for t in tracked:
            self._decide(t, now, polled)

    def _read_markers(self, tracked: list[_Tracked], now: float) -> bool:
        """Look for the markers not seen yet; False while the cluster cannot be reached."""
        interval = self.executor.marker_interval()
        pending = [t for t in tracked if t.marker is None]
        if interval is not None:
            if self.paused is not None and now < self._next_poll:
                return False  # waiting for the next attempt to reach the cluster
            if now < self._next_markers or (not pending and tracked):
                return True
            self._next_markers = now + interval
        try:
            found = self.executor.read_markers([t.job for t in pending])
        except TransportError as exc:
            self._link_down(exc, tracked, now)
            return False
        except Exception as exc:  # one odd answer: the poll and the next read decide
            log.warning("reading the markers of %s failed: %s", self.executor.name, exc)
            return True
        if interval is not None:
            self._link_up(tracked)  # they came from the cluster: it answers
        for t in pending:
            marker = found.get(t.job.task.id)
            if marker is not None and marker != t.stale_marker:
                t.marker, t.marker_at = marker, now
        return True

    def _link_down(self, exc: TransportError, tracked: list[_Tracked], now: float) -> None:
        """The cluster cannot be reached: pause every job (state kept, message set), retry later."""
        self.poll_errors += 1
        delay = self._backoff.next()
        self._next_poll = now + delay
        if self.paused is None:
            log.warning("%s: %s (%s); %d job(s) keep their state, retrying in %.0fs", self.executor.name,
                        exc.pause_message, exc, len(tracked), delay)
        self.paused = exc
        self.stale = True
        for t in (t for t in tracked if not t.paused):
            t.paused = True
            self.listener.on_paused(t.job, exc.pause_message)

    def _link_up(self, tracked: list[_Tracked]) -> None:
        if self.paused is None:
            return
        log.info("%s answers again (unreachable since %s); tracking resumes", self.executor.name,
                 self.paused.pause_message.rsplit(" ", 1)[-1])
        self.paused = None
        self._backoff.reset()
        for t in (t for t in tracked if t.paused):
            t.paused = False
            t.pending_reason = None  # let the next poll say again why it waits
            self.listener.on_resumed(t.job)
        self._resend_cancels(tracked)

    def _resend_cancels(self, tracked: list[_Tracked]) -> None:
        for t in tracked:
            if t.cancel_requested and t.cancel_failed:
                t.cancel_failed = False
                self.cancel(t.job.task.id)

    def _poll(self, tracked: list[_Tracked], now: float) -> bool:
        jobs = [t.job for t in tracked if t.job.native_id is not None]
        self._last_poll_at = now
        start = time.monotonic()
        ok = False
        try:
            statuses = self.executor.poll(jobs)
            ok = True
        except Deferred as exc:  # the call budget has no token: a later poll, nothing stale
            self._next_poll = now + exc.retry_after
            return False
        except TransportError as exc:
            self._link_down(exc, tracked, now)
            return False
        except Exception as exc:
            self.poll_errors += 1
            delay = self._backoff.next()
            self._next_poll = now + delay
            if not self.stale:
                log.warning("poll of %s failed (%s); jobs keep their state, retrying in %.0fs",
                            self.executor.name, exc, delay)
            self.stale = True
            return False
        finally:
            metrics.poll_cycle(self.executor.name, time.monotonic() - start, ok)
        self.poll_count += 1
        if self.stale and self.paused is None:
            log.info("poll of %s works again", self.executor.name)
        self._link_up(tracked)
        self._resend_cancels(tracked)
        self.stale = False
        self._backoff.reset()
        youngest = min(now - t.job.submitted_at for t in tracked)
        self._next_poll = now + self.executor.poll_interval(youngest)
        for t in tracked:
            st = statuses.get(t.job.native_id or "")
            if st is not None and st.job_name and st.job_name != t.job.job_name:
                st = None  # the id was reused by another job (e.g. after a controller reset)
            t.status = st if st is not None else t.opinion  # gone from the queue: accounting's word stays
            if st is not None and not st.state.final:
                t.last_seen = st
            if t.marker is not None:
                t.polled_after_marker = True
        return True

    def _stopped(self, t: _Tracked) -> bool:
        """The command ended by a signal (its wrapper was told to stop, or it died of one, e.g.
        the OOM killer): the runtime, not the exit code, knows why."""
        return (t.marker is not None and not t.cancel_requested
                and (bool(t.marker.signal) or t.marker.exit_code >= 128))

    def _decide(self, t: _Tracked, now: float, polled: bool) -> None:
        st = t.status
        if t.marker is not None and t.polled_after_marker and not t.cancel_requested:
            note = requeued_after(t.marker, st, self.executor.started_stamp(t.job))
            if note is not None and st is not None:
                self._requeued(t, st, note)
                return
        if t.marker is not None:
            if self._stopped(t) and now - t.marker_at < self.signal_wait:
                # Give the runtime a moment to say why (TIMEOUT, OUT_OF_MEMORY, ...): wait for a
                # poll after the marker, and while that poll still shows the job, for its end.
                if not t.polled_after_marker or (st is not None and not st.state.final):
                    return
            no_record = self.executor.no_record_note() if st is None else None
            self._finish(t, decide(t.marker, st, t.cancel_requested, t.job, no_record=no_record, last_seen=t.last_seen))
            return
        if st is not None and st.state.final:
            t.final_seen_at = t.final_seen_at or now
            if now - t.final_seen_at >= self.marker_grace:
                self._finish(t, decide(None, st, t.cancel_requested))
            return
        if st is not None:
            t.missing_since = None
            if st.state == State.RUNNING and not t.running_reported:
                t.running_reported = True
                self.listener.on_running(t.job, st)
            elif st.state == State.SUBMITTED and (st.message != t.pending_reason or t.running_reported):
                t.pending_reason, t.running_reported = st.message, False  # queued again after running: requeued
                self.listener.on_pending(t.job, st)
            return
        if not polled or t.job.native_id is None:
            return
        # Gone from the queue with no marker yet: ask the second opinion (sacct), again every
        # OPINION_RETRY seconds while it has no final word (accounting may not have the job's end
        # yet, or not even the job); LOST only when the grace has passed without one.
        t.missing_since = t.missing_since or now
        if now - t.missing_since >= self.marker_grace and now >= t.opinion_at:
            t.opinion_at = now + OPINION_RETRY
            try:
                opinion = self.executor.lookup_finished(t.job)
            except (Deferred, TransportError):  # the call budget, or the link: ask again next poll
                t.opinion_at = 0.0
                opinion = None
            except Exception as exc:
                log.info("second opinion on %s failed: %s", t.job.task.id, exc,
                         extra={"task_id": t.job.task.id, "native_id": t.job.native_id})
                opinion = None
            if opinion is not None and opinion.state.final:
                t.status = t.opinion = opinion
                t.final_seen_at = now
                return
            if opinion is not None:  # accounting knows it alive (pending/running): not gone
                t.missing_since = now
                return
        if now - t.missing_since >= self.lost_grace:
            self._finish(t, _gone(t, self.executor, self.lost_grace))

    def _requeued(self, t: _Tracked, st: NativeStatus, note: str) -> None:
        log.info("%s: %s; the marker of its earlier run is set aside", t.job.task.id, note,
                 extra={"task_id": t.job.task.id, "native_id": t.job.native_id})
        shown = t.requeued(st, note)
        (self.listener.on_running if t.running_reported else self.listener.on_pending)(t.job, shown)

    def _finish(self, t: _Tracked, outcome: Outcome) -> None:
        with self._lock:
            self._jobs.pop(t.job.task.id, None)
        if t.paused:
            self.listener.on_resumed(t.job)
        if self._watcher is not None:
            self._watcher.remove(t.job.fem_dir)
        try:
            self.executor.after_final(t.job)
        except Exception as exc:
            log.warning("cleanup of %s failed: %s", t.job.task.id, exc,
                        extra={"task_id": t.job.task.id, "native_id": t.job.native_id})
        self.listener.on_final(t.job, outcome)
