"""Stopping the jobs this service runs itself (local processes, apptainer, docker containers):
SIGTERM now, SIGKILL after a grace period if the job still runs, and the walltime these executors
enforce on their own (a batch scheduler does both itself).

The executor says how to signal its kind of job (`terminate`, `kill`); `Stopper` keeps the rest:
the verdict of each stopped job (why it was stopped: TIMEOUT or CANCELLED, reported by poll once
the job has ended), the pending SIGKILL timers, and the walltime check against an injectable clock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from ..model import Reason, State
from .base import Job, NativeStatus

log = logging.getLogger("fem_hpc.executors.timers")

Clock = Callable[[], float]


def over_walltime(job: Job, now: float) -> NativeStatus | None:
    """The TIMEOUT verdict for a job that has run past its walltime at `now`; None within it."""
    limit = job.task.resources.walltime_seconds
    if job.native_id is None or limit is None or now - job.submitted_at <= limit:
        return None
    return NativeStatus(native_id=job.native_id, state=State.FAILED, reason=Reason.TIMEOUT,
                        message=f"walltime {job.task.resources.walltime} exceeded", job_name=job.job_name)


class Stopper:
    """The verdicts and pending SIGKILLs of one executor's stopped jobs, by native id."""

    def __init__(self, grace_seconds: float, *, clock: Clock = time.time):
        self.grace_seconds = grace_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._verdicts: dict[str, NativeStatus] = {}
        self._timers: dict[str, threading.Timer] = {}

    def verdict(self, native_id: str) -> NativeStatus | None:
        with self._lock:
            return self._verdicts.get(native_id)

    def walltime_verdict(self, job: Job) -> NativeStatus | None:
        """The TIMEOUT verdict when a running job is over its walltime and not being stopped yet."""
        if job.native_id is None or self.verdict(job.native_id) is not None:
            return None
        return over_walltime(job, self._clock())

    def stop(self, native_id: str, verdict: NativeStatus, terminate: Callable[[], bool],
             kill: Callable[[], None]) -> None:
        """Record `verdict`, call `terminate()` (send SIGTERM; it returns False when nothing is left
        to stop), then `kill()` after the grace period on a daemon timer (SIGKILL if the job still
        runs: `kill` checks). A second stop while a SIGKILL is pending keeps the first deadline.
        An exception of `terminate` reaches the caller, with the verdict already recorded."""
        with self._lock:
            self._verdicts[native_id] = verdict
        if not terminate():
            return
        with self._lock:
            if native_id in self._timers:
                return
            timer = threading.Timer(self.grace_seconds, self._fire, args=(native_id, kill))
            timer.daemon = True
            self._timers[native_id] = timer
        timer.start()

    def _fire(self, native_id: str, kill: Callable[[], None]) -> None:
        with self._lock:
            self._timers.pop(native_id, None)
        try:
            kill()
        except Exception as exc:  # gone already, or the runtime is away: the next poll tells
            log.debug("SIGKILL of %s after the grace period failed: %s", native_id, exc)

    def pending(self) -> list[str]:
        """Native ids whose SIGKILL is still to come."""
        with self._lock:
            return list(self._timers)

    def forget(self, native_id: str, *, cancel_kill: bool = False) -> None:
        """Drop a final job's verdict. Its pending SIGKILL still comes unless `cancel_kill` (for a
        job whose runtime has already removed everything, e.g. a force-removed container)."""
        with self._lock:
            self._verdicts.pop(native_id, None)
            timer = self._timers.pop(native_id, None) if cancel_kill else None
        if timer is not None:
            timer.cancel()

    def close(self) -> None:
        """Wait for the pending SIGKILLs: a job being stopped still gets its SIGKILL when the grace
        period ends, even when the service (or `fem-hpc run`) stops first."""
        with self._lock:
            timers = list(self._timers.values())
        for timer in timers:
            timer.join()
