"""How a job ended: the pure decision from its exit-code marker and the scheduler's last word.

No threads and no I/O here, so every rule is a row of a table test (tests/test_outcome.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from ..executors.base import Job, NativeStatus
from ..layout import Marker
from ..model import Reason, State, format_walltime


@dataclass
class Outcome:
    state: State
    reason: Reason | None
    exit_code: int | None
    message: str | None
    started: str | None = None
    finished: str | None = None


def _utc(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()


def ran_seconds(marker: Marker) -> float | None:
    """How long the command ran, from the marker's own start and end times (whole seconds)."""
    if not marker.started or not marker.finished:
        return None
    try:
        return _utc(marker.finished) - _utc(marker.started)
    except ValueError:
        return None


def over_walltime(marker: Marker, job: Job | None) -> bool:
    """Whether a job stopped by a signal had run its full walltime when it ended: the reason a
    runtime that enforces walltime itself (local, docker) would give, derived from the marker's
    own start and end times, so it survives a restart of the service between the kill and the end."""
    limit = job.task.resources.walltime_seconds if job is not None else None
    ran = ran_seconds(marker)
    if not marker.signal or limit is None or ran is None:
        return False
    return ran >= limit - 1  # the marker has whole seconds


def walltime_margin(limit: float) -> float:
    """How far below its walltime a SIGTERM'd command may have stopped and still count as killed
    by it, when the scheduler keeps no record to say so: the wrapper starts after the scheduler's
    clock does (prologue, file staging) and the marker has whole seconds. A walltime kill itself
    comes at or after the limit (PBS's MoM checks it periodically)."""
    return max(5.0, 0.01 * limit)


def _sigterm(marker: Marker) -> bool:
    return marker.signal == "TERM" or (not marker.signal and marker.exit_code == 128 + 15)


def vanished(last_seen: NativeStatus | None, started: bool, no_record: str) -> Outcome | None:
    """A job the scheduler no longer knows, with no marker, on a scheduler that keeps no record of
    ended jobs (`no_record` says why, e.g. PBS without job history). Last seen queued or held and
    never started (no running state seen, no `started` stamp, no marker): it left the queue before
    it ran, which only a delete does. Anything else: None (the caller reports it LOST)."""
    if started or last_seen is None or last_seen.state != State.SUBMITTED:
        return None
    return Outcome(State.CANCELLED, None, None,
                   f"left the queue before it started (deleted outside fem-hpc; {no_record})")


def _term_without_record(marker: Marker, job: Job | None, last_seen: NativeStatus | None,
                         no_record: str) -> Outcome | None:
    """A SIGTERM'd command whose job the scheduler no longer knows and keeps no record of: below
    its walltime only a delete (qdel) sends that, at its walltime the limit did. The walltime is the
    task's or, without one, the one the scheduler showed on the live job (a queue default); none
    at all means no limit could have sent it. None: the marker has no times to compare."""
    limit: float | None = job.task.resources.walltime_seconds if job is not None else None
    if limit is None and last_seen is not None:
        limit = last_seen.walltime_limit
    ran = ran_seconds(marker)
    started, finished = marker.started, marker.finished
    if limit is None:
        return Outcome(State.CANCELLED, None, marker.exit_code,
                       "terminated by SIGTERM with no walltime set, and the scheduler has no record of its end: "
                       f"deleted outside fem-hpc ({no_record})", started, finished)
    if ran is None:
        return None
    shown = f"ran {format_walltime(int(ran))} of its walltime {format_walltime(int(limit))}"
    if ran >= limit - walltime_margin(limit):
        return Outcome(State.FAILED, Reason.TIMEOUT, marker.exit_code,
                       f"walltime exceeded: terminated by SIGTERM after it {shown} (the scheduler keeps no record "
                       "of its end to confirm it)", started, finished)
    return Outcome(State.CANCELLED, None, marker.exit_code,
                   f"terminated by SIGTERM before its walltime ({shown}), and the scheduler has no record of its "
                   f"end: deleted outside fem-hpc ({no_record})", started, finished)


def requeued_after(marker: Marker, status: NativeStatus | None, started_stamp: str | None) -> str | None:
    """Whether the scheduler says the job is alive again after the run that wrote `marker` (a
    rerun/retry, `scontrol requeue`): the message to show, else None (the marker is the job's end).
    `status` must come from a poll made after the marker was read. Queued again: a job never goes
    back to the queue after its command ended unless it was requeued. Running with the scheduler's
    requeue word and a marker of a stopped run: the marker is stale when the wrapper's `started`
    stamp is newer than the marker's start (the rerun has begun); without a stamp to compare, the
    scheduler's word wins."""
    if status is None or status.state.final:
        return None
    if status.state == State.SUBMITTED:
        return status.message if status.requeued and status.message else (
            f"requeued: the scheduler lists the job queued again after its command ended (exit {marker.exit_code})")
    # Running again: only a stopped run (signal) is rerun; a marker of an own exit is this run's end,
    # which the scheduler has not seen yet (with no stamp to compare, it would be lost otherwise).
    if not status.requeued or not (marker.signal or marker.exit_code >= 128):
        return None
    if started_stamp is not None and marker.started is not None and started_stamp <= marker.started:
        return None  # the marker is this run's own: it has just ended and the scheduler lags
    return status.message or (
        f"requeued: the scheduler runs the job again after its command ended (exit {marker.exit_code})")


def decide(marker: Marker | None, status: NativeStatus | None, cancel_requested: bool,
           job: Job | None = None, *, no_record: str | None = None,
           last_seen: NativeStatus | None = None) -> Outcome:
    """The final word on a job from its marker and the scheduler's last status. `no_record`: the
    scheduler keeps no record of ended jobs (why, from Executor.no_record_note), so a job it no
    longer lists (`status` None) is judged by its marker and `last_seen`, its last live status."""
    started = marker.started if marker else None
    finished = marker.finished if marker else None
    exit_code = marker.exit_code if marker else (status.exit_code if status else None)
    if cancel_requested or (status is not None and status.state == State.CANCELLED):
        # Cancelled outside fem-hpc (qdel/scancel by the user or an admin): the scheduler says by whom.
        outside = status.message if status is not None and not cancel_requested else None
        return Outcome(State.CANCELLED, None, exit_code, outside or "cancelled", started, finished)
    # The scheduler's reason for a stop (TIMEOUT, OUT_OF_MEMORY) beats the bare exit code, but its
    # NODE_FAIL ("could not run the job") is a guess a marker disproves: the command ran and ended.
    if (status is not None and status.state == State.FAILED and status.reason not in (None, Reason.EXIT_CODE)
            and not (marker is not None and status.reason == Reason.NODE_FAIL)):
        return Outcome(State.FAILED, status.reason, exit_code, status.message or status.reason.value,
                       started, finished)
    if marker is not None:
        if marker.exit_code == 0:
            return Outcome(State.COMPLETED, None, 0, None, started, finished)
        if status is None and no_record is not None and _sigterm(marker):
            judged = _term_without_record(marker, job, last_seen, no_record)
            if judged is not None:
                return judged
        if over_walltime(marker, job):
            assert job is not None
            return Outcome(State.FAILED, Reason.TIMEOUT, marker.exit_code,
                           f"walltime {job.task.resources.walltime} exceeded", started, finished)
        why = f"command exited with code {marker.exit_code}"
        if marker.signal:
            why += f" after SIG{marker.signal} was sent to it"
        return Outcome(State.FAILED, Reason.EXIT_CODE, marker.exit_code, why, started, finished)
    assert status is not None
    if status.state == State.COMPLETED:
        # The scheduler says it ended but the wrapper left no marker: the exit code is unknown.
        return Outcome(State.FAILED, Reason.LOST, status.exit_code,
                       "the scheduler reports the job completed, but it left no exit-code marker")
    return Outcome(State.FAILED, status.reason or Reason.EXIT_CODE, status.exit_code, status.message)
