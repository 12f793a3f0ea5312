"""How a job ended: the pure decision from its exit-code marker and the scheduler's last word.

No threads and no I/O here, so every rule is a row of a table test (tests/test_outcome.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from ..executors.base import Job, NativeStatus
from ..layout import Marker
from ..model import Reason, State


@dataclass
class Outcome:
    state: State
    reason: Reason | None
    exit_code: int | None
    message: str | None
    started: str | None = None
    finished: str | None = None


def over_walltime(marker: Marker, job: Job | None) -> bool:
    """Whether a job stopped by a signal had run its full walltime when it ended: the reason a
    runtime that enforces walltime itself (local, docker) would give, derived from the marker's
    own start and end times, so it survives a restart of the service between the kill and the end."""
    limit = job.task.resources.walltime_seconds if job is not None else None
    if not marker.signal or limit is None or not marker.started or not marker.finished:
        return False
    try:
        started, finished = (datetime.strptime(t, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
                             for t in (marker.started, marker.finished))
    except ValueError:
        return False
    return finished - started >= limit - 1  # the marker has whole seconds


def decide(marker: Marker | None, status: NativeStatus | None, cancel_requested: bool,
           job: Job | None = None) -> Outcome:
    """The final word on a job from its marker and the scheduler's last status."""
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
